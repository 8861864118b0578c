from __future__ import annotations

import math

import pytest
import torch

from kdsearch.losses.sskd import kept_by_rank, rotation_similarity, sskd_loss


def test_ranking_keeps_correct_rows_and_the_best_ranked_wrong_ones() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # target 0: right
            [0.1, 0.5, 0.9],  # target 0: rank 2
            [0.2, 0.9, 0.1],  # target 0: rank 1
            [0.1, 0.2, 0.7],  # target 2: right
            [0.5, 0.4, 0.3],  # target 2: rank 2
        ]
    )
    target = torch.tensor([0, 0, 0, 2, 2])
    assert kept_by_rank(scores, target, 1.0).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert kept_by_rank(scores, target, 0.0).nonzero().flatten().tolist() == [0, 3]
    # of three wrong rows, int(3 * 0.5) = 1 is kept: the one whose target ranks best (row 2)
    assert kept_by_rank(scores, target, 0.5).nonzero().flatten().tolist() == [0, 2, 3]


def test_the_kept_count_of_wrong_rows_is_rounded_down_as_python_does() -> None:
    # 90 wrong rows (target 1, the teacher says 0) and 10 right; int(90 * 0.7) = 62
    scores = torch.tensor([[1.0, 0.0]]).repeat(100, 1)
    target = torch.tensor([1] * 90 + [0] * 10)
    assert int(90 * 0.7) == 62
    assert int(kept_by_rank(scores, target, 0.7).sum()) == 10 + 62


def test_rotation_similarity_rows_are_rotated_images_against_originals() -> None:
    proj = torch.tensor(
        [
            [1.0, 0.0],
            [0.0, 2.0],
            [3.0, 0.0],
            [0.0, -1.0],
            [1.0, 1.0],
            [1.0, -1.0],
            [0.0, 1.0],
            [-1.0, 0.0],
        ]
    )
    sim = rotation_similarity(proj, batch=2)
    assert sim.shape == (6, 2)
    assert sim[0].tolist() == pytest.approx([1.0, 0.0])  # (3, 0) against (1, 0) and (0, 2)
    assert sim[2].tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 as the features, not bf16
        under = rotation_similarity(proj, batch=2)
    assert under.dtype == torch.float32 and torch.equal(under, sim)


def _kd(s: list[float], t: list[float], temp: float) -> float:
    def sm(v: list[float]) -> list[float]:
        e = [math.exp(x / temp) for x in v]
        return [x / sum(e) for x in e]

    return sum(p * math.log(p / q) for p, q in zip(sm(t), sm(s), strict=True)) * temp * temp


def test_sskd_loss_against_an_independent_computation() -> None:
    torch.manual_seed(3)
    y = torch.tensor([0, 2])
    s_logits, t_logits = torch.randn(6, 3), torch.randn(6, 3)
    s_sim, t_sim = torch.rand(6, 2), torch.rand(6, 2)
    t_logits[0] = torch.tensor([5.0, 0.0, 0.0])  # the teacher is right on row 0 (label 0)
    value = sskd_loss(
        s_logits,
        t_logits,
        s_sim,
        t_sim,
        y,
        tf_weight=2.0,
        ss_weight=3.0,
        tf_temperature=4.0,
        ss_temperature=0.5,
        tf_keep=0.0,
        ss_keep=1.0,
    )
    y_rot = [0, 2, 0, 2, 0, 2]
    tf_rows = [r for r in range(6) if t_logits[r].argmax().item() == y_rot[r]]
    tf = sum(_kd(s_logits[r].tolist(), t_logits[r].tolist(), 4.0) for r in tf_rows) / len(tf_rows)
    ss = sum(_kd(s_sim[r].tolist(), t_sim[r].tolist(), 0.5) for r in range(6)) / 6
    assert value.item() == pytest.approx(2.0 * tf + 3.0 * ss, rel=1e-5)


def test_sskd_loss_is_zero_when_student_equals_teacher() -> None:
    logits, sim = torch.randn(6, 3), torch.rand(6, 2)
    value = sskd_loss(
        logits,
        logits,
        sim,
        sim,
        torch.tensor([0, 1]),
        tf_weight=2.7,
        ss_weight=10.0,
        tf_temperature=4.0,
        ss_temperature=0.5,
        tf_keep=1.0,
        ss_keep=0.75,
    )
    assert value.item() == pytest.approx(0.0, abs=1e-6)
