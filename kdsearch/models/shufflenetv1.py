"""ShuffleNet (Zhang et al., 2018), the CIFAR variant of the KD papers' `ShuffleV1` (1x1 stem of 24
channels, no max pooling, 3 groups, stages of 240/480/960 channels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.models.base import StageStack, init_weights
from kdsearch.models.shufflenetv2 import conv_bn, shuffle

WIDTHS = (240, 480, 960)
UNITS = (4, 8, 4)  # per stage, the first of which halves the resolution
GROUPS = 3
STEM = 24


class ShuffleUnit(nn.Module):
    """Grouped 1x1 -> channel shuffle -> depthwise 3x3 -> grouped 1x1, added to the input; at
    stride 2 concatenated with the input average-pooled instead, which widens it to `cout`.
    The first 1x1 of a unit reading the 24-channel stem is not grouped (too few channels)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        self.groups = 1 if cin == STEM else GROUPS
        self.stride = stride
        self.reduce = conv_bn(cin, mid, 1, groups=self.groups)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, branch, 1, groups=GROUPS)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.reduce(x))
        if self.groups > 1:
            out = shuffle(out, self.groups)
        out = self.expand(F.relu(self.dw(out)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


def shuffle_stage(cin: int, cout: int, units: int, stride: int = 2) -> nn.Sequential:
    """`units` shuffle units; the first changes width and resolution (at `stride` 2)."""
    first = ShuffleUnit(cin, cout, stride)
    return nn.Sequential(first, *(ShuffleUnit(cout, cout, 1) for _ in range(units - 1)))


class ShuffleNetV1(StageStack):
    """Groups 3: stages of 240, 480 and 960 channels at strides 2, 4, 8; the pooled last stage
    feeds the classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, STEM, 1), nn.ReLU())
        cins = (STEM, *WIDTHS[:-1])
        self.layers = nn.ModuleList(
            shuffle_stage(cin, cout, n) for cin, cout, n in zip(cins, WIDTHS, UNITS, strict=True)
        )
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        self.stage_channels = (STEM, *WIDTHS)
        self.feat_dim = WIDTHS[-1]
        init_weights(self)

    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        self._check_head_stage(stage)
        if stage == len(WIDTHS):  # the last stage again, at stride 1, as HSAKD's third head
            trunk = nn.Sequential(shuffle_stage(WIDTHS[-1], WIDTHS[-1], UNITS[-1], stride=1))
        else:
            trunk = nn.Sequential(
                *(shuffle_stage(WIDTHS[i - 1], WIDTHS[i], UNITS[i]) for i in range(stage, 3))
            )
        init_weights(trunk)
        return trunk, WIDTHS[-1]
