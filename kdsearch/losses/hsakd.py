"""HSAKD: Yang, An, Xu & Xu, Hierarchical Self-supervised Augmented Knowledge Distillation,
IJCAI 2021."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.losses.base import (
    ROTATIONS,
    BuildContext,
    FrozenHead,
    Step,
    Term,
    match_stage,
)
from kdsearch.losses.kd import kd_loss
from kdsearch.models import TapModel, Taps


class AuxClassifier(nn.Module):
    """A copy of the layers after one stage, pooling, and a linear classifier over the joint
    (class, rotation) labels."""

    def __init__(self, model: TapModel, stage: int, num_classes: int) -> None:
        super().__init__()
        self.trunk, width = model.head_trunk(stage)
        self.fc = nn.Linear(width, ROTATIONS * num_classes)

    def forward(self, feature: Tensor) -> Tensor:
        out: Tensor = self.trunk(feature)
        logits: Tensor = self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
        return logits


def joint_labels(y: Tensor) -> Tensor:
    """Labels of the 4B rotated batch (rotation blocks in order 0, 90, 180, 270 degrees):
    4 * class + rotation, so the label space is 4C."""
    return torch.cat([ROTATIONS * y + k for k in range(ROTATIONS)])


def hsakd_loss(
    s_aux: list[Tensor], t_aux: list[Tensor], s_logits: Tensor, t_logits: Tensor, temperature: float
) -> Tensor:
    """T^2 KL between each student head and its teacher head, plus T^2 KL between the final
    logits, every one averaged over all 4B rotated images."""
    total = kd_loss(s_logits, t_logits, temperature)
    for s, t in zip(s_aux, t_aux, strict=True):
        total = total + kd_loss(s, t, temperature)
    return total


class HSAKD(Term):
    """Auxiliary classifiers on the stages listed in `placement` learn, with the backbone under
    them, the teacher's auxiliary classifiers' joint (class, rotation) distribution; the final
    logits learn the teacher's on all rotations. The heads are dropped after training.

    The teacher's heads (one per stage that can carry one) are trained beforehand on the frozen
    teacher with cross-entropy on the joint labels, and cached; the student's heads get no
    cross-entropy, only the KL terms, as in the official code. Student stage i reads the teacher
    head at the same relative depth, so different families pair.
    """

    needs_rotations = True
    has_teacher_heads = True

    def __init__(
        self, ctx: BuildContext, *, temperature: float = 3.0, placement: Sequence[int] = (1, 2, 3)
    ) -> None:
        super().__init__()
        assert ctx.teacher is not None
        stages = ctx.student.head_stages
        bad = [p for p in placement if p not in stages]
        if bad:
            raise ValueError(
                f"placement {placement}: the student has no stage {bad[0]} that can carry a head "
                f"(it has stages {list(stages)})"
            )
        self.temperature = temperature
        self.placement = list(placement)
        n_s, n_t = len(ctx.student.stage_channels), len(ctx.teacher.stage_channels)
        self.teacher_stage = {p: match_stage(p, n_s, n_t) for p in placement}
        self.heads = nn.ModuleDict(
            {str(p): AuxClassifier(ctx.student, p, ctx.num_classes) for p in placement}
        )
        teacher_heads = ctx.teacher_heads["hsakd"]
        assert isinstance(teacher_heads, nn.ModuleDict)
        self.teacher_aux = {
            p: FrozenHead(teacher_heads[str(t)]) for p, t in self.teacher_stage.items()
        }

    def forward(self, step: Step) -> Tensor:
        s, t = step.s_rot, step.t_rot
        s_aux = [self.heads[str(p)](s.stages[p]) for p in self.placement]
        t_aux = [self._teacher_aux(step, p) for p in self.placement]
        return hsakd_loss(s_aux, t_aux, s.logits, t.logits, self.temperature)

    def _teacher_aux(self, step: Step, placement: int) -> Tensor:
        stage = self.teacher_stage[placement]
        head = self.teacher_aux[placement]
        return step.teacher_extra(f"rot_hsakd{stage}", lambda: head(step.t_rot.stages[stage]))

    @classmethod
    def stored_extras(cls, heads: nn.Module, t_rot: Taps) -> dict[str, Tensor]:
        """Every teacher head's joint logits on the rotated batch."""
        assert isinstance(heads, nn.ModuleDict)
        return {f"rot_hsakd{p}": head(t_rot.stages[int(p)]) for p, head in heads.items()}

    @classmethod
    def teacher_heads(cls, teacher: TapModel, num_classes: int) -> nn.Module:
        """A head on every stage that can carry one, so any placement finds its teacher head."""
        return nn.ModuleDict(
            {str(p): AuxClassifier(teacher, p, num_classes) for p in teacher.head_stages}
        )

    @classmethod
    def teacher_head_objective(
        cls, heads: nn.Module, t_rot: Taps, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy of every head on the joint labels (the stage features are frozen
        inputs), and the heads' mean joint-label accuracy."""
        labels = joint_labels(y)
        assert isinstance(heads, nn.ModuleDict)
        logits = [head(t_rot.stages[int(p)]).float() for p, head in heads.items()]
        loss = torch.stack([F.cross_entropy(z, labels) for z in logits]).sum()
        acc = torch.stack([(z.argmax(1) == labels).float().mean() for z in logits]).mean()
        return loss, acc
