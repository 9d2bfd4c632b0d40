"""Figures: the report's accuracy/loss curves (its Figures 1-6), for one run or several overlaid."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cifarlab.fileio import write_with  # noqa: E402

SPLIT_STYLE = {"train": dict(linestyle="-", alpha=0.55), "val": dict(linestyle=":", marker="s", ms=3),
               "test": dict(linestyle="--", marker="o", ms=3)}


def image_formats() -> list[str]:
    """The file types savefig writes (png, pdf, svg, ...), by suffix; pgf only where the TeX
    program it runs is installed."""
    import shutil

    from matplotlib.backend_bases import FigureCanvasBase

    types = FigureCanvasBase.get_supported_filetypes()
    return sorted(t for t in types if t != "pgf" or shutil.which(matplotlib.rcParams["pgf.texsystem"]))


def text_as_typed(draw):
    """Draw with the user's text (run labels, titles, class names) shown as typed: matplotlib
    would read `$...$` in it as math (and fail on `a$b`)."""
    @functools.wraps(draw)
    def drawing(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawing


def run_colours(n: int) -> list[tuple]:
    """A colour per run, all different: tab10's, tab20's beyond 10 runs, a rainbow beyond 20."""
    if n <= 20:
        cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
        return [cmap(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


# More legend entries than this (a run and split each) go into one legend beside the panels.
LEGEND_IN_PANEL = 8
PANELS_WIDTH = 12  # inches of the two panels, a legend beside them not counted


@text_as_typed
def plot_curves(series: list[tuple[str, list[dict]]], out: Path, title: str | None = None,
                note: str | None = None) -> Path:
    """Accuracy (left) and loss (right) against step, train and test, one colour per run; `note`
    (a caveat the reader of the figure must see) in red under the title."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(PANELS_WIDTH, 4.5))
    colours = run_colours(len(series))
    lines, labels = [], []  # given to legend() as they are: it would leave out a label starting with "_"
    for i, (label, rows) in enumerate(series):
        splits = [s for s in ("train", "val", "test") if any(r["split"] == s for r in rows)]
        for split in splits:
            pts = sorted((r["step"], r["accuracy"], r["loss"]) for r in rows if r["split"] == split)
            steps = [p[0] for p in pts]
            style = dict(color=colours[i], label=f"{label} {split}", **SPLIT_STYLE.get(split, {}))
            if len(pts) < 3:  # a line of one point is not drawn: mark the points
                style["marker"] = "o"
            lines += ax_acc.plot(steps, [p[1] for p in pts], **style)
            labels.append(style["label"])
            ax_loss.plot(steps, [p[2] for p in pts], **style)
    beside = len(labels) > LEGEND_IN_PANEL  # one legend right of the panels: inside, it would hide the curves
    for ax, what in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("step")
        ax.set_title(what, fontsize=10)  # above the panel: long tick labels cannot push it off the figure
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if lines and not beside:
            ax.legend(lines, labels, fontsize=8)
    legend_room = 0.0  # inches right of the panels
    if beside:
        legend = fig.legend(lines, labels, fontsize=8, loc="center right", bbox_to_anchor=(1, 0.5),
                            ncols=1 + (len(labels) - 1) // 30, borderaxespad=0.8)
        # as wide as its labels are long: the panels keep their width, the figure grows by the legend's
        legend_room = legend.get_window_extent().width / fig.dpi + 0.3
        fig.set_figwidth(PANELS_WIDTH + legend_room)
    if title:
        fig.suptitle(title, y=0.985 if note else 0.98)
    if note:
        fig.text(0.5, 0.905 if title else 0.96, f"Note: {note}", ha="center", va="center", fontsize=9,
                 color="#b3261e", wrap=True)
    # fixed margins for this fixed layout: tight_layout measured every label and cost a third of
    # the drawing time, paid at the end of every run
    top = 0.92 - 0.06 * bool(title) - 0.05 * bool(note)
    width = fig.get_figwidth()
    fig.subplots_adjust(left=0.84 / width, right=1 - (0.18 + legend_room) / width, bottom=0.11, top=top, wspace=0.2)
    out = save_figure(fig, out)
    plt.close(fig)
    return out


# In every PNG cifarlab draws: `report` replaces only figures that carry it.
PNG_MARK = "cifarlab"


def save_figure(fig, out: Path) -> Path:
    """fig to `out` atomically, at the resolution of every cifarlab figure; a PNG is marked as
    cifarlab's (its Software text)."""
    out = Path(out)
    metadata = {"Software": f"{PNG_MARK} (matplotlib {matplotlib.__version__})"} if out.suffix.lower() == ".png" else None
    write_with(out, lambda tmp: fig.savefig(tmp, dpi=110, metadata=metadata))
    return out
