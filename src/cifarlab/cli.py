"""The `cifarlab` command line."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from cifarlab import CifarlabError, counted

# rich_markup_mode=None: help texts are plain text, so "[default: 15000; ...]" and
# "cifarlab[lite0]" show as written instead of being taken for markup tags and dropped
app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Reproduce and extend a classic CIFAR-10 study: ConvNet, Siamese and transfer learning.",
)
train_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Train one run of a study.")
app.add_typer(train_app, name="train")

DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", help="CIFAR-10 location (a folder holding cifar-10-python.tar.gz, cifar-10-batches-py/ "
    "or train/ + test/ image folders). Default: $CIFARLAB_DATA, else ~/.cache/cifarlab.")]


@app.command()
def data(
    data: DataOpt = None,
    download: Annotated[bool, typer.Option(help="Download the official archive if no data is found.")] = True,
) -> None:
    """Find (or download) CIFAR-10 and print its layout, counts per split and class, checksum and cache."""
    from cifarlab.data import describe, load_cifar10

    print(describe(load_cifar10(data, download=download)))


def _shared_train_flags(
    steps: Annotated[Optional[int], typer.Option(
        help="Training steps (Adam updates). [default: 15000; siamese 50000; transfer 10000]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images (or pairs) per step. [default: 128]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate. [default: 1e-4]")] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        help="Evaluate (classifier, transfer: the full test set; Siamese: the --val-tuples batches of val and test) and log the running train mean every N steps. [default: 1000]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Save weights + resume state every N steps (and at the end). [default: 5000]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of init, shuffling, pairs and dropout. [default: 42]")] = None,
    dropout: Annotated[Optional[float], typer.Option(
        help="Drop probability after fc1 and fc2 while training (the report's 'dropout 0.2' keeps 80%). [default: 0]")] = None,
    init: Annotated[Optional[str], typer.Option(help="Weight init: normal (N(0, 0.001), the seed's) or xavier.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="Hold out the last fraction of train as a validation split. [default: 0; siamese 0.2]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda. [default: auto]")] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="fp32, or bf16 (autocast): for GPUs, and CPUs that compute bf16 natively "
        "(AVX-512 BF16, AMX: the ConvNet 1.7x faster on one, Lite0 slower; see README). [default: fp32]")] = None,
    memory_format: Annotated[Optional[str], typer.Option(
        help="auto (= channels_last, measured faster on CPU and GPU), channels_last or contiguous.")] = None,
    cuda_graph: Annotated[Optional[bool], typer.Option(
        "--cuda-graph/--no-cuda-graph", help="On CUDA, replay the whole step as one CUDA graph. [default: on]")] = None,
    compile: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", help="Run the step's forward and backward as torch.compile'd code (its first step "
        "compiles, half a minute or more; measured slower on a CPU, see README). [default: off]")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option(
        "--tensorboard/--no-tensorboard", help="Write TensorBoard events to RUN/tb. [default: on]")] = None,
    distributed: Annotated[Optional[bool], typer.Option(
        "--distributed", help="One of several processes started by torchrun: data-parallel (DDP) training, "
        "the batch split over the processes, rank 0 writes the run. See README, 'Several GPUs'.")] = None,
    data: DataOpt = None,
    preset: Annotated[Optional[str], typer.Option(
        help="Start from a named preset (`cifarlab presets`); flags given here override it.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory. [default: runs/<study>-<time>]")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue this run from its checkpoints/last.pt with its own settings (config.toml); only how long, where and how it runs may change here (--steps, --data of the same images, --device, --compile, --cuda-graph, --memory-format, --feature-cache, --tensorboard); precision, intervals and the recipe stay.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """The flags every study's train command takes (see study_command)."""


_RUN_FLAGS = ("preset", "out", "resume", "quiet")


def study_command(study: str):
    """Register a train command for `study`: its own flags (the decorated function's parameters)
    plus the shared ones. Every flag but --preset/--out/--resume/--quiet is a Config field."""

    def decorate(fn):
        own = inspect.signature(fn, eval_str=True).parameters
        shared = inspect.signature(_shared_train_flags, eval_str=True).parameters

        def command(**flags):
            run_flags = {name: flags.pop(name) for name in _RUN_FLAGS}
            if flags.get("data") is not None:
                flags["data"] = str(flags["data"])
            _train(study, {k: v for k, v in flags.items() if v is not None}, **run_flags)

        shared = [_with_the_studys_default(param, study) for param in shared.values()]
        command.__signature__ = inspect.Signature([*own.values(), *shared])
        command.__doc__, command.__name__ = fn.__doc__, fn.__name__
        return train_app.command(study)(command)

    return decorate


