import csv
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cifarlab import CifarlabError
from cifarlab.config import Config, load_config
from cifarlab.engine import TrainingDiverged
from cifarlab.studies import EpochShuffler
from cifarlab.train import train
from conftest import run_locked_by_another_process, wrap_built_tasks
from synthetic import synthetic_cifar


def small_cfg(**changes) -> Config:
    base = Config(steps=40, batch_size=20, lr=1e-3, eval_every=10, checkpoint_every=20, init="xavier",
                  device="cpu", tensorboard=False)
    return base.replace(**changes)


def metric_values(run_path):
    with open(run_path / "metrics.csv") as fh:
        return [(r["step"], r["split"], r["loss"], r["accuracy"]) for r in csv.DictReader(fh)]


def test_short_run_learns_synthetic_data_well_above_chance(tmp_path):
    run, summary = train(small_cfg(steps=60), out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())
    assert summary["final_test_accuracy"] > 0.6  # chance is 0.1
    assert summary["steps"] == 60 and summary["best_test_step"] in (10, 20, 30, 40, 50, 60)


def test_run_directory_has_every_artifact(tmp_path):
    cfg = small_cfg(steps=20, tensorboard=True, weight_decay=0.005, dropout=0.2)
    run, summary = train(cfg, out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())
    p = run.path
    assert load_config(p / "config.toml") == cfg
    text = (p / "config.toml").read_text()
    assert "cifarlab_version" in text and "weight_decay = 0.005" in text
    # only what its study reads: no Siamese margin or transfer backbone in a classifier's config
    assert "margin" not in text and "backbone" not in text and "val_tuples" not in text
    rows = metric_values(p)
    assert [(s, split) for s, split, *_ in rows] == [("10", "train"), ("10", "test"), ("20", "train"), ("20", "test")]
    assert sorted(x.name for x in (p / "checkpoints").iterdir()) == ["last.pt", "step-20.safetensors"]
    weights = load_file(str(p / "checkpoints" / "step-20.safetensors"))
    assert "stages.fc1.linear.weight" in weights
    assert any(f.name.startswith("events.out.tfevents") for f in (p / "tb").iterdir())
    assert (p / "plots" / "curves.png").stat().st_size > 10_000
    for key in ("final_test_accuracy", "best_test_accuracy", "best_test_step", "final_test_loss",
                "wall_seconds", "ms_per_step", "device", "torch_version"):
        assert summary[key] is not None
    assert not [f for f in p.rglob(".tmp-*")], "temporary files left behind"


def test_tensorboard_has_every_weights_histogram_at_every_evaluation(tmp_path):
    """As the original assignment asked; binned where the weights live (write_weight_histograms),
    so each must still say the weights' count, range and sum, and a tensor of one value (biases
    at 0) gets one bucket."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from cifarlab.engine import write_weight_histograms

    cfg = small_cfg(steps=10, eval_every=5, checkpoint_every=10, tensorboard=True)
    run, _ = train(cfg, out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())
    events = EventAccumulator(str(run.path / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    weights = load_file(str(run.path / "checkpoints" / "step-10.safetensors"))
    names = sorted(events.Tags()["histograms"])
    assert names == sorted(weights)  # every parameter (the ConvNet has no buffers)
    for name in names:
        histograms = events.Histograms(name)
        assert [h.step for h in histograms] == [5, 10]
        value = histograms[-1].histogram_value
        assert sum(value.bucket) == value.num > 0 and len(value.bucket) == len(value.bucket_limit)
        assert list(value.bucket_limit) == sorted(value.bucket_limit) and value.bucket_limit[-1] == value.max
    fc1 = next(w for key, w in weights.items() if key.endswith("fc1.linear.weight"))
    value = next(events.Histograms(n) for n in names if n.endswith("fc1.linear.weight"))[-1].histogram_value
    assert (value.num, value.min, value.max) == (fc1.numel(), fc1.min().item(), fc1.max().item())
    assert value.sum == pytest.approx(fc1.double().sum().item(), rel=1e-6, abs=1e-9)
    assert value.sum_squares == pytest.approx(fc1.double().square().sum().item(), rel=1e-5)
    inside = (fc1 >= value.bucket_limit[9]) & (fc1 < value.bucket_limit[10])  # the 11th bucket's values
    assert value.bucket[10] == pytest.approx(int(inside.sum()), abs=2)  # (a value on an edge may fall either side)

    writer = SummaryWriter(str(tmp_path / "const"))
    narrow = torch.tensor([0, 5e-38, 1e-37, 1e-37])  # a range of 1e-37: bins / width would overflow
    write_weight_histograms(writer, [("zeros", torch.zeros(7)), ("spread", torch.arange(10.0)),
                                     ("narrow", narrow)], step=1)
    writer.close()
    events = EventAccumulator(str(tmp_path / "const"), size_guidance={"histograms": 0})
    events.Reload()
    zeros, spread = (events.Histograms(n)[0].histogram_value for n in ("zeros", "spread"))
    assert (list(zeros.bucket), list(zeros.bucket_limit), zeros.num) == ([7.0], [0.0], 7)
    assert sum(spread.bucket) == 10 and spread.bucket[0] == 1 and spread.bucket[-1] == 1
    value = events.Histograms("narrow")[0].histogram_value
    assert {i: c for i, c in enumerate(value.bucket) if c} == {0: 1, 32: 1, 63: 2}


def test_existing_run_directory_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(CifarlabError, match="already exists"):
        train(small_cfg(steps=2), out=str(out), progress=False, data=synthetic_cifar())
    assert (out / "precious.txt").read_text() == "mine"


def test_resume_equals_uninterrupted_run(tmp_path):
    data = synthetic_cifar()
    cfg = small_cfg(dropout=0.3)  # dropout makes the RNG state matter
    full, _ = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    first, _ = train(cfg.replace(steps=20), out=str(tmp_path / "part"), progress=False, data=data)
    resumed, _ = train(cfg, resume=first.path, overrides={"steps": 40}, progress=False, data=data)
    assert metric_values(resumed.path) == metric_values(full.path)


def test_bf16_trains_in_bfloat16_learns_and_resumes_exactly(tmp_path, monkeypatch):
    """--precision bf16 on the CPU: the layers compute in bfloat16 while training, the losses
    stay finite floats, the run learns, and a resumed run equals an uninterrupted one."""
    import cifarlab.train as train_module

    dtypes = set()

    def hooked(task):
        for module in task.model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype) if m.training else None)
        return task

    data = synthetic_cifar()
    restore = wrap_built_tasks(monkeypatch, hooked)
    learnt, summary = train(small_cfg(precision="bf16"), out=str(tmp_path / "learnt"), progress=False, data=data)
    restore()
    assert dtypes == {torch.bfloat16}
    assert summary["final_test_accuracy"] > 0.4  # chance is 0.1
    assert all(math.isfinite(float(loss)) for _, _, loss, _ in metric_values(learnt.path))
    # dropout makes the RNG state matter; few steps: bfloat16 is emulated (slow) on CPUs without AVX-512 BF16
    cfg = small_cfg(precision="bf16", dropout=0.3, steps=10, eval_every=5, checkpoint_every=5)
    full, _ = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    first, _ = train(cfg.replace(steps=5), out=str(tmp_path / "part"), progress=False, data=data)
    resumed, _ = train(cfg, resume=first.path, overrides={"steps": 10}, progress=False, data=data)
    assert len(metric_values(full.path)) == 4 and metric_values(resumed.path) == metric_values(full.path)


def test_a_run_saved_with_a_capturable_adam_resumes_on_the_cpu(tmp_path):
    """A run trained on a GPU saves Adam as capturable (for its CUDA graph); its settings must not
    come back with the state on a CPU, where a capturable Adam refuses to step."""
    data = synthetic_cifar()
    cfg = small_cfg(dropout=0.3, steps=20, checkpoint_every=10)
    full, _ = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    first, _ = train(cfg.replace(steps=10), out=str(tmp_path / "part"), progress=False, data=data)
    last = first.path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.update(capturable=True, foreach=None, fused=True)  # what a GPU run saves
    torch.save(state, last)
    resumed, _ = train(cfg, resume=first.path, overrides={"steps": 20}, progress=False, data=data)
    assert metric_values(resumed.path) == metric_values(full.path)
    groups = torch.load(last, weights_only=True)["optimizer"]["param_groups"]
    assert [g["capturable"] for g in groups] == [False] * len(groups)


@pytest.fixture
def traced_losses(monkeypatch):
    """torch.compile with a backend that records what dynamo traced and runs it as traced: the
    engine's use of torch.compile is tested, not inductor's code generation (a minute a model)."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=backend, **kw))
    return graphs


