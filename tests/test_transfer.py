"""Study 3: the frozen-then-refined backbone under the ConvNet head (random Lite0 keeps it fast)."""

import time

import pytest
import torch

from cifarlab.config import Config
from cifarlab.engine import make_autocast
from cifarlab.studies import TransferTask
from cifarlab.train import train
from conftest import calibrated_lite0, run_cli, save_lite0_file, write_cifar_python
from synthetic import synthetic_cifar
from test_train import metric_values

CPU = torch.device("cpu")


def transfer_cfg(**changes):
    base = Config.for_study("transfer", steps=10, batch_size=16, lr=1e-3, eval_every=5, checkpoint_every=5,
                            device="cpu", tensorboard=False, backbone="efficientnet-lite0",
                            backbone_weights="none", init="xavier")
    return base.replace(**changes)


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar(6, 3)


def backbone_state(run_path, step):
    from safetensors.torch import load_file

    weights = load_file(str(run_path / "checkpoints" / f"step-{step}.safetensors"))
    return {k: v for k, v in weights.items() if k.startswith("stages.pool5.body.")}


def test_backbone_frozen_before_k_and_all_parameters_train_after(tmp_path, data):
    cfg = transfer_cfg(refine_after=5)
    torch.manual_seed(cfg.seed)  # as build_task does: the same random backbone as the run's
    start = TransferTask(cfg, data, CPU, make_autocast("fp32", CPU), progress=False)
    initial = {f"stages.{k}": v.clone() for k, v in start.model.stages.named_parameters() if k.startswith("pool5.body.")}
    run, _ = train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    at_k, at_end = backbone_state(run.path, 5), backbone_state(run.path, 10)
    for name, value in initial.items():
        assert torch.equal(at_k[name], value), f"{name} changed before step K"
        assert not torch.equal(at_end[name], at_k[name]), f"{name} did not train after step K"


def test_no_gradient_reaches_the_frozen_backbone(data):
    task = TransferTask(transfer_cfg(refine_after=3, feature_cache=False), data, CPU, make_autocast("fp32", CPU),
                        progress=False)
    loss, _, _ = task.train_loss(task.train_inputs(0)[0])
    loss.backward()
    assert all(p.grad is None for p in task.backbone.parameters())
    assert task.model.stages["fc1"].linear.weight.grad is not None
    assert task.prepare_step(2) == []
    assert len(task.prepare_step(3)) == len(list(task.backbone.parameters()))


def test_feature_cache_gives_the_uncached_head_outputs(tmp_path, data):
    # a backbone with features of order 1 (a random one with default BatchNorm statistics gives
    # ~1e-9, on which any two computations agree)
    weights = str(save_lite0_file(calibrated_lite0(), tmp_path / "lite0.pth"))
    autocast = make_autocast("fp32", CPU)
    torch.manual_seed(0)
    cached = TransferTask(transfer_cfg(backbone_weights=weights), data, CPU, autocast, progress=False)
    torch.manual_seed(0)
    direct = TransferTask(transfer_cfg(backbone_weights=weights, feature_cache=False), data, CPU, autocast,
                          progress=False)
    assert not cached.cached  # built when training starts, not when a task is made (eval, analysis)
    for task in (cached, direct):
        assert task.prepare_step(0) == []
    assert cached.cached and not direct.cached
    assert cached.cached["test"].abs().mean() > 0.1
    index = torch.arange(len(data.test_labels))  # one batch, as the cache was built: the same kernels
    for task in (cached, direct):
        task.model.eval()
    with torch.no_grad():
        a, ya = cached._logits("test", index)
        b, yb = direct._logits("test", index)
    assert torch.equal(ya, yb) and b.abs().max() > 0.01
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    one, _ = train(transfer_cfg(backbone_weights=weights), out=str(tmp_path / "cached"), progress=False, data=data)
    two, _ = train(transfer_cfg(backbone_weights=weights, feature_cache=False), out=str(tmp_path / "direct"),
                   progress=False, data=data)
    rows = list(zip(metric_values(one.path), metric_values(two.path)))
    assert len(rows) == len(metric_values(two.path)) == 4 and all(r1[:2] == r2[:2] for r1, r2 in rows)
    assert float(rows[-2][1][2]) < 1.5  # the head learns on these features (train loss; ln 10 = 2.303)
    for r1, r2 in rows:
        assert float(r1[2]) == pytest.approx(float(r2[2]), rel=1e-4)


