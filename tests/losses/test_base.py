from __future__ import annotations

import torch

from kdsearch.losses.base import match_stage, rotate, slice_taps
from kdsearch.models import Taps


def test_rotate_stacks_the_four_rotations() -> None:
    x = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    r = rotate(x)
    assert r.shape == (4, 1, 2, 2)
    assert r[0, 0].tolist() == [[0, 1], [2, 3]]
    assert r[1, 0].tolist() == [[1, 3], [0, 2]]  # 90 degrees counter-clockwise
    assert r[2, 0].tolist() == [[3, 2], [1, 0]]
    assert r[3, 0].tolist() == [[2, 0], [3, 1]]


def test_match_stage_keeps_relative_depth() -> None:
    assert [match_stage(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]
    assert [match_stage(i, 4, 5) for i in range(4)] == [0, 1, 3, 4]
    assert [match_stage(i, 5, 4) for i in range(5)] == [0, 1, 2, 2, 3]


def test_slice_taps_cuts_every_tensor() -> None:
    taps = Taps(torch.zeros(8, 3), (torch.zeros(8, 2, 4, 4),), torch.zeros(8, 5))
    part = slice_taps(taps, 0, 2)
    assert (
        part.logits.shape == (2, 3)
        and part.stages[0].shape == (2, 2, 4, 4)
        and part.pooled.shape == (2, 5)
    )
