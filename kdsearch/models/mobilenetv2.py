"""MobileNetV2 (Sandler et al., 2018), the half-width CIFAR variant with a stride-2 stem that the
CRD/SSKD benchmark calls `mobile_half` (HSAKD's stride-1 variant costs 4x and is not this one)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.models.base import TapModel, Taps, init_weights

# (expansion, width, blocks, stride) of each block group, at width multiplier 1.
GROUPS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
TAPPED_GROUPS = (1, 2, 4, 6)  # the groups whose outputs the KD papers read as stage features


def conv_bn_relu(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """Convolution, batch norm and ReLU as a flat list of layers."""
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU()]


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *conv_bn_relu(cin, mid, 1),
            *conv_bn_relu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(TapModel):
    """Width multiplier 0.5, expansion 6, 1280-wide head, stride-2 stem."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 0.5) -> None:
        super().__init__()
        self.width = width
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, int(32 * width), 3, 2))
        self.groups = nn.ModuleList(self._group(g) for g in range(len(GROUPS)))
        self.head = nn.Sequential(*conv_bn_relu(self._channels(len(GROUPS) - 1), 1280, 1))
        self.fc = nn.Linear(1280, num_classes)
        self.stage_channels = (
            int(32 * width),
            *tuple(int(GROUPS[g][1] * width) for g in TAPPED_GROUPS),
        )
        self.feat_dim = 1280
        init_weights(self)

    def taps(self, x: Tensor) -> Taps:
        x = self.stem(x)
        stages = [x]
        for i, group in enumerate(self.groups):
            x = group(x)
            if i in TAPPED_GROUPS:
                stages.append(x)
        pooled = F.adaptive_avg_pool2d(self.head(x), 1).flatten(1)
        return Taps(self.fc(pooled), tuple(stages), pooled)

    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        self._check_head_stage(stage)
        after = TAPPED_GROUPS[stage - 1]
        if stage == len(TAPPED_GROUPS):  # the last stage's groups again, the first at stride 1
            first = TAPPED_GROUPS[-2] + 1
            groups = [self._group(first, cin=self._channels(after), stride=1)]
            groups += [self._group(g) for g in range(first + 1, len(GROUPS))]
        else:
            groups = [self._group(g) for g in range(after + 1, len(GROUPS))]
        trunk = nn.Sequential(*groups, *conv_bn_relu(self._channels(len(GROUPS) - 1), 1280, 1))
        init_weights(trunk)
        return trunk, 1280

    def _channels(self, group: int) -> int:
        """Output width of block group `group` (-1: the stem)."""
        return int((32 if group < 0 else GROUPS[group][1]) * self.width)

    def _group(self, g: int, *, cin: int | None = None, stride: int | None = None) -> nn.Sequential:
        """A freshly built block group `g` (another input width or first stride where given)."""
        expansion, _, n, group_stride = GROUPS[g]
        stride = group_stride if stride is None else stride
        cin = self._channels(g - 1) if cin is None else cin
        cout = self._channels(g)
        return nn.Sequential(
            *(
                InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1, expansion)
                for i in range(n)
            )
        )
