"""Train one run of any study: build its task, hand it to the engine, draw its curves."""

from __future__ import annotations

from pathlib import Path

from cifarlab import CifarlabError
from cifarlab.config import Config, identity_differences
from cifarlab.distributed import launch
from cifarlab.engine import Trainer, make_autocast
from cifarlab.runs import RunDir
from cifarlab.studies import build_task


def train(cfg: Config, out: str | None = None, resume: str | Path | None = None,
          overrides: dict | None = None, progress: bool = True, data=None) -> tuple[RunDir, dict | None]:
    """Start a run in `out` (a fresh name when None), or continue `resume` from its last.pt.

    On resume the run's own config.toml is used; `overrides` (e.g. more steps) are applied.
    `distributed` is how this launch runs, not part of the run: a resume runs in one process
    unless overrides ask for {"distributed": True}. Under torchrun every rank calls this; rank 0
    alone writes the run and gets the summary, the other ranks get None.
    """
    if resume is not None:
        run = RunDir.open(resume)
        cfg = run.config().replace(distributed=False)
    if overrides:
        cfg = cfg.replace(**overrides)
    if cfg.data:  # recorded so that eval, analysis and resume find it from any working directory
        cfg = cfg.replace(data=str(Path(cfg.data).expanduser().resolve()))
    if resume is not None:
        _check_resumable(run, cfg)
    with launch(cfg) as group:
        if resume is None:  # rank 0 names it (a time stamp) and checks it is free
            run = group.on_main(lambda: RunDir.create(out, cfg.study))
        progress = progress and group.is_main
        autocast = make_autocast(cfg.precision, group.device)
        with group.main_first():  # rank 0 downloads and caches data and weights for the others
            task = build_task(cfg, group.device, autocast, data=data, progress=progress)
        if group.is_main:
            run.write_config(cfg)
        trainer = Trainer(cfg, task, run, group.device, progress=progress, group=group)
        if resume is not None:
            trainer.resume()
        summary = trainer.fit()
        if group.is_main:
            from cifarlab.plots import plot_curves  # matplotlib: only where something is drawn

            plot_curves([(run.name, run.metrics)], run.path / "plots" / "curves.png", title=run.name)
    return run, summary


def _check_resumable(run: RunDir, cfg: Config) -> None:
    """A resume trains on to cfg.steps: refuse fewer steps than the run has reached, and settings
    changed on a run that has nothing left to train (its records would describe training that
    never happened)."""
    reached = run.saved_step()
    if reached is None:
        return  # load_training_state says what is wrong with last.pt
    if cfg.steps < reached:
        raise CifarlabError(f"{run.path} has reached step {reached}; resuming it needs --steps of at least "
                            f"{reached} (got {cfg.steps})")
    if cfg.steps == reached:
        changed = identity_differences(run.config(), cfg)
        if changed:
            raise CifarlabError(f"{run.path} has reached its {reached} steps, so nothing would train with the "
                                f"changed {', '.join(changed)}; give --steps above {reached} to train on")
