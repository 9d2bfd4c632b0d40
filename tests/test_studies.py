"""What each study feeds the engine: the seed's preprocessing, its splits, its scores and its logs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab.config import Config
from cifarlab.engine import make_autocast
from cifarlab.losses import same_class_threshold
from cifarlab.studies import ClassifierTask, SiameseTask, TransferTask
from cifarlab.train import train
from conftest import logged_rows, wrap_built_tasks
from synthetic import synthetic_cifar

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar(10, 4)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)


def whole(split) -> torch.Tensor:
    return split.batch(torch.arange(len(split)))[0]


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_every_split_has_the_mean_image_of_the_remaining_training_images_subtracted(data, memory_format):
    cfg = Config(val_fraction=0.2, batch_size=10, device="cpu", memory_format=memory_format)
    task = ClassifierTask(cfg, data, CPU, make_autocast("fp32", CPU))
    cut = len(data.train_labels) * 4 // 5
    mean = data.train_images[:cut].astype(np.float64).mean(axis=0)  # the val images are not in it
    expected = {"train": data.train_images[:cut] - mean, "val": data.train_images[cut:] - mean,
                "test": data.test_images - mean}
    assert set(task.splits) == set(expected)
    for split, images in expected.items():
        assert torch.allclose(whole(task.splits[split]), nchw(images), atol=1e-4), split
        assert torch.equal(task.splits[split].y, torch.from_numpy(
            {"train": data.train_labels[:cut], "val": data.train_labels[cut:], "test": data.test_labels}[split]))
    assert task.shuffle.n == cut  # training batches are drawn from the first 80% only


def test_transfer_inputs_are_the_raw_pixels_for_the_backbone_to_normalise(data):
    cfg = Config.for_study("transfer", batch_size=10, device="cpu", backbone="efficientnet-lite0",
                           backbone_weights="none")
    task = TransferTask(cfg, data, CPU, make_autocast("fp32", CPU), progress=False, load_weights=False)
    assert torch.equal(whole(task.splits["train"]), nchw(data.train_images))
    assert torch.equal(whole(task.splits["test"]), nchw(data.test_images))


def test_the_validation_score_is_the_models_on_the_held_out_images(data):
    cfg = Config(val_fraction=0.2, batch_size=10, device="cpu", init="xavier")
    torch.manual_seed(0)
    task = ClassifierTask(cfg, data, CPU, make_autocast("fp32", CPU))
    task.model.eval()
    scores = task.evaluate()
    cut = len(data.train_labels) * 4 // 5
    mean = data.train_images[:cut].astype(np.float64).mean(axis=0)
    for split, images, labels in (("val", data.train_images[cut:], data.train_labels[cut:]),
                                  ("test", data.test_images, data.test_labels)):
        with torch.no_grad():
            logits = task.model(nchw(images - mean).contiguous(memory_format=torch.channels_last))
        labels = torch.from_numpy(labels)
        loss, accuracy = scores[split]
        assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert scores["val"][0] != scores["test"][0]


def unit_pair(distance: float) -> tuple[list[float], list[float]]:
    """Two unit vectors `distance` apart (a chord of the unit circle)."""
    angle = 2 * math.asin(distance / 2)
    return [1.0, 0.0], [math.cos(angle), math.sin(angle)]


@pytest.mark.parametrize("kind", ["report1", "hadsell"])
def test_a_pair_is_called_same_class_exactly_when_its_distance_is_under_the_threshold(data, kind):
    cfg = Config.for_study("siamese", loss=kind, margin=1.0, batch_size=10, device="cpu")
    task = SiameseTask(cfg, data, CPU, make_autocast("fp32", CPU), training=False)
    threshold = same_class_threshold(cfg.margin, kind)
    assert task.threshold == threshold
    near, far = 0.8 * threshold, 1.2 * threshold
    # same-near and different-far are right (6 of them), same-far and different-near wrong (2)
    distances = [near, far, far, near, near, far, far, near]
    same = torch.tensor([1., 0., 1., 0., 1., 0., 0., 1.])
    first, second = (torch.tensor(v) for v in zip(*(unit_pair(d) for d in distances)))
    loss, correct = task._score(first, second, same)
    assert correct.item() == 6
    _, all_right = task._score(first, second, torch.tensor([float(d < threshold) for d in distances]))
    assert all_right.item() == len(distances)


def test_the_logged_train_loss_and_accuracy_are_the_means_over_the_steps_since_the_last_log(tmp_path, monkeypatch):
    steps = []  # (loss, correct, n) of each training step, as the step computed them

    def recording(task):
        step_loss = task.train_loss

        def train_loss(*inputs):
            loss, correct, n = step_loss(*inputs)
            steps.append((loss.item(), int(correct), n))
            return loss, correct, n

        task.train_loss = train_loss
        return task

    wrap_built_tasks(monkeypatch, recording)
    cfg = Config(steps=20, batch_size=20, lr=1e-3, eval_every=10, checkpoint_every=20, init="xavier",
                 device="cpu", tensorboard=False)
    run, _ = train(cfg, out=str(tmp_path / "run"), progress=False, data=synthetic_cifar())
    assert len(steps) == 20
    rows = logged_rows(run.path, "train")
    assert [r["step"] for r in rows] == [10, 20]
    for row, window in zip(rows, (steps[:10], steps[10:])):
        assert row["loss"] == pytest.approx(sum(s[0] for s in window) / 10, rel=1e-5)
        assert row["accuracy"] == pytest.approx(sum(s[1] for s in window) / sum(s[2] for s in window))
    assert rows[0]["loss"] != pytest.approx(rows[1]["loss"], rel=1e-3)  # it learns between them