def compile_case(study):
    """A short run of each study, dropout on (so the RNG path is traced too)."""
    if study == "classifier":
        return small_cfg(steps=20, weight_decay=0.01, dropout=0.3), synthetic_cifar(), 1
    if study == "siamese":
        return (Config.for_study("siamese", steps=20, batch_size=20, lr=1e-3, eval_every=10, checkpoint_every=20,
                                 device="cpu", tensorboard=False, init="xavier", val_tuples=5, dropout=0.3),
                synthetic_cifar(60), 1)
    return (Config.for_study("transfer", steps=6, batch_size=8, lr=1e-3, eval_every=3, checkpoint_every=6,
                             device="cpu", tensorboard=False, backbone="efficientnet-lite0", backbone_weights="none",
                             refine_after=3, dropout=0.3),
            synthetic_cifar(3, 2), 2)  # a graph before K (the head on cached features), one after


@pytest.mark.parametrize("study", ["classifier", "siamese", "transfer"])
def test_a_compiled_step_trains_as_the_eager_one(tmp_path, traced_losses, study):
    cfg, data, phases = compile_case(study)
    eager, _ = train(cfg, out=str(tmp_path / "eager"), progress=False, data=data)
    assert not traced_losses
    compiled, summary = train(cfg.replace(compile=True), out=str(tmp_path / "compiled"), progress=False, data=data)
    assert len(traced_losses) == phases, "the loss should trace as one graph a phase, no breaks"
    ops = {str(node.target) for node in traced_losses[-1].graph.nodes if node.op == "call_function"}
    assert any("linear" in op for op in ops), ops
    # the recording backend runs what dynamo traced, draws included: the same numbers exactly
    assert metric_values(compiled.path) == metric_values(eager.path)
    assert load_config(compiled.path / "config.toml").compile is True


def test_a_backend_that_fails_is_one_error_line_with_its_reason(tmp_path, monkeypatch):
    def backend(graph_module, example_inputs):
        raise ValueError("no C++ compiler found")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=backend, **kw))
    with pytest.raises(CifarlabError, match=r"torch.compile could not compile the training step "
                                            r"\(ValueError: no C\+\+ compiler found\); train without --compile"):
        train(small_cfg(steps=4, compile=True), out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())


def test_an_error_of_the_first_compiled_step_that_is_not_the_compilers_passes_unchanged(tmp_path, traced_losses,
                                                                                      monkeypatch):
    def step(self, closure=None):
        raise RuntimeError("out of memory (a stand-in)")

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(small_cfg(steps=4, compile=True), out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())
    assert traced_losses, "the loss was compiled before Adam failed"


def test_compile_and_distributed_together_are_refused():
    with pytest.raises(CifarlabError,
                       match="invalid config: --compile is not supported with --distributed training; drop one"):
        Config(compile=True, distributed=True).validate()


