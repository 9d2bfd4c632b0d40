"""The command line end to end on tiny image folders, as a user runs it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cifarlab import CifarlabError
from conftest import logged_rows, make_image_folders, run_cli


def cifarlab_process(*args):
    """`python -m cifarlab ARGS` in a fresh process: the entry point exactly as a user meets it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "cifarlab", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folders(root / "data", 4)
    run = root / "run"
    res = cifarlab_process("train", "classifier", "--data", data, "--steps", 6, "--batch-size", 8, "--eval-every", 3,
                           "--checkpoint-every", 3, "--out", run, "--device", "cpu", "--quiet",
                           "--init", "xavier", "--lr", "1e-3")  # weights that move: eval has losses to tell apart
    return data, run, res


def test_train_writes_the_run_and_says_where(trained):
    data, run, res = trained
    assert res.returncode == 0, res.stderr
    assert f"run directory  {run}" in res.stdout and "curves" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    last_test = logged_rows(run, "test")[-1]
    assert summary["steps"] == 6 and last_test["step"] == 6
    assert summary["final_test_accuracy"] == pytest.approx(last_test["accuracy"])
    assert summary["final_test_loss"] == pytest.approx(last_test["loss"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.pt", "step-3.safetensors", "step-6.safetensors"]
    assert (run / "plots" / "curves.png").is_file() and (run / "tb").is_dir()


def test_eval_reproduces_the_logged_test_accuracy(trained):
    data, run, _ = trained
    logged = {r["step"]: r for r in logged_rows(run, "test")}
    assert logged[3]["loss"] != pytest.approx(logged[6]["loss"], abs=1e-4)
    for step in (3, 6):
        res = run_cli("eval", run, "--checkpoint", step, "--data", data, "--device", "cpu")
        assert res.returncode == 0, res.stderr
        loss, acc = logged[step]["loss"], logged[step]["accuracy"]
        assert f"step {step} test: loss {loss:.4f}" in res.stdout and f"accuracy {acc:.4f}" in res.stdout, res.stdout
    missing = run_cli("eval", run, "--checkpoint", 5, "--data", data)
    assert missing.returncode != 0 and "no checkpoint at step 5; available: 3, 6" in missing.stderr
    assert "note:" not in res.stdout


def test_eval_on_other_images_than_the_run_trained_on_says_so(trained, tmp_path):
    data, run, _ = trained
    other = make_image_folders(tmp_path / "other", 5)
    res = run_cli("eval", run, "--data", other, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"note: {other} holds other images than {run.name} trained on;")
    assert "step 6 test:" in res.stdout


def test_resume_extends_a_finished_run(trained, tmp_path):
    data, run, _ = trained
    original = (trained[1] / "metrics.csv").read_text()
    run = copy_of(trained[1], tmp_path)  # the module's run stays as the other tests expect it
    res = run_cli("train", "classifier", "--resume", run, "--steps", 9, "--quiet")
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 9
    extended = (run / "metrics.csv").read_text()
    assert extended.startswith(original)  # steps 3 and 6 as they were, not trained again
    assert [line.split(",")[:2] for line in extended[len(original):].splitlines()] == [["9", "train"], ["9", "test"]]
    assert "step-9.safetensors" in os.listdir(run / "checkpoints")


def test_plot_overlays_runs_with_labels(trained, tmp_path):
    _, run, _ = trained
    out = tmp_path / "overlay.png"
    res = run_cli("plot", run, run, "--out", out, "--labels", "a,b")
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 10_000
    assert f"note: {run} given more than once" in res.stderr
    bad = run_cli("plot", run, "--out", out, "--labels", "a,b")
    assert bad.returncode != 0 and "--labels has 2 names for 1 run; give one per run" in bad.stderr
    one = run_cli("plot", run, run, "--out", out, "--labels", "a")
    assert "--labels has 1 name for 2 runs;" in one.stderr


def test_labels_titles_and_class_names_are_drawn_as_typed(tmp_path, monkeypatch):
    """matplotlib leaves a label starting with "_" out of a legend, and reads $...$ as math (a
    lone "$" fails the drawing): a run's or class's name must come out as the user typed it."""
    import matplotlib.figure
    import numpy as np

    from cifarlab.analysis import plot_tsne
    from cifarlab.plots import plot_curves

    drawn = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig) or real(fig, *a, **k))
    rows = [{"step": s, "split": split, "accuracy": 0.1 * s, "loss": 1 / s} for s in (1, 2, 3) for split in ("train", "test")]
    plot_curves([("_baseline", rows), ("lr $1e-4$ a$b", rows)], tmp_path / "c.png", title="a$^$b", note="$x")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    want = ["_baseline train", "_baseline test", "lr $1e-4$ a$b train", "lr $1e-4$ a$b test"]
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in drawn[0].axes] == [want, want]
    coords = np.random.default_rng(0).normal(size=(6, 2))
    plot_tsne([("fc2 $", coords)], np.array([0, 1, 2, 0, 1, 2]), ["_cat", "a$b", "c"], tmp_path / "t.png", "t$")
    assert [t.get_text() for t in drawn[1].legends[0].get_texts()] == ["_cat", "a$b", "c"]
    assert matplotlib.rcParams["text.parse_math"] is True  # only cifarlab's own drawing is changed


