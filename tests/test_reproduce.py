"""`cifarlab reproduce` and `cifarlab report` on tiny image folders: planning, skipping, resuming,
parallel runs, the report's tables and figures, and the page in a real (headless) browser."""

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cifarlab import CifarlabError
from cifarlab.config import Config, parse_settings
from cifarlab.presets import load_preset
from cifarlab.reproduce import parse_only, plan, reproduce, run_state, scaled_config
from cifarlab.train import train
from conftest import make_image_folders, run_locked_by_another_process

# Tiny runs: 6 ConvNet steps, 20 Siamese steps, small batches (30 images per class and split).
QUICK = dict(steps_scale=0.0004, max_evals=2, device="cpu", tsne_points=120, progress=False,
             overrides={"batch_size": 16, "val_tuples": 10, "tensorboard": False})


@pytest.fixture
def training_only(monkeypatch):
    """Leave out the OvR and t-SNE step for tests about training runs: `reproduced` covers it."""
    import cifarlab.reproduce as rep

    monkeypatch.setattr(rep, "analyse", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """study1 + study2 reproduced once (with its own cache folder), and the log it printed."""
    root = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(root / "cache"))
        data = make_image_folders(root / "data", 30)
        log = []
        state = reproduce(root / "out", data=data, only="study1,study2", log=log.append, **QUICK)
    return root / "out", data, state, log


def test_scaling_multiplies_every_step_count():
    cfg = scaled_config(load_preset("classifier-b128"), 0.02)
    assert (cfg.steps, cfg.eval_every, cfg.checkpoint_every) == (300, 20, 100)
    assert scaled_config(load_preset("transfer-refine-1000"), 0.02).refine_after == 20
    assert scaled_config(load_preset("transfer-features"), 0.02).refine_after == -1  # never stays never
    assert scaled_config(load_preset("transfer-refine"), 0.02).refine_after == 0  # from the start stays
    assert scaled_config(load_preset("siamese-exp1"), 0.02, max_evals=5).eval_every == 200  # 1,000 steps / 5
    assert scaled_config(load_preset("classifier-b64"), 1.0) == load_preset("classifier-b64").config()
    # a step count set explicitly (--set steps=N) is trained as given; the others follow the steps
    cfg = scaled_config(load_preset("classifier-b128"), 0.02, steps=3000)
    assert (cfg.steps, cfg.eval_every, cfg.checkpoint_every) == (3000, 200, 1000)  # x0.2, not x0.02
    refine = scaled_config(load_preset("transfer-refine-1000"), 0.02, steps=2000)
    assert (refine.steps, refine.refine_after) == (2000, 200)  # a tenth of the run, as the preset's
    assert scaled_config(load_preset("transfer-refine-1000"), 0.02, refine_after=7).refine_after == 7
    assert scaled_config(load_preset("classifier-b128"), 0.02, max_evals=2, eval_every=10).eval_every == 10


def test_tsne_points_are_checked_before_anything_trains(tmp_path):
    with pytest.raises(CifarlabError, match="--tsne-points must be at least 2 \\(got 1\\)"):
        reproduce(tmp_path / "out", data=tmp_path / "no-data", **{**QUICK, "tsne_points": 1})
    assert not (tmp_path / "out").exists()


def test_a_failed_analysis_makes_reproduce_exit_non_zero(tmp_path, monkeypatch):
    import cifarlab.report as report
    import cifarlab.reproduce as rep
    from conftest import run_cli

    def analyse(out, records, *args, **kwargs):
        records["classifier-b128"]["analysis"] = "analysis failed: boom"

    monkeypatch.setattr(rep, "execute", lambda *a, **k: {"classifier-b128": {"status": "finished", "note": "trained"}})
    monkeypatch.setattr(rep, "analyse", analyse)
    monkeypatch.setattr(report, "write_report", lambda root: (Path(root) / "report.html", Path(root) / "report.md"))
    res = run_cli("reproduce", "--data", make_image_folders(tmp_path / "data", 1), "--out", tmp_path / "out",
                  "--only", "study1", "--quiet")
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: the analysis of classifier-b128 failed (the report says why)"
    # a later call of other studies is judged by its own runs, not by the record kept from this one
    monkeypatch.setattr(rep, "execute", lambda *a, **k: {"siamese-exp1": {"status": "finished", "note": "trained"}})
    monkeypatch.setattr(rep, "analyse", lambda *a, **k: None)
    res = run_cli("reproduce", "--data", tmp_path / "data", "--out", tmp_path / "out", "--only", "study2", "--quiet")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "reproduce.json").read_text())["runs"]["classifier-b128"]["analysis"]


def test_report_notes_say_which_refine_step_and_which_metric():
    from cifarlab.report import _steps_note

    summary = {"steps": 10, "best_test_accuracy": 0.5, "best_test_step": 5}
    assert _steps_note(summary, refine_after=1) == "refined from step 1 of 10; best 0.5000 at step 5"
    assert _steps_note(summary, refine_after=-1) == _steps_note(summary) == "10 steps; best 0.5000 at step 5"


def test_runs_at_once_are_handed_out_longest_first(tmp_path):
    from cifarlab.reproduce import estimated_cost

    runs = plan(tmp_path, ["study1", "study2", "study3"], 1.0)
    order = [r.name for r in sorted(runs, key=lambda r: -estimated_cost(r.config))]
    # 50,000 steps of 2 x 128 images (random pairs), then of 129 (anchor batches embed their anchor
    # once: 6.45M), then the runs refining through the backbone (10,000 x 128 x 5 = 6.4M, and less)
    assert order[:7] == ["siamese-exp3", "siamese-exp1", "siamese-exp2", "transfer-refine", "transfer-refine-100",
                         "transfer-refine-1000", "transfer-refine-2500"]
    assert order[7:11] == sorted(n for n in order if n.startswith("classifier-b128"))
    assert order[11:16] == sorted(n for n in order if n.startswith("classifier-b64"))
    assert order[-1] == "transfer-features"  # the head alone on cached features


