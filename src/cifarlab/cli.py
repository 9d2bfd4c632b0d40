"""The `cifarlab` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from cifarlab import CifarlabError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Reproduce and extend a classic CIFAR-10 study: ConvNet, Siamese and transfer learning.",
)
train_app = typer.Typer(no_args_is_help=True, help="Train one run of a study.")
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


@train_app.command("classifier")
def train_classifier(
    steps: Annotated[Optional[int], typer.Option(help="Training steps (Adam updates). [default: 15000]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step. [default: 128]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate. [default: 1e-4]")] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        help="Evaluate on the full test set (and log the running train mean) every N steps. [default: 1000]")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Save weights + resume state every N steps (and at the end). [default: 5000]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of init, shuffling and dropout. [default: 42]")] = None,
    dropout: Annotated[Optional[float], typer.Option(
        help="Drop probability after fc1 and fc2 while training (the report's 'dropout 0.2' keeps 80%). [default: 0]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(
        help="Adds WD * sum(W^2)/2 over the fc1 and fc2 weights to the loss (tf.nn.l2_loss, as the seed). [default: 0]")] = None,
    init: Annotated[Optional[str], typer.Option(help="Weight init: normal (N(0, 0.001), the seed's) or xavier.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="Hold out the last fraction of train as a validation split, evaluated beside test. [default: 0]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda. [default: auto]")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, or bf16 (autocast; for GPUs). [default: fp32]")] = None,
    memory_format: Annotated[Optional[str], typer.Option(
        help="auto (channels_last on CUDA, NCHW on CPU), channels_last or contiguous.")] = None,
    cuda_graph: Annotated[Optional[bool], typer.Option(
        "--cuda-graph/--no-cuda-graph", help="On CUDA, replay the whole step as one CUDA graph. [default: on]")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option(
        "--tensorboard/--no-tensorboard", help="Write TensorBoard events to RUN/tb. [default: on]")] = None,
    data: DataOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory. [default: runs/classifier-<time>]")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="Continue this run from its checkpoints/last.pt (its config.toml is used; flags given here override it).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train the report's ConvNet (study 1) and write a run directory: config, metrics, summary,
    TensorBoard events, checkpoints and plots/curves.png."""
    from cifarlab.config import Config
    from cifarlab.train import train

    given = {k: v for k, v in dict(
        steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, checkpoint_every=checkpoint_every,
        seed=seed, dropout=dropout, weight_decay=weight_decay, init=init, val_fraction=val_fraction,
        device=device, precision=precision, memory_format=memory_format, cuda_graph=cuda_graph,
        tensorboard=tensorboard, data=str(data) if data is not None else None,
    ).items() if v is not None}
    if resume is not None:
        if out is not None:
            raise CifarlabError("--out and --resume do not go together: a resumed run stays in its own directory")
        run, summary = train(Config(), resume=resume, overrides=given, progress=not quiet)
    else:
        cfg = Config(study="classifier").replace(**given)
        run, summary = train(cfg, out=out, progress=not quiet)
    _print_run_result(run, summary)


def _print_run_result(run, summary: dict) -> None:
    line = f"finished {run.name}: {summary['steps']} steps"
    if summary["final_test_accuracy"] is not None:
        line += (f", test accuracy {summary['final_test_accuracy']:.4f} "
                 f"(best {summary['best_test_accuracy']:.4f} at step {summary['best_test_step']})")
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
    task = build_task(cfg, dev, autocast)
    step = rundir.load_weights(task.model, checkpoint)
    task.model.eval()
    for split, (loss, acc) in task.evaluate().items():
        print(f"{rundir.name} step {step} {split}: loss {loss:.4f} accuracy {acc:.4f}")


@app.command()
def plot(
    runs: Annotated[List[Path], typer.Argument(help="One or more run directories.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated legend labels, one per run.")] = None,
    title: Annotated[Optional[str], typer.Option(help="Figure title.")] = None,
) -> None:
    """Overlay the accuracy and loss curves of several runs (the report's Figures 3-6)."""
    from cifarlab.plots import plot_curves
    from cifarlab.runs import RunDir

    names = [label.strip() for label in labels.split(",")] if labels else [Path(r).name for r in runs]
    if len(names) != len(runs):
        raise CifarlabError(f"--labels has {len(names)} names for {len(runs)} runs; give one per run")
    series = []
    for name, path in zip(names, runs):
        rundir = RunDir.open(path)
        if not rundir.metrics:
            raise CifarlabError(f"{path}: no metrics.csv rows yet; train it first")
        series.append((name, rundir.metrics))
    print(plot_curves(series, out, title=title))


def main() -> None:
    try:
        app()
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
