"""Training objectives of the studies."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
