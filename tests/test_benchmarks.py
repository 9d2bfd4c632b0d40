"""The benchmark scripts measure what they say they measure."""

import importlib.util
from pathlib import Path

import torch

from cifarlab.models import convnet


def _load(name: str, monkeypatch):
    """A benchmark script as a module; its sibling scripts import as they do when it runs."""
    folder = Path(__file__).parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_into_stack(nets, stack) -> None:
    """The ConvNets' weights as the stacked model's members."""
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            getattr(stack, f"{name}_w").copy_(torch.cat([getattr(n.stages["flatten"], name).weight for n in nets]))
            getattr(stack, f"{name}_b").copy_(torch.cat([getattr(n.stages["flatten"], name).bias for n in nets]))
        for i, layer in enumerate(("fc1", "fc2", "logits")):
            linears = [n.stages[layer].linear if layer != "logits" else n.stages[layer] for n in nets]
            stack.fc_w[i].copy_(torch.stack([m.weight.T for m in linears]))
            stack.fc_b[i].copy_(torch.stack([m.bias[None] for m in linears]))


def test_stacked_convnet_members_are_the_report_convnet(monkeypatch):
    """Member k of the stacked model computes what the ConvNet with member k's weights computes,
    in both memory layouts the benchmark feeds it."""
    stacked_models = _load("stacked_models", monkeypatch)
    torch.manual_seed(0)
    nets = [convnet(init="xavier") for _ in range(3)]
    stack = stacked_models.StackedConvNet(3)
    _copy_into_stack(nets, stack)
    images = torch.randn(3, 4, 3, 32, 32)  # member, batch, C, H, W
    expected = torch.stack([net(x) for net, x in zip(nets, images)])
    x = images.transpose(0, 1).reshape(4, 9, 32, 32)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = stack(x.contiguous(memory_format=layout))
        assert got.shape == (3, 4, 10)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_stacked_task_loss_and_gradients_are_each_members_own(monkeypatch):
    """The timed step trains K runs: its loss is the sum of the members' losses (their own
    batches, labels and L2 terms), so each member's gradient is that of its own run."""
    import torch.nn.functional as F

    from cifarlab.config import Config
    from cifarlab.models import decayed_weights
    from synthetic import synthetic_cifar

    stacked_models = _load("stacked_models", monkeypatch)
    data = synthetic_cifar(4, 2)
    for layout in ("channels_last", "contiguous"):
        cfg = Config(batch_size=6, weight_decay=0.01, memory_format=layout)
        task = stacked_models.StackedTask(2, cfg, data, torch.device("cpu"))
        torch.manual_seed(1)
        nets = [convnet(init="xavier") for _ in range(2)]
        _copy_into_stack(nets, task.model)
        (index,) = task.train_inputs(3)
        loss, _, n = task.train_loss(index)
        loss.backward()
        expected = 0.0
        for k, net in enumerate(nets):
            x, y = task.images.batch(index[:, k])
            expected = expected + F.cross_entropy(net(x), y) + 0.01 * sum(w.square().sum() for w in decayed_weights(net)) / 2
        expected.backward()
        assert n == 12 and not torch.equal(index[:, 0], index[:, 1])  # each member its own shuffle
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        grad = task.model.conv1_w.grad.view(2, 64, 3, 5, 5)
        for k, net in enumerate(nets):
            ref = net.stages["flatten"].conv1.weight.grad
            torch.testing.assert_close(grad[k], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
