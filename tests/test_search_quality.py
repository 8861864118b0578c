"""The search-quality benchmark replays ASHA on recorded learning curves; its tables speak for
Ray's scheduler only if the replayed rule stops the same trials Ray's does."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdsearch.search.tuner import RecordingASHA
from kdsearch.study.contents import METRIC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import search_quality as bench


def ray_rule(grace: int, reduction: int, max_epochs: int) -> bench.Rule:
    """Stop where the scheduler `kdsearch run` uses says STOP."""
    asha = RecordingASHA(max_epochs, grace, reduction)
    asha.set_search_properties(METRIC, "max")
    added: set[int] = set()

    def stops(trial: int, epoch: int, value: float) -> bool:
        handle = SimpleNamespace(trial_id=f"t{trial}")
        if trial not in added:
            asha.on_trial_add(None, handle)  # type: ignore[arg-type]
            added.add(trial)
        result = {"epoch": epoch, METRIC: value}
        return asha.on_trial_result(None, handle, result) == "STOP"  # type: ignore[arg-type]

    return stops


@pytest.mark.parametrize(("grace", "reduction"), [(1, 2), (1, 3), (2, 3), (2, 4), (3, 3)])
def test_replayed_rule_stops_what_rays_asha_stops(grace: int, reduction: int) -> None:
    draw = random.Random(grace * 10 + reduction)
    max_epochs, stopped_some = 18, False
    for _ in range(20):
        # Accuracies on a 400-image grid, so ties at a rung's cutoff happen as in real curves.
        curves = [
            {e: draw.randrange(400) / 400 for e in range(1, max_epochs + 1)} for _ in range(12)
        ]
        order = draw.sample(range(12), 12)
        ours = bench.replay(curves, order, bench.asha_rule(grace, reduction, max_epochs), 18, 2)
        rays = bench.replay(curves, order, ray_rule(grace, reduction, max_epochs), 18, 2)
        assert ours == rays
        stopped_some |= ours[1] < 12 * max_epochs
    assert stopped_some  # the comparison covered stopping, not only trials run to the end


def test_replay_spends_epochs_as_counted_by_hand() -> None:
    # Two slots, first rung at 1, reduction 2, 4 epochs: trials 0 and 1 reach epoch 1 together
    # (0 first: nothing to compare with, continues; 1 is below 0, stops); trial 2 starts, is
    # above the rung's median, continues; 0 and 2 pass epoch 2 (its rung) and run to 4.
    curves = [
        {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.6},
        {1: 0.4, 2: 0.9, 3: 0.9, 4: 0.9},
        {1: 0.7, 2: 0.6, 3: 0.6, 4: 0.7},
    ]
    best, spent = bench.replay(curves, [0, 1, 2], bench.asha_rule(1, 2, 4), 4, 2)
    assert (best, spent) == (0.7, 4 + 1 + 4)


@pytest.mark.parametrize(
    ("best", "share", "met"),
    [
        (0.5275, 1 / 3, True),  # exactly half a point below, exactly a third: both held
        (0.5274, 0.2, False),  # 0.51 points below
        (0.5400, 0.34, False),  # above random's best, but more than a third of the epochs
        (0.5500, 0.1, True),
    ],
)
def test_target_counts_half_a_point_and_a_third_inclusive(
    best: float, share: float, met: bool
) -> None:
    assert bench.meets_target(best, 0.5325, share) is met


def test_spread_counts_full_budget_trials_against_the_binomial_error() -> None:
    # Two trials at 50% and 60% on 100 validation images (a pruned one left out): standard
    # deviation sqrt(0.005) = 7.07 points; error sqrt(0.55 * 0.45 / 100) = 4.97 points.
    arm = bench.Arm("random", 1.0, [18, 2, 18], [0.5, None, 0.6], 1, [{}, {}, {}], [0, 1, 2], [])
    assert bench.spread(arm, 100) == (
        "random's trials that ran to the end: 50.00-60.00%, standard deviation 7.07 points "
        "(the binomial standard error of 100 validation images at 55.0%: 4.97 points)."
    )
