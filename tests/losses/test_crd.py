from __future__ import annotations

import math

import pytest
import torch

from kdsearch.data import ImageData
from kdsearch.losses.crd import ContrastMemory, Embed, NegativeSampler, contrast_loss

from .conftest import build, first_batch, recipe_with, step_for

SCORES = torch.tensor([[0.9, 0.2, 0.1], [0.5, 0.05, 0.3]])
GOLDEN = 1.3875954605196024  # N = 10, K = 2; the float64 sums of _by_hand, committed


def _by_hand(scores: list[list[float]], n: int, eps: float = 1e-7) -> float:
    noise = (len(scores[0]) - 1) / n
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + noise + eps))
        total += sum(math.log(noise / (v + noise + eps)) for v in row[1:])
    return -total / len(scores)


def test_contrast_loss_matches_the_golden_value() -> None:
    assert contrast_loss(SCORES.log(), 10).item() == pytest.approx(GOLDEN, rel=1e-6)
    assert _by_hand(SCORES.tolist(), 10) == pytest.approx(GOLDEN, rel=1e-6)


def test_contrast_loss_rewards_a_high_positive_and_low_negatives() -> None:
    good = contrast_loss(torch.tensor([[5.0, 0.01, 0.01]]).log(), 10)
    bad = contrast_loss(torch.tensor([[0.01, 5.0, 5.0]]).log(), 10)
    assert good < bad


def test_negatives_come_from_other_classes_only() -> None:
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 3])
    sampler = NegativeSampler(labels)
    y = torch.tensor([0, 1, 2, 3])
    neg = sampler(y, 2000, torch.Generator().manual_seed(0))
    assert neg.shape == (4, 2000)
    for row, cls in zip(neg, y.tolist(), strict=True):
        assert (labels[row] != cls).all()
        # every image of another class is drawn, roughly uniformly
        others = (labels != cls).nonzero().flatten()
        counts = torch.bincount(row, minlength=len(labels))[others].float()
        assert counts.min() > 0.6 * counts.mean()


def test_scores_use_the_memories_of_the_given_rows_and_z_is_fixed_on_the_first_batch() -> None:
    torch.manual_seed(0)
    memory = ContrastMemory(num_data=6, dim=4)
    v_s, v_t = (torch.nn.functional.normalize(torch.randn(2, 4), dim=1) for _ in range(2))
    rows = torch.tensor([[0, 3, 4], [1, 5, 2]])
    log_s, log_t = memory.scores(v_s, v_t, rows, 0.5)
    # the student's anchor against the teacher's memories, and the other way round
    expected_s = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_t[rows], v_s) / 0.5)
    expected_t = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_s[rows], v_t) / 0.5)
    z = memory.log_z.exp()
    assert z[0] == pytest.approx(float(expected_s.mean() * 6), rel=1e-5)
    assert z[1] == pytest.approx(float(expected_t.mean() * 6), rel=1e-5)
    torch.testing.assert_close(log_s.exp(), expected_s / z[0])
    torch.testing.assert_close(log_t.exp(), expected_t / z[1])
    log_z = memory.log_z.clone()
    memory.update(v_s, v_t, torch.tensor([0, 1]), 0.5)
    memory.scores(v_s, v_t, rows, 0.5)
    assert torch.equal(memory.log_z, log_z), "Z stays as the first batch set it"


def test_a_low_temperature_gives_the_official_loss_not_nan() -> None:
    # exp(1 / 0.005) overflows fp32; the official form, in float64 by hand, is finite
    torch.manual_seed(0)
    memory = ContrastMemory(num_data=8, dim=4)
    v_s, v_t = (torch.nn.functional.normalize(torch.randn(2, 4), dim=1) for _ in range(2))
    rows = torch.tensor([[0, 3, 4, 6], [1, 5, 2, 7]])
    log_s, _log_t = memory.scores(v_s, v_t, rows, 0.005)
    loss = contrast_loss(log_s, 8)
    p = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_t[rows].double(), v_s.double()) / 0.005)
    z = float(p.mean()) * 8
    assert loss.isfinite()
    assert loss.item() == pytest.approx(_by_hand((p / z).tolist(), 8, eps=0.0), rel=1e-4)


def test_embeddings_stay_fp32_under_autocast() -> None:
    embed, x = Embed(16, 8), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = embed(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, embed(x))  # not rounded to bf16 on the way


def test_memory_moves_toward_the_embedding_with_momentum() -> None:
    memory = ContrastMemory(num_data=3, dim=2)
    memory.bank_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    memory.bank_t.copy_(memory.bank_s)
    v_s, v_t = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, -1.0]])
    memory.update(v_s, v_t, torch.tensor([0]), 0.5)
    memory.scores(v_s, v_t, torch.tensor([[0, 1]]), 1.0)  # pending writes land before scoring
    expected_s = torch.nn.functional.normalize(torch.tensor([[0.5, 0.5]]), dim=1)[0]
    torch.testing.assert_close(memory.bank_s[0], expected_s)  # the student's bank, its embedding
    torch.testing.assert_close(memory.bank_t[0], torch.tensor([0.5, -0.5]) / math.sqrt(0.5))
    torch.testing.assert_close(memory.bank_s[2], torch.tensor([1.0, 0.0]))


def test_crd_term_updates_its_banks_at_the_batch_indices(tiny_data: ImageData) -> None:
    distiller, ctx = build(recipe_with({"crd": {"weight": 1.0, "negatives": 32}}), tiny_data)
    term = distiller.terms["crd"]
    before = term.layer.memory.bank_s.clone()  # type: ignore[union-attr]
    batch = first_batch(tiny_data)
    for seed in range(2):  # the second step applies the first step's write
        distiller.loss(step_for(distiller, ctx, batch, seed))[1]["crd"].backward()
    changed = (term.layer.memory.bank_s != before).any(1).nonzero().flatten()  # type: ignore[union-attr]
    assert sorted(changed.tolist()) == sorted(batch.idx.tolist())
