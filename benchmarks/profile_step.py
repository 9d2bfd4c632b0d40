"""Where a training step spends its time: torch.profiler over a preset's real step, CPU or GPU.

    python benchmarks/profile_step.py --data DIR [--preset classifier-b128] [--device auto]
                                      [--steps 20] [--threads N] [--rows 15] [--set KEY=VALUE ...]

The step is the one `cifarlab train` runs (same task, model, memory format and optimizer), built
by `concurrent_steps.ready_runner`. On a GPU it runs eagerly (`cuda_graph=false`) so that each
kernel is seen; a graph replays the same kernels without the launch gaps, so the kernel table
says what a captured step costs, and `ms/step` below (eager) against `step_time.py` (captured)
says what launching costs. Operators (CPU) or kernels (GPU) are sorted by their own time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

from concurrent_steps import ready_runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--preset", default="classifier-b128")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads [default: torch's choice]")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for the preset")
    args = ap.parse_args()
    from cifarlab.config import parse_settings
    from cifarlab.data import load_cifar10

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"device": args.device, "tensorboard": False, "cuda_graph": False, **parse_settings(args.set)}
    runner, sync = ready_runner(args.preset, overrides, load_cifar10(args.data, progress=False), warmup=5)
    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for step in range(5, 5 + args.steps):
            runner.run(step)
        sync()
    ms = 1000 * (time.perf_counter() - start) / args.steps
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    if cuda:
        # Only the device's own events: a CPU operator's self device time is that of the kernels
        # it launched, which appear as events of their own too; user annotations (the optimizer's
        # step, say) span kernels rather than being any.
        raw = prof.events()
        annotations = {e.name for e in raw if getattr(e, "is_user_annotation", False)}
        device = [e for e in raw if e.device_type == DeviceType.CUDA and e.name not in annotations]
        busy = sum(e.self_device_time_total for e in device) / args.steps / 1000
        # kernels a step launches (copies and memsets left out): what a CUDA graph replays one after another
        kernels = sum(not e.name.startswith(("Memcpy", "Memset")) for e in device) / args.steps
        table = EventList([e for e in events if e.device_type == DeviceType.CUDA and e.key not in annotations])
        where, launches = "GPU kernels", f", {kernels:.0f} kernels a step"
    else:
        busy = sum(e.self_cpu_time_total for e in events) / args.steps / 1000
        table, where, launches = events, "CPU operators", ""
    print(f"{args.preset} on {'cuda' if cuda else 'cpu'}, {args.steps} eager steps under the profiler: "
          f"{ms:.2f} ms/step, {busy:.2f} ms/step of {where}{launches}")
    print(table.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
