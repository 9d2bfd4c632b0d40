"""Do several training processes share one device well? Aggregate steps/s of N at once.

`cifarlab reproduce --jobs N` trains N runs in N processes. Whether that pays depends on the
device: a small model leaves most of a GPU idle, so N processes may together take nearly N
times the steps of one (or, with GPU time-slicing between processes, hardly more). This starts
N processes, each training the same preset's task (after warm-up and CUDA-graph capture, all
released together by a barrier), and times `--steps` steps in each:

    python benchmarks/concurrent_steps.py --data DIR [--preset classifier-b128] [--procs 1,2,4,8]
                                          [--mode processes|threads] [--steps 1000] [--device auto]
                                          [--set KEY=VALUE ...]

`--mode threads` trains the N tasks in one process instead, each thread on a CUDA stream of its
own (kernels of one process can run side by side; those of several processes take turns unless
MPS is running): the alternative to processes that `reproduce --jobs` could take.

Prints per process ms/step and the aggregate steps/s against one process; the last line names
the N with the most steps/s, for scripts. Start-up (imports, CUDA context, data) is not timed:
`reproduce_jobs.py` times whole studies.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def ready_runner(preset: str, overrides: dict, dataset, warmup: int):
    """A trainer's step runner for the preset, past its warm-up (and CUDA-graph capture);
    `profile_step.py` profiles the same runner."""
    import torch

    from cifarlab.engine import Trainer, make_autocast, resolve_device
    from cifarlab.presets import load_preset
    from cifarlab.runs import RunDir
    from cifarlab.studies import build_task

    cfg = load_preset(preset).config(**overrides)
    device = resolve_device(cfg.device)
    task = build_task(cfg, device, make_autocast(cfg.precision, device), data=dataset, progress=False)
    trainer = Trainer(cfg, task, RunDir("unused"), device, progress=False)
    trainer._sync_phase()  # as training starts: the transfer study's feature cache, when it pays
    runner = trainer.runner
    for step in range(warmup):
        runner.run(step)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    return runner, sync


def _worker(preset: str, overrides: dict, data: str | None, steps: int, warmup: int, threads: int | None,
            barrier, results) -> None:
    import torch

    from cifarlab.data import load_cifar10

    if threads:
        torch.set_num_threads(threads)
    try:
        runner, sync = ready_runner(preset, overrides, load_cifar10(data, progress=False), warmup)
    except BaseException:
        barrier.abort()  # the others must not wait for this one
        raise
    barrier.wait()
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        runner.run(step)
    sync()
    results.put((start, time.perf_counter()))


def measure_threads(n: int, args, overrides: dict, dataset) -> tuple[float, float]:
    """As `measure`, with n threads of this process, each on its own CUDA stream."""
    import threading

    import torch

    cuda = overrides["device"] != "cpu" and torch.cuda.is_available()
    streams = [torch.cuda.Stream() if cuda else None for _ in range(n)]
    runners = []
    for stream in streams:  # captured one after another: a capture must not overlap other work
        with torch.cuda.stream(stream) if cuda else _nothing():
            runners.append(ready_runner(args.preset, overrides, dataset, args.warmup))
    barrier, spans = threading.Barrier(n), [None] * n

    def work(i: int) -> None:
        runner, sync = runners[i]
        with torch.cuda.stream(streams[i]) if cuda else _nothing():
            barrier.wait()
            start = time.perf_counter()
            for step in range(args.warmup, args.warmup + args.steps):
                runner.run(step)
            streams[i].synchronize() if cuda else sync()
        spans[i] = (start, time.perf_counter())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(span is None for span in spans):
        raise SystemExit(f"a thread failed at {n} threads; see its traceback above")
    return _rates(spans, args.steps)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def _rates(spans: list[tuple[float, float]], steps: int) -> tuple[float, float]:
    per_step = sorted(1000 * (end - start) / steps for start, end in spans)[len(spans) // 2]
    span = max(end for _, end in spans) - min(start for start, _ in spans)
    return per_step, len(spans) * steps / span


def measure(procs: int, args, overrides: dict) -> tuple[float, float]:
    """(median ms/step of one process, aggregate steps/s over the span all of them ran)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    threads = max(1, (args.cpu_threads or mp.cpu_count()) // procs)
    workers = [ctx.Process(target=_worker, args=(args.preset, overrides, args.data, args.steps, args.warmup,
                                                  threads, barrier, results))
               for _ in range(procs)]
    for w in workers:
        w.start()
    spans = []
    for _ in range(procs):
        while True:
            try:
                spans.append(results.get(timeout=5))
                break
            except Exception:  # noqa: BLE001 - queue.Empty: check that no worker died
                if any(w.exitcode not in (None, 0) for w in workers):
                    for w in workers:
                        w.kill()
                    raise SystemExit(f"a worker failed at --procs {procs}; see its traceback above")
    for w in workers:
        w.join()
    return _rates(spans, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--preset", default="classifier-b128")
    parser.add_argument("--procs", default="1,2,4,8", help="comma-separated numbers of processes")
    parser.add_argument("--mode", choices=("processes", "threads"), default="processes")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="CPU threads shared out between the processes [default: all cores]")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for the preset")
    args = parser.parse_args()
    from cifarlab.config import parse_settings
    from cifarlab.data import load_cifar10

    dataset = load_cifar10(args.data, progress=False)  # build the decoded cache once, before any timing
    overrides = {"device": args.device, "tensorboard": False, **parse_settings(args.set)}
    unit = "process" if args.mode == "processes" else "thread"
    print(f"{args.preset}, {args.steps} timed steps per {unit}, device {args.device}")
    print(f"| {args.mode} | ms/step of each | aggregate steps/s | vs 1 |\n|---:|---:|---:|---:|")
    rows = []
    for procs in (int(p) for p in args.procs.split(",")):
        if args.mode == "threads":
            ms, rate = measure_threads(procs, args, overrides, dataset)
        else:
            ms, rate = measure(procs, args, overrides)
        rows.append((procs, rate))
        print(f"| {procs} | {ms:.2f} | {rate:.1f} | {rate / rows[0][1]:.2f}x |", flush=True)
    best = max(rows, key=lambda r: r[1])[0]
    print(f"most steps/s: --jobs {best}" if args.mode == "processes" else f"most steps/s: {best} threads")


if __name__ == "__main__":
    main()
