"""`cifarlab reproduce`: every run of the report (its presets), the analysis its tables need,
then the report.

Each preset trains into DIR/<preset>/. A finished run is skipped and an interrupted one resumed
from its last.pt, so a second call costs nothing; what happened to each run is kept in
DIR/reproduce.json, which `cifarlab report` reads beside the runs themselves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from cifarlab import CifarlabError, __version__, counted, interrupts
from cifarlab.config import WHERE_AND_HOW, Config, identity_differences, images_per_step, load_config
from cifarlab.fileio import read_json, write_json
from cifarlab.presets import REFERENCE_RUN, Preset, all_presets

# The report's three studies, by the name --only takes.
GROUPS = {"study1": "classifier", "study2": "siamese", "study3": "transfer"}
STATE_FILE = "reproduce.json"


@dataclass
class PlannedRun:
    preset: Preset
    config: Config
    path: Path

    @property
    def name(self) -> str:
        return self.preset.name


def parse_only(only: str | None) -> list[str]:
    if only is None:
        return list(GROUPS)
    chosen = [part.strip() for part in only.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in GROUPS]
    if unknown or not chosen:
        raise CifarlabError(f"--only takes a comma-separated subset of {', '.join(GROUPS)} (got {only!r})")
    return [g for g in GROUPS if g in chosen]


def scaled_config(preset: Preset, scale: float, max_evals: int | None = None, **changes) -> Config:
    """The preset's config with its step counts (steps, eval and checkpoint intervals, the refine
    step K) multiplied by `scale`; `max_evals` caps how many evaluations a run makes.

    A step count that `changes` sets (--set steps=N) is taken as given; when it is `steps`, the
    other counts follow it in the preset's proportions (K of transfer-refine-1000 stays at a tenth
    of the run), whatever `scale` says."""
    cfg = preset.config(**changes)
    factor = cfg.steps / preset.config().steps if "steps" in changes else scale
    if factor == 1 and not max_evals:
        return cfg

    def scaled(key: str) -> int:
        n = getattr(cfg, key)
        return n if key in changes or (key == "refine_after" and n <= 0) else max(1, round(n * factor))

    steps = scaled("steps")
    eval_every = scaled("eval_every")
    if max_evals and "eval_every" not in changes:
        eval_every = max(eval_every, math.ceil(steps / max_evals))
    return cfg.replace(steps=steps, eval_every=min(eval_every, steps),
                       checkpoint_every=min(scaled("checkpoint_every"), steps), refine_after=scaled("refine_after"))


def plan(out: Path, only: list[str], scale: float, max_evals: int | None = None, data: str = "",
         device: str = "auto", transfer_backbone: str | None = None,
         backbone_weights: str | None = None, overrides: dict | None = None) -> list[PlannedRun]:
    if not (0 < scale <= 100) or not math.isfinite(scale):
        raise CifarlabError(f"--steps-scale must be in (0, 100] (got {scale})")
    studies = {GROUPS[g] for g in only}
    runs = []
    for preset in all_presets():
        if preset.study not in studies:
            continue
        changes = {"data": data, "device": device, **(overrides or {})}
        if preset.study == "transfer":
            if transfer_backbone:
                changes["backbone"] = transfer_backbone
            if backbone_weights:
                changes["backbone_weights"] = backbone_weights
        runs.append(PlannedRun(preset, scaled_config(preset, scale, max_evals, **changes), out / preset.name))
    return runs


def weights_problem(cfg: Config, progress: bool = True) -> str | None:
    """Why the backbone weights of a transfer run cannot be had (None when they can)."""
    if cfg.study != "transfer":
        return None
    from cifarlab.backbones import lite0_weights_path, vgg16_weights_path

    try:
        if cfg.backbone == "vgg16":
            vgg16_weights_path(cfg.backbone_weights, download=True, progress=progress)
        else:
            lite0_weights_path(cfg.backbone_weights)
    except CifarlabError as err:
        return str(err)
    return None


def run_state(run: PlannedRun) -> str:
    """'new', 'finished', 'resume' or 'restart' (it began but left nothing to resume from)."""
    from cifarlab.analysis import data_key
    from cifarlab.runs import current_summary
    from cifarlab.train import recorded_paths

    path = run.path
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "new"
    if not (path / "config.toml").is_file():
        raise CifarlabError(f"{path}: exists but is not a cifarlab run; move it away or choose another --out")
    have, planned = recorded_paths(load_config(path / "config.toml")), recorded_paths(run.config)
    differ = identity_differences(have, planned)
    if have.steps > planned.steps:
        differ.insert(0, "steps")
    shown = {key: (getattr(have, key), getattr(planned, key)) for key in differ}
    trained_on, now_on = data_key(have, None), data_key(planned, None)
    if trained_on != now_on:  # other images (or the same moved): its numbers may not be this data's
        differ.append("data")
        shown["data"] = (trained_on, now_on)
    if differ:
        what = ", ".join(f"{k} {shown[k][0]!r} (now {shown[k][1]!r})" for k in differ)
        raise CifarlabError(f"{path} was trained with other settings: {what}; use another --out, "
                            f"or move that run away to train it anew")
    if have.steps == run.config.steps and current_summary(read_json(path / "summary.json"), have.steps):
        return "finished"
    if (path / "checkpoints" / "last.pt").is_file():
        return "resume"
    return "restart"


def _refuse_if_being_trained(path: Path) -> None:
    """A run another process trains now looks abandoned before its first checkpoint: never
    move it aside or train it beside that process."""
    from cifarlab.runs import being_trained

    if being_trained(path):
        raise CifarlabError(f"{path}: another process is training this run right now (a second reproduce into "
                            f"{path.parent}?); let it finish, or stop it, then run this again")


def _move_aside(path: Path) -> Path:
    from cifarlab.runs import stamped_path

    _refuse_if_being_trained(path)  # reproduce checked before any work too: this covers one started since
    target = stamped_path(path.parent, f"{path.name}.incomplete")
    path.rename(target)
    return target


def _record(run: PlannedRun, status: str, note: str) -> dict:
    """What reproduce.json keeps of a run: what became of it, why, and the steps it was planned
    for (the report tells a shorter run's result from the planned one's by them)."""
    return {"status": status, "note": note, "steps": run.config.steps}


def _one_line(err: BaseException) -> str:
    """A run's failure for the report: a CifarlabError's own line, else the exception and where."""
    if isinstance(err, CifarlabError):
        return str(err)
    where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    at = f" (at {Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    return f"{type(err).__name__}: {err}{at}"


def train_one(config: dict, path: str, resume: bool, threads: int | None = None, progress: bool = False,
              data=None) -> dict:
    """Train (or resume) one run; the unit of work of a worker process, so it takes plain values.
    A resumed run keeps its settings but runs where and how this call says (data, device...)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from cifarlab.train import train

    cfg = Config.from_dict(config)
    if resume:
        overrides = {"steps": cfg.steps, **{key: getattr(cfg, key) for key in WHERE_AND_HOW}}
        _, summary = train(cfg, resume=path, overrides=overrides, progress=progress, data=data)
    else:
        _, summary = train(cfg, out=path, progress=progress, data=data)
    return summary


