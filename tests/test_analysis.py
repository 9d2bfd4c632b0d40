"""Feature analysis: extraction, t-SNE and one-vs-rest classifiers on a tiny trained run."""

import json
import os
import shutil
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cifarlab import CifarlabError
from cifarlab import analysis as A
from cifarlab.cli import app, main
from cifarlab.config import Config
from cifarlab.data import load_cifar10
from cifarlab.runs import RunDir
from cifarlab.studies import build_task
from cifarlab.train import train
from conftest import make_image_folders, run_cli

LAYERS = {"flatten": 4096, "fc1": 384, "fc2": 192}
N_TEST = 200  # 20 images per class


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run on tiny image folders (checkpoints at steps 2 and 4) and its data."""
    root = tmp_path_factory.mktemp("analysis")
    folder = make_image_folders(root / "data", 20)
    data = load_cifar10(folder, cache=False, progress=False)
    cfg = Config(steps=4, batch_size=20, lr=1e-3, eval_every=4, checkpoint_every=2, init="xavier",
                 device="cpu", tensorboard=False, data=str(folder))
    run, _ = train(cfg, out=str(root / "run"), progress=False, data=data)
    return run.path, data


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run, so that each test writes its own features."""
    path, data = trained
    shutil.copytree(path, tmp_path / "run")
    return tmp_path / "run", data


def test_features_have_one_float32_array_per_analysable_layer(run_copy):
    path, data = run_copy
    feats = A.load_features(path, data=data, progress=False)
    assert list(feats.layers) == list(LAYERS)  # logits is left out by default
    for name, dims in LAYERS.items():
        assert feats.layers[name].shape == (N_TEST, dims) and feats.layers[name].dtype == np.float32
    assert np.array_equal(feats.labels, data.test_labels)
    assert feats.checkpoint == 4 and feats.classes == data.classes
    with np.load(path / "features" / "test-step-4.npz") as z:
        assert sorted(z.files) == sorted(["labels", "meta", *LAYERS])
    logits = A.load_features(path, "logits", data=data, progress=False)
    assert list(logits.layers) == ["logits"] and logits.layers["logits"].shape == (N_TEST, 10)


def test_extraction_equals_the_models_own_forward_pass(run_copy):
    path, data = run_copy
    feats = A.load_features(path, "flatten,fc1,fc2,logits", data=data, progress=False)
    run = RunDir.open(path)
    task = build_task(run.config(), torch.device("cpu"), nullcontext, data=data, progress=False)
    model = task.model
    run.load_weights(model, 4)
    model.eval()
    seen = {}
    for name, stage in model.stages.items():
        stage.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.clone()))
    # the whole split as one batch, as extraction takes it: a CPU's conv kernels may sum in
    # another order for another batch size (seen: 2e-5 apart on an AVX-512 machine)
    assert A.EXTRACT_BATCH >= N_TEST
    x, y = task.splits["test"].batch(torch.arange(N_TEST))
    with torch.no_grad():
        logits = model(x)
    assert np.array_equal(feats.labels, y.numpy())
    for name in LAYERS:
        np.testing.assert_allclose(feats.layers[name], seen[name].flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats.layers["logits"], logits.numpy(), rtol=1e-5, atol=1e-6)


def test_features_of_other_data_are_extracted_anew(run_copy):
    import dataclasses

    path, data = run_copy
    npz = path / "features" / "test-step-4.npz"
    A.load_features(path, "fc2", data=data, progress=False)
    assert A.read_meta(npz)["data"] == str(data.source.resolve())
    stamp = npz.stat().st_mtime_ns
    A.load_features(path, "fc2", data=data.source, progress=False)  # the same data, named by its folder
    assert npz.stat().st_mtime_ns == stamp, "features of the same data were extracted again"
    other = dataclasses.replace(data, source=data.source.parent / "other", test_images=data.test_images[:, ::-1].copy())
    feats = A.load_features(path, "fc2", data=other, progress=False)
    assert A.read_meta(npz)["data"] == str(other.source.resolve())
    direct = A.load_features(path, "fc2", data=data, progress=False)  # and back: extracted again
    assert not np.array_equal(feats.layers["fc2"], direct.layers["fc2"])


