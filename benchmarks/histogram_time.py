"""Milliseconds per evaluation for the TensorBoard weight histograms a run writes at every
evaluation: SummaryWriter.add_histogram on each weight tensor (a copy to the host, NumPy's
binning) against cifarlab's engine.write_weight_histograms (binned where the weights live, one
transfer), for the ConvNet and EfficientNet-Lite0 (random weights: the same tensors).

    python benchmarks/histogram_time.py [--device cpu|cuda] [--repeats 5]

Prints a Markdown table (best of the repeats).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from cifarlab.backbones import build_backbone
from cifarlab.engine import write_weight_histograms
from cifarlab.models import convnet


def best_ms(write, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        write()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    models = {"ConvNet": convnet(init="xavier"),
              "EfficientNet-Lite0": build_backbone("efficientnet-lite0", "none", 32, progress=False)}
    print(f"device {device}, torch {torch.__version__}, best of {args.repeats}\n")
    print("| model | tensors | values | add_histogram ms | write_weight_histograms ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(folder)
        for label, model in models.items():
            params = list(model.to(device).named_parameters())

            def plain():
                for name, p in params:
                    writer.add_histogram(name, p.detach().float().cpu(), 0)
                writer.flush()

            def ours():
                write_weight_histograms(writer, params, 0)
                writer.flush()

            plain(), ours()  # warm-up
            print(f"| {label} | {len(params)} | {sum(p.numel() for _, p in params):,} | "
                  f"{best_ms(plain, args.repeats, device):.1f} | {best_ms(ours, args.repeats, device):.1f} |")
        writer.close()


if __name__ == "__main__":
    main()