def when_the_parent_dies(parent: int, then) -> None:
    """Call `then()` (from a thread) once this process's parent, pid `parent`, has died: a process
    killed outright (SIGKILL, the out-of-memory killer) cannot stop the processes it started."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        then()

    threading.Thread(target=watch, name="cifarlab-parent-watch", daemon=True).start()


def _worker(conn, config: dict, path: str, resume: bool, threads: int | None) -> None:
    """One run in a process of its own (spawned); sends (status, note) back and never raises.

    Ctrl-C reaches this process too: while the run trains the engine catches it, saves and stops;
    before that (loading data, building a feature cache) it arrives as KeyboardInterrupt. SIGTERM,
    which the main process passes on, and the main process's death do what Ctrl-C does."""
    import multiprocessing as mp
    import signal

    from cifarlab.engine import TrainingInterrupted

    # the main process decides what SIGTERM does to its runs (an ignored one would be inherited)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = mp.parent_process()  # not os.getppid(): the main process may have died already
    when_the_parent_dies(parent.pid if parent is not None else os.getppid(),
                         lambda: os.kill(os.getpid(), signal.SIGTERM))
    with _SigtermAsCtrlC() as sigterm:  # before the training (loading, a feature cache) and after it
        try:
            train_one(config, path, resume, threads)
            result = ("finished", "resumed" if resume else "trained")
        except (TrainingInterrupted, KeyboardInterrupt) as err:
            result = ("interrupted", str(err) or "interrupted")
        except Exception as err:  # noqa: BLE001 - one run's failure is recorded; the others go on
            result = ("failed", _one_line(err)[:2000])  # well within a pipe's buffer: send never blocks
        # a second SIGTERM (a scheduler's to every process, then the main process's passed on)
        # must not end this one before it has said what became of its run
        sigterm.stopping = True
        try:
            conn.send(result)
            conn.close()
        except OSError:  # the main process is gone: the run's folder says what became of it
            pass


