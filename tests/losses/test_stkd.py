from __future__ import annotations

import math

import pytest
import torch

from kdsearch.losses.base import mix_batch
from kdsearch.losses.stkd import stkd_loss

S = torch.tensor([[1.0, 2.0, 0.5], [0.2, -0.3, 1.5]])
T = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
GOLDEN = 1.629286705398382  # y_a [1, 2], y_b [0, 0], lam 0.3, T 2; float64 sums, committed


def test_stkd_loss_matches_the_golden_value() -> None:
    value = stkd_loss(S, T, torch.tensor([1, 2]), torch.tensor([0, 0]), 0.3, 2.0)
    assert value.item() == pytest.approx(GOLDEN, rel=1e-6)


def _softmax(row: list[float], temperature: float) -> list[float]:
    e = [math.exp(v / temperature) for v in row]
    return [v / sum(e) for v in e]


def test_kl_weight_scales_the_teachers_part_alone() -> None:
    s, t = S.tolist(), T.tolist()
    y_a, y_b, lam, temp = [1, 2], [0, 0], 0.3, 2.0
    ce = (
        sum(
            -(
                lam * math.log(_softmax(s[i], 1)[y_a[i]])
                + (1 - lam) * math.log(_softmax(s[i], 1)[y_b[i]])
            )
            for i in range(2)
        )
        / 2
    )
    kl = (
        sum(
            sum(
                p * math.log(p / q)
                for p, q in zip(_softmax(t[i], temp), _softmax(s[i], temp), strict=True)
            )
            for i in range(2)
        )
        * temp**2
        / 2
    )
    assert ce + kl == pytest.approx(GOLDEN, rel=1e-9)  # the default weighs the two parts alike
    for kl_weight in (0.0, 2.5):
        value = stkd_loss(S, T, torch.tensor(y_a), torch.tensor(y_b), lam, temp, kl_weight)
        assert value.item() == pytest.approx(ce + kl_weight * kl, rel=1e-6)


def test_mixup_blends_each_image_with_its_partner() -> None:
    x = torch.randn(6, 3, 8, 8)
    y = torch.arange(6)
    view = mix_batch(x, y, "mixup", 0.4, seed=7)
    partner = view.y_b  # labels are indices here, so they name the partner image
    torch.testing.assert_close(view.x, view.lam * x + (1 - view.lam) * x[partner])
    assert torch.equal(view.y_a, y) and 0.0 <= view.lam <= 1.0
    again = mix_batch(x, y, "mixup", 0.4, seed=7)
    assert again.lam == view.lam and torch.equal(again.y_b, view.y_b)


def test_cutmix_pastes_a_box_and_lam_is_the_share_left() -> None:
    x = torch.zeros(4, 1, 10, 10)
    x[:, 0] = torch.arange(4.0)[:, None, None] + 1  # each image a constant: its index + 1
    view = mix_batch(x, torch.arange(4), "cutmix", 1.0, seed=3)
    for i in range(4):
        own = (view.x[i] == i + 1).float().mean().item()
        if view.y_b[i] != i:
            assert own == pytest.approx(view.lam)