def test_many_runs_get_one_legend_beside_the_panels(tmp_path, monkeypatch):
    """Ten legend entries inside a panel hide its curves (the report's transfer figure): past
    LEGEND_IN_PANEL they go into one legend right of both panels, clear of them."""
    import matplotlib.figure

    from cifarlab.plots import LEGEND_IN_PANEL, plot_curves

    drawn = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig) or real(fig, *a, **k))
    rows = [{"step": s, "split": split, "accuracy": 0.1 * s, "loss": 1 / s} for s in (1, 2, 3) for split in ("train", "test")]
    runs = LEGEND_IN_PANEL // 2 + 1
    plot_curves([(f"run{i}", rows) for i in range(runs)], tmp_path / "many.png")
    fig = drawn[0]
    assert [ax.get_legend() for ax in fig.axes] == [None, None]
    (legend,) = fig.legends
    assert len(legend.get_texts()) == 2 * runs
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert all(box.x0 > ax.get_window_extent().x1 for ax in fig.axes)
    assert box.x1 <= fig.bbox.x1
    plot_curves([(f"run{i}", rows) for i in range(LEGEND_IN_PANEL // 2)], tmp_path / "few.png")
    assert drawn[1].legends == [] and all(ax.get_legend() is not None for ax in drawn[1].axes)
    # long labels (the report's "(unfinished: step N of M)"), and 182 entries in columns: clear of the panels
    for n, label in ((runs, "transfer-refine-100 (unfinished: step 3,000 of 10,000) {}"), (91, "classifier-b64-{}")):
        plot_curves([(label.format(i), rows) for i in range(n)], tmp_path / "long.png")
        fig = drawn[-1]
        fig.canvas.draw()
        box = fig.legends[0].get_window_extent()
        assert all(box.x0 > ax.get_window_extent().x1 for ax in fig.axes) and box.x1 <= fig.bbox.x1
        assert all(ax.get_window_extent().width > 300 for ax in fig.axes)  # the panels kept their room


def test_a_presets_study_is_put_where_click_reads_it():
    """`train --preset P` gets P's study after `train`, unless a study is already named there; a
    study's name as a flag's value (--out classifier) is not taken for one."""
    from cifarlab.cli import _with_the_presets_study as placed

    assert placed(["train", "--preset", "classifier-b64", "--out", "classifier"]) == [
        "train", "classifier", "--preset", "classifier-b64", "--out", "classifier"]
    assert placed(["train", "--preset=siamese-exp1", "--data", "transfer"]) == [
        "train", "siamese", "--preset=siamese-exp1", "--data", "transfer"]
    for given in (["train", "classifier", "--preset", "classifier-b64"], ["train", "--preset", "classifier-b64", "classifier"],
                  ["train", "--preset=classifier-b64", "classifier"], ["eval", "--preset", "classifier"]):
        assert placed(given) == given


def test_tilde_after_an_equals_sign_is_the_home_folder(tmp_path, monkeypatch):
    """The shell expands `--out ~/x` but not `--out=~/x`: cifarlab does, so no folder named `~`
    appears in the working directory; `~` elsewhere in a value is left alone."""
    from cifarlab.cli import _tilde_expanded
    from cifarlab.runs import RunDir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _tilde_expanded(["--out=~/runs/x", "--data", "~/d", "--labels=a~b", "-o=~/y", "--title=~"]) == [
        f"--out={tmp_path}/home/runs/x", "--data", "~/d", "--labels=a~b", "-o=~/y", "--title=~"]  # paths only
    monkeypatch.chdir(tmp_path)
    assert RunDir.create("~/r", "classifier").path == tmp_path / "home" / "r"  # a quoted '~/r' too
    # no such user: a folder of that name, as the shell leaves it (Path.expanduser would raise)
    assert RunDir.create("~nosuchuser-run", "classifier").path == Path("~nosuchuser-run")
    one_error_line(run_cli("train", "classifier", "--resume=~nosuchuser-run", "--quiet"),
                   "~nosuchuser-run: no such run directory; check the path")


def test_a_run_folder_name_that_is_not_utf8_is_refused_before_training(tmp_path, monkeypatch):
    import os

    from cifarlab.runs import RunDir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CifarlabError, match="the run folder's name is not valid UTF-8.*choose another --out"):
        RunDir.create(os.fsdecode(b"run\xff"), "classifier")
    assert list(tmp_path.iterdir()) == []


def test_compare_shows_runs_side_by_side_and_writes_csv(trained, tmp_path):
    _, run, _ = trained
    other = tmp_path / "other[x]"  # brackets: rich markup, were the name not escaped
    import shutil

    shutil.copytree(run, other)
    (other / "config.toml").write_text((other / "config.toml").read_text().replace("dropout = 0.0", "dropout = 0.5"))
    res = run_cli("compare", run, other, "--csv", tmp_path / "cmp.csv")
    assert res.returncode == 0, res.stderr
    header, first, second = res.stdout.splitlines()[:1] + res.stdout.splitlines()[2:4]
    assert "test acc" in header and "dropout" in header and "batch_size" not in header
    assert "baseline" not in res.stdout  # chance is plain for a classifier; the CSV has it
    assert first.split()[0] == run.name and first.split()[-1] == "0.0" and second.split()[-1] == "0.5"
    assert second.split()[0] == "other[x]"
    rows = (tmp_path / "cmp.csv").read_text().splitlines()
    assert rows[0].startswith("run,study,step,steps,finished,summary_missing,test_accuracy") and len(rows) == 3
    assert ",baseline_accuracy," in rows[0] and ",0.1," in rows[1]
    config = (other / "config.toml").read_bytes()
    one_error_line(run_cli("compare", run, other, "--csv", other / "config.toml"), "give a file name ending in .csv")
    assert (other / "config.toml").read_bytes() == config  # a slip of the finger overwrites nothing
    metrics = (other / "metrics.csv").read_bytes()
    one_error_line(run_cli("compare", run, other, "--csv", other / "metrics.csv"), "is inside a run folder")
    assert (other / "metrics.csv").read_bytes() == metrics
    shutil.copytree(run, tmp_path / "a" / "same")
    shutil.copytree(other, tmp_path / "b" / "same")
    folders = run_cli("compare", tmp_path / "a", tmp_path / "b")  # same names: the folders tell them apart
    assert folders.returncode == 0, folders.stderr
    assert [line.split()[0] for line in folders.stdout.splitlines()[2:4]] == ["a/same", "b/same"]
    bad = run_cli("compare", tmp_path / "nothing")
    assert bad.returncode == 2 and "neither a cifarlab run" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_data_command_describes_the_layout(trained):
    data, _, _ = trained
    res = run_cli("data", "--data", data)
    assert res.returncode == 0, res.stderr
    assert "image-folder" in res.stdout and "airplane" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps (--steps) must be >= 1"),
    (["--dropout", "1.5"], "dropout (--dropout) is a drop probability"),
    (["--batch-size", "1000"], "larger than the training set"),
])
def test_bad_flags_give_one_error_line(trained, tmp_path, args, message):
    data, _, _ = trained
    res = run_cli("train", "classifier", "--data", data, "--out", tmp_path / "x", "--quiet", *args)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr
    assert not (tmp_path / "x").exists(), "a run that failed to start left a directory"


