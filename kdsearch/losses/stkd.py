"""STKD: Zhao, Gong, Sun, Dong & Yu, Similarity Transfer for Knowledge Distillation,
arXiv:2103.10047, 2021.

No official code was found; this follows the paper's abstract (similarity between instances
transferred through mixed virtual samples and mixed labels): the student learns the mixed labels
and the teacher's output distribution on the same mixed images.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdsearch.losses.base import BuildContext, Step, Term
from kdsearch.losses.kd import kd_loss


def stkd_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    y_a: Tensor,
    y_b: Tensor,
    lam: float,
    temperature: float,
    kl_weight: float = 1.0,
) -> Tensor:
    """Mixed cross-entropy, lam * CE(s, y_a) + (1 - lam) * CE(s, y_b), plus `kl_weight` times
    T^2 KL from the teacher's distribution on the same mixed images."""
    s = s_logits.float()
    mixed_ce = lam * F.cross_entropy(s, y_a) + (1.0 - lam) * F.cross_entropy(s, y_b)
    return mixed_ce + kl_weight * kd_loss(s, t_logits, temperature)


class STKD(Term):
    """Transfer inter-instance similarity through mixup (or cutmix) images, lam ~ Beta(a, a).
    `kl_weight` is the KL's weight against the mixed labels'; it and the defaults are a reading
    of the paper's abstract (see the module's note), not the paper's figures."""

    teacher_reads = "mixed"

    def __init__(
        self,
        ctx: BuildContext,
        *,
        mix: str = "mixup",
        alpha: float = 0.2,
        temperature: float = 4.0,
        kl_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.mix = mix
        self.alpha = alpha
        self.temperature = temperature
        self.kl_weight = kl_weight

    def forward(self, step: Step) -> Tensor:
        view, s = step.mixed(self.mix, self.alpha)
        t = step.teacher_on(view.x)
        y_a, y_b, lam = view.y_a, view.y_b, view.lam
        return stkd_loss(s.logits, t.logits, y_a, y_b, lam, self.temperature, self.kl_weight)
