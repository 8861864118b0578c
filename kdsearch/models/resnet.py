"""CIFAR ResNets (He et al., 2016): depth 6n+2, three stages of basic blocks, as the KD papers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.models.base import StageStack, init_weights


def conv_bn(cin: int, cout: int, *, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Convolution without bias followed by batch norm."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=stride)
        self.conv2 = conv_bn(cout, cout)
        self.shortcut: nn.Module = (
            conv_bn(cin, cout, kernel=1, stride=stride)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


def resnet_stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` basic blocks; the first one changes width and resolution."""
    layers = [BasicBlock(cin, cout, stride)]
    layers += [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet(StageStack):
    """Stem (3x3 conv), three stages at strides 1, 2, 2, global pooling, a linear classifier."""

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        self.blocks_per_stage = (depth - 2) // 6
        self.widths = widths
        self.stem = nn.Sequential(conv_bn(in_channels, widths[0]), nn.ReLU())
        self.layers = nn.ModuleList(
            resnet_stage(widths[i], widths[i + 1], self.blocks_per_stage, 1 if i == 0 else 2)
            for i in range(3)
        )
        self.fc = nn.Linear(widths[3], num_classes)
        self.stage_channels = widths
        self.feat_dim = widths[3]
        init_weights(self)

    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        self._check_head_stage(stage)
        w, n = self.widths, self.blocks_per_stage
        if stage == 3:
            trunk = nn.Sequential(resnet_stage(w[3], w[3], n, 1))
        else:
            trunk = nn.Sequential(*(resnet_stage(w[i], w[i + 1], n, 2) for i in range(stage, 3)))
        init_weights(trunk)
        return trunk, w[3]


THIN = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)  # the "x4" models of the CRD benchmark
