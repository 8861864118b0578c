"""ShuffleNetV2 (Ma et al., 2018), the CIFAR variant of the KD papers (1x1 stem, no max pooling,
widths 116/232/464, a 1024-wide head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.models.base import StageStack, init_weights

WIDTHS = (116, 232, 464)
BLOCKS = (3, 7, 3)  # basic blocks after the down-sampling block of each stage
STEM = 24
HEAD = 1024


def shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """Interleave the channels of `groups` groups so information crosses the two branches."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution without bias followed by batch norm."""
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class ShuffleBlock(nn.Module):
    """Half the channels pass through; the other half go 1x1 -> depthwise 3x3 -> 1x1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.pw1 = conv_bn(half, half, 1)
        self.dw = conv_bn(half, half, 3, groups=half)
        self.pw2 = conv_bn(half, half, 1)

    def forward(self, x: Tensor) -> Tensor:
        keep, work = x.chunk(2, dim=1)
        work = F.relu(self.pw2(self.dw(F.relu(self.pw1(work)))))
        return shuffle(torch.cat([keep, work], 1))


class DownBlock(nn.Module):
    """Both branches stride 2 (1 in the extra block of a head on the last stage); their outputs
    are concatenated to the new width."""

    def __init__(self, cin: int, cout: int, stride: int = 2) -> None:
        super().__init__()
        mid = cout // 2
        self.left_dw = conv_bn(cin, cin, 3, stride, groups=cin)
        self.left_pw = conv_bn(cin, mid, 1)
        self.right_pw1 = conv_bn(cin, mid, 1)
        self.right_dw = conv_bn(mid, mid, 3, stride, groups=mid)
        self.right_pw2 = conv_bn(mid, mid, 1)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.left_pw(self.left_dw(x)))
        right = F.relu(self.right_pw2(self.right_dw(F.relu(self.right_pw1(x)))))
        return shuffle(torch.cat([left, right], 1))


def shuffle_stage(cin: int, cout: int, blocks: int, stride: int = 2) -> nn.Sequential:
    """A down-sampling block followed by `blocks` basic blocks."""
    return nn.Sequential(DownBlock(cin, cout, stride), *(ShuffleBlock(cout) for _ in range(blocks)))


class ShuffleNetV2(StageStack):
    """Net size 1.0: stages of 116, 232 and 464 channels at strides 2, 4, 8."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, STEM, 1), nn.ReLU())
        cins = (STEM, *WIDTHS[:-1])
        self.layers = nn.ModuleList(
            shuffle_stage(cin, cout, n) for cin, cout, n in zip(cins, WIDTHS, BLOCKS, strict=True)
        )
        self.head = nn.Sequential(conv_bn(WIDTHS[-1], HEAD, 1), nn.ReLU())
        self.fc = nn.Linear(HEAD, num_classes)
        self.stage_channels = (STEM, *WIDTHS)
        self.feat_dim = HEAD
        init_weights(self)

    def before_pool(self, last: Tensor) -> Tensor:
        """The 1x1 convolution to the 1024-wide head."""
        out: Tensor = self.head(last)
        return out

    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        self._check_head_stage(stage)
        cins = (STEM, *WIDTHS[:-1])
        if stage == len(WIDTHS):  # the last stage again, at stride 1, as HSAKD's third head
            stages = [shuffle_stage(WIDTHS[-1], WIDTHS[-1], BLOCKS[-1], stride=1)]
        else:
            stages = [
                shuffle_stage(cins[i], WIDTHS[i], BLOCKS[i]) for i in range(stage, len(WIDTHS))
            ]
        trunk = nn.Sequential(*stages, conv_bn(WIDTHS[-1], HEAD, 1), nn.ReLU())
        init_weights(trunk)
        return trunk, HEAD
