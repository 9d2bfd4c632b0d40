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


def test_stacked_convnet_members_are_the_report_convnet(monkeypatch):
    """Member k of the stacked model computes what the ConvNet with member k's weights computes,
    in both memory layouts the benchmark feeds it."""
    stacked_models = _load("stacked_models", monkeypatch)
    torch.manual_seed(0)
    nets = [convnet(init="xavier") for _ in range(3)]
    stack = stacked_models.StackedConvNet(3)
    with torch.no_grad():
        for name, attr in (("conv1", "conv1"), ("conv2", "conv2")):
            getattr(stack, f"{attr}_w").copy_(torch.cat([getattr(n.stages["flatten"], name).weight for n in nets]))
            getattr(stack, f"{attr}_b").copy_(torch.cat([getattr(n.stages["flatten"], name).bias for n in nets]))
        for i, layer in enumerate(("fc1", "fc2", "logits")):
            linears = [n.stages[layer].linear if layer != "logits" else n.stages[layer] for n in nets]
            stack.fc_w[i].copy_(torch.stack([m.weight.T for m in linears]))
            stack.fc_b[i].copy_(torch.stack([m.bias[None] for m in linears]))
    images = torch.randn(3, 4, 3, 32, 32)  # member, batch, C, H, W
    expected = torch.stack([net(x) for net, x in zip(nets, images)])
    x = images.transpose(0, 1).reshape(4, 9, 32, 32)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = stack(x.contiguous(memory_format=layout))
        assert got.shape == (3, 4, 10)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
