"""Feature analysis of a trained run: the report's section 1.4 (Figure 7 and its one-vs-rest scores).

A run's features are the outputs of its network's named stages (`StagedNet.features`), so any
study's network is analysed by the names of its stages: the ConvNet's flatten/fc1/fc2, a Siamese
`embedding`, a transfer `pool5`. Nothing here knows a particular network.

Files inside a run directory (each written atomically):
    features/<split>-step-<N>.npz `labels`, one float32 (N, D) array per layer, `meta` (JSON: checkpoint
                                  step, data source, layers, the network's stage names, class names)
    analysis/tsne-<layer>.npz     2-D coordinates, their labels and rows in the features file
    analysis/ovr-<layer>.json     accuracy, per-class accuracy and confusion matrix, one entry per
                                  protocol/classifier
    plots/tsne-<layer>.png, plots/tsne-all.png, plots/confusion-<layer>.png

Features are extracted on demand, one file per split and checkpoint (by default the latest), and
re-extracted when they came from other data than asked for or that checkpoint is newer than they are.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from cifarlab import CifarlabError  # noqa: E402
from cifarlab.fileio import read_json, write_json, write_with  # noqa: E402
from cifarlab.plots import save_figure, text_as_typed  # noqa: E402
from cifarlab.runs import RunDir  # noqa: E402

SPLITS = ("train", "val", "test")
PROTOCOLS = ("seed", "split")
CLASSIFIERS = ("linear-svm", "svc-linear", "logistic")
FINAL_STAGE = "logits"  # class scores, not a representation: left out of the default layers
SEED_FIT_FRACTION = 0.8  # the report: first 80% of the (shuffled) test features fit, last 20% score
PCA_DIMS = 50  # t-SNE input width; wider features are reduced by PCA first
TSNE_THREADS_FROM = 2000  # t-SNE on fewer points runs on one thread (see embed_tsne)
TSNE_EXACT_UPTO = 20000  # exact nearest neighbours up to this many points, Annoy beyond
EXTRACT_BATCH = 1000
_RESERVED = ("labels", "meta")  # npz keys that are not layers
_FORMAT = 1


@dataclass
class Features:
    """Features of some layers on one split, as read from `features/<split>-step-<N>.npz`."""

    labels: np.ndarray  # int64 (N,)
    layers: dict[str, np.ndarray]  # name -> float32 (N, D), in network order
    classes: tuple[str, ...]
    split: str
    checkpoint: int
    layer_names: tuple[str, ...]  # every stage of the run's network
    path: Path
    data: str = ""  # data_key of the images they were computed on
    data_digest: str | None = None  # data_digest of those images (files before it: None)


# -- layers, checkpoints, paths -----------------------------------------------------------------


def analysable_layers(layer_names: Sequence[str]) -> tuple[str, ...]:
    """Every stage but a final `logits`: the analysis is of representations, not class scores."""
    names = tuple(layer_names)
    return names[:-1] if names and names[-1] == FINAL_STAGE else names


def select_layers(spec: str | Sequence[str] | None, layer_names: Sequence[str], default: str = "all") -> list[str]:
    """Layer names, in network order, from a spec: None (-> `default`), "all" (the analysable
    layers), "last" (the deepest analysable one), a comma-separated string or a list of names,
    in any case (`--layer FC2` is fc2). Unknown names raise an error that lists the layers the
    run has."""
    if spec is None:
        spec = default
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.lower() in ("all", "last"):
            usable = analysable_layers(layer_names)
            return list(usable if spec.lower() == "all" else usable[-1:])
        spec = [name.strip() for name in spec.split(",") if name.strip()]
    choices = f"this run has: {', '.join(layer_names)} (or all, last)"
    if not spec:
        raise CifarlabError(f"no layer given; {choices}")
    canonical = {name.lower(): name for name in layer_names}
    unknown = [name for name in spec if name.lower() not in canonical]
    if unknown:
        raise CifarlabError(f"unknown layer {', '.join(unknown)}; {choices}")
    wanted = {canonical[name.lower()] for name in spec}
    return [name for name in layer_names if name in wanted]


def _open(run: RunDir | str | os.PathLike) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir.open(run)


def features_path(run: RunDir, split: str, step: int) -> Path:
    """One file per split and checkpoint: analysing one checkpoint keeps another's features."""
    return run.path / "features" / f"{split}-step-{step}.npz"


