"""Training objectives of the studies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarlab import CifarlabError


def l2_penalty(weights: list[torch.Tensor], weight_decay: float) -> torch.Tensor:
    """weight_decay * sum(W**2) / 2 over the given matrices: TensorFlow's tf.nn.l2_loss, as the seed."""
    return weight_decay * sum(w.square().sum() for w in weights) / 2


def classifier_loss(
    logits: torch.Tensor, labels: torch.Tensor, decayed: list[torch.Tensor], weight_decay: float
) -> torch.Tensor:
    """Mean softmax cross-entropy plus the seed's L2 term (not decoupled AdamW decay)."""
    loss = F.cross_entropy(logits.float(), labels)
    if weight_decay:
        loss = loss + l2_penalty(decayed, weight_decay)
    return loss


CONTRASTIVE_LOSSES = ("report1", "report2", "hadsell")


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, same: torch.Tensor, margin: float,
                     kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean contrastive loss over pairs and the distances d; `same` is 1 for a same-class pair.

    report1: Y d^2/2 + (1-Y) max(m - d^2, 0)        (the report's loss 1)
    report2: Y d^2   + (1-Y) max(m - d^2, 0)        (the report's loss 2)
    hadsell: Y d^2/2 + (1-Y) max(m - d, 0)^2 / 2    (Hadsell, Chopra & LeCun 2006)
    d itself is taken as sqrt(max(d^2, 1e-12)) so its gradient stays finite at d = 0.
    """
    d2 = (first.float() - second.float()).square().sum(1)
    d = d2.clamp_min(1e-12).sqrt()
    if kind == "report1":
        loss = same * d2 / 2 + (1 - same) * F.relu(margin - d2)
    elif kind == "report2":
        loss = same * d2 + (1 - same) * F.relu(margin - d2)
    elif kind == "hadsell":
        loss = same * d2 / 2 + (1 - same) * F.relu(margin - d).square() / 2
    else:
        raise CifarlabError(f"unknown loss {kind!r}; choose one of {', '.join(CONTRASTIVE_LOSSES)}")
    return loss.mean(), d


def same_class_threshold(margin: float, kind: str) -> float:
    """Distance under which a pair is called same-class: halfway between where the loss puts
    positives (d = 0) and where its hinge releases negatives (d^2 = m for the report's losses,
    d = m for Hadsell's)."""
    return (margin if kind == "hadsell" else margin ** 0.5) / 2