def test_features_follow_the_requested_checkpoint(run_copy):
    path, data = run_copy
    npz = path / "features" / "test-step-4.npz"
    first = A.load_features(path, "fc1,fc2", checkpoint=2, data=data, progress=False)
    assert first.checkpoint == 2 and first.path == path / "features" / "test-step-2.npz"
    kept = first.path.read_bytes()
    latest = A.load_features(path, "fc2", data=data, progress=False)  # latest checkpoint: its own file
    assert latest.checkpoint == 4 and latest.path == npz and not np.array_equal(first.layers["fc2"], latest.layers["fc2"])
    assert first.path.read_bytes() == kept, "step 2's features were replaced"
    stamp = npz.stat().st_mtime_ns
    A.load_features(path, "fc2", data=data, progress=False)
    assert npz.stat().st_mtime_ns == stamp, "fresh features were extracted again"
    A.load_features(path, "fc1", data=data, progress=False)  # a missing layer extends the file
    assert set(A.read_meta(npz)["layers"]) == {"fc1", "fc2"}
    ckpt = path / "checkpoints" / "step-4.safetensors"
    before = ckpt.stat().st_mtime_ns - 10**9
    os.utime(npz, ns=(before, before))  # the checkpoint is newer than the features (rewritten by a resume)
    A.load_features(path, "fc2", data=data, progress=False)
    assert npz.stat().st_mtime_ns > ckpt.stat().st_mtime_ns, "features older than their checkpoint were kept"


def _blobs(n_per_class, dims, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(10, dims))
    y = np.repeat(np.arange(10), n_per_class)
    return centres[y] + rng.normal(0, spread, size=(len(y), dims)), y


@pytest.mark.parametrize("classifier", A.CLASSIFIERS)
def test_ovr_scores_near_one_on_separable_features(classifier):
    x, y = _blobs(60, 24, 1.0, seed=0)
    fit, score = A.seed_protocol_split(len(y), seed=0)
    res = A.fit_score(x[fit], y[fit], x[score], y[score], classifier, n_jobs=1)
    assert res["accuracy"] >= 0.99 and res["n_fit"] == 480 and res["n_score"] == 120
    assert np.array(res["confusion"]).sum() == 120 and min(res["per_class_accuracy"]) >= 0.9


@pytest.mark.parametrize("classifier", ["linear-svm", "logistic"])
def test_ovr_scores_near_chance_on_random_labels(classifier):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2500, 32)), rng.integers(0, 10, 2500)
    fit, score = A.seed_protocol_split(len(y), seed=0)
    assert abs(A.fit_score(x[fit], y[fit], x[score], y[score], classifier, n_jobs=1)["accuracy"] - 0.1) < 0.05


def test_seed_protocol_split_is_deterministic_and_class_balanced():
    labels = np.repeat(np.arange(10), 1000)  # sorted by class, as image-folder data is
    fit, score = A.seed_protocol_split(len(labels), seed=3)
    again_fit, again_score = A.seed_protocol_split(len(labels), seed=3)
    assert np.array_equal(fit, again_fit) and np.array_equal(score, again_score)
    assert len(fit) == 8000 and len(score) == 2000
    assert np.array_equal(np.sort(np.concatenate([fit, score])), np.arange(10000))
    assert not np.array_equal(score, A.seed_protocol_split(len(labels), seed=4)[1])
    counts = np.array([np.bincount(labels[A.seed_protocol_split(10000, seed)[1]], minlength=10)
                       for seed in range(40)])
    assert counts.min() > 140 and counts.max() < 260  # every class is scored, never a whole one left out
    np.testing.assert_allclose(counts.mean(axis=0), 200, atol=6)  # balanced in expectation