@pytest.mark.parametrize("k", [4, 5])
def test_transfer_resume_across_k_equals_uninterrupted(tmp_path, data, k):
    """Cut at step 5: after K=4 the backbone's Adam group is in last.pt; at K=5 it has not joined
    yet when the checkpoint is saved, and the resume adds it at K as the uninterrupted run does."""
    cfg = transfer_cfg(refine_after=k)
    full, _ = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    part, _ = train(cfg.replace(steps=5), out=str(tmp_path / "part"), progress=False, data=data)
    resumed, _ = train(cfg, resume=part.path, overrides={"steps": 10}, progress=False, data=data)
    assert metric_values(resumed.path) == metric_values(full.path)
    refined, expected = backbone_state(resumed.path, 10), backbone_state(full.path, 10)
    assert refined.keys() == expected.keys() and all(torch.equal(refined[name], expected[name]) for name in expected)
    assert not all(torch.equal(refined[name], v) for name, v in backbone_state(part.path, 5).items()), "no refining"


def test_eval_of_a_refined_run_scores_the_refined_backbone(tmp_path, data):
    """`cifarlab eval` builds the task and loads the checkpoint: the logged accuracy comes back, not
    the refined head on features of the frozen backbone."""
    run, summary = train(transfer_cfg(refine_after=5), out=str(tmp_path / "run"), progress=False, data=data)
    assert summary["feature_cache"]  # the frozen steps trained on cached features
    res = run_cli("eval", run.path, "--data", write_cifar_python(tmp_path / "data", data).parent)
    assert res.returncode == 0, res.stderr
    loss = next(float(r[2]) for r in reversed(metric_values(run.path)) if r[1] == "test")
    line = next(line for line in res.stdout.splitlines() if " test: " in line)
    assert f"step 10 test: loss {loss:.4f}" in line