def _spawn(target, args: tuple, name: str):
    """(process, receiving end of its pipe): `target(send_end, *args)` started in a spawned process.
    Not daemonic: a run may start processes of its own (decoding images when the data cache
    could not be written)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(send, *args), name=name)
    proc.start()
    send.close()  # the child's end: only the child holds it now
    return proc, receive


def _result_of(proc, receive):
    """What a worker process sent before it ended, or None. Processes it forked may still hold the
    pipe's other end, so no data now means none will come (not "wait for EOF")."""
    proc.join()
    try:
        result = receive.recv() if receive.poll() else None
    except EOFError:
        result = None
    receive.close()
    return result


def _death(exitcode: int | None, whose: str = "its") -> str:
    """Why a worker process ended without a result, for the report."""
    import signal

    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"{whose} process was killed by {name}{hint}"
    return f"{whose} process ended with exit code {exitcode} before its work did"


def execute(runs: list[PlannedRun], jobs: int = 1, progress: bool = True, data=None,
            log=print, background: AnalysisBesideTraining | None = None) -> dict[str, dict]:
    """Train what is not finished, `jobs` runs at a time; returns {preset: record}.

    A run that fails is recorded with its reason and the others go on; Ctrl-C stops the lot
    (the runs in progress save first) with a CifarlabError that says how to go on. Each finished
    run is handed to `background`, if given, for its analysis while the others train.
    """
    finished = background.submit if background is not None else (lambda name: None)
    from cifarlab.engine import TrainingInterrupted

    records: dict[str, dict] = {}
    todo: list[tuple[PlannedRun, bool]] = []
    weights: dict[tuple[str, str], str | None] = {}  # checked once per backbone, only for runs to train
    for run in runs:
        state = run_state(run)
        if state == "finished":
            records[run.name] = _record(run, "finished", "already finished: skipped")
            log(f"  {run.name:<26} already finished")
            finished(run.name)
            continue
        if run.config.study == "transfer":
            key = (run.config.backbone, run.config.backbone_weights)
            if key not in weights:
                weights[key] = weights_problem(run.config, progress)
                if weights[key] is not None:  # once, in full: it says what to do
                    log(f"  {run.config.backbone} weights unavailable, so its runs are skipped: {weights[key]}")
            if weights[key] is not None:
                records[run.name] = _record(run, "skipped", f"backbone weights unavailable: {weights[key]}")
                log(f"  {run.name:<26} skipped: backbone weights unavailable")
                continue
        if state == "restart":
            moved = _move_aside(run.path)
            log(f"  {run.name:<26} had started without a checkpoint; moved to {moved.name}, starting anew")
        todo.append((run, state == "resume"))
        log(f"  {run.name:<26} {'resume' if state == 'resume' else 'train'} ({counted(run.config.steps, 'step')})")
    if not todo:
        return records
    jobs = max(1, min(jobs, len(todo)))
    if jobs > 1:
        try:
            return {**records, **_execute_parallel(todo, jobs, progress, log, background=background)}
        except CifarlabError as err:  # interrupted: the records of this call so far go with it
            if hasattr(err, "records"):
                err.records = {**records, **err.records}
            raise
    for run, resume in todo:
        try:
            train_one(run.config.to_dict(), str(run.path), resume, progress=progress, data=data)
        except TrainingInterrupted as err:  # Ctrl-C stops reproduce as a whole
            records[run.name] = _record(run, "interrupted", _interrupted_note(str(err)))
            log(f"  {run.name:<26} {records[run.name]['note']}")
            raise _interrupted(f"{err}. Run the same `cifarlab reproduce` again to go on", records) from None
        except KeyboardInterrupt:  # before the run's training (its set-up) or after it (its plots)
            done = run_state(run) == "finished"
            records[run.name] = _record(run, "finished" if done else "interrupted",
                                        "trained" if done else "interrupted before its training began")
            log(f"  {run.name:<26} {'finished' if done else 'interrupted'}")
            raise _interrupted("interrupted. Run the same `cifarlab reproduce` again to go on", records) from None
        except Exception as err:  # noqa: BLE001 - one run's failure is recorded; the others go on
            records[run.name] = _record(run, "failed", _one_line(err))
            log(f"  {run.name} failed: {_one_line(err)}")
        else:
            records[run.name] = _record(run, "finished", "resumed" if resume else "trained")
            finished(run.name)
    return records


