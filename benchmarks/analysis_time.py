"""Seconds for the feature analysis of a run: one-vs-rest fit+score and t-SNE, next to the seed's
OneVsRestClassifier(SVC(kernel='linear')) on the same features, in one process on one machine.

    python benchmarks/analysis_time.py RUN [--checkpoint STEP] [--points 10000] [--variants]
                                           [--no-seed-svc] [--seed-svc-flatten]

Uses the run's test features (extracted first if missing; not timed) and the report's protocol:
the (shuffled) first 80% fit, the last 20% scored. cifarlab's OvR is `analysis.fit_score`, exactly
what `cifarlab ovr` runs (standardisation included in the time). The seed's classifier is timed as
the report ran it, on the raw features, and on the same standardised features cifarlab uses.
`--variants` also times other LinearSVC settings on flatten (C = 1 capped at 100 passes, the
default tolerance, the primal solver) and openTSNE's own defaults: how cifarlab's were chosen.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time
import warnings
from queue import Empty

import numpy as np
import sklearn
import torch

from cifarlab import analysis as A

GOALS = {("ovr", "fc2"): 10.0, ("ovr", "flatten"): 60.0, ("tsne", None): 60.0}


def seed_svc_seconds(x_fit, y_fit, x_score, y_score, standardise: bool) -> tuple[float, float]:
    """The report's classifier, verbatim: OneVsRestClassifier(SVC(kernel='linear')) fit + score,
    serial as the report ran it."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    start = time.perf_counter()
    if standardise:
        scaler = StandardScaler().fit(x_fit)
        x_fit, x_score = scaler.transform(x_fit), scaler.transform(x_score)
    classif = OneVsRestClassifier(SVC(kernel="linear"))
    classif.fit(x_fit, y_fit)
    accuracy = classif.score(x_score, y_score)
    return time.perf_counter() - start, accuracy


def _child(queue, *args):
    queue.put(seed_svc_seconds(*args))


def seed_svc_limited(limit: float, *args) -> tuple[float, float | None]:
    """seed_svc_seconds in a forked child, stopped after `limit` seconds: on raw (unscaled) ReLU
    features libsvm can take far longer than anyone waits. Returns (seconds, accuracy or None)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, *args))
    start = time.perf_counter()
    child.start()
    try:
        return queue.get(timeout=limit)
    except Empty:
        return time.perf_counter() - start, None
    finally:
        if child.is_alive():
            child.terminate()
        child.join()


def linear_svc_variant(x_fit, y_fit, x_score, y_score, **params) -> tuple[float, float, bool]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        model = make_pipeline(StandardScaler(), LinearSVC(**params)).fit(x_fit, y_fit)
        accuracy = model.score(x_score, y_score)
        seconds = time.perf_counter() - start
    return seconds, accuracy, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--checkpoint", type=int, default=None)
    ap.add_argument("--points", type=int, default=10000, help="test features used (a random subset when fewer than the split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", action="store_true", help="also time other LinearSVC settings on flatten")
    ap.add_argument("--no-seed-svc", action="store_true", help="skip the seed's SVC (slow)")
    ap.add_argument("--seed-svc-flatten", action="store_true", help="also time the seed's SVC on flatten (very slow)")
    ap.add_argument("--seed-svc-limit", type=float, default=600, help="stop each seed SVC fit after this many seconds")
    args = ap.parse_args()

    feats = A.load_features(args.run, "flatten,fc2", "test", args.checkpoint, progress=True)
    order = A.sample_indices(len(feats.labels), args.points, args.seed)  # all 10,000: the same split as `cifarlab ovr`
    labels = feats.labels[order]
    fit, score = A.seed_protocol_split(len(order), args.seed)
    print(f"run {args.run}, checkpoint step {feats.checkpoint}, {len(order)} test features; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} "
          f"threads, scikit-learn {sklearn.__version__}")

    rows = []  # (what, layer, dims, n, accuracy, seconds, goal)

    def add(what, layer, n, accuracy, seconds, goal=None):
        dims = feats.layers[layer].shape[1]
        rows.append((what, f"{layer} ({dims})", n, "-" if accuracy is None else f"{accuracy:.4f}",
                     f"{seconds:.1f}", "" if goal is None else f"<= {goal:g}"))
        print(f"  {rows[-1]}", flush=True)

    for layer in ("fc2", "flatten"):
        x = feats.layers[layer][order]
        res = A.fit_score(x[fit], labels[fit], x[score], labels[score], "linear-svm", len(feats.classes), args.seed)
        add(f"cifarlab ovr linear-svm ({res['model']})" + ("" if res["converged"] else ", capped"),
            layer, f"{len(fit)}/{len(score)}", res["accuracy"], res["fit_seconds"] + res["score_seconds"],
            GOALS[("ovr", layer)])
    for classifier in ("logistic", "svc-linear"):
        x = feats.layers["fc2"][order]
        res = A.fit_score(x[fit], labels[fit], x[score], labels[score], classifier, len(feats.classes), args.seed)
        add(f"cifarlab ovr {classifier}", "fc2", f"{len(fit)}/{len(score)}", res["accuracy"],
            res["fit_seconds"] + res["score_seconds"])
    if not args.no_seed_svc:
        layers = ("fc2", "flatten") if args.seed_svc_flatten else ("fc2",)
        for layer in layers:
            x = feats.layers[layer][order]
            for standardise in (False, True):
                seconds, accuracy = seed_svc_limited(args.seed_svc_limit, x[fit], labels[fit], x[score],
                                                     labels[score], standardise)
                what = "seed OneVsRestClassifier(SVC(kernel='linear'))" + (
                    ", same standardised features" if standardise else ", raw features as the report")
                if accuracy is None:
                    what += f", stopped unfinished at {args.seed_svc_limit:g} s"
                add(what, layer, f"{len(fit)}/{len(score)}", accuracy, seconds)
    if args.variants:
        x = feats.layers["flatten"][order]
        d = x.shape[1]
        for params in (dict(C=1.0, dual=True, max_iter=100), dict(C=1.0 / d, dual=True, tol=1e-4),
                       dict(C=1.0 / d, dual=True, tol=1e-3), dict(C=1.0 / d, dual=False)):
            seconds, accuracy, converged = linear_svc_variant(x[fit], labels[fit], x[score], labels[score], **params)
            add(f"variant LinearSVC({params})" + ("" if converged else ", capped"), "flatten",
                f"{len(fit)}/{len(score)}", accuracy, seconds)
    for layer in ("fc2", "flatten"):
        x = feats.layers[layer][order]
        start = time.perf_counter()
        A.embed_tsne(x, perplexity=40, seed=args.seed, progress=False)
        add("cifarlab t-SNE (openTSNE, perplexity 40, PCA to 50, exact kNN, ints_in_interval=2)", layer,
            f"{len(order)}", None, time.perf_counter() - start, GOALS[("tsne", None)])
    if args.variants:
        from openTSNE import TSNE
        from sklearn.decomposition import PCA

        x = PCA(A.PCA_DIMS, random_state=args.seed).fit_transform(feats.layers["fc2"][order]).astype(np.float32)
        start = time.perf_counter()
        TSNE(perplexity=40, n_jobs=-1, random_state=args.seed).fit(x)
        add("variant t-SNE, openTSNE defaults (Annoy kNN, ints_in_interval=1), after PCA", "fc2", f"{len(order)}",
            None, time.perf_counter() - start)

    print()
    print("| what | layer (dims) | fit/score or points | accuracy | seconds | goal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
