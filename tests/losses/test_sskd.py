from __future__ import annotations

import math

import pytest
import torch

from kdsearch.data import ImageData
from kdsearch.losses.sskd import kept_by_rank, rotation_similarity, sskd_loss

from .conftest import build, first_batch, recipe_with, step_for


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


# Rotated logits of 2 images x 3 rotations (labels 0 and 2: the rows' labels are 0, 2, 0, 2, 0,
# 2; the teacher is right on rows 0 and 3) and their similarity rows; the golden value is the
# float64 sums of _kd below (tf_keep 0 keeps the teacher's right rows, ss_keep 1 every row),
# computed once and committed.
S_ROT = [
    [-0.08, 0.36, -0.51],
    [-1.65, 1.05, 0.52],
    [-0.17, 0.05, 0.4],
    [0.61, 1.87, -1.2],
    [1.0, 0.46, 2.44],
    [-0.15, 0.49, 0.21],
]
T_ROT = [
    [5.0, 0.0, 0.0],
    [-2.33, 1.27, -0.25],
    [0.62, 1.91, -1.58],
    [0.51, -0.84, 1.53],
    [1.35, 1.38, 0.62],
    [1.14, -0.12, 0.63],
]
S_SIM = [[0.77, 0.72], [0.61, 0.91], [0.27, 0.51], [0.81, 0.67], [0.56, 0.92], [0.61, 0.84]]
T_SIM = [[0.07, 0.07], [0.05, 0.53], [0.92, 0.06], [0.7, 0.06], [0.17, 0.33], [0.3, 0.65]]
GOLDEN = 5.584066480744298


def _kd(s: list[float], t: list[float], temp: float) -> float:
    def sm(v: list[float]) -> list[float]:
        e = [math.exp(x / temp) for x in v]
        return [x / sum(e) for x in e]

    return sum(p * math.log(p / q) for p, q in zip(sm(t), sm(s), strict=True)) * temp * temp


def test_sskd_loss_matches_the_golden_value() -> None:
    value = sskd_loss(
        torch.tensor(S_ROT),
        torch.tensor(T_ROT),
        torch.tensor(S_SIM),
        torch.tensor(T_SIM),
        torch.tensor([0, 2]),
        tf_weight=2.0,
        ss_weight=3.0,
        tf_temperature=4.0,
        ss_temperature=0.5,
        tf_keep=0.0,
        ss_keep=1.0,
    )
    assert value.item() == pytest.approx(GOLDEN, rel=1e-6)
    tf = (_kd(S_ROT[0], T_ROT[0], 4.0) + _kd(S_ROT[3], T_ROT[3], 4.0)) / 2
    ss = sum(_kd(s, t, 0.5) for s, t in zip(S_SIM, T_SIM, strict=True)) / 6
    assert 2.0 * tf + 3.0 * ss == pytest.approx(GOLDEN, rel=1e-12)


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


def _kept_by_hand(sim: list[list[float]], batch: int, keep_wrong: float) -> list[int]:
    """SSKD's error-level ranking of similarity rows, from the paper: row r (a rotated copy of
    image r mod B) is right when its source image scores highest; every right row is kept, and of
    the wrong ones the int(wrong x keep) whose source ranks best (ties in row order)."""
    ranks = [sum(v > row[r % batch] for v in row) for r, row in enumerate(sim)]
    wrong = sorted((rank, r) for r, rank in enumerate(ranks) if rank > 0)
    kept = [r for r, rank in enumerate(ranks) if rank == 0]
    return sorted(kept + [r for _, r in wrong[: int(len(wrong) * keep_wrong)]])


def test_the_sskd_term_is_the_papers_loss_on_the_rotated_images(tiny_data: ImageData) -> None:
    """The term at its defaults against its formula by hand, in float64, on real models: KD at
    T = 4 on the 3B rotated images' logits, and KD at T = 0.5 between the rows of the rotated
    images' cosine similarities to the unrotated ones that the teacher's ranking keeps (3/4 of
    its wrong rows), weighted 2.7 and 10."""
    distiller, ctx = build(recipe_with({"sskd": {"weight": 1.0}}), tiny_data)
    assert ctx.teacher is not None
    batch = first_batch(tiny_data)
    term = distiller.terms["sskd"]
    value = term(step_for(distiller, ctx, batch)).item()

    b = len(batch.y)
    x = torch.cat([torch.rot90(batch.x, k, dims=(2, 3)) for k in range(4)])
    with torch.no_grad():
        s, t = ctx.student.taps(x), ctx.teacher.taps(x)
        s_proj, t_proj = term.proj(s.pooled), ctx.teacher_heads["sskd"](t.pooled)

    def similarity(proj: torch.Tensor) -> list[list[float]]:
        unit = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in proj.tolist()]
        return [
            [sum(a * c for a, c in zip(unit[r], unit[i], strict=True)) for i in range(b)]
            for r in range(b, 4 * b)
        ]

    s_sim, t_sim = similarity(s_proj), similarity(t_proj)
    kept = _kept_by_hand(t_sim, b, 0.75)
    assert 0 < len(kept) < 3 * b  # the ranking drops rows here, so which ones counts
    s_rot, t_rot = s.logits.tolist()[b:], t.logits.tolist()[b:]
    tf = sum(_kd(s_rot[r], t_rot[r], 4.0) for r in range(3 * b)) / (3 * b)
    ss = sum(_kd(s_sim[r], t_sim[r], 0.5) for r in kept) / len(kept)
    assert value == pytest.approx(2.7 * tf + 10.0 * ss, rel=1e-4)