class InterruptAt:
    """Wraps a task and sends the process SIGINT when a given step's batch is drawn."""

    def __init__(self, step):
        self.step = step

    def happen(self):
        os.kill(os.getpid(), signal.SIGINT)

    def __call__(self, task):
        draw = task.train_inputs

        def train_inputs(step):
            if step == self.step:
                self.happen()
            return draw(step)

        task.train_inputs = train_inputs
        return task


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path, monkeypatch):
    import cifarlab.train as train_module

    data = synthetic_cifar()
    cfg = small_cfg(dropout=0.3)
    full, _ = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    build = train_module.build_task
    monkeypatch.setattr(train_module, "build_task", lambda *a, **k: InterruptAt(13)(build(*a, **k)))
    with pytest.raises(CifarlabError, match="interrupted at step 14.*--resume"):
        train(cfg, out=str(tmp_path / "cut"), progress=False, data=data)
    monkeypatch.setattr(train_module, "build_task", build)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 14
    resumed, _ = train(cfg, resume=tmp_path / "cut", progress=False, data=data)
    assert metric_values(resumed.path) == metric_values(full.path)


def test_a_run_started_with_ctrl_c_ignored_keeps_it_ignored(tmp_path, monkeypatch):
    """nohup, or a job a script starts in the background: SIGINT ignored from the start. Training
    must not take Ctrl-C back (it would stop a run its user made immune to it)."""
    data = synthetic_cifar()
    cfg = small_cfg(steps=20)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the fixture puts the terminal's handler back after
    restore = wrap_built_tasks(monkeypatch, InterruptAt(5))
    run, summary = train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    restore()
    assert summary["steps"] == 20 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


class CrashAt(InterruptAt):
    """Wraps a task and makes the process 'die' (an error nothing catches) when a step's batch is drawn."""

    def happen(self):
        raise SystemError("the process died here")


def test_a_run_extended_past_a_last_step_off_the_eval_cadence_equals_an_uninterrupted_one(tmp_path):
    data = synthetic_cifar()
    cfg = small_cfg(dropout=0.3)  # eval every 10, checkpoints every 20
    full, _ = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    short, summary = train(cfg.replace(steps=25), out=str(tmp_path / "part"), progress=False, data=data)
    assert {row["step"] for row in short.metrics} == {10, 20, 25} and summary["steps"] == 25
    resumed, _ = train(cfg, resume=short.path, overrides={"steps": 40}, progress=False, data=data)
    assert metric_values(resumed.path) == metric_values(full.path)  # the train mean at 30 covers 21..30


def test_tensorboard_drops_the_off_cadence_point_of_a_run_extended_past_it(tmp_path):
    data = synthetic_cifar()
    cfg = small_cfg(tensorboard=True)
    short, _ = train(cfg.replace(steps=25), out=str(tmp_path / "run"), progress=False, data=data)
    assert tensorboard_steps(short.path, "test/accuracy") == [10, 20, 25]
    train(cfg, resume=short.path, overrides={"steps": 40}, progress=False, data=data)
    assert tensorboard_steps(short.path, "test/accuracy") == [10, 20, 30, 40]


def test_a_run_that_died_after_logging_but_before_any_checkpoint_trains_anew_on_resume(tmp_path, monkeypatch):
    data = synthetic_cifar()
    cfg = small_cfg(steps=20, eval_every=5, checkpoint_every=10, tensorboard=True)
    full, _ = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    restore = wrap_built_tasks(monkeypatch, CrashAt(7))
    with pytest.raises(SystemError):
        train(cfg, out=str(tmp_path / "died"), progress=False, data=data)
    restore()
    assert [r["step"] for r in RunDir_metrics(tmp_path / "died")] == [5, 5]
    assert not (tmp_path / "died" / "checkpoints").exists() or not any((tmp_path / "died" / "checkpoints").iterdir())
    resumed, _ = train(cfg, resume=tmp_path / "died", progress=False, data=data)
    assert metric_values(resumed.path) == metric_values(full.path)
    assert tensorboard_steps(resumed.path, "test/accuracy") == [5, 10, 15, 20]  # the dead attempt's step 5 purged


def test_tensorboard_keeps_no_duplicates_of_steps_a_crashed_attempt_logged_past_its_checkpoint(tmp_path, monkeypatch):
    data = synthetic_cifar()
    cfg = small_cfg(steps=20, eval_every=5, checkpoint_every=10, tensorboard=True)
    restore = wrap_built_tasks(monkeypatch, CrashAt(17))  # logged step 15 after the checkpoint at 10
    with pytest.raises(SystemError):
        train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    restore()
    resumed, _ = train(cfg, resume=tmp_path / "run", progress=False, data=data)
    assert tensorboard_steps(resumed.path, "train/loss") == [5, 10, 15, 20]


def test_a_resumed_runs_event_file_sorts_after_the_older_ones_made_in_the_same_second(tmp_path):
    """TensorBoard reads event files in name order, and names made in one second compare by host,
    pid and counter as text (".10" before ".9"): the resumed attempt's file must still come last,
    or the purge it begins with is undone."""
    import time

    data = synthetic_cifar()
    cfg = small_cfg(steps=10, eval_every=5, checkpoint_every=5, tensorboard=True)
    run, _ = train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    # an older file that sorts after anything made this second or the next
    older = run.path / "tb" / f"events.out.tfevents.{int(time.time()) + 1:010d}.~~~~.1.9"
    older.write_bytes(b"")
    train(cfg, resume=run.path, overrides={"steps": 15}, progress=False, data=data)
    names = sorted(p.name for p in (run.path / "tb").iterdir())
    assert len(names) == 3 and names[-2] == older.name  # the resumed attempt's file is read last