def test_ovr_writes_json_table_and_confusion_for_both_protocols(run_copy):
    path, data = run_copy
    seed_rows = A.run_ovr(path, "all", protocol="seed", data=data, progress=False)
    split_rows = A.run_ovr(path, "fc2", protocol="split", data=data, progress=False)
    assert [r["layer"] for r in seed_rows] == list(LAYERS) and [r["layer"] for r in split_rows] == ["fc2"]
    assert seed_rows[0]["n_fit"] == 160 and seed_rows[0]["n_score"] == 40
    assert split_rows[0]["n_fit"] == 200 and split_rows[0]["n_score"] == N_TEST
    record = json.loads((path / "analysis" / "ovr-fc2.json").read_text())
    assert set(record["results"]) == {"seed/linear-svm", "split/linear-svm"}
    result = record["results"]["split/linear-svm"]
    assert 0 <= result["accuracy"] <= 1 and list(result["per_class_accuracy"]) == list(data.classes)
    assert np.array(result["confusion"]).shape == (10, 10) and np.array(result["confusion"]).sum() == N_TEST
    assert result["checkpoint"] == 4 and result["fit_seconds"] >= 0
    assert (path / "features" / "train-step-4.npz").is_file()
    for name in LAYERS:
        assert (path / "plots" / f"confusion-{name}.png").stat().st_size > 10_000
    assert split_rows[0]["png"] == path / "plots" / "confusion-fc2-split.png"  # the seed protocol's is kept
    table = A.format_ovr_table(seed_rows + split_rows)
    assert table.splitlines()[0].split()[:5] == ["layer", "dims", "protocol", "classifier", "accuracy"]
    assert len(table.splitlines()) >= 5
    (path / "analysis" / "ovr-fc2.json").write_text('{"results": 5}')  # damaged: read as no result, replaced
    assert A.read_ovr(path, "fc2") is None
    A.run_ovr(path, "fc2", protocol="split", data=data, progress=False)
    assert set(json.loads((path / "analysis" / "ovr-fc2.json").read_text())["results"]) == {"split/linear-svm"}


def test_tsne_writes_pictures_and_coordinates(run_copy):
    path, data = run_copy
    out = A.run_tsne(path, "all", perplexity=10, max_points=120, seed=0, data=data, progress=False)
    assert list(out["layers"]) == list(LAYERS) and out["points"] == 120
    for name in LAYERS:
        with np.load(path / "analysis" / f"tsne-{name}.npz") as z:
            coords, labels, rows = z["coords"], z["labels"], z["rows"]
            meta = json.loads(str(z["meta"]))
        assert coords.shape == (120, 2) and np.isfinite(coords).all()
        assert len(np.unique(rows)) == 120 and np.array_equal(labels, data.test_labels[rows])
        assert meta["perplexity"] == 10 and meta["input_dims"] == LAYERS[name]
        assert (path / "plots" / f"tsne-{name}.png").stat().st_size > 10_000
    assert out["combined"] == path / "plots" / "tsne-all.png" and out["combined"].stat().st_size > 20_000
    assert not list(path.rglob(".tmp-*")), "temporary files left behind"
    # openTSNE (MultiscaleMixture) lowers a perplexity above (n - 1) / 3 to that, and keeps it
    # otherwise: recorded as used (its own warning names the lowered value)
    for points, used in ((31, 10), (41, 40 / 3), (121, 40)):
        res = A.run_tsne(path, "fc2", perplexity=40, max_points=points, seed=0, data=data, progress=False)
        with np.load(path / "analysis" / "tsne-fc2.npz") as z:
            assert res["perplexity"] == json.loads(str(z["meta"]))["perplexity"] == used


def test_tsne_of_another_split_keeps_the_test_sets_which_the_report_reads(run_copy):
    path, data = run_copy
    A.run_tsne(path, "fc2", perplexity=5, max_points=40, data=data, progress=False)
    test = A.read_tsne(path, "fc2")
    out = A.run_tsne(path, "fc2", perplexity=5, max_points=30, split="train", data=data, progress=False)
    assert out["layers"]["fc2"]["coords"] == path / "analysis" / "tsne-fc2-train.npz"
    assert out["layers"]["fc2"]["png"] == path / "plots" / "tsne-fc2-train.png"
    assert A.read_tsne(path, "fc2", "train")["meta"]["split"] == "train"
    kept = A.read_tsne(path, "fc2")
    assert kept["meta"]["split"] == "test" and np.array_equal(kept["coords"], test["coords"])
    # a file of another split under the test set's name (an older cifarlab's) is not the test set's
    shutil.copy(path / "analysis" / "tsne-fc2-train.npz", path / "analysis" / "tsne-fc2.npz")
    assert A.read_tsne(path, "fc2") is None


