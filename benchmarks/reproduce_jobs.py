"""How many runs at once (`cifarlab reproduce --jobs N`) give the shortest total time?

Trains the same presets with each N into fresh folders and prints the wall time of each, e.g.

    python benchmarks/reproduce_jobs.py --data DIR --only study1 --steps-scale 0.05 --jobs 1,2,4 [--train-only]
                                        [--analysis after,during]

`--train-only` times the training alone (no analysis, no report); `--analysis` times each way of
placing the analysis (after the training, or beside it) at each N. The last line names the
fastest N, for scripts.

Each run at once is a process of its own (a CUDA context, or a share of the CPU cores) that
first imports torch and loads the data; whether overlap pays for that depends on the device and
the length of the runs (the README has the measurements: on one H100 and on 2 CPU cores it did
not).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from cifarlab.reproduce import reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--only", default="study1")
    parser.add_argument("--steps-scale", type=float, default=0.05)
    parser.add_argument("--max-evals", type=int, default=None)
    parser.add_argument("--jobs", default="1,2,4", help="comma-separated values of N to time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--train-only", action="store_true", help="time the training alone")
    parser.add_argument("--analysis", default="auto", help="comma-separated: auto, during, after (each timed)")
    args = parser.parse_args()
    from cifarlab.config import parse_settings
    from cifarlab.data import load_cifar10
    from cifarlab.reproduce import execute, parse_only, plan

    load_cifar10(args.data, progress=False)  # the decoded cache is built once, outside the timings

    overrides = {"tensorboard": False, **parse_settings(args.set)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="cifarlab-jobs-") as tmp:
        whens = ["train-only"] if args.train_only else args.analysis.split(",")
        for jobs, when in ((int(j), w) for j in args.jobs.split(",") for w in whens):
            out = Path(tmp) / f"jobs-{jobs}-{when}"
            start = time.perf_counter()
            if args.train_only:
                runs = plan(out, parse_only(args.only), args.steps_scale, args.max_evals, str(args.data or ""),
                            args.device, overrides=overrides)
                # data=None: every run loads the (cached) data itself, in or out of a worker alike
                records = execute(runs, jobs, progress=False, data=None, log=lambda *_: None)
                failed = [name for name, r in records.items() if r.get("status") == "failed"]
                if failed:
                    raise SystemExit(f"--jobs {jobs}: {failed[0]} failed: {records[failed[0]].get('note')}")
                train_s = seconds = time.perf_counter() - start
            else:
                state = reproduce(out, data=args.data, only=args.only, steps_scale=args.steps_scale, jobs=jobs,
                                  max_evals=args.max_evals, device=args.device, overrides=overrides,
                                  tsne_points=2000, progress=False, analysis=when, log=lambda *_: None)
                seconds = time.perf_counter() - start
                records, train_s, when = state["runs"], state["train_seconds"], state["analysis"]
            rows.append((jobs, when, len(records), train_s, seconds))
            print(f"--jobs {jobs}: {len(records)} runs trained in {train_s:.1f} s"
                  + ("" if args.train_only else f" ({seconds:.1f} s with analysis {when} and report)"), flush=True)
            shutil.rmtree(out)
    base = rows[0][3]
    if args.train_only:
        print("\n| --jobs | runs | training wall s | speed-up |\n|---:|---:|---:|---:|")
    else:
        print("\n| --jobs | analysis | runs | training wall s | speed-up | with analysis + report s |\n"
              "|---:|---|---:|---:|---:|---:|")
    for jobs, when, runs, train_s, total in rows:
        print(f"| {jobs} |" + ("" if args.train_only else f" {when} |") + f" {runs} | {train_s:.1f} | "
              f"{base / train_s:.2f}x |" + ("" if args.train_only else f" {total:.1f} |"))
    print(f"fastest: --jobs {min(rows, key=lambda r: r[3])[0]}")


if __name__ == "__main__":
    main()
