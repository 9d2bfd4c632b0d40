"""Train one run of any study: build its task, hand it to the engine, draw its curves."""

from __future__ import annotations

import os
from pathlib import Path

from cifarlab import CifarlabError
from cifarlab.config import NOT_COMPARED, Config, identity_differences
from cifarlab.data import resolve_data_dir
from cifarlab.distributed import launch
from cifarlab.engine import Trainer, TrainingInterrupted, make_autocast
from cifarlab.fileio import write_bytes
from cifarlab.runs import RunDir
from cifarlab.studies import build_task

# What a resume may change, as its flags: how long, where and how the run runs, never what it trains
RESUME_MAY_CHANGE = ", ".join(["--steps", "--data (the same images)", *sorted(
    f"--{key.replace('_', '-')}" for key in NOT_COMPARED - {"data"})])


def train(cfg: Config, out: str | None = None, resume: str | Path | None = None,
          overrides: dict | None = None, progress: bool = True, data=None,
          name: str | None = None) -> tuple[RunDir, dict | None]:
    """Start a run in `out` (when None, a fresh runs/<name or study>-<time stamp>), or continue
    `resume` from its last.pt.

    On resume the run's own config.toml is used; `overrides` (e.g. more steps) are applied.
    `distributed` is how this launch runs, not part of the run: a resume runs in one process
    unless overrides ask for {"distributed": True}. Under torchrun every rank calls this; rank 0
    alone writes the run and gets the summary, the other ranks get None.
    """
    if resume is not None:
        run = RunDir.open(resume)
        saved = run.config()
        cfg = saved.replace(distributed=False)
    if overrides:
        cfg = cfg.replace(**overrides)
    cfg = recorded_paths(cfg)
    restart = False  # a run that saved nothing yet (stopped before its first checkpoint) starts anew
    if resume is not None:
        restart = _check_resumable(run, saved, cfg)
        if not restart and run.saved_step() == cfg.steps and (summary := run.summary(cfg.steps)):
            # nothing to train, nothing to rewrite (under torchrun rank 0 alone reports, as fit does)
            return run, None if cfg.distributed and os.environ.get("RANK", "0") != "0" else summary

    def train_in(group, run: RunDir | None) -> tuple[RunDir, dict | None]:
        """The run (None: a new one) in this launch. A function so that its trainer, task and DDP
        wrappers are freed when it returns, before the launch tears the process group down (see launch)."""
        if resume is None:  # rank 0 names it (a time stamp) and checks it is free
            run = group.on_main(lambda: RunDir.create(out, name or cfg.study))
        show = progress and group.is_main
        autocast = make_autocast(cfg.precision, group.device)
        with group.main_first():  # rank 0 downloads and caches data and weights for the others
            # a resume loads every weight from last.pt: a transfer backbone's file is not needed
            task = build_task(cfg, group.device, autocast, data=data, progress=show,
                              for_checkpoint=resume is not None and not restart)
        trainer = Trainer(cfg, task, run, group.device, progress=show, group=group)
        try:
            if resume is not None and group.is_main:
                run.hold_lock()  # before anything of the run is read or written
            if resume is not None and not restart:
                trainer.resume()  # before config.toml is rewritten: a failed resume changes nothing
            elif restart:
                trainer.discard_after(0, 0)  # rows logged before the crash that left no checkpoint
            before = (run.path / "config.toml").read_bytes() if resume is not None and group.is_main else None
            if group.is_main:
                run.write_config(cfg, resumed=resume is not None and not restart)
                run.hold_lock()  # a new run: now that its folder is there (a no-op for one locked)
            start = trainer.step
            try:
                summary = trainer.fit()
            except BaseException:
                if before is not None and trainer.step == start:  # nothing trained: the run is as it was
                    write_bytes(run.path / "config.toml", before)
                raise
            if group.is_main:
                from cifarlab.plots import plot_curves  # matplotlib: only where something is drawn

                plot_curves([(run.name, run.metrics)], run.path / "plots" / "curves.png", title=run.name)
        finally:
            run.release_lock()
        if trainer.interrupted_in_last_step:
            raise TrainingInterrupted(f"interrupted in the last step; {run.path} finished all {cfg.steps} steps "
                                      "and saved everything first")
        return run, summary

    with launch(cfg) as group:
        return train_in(group, run if resume is not None else None)


def recorded_paths(cfg: Config) -> Config:
    """The data and weights paths as absolute paths, so that eval, analysis and resume find them
    from any working directory; data given by $CIFARLAB_DATA is recorded too."""
    if cfg.data or os.environ.get("CIFARLAB_DATA"):  # the default cache folder is left as "": the default
        cfg = cfg.replace(data=str(resolve_data_dir(cfg.data or None).resolve()))
    if cfg.study == "transfer" and cfg.backbone_weights not in ("imagenet", "none"):
        cfg = cfg.replace(backbone_weights=str(Path(cfg.backbone_weights).expanduser().resolve()))
    return cfg


def _check_resumable(run: RunDir, saved: Config, cfg: Config) -> bool:
    """A resume trains on to cfg.steps with the run's own settings: refuse fewer steps than the run
    has reached, and settings that would make its records describe training that never happened
    (only how long, where and how it runs may change). True when the run saved nothing yet (Ctrl-C
    or a failure before its first checkpoint): then it trains from the start, as cfg says."""
    reached = run.saved_step()
    if reached is None and not (run.checkpoints / "last.pt").exists() and not run.weight_steps():
        return True  # (its metrics rows, if it logged before dying, are dropped)
    if reached is None:
        return False  # load_training_state says what is wrong with last.pt
    if cfg.steps < reached:
        raise CifarlabError(f"{run.path} has reached step {reached}; resuming it needs --steps of at least "
                            f"{reached} (got {cfg.steps})")
    changed = identity_differences(recorded_paths(saved), cfg)  # a weights path as recorded now
    refused = [key for key in changed if key not in NOT_COMPARED]
    if refused:
        what = ", ".join(f"{key} {getattr(saved, key)!r} (asked: {getattr(cfg, key)!r})" for key in refused)
        raise CifarlabError(f"{run.path} was trained with {what}; a resume keeps a run's settings (only "
                            f"{RESUME_MAY_CHANGE} may change): train a new run for other settings")
    if cfg.steps == reached and changed:
        raise CifarlabError(f"{run.path} has reached its {reached} steps, so nothing would train with the "
                            f"changed {', '.join(changed)}; give --steps above {reached} to train on")
    return False