def test_tsne_records_pca_only_where_it_ran(run_copy):
    path, data = run_copy  # PCA to 50 dimensions needs more than 50 points
    for points, pca in ((40, None), (60, A.PCA_DIMS)):
        A.run_tsne(path, "flatten", perplexity=5, max_points=points, data=data, progress=False)
        assert A.read_tsne(path, "flatten")["meta"]["pca_dims"] == pca
    assert A.pca_first(60, 4096) and not A.pca_first(50, 4096) and not A.pca_first(1000, 50)


def test_a_fit_stopped_at_its_iteration_cap_counts_as_not_converged_in_worker_processes_too():
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    x, y = _blobs(30, 16, 8.0, seed=2)
    for n_jobs in (1, 2):  # with 2, the ConvergenceWarnings are raised in other processes
        capped = OneVsRestClassifier(LogisticRegression(max_iter=2), n_jobs=n_jobs)
        with pytest.warns() if n_jobs == 1 else nullcontext():
            capped.fit(x, y)
        assert A.stopped_at_cap(capped)
        assert not A.stopped_at_cap(OneVsRestClassifier(LogisticRegression(max_iter=1000), n_jobs=n_jobs).fit(x, y))


def test_unknown_layer_lists_the_layers_of_the_run(run_copy):
    path, data = run_copy
    with pytest.raises(CifarlabError, match="unknown layer conv9; this run has: flatten, fc1, fc2, logits"):
        A.load_features(path, "fc2,conv9", data=data, progress=False)  # no features file yet
    A.load_features(path, "fc2", data=data, progress=False)
    with pytest.raises(CifarlabError, match="unknown layer pool5; this run has: flatten, fc1, fc2, logits"):
        A.run_ovr(path, "pool5", data=data, progress=False)  # checked against the file's record


def test_missing_checkpoint_split_and_bad_choices_are_clear(run_copy, tmp_path):
    path, data = run_copy
    empty = RunDir.create(str(tmp_path / "empty"), "classifier")
    empty.write_config(Config(device="cpu"))
    with pytest.raises(CifarlabError, match="no checkpoint yet.*stopped before its first.*--resume"):
        A.run_tsne(empty.path, "fc2", data=data, progress=False)
    with pytest.raises(CifarlabError, match="no checkpoint at step 7; available: 2, 4"):
        A.extract_features(path, checkpoint=7, data=data, progress=False)
    with pytest.raises(CifarlabError, match="no val split.*--val-fraction"):
        A.extract_features(path, split="val", data=data, progress=False)
    with pytest.raises(CifarlabError, match="unknown protocol 'loo'; choose one of seed, split"):
        A.run_ovr(path, protocol="loo", data=data)
    with pytest.raises(CifarlabError, match="unknown classifier 'knn'"):
        A.run_ovr(path, classifier="knn", data=data)


def test_default_layers_follow_the_network_not_the_convnet():
    names = ("stem", "pool5", "embedding")  # e.g. a Siamese network without logits
    assert A.select_layers(None, names) == list(names)
    assert A.select_layers("last", names) == ["embedding"]
    assert A.select_layers("embedding,stem", names) == ["stem", "embedding"]
    assert A.select_layers("all", ("flatten", "fc1", "fc2", "logits")) == ["flatten", "fc1", "fc2"]
    # a layer name or keyword in another case is the run's own name: files are named by it
    assert A.select_layers("ALL", ("flatten", "fc1", "fc2", "logits")) == ["flatten", "fc1", "fc2"]
    assert A.select_layers(" Last ", names) == ["embedding"]
    assert A.select_layers("FC2,Flatten", ("flatten", "fc1", "fc2")) == ["flatten", "fc2"]
    with pytest.raises(CifarlabError, match=r"unknown layer fc9; this run has: stem, pool5, embedding \(or all, last\)"):
        A.select_layers("fc9", names)


