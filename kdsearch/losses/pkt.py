"""PKT: Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer,
ECCV 2018."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdsearch.losses.base import BuildContext, Step, Term


def cosine_conditionals(feat: Tensor) -> Tensor:
    """Row i: the distribution over the batch of (cos(f_i, f_j) + 1) / 2, normalised over j
    (the diagonal included, as the official code does). In fp32 even under autocast: the
    kernel's entries differ from each other by less than bf16's step near 1, and those
    differences are what the loss compares."""
    with torch.autocast(feat.device.type, enabled=False):
        unit = F.normalize(feat.float(), dim=1)
        kernel = (unit @ unit.T + 1.0) / 2.0
        return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(feat_s: Tensor, feat_t: Tensor, eps: float = 1e-7) -> Tensor:
    """Mean over anchors of KL(p_t(. | i) || p_s(. | i)) between the cosine-kernel conditionals.

    The official loss is the same sum divided by B^2 instead of B, so its value shrinks as 1/B and
    its weight is tied to the batch size (30000 at B = 64). Summing over neighbours and averaging
    over anchors makes the value independent of B: this loss equals B x the official one, and the
    official weight 30000 at B = 64 corresponds to a weight of 30000 / 64 = 469 here.
    """
    p_t = cosine_conditionals(feat_t)
    p_s = cosine_conditionals(feat_s)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).sum(dim=1).mean()


class PKT(Term):
    """Match the teacher's neighbourhood distributions in the pooled-feature space; the widths of
    student and teacher features may differ (no projection is needed)."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()

    def forward(self, step: Step) -> Tensor:
        return pkt_loss(step.s.pooled, step.t.pooled)
