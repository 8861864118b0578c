"""What every model of the zoo shares: feature taps, declared widths, weight initialisation."""

from __future__ import annotations

from abc import abstractmethod
from typing import NamedTuple

from torch import Tensor, nn


class Taps(NamedTuple):
    """Everything a distillation term may read from one forward pass."""

    logits: Tensor
    stages: tuple[Tensor, ...]  # stages[0] is the stem's output, then each stage, shallow to deep
    pooled: Tensor  # the penultimate embedding the classifier reads


class TapModel(nn.Module):
    """A classifier that exposes its stage outputs and pooled features.

    Subclasses set `stage_channels` (one entry per element of `Taps.stages`) and `feat_dim`
    (the width of `Taps.pooled`), and implement `taps`.
    """

    stage_channels: tuple[int, ...]
    feat_dim: int

    @abstractmethod
    def taps(self, x: Tensor) -> Taps:
        """Run the network once and return logits, stage outputs and pooled features."""

    def forward(self, x: Tensor) -> Tensor:
        return self.taps(x).logits


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
