"""`cifarlab report DIR`: the seed report's tables (seed's number, ours, difference) and figures,
redrawn from the preset runs in DIR, as one self-contained DIR/report.html and a DIR/report.md.

It reads what is there (DIR/<preset>/ runs, their analysis, DIR/reproduce.json when present), so
it also works on runs trained by hand with `cifarlab train --preset NAME --out DIR/NAME`.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarlab import CifarlabError, __version__, counted
from cifarlab.config import NOT_COMPARED, NOT_IDENTITY, Config, baseline_accuracy, study_reads
from cifarlab.fileio import read_json, write_text
from cifarlab.presets import REFERENCE_RUN, Preset, all_presets
from cifarlab.reproduce import GROUPS

# The report's section 1.4.1 table (its classifier saw 5,000 test samples; see README).
SEED_LAYER_OVR = {"flatten": 0.6305, "fc1": 0.59, "fc2": 0.7685}
# The seed's study-1 tables, one per section, each with its own baseline row (1.2 and 1.3: batch
# 128, 0.7503; 1.3.1 and 1.3.2: batch 64, 0.7520): (subheading, [(preset, label of a repeated
# baseline row, None for the preset's own row)]). Sections 1 and 1.1 have no table in the seed.
STUDY1_SECTIONS = [
    ("Sections 1 and 1.1 (Figures 1 and 2): batch 128, weight decay (no table in the seed; its batch-128 "
     "number is that of 1.2 and 1.3)",
     [("classifier-b128", None), ("classifier-b128-wd0.005", None)]),
    ("Section 1.2 (Figure 3): dropout, batch 128",
     [("classifier-b128", "Section 1.2 baseline: batch 128, no dropout"), ("classifier-b128-dropout0.5", None),
      ("classifier-b128-dropout0.2", None)]),
    ("Section 1.3 (Figure 4): batch 64 against batch 128",
     [("classifier-b128", "Section 1.3 baseline: batch 128"), ("classifier-b64", None)]),
    ("Section 1.3.1 (Figure 5): weight decay, batch 64",
     [("classifier-b64", "Section 1.3.1 baseline: batch 64, no regularisation"), ("classifier-b64-wd0.01", None),
      ("classifier-b64-wd0.005", None)]),
    ("Section 1.3.2 (Figure 6): dropout, batch 64",
     [("classifier-b64", "Section 1.3.2 baseline: batch 64, no dropout"), ("classifier-b64-dropout0.5", None),
      ("classifier-b64-dropout0.2", None)]),
]
# t-SNE as the seed ran it (section 1.4): scikit-learn of 2016, whose default start was random.
SEED_TSNE = "scikit-learn's TSNE(perplexity=40, n_iter=300) on the raw features: 300 iterations from a random start"
# openTSNE's default schedule, which embed_tsne keeps (tests check it against openTSNE's own).
TSNE_EXAGGERATED_ITER, TSNE_ITER = 250, 500
FIGURE_DIR = "figures"


@dataclass
class Row:
    experiment: str
    seed: float | None
    ours: float | None
    note: str = ""
    group: str = ""  # the seed's table (section) the row belongs to, a subheading; "" in a table of one
    caveat: str = ""  # said beside our number, in its cell: "did not converge"

    @property
    def difference(self) -> float | None:
        """ours - seed, of the numbers as shown (4 decimals): the three cells agree, and a gap
        that rounds away is +0.0000, not a red -0.0000."""
        if self.seed is None or self.ours is None:
            return None
        return round(round(self.ours, 4) - round(self.seed, 4), 4) + 0.0  # + 0.0: -0.0 becomes 0.0


@dataclass
class Table:
    title: str
    caption: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)  # long reasons shared by rows, said once

    def sections(self) -> list[tuple[str, list[Row]]]:
        """The rows by group, in order: one table under a subheading per seed table, as the seed
        reports them; [("", rows)] for a table the seed has as one."""
        out: list[tuple[str, list[Row]]] = []
        for row in self.rows:
            if not out or out[-1][0] != row.group:
                out.append((row.group, []))
            out[-1][1].append(row)
        return out

    def shorten_shared_notes(self) -> "Table":
        """A long note several rows share (a skipped backbone's full message) moves below the
        table; the rows keep its short lead ("skipped: see note 1 below") if it has one."""
        counts = {note: sum(r.note == note for r in self.rows) for note in {r.note for r in self.rows}}
        for row in self.rows:
            if counts[row.note] > 1 and len(row.note) > 80:
                if row.note not in self.notes:
                    self.notes.append(row.note)
                lead, colon, _ = row.note.partition(":")
                lead = f"{lead}: " if colon else ""
                row.note = f"{lead}see note {self.notes.index(row.note) + 1} below"
        return self


@dataclass
class Figure:
    title: str
    caption: str
    png: Path | None  # None: nothing to draw yet, `caption` says why
    runs: list[str] = field(default_factory=list)


class ReportData:
    """What DIR holds: presets, their runs' summaries, analysis, and reproduce.json."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            what = "a file, not a folder" if self.root.exists() else "no such folder"
            raise CifarlabError(f"{self.root}: {what}; give the folder of a `cifarlab reproduce --out FOLDER`")
        self.state = read_json(self.root / "reproduce.json")
        self.presets = {p.name: p for p in all_presets()}
        self.present = [n for n in self.presets if (self.root / n / "config.toml").is_file()]
        # runs of the user's own beside (or instead of) the presets: no table row is theirs
        # (and apart from them, the attempts reproduce itself set aside: PRESET.incomplete-<time>)
        others = sorted(p.parent.name for p in self.root.glob("*/config.toml") if p.parent.name not in self.presets)
        self.set_aside = [n for n in others if n.partition(".incomplete-")[0] in self.presets and ".incomplete-" in n]
        self.not_presets = [n for n in others if n not in self.set_aside]
        if not self.present and not self.state:
            if self.not_presets:
                raise CifarlabError(
                    f"{self.root}: its runs ({_listed(self.not_presets)}) are none of the report's presets, and "
                    f"the report sets presets beside the seed's numbers; `cifarlab compare {self.root}` tables "
                    f"them and `cifarlab plot RUN ... --out FILE` draws their curves")
            raise CifarlabError(
                f"{self.root}: holds no preset runs (DIR/<preset>/config.toml) and no reproduce.json; "
                f"run `cifarlab reproduce --out {self.root}` first"
            )
        # Each run's files are read once: the tables, figures and run list all look at them.
        from cifarlab.config import read_toml
        from cifarlab.runs import current_summary

        self._configs, self._damaged = {}, {}
        for name in self.present:  # one run's damaged config.toml costs that run's rows, not the report
            try:
                self._configs[name] = read_toml(self.root / name / "config.toml")
            except CifarlabError as err:
                self._damaged[name] = str(err)
        self.present = [n for n in self.present if n in self._configs]
        self._summaries = {n: current_summary(read_json(self.root / n / "summary.json"),
                                              self._configs[n].get("steps"))
                           for n in self.present}
        self._planned_steps: dict[str, int] = {}
        for name, record in self.state.get("runs", {}).items():
            # a run reproduce failed (or skipped) to take to its planned steps: what is there is an
            # earlier, shorter run's result, not the one planned; the row says why it is missing
            planned = record.get("steps")
            if record.get("status") in ("failed", "skipped") and planned is not None and name in self.present \
                    and self._configs[name].get("steps") != planned:
                self._summaries[name] = {}
                self._planned_steps[name] = planned
        self._metrics: dict[str, list[dict]] = {}
        self._metrics_errors: dict[str, str] = {}

    def summary(self, name: str) -> dict:
        return self._summaries.get(name, {})

    def config(self, name: str) -> dict:
        return self._configs.get(name, {})

    def metrics(self, name: str) -> list[dict]:
        from cifarlab.runs import RunDir

        if name not in self._metrics:
            try:
                self._metrics[name] = RunDir(self.root / name).read_metrics()
            except CifarlabError as err:  # the run's curves are missing, the report goes on
                self._metrics[name], self._metrics_errors[name] = [], str(err)
        return self._metrics[name]

    def no_curves(self, name: str) -> str:
        """Why a finished run has no curves to draw."""
        return self._metrics_errors.get(name, "its metrics.csv has no rows")

    def unfinished(self, name: str) -> str:
        """'unfinished: step N of M' for a run with curves but no result of its planned steps
        (interrupted, failed, or not yet resumed to them): its curves stop short, which a figure
        must say; "" for a finished run."""
        if self.summary(name):
            return ""
        last = max((r["step"] for r in self.metrics(name)), default=0)
        planned = self._planned_steps.get(name, self.config(name).get("steps"))
        return f"unfinished: step {last:,}" + (f" of {planned:,}" if planned else "")

    def ovr(self, name: str, layer: str) -> dict | None:
        from cifarlab.analysis import read_ovr

        return read_ovr(self.root / name, layer)

    def why_missing(self, name: str) -> str:
        """Why preset `name` has no result: skipped, failed, unfinished or not run."""
        if name in self._damaged:
            return f"unreadable: {self._damaged[name]}"
        record = self.state.get("runs", {}).get(name)
        if record and record.get("status") in ("skipped", "failed"):
            return f"{record['status']}: {record.get('note', '')}"
        if (self.root / name / "config.toml").is_file():
            again = f"`{self.state['command']}`" if self.state.get("command") else "the same `cifarlab reproduce`"
            if (self.root / name / "checkpoints" / "last.pt").is_file():
                return f"unfinished: run {again} again to resume it"
            return f"unfinished, nothing saved yet: run {again} again to train it anew"
        only = self.state.get("only")
        if only is not None and self.presets[name].study not in {GROUPS.get(g) for g in only}:
            return "not run (left out by --only)"
        return "not run"

    def analysis_problem(self, name: str) -> str | None:
        return self.state.get("runs", {}).get(name, {}).get("analysis")

    def made_otherwise(self, name: str, made: dict) -> str:
        """How an analysis (an OvR result, a t-SNE's meta) was made otherwise than reproduce makes
        it, as a note: from an earlier checkpoint than the run's last, with another shuffle seed,
        or on other images than the study's (a `cifarlab ovr/tsne` by hand); "" if it was not."""
        from cifarlab.reproduce import ANALYSIS_SEED

        notes = []
        step, last = made.get("checkpoint"), self.summary(name).get("steps")
        if step is not None and last is not None and step != last:
            notes.append(f"from the checkpoint of step {step:,}, not the last ({last:,})")
        if made.get("seed", ANALYSIS_SEED) != ANALYSIS_SEED:
            notes.append(f"with --seed {made['seed']}, not {ANALYSIS_SEED}")
        study_data = self.state.get("data", {}).get("source")
        if made.get("data") and study_data and made["data"] != study_data:
            notes.append(f"on other images ({made['data']}) than the study's")
        return "; ".join(notes) + (": rerun `cifarlab reproduce` to make it as the report does" if notes else "")

    def why_no_ovr(self, name: str, layers: str) -> str:
        """Why a run has no OvR number: no run, a failed analysis, or none made yet."""
        if not self.summary(name):
            return self.why_missing(name)
        return self.analysis_problem(name) or f"no OvR yet: `cifarlab ovr {shlex.quote(str(self.root / name))} --layer {layers}`"

    def step_scales(self) -> dict[str, tuple[float, int, int]]:
        """Per study: (scale, our steps, the report's steps) from the runs' own configs, since
        studies may have been reproduced at different --steps-scale."""
        found: dict[str, set] = {}
        for name in self.present:
            steps = self._planned_steps.get(name, self.config(name).get("steps"))
            full = self.presets[name].config().steps
            if steps:
                found.setdefault(self.presets[name].study, set()).add((round(steps / full, 6), steps, full))
        # the scale furthest from 1 speaks for the study, so one full run cannot hide quick ones
        return {study: max(values, key=lambda v: abs(v[0] - 1)) for study, values in found.items()}

    def changes(self, name: str) -> dict[str, tuple]:
        """{setting: (this run's value, the preset's)} where the run was trained otherwise than its
        preset says (reproduce --set), read from the run's own config.toml."""
        cfg, preset = self.config(name), self.presets[name].config().to_dict()
        study = self.presets[name].study
        return {key: (cfg[key], value) for key, value in preset.items()
                if key not in _SAID_ELSEWHERE and key in cfg and cfg[key] != value
                and study_reads(study, key)}  # not val_tuples of a ConvNet run, say

    def common_changes(self) -> tuple[dict, list[str]]:
        """(the changed settings every run here shares, with their value; the runs changed at all).
        From the runs themselves, since reproduce calls may --set differently."""
        changed = {name: self.changes(name) for name in self.present}
        changed = {name: c for name, c in changed.items() if c}
        if len(changed) < len(self.present) or not changed:
            return {}, list(changed)
        first, *rest = changed.values()
        common = {k: v[0] for k, v in first.items() if all(k in c and c[k][0] == v[0] for c in rest)}
        return common, list(changed)

    def override_note(self, name: str) -> str:
        """What this preset's run was trained with other than the preset says (reproduce --set):
        the runs of an ablation may then be one and the same run, which the row should say."""
        changed = [f"{key} {ours!r} (the preset's {value!r})" for key, (ours, value) in self.changes(name).items()]
        return f"run with {', '.join(changed)}" if changed else ""

    def backbone_note(self, name: str) -> str:
        used = self.config(name).get("backbone")
        wanted = self.presets[name].settings.get("backbone")
        return f"on {used} (the seed used {wanted})" if used and wanted and used != wanted else ""


# Settings a row's override note leaves out: where and how a run ran, and what other notes say
# (the step counts: the scale banner and the K of the note; the backbone: backbone_note).
_SAID_ELSEWHERE = {*NOT_COMPARED, "study", "steps", "eval_every", "checkpoint_every", "refine_after", "backbone"}


def _steps_note(summary: dict, refine_after: int | None = None) -> str:
    """'N steps' (or the step K refining began at: scaled with the steps, it says which K a run
    had) and the best test accuracy."""
    note = counted(summary['steps'], "step", ",")
    if refine_after is not None and 0 <= refine_after < summary["steps"]:
        note = f"refined from step {refine_after:,} of {summary['steps']:,}"
    if summary.get("best_test_accuracy") is not None:
        note += f"; best {summary['best_test_accuracy']:.4f} at step {summary['best_test_step']:,}"
    return note


def build_tables(data: ReportData) -> list[Table]:
    by_study: dict[str, list[Preset]] = {}
    for preset in data.presets.values():
        by_study.setdefault(preset.study, []).append(preset)

    def accuracy_row(p: Preset, group: str = "") -> Row:
        s = data.summary(p.name)
        refine = data.config(p.name).get("refine_after") if p.study == "transfer" else None
        notes = [_steps_note(s, refine_after=refine) if s else data.why_missing(p.name), data.backbone_note(p.name),
                 data.override_note(p.name)]
        if p.seed_value is None:
            notes.insert(0, "the report gives no number for this run")
        return Row(p.reproduces, p.seed_value, s.get("final_test_accuracy"), "; ".join(n for n in notes if n), group)

    def accuracy_rows(presets: list[Preset]) -> list[Row]:
        return [accuracy_row(p) for p in sorted(presets, key=_preset_order)]

    def study1_rows(presets: list[Preset]) -> list[Row]:
        """Rows grouped as the seed's tables: each seed section's rows, its baseline row repeated
        (with a short note: the full one is on the run's own row)."""
        by_name = {p.name: p for p in presets}
        rows = []
        for section, members in STUDY1_SECTIONS:
            for name, baseline in members:
                if name in by_name:
                    row = accuracy_row(by_name[name], section)
                    if baseline is not None:
                        row.experiment, row.note = baseline, f"the {name} run again (its own row is above)"
                    rows.append(row)
        placed = {name for _, members in STUDY1_SECTIONS for name, _ in members}
        rest = sorted((p for p in presets if p.name not in placed), key=_preset_order)  # a preset no seed table has
        return rows + [accuracy_row(p, "Other runs") for p in rest]

    n_test = f"{data.state['data']['test']:,}" if "data" in data.state else "the"
    tables = [Table("Study 1: the ConvNet's test accuracy (sections 1 to 1.3.2)",
                    f"Test accuracy on all {n_test} test images after the last step; the seed's numbers are "
                    "its final values. One table per table of the seed, each with its baseline row.",
                    study1_rows(by_study.get("classifier", [])))]

    ours_ovr, seed_ovr = _ovr_protocol()
    ref_summary = data.summary(REFERENCE_RUN)
    layer_rows = []
    for layer, seed in SEED_LAYER_OVR.items():
        res = data.ovr(REFERENCE_RUN, layer) if ref_summary else None
        if res:
            counts = f"{res['n_fit']:,} fit / {res['n_score']:,} scored, {res['fit_seconds']:.1f} s"
            note = "; ".join(n for n in (counts, _not_converged(res),
                                         data.made_otherwise(REFERENCE_RUN, res)) if n)
        else:
            note = data.why_no_ovr(REFERENCE_RUN, "all")
        layer_rows.append(Row(f"{layer} features", seed, res["accuracy"] if res else None, note,
                              caveat=_caveat(res)))
    tables.append(Table(
        "Section 1.4.1: one-vs-rest linear classifiers on the ConvNet's features",
        f"Features of the {REFERENCE_RUN} run on the test set, shuffled once, the first 80% fit and the last 20% "
        f"scored, as the seed split them, but on all {n_test} test images (the seed used 5,000 of the 10,000: "
        f"4,000 fit, 1,000 scored). The classifier is not the seed's: {ours_ovr}; the seed's: {seed_ovr}.",
        layer_rows))

    siamese_rows = []
    for p in sorted(by_study.get("siamese", []), key=_preset_order):
        s = data.summary(p.name)
        res = data.ovr(p.name, "embedding") if s else None
        if res:
            note = counted(s['steps'], "step", ",")
            if s.get("best_test_accuracy") is not None:
                cfg = data.config(p.name)
                baseline, rule = baseline_accuracy("siamese", cfg.get("fraction_same", Config.fraction_same),
                                                   cfg.get("batch_size", Config.batch_size))
                note += (f"; same-class rule on test tuples (a pair accuracy, not OvR): {s['final_test_accuracy']:.4f}, "
                         f"best {s['best_test_accuracy']:.4f} at step {s['best_test_step']:,} ({rule} scores "
                         f"{baseline:.2f})")
            note = "; ".join(n for n in (note, _not_converged(res),
                                         data.made_otherwise(p.name, res)) if n)
        else:
            note = data.why_no_ovr(p.name, "embedding")
        note = "; ".join(n for n in (note, data.override_note(p.name)) if n)
        siamese_rows.append(Row(p.reproduces, p.seed_value, res["accuracy"] if res else None, note,
                                caveat=_caveat(res)))
    tables.append(Table("Section 2.5: one-vs-rest on the Siamese embedding",
                        "The 192-d L2-normalised embedding of the test set, split and classified as in section "
                        "1.4.1 above: standardised features and liblinear's LinearSVC, not the seed's "
                        "SVC(kernel='linear') on the raw features.", siamese_rows))
    tables.append(Table("Section 3.3: transfer learning, test accuracy",
                        "A pretrained backbone to pool5 under the ConvNet's fc head; feature extraction "
                        "(backbone frozen) and refining the whole network from step K.",
                        accuracy_rows(by_study.get("transfer", []))))
    return [t.shorten_shared_notes() for t in tables]


def _ovr_protocol() -> tuple[str, str]:
    """(ours, the seed's) one-vs-rest classifier in words, from the settings analysis uses."""
    from cifarlab.analysis import LINEAR_SVM_MAX_ITER, LINEAR_SVM_TOL

    return (f"each feature standardised (StandardScaler), then liblinear's LinearSVC (one-vs-rest, squared hinge "
            f"loss, C = 1/d for d-wide features, tol {LINEAR_SVM_TOL:g}, at most {LINEAR_SVM_MAX_ITER:,} passes)",
            "OneVsRestClassifier(SVC(kernel='linear')), libsvm's hinge loss with C = 1 on the raw features")


def _caveat(res: dict | None) -> str:
    """What our OvR number's cell says beside it: an unconverged fit is not the classifier's best."""
    return "did not converge" if res and res.get("converged") is False else ""


def _not_converged(res: dict) -> str:
    return "the solver stopped at its iteration cap before converging" if _caveat(res) else ""


def _preset_order(p: Preset) -> tuple:
    order = ["classifier-b128", "classifier-b128-wd0.005", "classifier-b128-dropout0.5", "classifier-b128-dropout0.2",
             "classifier-b64", "classifier-b64-wd0.01", "classifier-b64-wd0.005", "classifier-b64-dropout0.5",
             "classifier-b64-dropout0.2", "transfer-features", "transfer-refine", "transfer-refine-100",
             "transfer-refine-1000", "transfer-refine-2500"]
    return (order.index(p.name) if p.name in order else len(order), p.name)


# The seed's figures: (title, caption, presets overlaid).
CURVE_FIGURES = [
    ("Figure 1", "Batch 128, no regularisation: accuracy (left) and loss (right), train and test.",
     ["classifier-b128"]),
    ("Figure 2", "Batch 128: weight decay 0.005 on fc1/fc2 against none.", ["classifier-b128", "classifier-b128-wd0.005"]),
    ("Figure 3", "Batch 128: dropout 0.5 and 0.2 on fc1/fc2 against none.",
     ["classifier-b128", "classifier-b128-dropout0.5", "classifier-b128-dropout0.2"]),
    ("Figure 4", "Batch 64 against batch 128.", ["classifier-b128", "classifier-b64"]),
    ("Figure 5", "Batch 64: weight decay 0.01 and 0.005 against none.",
     ["classifier-b64", "classifier-b64-wd0.01", "classifier-b64-wd0.005"]),
    ("Figure 6", "Batch 64: dropout 0.5 and 0.2 against none.",
     ["classifier-b64", "classifier-b64-dropout0.5", "classifier-b64-dropout0.2"]),
    ("Figure 8", "Siamese experiment 1 (loss 1, anchor batches): train, validation and test loss; accuracy is the "
     "same-class rule d < threshold on the fixed tuples.", ["siamese-exp1"]),
    ("Figure 9", "Siamese loss 1 against loss 2 (anchor batches).", ["siamese-exp1", "siamese-exp2"]),
    ("Figure 10", "Siamese anchor batches against random batches (loss 2).", ["siamese-exp2", "siamese-exp3"]),
    ("Transfer", "Section 3.3: feature extraction and refining after K steps (the seed's Figures 13 and 14 show "
     "its transfer runs; its Figure 12 is a diagram of the graph, not a result).",
     ["transfer-features", "transfer-refine", "transfer-refine-100", "transfer-refine-1000", "transfer-refine-2500"]),
]
TSNE_FIGURES = [
    ("Figure 7", "t-SNE of the test features of flatten, fc1 and fc2 (reference run), coloured by class.",
     [(REFERENCE_RUN, "flatten"), (REFERENCE_RUN, "fc1"), (REFERENCE_RUN, "fc2")]),
    ("Figure 11", "t-SNE of the Siamese embedding of the test set: experiments 1, 2 and 3.",
     [("siamese-exp1", "embedding"), ("siamese-exp2", "embedding"), ("siamese-exp3", "embedding")]),
]
_ORDER = ["Figure 1", "Figure 2", "Figure 3", "Figure 4", "Figure 5", "Figure 6", "Figure 7", "Figure 8",
          "Figure 9", "Figure 10", "Figure 11", "Transfer"]


def build_figures(data: ReportData, folder: Path) -> list[Figure]:
    from cifarlab.analysis import plot_tsne, read_tsne
    from cifarlab.plots import plot_curves

    figures = []
    for title, caption, names in CURVE_FIGURES:
        have = [n for n in names if data.metrics(n)]
        missing = [n for n in names if n not in have]
        reasons: dict[str, list[str]] = {}  # runs that share a reason (a skipped backbone's) are named together
        for n in missing:
            reasons.setdefault(data.why_missing(n) if not data.summary(n) else data.no_curves(n), []).append(n)
        note = "".join(f" {', '.join(runs)}: {why}." for why, runs in reasons.items())
        if not have:
            figures.append(Figure(title, caption + " Not drawn:" + note, None, names))
            continue
        # a run cut short is drawn as far as it went, and says so in the legend and the caption
        short = {n: data.unfinished(n) for n in have if data.unfinished(n)}
        labels = [f"{n} ({short[n]})" if n in short else n for n in have]
        png = plot_curves([(label, data.metrics(n)) for label, n in zip(labels, have)],
                          folder / f"{_slug(title)}.png", title=title)
        cut = "".join(f" {n}: {why} (its curves stop there)." for n, why in short.items())
        figures.append(Figure(title, caption + cut + (" Missing:" + note if missing else ""), png, have))
    for title, caption, parts in TSNE_FIGURES:
        panels, labels, classes, notes, metas = [], None, None, [], []
        for name, layer in parts:
            tsne = read_tsne(data.root / name, layer)
            if tsne is None:
                notes.append(f"{name} {layer}: " + (data.why_missing(name) if not data.summary(name)
                                                      else "no t-SNE yet (`cifarlab tsne`)"))
                continue
            if labels is not None and (len(tsne["rows"]) != len(labels) or not np.array_equal(tsne["labels"], labels)):
                notes.append(f"{name} {layer}: embedded other points than the first panel; redo its t-SNE")
                continue
            otherwise = data.made_otherwise(name, tsne["meta"])
            if otherwise:
                notes.append(f"{name} {layer}: {otherwise}")
            labels, classes = tsne["labels"], tsne["meta"]["classes"]
            metas.append(tsne["meta"])
            panels.append((f"{name}: {layer}" if len({n for n, _ in parts}) > 1 else layer, tsne["coords"]))
        note = (" Missing or out of date: " + "; ".join(notes) + ".") if notes else ""
        png = plot_tsne(panels, labels, classes, folder / f"{_slug(title)}.png", title) if panels else None
        how = " " + _tsne_protocol(metas, data.state.get("data", {}).get("test")) if metas else ""
        figures.append(Figure(title, caption + how + note, png, [n for n, _ in parts]))
    return sorted(figures, key=lambda f: _ORDER.index(f.title))


def _tsne_protocol(metas: list[dict], n_test: int | None) -> str:
    """How our t-SNE was made, beside the seed's, from what the panels' files record."""
    first = metas[0]
    points = first.get("points")
    if points is None:
        on = "the test images"
    elif not n_test:  # the test set's size unknown (no readable reproduce.json)
        on = f"{points:,} test images"
    elif points < n_test:
        on = f"{points:,} of the {n_test:,} test images (the same in every panel)"
    else:
        on = f"all {points:,} test images"
    reduced = [m for m in metas if m.get("pca_dims")]
    widths = ", ".join(dict.fromkeys(f"{m.get('layer', '?')} {m.get('input_dims', 0):,}-d" for m in reduced))
    pca = f"; {widths} reduced to {reduced[0]['pca_dims']} dimensions by PCA first" if reduced else ""
    perplexity = f"perplexity {first['perplexity']:g}, " if "perplexity" in first else ""
    return (f"Ours: openTSNE on {on}, {perplexity}PCA initialisation, {TSNE_EXAGGERATED_ITER} early-exaggeration "
            f"then {TSNE_ITER} iterations{pca}. The seed's: {SEED_TSNE}.")


def _slug(title: str) -> str:
    return title.lower().replace(" ", "-")


def run_rows(data: ReportData) -> list[dict]:
    rows = []
    for name, preset in data.presets.items():
        s = data.summary(name)
        record = data.state.get("runs", {}).get(name, {})
        damaged = name in data._damaged  # its config.toml unreadable: listed, not left out
        if not s and not record and name not in data.present and not damaged:
            continue
        # a record of an earlier call may say finished for a run since resumed to more steps
        status = "finished" if s else "unreadable" if damaged else (
            "unfinished" if record.get("status") in (None, "finished") else record["status"])
        rows.append({"run": name, "study": preset.study, "status": status, "steps": s.get("steps"),
                     "device": s.get("device", ""), "wall": s.get("wall_seconds"), "ms": s.get("ms_per_step"),
                     "note": "" if s else ":".join(data.why_missing(name).split(":")[:2])})
    return rows


def environment(data: ReportData) -> list[tuple[str, str]]:
    import torch

    summaries = [data.summary(n) for n in data.present if data.summary(n)]
    devices = sorted({s["device"] for s in summaries if "device" in s})
    torches = sorted({s["torch_version"] for s in summaries if "torch_version" in s})
    versions = sorted({s["cifarlab_version"] for s in summaries if "cifarlab_version" in s})
    info = [("device", ", ".join(devices) or "-"),
            ("torch", ", ".join(torches) or torch.__version__),
            ("cifarlab", ", ".join(versions) or __version__) ]
    d = data.state.get("data")
    if not data.state and (data.root / "reproduce.json").exists():  # read_json gives {} for a damaged file
        info.append(("reproduce.json", "unreadable (damaged, or not JSON): the data and the last call's times are "
                                       "missing here; the next `cifarlab reproduce` into this folder writes it anew"))
    if d:
        source = f" ({d['source']})" if d.get("source") else ""
        info.append(("data", f"{d['layout']} layout{source}, {d['train']:,} train / "
                             f"{d['test']:,} test images; checksum: {d['checksum']}"))
    if data.set_aside:
        info.append(("set aside by reproduce", f"{_listed(data.set_aside)}: attempts that had started without a "
                                               "checkpoint, moved aside when their runs began anew; in no table"))
    common, changed = data.common_changes()
    if common:
        info.append(("changed for every run", changed_settings(common)))
    elif changed:
        info.append(("changed for some runs", ", ".join(changed)))
    total = sum(s.get("wall_seconds", 0) for s in summaries)
    info.append(("training wall time", f"{total:,.1f} s over {counted(len(summaries), 'run')} (each run's own clock, all "
                                       "its resumes included)"))
    if "wall_seconds" in data.state:
        state = data.state
        parts = []
        if "data_seconds" in state:
            parts.append(f"{state['data_seconds']:,.1f} s loading the data")
        if "train_seconds" in state:
            parts.append(f"{state['train_seconds']:,.1f} s of training")
        if "analysis_seconds_after_training" in state:
            parts.append(f"then {state['analysis_seconds_after_training']:,.1f} s for the analysis (made "
                         f"{state['analysis']} the training)")
        split = f": {', '.join(parts)}" if parts else ""
        ended = (f"interrupted at {state.get('finished_at', '')}: run it again to go on" if state.get("interrupted")
                 else f"finished {state.get('finished_at', '')}")
        info.append(("last reproduce call", f"{state['wall_seconds']:,.1f} s, {counted(state.get('jobs', 1), 'job')} at a "
                                            f"time{split}; {ended}"))
    info.append(("report written", dt.datetime.now().isoformat(timespec="seconds")))
    return info


_RUN_COLUMNS = ("run", "study", "status", "steps", "device", "wall", "ms", "note")
_NUMERIC = {"steps", "wall", "ms"}


def _run_cells(r: dict) -> dict[str, str]:
    """A run row as display strings (blank where a run has no summary yet)."""
    cells = {k: str(r[k]) for k in _RUN_COLUMNS}
    for key, pattern in (("steps", "{:,}"), ("wall", "{:,.1f}"), ("ms", "{:.1f}")):
        cells[key] = "" if r[key] is None else pattern.format(r[key])
    return cells


def _ours_cell(row: Row) -> str:
    return _fmt(row.ours) + (f" ({row.caveat})" if row.caveat else "")


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


STUDY_NAMES = {"classifier": "ConvNet", "siamese": "Siamese", "transfer": "transfer"}


def changed_settings(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


# reproduce's flag for a setting it takes other than by --set
FLAG_OF = {"backbone_weights": "--backbone-weights"}


def _how_changed(keys) -> str:
    return ", ".join(f"`{flag}`" for flag in sorted({FLAG_OF.get(key, "--set") for key in keys}))


def settings_warning(data: ReportData) -> str | None:
    common, changed = data.common_changes()
    if common:
        return (f"Every run was trained with settings changed from the report's: {changed_settings(common)} "
                f"({_how_changed(common)}); numbers beside the seed's may differ for that reason.")
    if changed:
        keys = {key for name in changed for key in data.changes(name)}
        return (f"Some runs were trained with settings changed from the report's ({_how_changed(keys)}): "
                f"{', '.join(changed)}; their rows say which, and their numbers beside the seed's may differ "
                "for that reason.")
    return None


def scale_warning(scales: dict[str, tuple[float, int, int]]) -> str | None:
    shortened = {study: v for study, v in scales.items() if abs(v[0] - 1) > 1e-9}
    if not shortened:
        return None
    parts = [f"{STUDY_NAMES.get(study, study)} runs x{scale:g} ({steps:,} instead of {full:,} steps)"
             for study, (scale, steps, full) in shortened.items()]
    return (f"QUICK VERSION: step counts are scaled: {'; '.join(parts)}. Its numbers show that everything "
            f"runs; they are not comparable with the seed's. Run `cifarlab reproduce --steps-scale 1` for "
            f"the real study.")


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def not_presets_warning(data: ReportData) -> str | None:
    """Runs in the folder that no table or figure shows: the reader should not think them in it."""
    if not data.not_presets:
        return None
    return (f"Not in this report: {_listed(data.not_presets)}, in the same folder but none of the report's "
            f"presets; `cifarlab compare {data.root}` shows them beside the presets.")


def same_runs_warning(data: ReportData) -> str | None:
    """Presets that were trained with one and the same settings (a small --steps-scale makes the
    refine steps K of 100, 1,000 and 2,500 one step; --set can make ablations equal): their rows
    are one run's result several times, which the reader must be told."""
    groups: dict[str, list[str]] = {}
    for name in data.present:
        cfg = data.config(name)
        if cfg:
            key = repr(sorted((k, v) for k, v in cfg.items() if k != "about" and (k not in NOT_IDENTITY or k == "steps")))
            groups.setdefault(key, []).append(name)
    same = [names for names in groups.values() if len(names) > 1]
    if not same:
        return None
    return ("SAME RUNS: " + "; ".join(", ".join(names) for names in same) +
            " were trained with the same settings here, so their numbers are one run's; at --steps-scale 1 "
            "(and without such --set) they differ as in the report.")


# --- writers ------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.warning { background: #fff3cd; border: 2px solid #d39e00; padding: 0.8em 1em; font-weight: bold; }
table { border-collapse: collapse; margin: 0.6em 0 0.3em; width: 100%; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } table.results th:first-child { width: 36%; }
table.results th:nth-child(2), table.results th:nth-child(3), table.results th:nth-child(4) { width: 7%; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.up { color: #1a7f37; } td.down { color: #b3261e; } .caption { color: #555; font-size: 0.9em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; } .missing { color: #888; font-style: italic; }
"""


def render_html(tables: list[Table], figures: list[Figure], runs: list[dict], env: list[tuple[str, str]],
                warnings: list[str]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>cifarlab: the CIFAR-10 study reproduced</title>", f"<style>{CSS}</style></head><body>",
           "<h1>The CIFAR-10 study, reproduced by cifarlab</h1>"]
    out += [f'<p class="warning">{e(warning)}</p>' for warning in warnings]
    out.append("<h2>Environment</h2><table>")
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in env]
    out.append("</table>")
    for table in tables:
        out.append(f"<h2>{e(table.title)}</h2><p class=\"caption\">{e(table.caption)}</p>")
        for group, rows in table.sections():
            if group:
                out.append(f"<h3>{e(group)}</h3>")
            out.append("<table class=\"results\"><tr><th>experiment</th><th>seed</th><th>ours</th><th>difference</th>"
                       "<th>note</th></tr>")
            for row in rows:
                diff = row.difference
                cls = "num" + ("" if diff is None else (" up" if diff >= 0 else " down"))
                out.append(f"<tr><td>{e(row.experiment)}</td><td class=\"num\">{_fmt(row.seed)}</td>"
                           f"<td class=\"num\">{e(_ours_cell(row))}</td><td class=\"{cls}\">{_fmt(diff, True)}</td>"
                           f"<td>{e(row.note)}</td></tr>")
            out.append("</table>")
        out += [f'<p class="caption">Note {i}: {e(note)}</p>' for i, note in enumerate(table.notes, 1)]
    out.append("<h2>Figures</h2>")
    for fig in figures:
        out.append(f"<figure id=\"{_slug(fig.title)}\"><h3>{e(fig.title)}</h3>")
        if fig.png is not None:
            data = base64.b64encode(Path(fig.png).read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(fig.title)}" src="data:image/png;base64,{data}">')
        else:
            out.append('<p class="missing">not drawn</p>')
        out.append(f"<figcaption>{e(fig.caption)}</figcaption></figure>")
    out.append("<h2>Runs</h2><table><tr><th>run</th><th>study</th><th>status</th><th>steps</th><th>device</th>"
               "<th>wall s</th><th>ms/step</th><th>note</th></tr>")
    for r in map(_run_cells, runs):
        out.append("<tr>" + "".join(f'<td class="num">{e(r[k])}</td>' if k in _NUMERIC else f"<td>{e(r[k])}</td>"
                                    for k in _RUN_COLUMNS) + "</tr>")
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"


_MD_ENTITY = re.compile(r"&(?=#?[0-9A-Za-z]+;)")


def _md_text(text: str) -> str:
    """Text as Markdown shows it as written: a `<` that would open an HTML tag, or an `&` that
    would make an entity (a run name, a skip reason's `<file>`), backslash-escaped."""
    return _MD_ENTITY.sub(r"\\&", text.replace("<", "\\<"))


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(tables: list[Table], figures: list[Figure], runs: list[dict], env: list[tuple[str, str]],
                    warnings: list[str], root: Path) -> str:
    out = ["# The CIFAR-10 study, reproduced by cifarlab", ""]
    for warning in warnings:
        out += [f"> **{_md_text(warning)}**", ""]
    out += ["## Environment", "", "| | |", "|---|---|", *(f"| {k} | {_md_cell(v)} |" for k, v in env), ""]
    for table in tables:
        out += [f"## {table.title}", "", _md_text(table.caption), ""]
        for group, rows in table.sections():
            if group:
                out += [f"### {_md_text(group)}", ""]
            out += ["| experiment | seed | ours | difference | note |", "|---|---:|---:|---:|---|"]
            out += [f"| {_md_cell(r.experiment)} | {_fmt(r.seed)} | {_md_cell(_ours_cell(r))} | "
                    f"{_fmt(r.difference, True)} | {_md_cell(r.note)} |" for r in rows]
            out.append("")
        out += [f"Note {i}: {_md_text(note)}\n" for i, note in enumerate(table.notes, 1)]
    out += ["## Figures", ""]
    for fig in figures:
        out.append(f"### {_md_text(fig.title)}")
        out.append("")
        if fig.png is not None:
            out += [f"![{fig.title}]({Path(fig.png).relative_to(root).as_posix()})", ""]
        out += [_md_text(fig.caption), ""]
    out += ["## Runs", "", "| run | study | status | steps | device | wall s | ms/step | note |",
            "|---|---|---|---:|---|---:|---:|---|"]
    for r in map(_run_cells, runs):
        out.append("| " + " | ".join(_md_cell(r[k]) for k in _RUN_COLUMNS) + " |")
    return "\n".join(out) + "\n"


REPORT_FILES = {"report.html": "<title>cifarlab: ", "report.md": "# The CIFAR-10 study, reproduced by cifarlab"}


def check_report_files(root: Path) -> None:
    """Refuse a folder whose report.html or report.md cifarlab did not write (a user's own file
    of that name would be replaced): checked before a reproduce trains, and before writing."""
    for name, mark in REPORT_FILES.items():
        path = Path(root) / name
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                head = f.read(2000)
            if mark not in head:
                raise CifarlabError(f"{path}: exists and was not written by cifarlab; move it away or "
                                    "choose another folder for the report")
    from cifarlab.plots import PNG_MARK

    for title, *_ in CURVE_FIGURES + TSNE_FIGURES:  # the figures it draws carry its mark
        path = Path(root) / FIGURE_DIR / f"{_slug(title)}.png"
        if path.is_file():
            with open(path, "rb") as f:
                head = f.read(400)
            if PNG_MARK.encode() not in head:
                raise CifarlabError(f"{path}: exists and was not drawn by cifarlab; move it away or "
                                    "choose another folder for the report")


def write_report(root: str | Path) -> tuple[Path, Path]:
    """Draw the figures into DIR/figures/ and write DIR/report.html and DIR/report.md."""
    check_report_files(Path(root))
    data = ReportData(Path(root))
    folder = data.root / FIGURE_DIR
    tables, figures = build_tables(data), build_figures(data, folder)
    runs, env = run_rows(data), environment(data)
    warnings = [w for w in (scale_warning(data.step_scales()), settings_warning(data),
                            same_runs_warning(data), not_presets_warning(data)) if w]
    html_path, md_path = data.root / "report.html", data.root / "report.md"
    write_text(html_path, render_html(tables, figures, runs, env, warnings))
    write_text(md_path, render_markdown(tables, figures, runs, env, warnings, data.root))
    return html_path, md_path
