from __future__ import annotations

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