def test_missing_data_names_the_three_ways(tmp_path):
    res = cifarlab_process("data", "--data", tmp_path / "empty", "--no-download")
    assert res.returncode == 2 and res.stderr.startswith("error:")
    assert "cifar-10-python.tar.gz" in res.stderr and "cifar-10-batches-py" in res.stderr


def test_help_explains_every_flag():
    res = run_cli("train", "classifier", "--help")
    assert res.returncode == 0
    for flag in ("--steps", "--batch-size", "--lr", "--eval-every", "--checkpoint-every", "--seed",
                 "--dropout", "--weight-decay", "--device", "--out", "--resume", "--precision"):
        assert flag in res.stdout
    text = " ".join(res.stdout.split())  # as wrapped for the terminal
    assert "(Adam updates). [default: 15000]" in text  # the study's own, and not taken for a markup tag
    siamese = " ".join(run_cli("train", "siamese", "--help").stdout.split())
    assert "(Adam updates). [default: 50000]" in siamese and "validation split. [default: 0.2]" in siamese
    # `train --preset P --help` is the help of P's study: its flags follow --preset
    by_preset = run_cli("train", "--preset", "siamese-exp1", "--help")
    assert by_preset.returncode == 0 and "--fraction-same" in by_preset.stdout
    group = run_cli("train", "--help").stdout  # its hidden --out/-q only refuse options before a study's name
    assert "--preset" in group and "--out" not in group and "--quiet" not in group
    assert "in cifarlab[lite0]" in " ".join(run_cli("reproduce", "--help").stdout.split())


