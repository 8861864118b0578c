from __future__ import annotations

import math

import pytest
import torch

from kdsearch.data import ImageData
from kdsearch.losses.hsakd import hsakd_loss, joint_labels

from .conftest import build, first_batch, recipe_with, step_for


def test_joint_labels_follow_the_rotation_blocks() -> None:
    assert joint_labels(torch.tensor([0, 2])).tolist() == [0, 8, 1, 9, 2, 10, 3, 11]


# Two heads' joint logits (2 images, 4 joint classes) and the final logits (3 classes), at
# temperature 3; the golden value is the float64 sums of _kd_by_hand, computed once and committed.
S_AUX = [
    [[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -1.0]],
    [[0.0, 1.0, 2.0, 3.0], [-2.0, 0.0, 1.0, 0.5]],
]
T_AUX = [
    [[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, -1.0]],
    [[3.0, 2.0, 1.0, 0.0], [-2.0, 0.0, 1.0, 0.5]],
]
S_LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
T_LOGITS = [[3.0, 2.0, 1.0], [0.5, -1.0, 2.0]]
GOLDEN = 2.0932975679389463


def _kd_by_hand(s_rows: list[list[float]], t_rows: list[list[float]], temp: float) -> float:
    """T^2 KL(softmax(t/T) || softmax(s/T)), averaged over the rows, in float64."""

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = [
        sum(p * math.log(p / q) for p, q in zip(softmax(t), softmax(s), strict=True))
        for s, t in zip(s_rows, t_rows, strict=True)
    ]
    return sum(kl) / len(kl) * temp * temp


def test_hsakd_loss_matches_the_golden_value() -> None:
    """Every head's KL and the final logits' KL, summed, each averaged over the images."""
    value = hsakd_loss(
        [torch.tensor(h) for h in S_AUX],
        [torch.tensor(h) for h in T_AUX],
        torch.tensor(S_LOGITS),
        torch.tensor(T_LOGITS),
        3.0,
    )
    assert value.item() == pytest.approx(GOLDEN, rel=1e-6)
    by_hand = _kd_by_hand(S_LOGITS, T_LOGITS, 3.0) + sum(
        _kd_by_hand(s, t, 3.0) for s, t in zip(S_AUX, T_AUX, strict=True)
    )
    assert by_hand == pytest.approx(GOLDEN, rel=1e-12)


def test_hsakd_is_zero_when_the_student_is_the_teacher(tiny_data: ImageData) -> None:
    recipe = recipe_with(
        {"hsakd": {"weight": 1.0, "placement": [1, 3]}}, student="resnet8", teacher="resnet8"
    )
    distiller, ctx = build(recipe, tiny_data)
    assert ctx.teacher is not None
    ctx.student.load_state_dict(ctx.teacher.state_dict())
    term = distiller.terms["hsakd"]
    for p in (1, 3):
        term.heads[str(p)].load_state_dict(ctx.teacher_heads["hsakd"][str(p)].state_dict())  # type: ignore[index,union-attr]
    distiller.eval()  # batch statistics would differ from the teacher's running ones
    value = distiller.loss(step_for(distiller, ctx, first_batch(tiny_data)))[1]["hsakd"]
    assert value.item() == pytest.approx(0.0, abs=1e-5)


def test_the_hsakd_term_pairs_heads_at_the_same_relative_depth_on_all_rotations(
    tiny_data: ImageData,
) -> None:
    """The term against its formula by hand, in float64, for a student and a teacher of
    different depths (resnet8: stages 1-3 carry heads; vgg8: 1-4): student head 1 learns from
    teacher head 1, 2 from 3 and 3 from 4, and every KL, the final logits' too, runs over all
    4B rotated images at the temperature."""
    recipe = recipe_with(
        {"hsakd": {"weight": 1.0, "temperature": 2.0, "placement": [1, 2, 3]}},
        student="resnet8",
        teacher="vgg8",
    )
    distiller, ctx = build(recipe, tiny_data)
    assert ctx.teacher is not None
    batch = first_batch(tiny_data)
    term = distiller.terms["hsakd"]
    value = term(step_for(distiller, ctx, batch)).item()

    x = torch.cat([torch.rot90(batch.x, k, dims=(2, 3)) for k in range(4)])
    teacher_heads = ctx.teacher_heads["hsakd"]
    with torch.no_grad():
        s, t = ctx.student.taps(x), ctx.teacher.taps(x)
        pairs = [
            (term.heads[str(p)](s.stages[p]), teacher_heads[str(q)](t.stages[q]))  # type: ignore[index]
            for p, q in ((1, 1), (2, 3), (3, 4))
        ]
    by_hand = _kd_by_hand(s.logits.tolist(), t.logits.tolist(), 2.0) + sum(
        _kd_by_hand(s_aux.tolist(), t_aux.tolist(), 2.0) for s_aux, t_aux in pairs
    )
    assert len(s.logits) == 4 * len(batch.y)
    assert value == pytest.approx(by_hand, rel=1e-4)