# How much more a training step through a backbone costs than one through the ConvNet, per image
# (ballpark: 4-5x for EfficientNet-Lite0 at 32x32 on the development CPU); only the order of the
# runs handed out depends on it.
BACKBONE_STEP_COST = 5.0


def estimated_cost(cfg: Config) -> float:
    """A rough relative training cost of a run (images through the network, weighted), by which
    runs at once are handed out longest first, so that no long run starts last."""
    if cfg.study != "transfer":
        return float(cfg.steps * images_per_step(cfg))
    refining = cfg.steps - cfg.refine_after if 0 <= cfg.refine_after < cfg.steps else 0
    # frozen steps train the head alone (on cached features once the cache pays)
    return cfg.batch_size * (refining * BACKBONE_STEP_COST + (cfg.steps - refining) * 0.1)


def _execute_parallel(todo, jobs: int, progress: bool, log, worker=_worker,
                      background: AnalysisBesideTraining | None = None) -> dict[str, dict]:
    """Each run in a process of its own: its own CUDA context (or CPU threads), and a process
    that dies (killed, out of memory) takes only its own run with it.

    Runs are handed out longest first, a run only when a slot is free, so after Ctrl-C no queued
    run starts. SIGTERM does what Ctrl-C does: it is passed on to the runs, which save and stop.
    `worker` is the process's function (tests swap it).
    """
    import signal
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // jobs)
    records: dict[str, dict] = {}
    queue = sorted(todo, key=lambda item: -estimated_cost(item[0].config))  # stable: preset order on ties
    interrupted = False
    bar = tqdm(total=len(todo), desc=f"runs ({jobs} at a time)", unit="run", disable=not progress)
    running: dict = {}  # process sentinel -> (process, receiving end of its pipe, run)

    # SIGTERM (`kill`, a job scheduler's time limit): noted by the handler, passed on by the loop
    # below to the runs it started; none starts after it, and none is missed that starts as it comes
    terminate: list[int] = []
    passed_on = False

    def start(run, resume) -> None:
        proc, receive = _spawn(worker, (run.config.to_dict(), str(run.path), resume, threads), f"cifarlab-{run.name}")
        running[proc.sentinel] = (proc, receive, run)

    def finish(proc, receive, run) -> tuple[str, str]:
        result = _result_of(proc, receive)
        if result is not None:
            return result
        if interrupted or terminate or proc.exitcode == -signal.SIGTERM:  # ended before its run began
            return "interrupted", "interrupted"
        return "failed", _death(proc.exitcode)

    taken = contextlib.ExitStack()
    taken.enter_context(interrupts.taking_over(signal.SIGTERM, lambda signum, frame: terminate.append(signum)))
    try:
        while queue or running:
            try:
                while queue and len(running) < jobs and not (interrupted or terminate):
                    start(*queue.pop(0))
                if not running:
                    break
                # A sentinel fires when its process ends, or, if the run forked processes that
                # outlive it, only when they end too: look at the processes themselves as well.
                ready = set(wait(list(running), timeout=1.0))
                if terminate and not passed_on:
                    interrupted = passed_on = True
                    for proc, _, _ in running.values():
                        with contextlib.suppress(OSError):  # it has just ended
                            os.kill(proc.pid, signal.SIGTERM)
                if background is not None:
                    background.pump()  # what the analyses beside have logged
                for sentinel in [s for s in running if s in ready or not running[s][0].is_alive()]:
                    proc, receive, run = running.pop(sentinel)
                    status, note = finish(proc, receive, run)
                    if status == "interrupted":
                        interrupted = True
                        note = _interrupted_note(note)
                    records[run.name] = _record(run, status, note)
                    if status == "interrupted":
                        log(f"  {run.name:<26} {note}")
                        continue
                    if status == "failed":
                        log(f"  {run.name} failed: {note}")
                    elif background is not None and not interrupted:
                        background.submit(run.name)
                    bar.set_postfix_str(f"{run.name} {status}", refresh=False)
                    bar.update(1)
            except KeyboardInterrupt:  # the runs got it too: they save and stop at their next step
                interrupted = True
    except BaseException:  # an error here, not in a run: leave no process behind
        for proc, _, _ in running.values():
            proc.kill()
        raise
    finally:
        taken.close()
        bar.close()
    if interrupted or terminate:  # (a SIGTERM after the last run ended stops reproduce all the same)
        raise _interrupted("interrupted; the runs that had started saved their progress. "
                           "Run the same `cifarlab reproduce` again to go on", records)
    return records


