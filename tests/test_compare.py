"""`cifarlab compare`: runs side by side, with the settings in which they differ."""

import pytest

from cifarlab import CifarlabError
from cifarlab.config import Config
from cifarlab.fileio import write_json
from cifarlab.runs import RunDir, compare_runs


def fake_run(path, cfg: Config, tests: list[tuple[int, float, float]], finished: bool) -> RunDir:
    """A run directory as training leaves it: config, metrics (test rows: step, loss, accuracy), summary."""
    run = RunDir.create(str(path), cfg.study)
    run.write_config(cfg)
    for step, loss, acc in tests:
        run.add_metric(step, "train", loss + 0.1, acc - 0.1, step / 10)
        run.add_metric(step, "test", loss, acc, step / 10)
    run.write_metrics()
    if finished:
        write_json(run.path / "summary.json", {"steps": cfg.steps, "ms_per_step": 1.5, "device": "cpu"})
    return run


@pytest.fixture()
def runs(tmp_path):
    folder = tmp_path / "study"
    fake_run(folder / "plain", Config(steps=30), [(10, 2.0, 0.3), (20, 1.5, 0.5), (30, 1.6, 0.45)], True)
    fake_run(folder / "dropout", Config(steps=30, dropout=0.5), [(10, 2.1, 0.25), (20, 1.7, 0.4)], False)
    fake_run(tmp_path / "pairs", Config.for_study("siamese", steps=50, loss="hadsell"), [(25, 0.3, 0.7)], True)
    return tmp_path


def test_rows_hold_results_and_only_the_settings_that_differ(runs):
    differing, rows = compare_runs([runs / "study", runs / "pairs"])
    # val_fraction and steps differ (the siamese defaults); loss is read by one study only, so it
    # is no difference; data, device and the like say where a run ran, not what it trained.
    assert differing == ["study", "steps", "dropout", "val_fraction"]
    by_name = {row["run"].rsplit("/", 1)[-1]: row for row in rows}
    assert [row["run"].rsplit("/", 1)[-1] for row in rows] == ["dropout", "plain", "pairs"]
    plain, dropout, pairs = by_name["plain"], by_name["dropout"], by_name["pairs"]
    assert (plain["step"], plain["finished"], plain["test_accuracy"], plain["test_loss"]) == (30, True, 0.45, 1.6)
    assert (plain["best_test_accuracy"], plain["best_test_step"], plain["ms_per_step"]) == (0.5, 20, 1.5)
    assert (dropout["step"], dropout["steps"], dropout["finished"], dropout["ms_per_step"]) == (20, 30, False, None)
    assert dropout["dropout"] == 0.5 and plain["dropout"] == 0.0
    assert pairs["study"] == "siamese" and "loss" not in pairs and "weight_decay" not in pairs


def test_a_path_that_holds_no_run_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CifarlabError, match="empty: neither a cifarlab run .no config.toml. nor a folder of runs"):
        compare_runs([tmp_path / "empty"])
    with pytest.raises(CifarlabError, match="missing: neither"):
        compare_runs([tmp_path / "missing"])


