"""Train one run of any study: build its task, hand it to the engine, draw its curves."""

from __future__ import annotations

from pathlib import Path

from cifarlab.config import Config
from cifarlab.engine import Trainer, make_autocast, resolve_device
from cifarlab.plots import plot_curves
from cifarlab.runs import RunDir
from cifarlab.studies import build_task


def train(cfg: Config, out: str | None = None, resume: str | Path | None = None,
          overrides: dict | None = None, progress: bool = True, data=None) -> tuple[RunDir, dict]:
    """Start a run in `out` (a fresh name when None), or continue `resume` from its last.pt.

    On resume the run's own config.toml is used; `overrides` (e.g. more steps) are applied.
    """
    if resume is not None:
        run = RunDir.open(resume)
        cfg = run.config()
    else:
        run = RunDir.create(out, cfg.study)
    if overrides:
        cfg = cfg.replace(**overrides)
    device = resolve_device(cfg.device)
    autocast = make_autocast(cfg.precision, device)
    task = build_task(cfg, device, autocast, data=data, progress=progress)
    run.write_config(cfg)
    trainer = Trainer(cfg, task, run, device, progress=progress)
    if resume is not None:
        trainer.resume()
    summary = trainer.fit()
    plot_curves([(run.name, run.metrics)], run.path / "plots" / "curves.png", title=run.name)
    return run, summary