def test_only_and_set_are_checked(tmp_path):
    assert parse_only("study3,study1") == ["study1", "study3"]
    with pytest.raises(CifarlabError, match="subset of study1, study2, study3"):
        parse_only("study4")
    with pytest.raises(CifarlabError, match="subset of study1, study2, study3"):
        parse_only("")  # --only '' is a mistake, not "everything"
    assert parse_only(None) == ["study1", "study2", "study3"]
    with pytest.raises(CifarlabError, match="unknown device 'gpu'"):
        reproduce(tmp_path / "out", device="gpu", progress=False)
    assert not (tmp_path / "out").exists()
    assert parse_settings(["batch_size=32", "precision=bf16", "lr=3e-4"]) == {
        "batch_size": 32, "precision": "bf16", "lr": 3e-4}
    with pytest.raises(CifarlabError, match="batch_size should be a whole number, got .many."):
        parse_settings(["batch_size=many"])
    with pytest.raises(CifarlabError, match="unknown setting"):
        parse_settings(["batch=3"])
    with pytest.raises(CifarlabError, match="KEY=VALUE"):
        parse_settings(["batch_size"])
    with pytest.raises(CifarlabError, match="torchrun"):
        parse_settings(["distributed=true"])
    assert parse_settings(["backbone=efficientnet-lite0"]) == {"backbone": "efficientnet-lite0"}  # benchmarks'
    # each value read as its setting's type, as a user would spell it (TOML refuses all of these)
    assert parse_settings(["cuda_graph=True", "lr=.001", "seed=042", "compile=no", "feature_cache=OFF",
                           "backbone='efficientnet-lite0'"]) == {
        "cuda_graph": True, "lr": 0.001, "seed": 42, "compile": False, "feature_cache": False,
        "backbone": "efficientnet-lite0"}
    with pytest.raises(CifarlabError, match=r"compile is true or false \(also yes/no, on/off, 1/0\), got 'maybe'"):
        parse_settings(["compile=maybe"])
    with pytest.raises(CifarlabError, match="lr should be a finite number, got 'inf'"):
        parse_settings(["lr=inf"])
    # a setting only one study reads is checked when the runs are planned, not after hours of others
    with pytest.raises(CifarlabError, match="val_fraction .*must be > 0 for the Siamese study"):
        plan(tmp_path / "out", ["study1", "study2"], 0.001, overrides=parse_settings(["val_fraction=0"]))
    assert len(plan(tmp_path / "out", ["study1"], 0.001, overrides=parse_settings(["val_fraction=0"]))) == 9
    with pytest.raises(CifarlabError, match="input_size .*must be a multiple of 32"):
        plan(tmp_path / "out", ["study3"], 0.001, overrides=parse_settings(["input_size=48"]))
    for setting, flag in (("data=x", "--data"), ("device=cpu", "--device"), ("backbone=vgg16", "--transfer-backbone"),
                          ("backbone_weights=none", "--backbone-weights")):
        key = setting.split("=")[0]
        with pytest.raises(CifarlabError, match=f"--set {key}=... is not how reproduce takes it: use {flag}"):
            reproduce(tmp_path / "out", **{**QUICK, "overrides": parse_settings([setting])})
    assert not (tmp_path / "out").exists()
    names = [r.name for r in plan(tmp_path, ["study2"], 1.0)]
    assert names == ["siamese-exp1", "siamese-exp2", "siamese-exp3"]


def test_every_preset_runs_and_is_analysed(reproduced):
    out, _, state, log = reproduced
    runs = [r.name for r in plan(out, ["study1", "study2"], 1.0)]
    assert len(runs) == 12 and set(state["runs"]) == set(runs)
    for name in runs:
        assert state["runs"][name] == {"status": "finished", "note": "trained", "steps": 20 if name.startswith("siamese") else 6}
        summary = json.loads((out / name / "summary.json").read_text())
        steps = 20 if name.startswith("siamese") else 6
        assert summary["steps"] == steps and not (out / name / "tb").exists()
        evals = {r for r in (out / name / "metrics.csv").read_text().splitlines()[1:] if ",test," in r}
        assert len(evals) == 2  # --max-evals 2
    for layer in ("flatten", "fc1", "fc2"):
        ovr = json.loads((out / "classifier-b128" / "analysis" / f"ovr-{layer}.json").read_text())
        assert 0 <= ovr["results"]["seed/linear-svm"]["accuracy"] <= 1
        assert (out / "classifier-b128" / "analysis" / f"tsne-{layer}.npz").is_file()
    for exp in ("siamese-exp1", "siamese-exp2", "siamese-exp3"):
        assert (out / exp / "analysis" / "ovr-embedding.json").is_file()
        assert (out / exp / "analysis" / "tsne-embedding.npz").is_file()
    assert state["steps_scale"] == 0.0004 and state["data"]["layout"] == "image-folder"


def test_running_it_again_costs_nothing(reproduced):
    out, data, _, _ = reproduced
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "report" not in p.name
              and p.parent.name != "figures" and p.name != "reproduce.json"}
    log = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(out.parent / "cache"))
        state = reproduce(out, data=data, only="study1,study2", log=log.append, **QUICK)
    assert all(r["note"] == "already finished: skipped" for r in state["runs"].values())
    assert not any("OvR" in line or "t-SNE" in line for line in log)  # analysis was up to date too
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before


def test_the_report_puts_ours_beside_the_seeds(reproduced):
    out, _, _, _ = reproduced
    md = (out / "report.md").read_text()
    assert "QUICK VERSION: step counts are scaled: ConvNet runs x0.0004 (6 instead of 15,000 steps); " \
           "Siamese runs x0.0004 (20 instead of 50,000 steps)" in md
    b128 = json.loads((out / "classifier-b128" / "summary.json").read_text())["final_test_accuracy"]
    row = next(line for line in md.splitlines() if line.startswith("| Section 1 (Figure 1), batch 128"))
    assert f"| 0.7503 | {b128:.4f} | {b128 - 0.7503:+.4f} |" in row
    fc2 = json.loads((out / "classifier-b128" / "analysis" / "ovr-fc2.json").read_text())
    assert f"| fc2 features | 0.7685 | {fc2['results']['seed/linear-svm']['accuracy']:.4f} |" in md
    assert "the report gives no number for this run" in md  # batch 128, weight decay 0.005
    siamese = [line for line in md.splitlines() if line.startswith("| Section 2.5")]
    assert len(siamese) == 3 and all("same-class rule on test tuples (a pair accuracy, not OvR)" in line
                                     for line in siamese)
    # each pair accuracy beside what answering 'different' always scores (a long note the rows share goes below the table)
    assert re.search(r"pair accuracy, not OvR\): [0-9.]+, best [0-9.]+ at step [0-9,]+ "
                     r"\(always 'different' scores 0\.\d\d\)", md)
    transfer = [line for line in md.splitlines() if line.startswith("| Section 3.3")]
    assert len(transfer) == 5 and all("not run (left out by --only)" in line for line in transfer)
    assert "Every run was trained with settings changed from the report's: batch_size=16" in md
    # and the rows say it: batch 128 and batch 64 were the same batch size here
    assert "run with batch_size 16 (the preset's 128)" in md and "run with batch_size 16 (the preset's 64)" in md
    tables = md.split("## Figures")[0].split("## Study 1")[1]  # the tables, after the banners
    assert "val_tuples 10 (the preset's 500)" in tables and "tensorboard" not in tables
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11):
        assert f"![Figure {n}](figures/figure-{n}.png)" in md and (out / "figures" / f"figure-{n}.png").is_file()
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 11 and "figures/" not in html  # self-contained
    assert "Transfer" in html and "not drawn" in html  # no transfer runs: said, not drawn


