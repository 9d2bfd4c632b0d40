"""ms per training step: cifarlab's engine against a plain PyTorch loop, side by side.

The plain loop is what a straightforward re-implementation of the seed looks like: the
textbook model (conv -> ReLU -> nn.MaxPool2d(3, 2, padding=1)), NCHW fp32, a TensorDataset
+ shuffling DataLoader, and each batch copied to the device every step. cifarlab is timed
through its own engine (`Trainer.runner`), exactly as `cifarlab train classifier` steps.

    python benchmarks/step_time.py --data DIR [--batch-sizes 64,128] [--steps 40] [--device cpu]
                                  [--variants channels_last,contiguous,no-graph,bf16,malloc-default,compile,compile-bf16]

Each configuration is timed in `--rounds` alternating rounds (to share out the machine's
noise fairly) and the median ms/step is reported. Every timing runs in a fresh process:
cifarlab's process-wide choices (cuDNN autotuning and TF32 on a GPU, keeping freed memory on a
CPU) must not reach the plain loop, nor one timing the next.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifarlab.config import Config
from cifarlab.data import load_cifar10, mean_image
from cifarlab.engine import Trainer, make_autocast, resolve_device
from cifarlab.runs import RunDir
from cifarlab.studies import build_task


# What each timed cifarlab configuration changes; the CUDA graph is on unless said (GPU only).
VARIANTS = {
    "channels_last": {"memory_format": "channels_last"},
    "contiguous": {"memory_format": "contiguous"},
    "no-graph": {"memory_format": "channels_last", "cuda_graph": False},
    "bf16": {"memory_format": "channels_last", "precision": "bf16"},
    # glibc's default allocator behaviour: freed activation memory goes back to the OS
    "malloc-default": {"memory_format": "channels_last", "keep_freed_memory": False},
    # torch.compile'd loss (inductor), inside the CUDA graph on a GPU; warm-up steps take the compile
    "compile": {"memory_format": "channels_last", "compile": True},
    "compile-bf16": {"memory_format": "channels_last", "compile": True, "precision": "bf16"},
}
PLAIN = "plain loop (DataLoader)"


def plain_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(), nn.Linear(4096, 384), nn.ReLU(), nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, 10),
    )
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.001)
            nn.init.zeros_(m.bias)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_plain(data, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    x = torch.from_numpy(data.train_images).float() - torch.from_numpy(mean_image(data.train_images))
    loader = DataLoader(TensorDataset(x.permute(0, 3, 1, 2).contiguous(), torch.from_numpy(data.train_labels)),
                        batch_size=batch_size, shuffle=True, drop_last=True)
    model = plain_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        xb, yb = next(batches)
        xb, yb = xb.to(device), yb.to(device)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def time_cifarlab(data, batch_size: int, steps: int, warmup: int, device_name: str, **cfg) -> float:
    if not cfg.pop("keep_freed_memory", True):
        os.environ["CIFARLAB_KEEP_FREED_MEMORY"] = "0"
    device = resolve_device(device_name)  # cifarlab's device choices (cuDNN, allocator) for this process
    config = Config(batch_size=batch_size, device=str(device), tensorboard=False, **cfg)
    autocast = make_autocast(config.precision, device)
    task = build_task(config, device, autocast, data=data, progress=False)
    trainer = Trainer(config, task, RunDir("unused"), device, progress=False)
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        trainer.runner.run(step)
    sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def timed(loop: str, data_dir, batch_size: int, steps: int, warmup: int, device: str) -> float:
    """ms/step of one loop (PLAIN or a VARIANTS name), run in a fresh process by `main`."""
    data = load_cifar10(data_dir, progress=False)
    if loop == PLAIN:
        return time_plain(data, batch_size, steps, warmup, torch.device(device))
    return time_cifarlab(data, batch_size, steps, warmup, device, **VARIANTS[loop])


def in_fresh_process(*args) -> float:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(timed, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--batch-sizes", default="64,128")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default=None,
                        help=f"cifarlab variants to time, from {', '.join(VARIANTS)} "
                             "[default: channels_last,contiguous on CPU; channels_last,no-graph,bf16 on CUDA]")
    args = parser.parse_args()
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    variants = (args.variants or ("channels_last,no-graph,bf16" if cuda else "channels_last,contiguous")).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    load_cifar10(args.data, progress=False)  # build the decoded cache once, before any timing
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps x {args.rounds} rounds, each in a fresh process")
    print(f"{'batch':>5}  {'loop':<28} {'ms/step':>9}  {'speed-up':>8}")
    for batch_size in map(int, args.batch_sizes.split(",")):
        loops = [PLAIN, *variants]
        times = {loop: [] for loop in loops}
        for round_ in range(args.rounds):
            for loop in loops:
                times[loop].append(in_fresh_process(loop, args.data, batch_size, args.steps, args.warmup, device))
                if round_ == args.rounds - 1:  # each loop's line as soon as it is measured: a time limit keeps those
                    ms, base = statistics.median(times[loop]), statistics.median(times[PLAIN])
                    name = loop if loop == PLAIN else f"cifarlab ({loop})"
                    print(f"{batch_size:>5}  {name:<28} {ms:>9.1f}  {base / ms:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
