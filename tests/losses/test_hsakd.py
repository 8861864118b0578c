from __future__ import annotations

import pytest
import torch

from kdsearch.data import ImageData
from kdsearch.losses.hsakd import class_logits, hsakd_loss, joint_labels
from kdsearch.losses.kd import kd_loss

from .conftest import build, first_batch, recipe_with, step_for


def test_joint_labels_follow_the_rotation_blocks() -> None:
    assert joint_labels(torch.tensor([0, 2])).tolist() == [0, 8, 1, 9, 2, 10, 3, 11]


def test_class_logits_sum_the_rotations_of_each_class() -> None:
    joint = torch.arange(8.0).view(1, 8)  # classes 0 and 1, four rotations each
    assert class_logits(joint).tolist() == [[0 + 1 + 2 + 3, 4 + 5 + 6 + 7]]


def test_hsakd_loss_is_the_sum_of_the_per_head_and_final_kl() -> None:
    torch.manual_seed(0)
    s_aux, t_aux = [torch.randn(8, 12) for _ in range(2)], [torch.randn(8, 12) for _ in range(2)]
    s_logits, t_logits = torch.randn(8, 3), torch.randn(8, 3)
    expected = sum(kd_loss(s, t, 3.0) for s, t in zip(s_aux, t_aux, strict=True)) + kd_loss(
        s_logits, t_logits, 3.0
    )
    assert hsakd_loss(s_aux, t_aux, s_logits, t_logits, 3.0).item() == pytest.approx(
        float(expected), rel=1e-6
    )


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