def test_resuming_to_a_ctrl_c_step_on_the_eval_cadence_saves_its_weights(tmp_path, monkeypatch):
    from cifarlab.runs import RunDir

    data = synthetic_cifar()
    cfg = small_cfg()  # eval every 10, checkpoints every 20
    restore = wrap_built_tasks(monkeypatch, InterruptAt(9))  # stops after step 10: logged, but no weights saved
    with pytest.raises(CifarlabError, match="interrupted at step 10"):
        train(cfg, out=str(tmp_path / "cut"), progress=False, data=data)
    restore()
    assert RunDir(tmp_path / "cut").weight_steps() == []
    resumed, summary = train(cfg, resume=tmp_path / "cut", overrides={"steps": 10}, progress=False, data=data)
    assert summary["steps"] == 10 and RunDir(resumed.path).weight_steps() == [10]
    assert [r["step"] for r in RunDir(resumed.path).read_metrics()] == [10, 10]  # logged once


def test_resuming_to_exactly_the_step_ctrl_c_saved_at_logs_and_saves_that_last_step(tmp_path, monkeypatch):
    data = synthetic_cifar()
    cfg = small_cfg(dropout=0.3)
    whole, _ = train(cfg.replace(steps=14), out=str(tmp_path / "whole"), progress=False, data=data)
    restore = wrap_built_tasks(monkeypatch, InterruptAt(13))
    with pytest.raises(CifarlabError, match="interrupted at step 14"):
        train(cfg, out=str(tmp_path / "cut"), progress=False, data=data)
    restore()
    resumed, summary = train(cfg, resume=tmp_path / "cut", overrides={"steps": 14}, progress=False, data=data)
    assert metric_values(resumed.path) == metric_values(whole.path)
    assert summary["steps"] == 14 and "step-14.safetensors" in os.listdir(resumed.path / "checkpoints")


def test_a_resume_drops_weights_an_abandoned_attempt_saved_past_its_last_pt(tmp_path):
    import shutil

    from cifarlab.runs import RunDir

    data = synthetic_cifar()
    cfg = small_cfg(steps=10, checkpoint_every=10)
    run, _ = train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    # a crash between writing step-20's weights and last.pt (as if it had gone on to 20)
    shutil.copy(run.path / "checkpoints" / "step-10.safetensors", run.path / "checkpoints" / "step-20.safetensors")
    train(cfg, resume=run.path, overrides={"steps": 15}, progress=False, data=data)
    assert RunDir(run.path).weight_steps() == [10, 15]


def test_a_resume_that_fails_before_its_first_step_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    data = synthetic_cifar()
    cfg = small_cfg(steps=25, checkpoint_every=10)  # its last step, 25, is off the eval cadence
    run, _ = train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    files = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    restore = wrap_built_tasks(monkeypatch, CrashAt(25))  # the first step of the resume
    with pytest.raises(SystemError):
        train(cfg, resume=run.path, overrides={"steps": 40}, progress=False, data=data)
    restore()
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == files  # its row at 25 too


def test_runs_started_at_once_never_share_a_folder(tmp_path):
    from cifarlab.runs import RunDir

    first, second = (RunDir.create(None, "classifier", root=tmp_path) for _ in range(2))
    assert first.path == second.path  # the same time stamp, neither claimed yet
    first.materialise()
    second.materialise()
    assert first.path != second.path and (second.path / "config.toml").is_file()
    mine, theirs = (RunDir.create(str(tmp_path / "out"), "classifier") for _ in range(2))
    mine.materialise()
    with pytest.raises(CifarlabError, match="another run started in it just now; choose another --out"):
        theirs.materialise()


def RunDir_metrics(path):
    from cifarlab.runs import RunDir

    return RunDir(path).read_metrics()


