"""The studies as engine tasks: data on the device, batches by index, loss, evaluation."""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab import CifarlabError
from cifarlab.config import Config, embeds_anchor_once, same_class_pairs
from cifarlab.data import Cifar10, data_digest, holdout_split, load_cifar10, mean_image
from cifarlab.losses import classifier_loss, contrastive_loss, same_class_threshold
from cifarlab.backbones import build_backbone
from cifarlab.models import StagedNet, convnet, decayed_weights, fc_block, init_weights, siamese_branch
from cifarlab.pairs import ClassIndex, fixed_tuples, sample_pairs

EVAL_BATCH = 1000  # images at a time when scoring or embedding a split, at 32x32


def eval_batch(input_size: int = 32) -> int:
    """EVAL_BATCH at 32x32, fewer for larger inputs: the same pixels, so the same memory (1,000
    images at 224x224 would need tens of GB of VGG-16 activations)."""
    return max(1, EVAL_BATCH * 32 * 32 // (input_size * input_size))


def pick_memory_format(device: torch.device, requested: str) -> torch.memory_format:
    """auto is channels_last: faster on GPUs (cuDNN) and, measured here, on the CPU too
    (the ConvNet: benchmarks/step_time.py; the Lite0 backbone: 1.0 vs 1.8 s per step)."""
    return torch.contiguous_format if requested == "contiguous" else torch.channels_last


class DeviceImages:
    """A split held on the device as one float32 tensor, the seed's mean image already subtracted.

    Stored NHWC when the model runs channels_last, so a gathered batch is a free permute.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray | None,
                 device: torch.device, memory_format: torch.memory_format):
        # N, H, W, C bytes to the device, made floats there: a quarter of the bytes to move, and
        # on a GPU no host pass over 600 MB of floats (0.6 s on the development CPU) per run
        x = torch.from_numpy(images).to(device).float()
        if mean is not None:
            x.sub_(torch.from_numpy(mean).to(device))
        self.channels_last = memory_format == torch.channels_last
        self.x = (x if self.channels_last else x.permute(0, 3, 1, 2)).contiguous()
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


def device_splits(cfg: Config, data: Cifar10, device: torch.device, fmt,
                  center: bool = True) -> dict[str, DeviceImages]:
    """train, val (the last cfg.val_fraction of train, if any) and test, on the device; with
    `center`, minus the mean image of the (remaining) training images, as the seed did."""
    train_images, train_labels = data.train_images, data.train_labels
    val = None
    if cfg.val_fraction > 0:
        (train_images, train_labels), val = holdout_split(train_images, train_labels, cfg.val_fraction)
    mean = mean_image(train_images) if center else None
    splits = {"train": DeviceImages(train_images, train_labels, mean, device, fmt)}
    if val is not None:
        splits["val"] = DeviceImages(*val, mean, device, fmt)
    splits["test"] = DeviceImages(data.test_images, data.test_labels, mean, device, fmt)
    return splits


@torch.no_grad()
def evaluate_classifier(logits_of, n: int, device: torch.device, autocast,
                        batch: int = EVAL_BATCH) -> tuple[float, float]:
    """Mean cross-entropy (without the L2 term) and accuracy over a split of n images, where
    logits_of(index) gives a batch's (logits, labels)."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, n, batch):
        index = torch.arange(start, min(start + batch, n), device=device)
        with autocast():
            logits, y = logits_of(index)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / n, correct.item() / n


class ClassifierTask:
    """Study 1: the ConvNet trained with softmax cross-entropy (+ the seed's L2 term)."""

    eval_batch = EVAL_BATCH  # images scored at a time

    def __init__(self, cfg: Config, data: Cifar10, device: torch.device, autocast, training: bool = True):
        self.cfg, self.autocast = cfg, autocast
        fmt = pick_memory_format(device, cfg.memory_format)
        self.splits = device_splits(cfg, data, device, fmt)
        self.model = convnet(len(data.classes), cfg.dropout, cfg.init).to(device, memory_format=fmt)
        self.decayed = decayed_weights(self.model)
        self.shuffle = EpochShuffler(len(self.splits["train"]), cfg.batch_size, cfg.seed, device) if training else None

    def _logits(self, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.splits[split].batch(index)
        return self.model(x), y

    def train_inputs(self, step: int) -> tuple[torch.Tensor, ...]:
        return (self.shuffle(step),)

    def train_loss(self, index: torch.Tensor):
        logits, y = self._logits("train", index)
        loss = classifier_loss(logits, y, self.decayed, self.cfg.weight_decay)
        return loss, (logits.argmax(1) == y).sum(), index.shape[0]

    def evaluate(self) -> dict[str, tuple[float, float]]:
        return {split: evaluate_classifier(functools.partial(self._logits, split), len(images), images.y.device,
                                           self.autocast, self.eval_batch)
                for split, images in self.splits.items() if split != "train"}


@torch.no_grad()
def embed(model, images: DeviceImages, autocast, progress: bool = False, desc: str = "",
          batch: int = EVAL_BATCH) -> torch.Tensor:
    """The model's output for every image of a split, in order."""
    parts = []
    batches = images.slices(batch)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(images) // batch), desc=desc, unit="batch", leave=False)
    for x, _ in batches:
        with autocast():
            parts.append(model(x).float())
    return torch.cat(parts)


class SiameseTask:
    """Study 2: one branch network embeds both images of a pair; a contrastive loss on their distance.

    Training pairs come from the first (1 - val_fraction) of train, validation tuples from the
    rest, test tuples from the test set. Besides the loss it reports the accuracy of the rule
    "same class iff d < threshold" (see losses.same_class_threshold).
    """

    def __init__(self, cfg: Config, data: Cifar10, device: torch.device, autocast, training: bool = True):
        self.cfg, self.autocast = cfg, autocast
        fmt = pick_memory_format(device, cfg.memory_format)
        self.splits = device_splits(cfg, data, device, fmt)
        self.model = siamese_branch(cfg.dropout, cfg.init).to(device, memory_format=fmt)
        self.n_classes = len(data.classes)
        if training:  # what only training needs: eval and features score a checkpoint on any few images
            self.pool = ClassIndex(self.splits["train"].y, self.n_classes, "the training pool",
                                   "use more data, or a smaller --val-fraction")
            if cfg.sampler == "anchor":
                self.pool.require_partners(same_class_pairs(cfg.fraction_same, cfg.batch_size))
            if cfg.sampler == "random" and cfg.batch_size > len(self.splits["train"]):
                raise CifarlabError(f"the training pool ({len(self.splits['train'])} images) is smaller than a batch "
                                    f"of {cfg.batch_size} distinct anchors; use a smaller batch size, or more data")
            self.eval_tuples  # drawn now, so that a split too small for them stops the run before it trains
        self.threshold = same_class_threshold(cfg.margin, cfg.loss)
        self.gen = torch.Generator(device=device)

    @functools.cached_property
    def eval_tuples(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The fixed val and test tuples, drawn on the CPU and moved to the device: a CUDA generator
        gives another stream for the same seed, and a run's curves and `eval` must score the same
        tuples on every device (after a resume on another device too)."""
        tuples = {}
        for offset, split in enumerate(("val", "test")):
            labels = self.splits[split].y
            fix = "use more data, or a larger --val-fraction" if split == "val" else "use more test images"
            drawn = fixed_tuples(ClassIndex(labels.cpu(), self.n_classes, f"the {split} split", fix), self.cfg.val_tuples,
                                 self.cfg.batch_size, self.cfg.fraction_same, seed=self.cfg.seed + offset)
            tuples[split] = tuple(t.to(labels.device) for t in drawn)
        return tuples

    def train_inputs(self, step: int) -> tuple[torch.Tensor, ...]:
        self.gen.manual_seed(self.cfg.seed * 1_000_003 + step)  # pairs are a pure function of the step
        return sample_pairs(self.cfg.sampler, self.pool, self.cfg.batch_size, self.cfg.fraction_same, self.gen)

    def _score(self, first_emb, second_emb, same):
        loss, d = contrastive_loss(first_emb, second_emb, same, self.cfg.margin, self.cfg.loss)
        return loss, ((d < self.threshold).float() == same).sum()

    def embed_pairs(self, first: torch.Tensor, second: torch.Tensor,
                    shared_anchor: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches' embeddings of a batch of training pairs, in one forward pass.

        In the anchor sampler's batches every first image is the same one: it is embedded once
        and broadcast (B + 1 images through the network instead of 2B; autograd sums its
        gradient over the rows). Only without dropout, where the B copies would come out the same:
        with dropout each copy has a mask of its own, as in the seed's two-tower graph.
        `shared_anchor` None decides from the config."""
        if shared_anchor is None:
            shared_anchor = embeds_anchor_once(self.cfg)
        images = self.splits["train"]
        if shared_anchor:
            emb = self.model(images.batch(torch.cat([first[:1], second]))[0])
            return emb[:1].expand(second.shape[0], -1), emb[1:]
        emb = self.model(images.batch(torch.cat([first, second]))[0])
        return emb[:first.shape[0]], emb[first.shape[0]:]

    def train_loss(self, first: torch.Tensor, second: torch.Tensor, same: torch.Tensor):
        loss, correct = self._score(*self.embed_pairs(first, second), same)
        return loss, correct, same.shape[0]

    def evaluate(self) -> dict[str, tuple[float, float]]:
        out = {}
        for split, (first, second, same) in self.eval_tuples.items():
            emb = embed(self.model, self.splits[split], self.autocast)
            loss, correct = self._score(emb[first.flatten()], emb[second.flatten()], same.flatten())
            out[split] = (loss.item(), correct.item() / same.numel())
        return out


def batch_norms(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class TransferNet(StagedNet):
    """A pretrained backbone (stage `pool5`) under the ConvNet's fc head.

    The backbone's BatchNorm layers (EfficientNet-Lite0 has them) always run on their ImageNet
    statistics, also while refining: batches of 128 small images would only blur them.
    """

    def train(self, mode: bool = True):
        super().train(mode)
        for m in batch_norms(self.stages["pool5"]):
            m.eval()
        return self


BATCH_NORM_IMAGES = 2048  # training images a random backbone's BatchNorm statistics are estimated on


def estimate_batch_norm_statistics(backbone: torch.nn.Module, images, seed: int,
                                   count: int = BATCH_NORM_IMAGES, batch: int = 256) -> None:
    """A random backbone's BatchNorm statistics, estimated once on random training images.

    TransferNet keeps BatchNorm on its running statistics; a random backbone's (mean 0, variance
    1) make a random EfficientNet-Lite0's pool5 features ~1e-10, on which nothing can train, not
    even while refining. So `--backbone-weights none` is a random network with statistics that
    fit its inputs, a baseline that says what ImageNet's weights add."""
    norms = batch_norms(backbone)
    if not norms:
        return
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    if len(rows) < 2:
        raise CifarlabError(f"a random backbone's BatchNorm statistics need at least 2 training images "
                            f"(got {len(rows)}); use more data or a smaller --val-fraction")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    training = backbone.training
    backbone.train()
    seen = 0
    with torch.no_grad():
        # parts of near-equal size (a part of one image would stop the last BatchNorm, whose map
        # is 1x1), each weighted by its images: the average is over images, not over parts
        for part in rows.to(images.y.device).tensor_split(math.ceil(len(rows) / batch)):
            for m in norms:
                m.momentum = len(part) / (seen + len(part))
            backbone(images.batch(part)[0])
            seen += len(part)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    backbone.train(training)
    backbone.weights_source += f"; BatchNorm statistics estimated on {len(rows):,} training images"


class TransferTask(ClassifierTask):
    """Study 3: backbone -> fc1 384 -> fc2 192 -> fc3 10; the backbone is frozen before step K
    (`refine_after`) and trains with the head from step K on.

    While frozen (and the inputs are not augmented, which they never are here) each image's
    pool5 features are computed once, and the head trains on them at head speed.
    """

    def __init__(self, cfg: Config, data: Cifar10, device: torch.device, autocast, progress: bool = True,
                 load_weights: bool = True, training: bool = True):
        """`load_weights` False: the backbone starts random, for a checkpoint to replace (see build_task)."""
        self.cfg, self.autocast = cfg, autocast
        fmt = pick_memory_format(device, cfg.memory_format)
        self.splits = device_splits(cfg, data, device, fmt, center=False)  # the backbone normalises
        backbone = build_backbone(cfg.backbone, cfg.backbone_weights if load_weights else "none", cfg.input_size,
                                  progress=progress)
        head = OrderedDict(  # the head's layers and init as study 1
            fc1=fc_block(backbone.out_features, 384, cfg.dropout),
            fc2=fc_block(384, 192, cfg.dropout),
            logits=torch.nn.Linear(192, len(data.classes)),
        )
        init_weights(head.values(), cfg.init)
        self.model = TransferNet(OrderedDict(pool5=backbone, **head)).to(device, memory_format=fmt)
        self.backbone = backbone
        self.image_batch = eval_batch(cfg.input_size)  # 20 images at 224x224, not 1,000
        if load_weights and cfg.backbone_weights == "none":
            estimate_batch_norm_statistics(backbone, self.splits["train"], cfg.seed)
        self.decayed = decayed_weights(self.model)
        self.shuffle = EpochShuffler(len(self.splits["train"]), cfg.batch_size, cfg.seed, device) if training else None
        self.refining = cfg.refine_after == 0
        backbone.requires_grad_(self.refining)
        self.cached: dict[str, torch.Tensor] = {}
        self.cache_seconds, self.cache_used, self.progress = 0.0, False, progress
        self.cache_wanted: bool | None = None  # decided at the first frozen step this process trains

    @staticmethod
    def cache_pays(cfg: Config, n_train: int, n_all: int, start: int = 0) -> bool:
        """Caching runs the backbone once over every image (n_all); training without it runs the
        backbone over each batch and each evaluation of the frozen steps from `start` (a resume's
        step) on. Cache only when that is more (a run that refines after 100 steps would
        otherwise embed 60,000 images for 12,800)."""
        end = cfg.steps if cfg.refine_after < 0 else min(cfg.refine_after, cfg.steps)
        frozen = max(end - start, 0)
        evaluations = max(end // cfg.eval_every - start // cfg.eval_every, 0)
        return frozen * cfg.batch_size + evaluations * (n_all - n_train) > n_all

    def summary(self) -> dict:
        return {"backbone": self.cfg.backbone, "backbone_weights": self.backbone.weights_source,
                "feature_cache": self.cache_used,
                "feature_cache_seconds": round(self.cache_seconds, 3)}

    def resume_state(self) -> dict:
        """What last.pt carries for the summary: whether (and how long) the cache was built,
        also by an earlier process of the run, and where the backbone's weights first came from
        (a resume loads them from last.pt, not from that file)."""
        return {"cache_used": self.cache_used, "cache_seconds": self.cache_seconds,
                "weights_source": self.backbone.weights_source}

    def load_resume_state(self, state: dict) -> None:
        self.cache_used = self.cache_used or bool(state.get("cache_used"))
        self.cache_seconds += float(state.get("cache_seconds", 0.0))
        self.backbone.weights_source = str(state.get("weights_source")
                                           or f"{self.cfg.backbone_weights} (as the run's config records it)")

    def prepare_step(self, step: int) -> list:
        """Called by the engine before each training step; returns parameters that start training
        at this step (the backbone at step K). The feature cache is built here, at the first frozen
        step, after any checkpoint was loaded: evaluating or analysing a run never builds one, and
        so never scores a refined backbone's run on the frozen backbone's features."""
        if self.refining or self.cfg.refine_after < 0 or step < self.cfg.refine_after:
            if self.cache_wanted is None:
                n_all = sum(map(len, self.splits.values()))
                self.cache_wanted = (not self.refining and self.cfg.feature_cache
                                     and self.cache_pays(self.cfg, len(self.splits["train"]), n_all, start=step))
            if self.cache_wanted and not self.refining and not self.cached:
                self._cache_features()
            return []
        self.refining = True
        self.cached = {}  # the backbone changes from now on
        self.backbone.requires_grad_(True)
        return list(self.backbone.parameters())

    @property
    def eval_batch(self) -> int:
        """Images scored at a time: fewer for larger inputs, but the head alone on cached features."""
        return EVAL_BATCH if self.cached else self.image_batch

    def _cache_features(self) -> None:
        start, training = time.perf_counter(), self.model.training
        self.backbone.eval()
        with torch.no_grad():
            self.cached = {split: embed(self.backbone, images, self.autocast, progress=self.progress,
                                        desc=f"pool5 {split}", batch=self.eval_batch)
                           for split, images in self.splits.items()}
        self.model.train(training)  # back to the mode training is in
        self.cache_seconds += time.perf_counter() - start
        self.cache_used = True

    def _head(self, feats: torch.Tensor) -> torch.Tensor:
        for name in ("fc1", "fc2", "logits"):
            feats = self.model.stages[name](feats)
        return feats

    def _logits(self, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if split in self.cached:
            return self._head(self.cached[split].index_select(0, index)), self.splits[split].y.index_select(0, index)
        return super()._logits(split, index)


def build_task(cfg: Config, device: torch.device, autocast, data: Cifar10 | None = None, progress: bool = True,
               for_checkpoint: bool = False, training: bool = True):
    """The task for cfg.study, loading CIFAR-10 from cfg.data unless `data` is given.

    `for_checkpoint`: a checkpoint will replace every weight (eval, features), so a transfer
    run's backbone is built without its pretrained file, which may have moved or be a download
    away; the checkpoint holds the backbone, its input normalisation included. `training` False
    (eval, features): what only training needs, such as a batch that fits the training set, is
    not checked, so a checkpoint can be scored on a few images."""
    if data is None:
        data = load_cifar10(cfg.data or None, progress=progress)
    torch.manual_seed(cfg.seed)  # model init depends on the seed alone
    if cfg.study == "classifier":
        task = ClassifierTask(cfg, data, device, autocast, training=training)
    elif cfg.study == "siamese":
        task = SiameseTask(cfg, data, device, autocast, training=training)
    elif cfg.study == "transfer":
        task = TransferTask(cfg, data, device, autocast, progress=progress, load_weights=not for_checkpoint,
                            training=training)
    else:
        raise CifarlabError(f"unknown study {cfg.study!r}")
    task.data_digest = data_digest(data)  # saved in last.pt: a resume must train on the same images
    return task
