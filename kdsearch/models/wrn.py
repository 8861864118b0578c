"""Wide ResNets (Zagoruyko & Komodakis, 2016): depth 6n+4, pre-activation blocks, widen factor k."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.models.base import StageStack, init_weights


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut reads the activated input when the width changes."""

    FOLDS = (("conv1", "bn2"),)  # bn2 reads conv1's output and nothing else (fold_batch_norm)

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out: Tensor = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut: Tensor = x if self.shortcut is None else self.shortcut(act)
        return out + shortcut


def wrn_stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` pre-activation blocks; the first one changes width and resolution."""
    layers = [PreActBlock(cin, cout, stride)]
    layers += [PreActBlock(cout, cout, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class WideResNet(StageStack):
    """Stem conv, three stages of widths 16k, 32k, 64k, then BN-ReLU, pooling and a classifier.

    Stage outputs are the raw block outputs (no BN-ReLU), as the KD papers tap them.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        self.blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.widths = widths
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.layers = nn.ModuleList(
            wrn_stage(widths[i], widths[i + 1], self.blocks_per_stage, 1 if i == 0 else 2)
            for i in range(3)
        )
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.stage_channels = widths
        self.feat_dim = widths[3]
        init_weights(self)

    def before_pool(self, last: Tensor) -> Tensor:
        """The pre-activation network's final BN-ReLU (the stages themselves are raw)."""
        return F.relu(self.bn(last))

    def head_trunk(self, stage: int) -> tuple[nn.Module, int]:
        self._check_head_stage(stage)
        w, n = self.widths, self.blocks_per_stage
        if stage == 3:
            body = [wrn_stage(w[3], w[3], n, 1)]
        else:
            body = [wrn_stage(w[i], w[i + 1], n, 2) for i in range(stage, 3)]
        trunk = nn.Sequential(*body, nn.BatchNorm2d(w[3]), nn.ReLU())  # pre-activation: close it
        init_weights(trunk)
        return trunk, w[3]