def test_ctrl_c_while_the_feature_cache_is_built_stops_at_once(tmp_path, data, monkeypatch):
    """The cache pass comes before training's Ctrl-C handling (which finishes the step it is in
    and saves): during a pass over every image Ctrl-C has Python's own handler, which stops it
    at once. (Checked on the handler itself: a signal sent to the process may be handled by
    Python a moment later, which made a test that sent one depend on timing.)"""
    import signal

    handlers = []

    def interrupted(self):  # a pass over the images, during which the user presses Ctrl-C
        handlers.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt  # what that handler does

    monkeypatch.setattr(TransferTask, "_cache_features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(transfer_cfg(), out=str(tmp_path / "run"), progress=False, data=data)
    assert handlers == [signal.default_int_handler]
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step was trained


def test_a_run_resumed_past_k_still_says_it_trained_on_cached_features(tmp_path, data):
    cfg = transfer_cfg(refine_after=8)  # 8 frozen steps and one evaluation: the cache pays
    part, first = train(cfg.replace(steps=9), out=str(tmp_path / "run"), progress=False, data=data)
    assert first["feature_cache"] and first["feature_cache_seconds"] > 0
    # the cache pass is wall time but not training time
    assert first["wall_seconds"] >= first["train_seconds"] + first["feature_cache_seconds"] - 2e-3
    _, summary = train(cfg, resume=part.path, overrides={"steps": 10}, progress=False, data=data)
    assert summary["feature_cache"]  # built by the first process; this one started past K
    assert summary["feature_cache_seconds"] == pytest.approx(first["feature_cache_seconds"], abs=1e-3)
    assert summary["wall_seconds"] >= summary["train_seconds"] + summary["feature_cache_seconds"] - 2e-3


def test_a_cache_built_again_on_resume_counts_as_wall_time(tmp_path, data, monkeypatch):
    part, first = train(transfer_cfg(steps=6), out=str(tmp_path / "run"), progress=False, data=data)
    build = TransferTask._cache_features

    def slow(self):
        build(self)
        time.sleep(0.5)
        self.cache_seconds += 0.5  # the task times its own pass; here the sleep is part of it

    monkeypatch.setattr(TransferTask, "_cache_features", slow)
    _, summary = train(transfer_cfg(), resume=part.path, overrides={"steps": 12}, progress=False, data=data)
    assert summary["feature_cache_seconds"] >= first["feature_cache_seconds"] + 0.5  # built again: still frozen
    assert summary["wall_seconds"] >= summary["train_seconds"] + summary["feature_cache_seconds"] - 2e-3


def test_features_offer_pool5_and_the_head(data):
    task = TransferTask(transfer_cfg(), data, CPU, make_autocast("fp32", CPU), progress=False)
    assert task.model.layer_names == ("pool5", "fc1", "fc2", "logits")
    feats = task.model.eval().features(task.splits["test"].batch(torch.arange(3))[0], ["pool5", "fc2"])
    assert feats["pool5"].shape == (3, 1280) and feats["fc2"].shape == (3, 192)


def test_the_feature_cache_is_used_only_when_it_saves_backbone_work():
    full = Config.for_study("transfer")  # 10,000 frozen steps of 128 images
    assert TransferTask.cache_pays(full, 50000, 60000)
    assert not TransferTask.cache_pays(full.replace(refine_after=100), 50000, 60000)  # 12,800 images < 60,000
    assert TransferTask.cache_pays(full.replace(refine_after=1000), 50000, 60000)
    assert not TransferTask.cache_pays(full.replace(refine_after=0), 50000, 60000)
    # a resume counts only the frozen steps still ahead: at step 9,900 of 10,000, 12,800 images
    assert not TransferTask.cache_pays(full, 50000, 60000, start=full.steps - 100)
    assert TransferTask.cache_pays(full, 50000, 60000, start=full.steps - 1000)


def test_features_of_a_transfer_run_are_pool5_and_the_head(tmp_path, data):
    from cifarlab.analysis import load_features

    run, _ = train(transfer_cfg(steps=2, eval_every=2, checkpoint_every=2), out=str(tmp_path / "run"),
                   progress=False, data=data)
    feats = load_features(run.path, None, "test", data=data, progress=False)
    assert list(feats.layers) == ["pool5", "fc1", "fc2"]
    assert [x.shape[1] for x in feats.layers.values()] == [1280, 384, 192]  # Lite0's pooled width, the head's
    assert all(len(x) == len(data.test_labels) for x in feats.layers.values())


def test_eval_and_features_need_no_weights_file_and_the_path_is_recorded_absolute(tmp_path, data, monkeypatch):
    """The checkpoint holds the whole backbone: a weights file moved away after training must not
    stop `eval` (nor analysis), and a relative path is recorded as an absolute one."""
    from cifarlab.analysis import extract_features

    (tmp_path / "w").mkdir()
    save_lite0_file(calibrated_lite0(), tmp_path / "w" / "lite 0.pth")
    monkeypatch.chdir(tmp_path / "w")
    run, _ = train(transfer_cfg(backbone_weights="lite 0.pth", steps=5), out=str(tmp_path / "run"),
                   progress=False, data=data)
    assert run.config().backbone_weights == str(tmp_path / "w" / "lite 0.pth")
    (tmp_path / "w" / "lite 0.pth").unlink()
    monkeypatch.chdir(tmp_path)
    res = run_cli("eval", run.path, "--data", write_cifar_python(tmp_path / "data", data).parent)
    assert res.returncode == 0, res.stderr
    loss = next(float(r[2]) for r in reversed(metric_values(run.path)) if r[1] == "test")
    assert f"step 5 test: loss {loss:.4f}" in res.stdout
    import numpy as np

    with np.load(extract_features(run.path, "pool5", split="test", data=data, progress=False)) as npz:
        assert npz["pool5"].std() > 0.01  # the calibrated backbone's, loaded from the checkpoint
    # a resume loads the backbone from last.pt too, and still says where its weights came from
    _, summary = train(transfer_cfg(), resume=run.path, overrides={"steps": 7}, progress=False, data=data)
    assert summary["steps"] == 7 and "lite 0.pth" in summary["backbone_weights"]
    last = run.path / "checkpoints" / "last.pt"  # as saved by a version that did not record the source
    state = torch.load(last, weights_only=True)
    del state["task"]["weights_source"]
    torch.save(state, last)
    _, summary = train(transfer_cfg(), resume=run.path, overrides={"steps": 9}, progress=False, data=data)
    assert "lite 0.pth" in summary["backbone_weights"]  # the config's record, not the random init built


def test_a_random_backbones_batch_norm_statistics_fit_its_inputs_so_it_can_learn(tmp_path, data):
    """With BatchNorm's initial statistics (mean 0, variance 1), which TransferNet keeps, a random
    Lite0's pool5 features are ~1e-10 and nothing trains; estimated on training images they are of
    order 1, and refining from step 0 lowers the training loss."""
    cfg = transfer_cfg(refine_after=0, steps=30, eval_every=10, checkpoint_every=30)
    task = TransferTask(cfg, data, CPU, make_autocast("fp32", CPU), progress=False)
    with torch.no_grad():
        pool5 = task.model.eval().features(task.splits["test"].batch(torch.arange(8))[0], ["pool5"])["pool5"]
    assert pool5.abs().mean() > 1e-2
    assert "BatchNorm statistics estimated on 60 training images" in task.backbone.weights_source
    run, summary = train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    train_losses = [row["loss"] for row in run.metrics if row["split"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.2, train_losses
    assert "BatchNorm statistics estimated" in summary["backbone_weights"]


def test_random_backbones_batchnorm_statistics_are_an_average_over_images():
    """Parts of near-equal size, each weighted by its images: 257 images (a part of one image
    would stop Lite0's last BatchNorm) train, and the first BatchNorm's mean, whose inputs
    depend on no statistics, is that of all the images, however they are split."""
    from cifarlab.backbones import build_backbone
    from cifarlab.studies import DeviceImages, batch_norms, estimate_batch_norm_statistics

    data = synthetic_cifar(26, 3)

    def first_mean(n, batch):
        images = DeviceImages(data.train_images[:n], data.train_labels[:n], None, CPU, torch.channels_last)
        torch.manual_seed(0)
        backbone = build_backbone("efficientnet-lite0", "none", 32, progress=False)
        estimate_batch_norm_statistics(backbone, images, seed=0, batch=batch)
        return batch_norms(backbone)[0].running_mean.clone()

    whole = first_mean(258, 258)
    torch.testing.assert_close(first_mean(258, 256), whole, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(first_mean(257, 256)).all()


def test_larger_inputs_are_scored_in_smaller_batches_with_the_same_numbers(data):
    """1,000 images at a time at 32x32; at 224x224 that many would need tens of GB of backbone
    activations, so the batch shrinks with the pixels, and the scores do not change with it."""
    from cifarlab.studies import EVAL_BATCH, eval_batch

    assert (eval_batch(32), eval_batch(64), eval_batch(224)) == (EVAL_BATCH, EVAL_BATCH // 4, 20)
    task = TransferTask(transfer_cfg(input_size=64), data, CPU, make_autocast("fp32", CPU), progress=False)
    assert task.eval_batch == EVAL_BATCH // 4
    task.model.eval()  # as the engine scores
    scores = task.evaluate()
    task.image_batch = 7  # a batch that splits the test set unevenly
    assert task.evaluate()["test"] == pytest.approx(scores["test"], rel=1e-5)
    sizes = []
    task.backbone.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    task._cache_features()
    assert max(sizes) == 7
    assert task.eval_batch == EVAL_BATCH  # the head alone on cached features: no images to hold
