"""A run directory: its config, metrics, summary, checkpoints and plots.

Layout (every file written atomically):
    config.toml                      resolved settings + [about] (versions, commit)
    metrics.csv                      step, split, loss, accuracy, seconds
    summary.json                     final/best results, timing, device
    tb/                              TensorBoard events
    checkpoints/step-N.safetensors   weights
    checkpoints/last.pt              optimizer, RNG, step, running sums: what --resume needs
    plots/curves.png                 accuracy and loss, train and test
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import io
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cifarlab import CifarlabError, __version__, counted
from cifarlab.config import NOT_COMPARED, Config, _is_utf8, study_reads, baseline_accuracy, load_config, read_toml, to_toml
from cifarlab.fileio import read_json, write_json, write_text, write_with

METRIC_FIELDS = ("step", "split", "loss", "accuracy", "seconds")
_STEP_FILE = re.compile(r"step-(\d+)\.safetensors$")


def git_commit() -> str:
    """The commit of the cifarlab source, when it runs from a checkout of cifarlab itself (an
    installed copy inside the user's own git project must not report that project's commit)."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source, capture_output=True,
            text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.split("\n")
    if out.returncode != 0 or len(lines) < 2:
        return "unknown"
    # src/cifarlab/ sits two folders below the checkout's root, beside its pyproject.toml
    ours = Path(lines[0]).resolve() == source.parents[1] and (source.parents[1] / "pyproject.toml").is_file()
    if not ours:
        return "unknown"
    try:  # source changed since that commit: the commit alone did not make this run (as `git describe --dirty`)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "pyproject.toml"],
                                 cwd=source.parents[1], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        changed = None
    dirty = changed is None or changed.returncode != 0 or bool(changed.stdout.strip())
    return lines[1].strip() + ("+dirty" if dirty else "")


