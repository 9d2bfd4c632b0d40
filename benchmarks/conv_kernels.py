"""How fast the ConvNet's two 5x5 convolutions run on this machine, and two ways around them.

They take about 80% of a CPU training step, so the step can only get much faster if they do:

    python benchmarks/conv_kernels.py [--batch-size 128] [--threads 2]

Prints, for conv1 (3->64 on 32x32) and conv2 (64->64 on 16x16): forward GFLOP/s and the
forward + backward ms of oneDNN's kernels in NCHW and channels_last, of an FFT convolution
(rfft2, a batched complex matmul over the frequencies, irfft2), and for conv1 of a
space-to-depth rewrite (2x2 blocks: a 3x3 convolution 12 -> 256 channels, then depth-to-space),
each checked against the direct result. The backward is what training needs: weights always,
input too for conv2.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def fft_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """SAME cross-correlation of x (B, C, H, W) with odd square kernels w (O, C, k, k), via FFT."""
    b, c, h, _ = x.shape
    o, _, k, _ = w.shape
    n = h + k - 1
    xf = torch.fft.rfft2(x, s=(n, n))
    wf = torch.fft.rfft2(w.flip(-1, -2), s=(n, n))
    f = xf.shape[-2] * xf.shape[-1]
    yf = torch.bmm(xf.reshape(b, c, f).permute(2, 0, 1), wf.reshape(o, c, f).permute(2, 1, 0))
    y = torch.fft.irfft2(yf.permute(1, 2, 0).reshape(b, o, n, n // 2 + 1), s=(n, n))
    return y[..., k // 2:k // 2 + h, k // 2:k // 2 + h]


def s2d_weight(w: torch.Tensor) -> torch.Tensor:
    """The 5x5 stride-1 kernel (64, 3, 5, 5) as a 3x3 kernel over 2x2-blocked input (256, 12, 3, 3)."""
    out = w.new_zeros(2, 2, w.shape[0], 2, 2, w.shape[1], 3, 3)  # a, b, o, q, r, c, p, s
    for a in range(2):
        for b in range(2):
            for u in range(5):
                for v in range(5):
                    p, q = divmod(a + u - 2, 2)
                    s, r = divmod(b + v - 2, 2)
                    out[a, b, :, q, r, :, p + 1, s + 1] = w[:, :, u, v]
    return out.reshape(4 * w.shape[0], 4 * w.shape[1], 3, 3)


def s2d_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b, c, h, _ = x.shape
    blocks = x.reshape(b, c, h // 2, 2, h // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h // 2, h // 2)
    y = F.conv2d(blocks.contiguous(memory_format=torch.channels_last),
                 s2d_weight(w).contiguous(memory_format=torch.channels_last), padding=1)
    o = w.shape[0]
    return y.reshape(b, 2, 2, o, h // 2, h // 2).permute(0, 3, 4, 1, 5, 2).reshape(b, o, h, h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print("| conv | way | forward ms | forward GFLOP/s | forward + backward ms | max error |\n"
          "| --- | --- | ---: | ---: | ---: | ---: |")
    for name, channels, size in (("conv1", 3, 32), ("conv2", 64, 16)):
        x = torch.randn(args.batch_size, channels, size, size)
        w = torch.randn(64, channels, 5, 5) * 0.05
        grad = torch.randn(args.batch_size, 64, size, size)
        flops = 2 * args.batch_size * size * size * 64 * channels * 25
        reference = F.conv2d(x, w, padding=2)
        cl = torch.channels_last
        ways = {
            "oneDNN, NCHW": (x, w, grad, lambda a, b: F.conv2d(a, b, padding=2)),
            "oneDNN, channels_last": (x.contiguous(memory_format=cl), w.contiguous(memory_format=cl),
                                      grad.contiguous(memory_format=cl), lambda a, b: F.conv2d(a, b, padding=2)),
            "FFT": (x, w, grad, fft_conv),
        }
        if name == "conv1":
            ways["space-to-depth"] = (x, w, grad, s2d_conv)
        for way, (xi, wi, gi, conv) in ways.items():
            xi = xi.clone().requires_grad_(name == "conv2")
            wi = wi.clone().requires_grad_()
            with torch.no_grad():
                error = (conv(xi, wi) - reference).abs().max().item()
                forward = timed(lambda: conv(xi, wi))
            both = timed(lambda: conv(xi, wi).backward(gi))
            print(f"| {name} | {way} | {forward:.1f} | {flops / forward / 1e6:.1f} | {both:.1f} | {error:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