def data_key(cfg, data) -> str:
    """Where the images features are computed on come from: a `Cifar10`'s source, else the source
    that loading would find (under `data`, the run's own folder, $CIFARLAB_DATA or the default),
    so that the two name the same data alike."""
    from cifarlab.data import find_layout, resolve_data_dir

    if data is not None and not isinstance(data, (str, os.PathLike)):
        return str(Path(data.source).resolve())
    root = resolve_data_dir(data or cfg.data or None)
    found = find_layout(root) if root.exists() else None
    return str((found[1] if found else root).resolve())


def split_tag(split: str) -> str:
    """How a file name says the split its features came from: nothing for the test set (the
    report's, read by `report` and reproduce), "-train" or "-val" for the others."""
    return "" if split == "test" else f"-{split}"


def tsne_path(run_path: Path, layer: str, split: str = "test") -> Path:
    return Path(run_path) / "analysis" / f"tsne-{layer}{split_tag(split)}.npz"


def ovr_path(run_path: Path, layer: str) -> Path:
    return Path(run_path) / "analysis" / f"ovr-{layer}.json"


def read_tsne(run_path: Path, layer: str, split: str = "test") -> dict | None:
    """What `run_tsne` wrote for `layer` on `split` (coords, labels, rows, meta), or None if it has not."""
    try:
        with np.load(tsne_path(run_path, layer, split)) as npz:
            found = {"coords": npz["coords"], "labels": npz["labels"], "rows": npz["rows"],
                     "meta": json.loads(str(npz["meta"]))}
    except (OSError, KeyError, ValueError):
        return None
    # an older cifarlab wrote every split to the test set's file
    return found if isinstance(found["meta"], dict) and found["meta"].get("split") == split else None


def read_ovr(run_path: Path, layer: str, protocol: str = "seed", classifier: str = "linear-svm") -> dict | None:
    """The result `run_ovr` recorded for `layer` under that protocol and classifier, or None (also
    when it lacks what the report reads: an older or damaged file, redone by reproduce)."""
    result = _ovr_results(read_json(ovr_path(run_path, layer))).get(f"{protocol}/{classifier}")
    needed = ("accuracy", "n_fit", "n_score", "fit_seconds", "checkpoint")
    return result if isinstance(result, dict) and all(key in result for key in needed) else None


def _ovr_results(record: dict) -> dict:
    """The results table of an ovr-<layer>.json record; {} when it is damaged (replaced on the next write)."""
    results = record.get("results")
    return results if isinstance(results, dict) else {}


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise CifarlabError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


# -- extraction ---------------------------------------------------------------------------------


