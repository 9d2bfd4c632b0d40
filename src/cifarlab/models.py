"""The networks of the report, built as a chain of named stages.

Every network is a `StagedNet`: an ordered set of stages whose outputs have names
(`flatten`, `fc1`, `fc2`, ...). `forward` runs them all; `features` runs only as far as
the deepest requested name and returns those outputs. The feature-analysis code therefore
works on any study's network without knowing its layers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import CifarlabError

INIT_SCHEMES = ("normal", "xavier")


class StagedNet(nn.Module):
    """A sequence of named stages; the name of a stage is the name of its output."""

    def __init__(self, stages: "OrderedDict[str, nn.Module]"):
        super().__init__()
        self.stages = nn.ModuleDict(stages)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            x = stage(x)
        return x

    def features(self, x: torch.Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Outputs of the named stages, computing no stage beyond the deepest one asked for."""
        unknown = [name for name in layers if name not in self.stages]
        if unknown:
            raise CifarlabError(
                f"unknown layer {', '.join(unknown)}; this network has: {', '.join(self.layer_names)}"
            )
        wanted, out = set(layers), {}
        for name, stage in self.stages.items():
            x = stage(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out


class MaxPoolSame(nn.Module):
    """TensorFlow's max_pool with padding='SAME' (pad right/bottom only), as the seed used.

    ceil_mode with no padding gives exactly TF's windows: 32 -> 16 -> 8 for a 3x3/2 pool.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, ceil_mode=True)


def fc_block(in_features: int, out_features: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout(p); `dropout` is the probability of dropping a unit."""
    return nn.Sequential(
        OrderedDict(
            linear=nn.Linear(in_features, out_features),
            relu=nn.ReLU(),
            dropout=nn.Dropout(dropout),
        )
    )


def convnet_trunk() -> nn.Sequential:
    """The report's two conv 5x5x64 -> ReLU -> maxpool 3x3/2 blocks, then flatten (4096).

    The ReLU runs after the pool: max and ReLU commute, so outputs and gradients are those of
    conv -> ReLU -> pool, but the ReLU touches 4x fewer values (about 15% of a CPU step).
    """
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 64, 5, padding=2),
            pool1=MaxPoolSame(),
            relu1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(64, 64, 5, padding=2),
            pool2=MaxPoolSame(),
            relu2=nn.ReLU(inplace=True),
            flatten=nn.Flatten(),
        )
    )


def init_weights(modules, scheme: str = "normal") -> None:
    """The seed's init: weights N(0, 0.001), biases 0; or Xavier (Glorot uniform)."""
    if scheme not in INIT_SCHEMES:
        raise CifarlabError(f"unknown init {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if scheme == "normal":
                    nn.init.normal_(m.weight, mean=0.0, std=0.001)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


def convnet(num_classes: int = 10, dropout: float = 0.0, init: str = "normal") -> StagedNet:
    """The report's study-1 classifier: taps flatten (4096), fc1 (384), fc2 (192), logits."""
    net = StagedNet(
        OrderedDict(
            flatten=convnet_trunk(),
            fc1=fc_block(4096, 384, dropout),
            fc2=fc_block(384, 192, dropout),
            logits=nn.Linear(192, num_classes),
        )
    )
    init_weights([net], init)
    return net


class L2Normalize(nn.Module):
    """Project onto the unit sphere: the Siamese embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def siamese_branch(dropout: float = 0.0, init: str = "normal") -> StagedNet:
    """Study 2's branch: the ConvNet up to fc2 (no fc3), then L2 normalisation (192-d unit vector).

    Both inputs of a pair go through this one network, so the weights are shared by construction.
    """
    net = StagedNet(
        OrderedDict(
            flatten=convnet_trunk(),
            fc1=fc_block(4096, 384, dropout),
            fc2=fc_block(384, 192, dropout),
            embedding=L2Normalize(),
        )
    )
    init_weights([net], init)
    return net


def decayed_weights(model: StagedNet) -> list[torch.Tensor]:
    """The weight matrices the seed put under L2 regularisation: those of fc1 and fc2."""
    return [model.stages[name].linear.weight for name in ("fc1", "fc2")]
