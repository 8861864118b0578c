"""What every model of the zoo shares: feature taps, declared widths, weight initialisation."""

from __future__ import annotations

import copy
import itertools
from abc import abstractmethod
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


class Taps(NamedTuple):
    """Everything a distillation term may read from one forward pass."""

    logits: Tensor
    stages: tuple[Tensor, ...]  # stages[0] is the stem's output, then each stage, shallow to deep
    pooled: Tensor  # the penultimate embedding the classifier reads


class TapModel(nn.Module):
    """A classifier that exposes its stage outputs and pooled features.

    Subclasses set `stage_channels` (one entry per element of `Taps.stages`) and `feat_dim`
    (the width of `Taps.pooled`), and implement `taps` and `head_trunk`.
    """

    stage_channels: tuple[int, ...]
    feat_dim: int

    @abstractmethod
    def taps(self, x: Tensor) -> Taps:
        """Run the network once and return logits, stage outputs and pooled features."""

    @abstractmethod
    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        """A freshly initialised copy of the layers after `stage` (on the last stage, that stage
        again at stride 1), and its output width: the body of an auxiliary classifier on that
        stage, as HSAKD builds them. `stage` is one of `head_stages`."""

    @property
    def head_stages(self) -> tuple[int, ...]:
        """Stages that can carry an auxiliary head: every stage after the stem."""
        return tuple(range(1, len(self.stage_channels)))

    def forward(self, x: Tensor) -> Tensor:
        return self.taps(x).logits

    def _check_head_stage(self, stage: int) -> None:
        if stage not in self.head_stages:
            raise ValueError(f"stage {stage} cannot carry a head; stages {self.head_stages} can")


class StageStack(TapModel):
    """The layout of most of the zoo: a stem, stages one after another, global average pooling
    and a linear classifier. Subclasses set `stem`, `layers` and `fc`, and override
    `before_pool` where the last stage is transformed before pooling."""

    stem: nn.Module
    layers: nn.ModuleList
    fc: nn.Linear

    def taps(self, x: Tensor) -> Taps:
        stages = [self.stem(x)]
        for layer in self.layers:
            stages.append(layer(stages[-1]))
        pooled = F.adaptive_avg_pool2d(self.before_pool(stages[-1]), 1).flatten(1)
        return Taps(self.fc(pooled), tuple(stages), pooled)

    def before_pool(self, last: Tensor) -> Tensor:
        """What the pooling reads of the last stage's output: the output itself."""
        return last


def init_weights(model: nn.Module) -> None:
    """He initialisation for convolutions and unit batch norm, as the CIFAR zoo of the papers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def fold_batch_norm(model: M) -> M:
    """A copy of the frozen `model` in which every batch norm that directly follows a
    convolution is folded into that convolution's weights and bias: in an `nn.Sequential` (the
    zoo's `conv_bn` pairs), and in a module whose `FOLDS` names (convolution, batch norm)
    attribute pairs its forward applies one straight after the other (WRN's pre-activation
    blocks). In eval mode a batch norm is an affine map per channel, so the copy computes the
    same function to rounding and skips a pass over every such convolution's output: a frozen
    teacher's forward pass, which a search runs again and again, is that much cheaper."""
    if model.training:
        raise ValueError("only a model in eval mode can have its batch norms folded")
    folded = copy.deepcopy(model)
    for module in folded.modules():
        pairs = list(getattr(module, "FOLDS", ()))
        if isinstance(module, nn.Sequential):
            pairs += itertools.pairwise(module._modules)
        for first, second in pairs:
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = _folded_conv(conv, bn)
                module._modules[second] = nn.Identity()
    return folded


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """`conv` (the copy's own) with `bn`'s affine map in eval mode folded into it."""
    assert bn.running_mean is not None and bn.running_var is not None  # the zoo's BNs track them
    scale = bn.weight * bn.running_var.add(bn.eps).rsqrt()
    bias = torch.zeros_like(bn.running_mean) if conv.bias is None else conv.bias
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
    return conv