def test_train_options_before_the_study_are_refused_not_dropped(tmp_path):
    res = run_cli("train", "--preset", "classifier-b64", "--out", tmp_path / "x", "classifier", "--steps", 5)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: options go after the study's name: `cifarlab train classifier --preset classifier-b64 "
        f"--out {tmp_path / 'x'} ...`")
    assert not (tmp_path / "x").exists()


def test_presets_are_listed_and_flags_override_them(trained, tmp_path):
    data, _, _ = trained
    listing = run_cli("presets")
    assert listing.returncode == 0
    for name in ("classifier-b128", "classifier-b64-wd0.01", "siamese-exp1", "siamese-exp2", "siamese-exp3"):
        assert name in listing.stdout
    run = tmp_path / "p"
    res = run_cli("train", "classifier", "--preset", "classifier-b64-wd0.01", "--batch-size", 8, "--steps", 2,
                   "--eval-every", 2, "--data", data, "--out", run, "--quiet", "--no-tensorboard")
    assert res.returncode == 0, res.stderr
    config = (run / "config.toml").read_text()
    assert "weight_decay = 0.01" in config and "batch_size = 8" in config and "steps = 2\n" in config
    wrong = run_cli("train", "classifier", "--preset", "siamese-exp3", "--data", data)
    assert wrong.returncode == 2 and "cifarlab train siamese" in wrong.stderr
    unknown = run_cli("train", "--preset", "nope")
    assert unknown.returncode == 2 and "unknown preset 'nope'" in unknown.stderr


@pytest.mark.parametrize("spelling", [["--preset", "classifier-b64-wd0.01"], ["--preset=classifier-b64-wd0.01"]])
def test_a_preset_takes_its_studys_flags_without_the_study_named(trained, tmp_path, spelling):
    """`cifarlab train --preset NAME --steps N`: the preset says its study."""
    run = tmp_path / "p"
    res = run_cli("train", *spelling, "--batch-size", 8, "--steps", 2, "--eval-every", 2, "--data", trained[0],
                  "--out", run, "--quiet", "--no-tensorboard")
    assert res.returncode == 0, res.stderr
    config = (run / "config.toml").read_text()
    assert "weight_decay = 0.01" in config and "steps = 2\n" in config and 'study = "classifier"' in config
    unknown = run_cli("train", "--preset=nope", "--steps", 2)
    assert unknown.returncode == 2 and "unknown preset 'nope'" in unknown.stderr


def test_siamese_trains_from_the_command_line(tmp_path):
    data = make_image_folders(tmp_path / "data", 10)
    run = tmp_path / "s"
    res = run_cli("train", "siamese", "--preset", "siamese-exp3", "--data", data, "--steps", 2, "--batch-size", 10,
                   "--fraction-same", 0.1, "--val-tuples", 2, "--eval-every", 2, "--out", run, "--quiet")
    assert res.returncode == 0, res.stderr
    config = (run / "config.toml").read_text()
    assert 'study = "siamese"' in config and 'sampler = "random"' in config and 'loss = "report2"' in config
    assert [line.split(",")[1] for line in (run / "metrics.csv").read_text().splitlines()[1:]] == ["train", "val", "test"]
    assert "test pair accuracy" in res.stdout and "; always 'different' scores 0.90)" in res.stdout  # 1 of 10 pairs same
    table = run_cli("compare", run).stdout.splitlines()
    assert table[0].split("┃")[3].strip() == "baseline" and table[2].split("│")[3].strip() == "0.90"
    assert table[-1].startswith("baseline: the accuracy of a rule that ignores the images")
    again = run_cli("train", "siamese", "--resume", run, "--quiet")
    assert again.returncode == 0 and "already finished (nothing to train) s: 2 steps" in again.stdout
    # its features need no pairs: one image per class is enough (eval's fixed tuples need more)
    few = make_image_folders(tmp_path / "few", 1)
    extracted = run_cli("features", run, "--data", few, "--split", "train", "--device", "cpu", "--quiet")
    assert extracted.returncode == 0, extracted.stderr
    assert (run / "features" / "train-step-2.npz").is_file()