def time_stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_free(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CifarlabError(f"{path}: is a file, not a run directory; choose another --out")
    if path.exists() and any(path.iterdir()):
        hint = (f"pass --resume {path} to continue it, or choose another --out" if (path / "config.toml").is_file()
                else "it is not a cifarlab run: choose another --out")
        raise CifarlabError(f"{path}: already exists and is not empty; {hint}")


def stamped_path(folder: Path, prefix: str) -> Path:
    """folder/<prefix>-<time stamp>, with -2, -3... added while that name is taken."""
    stamp = time_stamp()
    path, n = folder / f"{prefix}-{stamp}", 1
    while path.exists():
        n += 1
        path = folder / f"{prefix}-{stamp}-{n}"
    return path


def last_and_best_test(metrics: list[dict]) -> tuple[dict | None, dict | None]:
    """The last and the best (highest accuracy) test rows of a run's metrics, None if it has none."""
    tests = [r for r in metrics if r["split"] == "test"]
    return (tests[-1], max(tests, key=lambda r: r["accuracy"])) if tests else (None, None)


# What Trainer._training_state writes into last.pt (and resume reads).
TRAINING_STATE_KEYS = ("step", "model", "optimizer", "accumulators", "rng_cpu", "clock")


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def load_state(target, state: dict, path: Path, what_to_do: str) -> None:
    """target.load_state_dict(state) for a module or an optimizer, with a mismatch (missing or
    unexpected entries, other shapes: a checkpoint of another network) as one line naming the file.
    The target is left part-loaded then: the caller stops."""
    def refuse(why: str):
        raise CifarlabError(f"{path}: does not fit this run's network ({why}); {what_to_do}") from None

    try:
        if not isinstance(target, torch.nn.Module):
            target.load_state_dict(state)
            return
        result = target.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:  # TypeError: not a dict at all
        mismatch = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        refuse(mismatch[0][:200] if mismatch else _first_line(err))
    problems = [f"{counted(len(keys), what + ' entry', plural=what + ' entries')}, e.g. {keys[0]!r}" for what, keys in
                (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        refuse("; ".join(problems))


def being_trained(path: Path) -> bool:
    """Whether another process holds the run folder's lock (RunDir.hold_lock) now."""
    if not path.is_dir():
        return False
    probe = RunDir(path)
    try:
        probe.hold_lock()
    except CifarlabError:
        return True
    probe.release_lock()
    return False


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics: list[dict] = []
        self._claim: tuple | bool | None = None  # see materialise
        self._made_folder = False  # materialise made the folder (a failed start removes it again)
        self._lock = None  # see hold_lock

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def create(cls, out: str | None, prefix: str, root: Path = Path("runs")) -> "RunDir":
        """A new run directory (root/<prefix>-<time stamp> unless `out`); never reuses one that
        already holds something.

        Nothing is created on disk until `materialise()`, so a run that fails to start leaves
        no empty directory behind.
        """
        path = Path(os.path.expanduser(out)) if out else stamped_path(root, prefix)  # ~unknown stays as typed
        if not _is_utf8(str(path)):  # refused before the training, not by the plot titles after it
            raise CifarlabError(f"{path!s}: the run folder's name is not valid UTF-8 (bytes of another encoding); "
                                "choose another --out")
        _check_free(path)
        run = cls(path)
        run._claim = (root, prefix) if not out else True  # a fresh time-stamped name, or the --out given
        return run

    def materialise(self) -> None:
        """Make the folder. A new run claims it by creating its config.toml exclusively, so two
        runs started at once never share a folder: a time-stamped one takes the next free name,
        an --out given twice is refused to the second."""
        claim = self._claim
        self._made_folder = bool(claim) and not self.path.exists()
        while claim:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(self.path / "config.toml", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break  # ours; write_config replaces it at once
            except FileExistsError:  # it was free when this run was created
                if claim is True:
                    raise CifarlabError(f"{self.path}: another run started in it just now; choose another --out") \
                        from None
                self.path = stamped_path(*claim)
                self._made_folder = not self.path.exists()
        self._claim = None
        self.path.mkdir(parents=True, exist_ok=True)

    def hold_lock(self) -> None:
        """Hold an advisory lock on the run's folder while this process trains the run, so that a
        second process (another --resume, a second reproduce into the same folder) is refused
        rather than mixing its files with this one's. The folder itself, not a file in it: its
        files are replaced by renames, and a lock file would be one more file in every run. Let
        go by `release_lock` or when the process ends. Where there is no flock (Windows, some
        network file systems) runs go unlocked."""
        if self._lock is not None:
            return
        try:
            import fcntl
        except ImportError:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CifarlabError(f"{self.path}: another process is training this run right now; "
                                    "let it finish (or stop it), then resume") from None
            return  # locks not supported here
        self._lock = fd

    def release_lock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(os.path.expanduser(path)))
        if not run.path.exists():
            raise CifarlabError(f"{run.path}: no such run directory; check the path")
        if not (run.path / "config.toml").is_file():
            raise CifarlabError(f"{run.path}: not a cifarlab run (no config.toml); check the path")
        run.metrics = run.read_metrics()
        return run

    def write_config(self, cfg: Config, resumed: bool = False) -> None:
        """config.toml with an [about] table; a run written again keeps the time it was created,
        and a resumed one records when it was last resumed (and by which versions)."""
        now = dt.datetime.now().isoformat(timespec="seconds")
        created = None
        if self._claim is None:
            try:
                about = read_toml(self.path / "config.toml").get("about")
                created = about.get("created") if isinstance(about, dict) else None
            except CifarlabError:
                pass
        about = {
            "cifarlab_version": __version__,
            "git_commit": git_commit(),  # (up to seconds) before the claim: the empty claim lives briefly
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "created": created if isinstance(created, str) else now,
        }
        if resumed:
            about["resumed"] = now
        text = to_toml(cfg.study_settings(), about)
        claiming = self._claim is not None
        self.materialise()
        try:
            write_text(self.path / "config.toml", text)
        except BaseException:
            if claiming:  # give the claim back: an empty config.toml would stand for a run never made
                (self.path / "config.toml").unlink(missing_ok=True)
                if self._made_folder:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()
            raise

    def config(self) -> Config:
        return load_config(self.path / "config.toml")

    # -- metrics -------------------------------------------------------------------------------
    def add_metric(self, step: int, split: str, loss: float, accuracy: float, seconds: float) -> None:
        self.metrics.append(
            {"step": step, "split": split, "loss": loss, "accuracy": accuracy, "seconds": round(seconds, 3)}
        )

    def write_metrics(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.metrics:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        write_text(self.path / "metrics.csv", buf.getvalue())

    def read_metrics(self) -> list[dict]:
        path = self.path / "metrics.csv"
        if not path.exists():
            return []
        rows, line = [], 1  # the line being read
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is not None and not set(METRIC_FIELDS) <= set(reader.fieldnames):
                    raise CifarlabError(f"{path}: its header is not {','.join(METRIC_FIELDS)}; the file is damaged")
                for row in reader:
                    line += 1
                    rows.append({"step": int(row["step"]), "split": row["split"],
                                 "loss": float(row["loss"]), "accuracy": float(row["accuracy"]),
                                 "seconds": float(row["seconds"])})
        except UnicodeDecodeError:
            raise CifarlabError(f"{path}: not text (after line {line}); the file is damaged") from None
        except (KeyError, TypeError, ValueError, csv.Error):
            raise CifarlabError(f"{path}: line {line} is not a metrics row; the file is damaged") from None
        return rows

    def discard_after(self, step: int, metrics: list[dict]) -> None:
        """What a resumed run at `step` will write anew goes: metrics.csv keeps only `metrics` (the
        rows the resume kept), and weights files after `step` are removed."""
        self.metrics = metrics
        self.write_metrics()
        for later in self.weight_steps():
            if later > step:
                (self.checkpoints / f"step-{later}.safetensors").unlink(missing_ok=True)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_weights(self, step: int, model: torch.nn.Module) -> Path:
        path = self.checkpoints / f"step-{step}.safetensors"
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        write_with(path, lambda tmp: save_file(state, str(tmp), metadata={"step": str(step)}))
        return path

    def weight_steps(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := _STEP_FILE.search(p.name)))

    def checkpoint_step(self, step: int | None = None) -> int:
        """`step` if its weights were saved, the latest saved when None; else an error that says
        what to do (train on, wait, or pick a saved step)."""
        steps = self.weight_steps()
        if not steps:
            try:
                cfg = self.config()
            except CifarlabError:
                cfg = None
            if cfg is None:
                todo = "train first"
            elif being_trained(self.path):
                todo = f"it is being trained now, and saves its first at step {min(cfg.checkpoint_every, cfg.steps):,}"
            else:
                todo = (f"it stopped before its first (due at step {min(cfg.checkpoint_every, cfg.steps):,}); "
                        f"`cifarlab train {cfg.study} --resume {shlex.quote(str(self.path))}` trains it")
            raise CifarlabError(f"{self.path}: no checkpoint yet (checkpoints/step-N.safetensors): {todo}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CifarlabError(f"{self.path}: no checkpoint at step {step}; available: {', '.join(map(str, steps))}")
        return step

    def load_weights(self, model: torch.nn.Module, step: int | None = None) -> int:
        """Load step-N weights (the latest when step is None) into model; returns N."""
        step = self.checkpoint_step(step)
        path = self.checkpoints / f"step-{step}.safetensors"
        try:
            state = load_file(str(path), device=str(next(model.parameters()).device))
        except Exception as err:  # safetensors raises several types for damaged files
            raise CifarlabError(f"{path}: cannot read checkpoint ({err}); delete it or use another --checkpoint") from None
        load_state(model, state, path, "use another --checkpoint")
        return step

    def save_training_state(self, state: dict) -> None:
        write_with(self.checkpoints / "last.pt", lambda tmp: torch.save(state, tmp))

    def load_training_state(self, device: torch.device) -> dict:
        path = self.checkpoints / "last.pt"
        if not path.is_file():
            raise CifarlabError(f"{path}: not found, so the run cannot continue exactly (its optimizer state is "
                                f"lost); train it anew: move {self.path} away, or give another --out")
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file raises many types
            # torch's reasons speak of its internals (a zip directory, a pickle opcode): say what they mean
            # (its weights-only refusal begins with advice to unpickle the file unchecked: not ours to give)
            why = ("it holds objects other than tensors and plain values" if "Weights only load failed" in str(err)
                   else "the file is empty" if path.stat().st_size == 0
                   else f"it cannot be read as a torch checkpoint: cut short, or another kind of file ({type(err).__name__})")
            raise CifarlabError(f"{path}: damaged or not a cifarlab training state ({why}); the run cannot resume "
                                f"from it. Its weights still serve eval and analysis ({self.last_good_hint().rstrip('.')}); to "
                                f"train on, train it anew: move {self.path} away, or give another --out") from None
        missing = [key for key in TRAINING_STATE_KEYS if not isinstance(state, dict) or key not in state]
        if missing:
            raise CifarlabError(f"{path}: not a cifarlab training state (no {missing[0]!r}); "
                                "resume is not possible from it: train the run anew")
        return state

    def _saved(self, key: str):
        """One value of last.pt, None without a readable one. Memory-mapped: the value is read,
        not the optimizer's tensors."""
        try:
            return torch.load(self.checkpoints / "last.pt", map_location="cpu", weights_only=True, mmap=True).get(key)
        except Exception:  # noqa: BLE001 - missing or damaged: the run's other files still tell
            return None

    def saved_step(self) -> int | None:
        """The step last.pt was saved at (Ctrl-C saves it between checkpoints)."""
        step = self._saved("step")
        return int(step) if step is not None else None

    def trained_data_digest(self) -> str | None:
        """The data_digest of the images the run trained on, as last.pt records it."""
        return self._saved("data_digest")

    def other_images_note(self, digest: str | None, given: object) -> str | None:
        """"GIVEN holds other images than RUN trained on" when `digest` is not that of the run's
        images (None when it is, or when either is unknown): results on them mean something else."""
        trained_on = self.trained_data_digest()
        if not (trained_on and digest) or trained_on == digest:
            return None
        return f"{getattr(given, 'source', given)} holds other images than {self.name} trained on"

    def last_good_hint(self) -> str:
        steps = self.weight_steps()
        if not steps:
            return "no checkpoint was saved before that."
        return f"the last good checkpoint is {self.checkpoints / f'step-{steps[-1]}.safetensors'}."

    # -- summary -------------------------------------------------------------------------------
    def summary(self, steps: int | None = None) -> dict:
        """summary.json when it is the result of the run as configured now ({} otherwise): a run
        resumed to more steps keeps its earlier summary until it finishes anew."""
        return current_summary(read_json(self.path / "summary.json"),
                               self.config().steps if steps is None else steps)

    def write_summary(self, cfg: Config, wall_seconds: float, train_seconds: float, device: torch.device,
                      extra: dict | None = None) -> dict:
        final, best = last_and_best_test(self.metrics)
        summary = {
            "study": cfg.study,
            "steps": cfg.steps,
            "final_test_accuracy": final and final["accuracy"],
            "final_test_loss": final and final["loss"],
            "best_test_accuracy": best and best["accuracy"],
            "best_test_step": best and best["step"],
            "wall_seconds": round(wall_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "ms_per_step": round(1000 * train_seconds / max(cfg.steps, 1), 4),
            "device": device_name(device),
            "torch_version": torch.__version__,
            "cifarlab_version": __version__,
            **(extra or {}),
        }
        write_json(self.path / "summary.json", summary)
        return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({counted(torch.get_num_threads(), 'thread')}, {platform.machine()})"


# -- comparing runs ----------------------------------------------------------------------------


def find_runs(paths: list[str | Path]) -> list[tuple[Path, bool]]:
    """The run directories among `paths`, each with whether it was named itself: each path is a
    run, or a folder of runs (a `cifarlab reproduce` output, say), whose runs are taken in name order."""
    found = []
    for path in map(Path, paths):
        if (path / "config.toml").is_file():
            found.append((path, True))
            continue
        inner = sorted(p for p in path.iterdir() if (p / "config.toml").is_file()) if path.is_dir() else []
        if not inner:
            raise CifarlabError(f"{path}: neither a cifarlab run (no config.toml) nor a folder of runs; check the path")
        found.extend((p, False) for p in inner)
    return found


def current_summary(summary: dict, steps: int) -> dict:
    """`summary` if it describes a run of `steps` steps, else {} (see RunDir.summary)."""
    return summary if summary.get("steps") == steps else {}


def compare_runs(paths: list[str | Path]) -> tuple[list[str], list[dict]]:
    """One row per run: its results (finished or not yet) and the settings in which the runs
    differ (None where the run's study does not read it). Returns (those setting names, rows).

    A run that cannot be read stops it when it was named itself; one found in a folder of runs is
    left out with a warning, so that one damaged run does not hide the others."""
    runs, configs, raw = [], [], []
    for path, named in find_runs(paths):
        try:
            run = RunDir.open(path)  # reads metrics.csv
            cfg = run.config().to_dict()
        except CifarlabError as err:
            if named:
                raise
            print(f"warning: left out {path}: {err}", file=sys.stderr)
            continue
        runs.append(run)
        raw.append(cfg)
        # a setting a run's study does not read is None for it, and does not count as a difference
        configs.append({key: (value if study_reads(cfg["study"], key) else None) for key, value in cfg.items()})
    if not runs:
        raise CifarlabError(f"no readable run in {', '.join(map(str, paths))}; see the warnings")
    differing = [key for key in configs[0] if key not in NOT_COMPARED
                 and len({repr(c[key]) for c in configs if c[key] is not None}) > 1]
    rows = []
    for run, cfg, own in zip(runs, configs, raw):
        summary = run.summary(cfg["steps"])
        # the step reached: the last logged or saved one (Ctrl-C saves between evaluations)
        step = max(run.metrics[-1]["step"] if run.metrics else 0, run.saved_step() or 0)
        summary_file = run.path / "summary.json"
        unreadable = summary_file.is_file() and not read_json(summary_file)
        lost = not summary_file.exists() and step >= cfg["steps"]  # all steps done, its summary deleted
        if unreadable or lost:
            what = ("is unreadable (damaged?): shown as unfinished" if unreadable else
                    f"is missing, though the run did all its {cfg['steps']} steps: shown as (no summary)")
            print(f"warning: {summary_file} {what}; `cifarlab train {cfg['study']} --resume "
                  f"{shlex.quote(str(run.path))}` writes it anew", file=sys.stderr)
        final, best = last_and_best_test(run.metrics)
        rows.append({
            "run": str(run.path),
            "study": cfg["study"],
            "step": step,
            "steps": cfg["steps"],
            "finished": bool(summary),
            "summary_missing": lost,
            "test_accuracy": final and final["accuracy"],
            "best_test_accuracy": best and best["accuracy"],
            "best_test_step": best and best["step"],
            "test_loss": final and final["loss"],
            # what a rule blind to the images scores: a Siamese run's 0.8 may be no more than that
            "baseline_accuracy": baseline_accuracy(own["study"], own["fraction_same"], own["batch_size"])[0],
            "ms_per_step": summary.get("ms_per_step"),
            "device": summary.get("device"),
            **{key: cfg[key] for key in differing},
        })
    return differing, rows