def extract_features(run: RunDir | str | os.PathLike, layers: str | Sequence[str] | None = None,
                     split: str = "test", checkpoint: int | None = None, *, data=None, device: str | None = None,
                     progress: bool = True) -> Path:
    """Run the checkpoint's network over one split and write `features/<split>-step-<N>.npz`.

    Batched, on the run's device (or `device`), in inference mode and the run's precision; every
    layer comes out as float32 (N, D). `data` is a `Cifar10` (tests) or a data folder overriding the
    run's. The layers a file of the same checkpoint and images already holds are kept in it.
    """
    from cifarlab.data import load_cifar10
    from cifarlab.engine import make_autocast, resolve_device
    from cifarlab.studies import build_task

    run = _open(run)
    _check_choice("split", split, SPLITS)
    step = run.checkpoint_step(checkpoint)
    cfg = run.config()
    source = data_key(cfg, data)
    if isinstance(data, (str, os.PathLike)):
        cfg, data = cfg.replace(data=str(data)), None
    dev = resolve_device(device or cfg.device)
    autocast = make_autocast(cfg.precision, dev)
    if data is None:
        data = load_cifar10(cfg.data or None, progress=progress)
    task = build_task(cfg, dev, autocast, data=data, progress=progress, for_checkpoint=True,
                      training=False)
    model = task.model
    held = _fresh_meta(run, features_path(run, split, step), step, source)  # the file's layers stay in it
    wanted = set(select_layers(layers, model.layer_names)) | set(held["layers"] if held else ())
    names = [n for n in model.layer_names if n in wanted]
    clash = [n for n in names if n in _RESERVED]
    if clash:
        raise CifarlabError(f"layer name {clash[0]!r} clashes with a key of the features file; rename the stage")
    if split not in task.splits:
        hint = " (train it with --val-fraction to have one)" if split == "val" else ""
        raise CifarlabError(f"{run.path}: this run has no {split} split{hint}; it has: {', '.join(task.splits)}")
    run.load_weights(model, step)
    model.eval()
    images = task.splits[split]
    arrays = _forward(model, images, names, autocast, progress, f"features {split}")
    meta = {
        "format": _FORMAT, "run": run.name, "split": split, "checkpoint": step, "data": source,
        "data_digest": task.data_digest, "layers": names,
        "layer_names": list(model.layer_names), "dims": {n: int(a.shape[1]) for n, a in arrays.items()},
        "images": len(images), "classes": list(data.classes),
        "precision": cfg.precision, "device": str(dev), "created": dt.datetime.now().isoformat(timespec="seconds"),
    }
    labels = images.y.cpu().numpy().astype(np.int64)
    path = features_path(run, split, step)
    (path.parent / f"{split}.npz").unlink(missing_ok=True)  # the one file per split of earlier versions
    write_with(path, lambda tmp: np.savez(tmp, labels=labels, meta=np.array(json.dumps(meta)), **arrays))
    return path


def note_other_images(run: RunDir | str | os.PathLike, digest: str | None, given) -> None:
    """Say so when `given` (a --data) holds other images than the run trained on: features of
    images of that `digest`, and the t-SNE and OvR results made from them, are of those images
    and replace the run's own."""
    run = _open(run)
    note = run.other_images_note(digest, given) if given is not None else None
    if note:
        print(f"note: {note}; the features and the t-SNE/OvR results made from them are of those images "
              f"and replace {run.name}'s own (analyse again without --data to have those back)", file=sys.stderr)


@torch.inference_mode()
def _forward(model, images, names: list[str], autocast, progress: bool, desc: str) -> dict[str, np.ndarray]:
    """Per-layer outputs over all images, flattened to (N, D) float32, filled batch by batch."""
    from tqdm.auto import tqdm

    out: dict[str, np.ndarray] = {}
    start = 0
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for x, _ in images.slices(EXTRACT_BATCH):
            with autocast():
                feats = model.features(x, names)
            n = x.shape[0]
            for name in names:
                f = feats[name].float().reshape(n, -1).cpu().numpy()
                if name not in out:
                    out[name] = np.empty((len(images), f.shape[1]), dtype=np.float32)
                out[name][start:start + n] = f
            start += n
            bar.update(n)
    return out