def test_interrupted_runs_resume_and_foreign_ones_are_refused(tmp_path, training_only):
    data = make_image_folders(tmp_path / "data", 4)
    out = tmp_path / "out"
    quick = dict(QUICK, overrides={"batch_size": 8, "tensorboard": False}, max_evals=None)
    (planned,) = [r for r in plan(out, ["study1"], quick["steps_scale"], None, str(data), "cpu",
                                  overrides=quick["overrides"]) if r.name == "classifier-b64"]
    assert run_state(planned) == "new"
    train(planned.config.replace(steps=4), out=planned.path, progress=False)  # as if stopped at step 4
    assert run_state(planned) == "resume"
    other = out / "classifier-b128"
    train(Config.for_study("classifier", steps=2, batch_size=8, lr=1e-3, data=str(data), device="cpu",
                           tensorboard=False), out=other, progress=False)
    with pytest.raises(CifarlabError, match=r"classifier-b128 was trained with other settings: .*lr 0.001"):
        reproduce(out, data=data, only="study1", **quick)
    shutil.rmtree(other)
    (out / "classifier-b128").mkdir()
    # the same settings as planned (the override makes both batch sizes 8), but no checkpoint
    (out / "classifier-b128" / "config.toml").write_text((out / "classifier-b64" / "config.toml").read_text())
    state = reproduce(out, data=data, only="study1", **quick)
    assert state["runs"]["classifier-b64"]["note"] == "resumed"
    steps = [int(line.split(",")[0]) for line in (out / "classifier-b64" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[-1] == 6 and json.loads((out / "classifier-b64" / "summary.json").read_text())["steps"] == 6
    # a run that began without leaving a checkpoint is kept aside, not overwritten
    assert any(p.name.startswith("classifier-b128.incomplete-") for p in out.iterdir())
    # finished runs are not taken for runs of other images
    other_data = make_image_folders(tmp_path / "other data", 4)
    with pytest.raises(CifarlabError, match=rf"classifier-b128 was trained with other settings: data "
                                            rf"'{re.escape(str(data))}' \(now '{re.escape(str(other_data))}'\)"):
        reproduce(out, data=other_data, only="study1", **quick)
    with pytest.raises(CifarlabError, match="--backbone-weights nowhere.pth: no such file"):
        reproduce(tmp_path / "weights", data=data, only="study3", backbone_weights="nowhere.pth", **quick)
    assert not (tmp_path / "weights").exists()


def test_a_long_note_rows_share_is_said_once_below_the_table():
    from cifarlab.report import Row, Table

    plain = "300 steps; best 0.3217 at step 300; run with precision 'bf16' (the preset's 'fp32'), shared"
    skipped = "skipped: backbone weights unavailable (could not download them, and no file was given here)"
    rows = [Row("a", 0.7, 0.3, plain), Row("b", 0.7, 0.3, plain), Row("c", None, None, skipped),
            Row("d", None, None, skipped), Row("e", 0.7, 0.2, "short")]
    table = Table("t", "", rows).shorten_shared_notes()
    assert [r.note for r in table.rows] == ["see note 1 below", "see note 1 below", "skipped: see note 2 below",
                                            "skipped: see note 2 below", "short"]
    assert table.notes == [plain, skipped]


def test_missing_backbone_weights_skip_the_transfer_runs(tmp_path, monkeypatch):
    import cifarlab.backbones as backbones

    monkeypatch.setattr(backbones, "VGG16_URL", (tmp_path / "nowhere" / backbones.VGG16_FILE).as_uri())
    data = make_image_folders(tmp_path / "data", 2)
    log = []
    state = reproduce(tmp_path / "out", data=data, only="study3", log=log.append, **QUICK)
    assert {r["status"] for r in state["runs"].values()} == {"skipped"}
    assert "could not download" in state["runs"]["transfer-features"]["note"]
    # the console says why, with what to do, once (the report's note says it too)
    full = [line for line in log if "vgg16 weights unavailable, so its runs are skipped" in line]
    assert len(full) == 1 and "could not download" in full[0]
    with pytest.raises(CifarlabError, match="--transfer-backbone must be vgg16 or efficientnet-lite0 .got 'resnet'"):
        reproduce(tmp_path / "typo", data=data, only="study1", transfer_backbone="resnet", **QUICK)
    assert not any((tmp_path / "out" / name).exists() for name in state["runs"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("skipped: see note 1 below") == 5 and "Note 1: skipped: backbone weights unavailable" in md
    # the transfer figure names the five runs once, with their shared reason
    assert md.count("could not download") == 2  # the table's note and the figure's caption
    assert "transfer-features, transfer-refine" in md


def test_jobs_train_runs_in_parallel_processes(tmp_path, training_only):
    data = make_image_folders(tmp_path / "data", 30)
    state = reproduce(tmp_path / "out", data=data, only="study2", jobs=2, **{**QUICK, "steps_scale": 0.0002})
    assert [r["status"] for r in state["runs"].values()] == ["finished"] * 3
    threads = max(1, (os.cpu_count() or 1) // 2)  # the workers split the cores
    for exp in ("siamese-exp1", "siamese-exp2", "siamese-exp3"):
        summary = json.loads((tmp_path / "out" / exp / "summary.json").read_text())
        assert summary["steps"] == 10 and summary["device"].startswith(f"cpu ({threads} thread{'s' * (threads > 1)}, ")


def test_a_killed_worker_process_fails_its_run_alone(tmp_path):
    from dataclasses import replace

    from cifarlab.reproduce import _execute_parallel
    from fake_workers import finish_or_die

    runs = plan(tmp_path, ["study2"], 1.0)
    runs[1] = replace(runs[1], path=runs[1].path.with_name(runs[1].name + "-die"))
    log = []
    records = _execute_parallel([(r, False) for r in runs], 2, False, log.append, worker=finish_or_die)
    assert records == {
        "siamese-exp1": {"status": "finished", "note": "trained", "steps": 50000},
        "siamese-exp2": {"status": "failed", "note": "its process was killed by SIGKILL (out of memory?)", "steps": 50000},
        "siamese-exp3": {"status": "finished", "note": "trained", "steps": 50000},  # started after the death
    }
    assert log == ["  siamese-exp2 failed: its process was killed by SIGKILL (out of memory?)"]


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch, training_only):
    import cifarlab.reproduce as rep

    real = rep.train_one

    def train_one(config, path, resume, **kw):
        if path.endswith("classifier-b64-wd0.01"):
            raise RuntimeError("out of memory")
        if path.endswith("classifier-b64-wd0.005"):
            raise CifarlabError("a clear reason")
        return real(config, path, resume, **kw)

    monkeypatch.setattr(rep, "train_one", train_one)
    data = make_image_folders(tmp_path / "data", 4)
    quick = dict(QUICK, overrides={"batch_size": 8, "tensorboard": False})
    state = reproduce(tmp_path / "out", data=data, only="study1", **quick)
    assert state["runs"]["classifier-b64-wd0.01"] == {
        "status": "failed", "note": "RuntimeError: out of memory (at test_reproduce.py:%d)" % (
            train_one.__code__.co_firstlineno + 2), "steps": 6}
    assert state["runs"]["classifier-b64-wd0.005"] == {"status": "failed", "note": "a clear reason", "steps": 6}
    assert sum(r["status"] == "finished" for r in state["runs"].values()) == 7
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| failed: a clear reason |" in md


def test_ctrl_c_stops_reproduce_and_the_next_call_resumes(tmp_path, monkeypatch, training_only):
    import signal

    import cifarlab.engine as engine

    data = make_image_folders(tmp_path / "data", 4)
    quick = dict(QUICK, overrides={"batch_size": 8, "tensorboard": False}, max_evals=None,
                 steps_scale=0.0008)  # 12 steps, checkpoints every 4
    real_run = engine.StepRunner.run
    sixth_steps = []

    def run(self, step):
        if step == 6:
            sixth_steps.append(step)
            if len(sixth_steps) == 2:  # as if the user pressed Ctrl-C during step 6 of the second run
                os.kill(os.getpid(), signal.SIGINT)
        return real_run(self, step)

    monkeypatch.setattr(engine.StepRunner, "run", run)
    log = []
    with pytest.raises(CifarlabError, match="interrupted at step 7.*Run the same `cifarlab reproduce` again"):
        reproduce(tmp_path / "out", data=data, only="study1", log=log.append, **quick)
    assert log[-1] == f"  {'classifier-b128-dropout0.2':<26} interrupted at step 7"  # which run it was
    cut = tmp_path / "out" / "classifier-b128-dropout0.2"
    assert not (cut / "summary.json").exists() and (cut / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "out" / "classifier-b128-dropout0.5").exists()  # nothing after the interrupted run
    # what the call did is on record for a report of the study so far: data, times, the run that ended
    cut_short = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert cut_short["interrupted"] and cut_short["data"]["layout"] and cut_short["wall_seconds"] > 0
    assert {name: (r["status"], r["note"]) for name, r in cut_short["runs"].items()} == {
        "classifier-b128": ("finished", "trained"), "classifier-b128-dropout0.2": ("interrupted", "interrupted at step 7")}
    from cifarlab.report import write_report

    _, md = write_report(tmp_path / "out")  # the report of the study so far says what became of it
    assert ("| classifier-b128-dropout0.2 | classifier | interrupted |  |  |  |  | unfinished: run the same "
            "`cifarlab reproduce` again to resume it |") in md.read_text()
    monkeypatch.setattr(engine.StepRunner, "run", real_run)
    state = reproduce(tmp_path / "out", data=data, only="study1", **quick)
    assert state["runs"]["classifier-b128-dropout0.2"]["note"] == "resumed" and "interrupted" not in state
    assert state["runs"]["classifier-b128"]["note"] == "already finished: skipped"
    assert json.loads((cut / "summary.json").read_text())["steps"] == 12
    steps = [int(line.split(",")[0]) for line in (cut / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 12
    assert {"data_seconds", "train_seconds", "report_seconds"} <= set(state)


# --- the page in a real browser -------------------------------------------------------------------

CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src) || "error")), true);
const __consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.join(" ")); __consoleError(...a); };
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute("data-check", JSON.stringify({images: images.length, broken, errors: window.__errors}));
});
</script>"""


def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0"]
    return subprocess.run([chromium(), *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def test_report_loads_in_a_real_browser(reproduced, tmp_path):
    out, _, _, _ = reproduced
    html = (out / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the report with a check that runs on load
    probe.write_text(html.replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    res = browse(probe, tmp_path, "--dump-dom")
    match = re.search(r'data-check="([^"]*)"', res.stdout)
    assert match, f"the page did not finish loading: {res.stderr[-2000:]}"
    check = json.loads(match.group(1).replace("&quot;", '"'))
    assert check == {"images": 11, "broken": [], "errors": []}
    assert "Uncaught" not in res.stderr and "Failed to load resource" not in res.stderr
    shot = tmp_path / "report.png"
    res = browse(out / "report.html", tmp_path, f"--screenshot={shot}", "--window-size=1280,2000",
                 "--hide-scrollbars")
    assert shot.is_file() and shot.stat().st_size > 50_000, res.stderr[-2000:]


def test_report_of_a_folder_without_runs_is_a_clear_error(tmp_path):
    from cifarlab.report import write_report

    with pytest.raises(CifarlabError, match="holds no preset runs"):
        write_report(tmp_path)
    with pytest.raises(CifarlabError, match="no such folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "weights.pth").write_bytes(b"x")
    with pytest.raises(CifarlabError, match="weights.pth: a file, not a folder"):
        write_report(tmp_path / "weights.pth")


def test_a_finished_run_whose_checkpoints_are_gone_is_flagged_not_silently_unanalysed(tmp_path):
    from cifarlab.reproduce import analyse

    (tmp_path / "classifier-b128").mkdir()
    records = {"classifier-b128": {"status": "finished", "note": "already finished: skipped"}}
    log = []
    analyse(tmp_path, records, 100, progress=False, log=log.append)
    assert "no checkpoints/step-N.safetensors left" in records["classifier-b128"]["analysis"]
    assert len(log) == 1 and "classifier-b128" in log[0]


def test_report_guards_the_users_figures_and_says_which_curves_it_could_not_draw(reproduced, tmp_path):
    from cifarlab.report import write_report

    out = tmp_path / "out"
    shutil.copytree(reproduced[0], out)
    user = out / "figures" / "figure-1.png"
    assert b"cifarlab" in user.read_bytes()[:400]  # its own figures carry its mark
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(user)  # the user's own figure of that name, drawn with matplotlib too
    plt.close(fig)
    mine = user.read_bytes()
    with pytest.raises(CifarlabError, match="figure-1.png: exists and was not drawn by cifarlab"):
        write_report(out)
    assert user.read_bytes() == mine
    user.unlink()
    metrics = out / "classifier-b64" / "metrics.csv"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # the header alone
    write_report(out)
    md = (out / "report.md").read_text()
    assert "Missing: classifier-b64: its metrics.csv has no rows." in md
    # one run's damaged files cost that run's rows and curves, not the report
    damaged = out / "classifier-b64-wd0.01" / "config.toml"
    kept = damaged.read_bytes()
    damaged.write_text("steps = [not toml")
    curves = out / "classifier-b64-wd0.005" / "metrics.csv"
    rows = curves.read_bytes()
    curves.write_text("step,split\nx,y\n")
    write_report(out)
    md = (out / "report.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| Section 1.3.1 (Figure 5), batch 64, weight decay 0.01 |")]
    assert "unreadable: " in row and "config.toml" in row
    assert "classifier-b64-wd0.005: " in md and "metrics.csv: its header is not" in md
    damaged.write_bytes(kept)
    curves.write_bytes(rows)
    # --set batch_size=16 made each batch-128 run its batch-64 twin: the banner says so
    same = next(line for line in md.splitlines() if "SAME RUNS: " in line)
    assert "classifier-b128, classifier-b64;" in same and "classifier-b128-dropout0.5, classifier-b64-dropout0.5" in same
    assert "siamese" not in same
    assert user.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # reproduce.json of the earlier call says finished; the run has since been set to train on
    config = out / "classifier-b128-dropout0.5" / "config.toml"
    config.write_text(config.read_text().replace("steps = 6\n", "steps = 60\n", 1))
    write_report(out)
    (row,) = [line for line in (out / "report.md").read_text().splitlines()
              if line.startswith("| classifier-b128-dropout0.5 | classifier |")]
    assert "| unfinished |" in row and "| finished |" not in row


def test_a_run_trained_with_a_relative_weights_path_is_the_planned_run(tmp_path, monkeypatch):
    """train records the weights file as an absolute path; the next reproduce plans it as typed."""
    from conftest import calibrated_lite0, save_lite0_file

    monkeypatch.chdir(tmp_path)
    save_lite0_file(calibrated_lite0(), tmp_path / "w.pth")
    data = make_image_folders(tmp_path / "data", 2)
    (planned,) = [r for r in plan(tmp_path / "out", ["study3"], 0.0004, 1, str(data), "cpu", "efficientnet-lite0",
                                  "w.pth", overrides={"batch_size": 8, "tensorboard": False})
                  if r.name == "transfer-features"]
    train(planned.config, out=planned.path, progress=False)
    assert run_state(planned) == "finished"


def _copy_of(reproduced, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reproduced[0], out)
    return out


def test_analyses_made_by_hand_otherwise_are_redone_and_older_ones_are_flagged(reproduced, tmp_path, monkeypatch):
    from cifarlab.analysis import read_ovr, read_tsne, run_ovr, run_tsne
    from cifarlab.report import write_report

    out, data = _copy_of(reproduced, tmp_path), reproduced[1]
    monkeypatch.setenv("CIFARLAB_CACHE", str(reproduced[0].parent / "cache"))
    ref = out / "classifier-b128"
    run_ovr(ref, "fc2", seed=5, progress=False)  # by hand: another shuffle of the seed protocol
    run_ovr(ref, "fc1", data=make_image_folders(tmp_path / "other", 3), progress=False)  # other images
    run_tsne(ref, "flatten", perplexity=5, max_points=120, progress=False)
    assert read_ovr(ref, "fc2")["seed"] == 5 and read_tsne(ref, "flatten")["meta"]["perplexity"] == 5
    log = []
    reproduce(out, data=data, only="study1,study2", log=log.append, **QUICK)
    assert read_ovr(ref, "fc2")["seed"] == 0 and read_ovr(ref, "fc1")["n_fit"] == 240
    assert read_tsne(ref, "flatten")["meta"]["perplexity"] == 119 / 3  # what openTSNE uses on 120 points
    assert any("OvR fc2" in line for line in log) and not any("OvR flatten" in line for line in log)
    # an analysis of an earlier checkpoint than the run's last is shown with a warning
    ovr_file = ref / "analysis" / "ovr-flatten.json"
    ovr_file.write_text(ovr_file.read_text().replace('"checkpoint": 6', '"checkpoint": 3'))
    write_report(out)
    md = (out / "report.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| flatten features |")]
    assert "from the checkpoint of step 3, not the last (6)" in row
    assert "4,000 fit, 1,000 scored" in md  # the seed's own OvR protocol, as its footnote says


def test_the_settings_banner_comes_from_the_runs_not_the_last_call(reproduced, tmp_path):
    from cifarlab.report import write_report

    out = _copy_of(reproduced, tmp_path)
    for exp in ("siamese-exp1", "siamese-exp2", "siamese-exp3"):  # as if a later call had --set lr=0.001
        config = out / exp / "config.toml"
        config.write_text(config.read_text().replace("lr = 0.0001\n", "lr = 0.001\n", 1))
    write_report(out)
    md = (out / "report.md").read_text()
    banner = next(line for line in md.splitlines() if "Every run was trained with settings changed" in line)
    # val_tuples is the Siamese study's alone: not a change of the ConvNet runs, so not of every run
    assert "batch_size=16 (" in banner and "lr" not in banner and "tensorboard" not in banner
    assert "val_tuples" not in banner
    siamese_table = md.split("## Section 2.5")[1].split("## Section 3.3")[0]
    assert siamese_table.count("lr 0.001 (the preset's 0.0001)") >= 1  # in the rows' (shared) note
    assert "lr 0.001" not in md.split("## Section 2.5")[0]
    for name in [p.name for p in out.iterdir() if (p / "config.toml").is_file() and p.name.startswith("classifier")]:
        config = out / name / "config.toml"  # now only some runs are changed at all
        text = config.read_text().replace("batch_size = 16\n", f"batch_size = {128 if 'b128' in name else 64}\n", 1)
        config.write_text(text.replace("val_tuples = 10\n", "val_tuples = 500\n", 1))
    write_report(out)
    md = (out / "report.md").read_text()
    assert "Every run was trained" not in md
    assert "Some runs were trained with settings changed from the report's (`--set`): siamese-exp1" in md


def test_a_run_that_failed_to_reach_its_planned_steps_shows_the_failure_not_its_older_number(
        tmp_path, monkeypatch, training_only):
    import cifarlab.reproduce as rep

    data = make_image_folders(tmp_path / "data", 4)
    out = tmp_path / "out"
    quick = dict(QUICK, overrides={"batch_size": 8, "tensorboard": False})
    (planned,) = [r for r in plan(out, ["study1"], quick["steps_scale"], quick["max_evals"], str(data), "cpu",
                                  overrides=quick["overrides"]) if r.name == "classifier-b128"]
    train(planned.config.replace(steps=4), out=planned.path, progress=False)  # trained by hand, shorter
    real = rep.train_one

    def train_one(config, path, resume, **kw):
        if path.endswith("classifier-b128"):
            raise CifarlabError("classifier-b128: the disk is full")
        return real(config, path, resume, **kw)

    monkeypatch.setattr(rep, "train_one", train_one)
    state = reproduce(out, data=data, only="study1", **quick)
    assert state["failed"] == ["classifier-b128"]
    md = (out / "report.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| Section 1 (Figure 1), batch 128,")]
    cells = [c.strip() for c in row.split("|")]
    assert cells[2:5] == ["0.7503", "-", "-"] and "failed: classifier-b128: the disk is full" in cells[5]
    (run_row,) = [line for line in md.splitlines() if line.startswith("| classifier-b128 | classifier |")]
    assert "| failed |" in run_row and "QUICK VERSION" in md and "4 instead of" not in md


def test_runs_trained_otherwise_are_refused_before_any_data_is_loaded(reproduced, tmp_path, monkeypatch):
    import cifarlab.data

    out = _copy_of(reproduced, tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("data loaded (or downloaded) before the runs were checked")

    monkeypatch.setattr(cifarlab.data, "load_cifar10", no_loading)
    with pytest.raises(CifarlabError, match="classifier-b128 was trained with other settings: lr"):
        reproduce(out, data=reproduced[1], only="study1", **dict(QUICK, overrides={**QUICK["overrides"], "lr": 1e-3}))


def test_analysis_during_training_is_made_while_later_runs_train_and_equals_the_one_after(reproduced, tmp_path,
                                                                                           monkeypatch):
    """`--analysis during`: the reference run's OvR and t-SNE come from a process of their own
    while a later run trains (that run waits for them: after training, it would wait forever),
    with the numbers the analysis after training gave."""
    import time

    import cifarlab.reproduce as rep
    from cifarlab.analysis import read_ovr, read_tsne

    first_out, data, _, _ = reproduced
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    reference, last = out / "classifier-b128", [r.name for r in plan(tmp_path, ["study1"], 1.0)][-1]
    before = {layer: read_ovr(reference, layer)["accuracy"] for layer in ("flatten", "fc1", "fc2")}
    shutil.rmtree(reference / "analysis")  # to be made again
    shutil.rmtree(out / last)  # to be trained again
    train_one, waited = rep.train_one, []

    def train_last_after_the_analysis(config, path, resume, *args, **kwargs):
        deadline = time.monotonic() + 600  # generous: a slow machine waits longer, a broken one still fails
        while not (read_ovr(reference, "fc2") and read_tsne(reference, "fc2")) and time.monotonic() < deadline:
            time.sleep(0.2)
        waited.append((Path(path).name, bool(read_tsne(reference, "fc2"))))
        return train_one(config, path, resume, *args, **kwargs)

    monkeypatch.setattr(rep, "train_one", train_last_after_the_analysis)
    log = []
    state = reproduce(out, data=data, only="study1", analysis="during", log=log.append, **QUICK)
    assert waited == [(last, True)]
    assert state["unanalysed"] == [] and state["failed"] == []
    assert {layer: read_ovr(reference, layer)["accuracy"] for layer in before} == before
    assert any("classifier-b128" in line and "OvR fc2" in line for line in log)
    for folder, when in ((out, "during"), (first_out, "after")):  # the report says which, and what it cost after
        assert re.search(rf"[\d,.]+ s of training, then [\d,.]+ s for the analysis \(made {when} the training\)",
                         (folder / "report.md").read_text())
    coords = {layer: read_tsne(reference, layer)["coords"] for layer in before}
    for layer, xy in coords.items():
        np.testing.assert_allclose(xy, read_tsne(first_out / "classifier-b128", layer)["coords"], rtol=1e-4, atol=1e-4)
    # a second call finds every analysis up to date and starts no process to make one
    log.clear()
    spawned, spawn = [], rep._spawn
    monkeypatch.setattr(rep, "_spawn", lambda *args: spawned.append(args[2]) or spawn(*args))
    state = reproduce(out, data=data, only="study1", analysis="during", log=log.append, **QUICK)
    assert state["unanalysed"] == [] and not any("OvR" in line or "t-SNE" in line for line in log)
    assert spawned == []


def _pids_of(path: Path, timeout: float = 60) -> list[int]:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return [int(pid) for pid in path.read_text().split()]


def _gone(pids: list[int], timeout: float = 10) -> bool:
    """Whether every process is gone (or a zombie) within `timeout` seconds."""
    import time

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        if Path("/proc").is_dir():
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return False
        else:
            state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        return bool(state) and not state.startswith("Z")

    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def test_analysis_beside_training_leaves_a_killed_one_for_after_and_stop_ends_a_running_one(tmp_path, monkeypatch):
    import cifarlab.reproduce as rep
    from fake_workers import analyse_hang_or_die

    monkeypatch.setattr(rep, "ANALYSES", {name: ("fc2",) for name in ("a", "b-die", "c-hang", "d-fail")})
    log = []
    background = rep.AnalysisBesideTraining(tmp_path, 10, log.append, worker=analyse_hang_or_die)
    for name in ("a", "b-die", "not-analysed", "a", "d-fail"):
        background.submit(name)
    assert background.finish() == {"a"}  # the killed and the failed one are left for after the training
    assert log == ["  a analysed", "  b-die" + " " * 21 + " its analysis process was killed by SIGKILL "
                   "(out of memory?); it is made again after the training",
                   "  d-fail analysis failed: out of memory", "  d-fail" + " " * 20 + " it is made again after the training"]
    # stop() ends the analysis in progress and the processes it started (its own process group)
    background = rep.AnalysisBesideTraining(tmp_path, 10, log.append, worker=analyse_hang_or_die)
    background.submit("c-hang")
    pids = _pids_of(tmp_path / "c-hang.pids")
    background.stop()
    assert _gone(pids) and not background.done


def test_an_analysis_ends_with_the_process_that_started_it(tmp_path):
    """Killed outright (SIGKILL: no chance to stop its analyses), the main process takes its
    analysis process and the processes that one started with it."""
    import signal
    import sys

    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "import cifarlab.reproduce as rep\nfrom fake_workers import analyse_hang_or_die\n"
              "rep.ANALYSES = {'c-hang': ('fc2',)}\n"
              f"b = rep.AnalysisBesideTraining({str(tmp_path)!r}, 10, worker=analyse_hang_or_die)\n"
              "b.submit('c-hang'); time.sleep(600)\n")
    main = subprocess.Popen([sys.executable, "-c", script])
    try:
        pids = _pids_of(tmp_path / "c-hang.pids")
    finally:
        main.send_signal(signal.SIGKILL)
        main.wait()
    assert _gone(pids)


def test_analyses_begin_with_sigint_blocked_in_a_fresh_interpreter():
    """A fresh interpreter, as a user's: no multiprocessing resource tracker started yet (starting it
    unblocks SIGINT in the thread that does), so a Ctrl-C cannot reach an analysis in its start-up."""
    import sys

    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "import cifarlab.reproduce as rep\nfrom fake_workers import analyse_says_if_sigint_was_blocked\n"
              "rep.ANALYSES = {'a': ('fc2',), 'b': ('fc2',)}\n"
              "b = rep.AnalysisBesideTraining('.', 10, worker=analyse_says_if_sigint_was_blocked)\n"
              "b.submit('a'); b.submit('b'); b.finish()\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["a began with SIGINT blocked: True", "b began with SIGINT blocked: True"]


def test_ctrl_c_in_training_ends_the_analysis_beside_it(tmp_path, monkeypatch):
    import functools

    import cifarlab.reproduce as rep
    from cifarlab.engine import TrainingInterrupted
    from fake_workers import analyse_hang_or_die

    monkeypatch.setenv("CIFARLAB_TEST_HANG", "classifier-b128")
    monkeypatch.setattr(rep, "AnalysisBesideTraining",
                        functools.partial(rep.AnalysisBesideTraining, worker=analyse_hang_or_die))
    pids_file, started = tmp_path / "out" / "classifier-b128.pids", []

    def train_one(config, path, resume, *args, **kwargs):
        started.append(Path(path).name)
        if len(started) == 2:  # Ctrl-C in the second run, while the first one's analysis goes on
            started.extend(_pids_of(pids_file))
            raise TrainingInterrupted("interrupted at step 1")
        return {}

    monkeypatch.setattr(rep, "train_one", train_one)
    with pytest.raises(TrainingInterrupted, match="Run the same `cifarlab reproduce` again"):
        reproduce(tmp_path / "out", data=make_image_folders(tmp_path / "data", 2), only="study1",
                  analysis="during", **QUICK)
    assert started[0] == "classifier-b128" and len(started) == 4 and _gone(started[2:])


def test_runs_at_once_hand_each_finished_run_to_the_analysis_beside(tmp_path):
    from dataclasses import replace

    from cifarlab.reproduce import AnalysisBesideTraining, _execute_parallel
    from fake_workers import analyse_hang_or_die, finish_or_die

    runs = plan(tmp_path, ["study2"], 1.0)
    runs[1] = replace(runs[1], path=runs[1].path.with_name(runs[1].name + "-die"))
    log = []
    background = AnalysisBesideTraining(tmp_path, 10, log.append, worker=analyse_hang_or_die)
    records = _execute_parallel([(r, False) for r in runs], 2, False, log.append, worker=finish_or_die,
                                background=background)
    assert [records[name]["status"] for name in ("siamese-exp1", "siamese-exp2", "siamese-exp3")] == \
        ["finished", "failed", "finished"]
    assert background.finish() == {"siamese-exp1", "siamese-exp3"}  # not the failed run
    assert sorted(line for line in log if "analysed" in line) == ["  siamese-exp1 analysed", "  siamese-exp3 analysed"]


def test_runs_at_once_record_and_log_the_run_ctrl_c_cut_short(tmp_path):
    from dataclasses import replace

    from cifarlab.reproduce import _execute_parallel
    from fake_workers import finish_or_be_interrupted

    runs = plan(tmp_path, ["study2"], 1.0)
    runs[0] = replace(runs[0], path=runs[0].path.with_name(runs[0].name + "-ctrl-c"))
    log = []
    with pytest.raises(CifarlabError, match="interrupted; the runs that had started saved their progress") as caught:
        _execute_parallel([(r, False) for r in runs], 2, False, log.append, worker=finish_or_be_interrupted)
    records = caught.value.records
    assert records["siamese-exp1"] == {"status": "interrupted", "note": "interrupted at step 7",
                                       "steps": runs[0].config.steps}
    assert f"  {'siamese-exp1':<26} interrupted at step 7" in log


@pytest.mark.parametrize("first", ["SIGTERM", "SIGINT"])
def test_sigterm_in_the_analysis_stops_reproduce_as_ctrl_c_does_and_says_so(tmp_path, monkeypatch, first,
                                                                          sigterm_caught):
    """Between the runs and in the analysis after them no training takes SIGTERM over: reproduce
    stops as on Ctrl-C, with reproduce.json saying so; a SIGTERM after a stop (of either) cannot
    cut its record short."""
    import signal

    import cifarlab.reproduce as rep

    def analyse(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, first))

    written = rep.write_json

    def write_json(path, value):  # the scheduler's second SIGTERM, while the stop is recorded
        os.kill(os.getpid(), signal.SIGTERM)
        written(path, value)

    monkeypatch.setattr(rep, "analyse", analyse)
    monkeypatch.setattr(rep, "write_json", write_json)
    with pytest.raises(KeyboardInterrupt):
        reproduce(tmp_path / "out", data=make_image_folders(tmp_path / "data", 30), only="study2", **QUICK)
    state = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert state["interrupted"] and [r["status"] for r in state["runs"].values()] == ["finished"] * 3
    assert sigterm_caught == []
    os.kill(os.getpid(), signal.SIGTERM)  # afterwards, the handler it found is back
    assert sigterm_caught == [signal.SIGTERM]


def reproduce_raising_no_keyboard_interrupt(*args, **kwargs):
    """reproduce(), where a KeyboardInterrupt that escapes fails the test (not the whole session)."""
    try:
        return reproduce(*args, **kwargs)
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped reproduce", pytrace=False)


def test_sigterm_between_runs_stops_reproduce_with_the_runs_so_far_on_record(tmp_path, monkeypatch, sigterm_caught,
                                                                            training_only):
    import signal

    import cifarlab.reproduce as rep

    real = rep.train_one

    def train_one(config, path, resume, **kw):  # SIGTERM just after the first run ends
        summary = real(config, path, resume, **kw)
        os.kill(os.getpid(), signal.SIGTERM)
        return summary

    monkeypatch.setattr(rep, "train_one", train_one)
    with pytest.raises(CifarlabError, match=r"^interrupted. Run the same `cifarlab reproduce` again to go on$"):
        reproduce_raising_no_keyboard_interrupt(tmp_path / "out", data=make_image_folders(tmp_path / "data", 30), only="study2", **QUICK)
    state = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert state["interrupted"] and {n: r["status"] for n, r in state["runs"].items()} == {"siamese-exp1": "finished"}
    assert sigterm_caught == []


def test_a_second_sigterm_while_a_runs_stop_is_recorded_changes_nothing(tmp_path, monkeypatch, sigterm_caught,
                                                                       training_only):
    """A scheduler's SIGTERM, then another (or `kill` twice): the first stops the run in training,
    which saves; the second, once the training has given SIGTERM back, must not cut the record short."""
    import signal

    import cifarlab.engine as engine
    import cifarlab.reproduce as rep

    real_run, real_record = engine.StepRunner.run, rep._record

    def run(self, step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run(self, step)

    def record(run, status, note):
        if status == "interrupted":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_record(run, status, note)

    monkeypatch.setattr(engine.StepRunner, "run", run)
    monkeypatch.setattr(rep, "_record", record)
    with pytest.raises(CifarlabError, match="interrupted at step 7; progress saved.*Run the same `cifarlab reproduce`"):
        reproduce_raising_no_keyboard_interrupt(tmp_path / "out", data=make_image_folders(tmp_path / "data", 30), only="study2", **QUICK)
    state = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert state["runs"]["siamese-exp1"]["note"] == "interrupted at step 7" and sigterm_caught == []


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing workers among a process's children (not its resource tracker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                children.append(int(child))
    return children


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_runs_at_once_save_and_stop_on_sigterm_and_when_the_main_process_is_killed(tmp_path, how):
    """`kill` (or a job scheduler's time limit) sends the main process SIGTERM: it passes it on,
    and the runs save and stop as on Ctrl-C. Killed outright, the main process cannot: its runs
    see it gone and do the same, rather than train on unwatched."""
    import signal
    import sys
    import time

    data, out = make_image_folders(tmp_path / "data", 4), tmp_path / "out"
    # no checkpoint but the one a stop saves; metrics.csv, written at the first evaluation, says
    # that a run trains
    settings = {"batch_size": 4, "steps": 1_000_000, "eval_every": 20, "checkpoint_every": 1_000_000,
                "tensorboard": False}
    script = ("import json\nfrom pathlib import Path\nimport cifarlab.reproduce as rep\n"
              f"runs = rep.plan(Path({str(out)!r}), ['study1'], 1.0, None, {str(data)!r}, 'cpu', None, None, "
              f"{settings!r})[:2]\n"
              "try:\n    rep._execute_parallel([(r, False) for r in runs], 2, False, print)\n"
              "except rep.CifarlabError as err:\n    print(json.dumps({'message': str(err), 'records': err.records}))\n")
    main = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    names = ("classifier-b128", "classifier-b128-dropout0.2")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not all((out / n / "metrics.csv").exists() for n in names) and time.monotonic() < deadline:
            assert main.poll() is None, "the main process ended before its runs trained"
            time.sleep(0.2)
        workers = _spawned_children(main.pid)
        assert len(workers) == 2
        main.send_signal(getattr(signal, how))
        printed, _ = main.communicate(timeout=120)
        assert _gone(workers, timeout=60)
    finally:  # a failure leaves no million-step run behind
        main.kill()
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    steps = {n: torch_step(out / n / "checkpoints" / "last.pt") for n in names}  # saved as they stopped
    assert all(step >= 20 for step in steps.values())
    if how == "SIGTERM":
        said = json.loads(printed.splitlines()[-1])
        assert said["message"].startswith("interrupted; the runs that had started saved their progress")
        assert {n: r["note"] for n, r in said["records"].items()} == {n: f"interrupted at step {steps[n]}" for n in names}
    for run in plan(out, ["study1"], 1.0, None, str(data), "cpu", None, None, settings)[:2]:
        assert run_state(run) == "resume"


def torch_step(checkpoint: Path) -> int:
    import torch

    return torch.load(checkpoint, weights_only=True)["step"]


def test_analysis_when_is_checked(tmp_path):
    with pytest.raises(CifarlabError, match="--analysis must be one of auto, during, after \\(got 'soon'\\)"):
        reproduce(tmp_path / "out", data=tmp_path / "no-data", **{**QUICK, "analysis": "soon"})


def test_a_run_another_process_trains_is_neither_moved_aside_nor_recorded_as_failed(tmp_path):
    """Before its first checkpoint a run in training looks abandoned (config.toml, no last.pt):
    a second reproduce into the same folder must refuse, not move it aside and train anew."""
    out, data = tmp_path / "out", make_image_folders(tmp_path / "data", 2)
    run = plan(out, ["study1"], QUICK["steps_scale"], QUICK["max_evals"], str(data), "cpu", None, None,
               QUICK["overrides"])[0]
    from cifarlab.runs import RunDir

    started = RunDir.create(str(run.path), "classifier")
    started.write_config(run.config)
    with run_locked_by_another_process(run.path):
        with pytest.raises(CifarlabError, match="classifier-b128: another process is training this run right now"):
            reproduce(out, data=data, only="study1", **QUICK)
    assert sorted(p.name for p in out.iterdir()) == ["classifier-b128"] and not (out / "reproduce.json").exists()


def test_an_interrupted_parallel_call_keeps_the_records_of_runs_it_did_not_start(tmp_path, monkeypatch):
    import cifarlab.reproduce as rep
    from cifarlab.fileio import write_json
    from cifarlab.runs import RunDir

    runs = plan(tmp_path / "out", ["study1"], 0.0004, device="cpu")[:3]
    done = RunDir.create(str(runs[0].path), "classifier")
    done.write_config(runs[0].config)
    write_json(runs[0].path / "summary.json", {"steps": runs[0].config.steps})

    def interrupted(*args, **kwargs):
        raise rep._interrupted("interrupted", {runs[1].name: {"status": "failed"}})

    monkeypatch.setattr(rep, "_execute_parallel", interrupted)
    with pytest.raises(CifarlabError) as caught:
        rep.execute(runs, jobs=2, progress=False, log=lambda *_: None)
    assert caught.value.records == {runs[0].name: caught.value.records[runs[0].name], runs[1].name: {"status": "failed"}}
    assert caught.value.records[runs[0].name]["status"] == "finished"
