"""`cifarlab report` on folders of runs written by hand (no training): what its figures say of a
run cut short, how its captions set our protocols beside the seed's, and its tables grouped as
the seed's. test_reproduce.py covers the report of real (tiny) runs."""

import json

import numpy as np

from cifarlab.analysis import ovr_path, tsne_path
from cifarlab.config import to_toml
from cifarlab.fileio import write_json
from cifarlab.presets import load_preset
from cifarlab.report import write_report
from cifarlab.runs import METRIC_FIELDS

N_TEST = 300
STATE = {"data": {"layout": "image-folder", "train": 300, "test": N_TEST, "checksum": "x"}, "runs": {}}


def fake_run(root, name, reached=None, accuracy=0.5):
    """A run of preset `name` as training leaves it: its config, metrics to step `reached`
    (default: its planned steps) and, when it got there, its summary."""
    cfg = load_preset(name).config(tensorboard=False)
    path = root / name
    path.mkdir(parents=True)
    (path / "config.toml").write_text(to_toml(cfg.to_dict()))
    last = cfg.steps if reached is None else reached
    rows = [",".join(METRIC_FIELDS)]
    for step in (last // 2, last):
        rows += [f"{step},train,1.0,{accuracy},1.0", f"{step},test,1.1,{accuracy},1.0"]
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    if last == cfg.steps:
        write_json(path / "summary.json", {"steps": cfg.steps, "final_test_accuracy": accuracy,
                                           "best_test_accuracy": accuracy, "best_test_step": cfg.steps,
                                           "device": "cpu", "wall_seconds": 1.0, "ms_per_step": 1.0})
    return path


def write_state(root):
    write_json(root / "reproduce.json", STATE)


def test_a_figure_says_which_of_its_runs_stopped_short(tmp_path, monkeypatch):
    import cifarlab.plots

    fake_run(tmp_path, "siamese-exp1", reached=16969)  # interrupted at step 16,969 of 50,000
    fake_run(tmp_path, "siamese-exp2")
    drawn = {}
    real = cifarlab.plots.plot_curves

    def plot_curves(series, out, title=None):
        drawn[title] = [label for label, _ in series]
        return real(series, out, title)

    monkeypatch.setattr(cifarlab.plots, "plot_curves", plot_curves)
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    figure9 = md.split("### Figure 9")[1].split("### Figure 10")[0]
    assert "siamese-exp1: unfinished: step 16,969 of 50,000" in figure9
    assert "siamese-exp2: unfinished" not in figure9
    assert drawn["Figure 9"] == ["siamese-exp1 (unfinished: step 16,969 of 50,000)", "siamese-exp2"]
    figure10 = md.split("### Figure 10")[1].split("### Figure 11")[0]
    assert "unfinished" not in figure10  # exp2 and exp3: one finished, one not run at all


def test_captions_say_how_our_ovr_and_tsne_differ_from_the_seeds_and_unconverged_fits_are_flagged(tmp_path):
    ref = fake_run(tmp_path, "classifier-b128")
    write_state(tmp_path)
    points = 120  # fewer than the test set
    for layer, dims in {"flatten": 4096, "fc1": 384, "fc2": 192}.items():
        result = {"accuracy": 0.6, "n_fit": 240, "n_score": 60, "fit_seconds": 1.0, "checkpoint": 15000,
                  "converged": layer != "flatten"}
        write_json(ovr_path(ref, layer), {"results": {"seed/linear-svm": result}})
        meta = {"layer": layer, "split": "test", "checkpoint": 15000, "points": points, "perplexity": 40.0, "input_dims": dims,
                "pca_dims": 50, "classes": [f"c{i}" for i in range(10)]}
        tsne_path(ref, layer).parent.mkdir(exist_ok=True)
        np.savez(tsne_path(ref, layer), coords=np.random.default_rng(0).normal(size=(points, 2)).astype(np.float32),
                 labels=np.arange(points) % 10, rows=np.arange(points), meta=np.array(json.dumps(meta)))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    ovr = md.split("## Section 1.4.1")[1].split("## Section 2.5")[0]
    for words in ("StandardScaler", "LinearSVC", "squared hinge loss", "C = 1/d", "tol 0.1", "at most 1,000 passes",
                  "OneVsRestClassifier(SVC(kernel='linear'))", "hinge loss with C = 1 on the raw features"):
        assert words in ovr, words
    (flatten,) = [line for line in ovr.splitlines() if line.startswith("| flatten features |")]
    assert "| 0.6000 (did not converge) |" in flatten and "iteration cap" in flatten
    assert "did not converge" not in ovr.split("| fc1 features |")[1]
    siamese = md.split("## Section 2.5")[1].split("## Section 3.3")[0]
    assert "LinearSVC, not the seed's SVC(kernel='linear') on the raw features" in siamese
    figure7 = md.split("### Figure 7")[1].split("### Figure 8")[0]
    for words in (f"openTSNE on {points} of the {N_TEST} test images", "perplexity 40", "PCA initialisation",
                  "250 early-exaggeration then 500 iterations", "flatten 4,096-d, fc1 384-d, fc2 192-d reduced to "
                  "50 dimensions by PCA first", "TSNE(perplexity=40, n_iter=300) on the raw features",
                  "300 iterations from a random start"):
        assert words in figure7, words


def test_the_tsne_caption_states_opentsnes_own_defaults():
    """embed_tsne keeps openTSNE's schedule and start; the caption must follow a change of them."""
    import inspect

    from openTSNE import TSNE

    from cifarlab.report import TSNE_EXAGGERATED_ITER, TSNE_ITER

    defaults = {k: p.default for k, p in inspect.signature(TSNE).parameters.items()}
    assert (defaults["early_exaggeration_iter"], defaults["n_iter"]) == (TSNE_EXAGGERATED_ITER, TSNE_ITER)
    assert defaults["initialization"] == "pca"


def test_study1_rows_are_the_seeds_tables_each_with_its_baseline(tmp_path):
    names = ["classifier-b128", "classifier-b128-wd0.005", "classifier-b128-dropout0.5", "classifier-b128-dropout0.2",
             "classifier-b64", "classifier-b64-wd0.01", "classifier-b64-wd0.005", "classifier-b64-dropout0.5",
             "classifier-b64-dropout0.2"]
    for i, name in enumerate(names):
        fake_run(tmp_path, name, accuracy=0.70 + i / 100)
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    study1 = md.split("## Study 1")[1].split("## Section 1.4.1")[0]
    sections = {part.split("\n")[0]: [line.split(" | ")[:3] for line in part.splitlines() if line.startswith("| ")
                                      and not line.startswith(("| experiment", "|---"))]
                for part in study1.split("### ")[1:]}
    expected = {  # the seed's tables (sections 1.2 to 1.3.2), their numbers, ours
        "Section 1.2 (Figure 3): dropout, batch 128": [
            ["| Section 1.2 baseline: batch 128, no dropout", "0.7503", "0.7000"],
            ["| Section 1.2 (Figure 3), batch 128, dropout 0.5", "0.7324", "0.7200"],
            ["| Section 1.2 (Figure 3), batch 128, dropout 0.2", "0.7433", "0.7300"]],
        "Section 1.3 (Figure 4): batch 64 against batch 128": [
            ["| Section 1.3 baseline: batch 128", "0.7503", "0.7000"],
            ["| Section 1.3 (Figure 4), batch 64", "0.7520", "0.7400"]],
        "Section 1.3.1 (Figure 5): weight decay, batch 64": [
            ["| Section 1.3.1 baseline: batch 64, no regularisation", "0.7520", "0.7400"],
            ["| Section 1.3.1 (Figure 5), batch 64, weight decay 0.01", "0.7634", "0.7500"],
            ["| Section 1.3.1 (Figure 5), batch 64, weight decay 0.005", "0.7569", "0.7600"]],
        "Section 1.3.2 (Figure 6): dropout, batch 64": [
            ["| Section 1.3.2 baseline: batch 64, no dropout", "0.7520", "0.7400"],
            ["| Section 1.3.2 (Figure 6), batch 64, dropout 0.5", "0.7279", "0.7700"],
            ["| Section 1.3.2 (Figure 6), batch 64, dropout 0.2", "0.7493", "0.7800"]],
    }
    for title, rows in expected.items():
        assert sections[title] == rows, title
    (first,) = [title for title in sections if title.startswith("Sections 1 and 1.1 (Figures 1 and 2)")]
    assert [row[0] for row in sections[first]] == ["| Section 1 (Figure 1), batch 128, no regularisation",
                                                   "| Section 1.1 (Figure 2), batch 128, weight decay 0.005"]
    assert len(sections) == 5  # every run in a seed table: no "Other runs"
    html = (tmp_path / "report.html").read_text()
    assert html.count("<h3>Section 1.") == 4 and html.count('<table class="results">') == 5 + 3


def test_the_environment_says_a_reproduce_call_was_interrupted_and_what_its_time_went_to(tmp_path):
    fake_run(tmp_path, "classifier-b128")
    write_json(tmp_path / "reproduce.json", {**STATE, "wall_seconds": 75.5, "data_seconds": 3.25, "jobs": 1,
                                             "analysis": "after", "finished_at": "2026-12-02T15:00:00",
                                             "interrupted": True})
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("75.5 s, 1 job at a time: 3.2 s loading the data; interrupted at 2026-12-02T15:00:00: "
            "run it again to go on") in md


def test_a_damaged_reproduce_json_is_said_not_silently_left_out(tmp_path):
    fake_run(tmp_path, "classifier-b128")
    (tmp_path / "reproduce.json").write_text("{")
    write_report(tmp_path)
    assert "| reproduce.json | unreadable (damaged, or not JSON)" in (tmp_path / "report.md").read_text()


def test_a_tsne_caption_claims_all_test_images_only_when_it_knows_how_many_there_are():
    from cifarlab.report import _tsne_protocol

    assert "openTSNE on 120 test images," in _tsne_protocol([{"points": 120}], None)
    assert "openTSNE on 120 of the 300 test images" in _tsne_protocol([{"points": 120}], 300)
    assert "openTSNE on all 300 test images" in _tsne_protocol([{"points": 300}], 300)


def test_a_run_whose_config_toml_is_damaged_is_listed_as_unreadable_not_left_out(tmp_path):
    fake_run(tmp_path, "classifier-b128")
    fake_run(tmp_path, "classifier-b64")
    (tmp_path / "classifier-b64" / "config.toml").write_text("steps = [")
    write_state(tmp_path)
    write_report(tmp_path)
    runs = (tmp_path / "report.md").read_text().split("## Runs")[1]
    row = next(line for line in runs.splitlines() if line.startswith("| classifier-b64 |"))
    assert "| unreadable |" in row and "unreadable: " in row and "classifier-b64/config.toml" in row


def test_runs_that_are_not_presets_are_named_not_silently_left_out(tmp_path):
    import shutil

    import pytest

    from cifarlab import CifarlabError

    fake_run(tmp_path / "mine", "classifier-b64")
    shutil.move(tmp_path / "mine" / "classifier-b64", tmp_path / "mine" / "my-ablation")
    with pytest.raises(CifarlabError, match=r"its runs \(my-ablation\) are none of the report's presets.*"
                                            r"`cifarlab compare .*mine` tables them"):
        write_report(tmp_path / "mine")
    assert not (tmp_path / "mine" / "report.md").exists()
    fake_run(tmp_path / "mine", "classifier-b128")
    write_state(tmp_path / "mine")
    write_report(tmp_path / "mine")
    md = (tmp_path / "mine" / "report.md").read_text()
    assert "**Not in this report: my-ablation, in the same folder but none of the report's presets;" in md
    assert "Not in this report: my-ablation" in (tmp_path / "mine" / "report.html").read_text()
    # what reproduce itself moved aside (a run begun anew) is not taken for a run of the user's
    fake_run(tmp_path / "mine", "classifier-b64")
    shutil.move(tmp_path / "mine" / "classifier-b64", tmp_path / "mine" / "classifier-b64.incomplete-20261203-120000")
    write_report(tmp_path / "mine")
    md = (tmp_path / "mine" / "report.md").read_text()
    assert "**Not in this report: my-ablation, in the same folder" in md
    assert "| set aside by reproduce | classifier-b64.incomplete-20261203-120000: attempts that had started" in md


def test_the_settings_banner_names_the_flag_that_changed_a_setting(tmp_path):
    from cifarlab.report import ReportData, settings_warning

    for name in ("classifier-b128", "transfer-features"):
        fake_run(tmp_path, name)
    write_state(tmp_path)
    config = tmp_path / "transfer-features" / "config.toml"
    config.write_text(config.read_text().replace('backbone_weights = "imagenet"', 'backbone_weights = "none"', 1))
    assert settings_warning(ReportData(tmp_path)).startswith(
        "Some runs were trained with settings changed from the report's (`--backbone-weights`): transfer-features;")
    config = tmp_path / "classifier-b128" / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.0001\n", "lr = 0.001\n", 1))
    assert "(`--backbone-weights`, `--set`): classifier-b128, transfer-features;" in settings_warning(ReportData(tmp_path))


def test_an_unfinished_run_names_the_call_that_goes_on_and_whether_it_resumes_or_starts_anew(tmp_path):
    fake_run(tmp_path, "classifier-b128")
    for name in ("classifier-b64", "classifier-b64-dropout0.5"):  # started, no metrics yet
        (fake_run(tmp_path, name) / "metrics.csv").unlink()
        (tmp_path / name / "summary.json").unlink()
    (tmp_path / "classifier-b64" / "checkpoints").mkdir()
    (tmp_path / "classifier-b64" / "checkpoints" / "last.pt").write_bytes(b"saved")
    command = f"cifarlab reproduce --only study1 --steps-scale 0.01 --out {tmp_path}"
    write_json(tmp_path / "reproduce.json", {**STATE, "command": command})
    write_report(tmp_path)
    runs = (tmp_path / "report.md").read_text().split("## Runs")[1]
    row = {name: next(line for line in runs.splitlines() if line.startswith(f"| {name} |"))
           for name in ("classifier-b64", "classifier-b64-dropout0.5")}
    assert f"unfinished: run `{command}` again to resume it" in row["classifier-b64"]
    assert f"unfinished, nothing saved yet: run `{command}` again to train it anew" in row["classifier-b64-dropout0.5"]
    write_state(tmp_path)  # a reproduce.json that does not say the command
    write_report(tmp_path)
    assert "run the same `cifarlab reproduce` again to resume it" in (tmp_path / "report.md").read_text()


def test_a_missing_ovr_names_the_command_that_makes_it_for_that_run(tmp_path):
    from cifarlab.report import REFERENCE_RUN

    fake_run(tmp_path, REFERENCE_RUN)  # finished, no analysis yet
    write_state(tmp_path)
    write_report(tmp_path)
    assert f"no OvR yet: `cifarlab ovr {tmp_path / REFERENCE_RUN} --layer all`" in (tmp_path / "report.md").read_text()


def test_a_difference_is_of_the_numbers_as_shown_and_never_a_red_minus_zero():
    from cifarlab.report import Row, Table, render_html

    rows = [Row("rounds away", 0.7503, 0.75026), Row("up", 0.7503, 0.75036), Row("down", 0.6305, 0.5891),
            Row("no seed", None, 0.5)]
    assert [r.difference for r in rows] == [0.0, 0.0001, -0.0414, None]
    page = render_html([Table("t", "c", rows)], [], [], [], [])
    assert '<td class="num up">+0.0000</td>' in page and "-0.0000" not in page
    assert '<td class="num down">-0.0414</td>' in page


def test_markdown_shows_user_text_as_written(tmp_path):
    """A skip reason or run name with <...> would be an HTML tag in Markdown (hidden by a
    browser), and &name; an entity; a | would cut the table's cell."""
    from cifarlab.report import Figure, Row, Table, render_markdown

    note = "weights <not> found & offline; see &amp; | here"
    md = render_markdown([Table("t", "caption <b>", [Row("x<y>", 0.5, 0.5, note=note)], notes=["a &lt; b"])],
                         [Figure("f", "made from <runs>", None)], [], [], ["<warning>"], tmp_path)
    assert "| x\\<y> |" in md and "weights \\<not> found & offline; see \\&amp; \\| here" in md
    assert "caption \\<b>" in md and "Note 1: a \\&lt; b" in md and "made from \\<runs>" in md
    assert "> **\\<warning>**" in md


def test_an_analysis_made_by_hand_otherwise_than_reproduce_makes_it_is_said(tmp_path):
    """`cifarlab ovr --seed 7` or `tsne --data OTHER` on a run of the study: the report shows
    their numbers and figures, and says how they were made."""
    ref = fake_run(tmp_path, "classifier-b128")
    write_json(tmp_path / "reproduce.json", {**STATE, "data": {**STATE["data"], "source": "/data/cifar10"}})
    common = {"n_fit": 240, "n_score": 60, "fit_seconds": 1.0, "checkpoint": 15000, "converged": True}
    made = {"flatten": {"seed": 7, "data": "/data/cifar10"}, "fc1": {"seed": 0, "data": "/elsewhere"},
            "fc2": {"seed": 0, "data": "/data/cifar10"}}
    for layer, how in made.items():
        write_json(ovr_path(ref, layer), {"results": {"seed/linear-svm": {"accuracy": 0.6, **common, **how}}})
        meta = {"layer": layer, "split": "test", "checkpoint": 15000, "points": 20, "perplexity": 6.0,
                "input_dims": 192, "classes": [f"c{i}" for i in range(10)], **how}
        tsne_path(ref, layer).parent.mkdir(exist_ok=True)
        np.savez(tsne_path(ref, layer), coords=np.zeros((20, 2), np.float32), labels=np.arange(20) % 10,
                 rows=np.arange(20), meta=np.array(json.dumps(meta)))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| f")}
    assert "with --seed 7, not 0: rerun `cifarlab reproduce`" in rows["flatten features"]
    assert "on other images (/elsewhere) than the study's" in rows["fc1 features"]
    assert "rerun" not in rows["fc2 features"]
    figure7 = md.split("### Figure 7")[1].split("### Figure 8")[0]
    assert "classifier-b128 flatten: with --seed 7, not 0" in figure7 and "classifier-b128 fc1: on other images" in figure7
    assert "classifier-b128 fc2:" not in figure7
