from __future__ import annotations

import math

import pytest
import torch

from kdsearch.losses.pkt import cosine_conditionals, pkt_loss

FEAT_S = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.5]])
FEAT_T = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.2], [0.3, -0.4, 1.0]])
# Computed once with the float64 loops of _by_hand and committed.
GOLDEN = 0.1779052927557027


def _by_hand(fs: list[list[float]], ft: list[list[float]], eps: float = 1e-7) -> float:
    def cond(rows: list[list[float]]) -> list[list[float]]:
        unit = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]
        k = [[(sum(a * b for a, b in zip(u, v, strict=True)) + 1) / 2 for v in unit] for u in unit]
        return [[x / sum(row) for x in row] for row in k]

    ps, pt = cond(fs), cond(ft)
    n = len(fs)
    return (
        sum(
            pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
            for i in range(n)
            for j in range(n)
        )
        / n
    )


def test_pkt_matches_the_golden_value() -> None:
    assert pkt_loss(FEAT_S, FEAT_T).item() == pytest.approx(GOLDEN, rel=1e-5)
    assert _by_hand(FEAT_S.tolist(), FEAT_T.tolist()) == pytest.approx(GOLDEN, rel=1e-6)


def test_pkt_is_zero_for_identical_features_and_ignores_scale() -> None:
    assert pkt_loss(FEAT_T, FEAT_T).item() == pytest.approx(0.0, abs=1e-7)
    assert pkt_loss(3.0 * FEAT_T, FEAT_T).item() == pytest.approx(0.0, abs=1e-6)


def test_conditionals_are_distributions() -> None:
    p = cosine_conditionals(torch.randn(5, 4))
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    assert (p >= 0).all()


def test_pkt_scale_does_not_shrink_with_the_batch() -> None:
    """The official (1 / B^2) form halves when the batch doubles; this one stays put."""
    torch.manual_seed(0)
    t = torch.randn(512, 16)
    s = t + 0.5 * torch.randn(512, 16)
    small = torch.stack([pkt_loss(s[i : i + 64], t[i : i + 64]) for i in range(0, 512, 64)]).mean()
    large = torch.stack(
        [pkt_loss(s[i : i + 256], t[i : i + 256]) for i in range(0, 512, 256)]
    ).mean()
    assert float(large / small) == pytest.approx(1.0, abs=0.15)


def test_the_kernel_stays_fp32_under_bf16_autocast() -> None:
    """A student whose features are the teacher's rotated has the same cosine kernel, so the
    loss and its gradient are zero; in bf16 the kernel's rounding (2^-8 near 1) is as large as
    the differences between its entries, and the loss came out at -7e-5 with a gradient."""
    gen = torch.Generator().manual_seed(0)
    feat_t = torch.relu(torch.randn(64, 256, generator=gen))
    rotation, _ = torch.linalg.qr(torch.randn(256, 256, generator=gen))
    feat_s = (feat_t @ rotation).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pkt_loss(feat_s, feat_t)
    loss.backward()
    assert feat_s.grad is not None
    assert abs(loss.item()) < 1e-6 and feat_s.grad.abs().max().item() < 1e-8


def test_pkt_is_the_official_loss_times_the_batch_so_weight_469_is_the_official_30000() -> None:
    """The official code averages the same KL entries over all B^2 pairs; this loss sums over
    neighbours and averages over anchors, B times as much. At the papers' batch of 64, weight
    469 here is their weight 30000 (to 0.06%)."""
    torch.manual_seed(1)
    t = torch.randn(64, 8)
    s = t + 0.3 * torch.randn(64, 8)
    by_hand = _by_hand(s.tolist(), t.tolist())  # sum over pairs / B
    official = by_hand / 64  # mean over the B^2 pairs
    assert pkt_loss(s, t).item() == pytest.approx(64 * official, rel=1e-4)
    assert 469 * pkt_loss(s, t).item() == pytest.approx(30000 * official, rel=1e-3)
