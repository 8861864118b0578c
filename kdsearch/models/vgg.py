"""VGG with batch norm (Simonyan & Zisserman, 2015), the CIFAR variant of the KD papers: five conv
blocks, no fully connected layers but the classifier."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.models.base import TapModel, Taps, init_weights

# Widths of the convolutions in each of the five blocks.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def vgg_block(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    """3x3 conv + BN + ReLU for each width."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class VGG(TapModel):
    """Five blocks with max pooling between them (see `pool_after`), global pooling, a classifier.

    The papers pool after block 3 only for 64x64 inputs; "while the map is larger than 4x4" is that
    rule for any input size."""

    def __init__(self, config: str, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        cfg = CONFIGS[config]
        self.config = cfg
        cins = (in_channels, *tuple(block[-1] for block in cfg[:-1]))
        self.blocks = nn.ModuleList(vgg_block(cin, w) for cin, w in zip(cins, cfg, strict=True))
        self.fc = nn.Linear(cfg[-1][-1], num_classes)
        self.stage_channels = tuple(block[-1] for block in cfg)
        self.feat_dim = cfg[-1][-1]
        init_weights(self)

    def taps(self, x: Tensor) -> Taps:
        stages = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            stages.append(x)
            x = pool_after(i, x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return Taps(self.fc(pooled), tuple(stages), pooled)

    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        self._check_head_stage(stage)
        cfg, last = self.config, len(self.config) - 1
        if stage == last:  # the last two blocks again at the same resolution, as HSAKD's
            blocks = [
                vgg_block(cfg[last][-1], cfg[last - 1]),
                vgg_block(cfg[last - 1][-1], cfg[last]),
            ]
        else:
            blocks = [vgg_block(cfg[i - 1][-1], cfg[i]) for i in range(stage + 1, last + 1)]
        trunk = VGGTail(stage, blocks)
        init_weights(trunk)
        return trunk, cfg[last][-1]


def pool_after(block: int, x: Tensor) -> Tensor:
    """2x2 max pooling after blocks 0-2, after block 3 only while the map is larger than 4x4."""
    if (block < 3 or (block == 3 and x.shape[-1] > 4)) and min(x.shape[-2:]) >= 2:
        return F.max_pool2d(x, 2)
    return x


class VGGTail(nn.Module):
    """The blocks after `stage`, with the backbone's pooling between them."""

    def __init__(self, stage: int, blocks: list[nn.Sequential]) -> None:
        super().__init__()
        self.stage = stage
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = pool_after(self.stage, x)
        for i, block in enumerate(self.blocks, start=self.stage + 1):
            x = block(x)
            if i < 4:
                x = pool_after(i, x)
        return x
