"""KD: Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, NIPS workshop 2015."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdsearch.losses.base import BuildContext, Step, Term


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the gradient's scale independent of T (Hinton et al., section 2).
    """
    return kd_per_row(student_logits, teacher_logits, temperature).mean()


def kd_per_row(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) for each row."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature**2


class KD(Term):
    """Match the teacher's softened class distribution."""

    def __init__(self, ctx: BuildContext, *, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, step: Step) -> Tensor:
        return kd_loss(step.s.logits, step.t.logits, self.temperature)