def test_reproduce_and_report_give_one_line_errors(tmp_path):
    res = run_cli("reproduce", "--only", "study9", "--out", tmp_path / "out")
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --only takes a comma-separated subset of study1, study2, study3 (got 'study9')")
    assert not (tmp_path / "out").exists()
    res = run_cli("reproduce", "--set", "batch_size=lots", "--out", tmp_path / "out")
    assert res.returncode == 2 and "batch_size should be a whole number, got 'lots'" in res.stderr
    res = run_cli("report", tmp_path)
    assert res.returncode == 2 and "holds no preset runs" in res.stderr and len(res.stderr.splitlines()) == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    for args in (("reproduce", "--out", mine, "--only", "study1"), ("report", mine)):
        one_error_line(run_cli(*args), f"{mine / 'report.md'}: exists and was not written by cifarlab")
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"] and (mine / "report.md").read_text() == "my notes\n"


def copy_of(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def one_error_line(res, *fragments):
    """A non-zero exit whose stderr ends in one error line (progress bars may come before it)."""
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1] and lines[-1].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_resume_refuses_what_would_rewrite_the_runs_records(trained, tmp_path):
    from cifarlab.runs import RunDir

    run = copy_of(trained[1], tmp_path)
    reached = RunDir(run).saved_step()
    records = {name: (run / name).read_bytes() for name in ("config.toml", "summary.json", "metrics.csv")}
    one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", reached - 1, "--quiet"),
                   f"has reached step {reached}; resuming it needs --steps of at least {reached} (got {reached - 1})")
    one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", reached, "--memory-format", "contiguous",
                           "--quiet"),
                   f"has reached its {reached} steps, so nothing would train with the changed memory_format")
    # a setting no resume may change is refused as such, at any --steps (not sent to --steps first)
    for steps in (reached, reached + 3):
        one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", steps, "--lr", 0.5, "--quiet"),
                       "was trained with lr 0.001 (asked: 0.5); a resume keeps a run's settings")
    # the message lists what may change, and precision is not among it
    refused = run_cli("train", "classifier", "--resume", run, "--steps", reached + 3, "--precision", "bf16", "--quiet")
    one_error_line(refused, "was trained with precision 'fp32' (asked: 'bf16'); a resume keeps a run's settings (only "
                            "--steps, --data (the same images), --compile, --cuda-graph, --device, --distributed, "
                            "--feature-cache, --memory-format, --tensorboard may change)")
    one_error_line(run_cli("train", "siamese", "--resume", run, "--steps", reached + 3, "--quiet"),
                   "is a classifier run; resume it with `cifarlab train classifier --resume")
    assert {name: (run / name).read_bytes() for name in records} == records
    (run / "config.toml").write_text(records["config.toml"].decode().replace("batch_size = 8", "batch_size = -5"))
    one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", reached + 3, "--quiet"),
                   f"{run / 'config.toml'}: invalid config: batch_size (--batch-size) must be >= 1 (got -5)")


