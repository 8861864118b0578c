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
