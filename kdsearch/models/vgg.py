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
    """Blocks 0-2 are each followed by 2x2 max pooling; block 3 is pooled only while the map is
    larger than 4x4 (the papers' rule: 64x64 inputs are pooled there, 32x32 ones are not)."""

    def __init__(self, config: str, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        cfg = CONFIGS[config]
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
            if i < 3 or (i == 3 and x.shape[-1] > 4):
                x = F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return Taps(self.fc(pooled), tuple(stages), pooled)