def test_resume_keeps_the_runs_settings_and_a_failed_one_changes_nothing(trained, tmp_path):
    import shutil

    import torch

    from cifarlab.runs import RunDir

    data, run = trained[0], copy_of(trained[1], tmp_path)
    reached = RunDir(run).saved_step()
    records = {name: (run / name).read_bytes() for name in ("config.toml", "summary.json", "metrics.csv")}
    one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", reached + 3, "--dropout", 0.5,
                           "--batch-size", 4, "--quiet"),
                   "was trained with batch_size 8 (asked: 4), dropout 0.0 (asked: 0.5); a resume keeps a run's settings")
    assert {name: (run / name).read_bytes() for name in records} == records
    # nothing left to train: nothing is rewritten, not even the summary's timings
    res = run_cli("train", "classifier", "--resume", run, "--steps", reached, "--quiet")
    assert res.returncode == 0, res.stderr
    assert {name: (run / name).read_bytes() for name in records} == records
    # a resume that fails on its last.pt leaves config.toml as it was (here: the data it records)
    other = make_image_folders(tmp_path / "other", 5)  # other images than the run was trained on
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"]["stages.fc1.linear.bias"] = torch.zeros(3)
    torch.save(state, last)
    one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", reached + 3, "--data", other, "--quiet"),
                   "was trained on other images than the data given now holds")
    assert (run / "config.toml").read_bytes() == records["config.toml"]
    one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", reached + 3, "--quiet"),
                   "last.pt: does not fit this run's network")
    assert (run / "config.toml").read_bytes() == records["config.toml"]
    moved = tmp_path / "moved data"  # the same images elsewhere: a resume goes on (checked up to the load)
    shutil.copytree(data, moved)
    one_error_line(run_cli("train", "classifier", "--resume", run, "--steps", reached + 3, "--data", moved, "--quiet"),
                   "last.pt: does not fit this run's network")


def test_a_run_stopped_before_it_saved_anything_resumes_from_the_start(trained, tmp_path, monkeypatch):
    """Ctrl-C (or a failure) before the first checkpoint leaves a config.toml alone: --resume trains
    it from step 0 in place, and data given through $CIFARLAB_DATA is recorded."""
    from cifarlab.config import Config
    from cifarlab.runs import RunDir

    data = trained[0]
    run = RunDir.create(str(tmp_path / "early"), "classifier")
    run.write_config(Config(steps=4, batch_size=8, eval_every=2, checkpoint_every=2, device="cpu"))
    created = (run.path / "config.toml").read_text().split("created = ")[1].splitlines()[0]
    monkeypatch.setenv("CIFARLAB_DATA", str(data))
    early = run_cli("eval", run.path)  # nothing to score yet, and the error says how to go on
    one_error_line(early, "no checkpoint yet", "stopped before its first (due at step 2)",
                   f"`cifarlab train classifier --resume {run.path}` trains it")
    res = run_cli("train", "classifier", "--resume", run.path, "--quiet")
    assert res.returncode == 0, res.stderr
    assert json.loads((run.path / "summary.json").read_text())["steps"] == 4
    text = (run.path / "config.toml").read_text()
    assert f'data = "{data.resolve()}"' in text
    assert f"created = {created}" in text and "resumed = " not in text  # trained from the start, not resumed


def test_devices_and_seeds_out_of_range_are_one_error_line(trained):
    data, run = trained[0], trained[1]
    one_error_line(run_cli("eval", run, "--data", data, "--device", "tpu"), "unknown device 'tpu'; use auto, cpu, cuda")
    one_error_line(run_cli("eval", run, "--data", data, "--device", "cuda:x"), "unknown device 'cuda:x'")
    one_error_line(run_cli("train", "classifier", "--data", data, "--seed", 2**40, "--quiet"),
                   "seed (--seed) must be in [0, 2**32)")
    for command in ("tsne", "ovr"):
        res = run_cli(command, run, "--seed", -1)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "--seed" in res.stderr


def test_checkpoints_of_another_network_or_damaged_give_one_line(trained, tmp_path):
    import argparse

    import torch
    from safetensors.torch import save_file

    data, run = trained[0], copy_of(trained[1], tmp_path)
    weights, evaluate = run / "checkpoints" / "step-3.safetensors", ("eval", run, "--checkpoint", 3, "--data", data)
    save_file({"stages.fc1.linear.bias": torch.zeros(384), "stages.extra": torch.zeros(2)}, str(weights))
    one_error_line(run_cli(*evaluate), "step-3.safetensors: does not fit this run's network (9 missing entries, "
                   "e.g. 'stages.flatten.conv1.weight'; 1 unexpected entry, e.g. 'stages.extra')", "use another --checkpoint")
    save_file({"stages.fc1.linear.bias": torch.zeros(1)}, str(weights))
    one_error_line(run_cli(*evaluate), "(size mismatch for stages.fc1.linear.bias: copying a param with shape")
    last = run / "checkpoints" / "last.pt"
    resume = ("train", "classifier", "--resume", run, "--steps", 30, "--quiet")
    last.write_bytes(last.read_bytes()[:3000])  # cut short, as by a full disk or an unfinished copy
    one_error_line(run_cli(*resume), "last.pt: damaged or not a cifarlab training state (it cannot be read as a "
                   "torch checkpoint: cut short, or another kind of file", "the last good checkpoint is ")
    last.write_bytes(b"")
    one_error_line(run_cli(*resume), "last.pt: damaged or not a cifarlab training state (the file is empty); the "
                   "run cannot resume from it.", "to train on, train it anew: move ")
    torch.save(argparse.Namespace(step=3), last)  # an object torch's weights-only loader refuses
    res = run_cli(*resume)
    one_error_line(res, "last.pt: damaged or not a cifarlab training state (it holds objects other than tensors")
    assert "weights_only" not in res.stderr and "arbitrary code" not in res.stderr
    torch.save({"step": 3}, last)
    one_error_line(run_cli(*resume), "last.pt: not a cifarlab training state (no 'model')")
    torch.save(dict.fromkeys(("model", "optimizer", "accumulators", "rng_cpu", "clock"), 5) | {"step": 3}, last)
    one_error_line(run_cli(*resume), "last.pt: does not fit this run's network (")


