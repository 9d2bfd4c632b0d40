"""A tiny CIFAR-shaped data set that a ConvNet can learn in a few dozen steps."""

from __future__ import annotations

import numpy as np


def synthetic_arrays(n_per_class: int, seed: int, pattern_seed: int = 123, noise: float = 30.0):
    """Each class is a fixed random colour pattern plus Gaussian pixel noise."""
    patterns = np.random.default_rng(pattern_seed).uniform(40, 215, size=(10, 32, 32, 3))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    images = patterns[labels] + rng.normal(0, noise, size=(len(labels), 32, 32, 3))
    order = rng.permutation(len(labels))
    return np.clip(images, 0, 255).astype(np.uint8)[order], labels[order].astype(np.int64)


def synthetic_cifar(n_train_per_class: int = 30, n_test_per_class: int = 10):
    from pathlib import Path

    from cifarlab.data import CLASSES, Cifar10

    train_x, train_y = synthetic_arrays(n_train_per_class, seed=1)
    test_x, test_y = synthetic_arrays(n_test_per_class, seed=2)
    return Cifar10(
        train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y,
        classes=tuple(CLASSES), layout="synthetic", source=Path("synthetic"),
        checksum="not applicable", cache=None, from_cache=False,
    )
