from __future__ import annotations

import pytest
import torch

from kdsearch.data import ImageData
from kdsearch.losses.cktf import pool_flat

from .conftest import build, first_batch, recipe_with, step_for


def test_stage_maps_pool_by_eight_as_the_official_code() -> None:
    assert pool_flat(torch.randn(2, 16, 32, 32)).shape == (2, 16 * 4 * 4)
    assert pool_flat(torch.randn(2, 16, 16, 16)).shape == (2, 16 * 2 * 2)
    assert pool_flat(torch.randn(2, 16, 8, 8)).shape == (2, 16)
    assert pool_flat(torch.randn(2, 16, 4, 4)).shape == (2, 16)


@pytest.mark.parametrize(
    ("student", "teacher", "pairs"),
    [
        ("resnet8", "resnet14", [(0, 0), (1, 1), (2, 2), (3, 3)]),
        ("resnet8", "vgg8", [(0, 0), (1, 1), (2, 3), (3, 4)]),  # different depth and family
        ("mobilenetv2", "wrn_16_1", [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3)]),
    ],
)
def test_every_student_stage_is_paired_at_the_same_relative_depth(
    student: str, teacher: str, pairs: list[tuple[int, int]], tiny_data: ImageData
) -> None:
    recipe = recipe_with(
        {"cktf": {"weight": 1.0, "negatives": 16}}, student=student, teacher=teacher
    )
    distiller, _ctx = build(recipe, tiny_data)
    term = distiller.terms["cktf"]
    assert term.pairs == pairs  # type: ignore[union-attr]
    assert len(term.stages) == len(pairs)  # type: ignore[union-attr,arg-type]


def test_final_and_intermediate_weights_scale_their_parts(tiny_data: ImageData) -> None:
    batch = first_batch(tiny_data)
    values = {}
    for final, intermediate in ((1.0, 0.0), (0.0, 1.0), (2.0, 0.5)):
        recipe = recipe_with(
            {"cktf": {"weight": 1.0, "negatives": 16, "final": final, "intermediate": intermediate}}
        )
        distiller, ctx = build(recipe, tiny_data)
        values[(final, intermediate)] = distiller.loss(step_for(distiller, ctx, batch))[1][
            "cktf"
        ].item()
    expected = 2.0 * values[(1.0, 0.0)] + 0.5 * values[(0.0, 1.0)]
    assert values[(2.0, 0.5)] == pytest.approx(expected, rel=1e-5)