def tensorboard_steps(run_path, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import cifarlab.train as train_module

    build = train_module.build_task

    def poisoned(*a, **k):
        task = build(*a, **k)
        loss_fn = task.train_loss
        calls = {"n": 0}

        def train_loss(*inputs):
            calls["n"] += 1
            loss, correct, n = loss_fn(*inputs)
            return (loss * float("nan") if calls["n"] > 25 else loss), correct, n

        task.train_loss = train_loss
        return task

    monkeypatch.setattr(train_module, "build_task", poisoned)
    with pytest.raises(TrainingDiverged, match="nan.*step-20.safetensors"):
        train(small_cfg(), out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())
    ckpts = sorted(x.name for x in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["last.pt", "step-20.safetensors"]
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-20.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_shuffler_is_a_fresh_permutation_each_epoch_and_pure_in_step():
    shuf = EpochShuffler(100, 30, seed=7, device=torch.device("cpu"))
    epoch0 = torch.cat([shuf(s) for s in range(3)])
    epoch1 = torch.cat([shuf(s) for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 90 and len(set(epoch1.tolist())) == 90
    assert not torch.equal(epoch0, epoch1)
    again = EpochShuffler(100, 30, seed=7, device=torch.device("cpu"))
    assert torch.equal(again(4), shuf(4))
    with pytest.raises(CifarlabError, match="larger than the training set"):
        EpochShuffler(10, 30, seed=0, device=torch.device("cpu"))


def test_validation_split_is_evaluated_beside_test(tmp_path):
    run, _ = train(small_cfg(steps=10, val_fraction=0.2), out=str(tmp_path / "run"), progress=False,
                   data=synthetic_cifar())
    assert [split for _, split, *_ in metric_values(run.path)] == ["train", "val", "test"]


def test_settings_a_study_does_not_read_do_not_make_another_run():
    from cifarlab.config import identity_differences

    classifier = Config()
    assert identity_differences(classifier, classifier.replace(margin=2.0, backbone="efficientnet-lite0")) == []
    assert identity_differences(classifier, classifier.replace(weight_decay=0.01)) == ["weight_decay"]
    siamese = Config.for_study("siamese")
    assert identity_differences(siamese, siamese.replace(margin=2.0, weight_decay=0.1)) == ["margin"]
    assert "study" in identity_differences(classifier, siamese)


def test_bad_config_values_are_refused():
    for bad in (dict(steps=0), dict(dropout=1.0), dict(precision="fp8"), dict(device="tpu")):
        with pytest.raises(CifarlabError, match="invalid config"):
            small_cfg(**bad)


def test_written_files_get_the_usual_permissions(tmp_path):
    from safetensors.torch import save_file

    from cifarlab.fileio import write_text, write_with

    umask = os.umask(0)
    os.umask(umask)
    write_with(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    write_text(tmp_path / "t.txt", "x")
    for name in ("w.safetensors", "t.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_step_that_cannot_be_captured_trains_eagerly_with_the_same_results(tmp_path):
    """A CUDA-graph capture that fails half-way (after its warm-up steps changed the weights,
    Adam's state and the dropout stream) is undone: the run goes on as the eager path would."""
    from cifarlab.engine import Trainer, make_autocast
    from cifarlab.runs import RunDir
    from cifarlab.studies import build_task

    data = synthetic_cifar()
    cfg = small_cfg(dropout=0.3, steps=30)
    eager, _ = train(cfg, out=str(tmp_path / "eager"), progress=False, data=data)

    device = torch.device("cpu")
    task = build_task(cfg, device, make_autocast(cfg.precision, device), data=data, progress=False)
    run = RunDir.create(str(tmp_path / "fallback"), cfg.study)
    run.write_config(cfg)
    trainer = Trainer(cfg, task, run, device, progress=False)
    runner = trainer.runner
    runner.use_graph = True  # as on a GPU; the capture itself is replaced by one that fails

    def warm_up_that_syncs():  # the steps run, then the sync check fires (as it would on a GPU)
        for _ in range(3):
            runner._step(runner.static_inputs)
        raise RuntimeError("called a synchronizing CUDA operation\nmore detail")

    def capture():
        raise AssertionError("no capture may start after a warm-up that synchronised")

    runner._warm_up, runner._capture_graph = warm_up_that_syncs, capture
    with pytest.warns(RuntimeWarning, match="cannot be captured as a CUDA graph .RuntimeError: called a synchronizing"):
        trainer.fit()
    assert not runner.use_graph and runner.graph_failure == "RuntimeError: called a synchronizing CUDA operation"
    assert metric_values(run.path) == metric_values(eager.path)


def test_a_capture_error_is_reported_by_its_root_cause():
    from cifarlab.engine import _first_cause

    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing\ndetails")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as err:
        assert _first_cause(err) == "RuntimeError: operation not permitted when stream is capturing"
    try:
        try:
            raise KeyError("inner")
        except KeyError:
            raise ValueError("outer") from None
    except ValueError as err:
        assert _first_cause(err) == "ValueError: outer"


@pytest.fixture
def deterministic_cuda(monkeypatch):
    """cuDNN's fixed, exact kernels while a test runs: the engine's own choice (benchmark mode,
    TF32) may pick other kernels for the graph and the eager run. On an H100 the first train loss
    of the two then differed by 1.8e-4 relative, which says nothing about the graph path."""
    import cifarlab.engine as engine

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    resolve = engine.resolve_device

    def exact(name):
        device = resolve(name)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        return device

    monkeypatch.setattr(engine, "resolve_device", exact)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     precision) = saved
    torch.set_float32_matmul_precision(precision)


def assert_close(run_a, run_b, loss_tol=1e-3, acc_tol=0.01):
    """Two runs' metrics equal up to rounding (the same deterministic kernels in both)."""
    a, b = metric_values(run_a.path), metric_values(run_b.path)
    assert len(a) == len(b) > 0
    for (s1, p1, l1, a1), (s2, p2, l2, a2) in zip(a, b):
        assert (s1, p1) == (s2, p2)
        assert abs(float(l1) - float(l2)) < loss_tol, (s1, p1, l1, l2)
        assert abs(float(a1) - float(a2)) < acc_tol, (s1, p1, a1, a2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_task_that_syncs_falls_back_and_a_clean_one_is_captured(tmp_path, deterministic_cuda):
    """On a real GPU: the graph path gives the eager path's results (no dropout), and a task
    whose loss reads a value back to the host is caught by the warm-up and trains eagerly."""
    import json

    import cifarlab.train as train_module

    data = synthetic_cifar()
    cfg = small_cfg(device="cuda", steps=30)
    graph, graph_summary = train(cfg, out=str(tmp_path / "graph"), progress=False, data=data)
    eager, _ = train(cfg.replace(cuda_graph=False), out=str(tmp_path / "eager"), progress=False, data=data)
    assert graph_summary["cuda_graph"] is True and "cuda_graph_failure" not in graph_summary
    assert_close(graph, eager)

    build = train_module.build_task

    def syncing(*a, **k):
        task = build(*a, **k)
        loss_fn = task.train_loss

        def train_loss(*inputs):
            loss, correct, n = loss_fn(*inputs)
            return loss * (1.0 if loss.item() > -1 else 0.0), correct, n  # .item(): a host sync

        task.train_loss = train_loss
        return task

    train_module.build_task = syncing
    try:
        with pytest.warns(RuntimeWarning, match="cannot be captured as a CUDA graph"):
            synced, summary = train(cfg, out=str(tmp_path / "synced"), progress=False, data=data)
    finally:
        train_module.build_task = build
    assert summary["cuda_graph"] is False and "synchroniz" in summary["cuda_graph_failure"]
    assert json.loads((synced.path / "summary.json").read_text())["cuda_graph"] is False
    assert_close(synced, eager)  # eager from the same state
    torch.cuda.empty_cache()  # the allocator is in a sane state: no capture was left open


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_captured_run_with_dropout_resumes_as_an_uninterrupted_one(tmp_path, deterministic_cuda):
    """The warm-up before a capture draws dropout masks; they are undone, so a run captured anew
    at a resume draws the masks an uninterrupted run drew there."""
    data = synthetic_cifar()
    cfg = small_cfg(device="cuda", dropout=0.3)
    full, summary = train(cfg, out=str(tmp_path / "full"), progress=False, data=data)
    assert summary["cuda_graph"] is True, summary.get("cuda_graph_failure")
    first, _ = train(cfg.replace(steps=20), out=str(tmp_path / "part"), progress=False, data=data)
    resumed, _ = train(cfg, resume=first.path, overrides={"steps": 40}, progress=False, data=data)
    assert_close(resumed, full)
    torch.cuda.empty_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_runs_resume_across_devices_and_a_compiled_step_is_captured(tmp_path, deterministic_cuda):
    """On a real GPU: a run saved on the CPU resumes captured on the GPU (Adam fused and
    capturable there), one saved on the GPU resumes on the CPU, and the torch.compile'd loss
    inside the CUDA graph trains as the plain graph does."""
    data = synthetic_cifar()
    cfg = small_cfg(steps=40)
    on_cpu, _ = train(cfg, out=str(tmp_path / "cpu"), progress=False, data=data)
    on_gpu, _ = train(cfg.replace(device="cuda"), out=str(tmp_path / "gpu"), progress=False, data=data)

    first, _ = train(cfg.replace(steps=20), out=str(tmp_path / "cpu-then-gpu"), progress=False, data=data)
    resumed, summary = train(cfg, resume=first.path, overrides={"steps": 40, "device": "cuda"}, progress=False,
                             data=data)
    assert summary["cuda_graph"] is True, summary.get("cuda_graph_failure")
    groups = torch.load(first.path / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["fused"] and g["capturable"] for g in groups)
    assert_close(resumed, on_cpu, loss_tol=1e-2, acc_tol=0.05)  # CPU and GPU kernels round differently

    first, _ = train(cfg.replace(steps=20, device="cuda"), out=str(tmp_path / "gpu-then-cpu"), progress=False,
                     data=data)
    resumed, summary = train(cfg, resume=first.path, overrides={"steps": 40, "device": "cpu"}, progress=False,
                             data=data)
    assert summary["device"].startswith("cpu")
    assert_close(resumed, on_gpu, loss_tol=1e-2, acc_tol=0.05)

    compiled, summary = train(cfg.replace(device="cuda", compile=True), out=str(tmp_path / "compiled"),
                              progress=False, data=data)
    assert summary["cuda_graph"] is True, summary.get("cuda_graph_failure")
    assert_close(compiled, on_gpu, loss_tol=5e-3, acc_tol=0.03)  # inductor's own kernels round otherwise
    torch.cuda.empty_cache()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_on_cpu_freed_activation_memory_is_reused_without_page_faults():
    """resolve_device("cpu") keeps freed memory in the heap: a 48 MiB buffer (too large for
    glibc's own reuse) allocated again after a free maps no new pages once the heap has grown.
    It may grow a few times first (small allocations made between two large ones keep a freed
    block from merging back; CI saw seven), so the test allows a few buffers of growth and then
    wants none. In a fresh process, since the setting is process-wide and cannot be undone."""
    code = """if True:
        import ctypes, resource, torch
        from cifarlab.engine import resolve_device

        # 4 KiB pages, whatever the host's transparent-huge-page setting ("always" maps a
        # buffer in a few faults, which would hide what is measured): PR_SET_THP_DISABLE
        assert ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) == 0

        def page_faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        default = page_faults()
        resolve_device("cpu")
        print(default, *[page_faults() for _ in range(12)])
    """
    env = {**os.environ, "CIFARLAB_KEEP_FREED_MEMORY": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    default, *kept = map(int, res.stdout.split())
    assert default > 5 * 1000  # 12,288 pages of 4 KiB per buffer, mapped anew each time
    assert sum(kept) < 2 * default  # 60 allocations map at most ~10 buffers' worth (default: 60)
    assert sum(kept[-4:]) < default / 50  # and then the heap has stopped growing


def test_device_auto_gets_the_settings_of_the_device_it_picks(monkeypatch):
    """--device auto (the default) is not a way around a device's speed settings: on a machine
    without a GPU it is --device cpu, keeping freed memory included."""
    from cifarlab import engine

    calls = []
    monkeypatch.setenv("CIFARLAB_KEEP_FREED_MEMORY", "1")
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: False)
    assert engine.resolve_device("auto") == torch.device("cpu")
    assert engine.resolve_device("cpu") == torch.device("cpu")
    assert len(calls) == 2


def test_ctrl_c_in_the_last_step_finishes_the_run_and_still_says_it_was_interrupted(tmp_path, monkeypatch):
    """The last step's evaluation and checkpoint are most of a short run's time: a Ctrl-C there
    must not be lost (reproduce would go on to its next run), nor the finished run's files."""
    import json

    from cifarlab.engine import TrainingInterrupted

    data = synthetic_cifar()
    cfg = small_cfg(steps=20)
    restore = wrap_built_tasks(monkeypatch, InterruptAt(19))
    with pytest.raises(TrainingInterrupted, match="interrupted in the last step; .* finished all 20 steps"):
        train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    restore()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and (tmp_path / "run" / "plots" / "curves.png").is_file()
    _, again = train(cfg, resume=tmp_path / "run", progress=False, data=data)
    assert again == summary  # finished: nothing more to train


def test_a_run_resumed_in_another_memory_format_has_adams_moments_laid_out_as_its_weights(tmp_path, monkeypatch):
    """Fused Adam (on a GPU) wants each moment in its parameter's layout; a contiguous run resumed
    channels_last would otherwise keep contiguous moments beside channels_last convolutions."""
    from cifarlab import engine

    data = synthetic_cifar()
    first, _ = train(small_cfg(steps=10, memory_format="contiguous"), out=str(tmp_path / "run"), progress=False,
                     data=data)
    seen = []
    fit = engine.Trainer.fit

    def checking_fit(self):
        for p, st in self.optimizer.state.items():
            seen.extend((p.stride(), st[k].stride()) for k in ("exp_avg", "exp_avg_sq"))
        return fit(self)

    monkeypatch.setattr(engine.Trainer, "fit", checking_fit)
    train(small_cfg(), resume=first.path, overrides={"steps": 20, "memory_format": "channels_last"},
          progress=False, data=data)
    assert any(len(param) == 4 and param != tuple(sorted(param, reverse=True)) for param, _ in seen)  # channels_last
    assert seen and all(param == moment for param, moment in seen)


def test_a_warm_up_error_that_is_no_host_sync_stops_the_run_with_its_own_message(tmp_path):
    """Only a host sync makes the step train eagerly: out of memory (a RuntimeError too) or a
    kernel's refusal would fail the eager step as well, and is no graph problem to warn of."""
    from cifarlab.engine import Trainer, make_autocast
    from cifarlab.runs import RunDir
    from cifarlab.studies import build_task

    cfg = small_cfg(steps=5)
    device = torch.device("cpu")
    task = build_task(cfg, device, make_autocast(cfg.precision, device), data=synthetic_cifar(), progress=False)
    run = RunDir.create(str(tmp_path / "run"), cfg.study)
    run.write_config(cfg)
    trainer = Trainer(cfg, task, run, device, progress=False)
    trainer.runner.use_graph = True

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.runner._warm_up = out_of_memory
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        trainer.fit()


def test_a_run_another_process_trains_is_refused_and_left_as_it_is(tmp_path):
    """Two processes on one run (a second --resume, two reproduce calls into one folder) would
    mix their metrics and checkpoints: the second is refused while the first holds the run."""
    import fcntl

    data = synthetic_cifar()
    cfg = small_cfg(steps=10)
    run, _ = train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with run_locked_by_another_process(tmp_path / "run"):
        with pytest.raises(CifarlabError, match="another process is training this run right now"):
            train(cfg, resume=tmp_path / "run", overrides={"steps": 20}, progress=False, data=data)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    resumed, summary = train(cfg, resume=tmp_path / "run", overrides={"steps": 20}, progress=False, data=data)
    assert summary["steps"] == 20
    fd = os.open(tmp_path / "run", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go when the training ended
    finally:
        os.close(fd)


def test_a_start_that_fails_after_claiming_its_folder_gives_the_folder_back(tmp_path, monkeypatch):
    """A new run claims its folder with an empty config.toml; if writing the real one fails, the
    claim goes (an empty config.toml would read as a default run), and an empty one met later is
    refused with what to do."""
    import cifarlab.runs as runs

    def full_disk(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(runs, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(small_cfg(steps=2), out=str(tmp_path / "new"), progress=False, data=synthetic_cifar())
    assert not (tmp_path / "new").exists()
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / "config.toml").write_text("")
    with pytest.raises(CifarlabError, match="holds no settings .the run never got past its start.; delete"):
        load_config(tmp_path / "left" / "config.toml")


def test_paths_with_control_characters_keep_config_toml_readable_and_non_utf8_ones_are_refused(tmp_path):
    from cifarlab.config import to_toml

    odd = Config(data='/data/a\nb\t"c"\\d\x7f\x01é')
    (tmp_path / "config.toml").write_text(to_toml(odd.to_dict()), encoding="utf-8")
    assert load_config(tmp_path / "config.toml") == odd
    with pytest.raises(CifarlabError, match=r"data \(--data\) 'nu\\udce9' is not valid UTF-8 .*rename it"):
        Config(data="nu\udce9").validate()  # how Python keeps a Latin-1 byte of a file name


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="needs git")
def test_the_commit_recorded_is_cifarlabs_own_never_that_of_a_project_it_is_installed_in(tmp_path, monkeypatch):
    import cifarlab.runs as runs

    def repo(path):
        path.mkdir(parents=True, exist_ok=True)
        git = ["git", "-C", str(path), "-c", "user.email=t@t", "-c", "user.name=t"]
        subprocess.run([*git[:3], "init", "-q"], check=True)
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", path.name], check=True)
        return subprocess.run([*git[:3], "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    commit = repo(tmp_path / "user-project")
    installed = tmp_path / "user-project" / ".venv" / "lib" / "site-packages" / "cifarlab"
    installed.mkdir(parents=True)
    monkeypatch.setattr(runs, "__file__", str(installed / "runs.py"))
    assert runs.git_commit() == "unknown"
    own = repo(tmp_path / "cifarlab-checkout")
    (tmp_path / "cifarlab-checkout" / "pyproject.toml").write_text("")
    (tmp_path / "cifarlab-checkout" / "src" / "cifarlab").mkdir(parents=True)
    monkeypatch.setattr(runs, "__file__", str(tmp_path / "cifarlab-checkout" / "src" / "cifarlab" / "runs.py"))
    assert runs.git_commit() == own != commit
    source = tmp_path / "cifarlab-checkout" / "src" / "cifarlab" / "runs.py"
    source.write_text("x = 1\n")
    git = ["git", "-C", str(tmp_path / "cifarlab-checkout"), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "src"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "source"], check=True)
    committed = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runs.git_commit() == committed
    source.write_text("x = 2\n")  # changed since: that commit alone did not make the run
    assert runs.git_commit() == committed + "+dirty"


def test_a_second_ctrl_c_while_the_first_ones_save_is_written_lets_it_finish(tmp_path, monkeypatch):
    from cifarlab import engine

    data = synthetic_cifar()
    cfg = small_cfg(steps=20)
    save = engine.Trainer.save_checkpoint

    def impatient_save(self, weights_too=True):  # the user presses Ctrl-C again while it saves
        if not weights_too:
            os.kill(os.getpid(), signal.SIGINT)
        return save(self, weights_too)

    monkeypatch.setattr(engine.Trainer, "save_checkpoint", impatient_save)
    restore = wrap_built_tasks(monkeypatch, InterruptAt(6))
    with pytest.raises(CifarlabError, match="interrupted at step 7; progress saved"):
        train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    restore()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 7


def test_a_second_ctrl_c_stops_at_once_and_says_where_a_resume_would_go_on_from(tmp_path, monkeypatch):
    data = synthetic_cifar()
    cfg = small_cfg(steps=40)  # checkpoints at 20 and 40

    class TwiceAt(InterruptAt):
        def happen(self):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    restore = wrap_built_tasks(monkeypatch, TwiceAt(24))
    with pytest.raises(CifarlabError, match=r"interrupted twice at step 24: stopped without saving; cifarlab train "
                                            r"classifier --resume .*run goes on from the last checkpoint \(step 20\)"):
        train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    restore = restore() or wrap_built_tasks(monkeypatch, TwiceAt(3))
    with pytest.raises(CifarlabError, match="interrupted twice at step 3: stopped without saving; nothing was saved "
                                            "yet: .* trains it from the start"):
        train(cfg, out=str(tmp_path / "new"), progress=False, data=data)
    restore()


def test_sigterm_saves_and_stops_as_a_first_ctrl_c_does_however_often_it_comes(tmp_path, monkeypatch,
                                                                               sigterm_caught):
    """`kill`, or a job scheduler's time limit, which may signal every process of a job, and again:
    the run saves and stops at the next step (never 'stopped without saving'), and resumes."""
    data = synthetic_cifar()
    cfg = small_cfg(steps=40)

    class TerminatedTwiceAt(InterruptAt):
        def happen(self):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    restore = wrap_built_tasks(monkeypatch, TerminatedTwiceAt(24))
    with pytest.raises(CifarlabError, match="interrupted at step 25; progress saved. Continue with: cifarlab "
                                            "train classifier --resume"):
        train(cfg, out=str(tmp_path / "run"), progress=False, data=data)
    restore()
    assert sigterm_caught == []  # the training's handler took both
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 25
    _, summary = train(cfg, resume=tmp_path / "run", progress=False, data=data)
    assert summary["steps"] == 40
    os.kill(os.getpid(), signal.SIGTERM)  # after the training, the handler it found is back
    assert sigterm_caught == [signal.SIGTERM]


def test_an_infinite_test_loss_stops_the_run_as_a_nan_training_loss_does(tmp_path, monkeypatch):
    """Finite weights whose logits overflow give a finite running train loss but an infinite test
    loss: the run has diverged, and summary.json must not get an Infinity (not JSON)."""
    import cifarlab.train as train_module

    build = train_module.build_task

    def overflowing(*a, **k):
        task = build(*a, **k)
        evaluate = task.evaluate
        task.evaluate = lambda: {name: (float("inf") if step_count["n"] >= 3 else loss, acc)
                                 for name, (loss, acc) in evaluate().items()}
        return task

    step_count = {"n": 0}
    monkeypatch.setattr(train_module, "build_task", overflowing)
    from cifarlab import engine

    log = engine.Trainer._log

    def counting_log(self):
        step_count["n"] += 1
        return log(self)

    monkeypatch.setattr(engine.Trainer, "_log", counting_log)
    with pytest.raises(TrainingDiverged, match=r"test loss inf at step 30; the last good checkpoint is .*step-20"):
        train(small_cfg(), out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())
    assert not (tmp_path / "run" / "summary.json").exists()
    assert [r[0] for r in metric_values(tmp_path / "run")] == ["10", "10", "20", "20"]  # the bad rows are not logged


def test_a_third_ctrl_c_aborts_even_the_save_the_first_asked_for():
    """A save that hangs (a stalled disk) must not make the process deaf to Ctrl-C."""
    from cifarlab.engine import _InterruptFlag

    flag = _InterruptFlag()
    flag._handle(signal.SIGINT, None)  # the first: stop at the next step, saving
    flag.saving = True
    flag._handle(signal.SIGINT, None)  # the second waits for the save
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)


def test_config_toml_without_a_study_is_refused_without_advice_to_delete_the_run(tmp_path):
    (tmp_path / "config.toml").write_text("steps = 10\n")
    with pytest.raises(CifarlabError, match=r"names no study; put back its `study = ...` line") as caught:
        load_config(tmp_path / "config.toml")
    assert "delete" not in str(caught.value)


def test_a_file_system_that_cannot_fsync_still_gets_its_files_but_a_full_disk_is_an_error(tmp_path, monkeypatch):
    import errno

    from cifarlab import fileio

    def no_fsync(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(fileio.os, "fsync", no_fsync)
    fileio.write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        fileio.write_text(tmp_path / "b.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_gpu_index_the_machine_does_not_have_is_one_clear_error(monkeypatch):
    from cifarlab import engine

    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CifarlabError, match=r"^--device cuda:3: torch sees 1 GPU \(cuda:0\)$"):
        engine.check_device("cuda:3")
    monkeypatch.setattr(engine.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(CifarlabError, match=r"^--device cuda:3: torch sees 2 GPUs \(cuda:0 to cuda:1\)$"):
        engine.check_device("cuda:3")


def test_a_resume_refuses_a_metrics_file_cut_short_rather_than_leave_a_gap(tmp_path):
    data = synthetic_cifar()
    run, _ = train(small_cfg(steps=20), out=str(tmp_path / "run"), progress=False, data=data)
    metrics = tmp_path / "run" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(line for line in lines if not line.startswith("20,")) + "\n")  # rows to step 10
    kept = metrics.read_bytes()
    with pytest.raises(CifarlabError, match=r"metrics.csv: ends at step 10, but .*last.pt was saved at step 20, "
                                            r"after an evaluation at step 20: the file was cut short"):
        train(small_cfg(), resume=tmp_path / "run", overrides={"steps": 30}, progress=False, data=data)
    assert metrics.read_bytes() == kept