def test_output_paths_that_cannot_be_written_give_one_line(trained, tmp_path):
    data, run = trained[0], trained[1]
    (tmp_path / "a-file").write_text("mine")
    folder, csv_folder = tmp_path / "folder", tmp_path / "table.csv"
    folder.mkdir()
    csv_folder.mkdir()
    train = ("train", "classifier", "--data", data, "--steps", 1, "--batch-size", 8, "--device", "cpu", "--quiet")
    one_error_line(run_cli(*train, "--out", tmp_path / "a-file"), "a-file: is a file, not a run directory")
    one_error_line(run_cli(*train, "--out", tmp_path / "a-file" / "run"),
                   f"error: {tmp_path / 'a-file' / 'run'}: {tmp_path / 'a-file'} is a file, not a folder; move it away, "
                   "or give another path")
    one_error_line(run_cli("plot", run, "--out", tmp_path / "curves.txt"), "not an image file name", ".png")
    one_error_line(run_cli("plot", run, "--out", folder), "not an image file name")
    one_error_line(run_cli("compare", run, "--csv", folder), "give a file name ending in .csv")
    one_error_line(run_cli("compare", run, "--csv", csv_folder), "--csv", "table.csv", "it is a folder")
    one_error_line(run_cli("plot", run, "--out", tmp_path / "a-file" / "c.png"),
                   f"--out {tmp_path / 'a-file' / 'c.png'}: cannot write it: {tmp_path / 'a-file'} is a file, not a folder")
    one_error_line(run_cli("compare", run, "--csv", tmp_path / "a-file" / "t.csv"), "a-file is a file, not a folder")
    assert (tmp_path / "a-file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder", "table.csv"]
    blocked = copy_of(run, tmp_path / "blocked")  # a file where a run's plots/ folder must be
    shutil.rmtree(blocked / "plots")
    (blocked / "plots").write_text("mine")
    one_error_line(run_cli("ovr", blocked, "--quiet"), f"error: {blocked / 'plots'}: it is a file, not a folder; move "
                   "it away, or give another path")
    assert (blocked / "plots").read_text() == "mine"
    assert not any(folder.iterdir()) and not any(csv_folder.iterdir())


def test_ctrl_c_exits_130_with_one_line_saying_how_to_go_on(trained, tmp_path, monkeypatch):
    import cifarlab.train as train_module
    from test_train import InterruptAt

    build = train_module.build_task
    monkeypatch.setattr(train_module, "build_task", lambda *a, **k: InterruptAt(4)(build(*a, **k)))
    res = run_cli("train", "classifier", "--data", trained[0], "--steps", 20, "--batch-size", 8, "--device", "cpu",
                  "--out", tmp_path / "run", "--quiet")
    assert res.returncode == 130  # an interrupt, not a failure, for scripts that run cifarlab
    assert res.stderr.strip().startswith("interrupted at step 5; progress saved. Continue with: cifarlab train "
                                         "classifier --resume") and len(res.stderr.strip().splitlines()) == 1


def test_preset_runs_started_in_the_same_second_get_names_of_their_own(trained, tmp_path, monkeypatch):
    """Without --out a preset run is runs/<preset>-<time stamp>, and a second one started in the
    same second takes the next free name (-2), as any time-stamped run does."""
    import cifarlab.runs as runs

    data, _, _ = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "time_stamp", lambda: "20261202-120000")
    for _ in range(2):
        res = run_cli("train", "classifier", "--preset", "classifier-b64", "--steps", 2, "--eval-every", 2, "--batch-size", 8,
                      "--data", data, "--quiet", "--no-tensorboard")
        assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "classifier-b64-20261202-120000", "classifier-b64-20261202-120000-2"]


