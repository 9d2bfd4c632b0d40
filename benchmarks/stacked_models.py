"""Would training several ConvNets as one batched model pay? ms per member-step of K stacked.

`reproduce --jobs N` runs N runs as N processes; on one GPU those take turns
(`concurrent_steps.py`). The other way to fill a device with small models is to train K of them
as one model: the K members' convolutions as one grouped convolution (groups=K), their fc layers
as one batched matmul, one Adam over the stacked weights (elementwise, so each member's update is
its own). The study's nine ConvNet runs differ only in L2 weight, dropout and batch size, so
same-batch-size runs could share such a step. This times that step, built on the engine's own
`StepRunner` (the CUDA graph on a GPU), for K = 1 (the ordinary ConvNet: groups=1 is a plain
convolution) and more, each member on its own shuffle of the real training images:

    python benchmarks/stacked_models.py --data DIR [--members 1,2,4,8] [--batch-size 128]
                                        [--steps 200] [--device auto] [--precision fp32|bf16]

The first row is cifarlab's own step of one run (`cifarlab train classifier --batch-size B`,
through `concurrent_steps.ready_runner`), the reference every stacked row is measured against:
ms/step, ms per member-step, member-steps/s against it; the last line names the K with the most
member-steps/s (1 when stacking never beats one run). Nothing in cifarlab trains this way: it is the measurement that
decides whether it should (the README has the numbers).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.config import Config
from cifarlab.data import load_cifar10
from cifarlab.engine import StepRunner, make_adam, make_autocast, resolve_device
from cifarlab.studies import EpochShuffler, device_splits, pick_memory_format
from concurrent_steps import ready_runner


class StackedConvNet(nn.Module):
    """K copies of the report's ConvNet with weights of their own, run as one network: input
    [B, 3K, H, W] (member k's images in channels 3k..3k+2), logits [K, B, classes]."""

    def __init__(self, members: int, classes: int = 10):
        super().__init__()
        self.k = members

        def weight(*shape):
            return nn.Parameter(torch.randn(*shape) * 0.001)  # the seed's init

        def bias(*shape):
            return nn.Parameter(torch.zeros(*shape))

        self.conv1_w, self.conv1_b = weight(members * 64, 3, 5, 5), bias(members * 64)
        self.conv2_w, self.conv2_b = weight(members * 64, 64, 5, 5), bias(members * 64)
        self.fc_w = nn.ParameterList([weight(members, 4096, 384), weight(members, 384, 192),
                                      weight(members, 192, classes)])
        self.fc_b = nn.ParameterList([bias(members, 1, 384), bias(members, 1, 192), bias(members, 1, classes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.conv1_w, self.conv1_b, padding=2, groups=self.k)
        h = F.max_pool2d(h, 3, 2, ceil_mode=True).relu_()
        h = F.conv2d(h, self.conv2_w, self.conv2_b, padding=2, groups=self.k)
        h = F.max_pool2d(h, 3, 2, ceil_mode=True).relu_()
        h = h.reshape(h.shape[0], self.k, 4096).transpose(0, 1)  # K, B, 4096: each member's flatten
        for i, (w, b) in enumerate(zip(self.fc_w, self.fc_b)):
            h = torch.baddbmm(b, h, w)
            if i < 2:
                h = h.relu()
        return h


class StackedTask:
    """The engine's Task for K stacked classifiers: cross-entropy summed over the members (so each
    member's gradient is that of its own mean loss) plus each member's L2 term on fc1/fc2."""

    def __init__(self, members: int, cfg: Config, data, device: torch.device):
        fmt = pick_memory_format(device, cfg.memory_format)
        self.images = device_splits(cfg, data, device, fmt)["train"]
        self.model = StackedConvNet(members, len(data.classes)).to(device, memory_format=fmt)
        self.shuffles = [EpochShuffler(len(self.images), cfg.batch_size, seed, device) for seed in range(members)]
        self.weight_decay = cfg.weight_decay

    def train_inputs(self, step: int) -> tuple[torch.Tensor, ...]:
        return (torch.stack([shuffle(step) for shuffle in self.shuffles], 1),)  # B, K

    def train_loss(self, index: torch.Tensor):
        b, k = index.shape
        x = self.images.x[index.flatten()]  # B*K, H, W, C (or B*K, C, H, W)
        if self.images.channels_last:  # B, H, W, K*C, seen as B, K*C, H, W in channels_last
            x = x.view(b, k, *x.shape[1:]).permute(0, 2, 3, 1, 4).reshape(b, *x.shape[1:3], -1).permute(0, 3, 1, 2)
        else:
            x = x.view(b, k * x.shape[1], *x.shape[2:])
        y = self.images.y[index.T.flatten()]  # K*B, member-major as the logits
        logits = self.model(x).reshape(k * b, -1)
        loss = F.cross_entropy(logits.float(), y, reduction="sum") / b
        if self.weight_decay:
            loss = loss + self.weight_decay * sum(w.square().sum() for w in self.model.fc_w[:2]) / 2
        return loss, (logits.argmax(1) == y).sum(), k * b


def stacked_runner(members: int, cfg: Config, data, device: torch.device, warmup: int = 5):
    """The engine's StepRunner on K stacked members, past warm-up (and the CUDA graph's capture)."""
    task = StackedTask(members, cfg, data, device)
    optimizer = make_adam(list(task.model.parameters()), cfg.lr, device, capturable=device.type == "cuda")
    runner = StepRunner(task, optimizer, make_autocast(cfg.precision, device), use_graph=device.type == "cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for step in range(warmup):
        runner.run(step)
    sync()
    return runner, sync


def time_steps(runner, sync, steps: int, warmup: int = 5) -> float:
    """ms per step over `steps` steps after the runner's warm-up ones."""
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        runner.run(step)
    sync()
    loss, _ = runner.take_means()
    if loss != loss:
        raise SystemExit("a timed step gave a NaN loss")
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--members", default="1,2,4,8", help="comma-separated numbers of stacked models")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = Config(batch_size=args.batch_size, precision=args.precision, memory_format=args.memory_format,
                 weight_decay=0.005)
    data = load_cifar10(args.data, progress=False)
    print(f"stacked ConvNets, batch {args.batch_size} each, {args.steps} timed steps, {device.type}, "
          f"{args.precision}, {torch.__version__}")
    print("| model | ms/step | ms per member-step | member-steps/s vs one run |\n| --- | ---: | ---: | ---: |")
    overrides = {"device": args.device, "batch_size": args.batch_size, "precision": args.precision,
                 "memory_format": args.memory_format, "weight_decay": cfg.weight_decay, "tensorboard": False}
    reference = time_steps(*ready_runner("classifier-b128", overrides, data, 5), args.steps)
    print(f"| cifarlab, one run | {reference:.2f} | {reference:.2f} | 1.00x |", flush=True)
    rates = {1: 1 / reference}
    for members in (int(m) for m in args.members.split(",")):
        ms = time_steps(*stacked_runner(members, cfg, data, device), args.steps)
        rates[members] = max(rates.get(members, 0), members / ms)
        print(f"| {members} stacked | {ms:.2f} | {ms / members:.2f} | {members / ms * reference:.2f}x |", flush=True)
    print(f"most member-steps/s: {max(rates, key=rates.get)} members")


if __name__ == "__main__":
    main()