class _SigtermAsCtrlC:
    """SIGTERM (`kill`, a job scheduler's time limit) stops reproduce as Ctrl-C does, between the
    runs and in the analysis after them too, so that reproduce.json says so; a run in training
    (or the runs of --jobs) take it over meanwhile, and save. Once stopping, it is ignored: the
    stop's own record must not be cut short."""

    def __init__(self):
        self.stopping = False
        self._taken = contextlib.ExitStack()

    def __enter__(self):
        import signal

        self._taken.enter_context(interrupts.taking_over(signal.SIGTERM, self._stop))
        return self

    def _stop(self, signum, frame):
        if not (self.stopping or interrupts.training_stop_asked):  # (a run's stop is being reported)
            self.stopping = True
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        self._taken.close()


def _interrupted_note(message: str) -> str:
    """What reproduce.json and the log keep of a run's Ctrl-C: the engine's "interrupted at step N"
    (or "interrupted twice at step N: stopped without saving"), without its resume command, which
    for a run of reproduce is the same reproduce call."""
    first = message.split(";")[0].strip()
    return first if first.startswith("interrupted") else "interrupted before its training began"


def _interrupted(message: str, records: dict[str, dict]):
    """TrainingInterrupted carrying the records of the runs that ended before it (failures
    included), for reproduce.json."""
    from cifarlab.engine import TrainingInterrupted

    err = TrainingInterrupted(message)
    err.records = records
    return err


# --- analysis -----------------------------------------------------------------------------------

def _latest_step(path: Path) -> int | None:
    from cifarlab.runs import RunDir

    steps = RunDir(path).weight_steps()
    return steps[-1] if steps else None


# The analysis the report shows: the seed's OvR protocol and t-SNE with openTSNE's defaults, seed 0.
ANALYSIS_SEED, TSNE_PERPLEXITY = 0, 40.0


def _ovr_fresh(path: Path, layer: str, step: int, data: str) -> bool:
    """The seed-protocol OvR of this checkpoint on the images of `data` (a data_key), as reproduce
    makes it (one made by hand with another --seed or --data is redone)."""
    from cifarlab.analysis import read_ovr

    result = read_ovr(path, layer) or {}
    return (result.get("checkpoint"), result.get("data"), result.get("seed")) == (step, data, ANALYSIS_SEED)


def _tsne_fresh(path: Path, layer: str, step: int, points: int, data: str) -> bool:
    """Coordinates of this checkpoint on `data` with exactly `points` points, made as reproduce
    makes them (its perplexity and seed)."""
    from cifarlab.analysis import effective_perplexity, read_tsne

    tsne = read_tsne(path, layer)
    if tsne is None:
        return False
    meta = tsne["meta"]
    made = (meta.get("checkpoint"), meta.get("points"), meta.get("data"), meta.get("seed"), meta.get("perplexity"))
    return made == (step, points, data, ANALYSIS_SEED, effective_perplexity(TSNE_PERPLEXITY, points))


ANALYSES = {  # preset -> layers its tables and figures need
    REFERENCE_RUN: ("flatten", "fc1", "fc2"),
    "siamese-exp1": ("embedding",), "siamese-exp2": ("embedding",), "siamese-exp3": ("embedding",),
}


def analysis_up_to_date(out: Path, name: str, tsne_points: int) -> bool:
    """Whether the OvR and t-SNE the report needs of this finished run are made already (a quick
    look at their files: nothing need start to find that out). A run whose checkpoints are gone
    counts as up to date if its results are there."""
    from cifarlab.analysis import data_key, read_ovr, read_tsne
    from cifarlab.runs import RunDir

    path, layers = out / name, ANALYSES[name]
    step = _latest_step(path)
    if step is None:
        return all(read_ovr(path, layer) and read_tsne(path, layer) for layer in layers)
    try:
        source = data_key(RunDir(path).config(), None)
    except Exception:  # noqa: BLE001 - unreadable: analyse_run says why
        return False
    return all(_ovr_fresh(path, layer, step, source) and _tsne_fresh(path, layer, step, tsne_points, source)
               for layer in layers)