def test_a_transfer_run_that_would_never_reach_its_refine_step_says_so(tmp_path):
    data = make_image_folders(tmp_path / "data", 2)
    res = run_cli("train", "transfer", "--backbone", "efficientnet-lite0", "--backbone-weights", "none",
                  "--refine-after", 1000, "--steps", 1, "--batch-size", 4, "--eval-every", 1, "--data", data,
                  "--out", tmp_path / "t", "--quiet", "--no-tensorboard")
    assert res.returncode == 0, res.stderr
    assert "note: refine_after 1000 is not below steps 1: this run trains the head on frozen features only" in res.stderr


def test_plot_says_when_its_runs_are_of_different_studies(trained, tmp_path, monkeypatch):
    _, run, _ = trained
    data = make_image_folders(tmp_path / "data", 10)
    siamese = tmp_path / "s"
    res = run_cli("train", "siamese", "--data", data, "--steps", 2, "--batch-size", 10, "--fraction-same", 0.1,
                  "--val-tuples", 2, "--eval-every", 2, "--out", siamese, "--quiet", "--no-tensorboard")
    assert res.returncode == 0, res.stderr
    import cifarlab.plots

    notes = []
    draw = cifarlab.plots.plot_curves
    monkeypatch.setattr(cifarlab.plots, "plot_curves", lambda *a, note=None, **k: notes.append(note) or draw(*a, note=note, **k))
    res = run_cli("plot", run, siamese, "--out", tmp_path / "mixed.png")
    assert res.returncode == 0 and (tmp_path / "mixed.png").is_file()
    assert "note: these runs are of different studies (classifier, siamese)" in res.stderr
    assert notes[0].startswith("these runs are of different studies")  # in the figure too, for whoever sees only it
    res = run_cli("plot", run, "--out", tmp_path / "one.png")
    assert res.returncode == 0 and notes[1] is None
    transfer = copy_of(run, tmp_path)  # a transfer run's curves are the same 10-class scores: no note
    (transfer / "config.toml").write_text(
        (transfer / "config.toml").read_text().replace('study = "classifier"', 'study = "transfer"'))
    res = run_cli("plot", run, transfer, "--out", tmp_path / "two.png")
    assert res.returncode == 0 and notes[2] is None and "note:" not in res.stderr, res.stderr


def test_eval_and_features_score_a_checkpoint_on_fewer_images_than_a_training_batch(tmp_path):
    """Only training needs a batch's worth of images: a run of batch 32 is scored on 20 images."""
    run = tmp_path / "run"
    res = run_cli("train", "classifier", "--data", make_image_folders(tmp_path / "data", 4), "--steps", 1,
                  "--batch-size", 32, "--eval-every", 1, "--checkpoint-every", 1, "--out", run, "--device", "cpu",
                  "--quiet")
    assert res.returncode == 0, res.stderr
    few = make_image_folders(tmp_path / "few", 2)
    scored = run_cli("eval", run, "--data", few, "--device", "cpu")
    assert scored.returncode == 0, scored.stderr
    assert "step 1 test: loss" in scored.stdout
    extracted = run_cli("features", run, "--data", few, "--split", "train", "--device", "cpu", "--quiet")
    assert extracted.returncode == 0, extracted.stderr
    assert (run / "features" / "train-step-1.npz").is_file()
    training = run_cli("train", "classifier", "--data", few, "--steps", 1, "--batch-size", 32,
                       "--out", tmp_path / "again", "--device", "cpu", "--quiet")
    assert training.returncode != 0 and "batch size 32 is larger than the training set (20 images)" in training.stderr


def test_a_missing_run_path_is_named_missing_not_only_not_a_run(tmp_path):
    missing = run_cli("eval", tmp_path / "nope")
    assert missing.returncode != 0 and f"{tmp_path / 'nope'}: no such run directory; check the path" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("eval", tmp_path / "empty")
    assert empty.returncode != 0 and "not a cifarlab run (no config.toml)" in empty.stderr


def test_every_run_of_an_overlay_has_a_colour_of_its_own():
    from cifarlab.plots import run_colours

    for n in (1, 10, 11, 20, 21, 45):
        assert len(set(run_colours(n))) == n
