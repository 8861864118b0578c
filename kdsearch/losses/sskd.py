"""SSKD: Xu, Liu, Li & Loy, Knowledge Distillation Meets Self-Supervision, ECCV 2020."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.losses.base import ROTATIONS, BuildContext, FrozenHead, Step, Term
from kdsearch.losses.kd import kd_per_row
from kdsearch.models import TapModel, Taps


class ProjectionHead(nn.Sequential):
    """Two-layer MLP on the pooled features (width kept), as SSKD's `proj_head`."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def rotation_similarity(proj: Tensor, batch: int) -> Tensor:
    """Cosine similarity of each rotated image (rows: 3B, the 90/180/270-degree blocks) with each
    unrotated image (columns: B). Row r's positive is column r mod B, its own source image.
    In fp32 even under autocast, as the features it normalises."""
    with torch.autocast(proj.device.type, enabled=False):
        unit = F.normalize(proj.float(), dim=1)
        return unit[batch:] @ unit[:batch].T


def kept_by_rank(scores: Tensor, target: Tensor, keep_wrong: float) -> Tensor:
    """SSKD's error-level ranking as a mask of kept rows: rows whose target is the teacher's top
    score are all kept; of the others, the `keep_wrong` fraction whose target ranks best.

    Computed on the device with no host round trip (the count of kept rows stays a tensor)."""
    target_score = scores.gather(1, target[:, None])
    rank = (scores > target_score).sum(dim=1)  # 0 = the teacher got this row right
    order = torch.argsort(rank, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(rank), device=rank.device)
    wrong = (rank > 0).sum()
    # int(wrong * keep) in float64 as the official code: in float32 90 * 0.7 is 63, not 62
    kept = len(rank) - wrong + torch.floor(wrong.double() * keep_wrong).long()
    return position < kept


def kd_kept(student: Tensor, teacher: Tensor, kept: Tensor, temperature: float) -> Tensor:
    """`kd_loss` averaged over the kept rows only (0 when none is kept)."""
    rows = kd_per_row(student, teacher, temperature)
    return (rows * kept).sum() / kept.sum().clamp_min(1)


def sskd_loss(
    s_logits_rot: Tensor,
    t_logits_rot: Tensor,
    s_sim: Tensor,
    t_sim: Tensor,
    y: Tensor,
    *,
    tf_weight: float,
    ss_weight: float,
    tf_temperature: float,
    ss_temperature: float,
    tf_keep: float,
    ss_keep: float,
) -> Tensor:
    """tf_weight * KD on the rotated images + ss_weight * KD between similarity matrices, each
    over the rows the teacher's error-level ranking keeps. Logits are over the 3B rotated images
    only; `y` holds the labels of the B unrotated images."""
    batch = y.shape[0]
    y_rot = y.repeat(ROTATIONS - 1)
    tf_kept = kept_by_rank(t_logits_rot, y_rot, tf_keep)
    tf = kd_kept(s_logits_rot, t_logits_rot, tf_kept, tf_temperature)
    positives = torch.arange(batch, device=y.device).repeat(ROTATIONS - 1)
    ss_kept = kept_by_rank(t_sim, positives, ss_keep)
    ss = kd_kept(s_sim, t_sim, ss_kept, ss_temperature)
    return tf_weight * tf + ss_weight * ss


class SSKD(Term):
    """Rotations as self-supervision: KD on the rotated images (the normal images are the `kd`
    term's), and transfer of the rotated-to-unrotated similarity matrix of projected features.

    All four rotations share one random crop (the official code crops each copy separately on
    the CPU); rotation is the only transformation, as in the official code.
    """

    needs_rotations = True
    has_teacher_heads = True

    def __init__(
        self,
        ctx: BuildContext,
        *,
        tf_weight: float = 2.7,
        ss_weight: float = 10.0,
        tf_temperature: float = 4.0,
        ss_temperature: float = 0.5,
        tf_keep: float = 1.0,
        ss_keep: float = 0.75,
    ) -> None:
        super().__init__()
        self.proj = ProjectionHead(ctx.student.feat_dim)
        self.teacher_proj = FrozenHead(ctx.teacher_heads["sskd"])
        self.settings = {
            "tf_weight": tf_weight,
            "ss_weight": ss_weight,
            "tf_temperature": tf_temperature,
            "ss_temperature": ss_temperature,
            "tf_keep": tf_keep,
            "ss_keep": ss_keep,
        }

    def forward(self, step: Step) -> Tensor:
        b = step.size
        s_sim = rotation_similarity(self.proj(step.s_rot.pooled), b)
        t_sim = rotation_similarity(self.teacher_proj(step.t_rot.pooled), b)
        return sskd_loss(
            step.s_rot.logits[b:], step.t_rot.logits[b:], s_sim, t_sim, step.y, **self.settings
        )

    @classmethod
    def teacher_heads(cls, teacher: TapModel, num_classes: int) -> nn.Module:
        return ProjectionHead(teacher.feat_dim)

    @classmethod
    def teacher_head_objective(
        cls, heads: nn.Module, t_rot: Taps, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy of each rotated image's similarities against its source image (no
        temperature, as the official code), and how often the source scores highest."""
        batch = y.shape[0]
        sim = rotation_similarity(heads(t_rot.pooled), batch)
        source = torch.arange(batch, device=y.device).repeat(ROTATIONS - 1)
        return F.cross_entropy(sim, source), (sim.argmax(1) == source).float().mean()