def read_meta(path: Path) -> dict | None:
    """The features file's metadata, or None when it is missing or unreadable (then re-extracted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
        return meta if meta.get("format") == _FORMAT else None
    except Exception:  # a damaged file is simply extracted again
        return None


def _fresh_meta(run: RunDir, path: Path, step: int, source: str) -> dict | None:
    """Metadata of a features file made from checkpoint `step` on the images of `source`, and not
    older than that checkpoint."""
    meta = read_meta(path)
    if meta is None or meta.get("checkpoint") != step or meta.get("data") != source:
        return None
    ckpt = run.checkpoints / f"step-{step}.safetensors"
    if ckpt.stat().st_mtime_ns > path.stat().st_mtime_ns:
        return None
    return meta


def load_features(run: RunDir | str | os.PathLike, layers: str | Sequence[str] | None = None,
                  split: str = "test", checkpoint: int | None = None, *, default: str = "all", data=None,
                  device: str | None = None, progress: bool = True) -> Features:
    """Features of `layers` on `split`, extracted first when the file is missing, lacks a layer,
    or is stale (another checkpoint, or one newer than the file). Layers the file already holds
    are kept when it is extended. `default` is the spec used when `layers` is None."""
    run = _open(run)
    _check_choice("split", split, SPLITS)
    step = run.checkpoint_step(checkpoint)
    path = features_path(run, split, step)
    meta = _fresh_meta(run, path, step, data_key(run.config(), data))
    if meta is None or not set(select_layers(layers, meta["layer_names"], default)) <= set(meta["layers"]):
        extract_features(run, layers if layers is not None else default, split, step, data=data,
                         device=device, progress=progress)
        meta = read_meta(path)
    wanted = select_layers(layers, meta["layer_names"], default)
    with np.load(path) as z:
        arrays = {name: z[name] for name in wanted}
        labels = z["labels"]
    return Features(labels=labels, layers=arrays, classes=tuple(meta["classes"]), split=split,
                    checkpoint=int(meta["checkpoint"]), layer_names=tuple(meta["layer_names"]), path=path,
                    data=meta.get("data", ""), data_digest=meta.get("data_digest"))


# -- t-SNE --------------------------------------------------------------------------------------


def sample_indices(n: int, max_points: int | None, seed: int = 0) -> np.ndarray:
    """Sorted rows of a random subset of at most max_points (all rows when there are fewer)."""
    if max_points is None or max_points >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def embed_tsne(x: np.ndarray, perplexity: float = 40.0, seed: int = 0, n_jobs: int | None = None,
               progress: bool = False, desc: str = "t-SNE") -> np.ndarray:
    """2-D openTSNE embedding with openTSNE's default schedule (250 exaggerated + 500 iterations).

    Speed choices, measured on 10,000 real fc2 features on 2 cores (benchmarks/analysis_time.py):
    - features wider than 50 go through PCA to 50 dimensions first (denoises, fast neighbours);
    - exact neighbours up to 20,000 points: 2 s against Annoy's 10 s at 10,000;
    - FFT grid cells of 2 units (ints_in_interval=2): the late iterations, where the embedding has
      spread out, cost half as much; the map is as good (10-NN accuracy in 2-D 0.555 vs 0.556);
    - openTSNE picks Barnes-Hut below 10,000 points (FFT's fixed grid cost is ~8x slower there);
    - `n_jobs` None: all cores from 2,000 points, one below: small embeddings gain nothing from
      threads and lose a lot on a busy machine (100 points, one of 2 cores busy: 15 s vs 0.7 s).
    """
    from openTSNE import TSNE
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float32)
    if n_jobs is None:
        n_jobs = -1 if len(x) >= TSNE_THREADS_FROM else 1
    if pca_first(*x.shape):
        x = PCA(PCA_DIMS, random_state=seed).fit_transform(x).astype(np.float32)
    tsne = TSNE(perplexity=perplexity, n_jobs=n_jobs, random_state=seed, negative_gradient_method="auto",
                neighbors="exact" if len(x) <= TSNE_EXACT_UPTO else "auto", ints_in_interval=2)
    if not progress:
        return np.asarray(tsne.fit(x), dtype=np.float32)
    from tqdm.auto import tqdm

    every = 25
    with tqdm(total=tsne.early_exaggeration_iter + tsne.n_iter, desc=desc, unit="it", dynamic_ncols=True) as bar:
        def tick(iteration, error, embedding):
            bar.update(every)
            bar.set_postfix(kl=f"{error:.3f}", refresh=False)
            return False

        tsne.callbacks, tsne.callbacks_every_iters = [tick], every
        return np.asarray(tsne.fit(x), dtype=np.float32)


def pca_first(points: int, dims: int) -> bool:
    """Whether embed_tsne reduces the features by PCA first: wider than PCA_DIMS, and more points
    than that (PCA to 50 dimensions needs at least 50 points)."""
    return dims > PCA_DIMS and points > PCA_DIMS


def effective_perplexity(perplexity: float, points: int) -> float:
    """The perplexity openTSNE uses on `points` points: it lowers one whose 3 x perplexity
    neighbours would not fit among the other points to (points - 1) / 3."""
    return perplexity if 3 * perplexity <= points - 1 else (points - 1) / 3


def run_tsne(run: RunDir | str | os.PathLike, layers: str | Sequence[str] | None = None, *,
             perplexity: float = 40.0, max_points: int | None = 10000, seed: int = 0, split: str = "test",
             checkpoint: int | None = None, data=None, device: str | None = None, n_jobs: int | None = None,
             progress: bool = True) -> dict:
    """t-SNE of each layer's features (the same points for every layer), coloured by class, as the
    report's Figure 7. Default layer: the deepest analysable one; "all" also draws them side by side.

    Returns {"layers": {name: {"coords", "png", "seconds"}}, "combined": png or None, ...}.
    """
    if perplexity <= 0:
        raise CifarlabError(f"--perplexity must be > 0 (got {perplexity})")
    if max_points is not None and max_points < 2:
        raise CifarlabError(f"--max-points must be at least 2 (got {max_points})")
    run = _open(run)
    feats = load_features(run, layers, split, checkpoint, default="last", data=data, device=device,
                          progress=progress)
    note_other_images(run, feats.data_digest, data)
    rows = sample_indices(len(feats.labels), max_points, seed)
    labels = feats.labels[rows]
    perplexity = effective_perplexity(perplexity, len(rows))  # record what openTSNE will use
    out: dict = {"layers": {}, "combined": None, "checkpoint": feats.checkpoint, "points": len(rows),
                 "perplexity": perplexity}
    panels = []
    for name, x in feats.layers.items():
        start = time.perf_counter()
        coords = embed_tsne(x[rows], perplexity, seed, n_jobs, progress and len(rows) >= 2000, f"t-SNE {name}")
        seconds = time.perf_counter() - start
        meta = {"run": run.name, "layer": name, "split": split, "checkpoint": feats.checkpoint, "data": feats.data,
                "perplexity": perplexity, "seed": seed, "points": len(rows), "input_dims": int(x.shape[1]),
                "pca_dims": PCA_DIMS if pca_first(len(rows), x.shape[1]) else None, "seconds": round(seconds, 3),
                "classes": list(feats.classes)}
        coords_path = tsne_path(run.path, name, split)
        write_with(coords_path, lambda tmp: np.savez(tmp, coords=coords, labels=labels, rows=rows,
                                                     meta=np.array(json.dumps(meta))))
        title = f"{run.name}: {name} ({x.shape[1]}-d), step {feats.checkpoint}" + (f", {split} set" if split != "test" else "")
        png = plot_tsne([(name, coords)], labels, feats.classes, run.path / "plots" / f"tsne-{name}{split_tag(split)}.png", title)
        out["layers"][name] = {"coords": coords_path, "png": png, "seconds": seconds}
        panels.append((f"{name} ({x.shape[1]}-d)", coords))
    if len(panels) > 1:
        tag = "all" if list(feats.layers) == list(analysable_layers(feats.layer_names)) else "+".join(feats.layers)
        title = f"{run.name}: t-SNE of {split} features, step {feats.checkpoint}, perplexity {perplexity:g}"
        out["combined"] = plot_tsne(panels, labels, feats.classes, run.path / "plots" / f"tsne-{tag}{split_tag(split)}.png", title)
    return out


@text_as_typed
def plot_tsne(panels: list[tuple[str, np.ndarray]], labels: np.ndarray, classes: Sequence[str], out: Path,
              title: str | None = None) -> Path:
    """One scatter panel per (name, coords), side by side, coloured by class, with a class legend.
    Points are drawn in a fixed random order so that no class is painted over the others."""
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    colours = np.array([cmap(i % cmap.N) for i in range(len(classes))])
    order = np.random.default_rng(0).permutation(len(labels))
    size = float(np.clip(30000 / max(len(labels), 1), 1.5, 25))
    k = len(panels)
    fig, axes = plt.subplots(1, k, figsize=(5.0 * k + 1.7, 5.2), squeeze=False)
    for ax, (name, xy) in zip(axes[0], panels):
        ax.scatter(xy[order, 0], xy[order, 1], c=colours[labels[order]], s=size, linewidths=0, alpha=0.8,
                   rasterized=True)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[i], label=c) for i, c in enumerate(classes)]
    fig.legend(handles=handles, loc="center right", frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    out = save_figure(fig, out)
    plt.close(fig)
    return out


# -- one-vs-rest linear classifiers -------------------------------------------------------------

# Regularisation: after standardisation a sample's squared norm is about d (the layer width), so
# C = 1/d gives every layer the same effective strength (as if features had unit mean squared norm).
# Measured on a real run's features (benchmarks/analysis_time.py): with C = 1 LinearSVC does not
# converge on flatten (4096-d) within 100 passes (66 s, accuracy 0.56, over-fit: 8,000 samples in
# 4,096 dimensions); with C = 1/d the dual solver converges on every layer (flatten: 0.633).
# Tolerance: LIBLINEAR's own default for this dual solver (0.1; scikit-learn's 1e-4 is far stricter).
# Same accuracies as 1e-3 and 1e-4 on all three layers, in 24 passes instead of 62-83 (flatten ~20 s).
LINEAR_SVM_TOL = 0.1
LINEAR_SVM_MAX_ITER = 1000


def make_classifier(name: str, dims: int, seed: int = 0, n_jobs: int = -1):
    """Standardise, then a one-vs-rest linear classifier for `dims`-wide features.

    linear-svm: liblinear's LinearSVC (one-vs-rest by construction), dual coordinate descent,
                C = 1/dims, tol 0.1. Fast: about a second on fc2, ~20 s on 4096-d flatten.
    svc-linear: the report's OneVsRestClassifier(SVC(kernel='linear')), C = 1 (libsvm; slow); it is
                given standardised features too, where the report's took them raw.
    logistic:   one-vs-rest logistic regression (lbfgs), C = 1/dims.
    The wrapped classifiers fit their 10 binary problems in `n_jobs` processes (they hold the GIL).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    _check_choice("classifier", name, CLASSIFIERS)
    if name == "linear-svm":
        clf = LinearSVC(C=1.0 / dims, dual=True, tol=LINEAR_SVM_TOL, max_iter=LINEAR_SVM_MAX_ITER, random_state=seed)
    elif name == "svc-linear":
        clf = OneVsRestClassifier(SVC(kernel="linear"), n_jobs=n_jobs)
    else:
        clf = OneVsRestClassifier(LogisticRegression(C=1.0 / dims, max_iter=1000), n_jobs=n_jobs)
    return make_pipeline(StandardScaler(), clf)


def fit_score(x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray,
              classifier: str = "linear-svm", n_classes: int | None = None, seed: int = 0, n_jobs: int = -1) -> dict:
    """Fit one classifier and score it: accuracy, per-class accuracy (recall), confusion matrix,
    seconds, and whether the solver converged within its iteration cap."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import confusion_matrix

    n_classes = n_classes or int(max(y_fit.max(), y_score.max()) + 1)
    model = make_classifier(classifier, x_fit.shape[1], seed, n_jobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        model.fit(x_fit, y_fit)
        fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = model.predict(x_score)
    score_seconds = time.perf_counter() - start
    cm = confusion_matrix(y_score, predicted, labels=np.arange(n_classes))
    support = cm.sum(axis=1)
    per_class = [float(cm[i, i] / support[i]) if support[i] else None for i in range(n_classes)]
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "per_class_accuracy": per_class,
        "confusion": cm.tolist(),
        "fit_seconds": round(fit_seconds, 3),
        "score_seconds": round(score_seconds, 3),
        "n_fit": int(len(y_fit)),
        "n_score": int(len(y_score)),
        "converged": not (stopped_at_cap(model[-1]) or any(issubclass(w.category, ConvergenceWarning) for w in caught)),
        "model": str(model[-1]),
    }


def stopped_at_cap(clf) -> bool:
    """Whether a fitted classifier's solver (any of one-vs-rest's binary ones) ran to its iteration
    cap: the sign of not converging that also holds for fits done in worker processes, whose
    ConvergenceWarnings never reach this one."""
    capped = [e for e in getattr(clf, "estimators_", [clf]) if getattr(e, "max_iter", -1) > 0 and hasattr(e, "n_iter_")]
    return any(np.max(e.n_iter_) >= e.max_iter for e in capped)


def seed_protocol_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The report's 80/20 split of n samples, after one shuffle with a fixed seed (image-folder
    data is sorted by class, so the plain first-80% split would leave whole classes out)."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(n * SEED_FIT_FRACTION)
    return perm[:cut], perm[cut:]


def run_ovr(run: RunDir | str | os.PathLike, layers: str | Sequence[str] | None = None, *,
            protocol: str = "seed", classifier: str = "linear-svm", seed: int = 0, checkpoint: int | None = None,
            data=None, device: str | None = None, n_jobs: int = -1, progress: bool = True) -> list[dict]:
    """One-vs-rest linear classifiers on standardised features of each layer.

    protocol "seed" (the report's): test-set features, shuffled once, 80% fit / 20% scored.
    protocol "split": fit on all train-set features, score on all test-set features.
    Writes analysis/ovr-<layer>.json (one entry per protocol/classifier, merged with earlier ones)
    and plots/confusion-<layer>.png; returns one result row per layer.
    """
    _check_choice("protocol", protocol, PROTOCOLS)
    _check_choice("classifier", classifier, CLASSIFIERS)
    run = _open(run)
    common = dict(checkpoint=checkpoint, default="last", data=data, device=device, progress=progress)
    test = load_features(run, layers, "test", **common)
    train = load_features(run, layers, "train", **common) if protocol == "split" else None
    note_other_images(run, test.data_digest, data)
    rows = []
    for name, x in test.layers.items():
        if protocol == "seed":
            fit_rows, score_rows = seed_protocol_split(len(test.labels), seed)
            fit, score = (x[fit_rows], test.labels[fit_rows]), (x[score_rows], test.labels[score_rows])
        else:
            fit, score = (train.layers[name], train.labels), (x, test.labels)
        if progress:  # a fit on wide features takes minutes, with nothing to show meanwhile
            print(f"ovr {name}: fitting {classifier} on {fit[0].shape[0]} x {fit[0].shape[1]} features...",
                  file=sys.stderr, flush=True)
        result = fit_score(*fit, *score, classifier, len(test.classes), seed, n_jobs)
        result = {"layer": name, "dims": int(x.shape[1]), "protocol": protocol, "classifier": classifier,
                  "seed": seed, "checkpoint": test.checkpoint, "data": test.data, **result,
                  "per_class_accuracy": dict(zip(test.classes, result["per_class_accuracy"])),
                  "created": dt.datetime.now().isoformat(timespec="seconds")}
        json_path = ovr_path(run.path, name)
        record = read_json(json_path)
        record.update(run=run.name, layer=name, classes=list(test.classes))
        record["results"] = {**_ovr_results(record), f"{protocol}/{classifier}": result}
        write_json(json_path, record)
        where = "test 20%" if protocol == "seed" else "test"
        title = (f"{run.name}: {name}, {classifier}, {protocol} protocol, step {test.checkpoint}\n"
                 f"accuracy {result['accuracy']:.4f} on {result['n_score']} {where} samples")
        # the seed's protocol and classifier keep the plain name; others get their own file
        variant = "".join(f"-{v}" for v, default in ((protocol, "seed"), (classifier, "linear-svm")) if v != default)
        png = plot_confusion(np.array(result["confusion"]), test.classes,
                             run.path / "plots" / f"confusion-{name}{variant}.png", title)
        rows.append({**result, "json": json_path, "png": png})
    return rows


def format_ovr_table(rows: list[dict]) -> str:
    """The rows as an aligned text table: layer, protocol, classifier, accuracy, fit seconds."""
    head = ("layer", "dims", "protocol", "classifier", "accuracy", "fit s", "fit/score n")
    body = [(r["layer"], str(r["dims"]), r["protocol"], r["classifier"], f"{r['accuracy']:.4f}",
             f"{r['fit_seconds']:.2f}" + ("" if r["converged"] else "*"), f"{r['n_fit']}/{r['n_score']}")
            for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *body]]
    if any(not r["converged"] for r in rows):
        lines.append("* the solver stopped at its iteration cap before converging")
    return "\n".join(lines)


@text_as_typed
def plot_confusion(cm: np.ndarray, classes: Sequence[str], out: Path, title: str | None = None) -> Path:
    """Counts of true (rows) against predicted (columns) classes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(7.5, 6.8))
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", xticks_rotation=45, values_format="d", colorbar=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, out)
    plt.close(fig)
    return out