def _with_the_studys_default(param: inspect.Parameter, study: str) -> inspect.Parameter:
    """A shared flag whose default differs by study ("[default: 15000; siamese 50000; ...]") as
    the study's command shows it: "[default: 50000]" in `train siamese --help`."""
    import copy
    import re

    from cifarlab.config import Config

    base, info = param.annotation.__origin__, param.annotation.__metadata__[0]
    if not re.search(r"\[default: [^]]*;[^]]*\]", info.help or ""):
        return param
    info = copy.copy(info)
    value = getattr(Config.for_study(study), param.name)
    info.help = re.sub(r"\[default: [^]]*\]", f"[default: {value:g}]" if isinstance(value, float) else
                       f"[default: {value}]", info.help)
    return param.replace(annotation=Annotated[base, info])


def _train(study: str | None, flags: dict, preset: str | None, out: str | None, resume: Path | None,
           quiet: bool) -> None:
    from cifarlab.config import Config
    from cifarlab.presets import load_preset
    from cifarlab.train import train

    if resume is not None:
        if out is not None or preset is not None:
            raise CifarlabError("--resume continues a run as it was configured: drop --out and --preset")
        from cifarlab.runs import RunDir

        existing = RunDir.open(resume)
        have = existing.config().study
        if study is not None and have != study:
            raise CifarlabError(f"{resume} is a {have} run; resume it with `cifarlab train {have} --resume {resume}`")
        before = existing.summary()
        run, summary = train(Config(), resume=resume, overrides=flags, progress=not quiet)
        if summary is not None and summary == before:  # a finished run: train() did nothing
            _print_run_result(run, summary, trained=False)
            return
    else:
        if preset is not None:
            chosen = load_preset(preset)
            if study is not None and chosen.study != study:
                raise CifarlabError(f"preset {preset} is a {chosen.study} run; use `cifarlab train {chosen.study}`")
            cfg = chosen.config(**flags)
        else:
            cfg = Config.for_study(study, **flags)
        if cfg.study == "transfer" and cfg.refine_after >= cfg.steps:
            print(f"note: refine_after {cfg.refine_after} is not below steps {cfg.steps}: this run trains the "
                  "head on frozen features only (--refine-after K < --steps refines from step K)", file=sys.stderr)
        run, summary = train(cfg, out=out, name=preset, progress=not quiet)
    if summary is not None:  # None on the ranks other than 0 of a --distributed run
        _print_run_result(run, summary)


