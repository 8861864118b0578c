from __future__ import annotations

import math

import pytest
import torch

from kdsearch.data import ImageData
from kdsearch.losses.crd import ContrastMemory, NegativeSampler, contrast_loss

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
    assert contrast_loss(SCORES, 10).item() == pytest.approx(GOLDEN, rel=1e-6)
    assert _by_hand(SCORES.tolist(), 10) == pytest.approx(GOLDEN, rel=1e-6)


def test_contrast_loss_rewards_a_high_positive_and_low_negatives() -> None:
    good = contrast_loss(torch.tensor([[5.0, 0.01, 0.01]]), 10)
    bad = contrast_loss(torch.tensor([[0.01, 5.0, 5.0]]), 10)
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
    v = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    rows = torch.tensor([[0, 3, 4], [1, 5, 2]])
    out_s, _out_t = memory.scores(v, v, rows, 0.5)
    expected = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_t[rows], v) / 0.5)
    z = memory.z.clone()
    assert z[0] == pytest.approx(float(expected.mean() * 6), rel=1e-5)
    torch.testing.assert_close(out_s, expected / z[0])
    memory.update(v, v, torch.tensor([0, 1]), 0.5)
    memory.scores(v, v, rows, 0.5)
    assert torch.equal(memory.z, z), "Z stays as the first batch set it"


def test_memory_moves_toward_the_embedding_with_momentum() -> None:
    memory = ContrastMemory(num_data=3, dim=2)
    memory.bank_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    v = torch.tensor([[0.0, 1.0]])
    memory.update(v, v, torch.tensor([0]), 0.5)
    memory.scores(v, v, torch.tensor([[0, 1]]), 1.0)  # pending writes land before scoring
    expected = torch.nn.functional.normalize(torch.tensor([[0.5, 0.5]]), dim=1)[0]
    torch.testing.assert_close(memory.bank_s[0], expected)
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
