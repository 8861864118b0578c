"""CKTF: Zhao, Chen & Zhao, Contrastive Knowledge Transfer Framework for Model Compression and
Transfer Learning, ICASSP 2023."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.losses.base import BuildContext, Step, Term, match_stage
from kdsearch.losses.crd import ContrastiveLayer
from kdsearch.models import TapModel

POOL_STRIDE = 8  # the official code pools stage maps with AvgPool2d(8): 32x32 -> 4x4, 8x8 -> 1x1


def pool_flat(feature: Tensor) -> Tensor:
    """Average-pool a stage map by 8 (at least to 1x1) and flatten it."""
    side = max(1, feature.shape[-1] // POOL_STRIDE)
    return F.adaptive_avg_pool2d(feature, side).flatten(1)


class CKTF(Term):
    """A CRD objective at the stem, at every stage and at the pooled features.

    Student stage i learns from the teacher stage at the same relative depth. Each layer has its
    own learned projections of student and teacher to the contrastive space, so widths, depths
    and families may differ: the official code zero-pads the student to the teacher's width and
    supports same-family pairs only. The official batch-dimension normalisation of stage maps
    (`F.normalize(dim=0)`, which makes the loss depend on the batch) is left out.
    """

    teacher_reads = "stages"

    def __init__(
        self,
        ctx: BuildContext,
        *,
        final: float = 0.8,
        intermediate: float = 0.1,
        feat_dim: int = 128,
        temperature: float = 0.1,
        negatives: int = 16384,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        assert ctx.teacher is not None
        self.final = final
        self.intermediate = intermediate
        s_dims, t_dims = stage_dims(ctx.student, ctx), stage_dims(ctx.teacher, ctx)
        self.pairs = [(i, match_stage(i, len(s_dims), len(t_dims))) for i in range(len(s_dims))]

        def layer(dim_s: int, dim_t: int) -> ContrastiveLayer:
            return ContrastiveLayer(
                dim_s,
                dim_t,
                ctx,
                feat_dim=feat_dim,
                temperature=temperature,
                negatives=negatives,
                momentum=momentum,
            )

        self.stages = nn.ModuleList(layer(s_dims[i], t_dims[j]) for i, j in self.pairs)
        self.pooled = layer(ctx.student.feat_dim, ctx.teacher.feat_dim)

    def forward(self, step: Step) -> Tensor:
        s, t = step.s, step.t
        total: Tensor = self.final * self.pooled(s.pooled, t.pooled, step)
        for (i, j), layer in zip(self.pairs, self.stages, strict=True):
            pair_loss = layer(pool_flat(s.stages[i]), pool_flat(t.stages[j]), step)
            total = total + self.intermediate * pair_loss
        return total


def stage_dims(model: TapModel, ctx: BuildContext) -> list[int]:
    """Width of each pooled, flattened stage map of `model` for this data's image size."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        taps = model.taps(torch.zeros(1, *ctx.image_shape, device=device))
    model.train(was_training)
    return [pool_flat(s).shape[1] for s in taps.stages]
