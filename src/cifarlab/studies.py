"""The studies as engine tasks: data on the device, batches by index, loss, evaluation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab import CifarlabError
from cifarlab.config import Config
from cifarlab.data import Cifar10, holdout_split, load_cifar10, mean_image
from cifarlab.losses import classifier_loss
from cifarlab.models import convnet, decayed_weights

EVAL_BATCH = 1000


def pick_memory_format(device: torch.device, requested: str) -> torch.memory_format:
    """channels_last where it is faster: cuDNN/bf16 on GPU; on CPU plain NCHW (benchmarks/step_time.py)."""
    if requested == "channels_last" or (requested == "auto" and device.type == "cuda"):
        return torch.channels_last
    return torch.contiguous_format


class DeviceImages:
    """A split held on the device as one float32 tensor, the seed's mean image already subtracted.

    Stored NHWC when the model runs channels_last, so a gathered batch is a free permute.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray,
                 device: torch.device, memory_format: torch.memory_format):
        x = torch.from_numpy(images).float().sub_(torch.from_numpy(mean))  # N, H, W, C
        self.channels_last = memory_format == torch.channels_last
        self.x = (x if self.channels_last else x.permute(0, 3, 1, 2)).contiguous().to(device)
        self.y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)

    def __len__(self) -> int:
        return self.y.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x.index_select(0, index)
        return (x.permute(0, 3, 1, 2) if self.channels_last else x), self.y.index_select(0, index)

    def slices(self, size: int = EVAL_BATCH):
        for start in range(0, len(self), size):
            index = torch.arange(start, min(start + size, len(self)), device=self.y.device)
            yield self.batch(index)


class EpochShuffler:
    """Batch indices for step s, a pure function of (seed, s): resume needs no sampler state.

    As the seed's next_batch, each epoch is a fresh permutation and the last partial batch
    is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        if batch_size > n:
            raise CifarlabError(f"batch size {batch_size} is larger than the training set ({n} images)")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=gen).to(self.device)
            self._epoch = epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


@torch.no_grad()
def evaluate_classifier(model, images: DeviceImages, autocast) -> tuple[float, float]:
    """Mean cross-entropy (without the L2 term) and accuracy over a whole split."""
    loss_sum = torch.zeros((), device=images.y.device)
    correct = torch.zeros((), device=images.y.device, dtype=torch.long)
    for x, y in images.slices():
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(images), correct.item() / len(images)


class ClassifierTask:
    """Study 1: the ConvNet trained with softmax cross-entropy (+ the seed's L2 term)."""

    def __init__(self, cfg: Config, data: Cifar10, device: torch.device, autocast):
        self.cfg, self.autocast = cfg, autocast
        fmt = pick_memory_format(device, cfg.memory_format)
        train_images, train_labels = data.train_images, data.train_labels
        val = None
        if cfg.val_fraction > 0:
            (train_images, train_labels), val = holdout_split(train_images, train_labels, cfg.val_fraction)
        mean = mean_image(train_images)
        self.splits = {"train": DeviceImages(train_images, train_labels, mean, device, fmt)}
        if val is not None:
            self.splits["val"] = DeviceImages(*val, mean, device, fmt)
        self.splits["test"] = DeviceImages(data.test_images, data.test_labels, mean, device, fmt)
        self.model = convnet(len(data.classes), cfg.dropout, cfg.init).to(device, memory_format=fmt)
        self.decayed = decayed_weights(self.model)
        self.shuffle = EpochShuffler(len(self.splits["train"]), cfg.batch_size, cfg.seed, device)

    def train_inputs(self, step: int) -> tuple[torch.Tensor, ...]:
        return (self.shuffle(step),)

    def train_loss(self, index: torch.Tensor):
        x, y = self.splits["train"].batch(index)
        logits = self.model(x)
        loss = classifier_loss(logits, y, self.decayed, self.cfg.weight_decay)
        return loss, (logits.argmax(1) == y).sum(), index.shape[0]

    def evaluate(self) -> dict[str, tuple[float, float]]:
        return {split: evaluate_classifier(self.model, images, self.autocast)
                for split, images in self.splits.items() if split != "train"}


def build_task(cfg: Config, device: torch.device, autocast, data: Cifar10 | None = None, progress: bool = True):
    """The task for cfg.study, loading CIFAR-10 from cfg.data unless `data` is given."""
    if data is None:
        data = load_cifar10(cfg.data or None, progress=progress)
    torch.manual_seed(cfg.seed)  # model init depends on the seed alone
    if cfg.study == "classifier":
        return ClassifierTask(cfg, data, device, autocast)
    raise CifarlabError(f"unknown study {cfg.study!r}")