def test_cli_features_ovr_and_tsne(run_copy):
    path, _ = run_copy  # the commands read the run's image folders themselves
    runner = CliRunner()
    res = runner.invoke(app, ["features", str(path), "--layers", "fc1,fc2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "checkpoint step 4" in res.output and "fc1" in res.output and "192-d" in res.output
    res = runner.invoke(app, ["ovr", str(path), "--quiet"])  # default: the deepest layer, fc2
    assert res.exit_code == 0, res.output
    assert "fc2  " in res.output and "seed" in res.output and "linear-svm" in res.output
    # --layer and --layers are one option on all three commands
    res = runner.invoke(app, ["ovr", str(path), "--layers", "fc1", "--quiet"])
    assert res.exit_code == 0 and "fc1  " in res.output and "fc2  " not in res.output, res.output
    res = runner.invoke(app, ["features", str(path), "--layer", "flatten", "--quiet"])
    assert res.exit_code == 0 and "4096-d" in res.output, res.output
    res = runner.invoke(app, ["tsne", str(path), "--layer", "fc2", "--perplexity", "10", "--max-points", "100",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert (path / "plots" / "tsne-fc2.png").is_file() and not (path / "plots" / "tsne-all.png").exists()


def test_cli_errors_are_one_line(run_copy, monkeypatch, capsys):
    path, _ = run_copy
    monkeypatch.setattr(sys, "argv", ["cifarlab", "ovr", str(path), "--layer", "fc7", "--quiet"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: unknown layer fc7; this run has: flatten, fc1, fc2, logits")


def test_extracting_one_layer_keeps_the_layers_the_file_already_held(run_copy):
    path, data = run_copy
    A.extract_features(path, "fc1,fc2", data=data, progress=False)
    file = A.extract_features(path, "logits", data=data, progress=False)
    with np.load(file) as z:
        assert {"fc1", "fc2", "logits"} <= set(z.files) and "flatten" not in z.files
    other = make_image_folders(path.parent / "other", 3)  # other images: nothing of the old file applies
    file = A.extract_features(path, "logits", data=other, progress=False)
    with np.load(file) as z:
        assert set(z.files) == {"labels", "meta", "logits"}


def test_ovr_says_what_it_fits_before_a_long_fit(run_copy):
    path, _ = run_copy
    res = run_cli("ovr", path, "--layer", "fc1,fc2")
    assert res.returncode == 0, res.stderr
    # the seed protocol fits 80% of the 200 test images, one line per layer before its fit
    assert "ovr fc1: fitting linear-svm on 160 x 384 features..." in res.stderr
    assert "ovr fc2: fitting linear-svm on 160 x 192 features..." in res.stderr
    quiet = run_cli("ovr", path, "--protocol", "split", "--quiet")
    assert quiet.returncode == 0 and "fitting" not in quiet.stderr


def test_analysis_on_other_images_says_so_once(run_copy, tmp_path):
    path, _ = run_copy
    elsewhere = make_image_folders(tmp_path / "same", 20)  # the run's images in another folder: no note
    other = make_image_folders(tmp_path / "other", 10)
    note = f"note: {other} holds other images than run trained on"
    same = run_cli("ovr", path, "--data", elsewhere, "--quiet")
    assert same.returncode == 0 and "note:" not in same.stderr
    for args in (["features", path], ["ovr", path, "--protocol", "split"], ["ovr", path],  # fresh: not extracted
                 ["tsne", path, "--perplexity", "5", "--max-points", "50"]):
        res = run_cli(*args, "--data", other, "--quiet")
        assert res.returncode == 0, res.stderr
        assert res.stderr.count(note) == 1, (args, res.stderr)  # ovr's split protocol reads two splits
        assert "replace run's own (analyse again without --data" in res.stderr
    assert A.read_ovr(path, "fc2")["n_score"] == 20  # 20% of the other folder's 100 test images
    assert "note:" not in run_cli("ovr", path, "--quiet").stderr  # back on its own images
    assert A.read_ovr(path, "fc2")["n_score"] == 40
