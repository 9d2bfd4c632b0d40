"""Pair sampling for the Siamese study, vectorised on the device.

Every sampler returns (first, second, same): index tensors into one pool of images and a
float tensor that is 1 for a same-class pair. A per-class index table lets a "random image of
class c" be one gather, so no Python loop runs over pairs.
"""

from __future__ import annotations

import torch

from cifarlab import CifarlabError
from cifarlab.config import same_class_pairs

SAMPLERS = ("anchor", "random")


class ClassIndex:
    """Where each class's images sit in a pool: a padded table plus each image's rank in its class."""

    def __init__(self, labels: torch.Tensor, num_classes: int = 10, name: str = "the pool", fix: str = "use more data"):
        self.labels = labels
        self.num_classes = num_classes
        self.name = name
        order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        if int(self.counts.min()) < 2:
            raise CifarlabError(
                f"pair sampling needs at least 2 images of every class in {name}, which has "
                f"{int(self.counts.min())} of class {int(self.counts.argmin())}; {fix}"
            )
        starts = torch.cumsum(self.counts, 0) - self.counts
        width = int(self.counts.max())
        self.table = torch.full((num_classes, width), -1, dtype=torch.long, device=labels.device)
        rank = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
        self.table[labels[order], rank] = order
        self.rank = torch.empty_like(labels)
        self.rank[order] = rank

    def require_partners(self, n_same: int) -> None:
        """Anchor batches pair one anchor with n_same distinct other images of its class, so every
        class needs n_same + 1 images (with fewer the draw would take padding slots)."""
        smallest = int(self.counts.min())
        if smallest <= n_same:
            raise CifarlabError(
                f"{self.name} is too small for anchor batches: its smallest class (class {int(self.counts.argmin())}) "
                f"has {smallest} images, and an anchor with {n_same} same-class partners needs {n_same + 1}; "
                f"use a smaller batch size or fraction_same, or more data"
            )

    def random_of_class(self, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One uniformly random image of each given class (with replacement)."""
        u = torch.rand(classes.shape, generator=gen, device=classes.device)
        return self.table[classes, (u * self.counts[classes]).long()]

    def random_partner(self, anchors: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A uniformly random other image of each anchor's class (never the anchor itself)."""
        classes = self.labels[anchors]
        u = torch.rand(anchors.shape, generator=gen, device=anchors.device)
        j = (u * (self.counts[classes] - 1)).long()
        j = j + (j >= self.rank[anchors]).long()  # skip the anchor's own slot
        return self.table[classes, j]

    def random_other_class(self, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random image of a uniformly chosen class different from each given class."""
        shift = torch.randint(1, self.num_classes, classes.shape, generator=gen, device=classes.device)
        return self.random_of_class((classes + shift) % self.num_classes, gen)


def anchor_pairs(index: ClassIndex, batch_size: int, fraction_same: float, gen: torch.Generator):
    """The report's default batch: one anchor repeated, paired with floor(f*B) distinct images of
    its class (label 1) and B - floor(f*B) images of other classes (label 0)."""
    device = index.labels.device
    n_same = same_class_pairs(fraction_same, batch_size)
    anchor = torch.randint(0, len(index.labels), (1,), generator=gen, device=device)
    cls = index.labels[anchor]
    # distinct positives: the n_same largest of random keys over the class's real slots
    keys = torch.rand(index.table.shape[1], generator=gen, device=device)
    invalid = (index.table[cls[0]] < 0) | (index.table[cls[0]] == anchor)
    keys = keys.masked_fill(invalid, -1.0)
    positives = index.table[cls[0], keys.topk(n_same).indices]
    negatives = index.random_other_class(cls.expand(batch_size - n_same), gen)
    first = anchor.expand(batch_size)
    second = torch.cat([positives, negatives])
    return first, second, _same_labels(n_same, batch_size, device)


def random_pairs(index: ClassIndex, batch_size: int, fraction_same: float, gen: torch.Generator):
    """The report's alternative batch: B distinct random anchors; the first floor(f*B) paired with a
    random image of their class, the rest with a random image of another class."""
    device = index.labels.device
    n_same = same_class_pairs(fraction_same, batch_size)
    anchors = torch.randperm(len(index.labels), generator=gen, device=device)[:batch_size]
    positives = index.random_partner(anchors[:n_same], gen)
    negatives = index.random_other_class(index.labels[anchors[n_same:]], gen)
    return anchors, torch.cat([positives, negatives]), _same_labels(n_same, batch_size, device)


def _same_labels(n_same: int, batch_size: int, device) -> torch.Tensor:
    same = torch.zeros(batch_size, device=device)
    same[:n_same] = 1.0
    return same


def sample_pairs(sampler: str, index: ClassIndex, batch_size: int, fraction_same: float, gen: torch.Generator):
    if sampler == "anchor":
        return anchor_pairs(index, batch_size, fraction_same, gen)
    if sampler == "random":
        return random_pairs(index, batch_size, fraction_same, gen)
    raise CifarlabError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def fixed_tuples(index: ClassIndex, count: int, batch_size: int, fraction_same: float, seed: int):
    """The seed's create_dataset: `count` anchor-form batches drawn once with a fixed seed,
    stacked as (count, B) tensors, for a validation loss that is comparable across steps."""
    index.require_partners(same_class_pairs(fraction_same, batch_size))
    gen = torch.Generator(device=index.labels.device).manual_seed(seed)
    batches = [anchor_pairs(index, batch_size, fraction_same, gen) for _ in range(count)]
    return tuple(torch.stack(parts) for parts in zip(*batches))
