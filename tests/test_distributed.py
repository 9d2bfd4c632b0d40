"""--distributed on the CPU: two gloo processes under torchrun train as one process does at the
same global batch, only rank 0 writes, and resume works across both ways of running."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifarlab import CifarlabError
from cifarlab.config import Config
from cifarlab.distributed import TORCHRUN_ENV, Distributed
from cifarlab.train import train
from conftest import calibrated_lite0, save_lite0_file, write_cifar_python
from synthetic import synthetic_cifar
from test_train import metric_values

ATOL = 1e-5


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """The learnable synthetic set as cifar-10-batches-py, for processes that load it from disk."""
    return write_cifar_python(tmp_path_factory.mktemp("data"), synthetic_cifar(30, 4)).parent


SHARED = dict(batch_size=16, lr=1e-4, eval_every=5, checkpoint_every=5, init="xavier", device="cpu",
              tensorboard=False)


def flags(**values) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            out += [flag, str(value)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**values) -> dict:
    """This process's environment without any torchrun variables it may have, plus `values`:
    one thread per rank (two ranks share the two cores), output unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **values}


def torchrun(cwd, study, *args, nproc=2):
    """`torchrun --nproc-per-node 2 -m cifarlab train STUDY --distributed ARGS` in cwd."""
    env = process_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "cifarlab", "train", study, "--distributed", "--quiet", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def ranks(cwd, study, *args, nproc=2, env=None, failing=False):
    """The processes torchrun would start, each with the environment it would give them, but
    without its launcher (one more torch import per call). The classifier test goes through
    torchrun itself; the others test what the ranks do. `failing`: every rank is to fail on its
    own; returns what each printed."""
    env = process_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), **(env or {}))
    cmd = [sys.executable, "-m", "cifarlab", "train", study, "--distributed", "--quiet", *args]
    logs = [Path(cwd) / f"rank-{rank}.log" for rank in range(nproc)]
    procs = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as f:  # a file, not a pipe: no rank can block on a full pipe
                procs.append(subprocess.Popen(cmd, cwd=cwd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                              stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + (120 if failing else 300)
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if not failing and any(p.returncode not in (None, 0) for p in procs):
                break  # one rank failed: the others would wait for it in a collective
            time.sleep(0.2)
    finally:
        for p in procs:  # as torchrun does when a rank fails: stop the group
            if p.poll() is None:
                p.kill()
                p.wait()
    printed = [log.read_text() for log in logs]
    output = "".join(f"--- {log.name}\n{text}" for log, text in zip(logs, printed))
    for log in logs:
        log.unlink()
    if failing:
        assert all(p.returncode not in (0, -9) for p in procs), output  # each ended by itself
        return printed
    assert [p.returncode for p in procs] == [0] * nproc, output


def assert_same_weights(a, b, step, lr=SHARED["lr"], allowance=100_000):
    """Equal within float tolerance, with one allowance: Adam divides by sqrt(v) + eps, so where
    a gradient is ~0 a rounding-level difference (the batch sum is split over two ranks) can move
    a weight by up to about the learning rate. One entry in `allowance` may differ more (a few
    in a million for the ConvNet; a refining Lite0's 1x1 convolutions have a few dozen a
    million); a rank that missed the all-reduce, or averaged wrongly, makes most of them differ."""
    wa = load_file(str(a / "checkpoints" / f"step-{step}.safetensors"))
    wb = load_file(str(b / "checkpoints" / f"step-{step}.safetensors"))
    assert wa.keys() == wb.keys()  # plain names, no DDP "module." prefix
    for name in wa:
        diff = (wa[name] - wb[name]).abs()
        off = int((diff > ATOL).sum())
        assert off <= wa[name].numel() // allowance, f"{name} at step {step}: {off} differ, up to {diff.max():.2e}"
        assert diff.max() <= 2 * lr * step, f"{name} at step {step}: differs by {diff.max():.2e}"


def assert_same_train_means(a, b):
    """The same rows, each once, and the same train means: over both ranks' halves of each batch."""
    ra, rb = metric_values(a), metric_values(b)
    assert [r[:2] for r in ra] == [r[:2] for r in rb]
    for x, y in zip(ra, rb):
        if x[1] == "train":
            assert float(x[2]) == pytest.approx(float(y[2]), rel=1e-4)
            assert float(x[3]) == pytest.approx(float(y[3]), abs=1.5 / 80)  # at most one example of 80


def test_two_processes_equal_one_only_rank_0_writes_and_resume_works(tmp_path, cifar_dir):
    # The L2 term (added on every rank) keeps fc1/fc2 gradients off zero, where Adam's eps would
    # turn rounding-level differences of a near-zero gradient into a visible step.
    settings = dict(SHARED, weight_decay=0.01)
    one, _ = train(Config(steps=10, data=str(cifar_dir), **settings), out=str(tmp_path / "one"), progress=False)
    work = tmp_path / "work"
    work.mkdir()
    res = torchrun(work, "classifier", "--out", "two", *flags(steps=5, data=cifar_dir, **settings))
    assert res.stdout.count("finished two: 5 steps") == 1  # rank 0 alone reports
    two = work / "two"
    written = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    assert written == ["two", "two/checkpoints", "two/checkpoints/last.pt", "two/checkpoints/step-5.safetensors",
                       "two/config.toml", "two/metrics.csv", "two/plots", "two/plots/curves.png", "two/summary.json"]
    assert_same_weights(one.path, two, 5)

    torchrun(work, "classifier", "--resume", "two", "--steps", "10")  # every rank loads last.pt
    assert_same_weights(one.path, two, 10)
    assert_same_train_means(one.path, two)
    assert "distributed = true" in (two / "config.toml").read_text()

    # a distributed run continues in one process: plain weight names, nothing rank-specific
    _, summary = train(Config(), resume=two, overrides={"steps": 12}, progress=False)
    assert summary["steps"] == 12 and "processes" not in summary


def test_siamese_two_processes_equal_one(tmp_path, cifar_dir):
    # one same-class partner per anchor: the small validation split has 2 images of some class
    siamese = dict(steps=5, val_tuples=4, fraction_same=0.1, **SHARED)
    one, _ = train(Config.for_study("siamese", data=str(cifar_dir), **siamese), out=str(tmp_path / "one"),
                   progress=False)
    ranks(tmp_path, "siamese", "--out", "two", *flags(data=cifar_dir, **siamese))
    assert_same_weights(one.path, tmp_path / "two", 5)
    assert_same_train_means(one.path, tmp_path / "two")


def test_transfer_rewraps_ddp_when_the_backbone_unfreezes(tmp_path, cifar_dir):
    # A weights file, not "none": a random backbone's BatchNorm statistics are estimated on
    # images, and a process of fewer threads sums them in another order (1e-5 apart), which
    # training then spreads; here both runs start from the same statistics.
    weights = save_lite0_file(calibrated_lite0(), tmp_path / "lite0.pth")
    settings = dict(SHARED, steps=6, batch_size=8, eval_every=3, checkpoint_every=3, refine_after=3,
                    backbone="efficientnet-lite0", backbone_weights=str(weights))
    # One thread, as each rank has: on an AVX2 CPU a one-process run on 1 thread and on 2 already
    # differ as much as the test allows (fc1 reads Lite0's near-zero pooled features, where Adam
    # turns rounding into steps, and refining spreads them); the ranks match the 1-thread run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, _ = train(Config.for_study("transfer", data=str(cifar_dir), **settings), out=str(tmp_path / "one"),
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    ranks(tmp_path, "transfer", "--out", "two", *flags(data=cifar_dir, **settings))
    backbone = "stages.pool5.body._conv_stem.weight"
    before, after = (load_file(str(tmp_path / "two" / "checkpoints" / f"step-{s}.safetensors")) for s in (3, 6))
    assert not torch.equal(before[backbone], after[backbone])  # the backbone trained after K
    assert_same_weights(one.path, tmp_path / "two", 6, allowance=10_000)


def test_distributed_outside_torchrun_is_a_clear_error(tmp_path, monkeypatch, cifar_dir):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = Config(steps=2, distributed=True, data=str(cifar_dir), **SHARED)
    with pytest.raises(CifarlabError, match="--distributed needs the environment torchrun sets .* torchrun --nproc"):
        train(cfg, out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_processes_is_a_clear_error(tmp_path, monkeypatch, cifar_dir):
    env = dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = Config(steps=2, distributed=True, data=str(cifar_dir), **SHARED)
    with pytest.raises(CifarlabError, match="--batch-size 16 cannot be split evenly over 3 processes"):
        train(cfg, out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_each_rank_takes_its_contiguous_rows_of_every_input():
    anchor, second, same = torch.tensor([7]).expand(8), torch.arange(8), torch.arange(8.0) * 2  # a Siamese batch
    for rank in (0, 1):
        rows = list(range(4 * rank, 4 * rank + 4))
        part = Distributed(rank, 2, torch.device("cpu")).shard((anchor, second, same))
        assert [t.tolist() for t in part] == [[7] * 4, rows, [2.0 * i for i in rows]]


def test_a_non_finite_evaluation_loss_stops_every_rank_not_only_rank_0(tmp_path, cifar_dir):
    """Rank 0 alone evaluates; the others must stop with it rather than wait in their next
    collective (for up to the collective timeout under a launcher that does not kill them)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import cifarlab.studies as s\n"
        "real, calls = s.ClassifierTask.evaluate, []\n"
        "def evaluate(self):\n"
        "    calls.append(1)\n"
        "    return {k: (float('inf') if len(calls) > 1 else v[0], v[1]) for k, v in real(self).items()}\n"
        "s.ClassifierTask.evaluate = evaluate\n")
    work = tmp_path / "work"
    work.mkdir()
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    rank0, rank1 = ranks(work, "classifier", "--out", "run", *flags(steps=20, data=cifar_dir, **SHARED),
                         env={"PYTHONPATH": path}, failing=True)
    assert "test loss inf at step 10" in rank0
    assert "rank 0's evaluation loss at step 10" in rank1