def analyse_run(out: Path, name: str, tsne_points: int, progress: bool = True, log=print) -> str | None:
    """OvR (seed protocol) and t-SNE (`tsne_points` test images) of one finished run, on the layers
    the report looks at, skipped when up to date; returns why they could not be made (None when
    they were, or were already)."""
    from cifarlab.analysis import data_key, run_ovr, run_tsne
    from cifarlab.runs import RunDir

    if analysis_up_to_date(out, name, tsne_points):
        return None
    path, layers = out / name, ANALYSES[name]
    step = _latest_step(path)
    if step is None:  # finished, but its checkpoints were removed since
        why = ("analysis not possible: the run has no checkpoints/step-N.safetensors left; move the run "
               "away and run reproduce again to train it anew")
        log(f"  {name:<26} {why}")
        return why
    try:
        source = data_key(RunDir(path).config(), None)
        stale = [layer for layer in layers if not _ovr_fresh(path, layer, step, source)]
        if stale:
            for row in run_ovr(path, stale, protocol="seed", seed=ANALYSIS_SEED, progress=progress):
                log(f"  {name:<26} OvR {row['layer']:<9} {row['accuracy']:.4f} ({row['fit_seconds']:.1f} s)")
        if not all(_tsne_fresh(path, layer, step, tsne_points, source) for layer in layers):
            res = run_tsne(path, list(layers), perplexity=TSNE_PERPLEXITY, max_points=tsne_points,
                           seed=ANALYSIS_SEED, progress=progress)
            log(f"  {name:<26} t-SNE of {res['points']} points: {', '.join(res['layers'])}")
    except Exception as err:  # noqa: BLE001 - the report says why a number is missing
        why = f"analysis failed: {_one_line(err)}"
        log(f"  {name:<26} {why}")
        return why
    return None


def analyse(out: Path, records: dict[str, dict], tsne_points: int, progress: bool = True, log=print,
            done: set[str] = frozenset()) -> None:
    """The analysis of every finished run that needs one, but those in `done` (made beside the
    training); a failure is noted in the run's record, not raised."""
    for name in ANALYSES:
        if records.get(name, {}).get("status") != "finished" or name in done:
            continue
        why = analyse_run(out, name, tsne_points, progress, log)
        if why:
            records[name]["analysis"] = why


def become_analysis_process(parent: int) -> None:
    """Set up a process started to analyse beside the training (it starts with SIGINT blocked):
    it leads a process group of its own, so that the main process (pid `parent`) can end it
    together with the classifiers' worker processes it starts (Ctrl-C is the main process's to
    handle); it ends that group if the main process dies, even before this call; its output goes
    nowhere (a background group writing to a terminal may be stopped; its results and errors go
    back through its pipe); and it is niced, so that the training keeps its core."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # drops a Ctrl-C that came before this line
    os.setpgrp()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    nowhere = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(nowhere, fd)
    os.close(nowhere)
    try:
        os.nice(10)
    except OSError:
        pass

    when_the_parent_dies(parent, lambda: os.killpg(0, signal.SIGKILL))


def _analysis_worker(conn, out: str, name: str, tsne_points: int, parent: int) -> None:
    """One run's analysis in a process of its own (spawned); sends (log lines, why it failed) back."""
    become_analysis_process(parent)
    lines: list[str] = []
    try:
        why = analyse_run(Path(out), name, tsne_points, progress=False, log=lines.append)
    except BaseException as err:  # noqa: BLE001 - reported, not raised
        why = f"analysis failed: {_one_line(err)}"
    # well within a pipe's buffer: send never blocks (the main process reads after the exit)
    conn.send(([line[:1000] for line in lines[-20:]], why[:2000] if why else None))
    conn.close()


