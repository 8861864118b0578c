from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def _by_hand(f_s: torch.Tensor, f_t: torch.Tensor, layer: object, rows: torch.Tensor) -> float:
    """One contrastive layer in float64 from its weights and banks, the official CRD way:
    Z from the first batch's scores, P / (P + K / N) for the positive, K / N / (P + K / N) for
    each negative, summed over the batch and divided by it; student and teacher sides added."""
    w = {k: v.double() for k, v in layer.state_dict().items()}  # type: ignore[attr-defined]
    v_s = F.normalize(f_s.double() @ w["embed_s.linear.weight"].T + w["embed_s.linear.bias"])
    v_t = F.normalize(f_t.double() @ w["embed_t.linear.weight"].T + w["embed_t.linear.bias"])
    n, k, temperature = w["memory.bank_s"].shape[0], rows.shape[1] - 1, layer.temperature  # type: ignore[attr-defined]
    total = 0.0
    for anchor, bank in ((v_s, w["memory.bank_t"]), (v_t, w["memory.bank_s"])):
        p = torch.exp((anchor[:, None, :] * bank[rows]).sum(-1) / temperature)
        p = p / (p.mean() * n)
        noise = k / n
        total += -(
            torch.log(p[:, 0] / (p[:, 0] + noise)).sum()
            + torch.log(noise / (p[:, 1:] + noise)).sum()
        ).item() / len(rows)
    return total


def _pool_by_blocks(feature: torch.Tensor) -> torch.Tensor:
    """Mean over 8x8 blocks (the whole map when it is 8x8 or smaller), flattened."""
    b, c, h, w = feature.shape
    side = max(1, h // 8)
    return feature.reshape(b, c, side, h // side, side, w // side).mean((3, 5)).flatten(1)


def test_the_loss_equals_crd_at_the_pooled_features_and_every_paired_stage_by_hand(
    tiny_data: ImageData,
) -> None:
    final, intermediate = 0.8, 0.1
    recipe = recipe_with(
        {"cktf": {"weight": 1.0, "negatives": 16, "final": final, "intermediate": intermediate}}
    )
    distiller, ctx = build(recipe, tiny_data)
    term = distiller.terms["cktf"]
    step = step_for(distiller, ctx, first_batch(tiny_data))
    value = term(step).item()  # the banks' writes wait for the next step: still the ones it read

    rows = term.pooled._rows(step)  # type: ignore[union-attr,operator]
    with torch.no_grad():
        s, t = step.s, step.t
        expected = final * _by_hand(s.pooled, t.pooled, term.pooled, rows)
        for (i, j), layer in zip([(0, 0), (1, 1), (2, 2), (3, 3)], term.stages, strict=True):  # type: ignore[arg-type]
            f_s, f_t = _pool_by_blocks(s.stages[i]), _pool_by_blocks(t.stages[j])
            expected += intermediate * _by_hand(f_s, f_t, layer, rows)
    assert value == pytest.approx(expected, rel=1e-4)
