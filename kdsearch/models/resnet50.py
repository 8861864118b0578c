"""ResNet-50 for CIFAR (the KD papers' `ResNet50` teacher): a 3x3 stem of 64 channels, no max
pooling, then He et al.'s four stages of bottleneck blocks (3, 4, 6, 3) at strides 1, 2, 2, 2."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.models.base import StageStack, init_weights
from kdsearch.models.resnet import conv_bn

PLANES = (64, 128, 256, 512)
BLOCKS = (3, 4, 6, 3)
EXPANSION = 4  # a bottleneck's output is 4x its inner width
STEM = 64


class Bottleneck(nn.Module):
    """1x1 down to `planes`, 3x3 (carrying the stride), 1x1 up to 4x `planes`, with a residual
    connection (a 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = EXPANSION * planes
        self.conv1 = conv_bn(cin, planes, kernel=1)
        self.conv2 = conv_bn(planes, planes, stride=stride)
        self.conv3 = conv_bn(planes, cout, kernel=1)
        self.shortcut: nn.Module = (
            conv_bn(cin, cout, kernel=1, stride=stride)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def bottleneck_stage(cin: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` bottleneck blocks; the first one changes width and resolution."""
    layers = [Bottleneck(cin, planes, stride)]
    layers += [Bottleneck(EXPANSION * planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet50(StageStack):
    """Stages of 256, 512, 1024 and 2048 channels; the pooled last stage feeds the classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        widths = (STEM, *(EXPANSION * p for p in PLANES))
        self.stem = nn.Sequential(conv_bn(in_channels, STEM), nn.ReLU())
        self.layers = nn.ModuleList(
            bottleneck_stage(widths[i], PLANES[i], BLOCKS[i], 1 if i == 0 else 2)
            for i in range(len(PLANES))
        )
        self.fc = nn.Linear(widths[-1], num_classes)
        self.stage_channels = widths
        self.feat_dim = widths[-1]
        init_weights(self)

    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        self._check_head_stage(stage)
        w, last = self.stage_channels, len(PLANES)
        if stage == last:  # the last stage again, at stride 1, as HSAKD's fourth head
            trunk = nn.Sequential(bottleneck_stage(w[last], PLANES[-1], BLOCKS[-1], 1))
        else:
            trunk = nn.Sequential(
                *(bottleneck_stage(w[i], PLANES[i], BLOCKS[i], 2) for i in range(stage, last))
            )
        init_weights(trunk)
        return trunk, w[last]