def _end_group(proc, timeout: float = 5.0) -> None:
    """End a process that leads a process group, and every process of that group."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:  # no such group (yet: it is still starting), or gone: the process alone
            if proc.is_alive():
                proc.kill()
        proc.join(timeout)
        if not proc.is_alive():
            break


class AnalysisBesideTraining:
    """The analyses of finished runs, one at a time in a process of their own, while the next
    runs train. OvR and t-SNE run on the CPU (the features are extracted on the run's device,
    in seconds), and a run training on a GPU leaves the CPU's cores idle, so on a GPU this takes
    the analysis off the study's wall time; on a CPU the two would share the cores, and there the
    analysis waits until the training is done.

    A thread of this process starts each analysis as soon as the previous one ends. An analysis
    that failed beside the training (its process killed, or out of GPU memory beside the run
    training there, say) is left to `analyse` to make again after the training."""

    def __init__(self, out: Path, tsne_points: int, log=print, worker=_analysis_worker):
        import queue
        import threading

        self.out, self.tsne_points, self.log, self.worker = Path(out), tsne_points, log, worker
        self.done: set[str] = set()  # the runs whose analysis was made
        self._submitted: set[str] = set()
        self._todo: queue.Queue = queue.Queue()
        self._lines: list[str] = []  # log lines for the main thread to print
        self._lock = threading.Lock()
        self._current = None  # the process of the analysis in progress
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="cifarlab-analyses", daemon=True)
        self._thread.start()

    def submit(self, name: str) -> None:
        """Queue the analysis of a run that has just finished (runs without one are ignored)."""
        if name in ANALYSES and name not in self._submitted:
            self._submitted.add(name)
            if analysis_up_to_date(self.out, name, self.tsne_points):  # no process to start
                with self._lock:
                    self.done.add(name)
            else:
                self._todo.put(name)
        self.pump()

    def pump(self) -> None:
        """Print what the analyses that ended have logged (in the caller's thread, between its progress bars)."""
        with self._lock:
            lines, self._lines = self._lines, []
        for line in lines:
            self.log(line)

    def _work(self) -> None:
        import signal
        from multiprocessing import resource_tracker

        while (name := self._todo.get()) is not None:
            with self._lock:
                if self._stopping:
                    continue
                try:
                    # Processes started from here begin with SIGINT blocked (see become_analysis_process).
                    # Starting multiprocessing's resource tracker unblocks it in the thread that
                    # starts it (CPython issue 110844): start it first.
                    resource_tracker.ensure_running()
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                    proc, receive = _spawn(self.worker, (str(self.out), name, self.tsne_points, os.getpid()),
                                           f"cifarlab-analysis-{name}")
                except Exception as err:  # noqa: BLE001 - then it is made after the training
                    self._lines.append(f"  {name:<26} could not start its analysis beside the training "
                                       f"({_one_line(err)}); it is made after the training")
                    continue
                self._current = proc
            result = _result_of(proc, receive)
            with self._lock:
                self._current = None
                if self._stopping:
                    continue
                if result is None:
                    self._lines.append(f"  {name:<26} {_death(proc.exitcode, 'its analysis')}; "
                                       "it is made again after the training")
                else:
                    self._lines.extend(result[0])
                    if result[1] is None:
                        self.done.add(name)
                    else:
                        self._lines.append(f"  {name:<26} it is made again after the training")

    def finish(self) -> set[str]:
        """Wait for every queued analysis; the runs whose analysis was made."""
        self._todo.put(None)
        self._thread.join()
        self.pump()
        return self.done

    def stop(self) -> None:
        """End the analysis in progress and drop the queue (Ctrl-C, or an error in reproduce)."""
        with self._lock:
            self._stopping = True
            proc = self._current
        if proc is not None:
            _end_group(proc)
        self._todo.put(None)
        self._thread.join(timeout=30)


# --- the whole thing ----------------------------------------------------------------------------

ANALYSIS_WHEN = ("auto", "during", "after")


def _analyse_during(analysis: str, device: str) -> bool:
    if analysis != "auto":
        return analysis == "during"
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def reproduce(out: str | os.PathLike = "report", data: str | os.PathLike | None = None, only: str | None = None,
              steps_scale: float = 1.0, jobs: int = 1, max_evals: int | None = None, device: str = "auto",
              transfer_backbone: str | None = None, backbone_weights: str | None = None,
              tsne_points: int = 10000, overrides: dict | None = None, progress: bool = True,
              analysis: str = "auto", log=print) -> dict:
    """Train, analyse, report. Returns the state written to DIR/reproduce.json, plus where the report
    went and which of this call's runs failed or could not be analysed.

    `analysis`: `during` the training (each finished run's, beside the next runs: see
    AnalysisBesideTraining), `after` it, or `auto`: during when the runs train on a CUDA GPU."""
    from cifarlab.data import load_cifar10
    from cifarlab.report import check_report_files, write_report

    if jobs < 1:
        raise CifarlabError(f"--jobs must be >= 1 (got {jobs})")
    if transfer_backbone not in (None, "vgg16", "efficientnet-lite0"):  # also when study3 is left out: a typo
        raise CifarlabError(f"--transfer-backbone must be vgg16 or efficientnet-lite0 (got {transfer_backbone!r})")
    for key in ("data", "device", "backbone", "backbone_weights"):  # given by flags of their own
        if key in (overrides or {}):
            flag = "--transfer-backbone" if key == "backbone" else "--" + key.replace("_", "-")
            raise CifarlabError(f"--set {key}=... is not how reproduce takes it: use {flag}")
    from cifarlab.engine import check_device

    check_device(device)  # no GPU for --device cuda: one line now, not one failure per run
    if max_evals is not None and max_evals < 1:
        raise CifarlabError(f"--max-evals must be >= 1 (got {max_evals})")
    if analysis not in ANALYSIS_WHEN:
        raise CifarlabError(f"--analysis must be one of {', '.join(ANALYSIS_WHEN)} (got {analysis!r})")
    if tsne_points < 2:
        raise CifarlabError(f"--tsne-points must be at least 2 (got {tsne_points})")
    if backbone_weights not in (None, "imagenet", "none") and not Path(backbone_weights).expanduser().is_file():
        raise CifarlabError(f"--backbone-weights {backbone_weights}: no such file; give the path of a weights file, "
                            "imagenet or none")
    called = time.perf_counter()
    out = Path(out)
    check_report_files(out)  # before hours of training, not after
    groups = parse_only(only)
    runs = plan(out, groups, steps_scale, max_evals, str(data or ""), device, transfer_backbone, backbone_weights,
                overrides)
    for run in runs:  # a run folder trained otherwise, or by another process now, is refused before any work
        run_state(run)
        _refuse_if_being_trained(run.path)
    # from here on SIGTERM stops it as Ctrl-C does (the data's download and cache build included)
    with _SigtermAsCtrlC() as sigterm:
        dataset = load_cifar10(data, download=True, progress=progress)  # once, here: builds the cache for all runs
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / STATE_FILE
        previous = read_json(state_path)
        log(f"reproducing {', '.join(groups)} into {out} (steps x {steps_scale:g}, {counted(jobs, 'job')} at a time)")
        start = time.perf_counter()
        points = min(tsne_points, len(dataset.test_labels))
        background = AnalysisBesideTraining(out, points, log) if _analyse_during(analysis, device) else None
        clock = {"data_seconds": start - called}  # rounded when recorded (a rounded part made -0.0 s of another)

        def record(records: dict[str, dict], **more) -> dict:
            """What this call did, in reproduce.json: written when it ends, interrupted or not, so that
            a report of a study cut short still has its data and times."""
            state = {
                "cifarlab_version": __version__,
                "command": " ".join(["cifarlab", *sys.argv[1:]]) if sys.argv and "cifarlab" in sys.argv[0] else None,
                "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
                "steps_scale": steps_scale, "only": groups, "overrides": overrides or {}, "jobs": jobs,
                "max_evals": max_evals,
                "data": {"layout": dataset.layout, "source": str(Path(dataset.source).resolve()),
                         "checksum": dataset.checksum, "train": int(len(dataset.train_labels)),
                         "test": int(len(dataset.test_labels))},
                "wall_seconds": round(time.perf_counter() - called, 2), **{k: round(v, 2) for k, v in clock.items()},
                "analysis": "during" if background is not None else "after", **more,
                "runs": {**previous.get("runs", {}), **records},
            }
            write_json(state_path, state)
            return state

        records: dict[str, dict] = {}
        try:
            records = execute(runs, jobs, progress, data=dataset, log=log, background=background)
            clock["train_seconds"] = time.perf_counter() - start
            done = background.finish() if background is not None else set()
            analyse(out, records, points, progress, log, done=done)
            clock["analysis_seconds_after_training"] = time.perf_counter() - start - clock["train_seconds"]
        except BaseException as err:
            sigterm.stopping = True
            if background is not None:
                background.stop()
            if isinstance(err, KeyboardInterrupt) or hasattr(err, "records"):  # Ctrl-C (see _interrupted)
                record({**records, **getattr(err, "records", {})}, interrupted=True)
            raise
        record(records)
        reporting = time.perf_counter()
        html, md = write_report(out)
        clock["report_seconds"] = time.perf_counter() - reporting
        state = record(records)  # again, with the report's time in the total
        state["report"] = {"html": str(html), "md": str(md)}
        # what went wrong in this call (state["runs"] also keeps records of earlier calls' runs)
        state["failed"] = [name for name, r in records.items() if r["status"] == "failed"]
        state["unanalysed"] = [name for name, r in records.items() if r.get("analysis")]
        return state
