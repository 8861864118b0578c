from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.promote import leaderboard, plan
from kdsearch.study import open_storage

from .conftest import run_cli, write_study

pytestmark = pytest.mark.slow


def promoted(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="s-promoted", storage=f"sqlite:///{root}/studies/s.db")


def test_plan_takes_the_best_complete_trials_and_both_baselines(tmp_path: Path) -> None:
    url = write_study(tmp_path)
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    runs = plan(study, top_k=2, seeds=2, epochs=6)
    # trial 2 scored highest but was pruned: a short-budget score never outranks a full one
    assert sorted({r.source_trial for r in runs}) == [-2, -1, 1, 3]
    assert sorted(r.seed for r in runs if r.source_trial == 1) == [0, 1]
    for r in runs:
        assert r.recipe.schedule.epochs == 6 and r.recipe.seed == r.seed
    alone = next(r for r in runs if r.source_trial == -1).recipe
    assert alone.distill.kd.weight == 0.0 and alone.distill.ce.weight == 1.0
    kd = next(r for r in runs if r.source_trial == -2).recipe
    assert kd.distill.kd.weight == 0.9
    trial_1 = next(r for r in runs if r.source_trial == 1).recipe
    assert trial_1.distill.kd.temperature == study.trials[1].params["distill.kd.temperature"]


def test_promotion_trains_records_and_never_redoes_a_finished_run(tmp_path: Path) -> None:
    write_study(tmp_path)
    first = run_cli("promote", "s", "--top-k", "2", "--seeds", "1", "--epochs", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = promoted(tmp_path).trials
    assert len(runs) == 4 and all(t.state == TrialState.COMPLETE for t in runs)
    for t in runs:
        assert sorted(t.intermediate_values) == [1, 2] and t.value == t.intermediate_values[2]
        assert 0.0 <= t.user_attrs["test_acc"] <= 1.0 and Path(t.user_attrs["weights"]).is_file()
    assert "student alone" in first.stderr and "plain KD" in first.stderr
    stamps = {t.user_attrs["run_key"]: t.datetime_complete for t in runs}
    second = run_cli("promote", "s", "--top-k", "2", "--seeds", "2", "--epochs", "2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    runs = promoted(tmp_path).trials
    assert len(runs) == 8, "only the four seed-1 runs are new"
    for t in runs:
        if t.user_attrs["run_key"] in stamps:
            assert t.datetime_complete == stamps[t.user_attrs["run_key"]]
    board = leaderboard(promoted(tmp_path))
    assert sorted(board["recipe"]) == ["plain KD", "student alone", "trial 1", "trial 3"]
    assert set(board["seeds"]) == {2}
    assert list(board["val_mean"]) == sorted(board["val_mean"], reverse=True)
    again = run_cli("promote", "s", "--top-k", "2", "--seeds", "2", "--epochs", "2", cwd=tmp_path)
    assert again.returncode == 0 and len(promoted(tmp_path).trials) == 8
