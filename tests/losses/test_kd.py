from __future__ import annotations

import math

import pytest
import torch

from kdsearch.losses.ce import ce_loss
from kdsearch.losses.kd import kd_loss

STUDENT = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
TEACHER = torch.tensor([[3.0, 2.0, 1.0], [0.5, -1.0, 2.0]])
LABELS = torch.tensor([2, 0])

# Golden values, computed once by hand-written float64 sums (see _kd_by_hand) and committed.
KD_GOLDEN = {1.0: 0.5752103826044415, 2.0: 0.6403133356596129, 4.0: 0.6598149560769284}
CE_GOLDEN = 1.0744586305507686


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _kd_by_hand(t: float) -> float:
    rows = zip(STUDENT.tolist(), TEACHER.tolist(), strict=True)
    kl = [
        sum(pt * math.log(pt / ps) for pt, ps in zip(_softmax(b, t), _softmax(a, t), strict=True))
        for a, b in rows
    ]
    return sum(kl) / len(kl) * t * t


@pytest.mark.parametrize("temperature", sorted(KD_GOLDEN))
def test_kd_loss_matches_the_golden_value(temperature: float) -> None:
    value = kd_loss(STUDENT, TEACHER, temperature).item()
    assert value == pytest.approx(KD_GOLDEN[temperature], rel=1e-6)
    assert value == pytest.approx(_kd_by_hand(temperature), rel=1e-6)


def test_kd_loss_is_zero_when_student_equals_teacher() -> None:
    assert kd_loss(TEACHER, TEACHER, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_scale_is_independent_of_temperature_at_high_t() -> None:
    # With the T^2 factor, the gradient tends to (z_s - z_t) / N_classes (Hinton et al., eq. 3),
    # so it barely changes between T=20 and T=40.
    grads = []
    for t in (20.0, 40.0):
        s = STUDENT.clone().requires_grad_(True)
        kd_loss(s, TEACHER, t).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0.05, atol=1e-3)


def test_ce_loss_matches_the_golden_value() -> None:
    assert ce_loss(STUDENT, LABELS).item() == pytest.approx(CE_GOLDEN, rel=1e-6)