@train_app.callback(invoke_without_command=True)
def train_group(
    ctx: typer.Context,
    preset: Annotated[Optional[str], typer.Option(
        help="Train this preset (`cifarlab presets`); the flags of its study's command may follow, e.g. --steps.")] = None,
    # hidden: `train --preset P ...` is run as `train STUDY --preset P ...` (see main), so these two
    # are only here to refuse them before a study's name instead of reporting "no such option"
    out: Annotated[Optional[str], typer.Option(hidden=True)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", hidden=True)] = False,
) -> None:
    """Train one run of a study: `cifarlab train classifier|siamese|transfer [flags]` or `cifarlab train --preset NAME [flags]`."""
    if ctx.invoked_subcommand is not None:
        given = [f"--preset {preset}"] * bool(preset) + [f"--out {out}"] * bool(out) + ["--quiet"] * quiet
        if given:  # the study's command has these options too, and only it uses them
            raise CifarlabError(f"options go after the study's name: "
                                f"`cifarlab train {ctx.invoked_subcommand} {' '.join(given)} ...`")
        return
    if preset is None:
        print(ctx.get_help())
        raise typer.Exit(0)
    _train(None, {}, preset=preset, out=out, resume=None, quiet=quiet)


@study_command("classifier")
def train_classifier(
    weight_decay: Annotated[Optional[float], typer.Option(
        help="Adds WD * sum(W^2)/2 over the fc1 and fc2 weights to the loss (tf.nn.l2_loss, as the seed). [default: 0]")] = None,
):
    """Train the report's ConvNet (study 1) into a run directory: config, metrics, summary,
    TensorBoard events, checkpoints and plots/curves.png."""


@study_command("siamese")
def train_siamese(
    loss: Annotated[Optional[str], typer.Option(
        help="report1: Y d²/2 + (1-Y) max(m-d², 0); report2: Y d² + (1-Y) max(m-d², 0); "
        "hadsell: Y d²/2 + (1-Y) max(m-d, 0)²/2. [default: report1]")] = None,
    margin: Annotated[Optional[float], typer.Option(help="Contrastive margin m. [default: 1.0]")] = None,
    sampler: Annotated[Optional[str], typer.Option(
        help="anchor: one anchor per batch (the report's default); random: random anchors (its alternative). [default: anchor]")] = None,
    fraction_same: Annotated[Optional[float], typer.Option(help="Share of same-class pairs per batch. [default: 0.2]")] = None,
    val_tuples: Annotated[Optional[int], typer.Option(
        help="Fixed anchor-form batches drawn once from the held-out 20% (and from test) for the logged loss. [default: 500]")] = None,
):
    """Train the Siamese ConvNet (study 2): a shared branch to an L2-normalised 192-d embedding,
    contrastive loss, pair sampler; logs train/val/test loss and same-class-rule accuracy."""


@study_command("transfer")
def train_transfer(
    backbone: Annotated[Optional[str], typer.Option(help="vgg16 or efficientnet-lite0. [default: vgg16]")] = None,
    backbone_weights: Annotated[Optional[str], typer.Option(
        help="imagenet (torchvision's VGG-16 file, downloaded and hash-checked; Lite0's ships in "
        "cifarlab[lite0]), a weights file (.pth or the seed's vgg16_weights.npz), or none (random). [default: imagenet]")] = None,
    refine_after: Annotated[Optional[int], typer.Option(
        help="K: train only the head before step K, everything from K on; 0 = refine from the start, "
        "-1 = never (feature extraction). [default: -1]")] = None,
    input_size: Annotated[Optional[int], typer.Option(
        help="Upsample images to this size on the device (a multiple of 32). [default: 32, as the seed]")] = None,
    feature_cache: Annotated[Optional[bool], typer.Option(
        "--feature-cache/--no-feature-cache",
        help="While the backbone is frozen, compute each image's pool5 features once. [default: on]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(
        help="Adds WD * sum(W^2)/2 over the fc1 and fc2 weights to the loss. [default: 0]")] = None,
):
    """Train a pretrained backbone (to pool5) under the ConvNet's fc head (study 3): feature
    extraction, then refining the whole network from step K on."""


@app.command()
def presets() -> None:
    """List the named presets: the report's runs, with the number the seed reported for each."""
    from cifarlab.presets import all_presets

    for p in all_presets():
        seed = f"{p.seed_value:.4f}" if p.seed_value is not None else "  -   "
        print(f"{p.name:<28} {p.study:<11} seed {seed}  {p.reproduces}")


def _print_run_result(run, summary: dict, trained: bool = True) -> None:
    line = f"{'finished' if trained else 'already finished (nothing to train)'} {run.name}: {counted(summary['steps'], 'step')}"
    if summary["final_test_accuracy"] is not None:
        # a Siamese run's accuracy is that of the rule "same class iff the distance is small", on pairs
        from cifarlab.config import baseline_accuracy

        cfg = run.config()
        what = "test pair accuracy" if cfg.study == "siamese" else "test accuracy"
        # most Siamese pairs are of different classes: say what answering that always scores
        baseline, rule = baseline_accuracy(cfg.study, cfg.fraction_same, cfg.batch_size)
        line += (f", {what} {summary['final_test_accuracy']:.4f} (best {summary['best_test_accuracy']:.4f} at step "
                 f"{summary['best_test_step']}" + (f"; {rule} scores {baseline:.2f})" if cfg.study == "siamese" else ")"))
    print(f"{line}, {summary['ms_per_step']:.2f} ms/step on {summary['device']}")
    print(f"  run directory  {run.path}")
    for what, rel in (("metrics", "metrics.csv"), ("summary", "summary.json"), ("curves", "plots/curves.png"),
                      ("checkpoints", "checkpoints/"), ("tensorboard", "tb/")):
        if (run.path / rel).exists():
            print(f"  {what:<14} {run.path / rel}")


@app.command("eval")
def eval_run(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    checkpoint: Annotated[Optional[int], typer.Option(help="Step of the checkpoint to evaluate. [default: latest]")] = None,
    data: DataOpt = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda. [default: the run's]")] = None,
) -> None:
    """Evaluate a run's checkpoint on its evaluation splits (loss and accuracy)."""
    from cifarlab.engine import make_autocast, resolve_device
    from cifarlab.runs import RunDir
    from cifarlab.studies import build_task

    rundir = RunDir.open(run)
    cfg = rundir.config()
    if data is not None:
        cfg = cfg.replace(data=str(data))
    dev = resolve_device(device or cfg.device)
    autocast = make_autocast(cfg.precision, dev)
    task = build_task(cfg, dev, autocast, for_checkpoint=True, training=False)
    step = rundir.load_weights(task.model, checkpoint)
    task.model.eval()
    note = rundir.other_images_note(task.data_digest, data) if data is not None else None
    if note:
        print(f"note: {note}; the numbers below are for them (less the mean image of their own train "
              "split, as in training)")
    for split, (loss, acc) in task.evaluate().items():
        print(f"{rundir.name} step {step} {split}: loss {loss:.4f} accuracy {acc:.4f}")


@app.command()
def plot(
    runs: Annotated[List[Path], typer.Argument(help="One or more run directories.")],
    out: Annotated[Path, typer.Option(help="Image file to write: .png (or .pdf, .svg, ...).")],
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated legend labels, one per run.")] = None,
    title: Annotated[Optional[str], typer.Option(help="Figure title.")] = None,
) -> None:
    """Overlay the accuracy and loss curves of several runs (the report's Figures 3-6)."""
    from cifarlab.fileio import writing_user_path
    from cifarlab.plots import image_formats, plot_curves
    from cifarlab.runs import RunDir

    if out.suffix.lower().lstrip(".") not in image_formats():
        raise CifarlabError(f"--out {out}: not an image file name; end it in one of "
                            f"{', '.join('.' + f for f in image_formats())}")
    names = [label.strip() for label in labels.split(",")] if labels else [Path(r).name for r in runs]
    if len(names) != len(runs):
        raise CifarlabError(f"--labels has {counted(len(names), 'name')} for {counted(len(runs), 'run')}; give one per run")
    twice = sorted({str(r) for r in runs if sum(Path(x).resolve() == Path(r).resolve() for x in runs) > 1})
    if twice:
        print(f"note: {', '.join(twice)} given more than once: its curves are drawn over each other",
              file=sys.stderr)
    series, studies = [], set()
    for name, path in zip(names, runs):
        rundir = RunDir.open(path)
        if not rundir.metrics:
            raise CifarlabError(f"{path}: no metrics.csv rows yet; train it first")
        series.append((name, rundir.metrics))
        studies.add(rundir.config().study)
    note = None
    if "siamese" in studies and len(studies) > 1:  # a contrastive loss and a cross-entropy share no scale
        # (classifier and transfer runs both score 10-class cross-entropy and accuracy on the test set)
        note = (f"these runs are of different studies ({', '.join(sorted(studies))}): their losses and "
                "accuracies measure different things")
        print(f"note: {note}", file=sys.stderr)
    with writing_user_path("--out", out):
        print(plot_curves(series, out, title=title, note=note))


@app.command()
def compare(
    runs: Annotated[List[Path], typer.Argument(help="Run directories, or folders of runs (a reproduce output).")],
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Also write the table to this CSV file.")] = None,
) -> None:
    """A table of several runs side by side: step reached, final and best test accuracy, test loss,
    ms/step, and every setting in which the runs differ (an ablation at a glance)."""
    import csv
    import io

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cifarlab.fileio import write_text, writing_user_path
    from cifarlab.runs import compare_runs

    if csv_out is not None and csv_out.suffix.lower() != ".csv":  # not onto a run's config.toml, say
        raise CifarlabError(f"--csv {csv_out}: give a file name ending in .csv")
    if csv_out is not None and (csv_out.parent / "config.toml").is_file():  # its metrics.csv, say
        raise CifarlabError(f"--csv {csv_out}: is inside a run folder; write the table elsewhere")
    differing, rows = compare_runs(runs)
    shown = [key for key in differing if key != "steps"]  # the step column says it
    # a Siamese pair accuracy is read against answering "different" always (0.80 at 20% same)
    with_baseline = any(row["study"] == "siamese" for row in rows)
    table = Table(show_edge=False, header_style="bold")
    for column in ("run", "step", "test acc", *["baseline"] * with_baseline, "best (step)", "test loss", "ms/step", *shown):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=True)

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    names = [Path(row["run"]).name for row in rows]
    if len(set(names)) < len(names):  # runs of the same name in several folders: say which folder
        names = [str(Path(*Path(row["run"]).parts[-2:])) for row in rows]
    for name, row in zip(names, rows):
        step = f"{row['step']}/{row['steps']}" + ("" if row["finished"] else " (no summary)" if row["summary_missing"]
                                                  else " (unfinished)")
        best = "-" if row["best_test_accuracy"] is None else f"{row['best_test_accuracy']:.4f} ({row['best_test_step']})"
        # escape(): a run named "b128[dropout]" is text, not rich markup
        table.add_row(escape(name), step, num(row["test_accuracy"], ".4f"), *[f"{row['baseline_accuracy']:.2f}"] * with_baseline, best,
                      num(row["test_loss"], ".4f"), num(row["ms_per_step"], ".2f"),
                      *("·" if row[key] is None else escape(str(row[key])) for key in shown))
    Console(width=None if sys.stdout.isatty() else 1000).print(table)  # piped: never cut a column
    if with_baseline:
        print("baseline: the accuracy of a rule that ignores the images (chance for a classifier; for a Siamese "
              "run, always giving the majority answer on its evaluation pairs: 'different' at the report's 20% same-class)")
    if csv_out is not None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with writing_user_path("--csv", csv_out):
            write_text(csv_out, buf.getvalue())
        print(f"wrote {csv_out}")


RunArg = Annotated[Path, typer.Argument(help="A run directory.")]
CheckpointOpt = Annotated[Optional[int], typer.Option(
    help="Step of the checkpoint whose features to use. [default: latest]")]
AnalysisDeviceOpt = Annotated[Optional[str], typer.Option(
    help="Where to extract features: auto, cpu or cuda. [default: the run's]")]
# --layer and --layers both, on features, tsne and ovr alike: each names one layer or several
LayerOpt = Annotated[Optional[str], typer.Option(
    "--layer", "--layers", help="A layer name (e.g. fc2), several comma-separated, or 'all' (every layer but logits). "
    "[default: the deepest layer before logits]")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command()
def features(
    run: RunArg,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", "--layer", help="Comma-separated layer names. [default: every layer but logits, e.g. flatten,fc1,fc2]")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    device: AnalysisDeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Extract a checkpoint's features on one split into RUN/features/<split>-step-<N>.npz
    (labels plus one float32 array per layer). tsne and ovr do this on demand."""
    from cifarlab.analysis import extract_features, note_other_images, read_meta

    path = extract_features(run, layers, split, checkpoint, data=data, device=device, progress=not quiet)
    meta = read_meta(path)
    note_other_images(run, meta["data_digest"], data)
    print(f"features of {split} ({meta['images']} images) from checkpoint step {meta['checkpoint']}: {path}")
    for name, dims in meta["dims"].items():
        print(f"  {name:<12} {dims:>6}-d")


@app.command()
def tsne(
    run: RunArg,
    layer: LayerOpt = None,
    perplexity: Annotated[float, typer.Option(help="t-SNE perplexity (the report's: 40).")] = 40.0,
    max_points: Annotated[int, typer.Option(help="Embed a random subset of at most this many points.")] = 10000,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the subset, PCA and t-SNE.")] = 0,
    split: Annotated[str, typer.Option(help="Features of train, val or test.")] = "test",
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    device: AnalysisDeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """t-SNE of a layer's features in 2-D, coloured by class (the report's Figure 7): writes
    RUN/plots/tsne-<layer>.png and the coordinates in RUN/analysis/tsne-<layer>.npz; with
    --layer all also RUN/plots/tsne-all.png, the layers side by side."""
    from cifarlab.analysis import run_tsne

    out = run_tsne(run, layer, perplexity=perplexity, max_points=max_points, seed=seed, split=split,
                   checkpoint=checkpoint, data=data, device=device, progress=not quiet)
    print(f"t-SNE of {out['points']} {split} points, checkpoint step {out['checkpoint']}, perplexity {out['perplexity']:.4g}")
    for name, res in out["layers"].items():
        print(f"  {name:<12} {res['seconds']:6.1f} s  {res['png']}  {res['coords']}")
    if out["combined"] is not None:
        print(f"  side by side        {out['combined']}")


@app.command()
def ovr(
    run: RunArg,
    layer: LayerOpt = None,
    protocol: Annotated[str, typer.Option(
        help="seed: the report's (test features shuffled once, 80% fit, 20% scored); "
        "split: fit on train features, score on all test features.")] = "seed",
    classifier: Annotated[str, typer.Option(
        help="linear-svm (liblinear one-vs-rest, fast), svc-linear (the report's "
        "OneVsRestClassifier(SVC(kernel='linear')), slow) or logistic; each on standardised features.")] = "linear-svm",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the seed protocol's shuffle.")] = 0,
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    device: AnalysisDeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score one-vs-rest linear classifiers on standardised features (the report's 1.4.1): prints
    a table, writes RUN/analysis/ovr-<layer>.json and RUN/plots/confusion-<layer>.png."""
    from cifarlab.analysis import format_ovr_table, run_ovr

    rows = run_ovr(run, layer, protocol=protocol, classifier=classifier, seed=seed, checkpoint=checkpoint,
                   data=data, device=device, progress=not quiet)
    print(format_ovr_table(rows))
    for row in rows:
        print(f"  {row['layer']:<12} {row['json']}  {row['png']}")


@app.command("reproduce")
def reproduce_cmd(
    data: DataOpt = None,
    out: Annotated[Path, typer.Option(help="Folder of the runs (one per preset) and the report.")] = Path("report"),
    only: Annotated[Optional[str], typer.Option(
        help="Comma-separated studies to run: study1 (ConvNet), study2 (Siamese), study3 (transfer). [default: all]")] = None,
    steps_scale: Annotated[float, typer.Option(
        help="Multiply every step count (steps, eval/checkpoint intervals, refine step K) by this; "
        "0.02 is a quick version, 1 the report's.")] = 1.0,
    jobs: Annotated[int, typer.Option(help="Runs trained at once, each in its own process.")] = 1,
    max_evals: Annotated[Optional[int], typer.Option(
        help="At most this many test evaluations per run (they dominate short runs on a CPU). [default: the report's cadence]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    transfer_backbone: Annotated[Optional[str], typer.Option(
        help="Backbone of the study-3 runs: vgg16 (the report's) or efficientnet-lite0 (its weights ship in "
        "cifarlab[lite0]). [default: vgg16]")] = None,
    backbone_weights: Annotated[Optional[str], typer.Option(
        help="Weights of the study-3 backbone: imagenet (VGG-16's downloaded and hash-checked; Lite0's ship in "
        "cifarlab[lite0]), a weights file (.pth, or the seed's vgg16_weights.npz), or none (random: the runs show "
        "what the pretraining adds). [default: imagenet]")] = None,
    tsne_points: Annotated[int, typer.Option(help="Points per t-SNE figure.")] = 10000,
    analysis: Annotated[str, typer.Option(
        help="When the OvR and t-SNE analysis runs: during (each finished run's, in a process of its own while "
        "the next runs train: the CPU is free while a GPU trains), after (the training), or auto: during "
        "when the runs train on a CUDA GPU.")] = "auto",
    set_: Annotated[Optional[List[str]], typer.Option(
        "--set", help="KEY=VALUE: a setting for every run, e.g. --set precision=bf16 (repeatable).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Rerun the whole report: every preset into OUT/<preset>/, the analysis its tables need
    (OvR, t-SNE), then OUT/report.html and OUT/report.md. Finished runs are skipped and
    interrupted ones resumed, so running it again costs nothing."""
    from cifarlab.config import parse_settings
    from cifarlab.reproduce import reproduce

    state = reproduce(out, data=data, only=only, steps_scale=steps_scale, jobs=jobs, max_evals=max_evals,
                      device=device, transfer_backbone=transfer_backbone, backbone_weights=backbone_weights,
                      tsne_points=tsne_points, overrides=parse_settings(set_), progress=not quiet,
                      analysis=analysis)
    failed, unanalysed = state["failed"], state["unanalysed"]
    print(f"done in {state['wall_seconds']:.1f} s: {state['report']['html']}  {state['report']['md']}")
    problems = [f"{counted(len(failed), 'run')} failed: {', '.join(failed)}"] * bool(failed) + \
               [f"the analysis of {', '.join(unanalysed)} failed"] * bool(unanalysed)
    if problems:
        raise CifarlabError(f"{'; '.join(problems)} (the report says why)")


@app.command("report")
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="A `cifarlab reproduce` output folder (runs named after presets).")],
) -> None:
    """Write FOLDER/report.html (self-contained) and FOLDER/report.md: the report's tables with the
    seed's number beside ours, and its figures redrawn from the runs in FOLDER."""
    from cifarlab.report import write_report

    html_path, md_path = write_report(folder)
    print(f"{html_path}\n{md_path}")


def _from_ctrl_c(err: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the errors that led to `err`."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, KeyboardInterrupt):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _train_subcommand(args: list[str]) -> str | None:
    """The word click takes for train's subcommand: the first after the train group's own options
    (--preset NAME, --out DIR, --quiet); a study's name as an option's value (--out classifier) is
    not one, and a study's own option (--steps) ends the search, as it ends click's."""
    values, flags = ("--preset", "--out"), ("--quiet", "-q", "--help")
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in values:
            i += 2
        elif arg in flags or arg.startswith(tuple(f"{v}=" for v in values)):
            i += 1
        else:
            return None if arg.startswith("-") else arg
    return None


def _with_the_presets_study(args: list[str]) -> list[str]:
    """`train --preset NAME [flags]` as `train STUDY --preset NAME [flags]`: the preset says its
    study, and click takes flags before a study's name for the train group's own (refusing a
    --steps there as no such option). With --help, that shows the study's flags."""
    from cifarlab.config import STUDIES

    if args[:1] != ["train"] or _train_subcommand(args[1:]) in STUDIES:
        return args
    for i, arg in enumerate(args):
        name = arg.partition("=")[2] if arg.startswith("--preset=") else \
            args[i + 1] if arg == "--preset" and i + 1 < len(args) else None
        if name is not None:
            from cifarlab.presets import load_preset

            return ["train", load_preset(name).study, *args[1:]]
    return args


PATH_FLAGS = ("--out", "--data", "--resume", "--backbone-weights", "--csv")  # the options that name files


def _tilde_expanded(args: list[str]) -> list[str]:
    """`--out=~/runs/x` as the shell expands `--out ~/runs/x`: it leaves a `~` after `=` alone, and
    a folder named `~` made in the working directory is one `rm -rf ~...` away from a disaster."""
    import os

    def expanded(arg: str) -> str:
        flag, eq, value = arg.partition("=")
        return f"{flag}={os.path.expanduser(value)}" if flag in PATH_FLAGS and eq and value.startswith("~") else arg

    return [expanded(arg) for arg in args]


def main() -> None:
    try:
        app(args=_with_the_presets_study(_tilde_expanded(sys.argv[1:])))
    except CifarlabError as err:
        # Ctrl-C with the progress saved: 130, as for any interrupted command, and not an error:
        # its message says what was saved and how to go on (the engine, and so torch, is imported
        # only when something trained)
        interrupted = "cifarlab.engine" in sys.modules and isinstance(err, sys.modules["cifarlab.engine"].TrainingInterrupted)
        print(err if interrupted else f"error: {err}", file=sys.stderr)
        sys.exit(130 if interrupted else 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exit_:  # recent typer turns Ctrl-C into a silent exit 130
        if exit_.code == 130 and _from_ctrl_c(exit_):
            print("interrupted", file=sys.stderr)
        raise
    except OSError as err:  # a path the user gave that cannot be written or read (a file for a folder, ...)
        from cifarlab.fileio import os_error_line

        print(f"error: {os_error_line(err)}", file=sys.stderr)
        sys.exit(2)
