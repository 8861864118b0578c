"""Cross-entropy of the student's logits against the labels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdsearch.losses.base import BuildContext, Step, Term


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the batch."""
    return F.cross_entropy(logits.float(), labels)


class CE(Term):
    """The supervised term; on its own it trains the student without a teacher."""

    needs_teacher = False
    teacher_reads = "none"

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()

    def forward(self, step: Step) -> Tensor:
        return ce_loss(step.s.logits, step.y)