def test_a_run_resumed_to_more_steps_is_unfinished_until_it_gets_there(tmp_path):
    import torch

    run = fake_run(tmp_path / "run", Config(steps=30), [(10, 2.0, 0.3), (30, 1.6, 0.45)], True)
    run.write_config(Config(steps=50))  # `--resume RUN --steps 50`, stopped before the end
    run.checkpoints.mkdir()
    run.save_training_state({"step": 35, "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000)}}}})  # Ctrl-C
    (row,) = compare_runs([run.path])[1]
    assert (row["step"], row["steps"], row["finished"], row["ms_per_step"]) == (35, 50, False, None)
    assert RunDir.open(run.path).summary() == {}
    assert RunDir.open(run.path).summary(30)["steps"] == 30


def test_a_damaged_run_in_a_folder_is_left_out_with_a_warning_but_stops_when_named(runs, capsys):
    (runs / "study" / "plain" / "config.toml").write_text("steps = [broken\n")
    (runs / "study" / "dropout" / "metrics.csv").write_bytes(b"step,split,loss,accuracy,seconds\n\xff\xfe\n")
    (runs / "study" / "ok").mkdir()
    fake_run(runs / "study" / "ok", Config(steps=30), [(30, 1.0, 0.6)], True)
    differing, rows = compare_runs([runs / "study"])
    assert [row["run"].rsplit("/", 1)[-1] for row in rows] == ["ok"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: left out ") for line in err)
    assert "plain" in err[1] and "config.toml" in err[1] and "dropout" in err[0]
    with pytest.raises(CifarlabError, match="config.toml"):
        compare_runs([runs / "study" / "plain"])
    (runs / "study" / "plain" / "config.toml").write_bytes(b"steps = 3\n\xff\n")  # not UTF-8
    with pytest.raises(CifarlabError, match="config.toml: not valid TOML"):
        compare_runs([runs / "study" / "plain"])
    (runs / "study" / "dropout" / "metrics.csv").write_text("not,the,columns\n1,2,3\n")
    with pytest.raises(CifarlabError, match="metrics.csv: its header is not step,split,loss,accuracy,seconds"):
        compare_runs([runs / "study" / "dropout"])
    (runs / "study" / "ok" / "config.toml").write_text("study = 3\n")
    with pytest.raises(CifarlabError, match="no readable run in"):
        compare_runs([runs / "study"])


def test_each_row_says_what_a_rule_blind_to_the_images_scores(runs, tmp_path):
    """0.8 pair accuracy is what answering 'different' always gives at 20% same-class pairs."""
    fake_run(tmp_path / "even", Config.for_study("siamese", steps=50, fraction_same=0.5, batch_size=10),
             [(50, 0.3, 0.7)], True)
    fake_run(tmp_path / "mostly-same", Config.for_study("siamese", steps=50, fraction_same=0.7, batch_size=10),
             [(50, 0.3, 0.7)], True)
    rows = compare_runs([runs / "study", runs / "pairs", tmp_path / "even", tmp_path / "mostly-same"])[1]
    assert [row["baseline_accuracy"] for row in rows] == [0.1, 0.1, 103 / 128, 0.5, 0.7]
    from cifarlab.config import baseline_accuracy

    assert baseline_accuracy("siamese", 0.2, 128) == (103 / 128, "always 'different'")  # 25 of 128 are the same
    assert baseline_accuracy("siamese", 0.7, 10) == (0.7, "always 'same'")
    assert baseline_accuracy("transfer", 0.2, 128) == (0.1, "chance")


def test_a_damaged_summary_is_shown_unfinished_with_a_warning_that_says_how_to_mend_it(runs, capsys):
    (runs / "study" / "plain" / "summary.json").write_text('{"steps": 3')
    rows = compare_runs([runs / "study"])[1]
    assert [row["finished"] for row in rows] == [False, False]
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(f"warning: {runs / 'study' / 'plain' / 'summary.json'} is unreadable")
    assert err.endswith(f"`cifarlab train classifier --resume {runs / 'study' / 'plain'}` writes it anew")


def test_a_run_at_its_last_step_without_summary_json_is_not_called_unfinished(runs, capsys):
    from conftest import run_cli

    (runs / "study" / "plain" / "summary.json").unlink()  # deleted by hand, say
    plain = next(row for row in compare_runs([runs / "study"])[1] if row["run"].endswith("plain"))
    assert plain["step"] == plain["steps"] and not plain["finished"] and plain["summary_missing"]
    (err,) = capsys.readouterr().err.splitlines()
    assert err == (f"warning: {runs / 'study' / 'plain' / 'summary.json'} is missing, though the run did all its "
                   f"{plain['steps']} steps: shown as (no summary); "
                   f"`cifarlab train classifier --resume {runs / 'study' / 'plain'}` writes it anew")
    res = run_cli("compare", runs / "study")
    line = next(line for line in res.stdout.splitlines() if line.split()[:1] == ["plain"])
    assert f"{plain['steps']}/{plain['steps']} (no summary)" in line and "unfinished" not in line
