from __future__ import annotations

import json
import re
import sqlite3
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.distributions import IntDistribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState, create_trial

from kdsearch.data import ImageData, load_data
from kdsearch.errors import (
    KdsearchError,
    KdsearchWarning,
    RecipeError,
    StorageError,
    StudyError,
)
from kdsearch.models import build_model
from kdsearch.promote import (
    PLAIN_KD,
    STUDENT_ALONE,
    Run,
    _record,
    current_runs,
    failed_runs,
    failed_searched_runs,
    finished_keys,
    has_promoted,
    leaderboard,
    open_promoted,
    plan,
    plan_seeds,
    promote,
)
from kdsearch.recipe import Recipe
from kdsearch.search.worker import JobResult
from kdsearch.space import SearchSpace
from kdsearch.study.contents import base_recipe, promoted_study, space_config, trial_recipe
from kdsearch.study.record import Record
from kdsearch.study.storage import open_storage
from kdsearch.teacher import Teacher, TeacherFiles, weights_digest

from .conftest import SMALL_SPACE, CliHere, run_cli, write_study

pytestmark = pytest.mark.slow
FINGERPRINT = "0123456789abcdef"  # of the data a promotion loaded, as `_record` keeps it
DATA = {"data_fingerprint": FINGERPRINT, "inputs": {"channels": 1, "image_size": 8}}


def promoted(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="s-promoted", storage=f"sqlite:///{root}/studies/s.db")


def searched(tmp_path: Path) -> tuple[BaseStorage, optuna.Study, optuna.Study]:
    """The storage of a finished search study (`write_study`), the study, its promoted one."""
    storage = open_storage(write_study(tmp_path))
    return storage, optuna.load_study(study_name="s", storage=storage), open_promoted(storage, "s")


def result_of(run: Run, value: float, failure: str | None = None) -> JobResult:
    """What a run's job would return: `value` for every accuracy, no weights if it failed."""
    weights = None if failure else {}
    return JobResult(run.key, {1: value}, value, value, 1, 0.1, 10.0, weights, failure)


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


def test_plan_promotes_a_recipe_two_trials_trained_once_as_its_first_trial(
    tmp_path: Path,
) -> None:
    study = optuna.load_study(study_name="s", storage=open_storage(write_study(tmp_path)))
    best = study.trials[1]  # 0.9, then trial 3 with 0.8 and trial 0 with 0.7
    seeded = Recipe.from_yaml(best.user_attrs["recipe"], source="t").override({"seed": 7})

    def again(value: float) -> None:  # trial 1's recipe proposed again, with its own seed
        study.add_trial(
            create_trial(
                params=best.params,
                distributions=best.distributions,
                value=value,
                user_attrs={**best.user_attrs, "recipe": seeded.to_yaml()},
            )
        )

    again(0.85)  # trial 5: not in trial 3's place
    assert sorted({r.source_trial for r in plan(study, top_k=2, seeds=1, epochs=6)}) == [
        -2,
        -1,
        1,
        3,
    ]
    assert len(plan(study, top_k=5, seeds=1, epochs=6)) == 3 + 2  # trials 1, 3, 0
    again(0.99)  # trial 6, first now: trial 1 stands for it, whose runs a promotion may hold
    runs = plan(study, top_k=1, seeds=1, epochs=6)
    assert sorted({r.source_trial for r in runs}) == [-2, -1, 1]


def one_trial_study(root: Path, space_text: str) -> optuna.Study:
    """A search study of `space_text` holding one COMPLETE trial."""
    space = SearchSpace.from_yaml(space_text, source="space.yaml")
    url = f"sqlite:///{root}/s.db"
    record = Record(open_storage(url), "s", space, target=1, resume=False)
    assert record.next_plan("ray0") is not None
    record.finish(0, TrialState.COMPLETE, {1: 0.5, 2: 0.6}, {"epochs": 2})
    return optuna.load_study(study_name="s", storage=url)


def test_plan_keeps_the_schedule_kind_and_gamma_a_trial_searched(tmp_path: Path) -> None:
    text = SMALL_SPACE.replace(
        "{epochs: 3, kind: cosine}", "{epochs: 3, kind: multistep, milestones: [2], gamma: 0.1}"
    ).replace(
        "space:\n",
        "space:\n  schedule.kind: {type: categorical, choices: [cosine]}\n"
        "  schedule.gamma: {type: float, low: 0.2, high: 0.5}\n",
    )
    study = one_trial_study(tmp_path, text)
    gamma = study.trials[0].params["schedule.gamma"]
    searched = next(r for r in plan(study, top_k=1, seeds=1, epochs=6) if r.source_trial == 0)
    schedule = searched.recipe.schedule
    assert (schedule.kind, schedule.gamma) == ("cosine", gamma), "as the trial trained"
    assert (schedule.epochs, schedule.milestones) == (6, [4]), "the base's, at the full budget"


def test_the_teacher_is_prepared_from_the_base_recipe_as_the_search_did(tmp_path: Path) -> None:
    # the teacher's training (its cache key) reads the recipe's optimizer and batch size; a trial
    # that searched them must not get a teacher of its own, which all runs would then share
    text = SMALL_SPACE.replace(
        "space:\n",
        "space:\n  optim.weight_decay: {type: float, low: 1.0e-3, high: 2.0e-3}\n"
        "  batch_size: {type: categorical, choices: [32]}\n",
    )
    study = one_trial_study(tmp_path, text)
    asked: list[Recipe] = []

    class Prepared(Exception):
        pass

    def prepare(recipe: Recipe, data: ImageData, heads: bool) -> Teacher:
        asked.append(recipe)
        raise Prepared  # no training: which recipe the teacher comes from is the point

    with pytest.raises(Prepared):
        promote(
            open_storage(f"sqlite:///{tmp_path}/s.db"),
            "s",
            top_k=1,
            seeds=1,
            epochs=2,
            weights_dir=tmp_path,
            prepare=prepare,
        )
    base = Recipe.from_yaml(study.user_attrs["base_recipe"])
    assert len(asked) == 1
    assert (asked[0].optim, asked[0].batch_size) == (base.optim, base.batch_size)


def test_promotion_trains_records_and_never_redoes_a_finished_run(tmp_path: Path) -> None:
    write_study(tmp_path)
    first = run_cli("promote", "s", "--top-k", "2", "--seeds", "1", "--epochs", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = promoted(tmp_path).trials
    assert len(runs) == 4 and all(t.state == TrialState.COMPLETE for t in runs)
    for t in runs:
        assert sorted(t.intermediate_values) == [1, 2] and t.value == t.intermediate_values[2]
        assert 0.0 <= t.user_attrs["test_acc"] <= 1.0 and Path(t.user_attrs["weights"]).is_file()
    names = sorted(Path(t.user_attrs["weights"]).name for t in runs)
    assert names == [
        "plain-kd-seed0-2ep.pt",
        "student-alone-seed0-2ep.pt",
        "trial-1-seed0-2ep.pt",
        "trial-3-seed0-2ep.pt",
    ]
    assert "the students' weights in studies/s-promoted/" in first.stderr
    assert "at 2 epochs; runs to train: 4, recorded before: 0" in first.stderr
    assert "student alone" in first.stderr and "plain KD" in first.stderr
    assert "promoted at 2 epochs (accuracy %" in first.stderr
    assert "±" not in first.stderr, "one seed: no spread to show"
    # while runs train, each one's epochs reach the log (halfway: epoch 1 of 2), from Ray
    for t in runs:
        label = (
            f"{t.user_attrs['label']} seed 0 epoch 1/2 (val {100 * t.intermediate_values[1]:.2f}%)"
        )
        assert label in first.stderr
    assert re.search(r"^runs [0-3]/4 done; ", first.stderr, re.MULTILINE)
    stamps = {t.user_attrs["run_key"]: t.datetime_complete for t in runs}
    second = run_cli("promote", "s", "--top-k", "2", "--seeds", "2", "--epochs", "2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    runs = promoted(tmp_path).trials
    assert len(runs) == 8, "only the four seed-1 runs are new"
    assert "runs to train: 4, recorded before: 4" in second.stderr
    for t in runs:
        if t.user_attrs["run_key"] in stamps:
            assert t.datetime_complete == stamps[t.user_attrs["run_key"]]
    board = leaderboard(promoted(tmp_path))
    assert sorted(board["recipe"]) == ["plain KD", "student alone", "trial 1", "trial 3"]
    assert set(board["seeds"]) == {2}
    assert list(board["val_mean"]) == sorted(board["val_mean"], reverse=True)
    again = run_cli("promote", "s", "--top-k", "2", "--seeds", "2", "--epochs", "2", cwd=tmp_path)
    assert again.returncode == 0 and len(promoted(tmp_path).trials) == 8
    assert "runs to train: 0, recorded before: 8" in again.stderr
    more = run_cli("promote", "s", "--top-k", "5", "--seeds", "1", "--epochs", "2", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert (
        "promoting the 3 COMPLETE trials of 's' (all its distinct recipes; 5 asked for)"
        in more.stderr
    )
    assert "runs to train: 1, recorded before: 4" in more.stderr


def test_a_study_without_a_complete_trial_is_refused_before_the_banner(
    tmp_path: Path, cli_here: CliHere
) -> None:
    (tmp_path / "studies").mkdir()
    space = SearchSpace.from_yaml(SMALL_SPACE, source="space.yaml")
    record = Record(
        open_storage(f"sqlite:///{tmp_path}/studies/s.db"), "s", space, target=1, resume=False
    )
    assert record.next_plan("ray0") is not None
    record.finish(0, TrialState.PRUNED, {1: 0.5}, {"epochs": 1})
    out = cli_here("promote", "s", cwd=tmp_path)
    assert out.returncode == 2
    assert "study 's' has no COMPLETE trial to promote" in out.stderr
    assert "promoting" not in out.stderr
    out = cli_here("export", "s", "--out", "winner", cwd=tmp_path)  # nothing to export either
    assert out.returncode == 2, out.stderr
    assert out.stderr == "kdsearch: error: study 's' has no COMPLETE trial to export\n"
    assert not (tmp_path / "winner").exists()


def test_a_run_interrupted_while_its_weights_are_written_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, study, promoted = searched(tmp_path)
    run = plan(study, top_k=1, seeds=1, epochs=2)[0]
    (tmp_path / "w").mkdir()

    def cut(obj: object, file: Path) -> None:  # Ctrl-C halfway through the file
        Path(file).write_bytes(b"PK half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        _record(promoted, run, result_of(run, 0.9), tmp_path / "w", None, DATA)
    assert list((tmp_path / "w").iterdir()) == [] and not promoted.trials


def test_epochs_below_the_trial_budget_are_refused_before_anything_trains(
    tmp_path: Path, cli_here: CliHere
) -> None:
    write_study(tmp_path)  # asha.max_epochs: 2
    out = cli_here("promote", "s", "--epochs", "1", cwd=tmp_path)
    assert out.returncode == 2
    assert "--epochs 1 is below asha.max_epochs (2)" in out.stderr
    assert "promoting" not in out.stderr
    assert "s-promoted" not in optuna.get_all_study_names(f"sqlite:///{tmp_path}/studies/s.db")


def test_a_weights_folder_that_cannot_be_made_is_refused_before_anything_trains(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """It was a FileExistsError traceback once the data and the teacher were ready, with the
    promoted study made already."""
    write_study(tmp_path)
    (tmp_path / "studies" / "s-promoted").touch()
    out = cli_here("promote", "s", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "studies/s-promoted is a file, where the promotion keeps its students' weights; move it "
        "away"
    ) in out.stderr
    assert "s-promoted" not in optuna.get_all_study_names(f"sqlite:///{tmp_path}/studies/s.db")


def test_a_stop_in_the_promotion_after_a_search_says_how_to_finish_it(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while `kdsearch run` promoted: "interrupted", and no word that --resume does the
    promotion and export."""
    write_study(tmp_path, SMALL_SPACE + "promote: {top_k: 1, seeds: 1}\n")

    def stopped(*_: object, **__: object) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr("kdsearch.commands.run.run_promotion", stopped)
    ran = cli_here("run", "space.yaml", "--resume", cwd=tmp_path)
    assert ran.returncode == 130
    assert (
        "stopped after the search; `kdsearch run space.yaml --resume` does the space's promotion "
        "(the promotion runs already finished are kept)"
    ) in " ".join(ran.stderr.split())
    # a --storage whose URL is printed without its password says so after the command
    monkeypatch.setattr("kdsearch.study.storage.redact", lambda url: "postgresql://u:***@db/kd")
    ran = cli_here("run", "space.yaml", "--resume", "--storage", "studies/s.db", cwd=tmp_path)
    assert (
        "stopped after the search; `kdsearch run space.yaml --storage "
        "'postgresql://u:***@db/kd' --resume` (its password hidden) does the space's promotion"
    ) in " ".join(ran.stderr.split()), ran.stderr


def test_a_base_recipe_shorter_than_the_trial_budget_needs_epochs_to_promote(
    tmp_path: Path, cli_here: CliHere
) -> None:
    # a search run with `--set schedule.epochs=1` and no promote section: its trials trained
    # asha.max_epochs (2); promoting at the base's 1 epoch would train the best for fewer
    write_study(tmp_path, SMALL_SPACE.replace("schedule: {epochs: 3", "schedule: {epochs: 1"))
    out = cli_here("promote", "s", cwd=tmp_path)
    assert out.returncode == 2
    assert "base recipe's schedule.epochs 1 is below asha.max_epochs (2)" in out.stderr
    assert "--epochs 2 or more" in out.stderr and "promoting" not in out.stderr
    assert "s-promoted" not in optuna.get_all_study_names(f"sqlite:///{tmp_path}/studies/s.db")


def test_a_failed_run_is_tried_again_and_the_board_reads_the_latest_budget(
    tmp_path: Path,
) -> None:
    storage, study, promoted_study = searched(tmp_path)

    def record(run: Run, value: float, failure: str | None = None) -> None:
        _record(promoted_study, run, result_of(run, value, failure), tmp_path, None, DATA)

    short = plan(study, top_k=1, seeds=1, epochs=2)
    long = plan(study, top_k=1, seeds=1, epochs=4)
    assert [r.source_trial for r in long] == [1, -1, -2]
    assert not {r.key for r in short} & {r.key for r in long}, "a budget is part of a run's key"
    for run in short:
        record(run, 0.5)
    record(long[0], 0.0, failure="CUDA out of memory")
    for run in long[1:]:
        record(run, 0.9)
    assert finished_keys(promoted_study) == {r.key for r in short + long[1:]}  # not the failure
    # no searched recipe has finished at 4 epochs yet: the board stays at 2
    assert list(leaderboard(promoted_study)["val_mean"]) == [50.0] * 3
    assert has_promoted(promoted_study)
    record(long[0], 0.8)  # the failed run, tried again
    board = leaderboard(promoted_study)
    assert dict(zip(board["recipe"], board["val_mean"], strict=True)) == {
        "student alone": 90.0,
        "plain KD": 90.0,
        "trial 1": 80.0,
    }
    assert list(board["epochs"]) == [4] * 3
    # promoting at 2 epochs again trains nothing, and shows (and exports) the 2-epoch runs
    trained: list[int] = []
    promote(
        storage,
        "s",
        top_k=1,
        seeds=1,
        epochs=2,
        weights_dir=tmp_path,
        on_plan=lambda runs, todo: trained.append(todo),
    )
    board = leaderboard(open_promoted(storage, "s"))
    assert trained == [0] and list(board["val_mean"]) == [50.0] * 3
    assert list(board["epochs"]) == [2] * 3


def test_a_run_two_promotions_at_once_both_recorded_counts_once(tmp_path: Path) -> None:
    _, study, promoted_study = searched(tmp_path)
    for value in (0.5, 0.9):  # the second promotion's copy of every run
        for run in plan(study, top_k=1, seeds=2, epochs=2):
            result = replace(result_of(run, value), weights={"w": torch.tensor(value)})
            _record(promoted_study, run, result, tmp_path, None, DATA)
    assert len(promoted_study.trials) == 12
    board = leaderboard(promoted_study)
    assert list(board["seeds"]) == [2] * 3, "seeds 0 and 1, not four seeds"
    assert list(board["val_mean"]) == [50.0] * 3 and list(board["val_sd"]) == [0.0] * 3
    # the weights of the run that counts are its own: the second copy wrote a file of its own
    # where it overwrote the first's
    for t in current_runs(promoted_study):
        weights = torch.load(t.user_attrs["weights"], weights_only=True)
        assert weights["w"].item() == pytest.approx(t.value)
    assert len({t.user_attrs["weights"] for t in promoted_study.trials}) == 12


def test_a_promotion_refuses_a_teacher_other_than_its_recorded_runs_learned_from(
    tmp_path: Path,
) -> None:
    storage, study, promoted_study = searched(tmp_path)
    first = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, first)
    kd = next(r for r in plan(study, top_k=1, seeds=1, epochs=2) if r.source_trial == PLAIN_KD)
    result = result_of(kd, 0.5)
    here = load_data(base_recipe(study).data)  # the data this promotion loads, as recorded
    _record(
        promoted_study,
        kd,
        result,
        tmp_path,
        TeacherFiles(first, weights_digest(first)),
        {"data_fingerprint": here.fingerprint, "inputs": here.inputs()},
    )
    torch.save({"w": torch.ones(3)}, first)  # trained again since, in the same place
    model = build_model("resnet8", 10, 1)

    def prepare(recipe: Recipe, data: ImageData, heads: bool) -> Teacher:
        return Teacher(model, "cache", first, 0.5)

    with pytest.raises(StudyError) as info:
        promote(storage, "s", top_k=1, seeds=2, epochs=2, weights_dir=tmp_path, prepare=prepare)
    assert f"the teacher file {first} hashes" in str(info.value)
    assert "the runs recorded before learned from one that hashed" in str(info.value)
    assert len(promoted_study.trials) == 1, "nothing trained against the other teacher"


def test_a_promotion_says_when_its_teacher_is_not_the_one_the_search_chose_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first promotion on a machine that had lost the search's cached teacher trained
    another and promoted against it without a word."""
    storage, study, _ = searched(tmp_path)
    searched_with = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, searched_with)
    study.set_user_attr("teacher_files", TeacherFiles(searched_with, "0" * 16).attrs())
    model = build_model("resnet8", 10, 1)

    def prepare(recipe: Recipe, data: ImageData, heads: bool) -> Teacher:
        return Teacher(model, "trained", searched_with, 0.5)

    def no_ray(*_: object, **__: object) -> None:  # the promotion stops before its runs train
        raise InterruptedError

    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", no_ray)
    with pytest.warns(KdsearchWarning) as told, pytest.raises(InterruptedError):
        promote(storage, "s", top_k=1, seeds=1, epochs=2, weights_dir=tmp_path, prepare=prepare)
    assert [str(w.message) for w in told] == [
        f"the search 's': the teacher file {searched_with} hashes "
        f"{weights_digest(searched_with)}, but the runs recorded before learned from one that "
        f"hashed {'0' * 16}: it was trained again or replaced since (the same weights saved under "
        "other names, or in another dtype, hash otherwise); its recipes were chosen "
        "against that teacher, and the promotion trains against this one"
    ]


def test_a_promotion_says_when_a_recipes_seeds_trained_in_other_precisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeds added on another kind of machine, or under another oneDNN cap, were averaged with
    the seeds before them without a word."""
    storage, study, promoted_study = searched(tmp_path)
    teacher_file = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, teacher_file)
    files = TeacherFiles(teacher_file, weights_digest(teacher_file))
    kd = next(r for r in plan(study, top_k=1, seeds=1, epochs=2) if r.source_trial == PLAIN_KD)
    here = load_data(base_recipe(study).data)
    seed0 = replace(result_of(kd, 0.5), precision="bf16", onednn_cap="")
    trained_on = {"data_fingerprint": here.fingerprint, "inputs": here.inputs()}
    _record(promoted_study, kd, seed0, tmp_path, files, trained_on)
    model = build_model("resnet8", 10, 1)

    def prepare(recipe: Recipe, data: ImageData, heads: bool) -> Teacher:
        return Teacher(model, "cache", teacher_file, 0.5)

    def in_fp32(jobs: Mapping[str, Recipe], *_: object, on_done: Any, **__: object) -> None:
        for key in jobs:  # every run trains in fp32 under a cap, here
            done = JobResult(key, {2: 0.5}, 0.5, 0.5, 1, 0.1, 10.0, {}, precision="fp32")
            on_done(replace(done, onednn_cap="AVX2"))

    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", in_fp32)
    with pytest.warns(KdsearchWarning) as told:
        promote(storage, "s", top_k=1, seeds=2, epochs=2, weights_dir=tmp_path, prepare=prepare)
    assert [str(w.message) for w in told] == [
        "plain KD, seed 1, trained in fp32 under ONEDNN_MAX_CPU_ISA=AVX2, and seeds of it before "
        "in bf16: its mean over seeds mixes them"
    ]

    # at another budget, a mean of its own: seeds under yet another cap mix with none of those
    # at 2 epochs
    def under_vnni(jobs: Mapping[str, Recipe], *_: object, on_done: Any, **__: object) -> None:
        for key in jobs:
            done = JobResult(key, {4: 0.5}, 0.5, 0.5, 1, 0.1, 10.0, {}, precision="fp32")
            on_done(replace(done, onednn_cap="AVX512_CORE_VNNI"))

    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", under_vnni)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        promote(storage, "s", top_k=1, seeds=2, epochs=4, weights_dir=tmp_path, prepare=prepare)


def test_leaderboard_ties_go_to_more_seeds_then_the_steadier_recipe_then_the_lower_trial(
    tmp_path: Path,
) -> None:
    _, study, promoted_study = searched(tmp_path)
    runs = plan(study, top_k=3, seeds=2, epochs=2)  # trials 1, 3, 0 and the baselines
    values = {  # all at 50%: trial 0 spread out, 1 and 3 steady, trial 1's second seed not run
        (0, 0): 0.25,
        (0, 1): 0.75,
        (1, 0): 0.5,
        (3, 0): 0.5,
        (3, 1): 0.5,
    }
    for run in reversed(runs):  # the order finishing would give: 3 before 1, 0 first
        if (run.source_trial, run.seed) != (1, 1):  # an interrupted promotion
            value = values.get((run.source_trial, run.seed), 0.1)
            _record(promoted_study, run, result_of(run, value), tmp_path, None, DATA)
    board = leaderboard(promoted_study)
    assert list(board["recipe"][:3]) == ["trial 3", "trial 0", "trial 1"]
    assert list(board["seeds"][:3]) == [2, 2, 1]


def test_the_seeds_planned_at_a_budget_are_the_most_any_promotion_asked_for(
    tmp_path: Path,
) -> None:
    """`promote --seeds 3`, then a quicker `--seeds 1`: the plan became 1 seed, and a winner's
    mean over one seed was exported without the note that says so."""
    storage, study, promoted_study = searched(tmp_path)
    for run in plan(study, top_k=1, seeds=3, epochs=2):
        _record(promoted_study, run, result_of(run, 0.5), tmp_path, None, DATA)
    promoted_study.set_user_attr("seeds:2", 3)  # as that promotion recorded it
    # every run of the second is recorded already: it returns before data, teacher or Ray
    again = promote(storage, "s", top_k=1, seeds=1, epochs=2, weights_dir=tmp_path)
    assert again.user_attrs["seeds:2"] == 3
    plan_seeds(promoted_study, 40, 2)  # another budget's own
    assert promoted_study.user_attrs["seeds:40"] == 2


def test_failed_searched_runs_counts_runs_not_tries_and_not_the_baselines(
    tmp_path: Path,
) -> None:
    _, study, promoted = searched(tmp_path)
    runs = {(r.source_trial, r.seed): r for r in plan(study, top_k=1, seeds=2, epochs=2)}
    tries = [
        ((PLAIN_KD, 0), "NonFiniteLoss: nan"),  # a baseline's: not a searched recipe's
        ((1, 0), "OutOfMemoryError: x"),
        ((1, 0), "OutOfMemoryError: x"),  # the same run tried again: one run
        ((1, 1), "NonFiniteLoss: nan"),
    ]
    for key, failure in tries:
        _record(promoted, runs[key], result_of(runs[key], 0.0, failure), tmp_path, None, DATA)
    assert failed_searched_runs(promoted) == (2, 1)
    _record(promoted, runs[1, 0], result_of(runs[1, 0], 0.5), tmp_path, None, DATA)
    assert failed_searched_runs(promoted) == (1, 1), "finished: not failed"


def test_equal_spreads_go_to_the_lower_trial_not_to_their_last_bits(tmp_path: Path) -> None:
    """154, 157, 157 and 155, 155, 158 of 180 images: the same mean and, worked out, the same
    spread, whose floats differ in their last bits; the order followed those bits."""
    _, study, promoted_study = searched(tmp_path)
    correct = {1: (154, 157, 157), 3: (155, 155, 158)}
    for run in plan(study, top_k=3, seeds=3, epochs=2):
        value = correct[run.source_trial][run.seed] / 180 if run.source_trial in correct else 0.5
        _record(promoted_study, run, result_of(run, value), tmp_path, None, DATA)
    board = leaderboard(promoted_study)
    assert board["val_sd"][0] != board["val_sd"][1], "the two floats do differ"
    assert list(board["recipe"][:2]) == ["trial 1", "trial 3"]


def test_a_recipe_with_a_failed_seed_ranks_below_every_recipe_without_one(
    tmp_path: Path,
) -> None:
    """A recipe that diverged on two seeds of three ranked first on its one lucky seed (the
    failures were dropped from its mean), and was exported as the winner."""
    _, study, promoted_study = searched(tmp_path)
    runs = plan(study, top_k=3, seeds=3, epochs=2)  # trials 1, 3, 0 and the baselines
    for run in runs:
        failure = "NonFiniteLoss: nan" if (run.source_trial, run.seed) in {(1, 1), (1, 2)} else None
        value = 0.95 if run.source_trial == 1 else 0.94 if run.source_trial == 3 else 0.5
        _record(promoted_study, run, result_of(run, value, failure), tmp_path, None, DATA)
    board = leaderboard(promoted_study)
    assert board["recipe"][0] == "trial 3" and list(board["failed"][:-1]) == [0] * 4
    last = board.iloc[-1]
    assert (last["recipe"], last["seeds"], last["failed"], last["val_mean"]) == (
        "trial 1",
        1,
        2,
        95.0,
    )
    # a seed lost to its machine (out of memory, a lost node) is no mark against a recipe: it
    # is shown, and a promotion run again retries it
    (trial_3_seed_0,) = (r for r in runs if (r.source_trial, r.seed) == (3, 0))
    _record(
        promoted_study,
        replace(trial_3_seed_0, seed=3),
        result_of(trial_3_seed_0, 0.0, "RayTaskError: node lost"),
        tmp_path,
        None,
        DATA,
    )
    board = leaderboard(promoted_study)
    assert (board["recipe"][0], board["failed"][0], board["diverged"][0]) == ("trial 3", 1, 0)
    assert (board["failed"].iloc[-1], board["diverged"].iloc[-1]) == (2, 2)
    # tried again, that seed diverged: a diverged seed, whatever the first try met (the first
    # try's node loss decided it, and the recipe kept its rank); a machine's failure after it
    # does not undo that
    for failure in ("NonFiniteLoss: nan", "OutOfMemoryError: CUDA out of memory"):
        again = result_of(trial_3_seed_0, 0.0, failure)
        _record(promoted_study, replace(trial_3_seed_0, seed=3), again, tmp_path, None, DATA)
        row = leaderboard(promoted_study).set_index("recipe").loc["trial 3"]
        assert (row["failed"], row["diverged"]) == (1, 1), failure
    assert list(leaderboard(promoted_study)["recipe"][-2:]) == ["trial 3", "trial 1"]
    # tried again and finished: no longer a failure, and its mean is over its three seeds
    for run in runs[1:3]:
        _record(promoted_study, run, result_of(run, 0.95), tmp_path, None, DATA)
    board = leaderboard(promoted_study)
    assert (board["recipe"][0], board["seeds"][0], board["diverged"][0]) == ("trial 1", 3, 0)


def test_equal_means_tie_whatever_order_their_accuracies_were_summed_in(tmp_path: Path) -> None:
    """160/180 and 166/180 average to 90.55555555555556, 161/180 and 165/180 to
    90.55555555555554: the spread never broke the tie, the last bit did."""
    _, study, promoted_study = searched(tmp_path)
    runs = plan(study, top_k=2, seeds=2, epochs=2)  # trials 1, 3 and the baselines
    correct = {(1, 0): 160, (1, 1): 166, (3, 0): 161, (3, 1): 165}
    for run in runs:
        value = correct.get((run.source_trial, run.seed), 90) / 180
        _record(promoted_study, run, result_of(run, value), tmp_path, None, DATA)
    board = leaderboard(promoted_study)
    assert list(board["recipe"][:2]) == ["trial 3", "trial 1"], "the steadier first"
    assert board["val_sd"][0] < board["val_sd"][1]


def test_failures_are_listed_while_no_run_has_finished(tmp_path: Path) -> None:
    """Every run failed (out of memory, say): `kdsearch trials STUDY-promoted` said only
    that no run had finished, and not why."""
    _, study, promoted_study = searched(tmp_path)
    runs = plan(study, top_k=1, seeds=1, epochs=2)
    for run in runs:
        _record(
            promoted_study, run, result_of(run, 0.0, "OutOfMemoryError: x"), tmp_path, None, DATA
        )
    assert leaderboard(promoted_study).empty
    assert sorted(t.user_attrs["label"] for t in failed_runs(promoted_study)) == sorted(
        r.label for r in runs
    )


def test_the_board_of_a_promotion_whose_searched_runs_have_not_finished_is_one_budget(
    tmp_path: Path,
) -> None:
    """Before any searched recipe finished, the baselines of every budget were averaged
    together: four "seeds" at 20 and 40 epochs in one row."""
    _, study, promoted_study = searched(tmp_path)
    for epochs, value in ((2, 0.8), (4, 0.9)):
        for run in plan(study, top_k=1, seeds=2, epochs=epochs):
            if run.source_trial < 0:
                _record(promoted_study, run, result_of(run, value), tmp_path, None, DATA)
    board = leaderboard(promoted_study)
    assert list(board["seeds"]) == [2, 2] and list(board["epochs"]) == [4, 4]
    assert list(board["val_mean"]) == [90.0, 90.0]


def test_a_searched_schedule_kind_promotes_at_the_base_epochs_of_a_cosine_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cosine base may keep milestones past its end (the defaults, 150/180/210); a trial that
    searched kind = multistep trained without them, and the plan refused it as "milestones
    [150, 180, 210] are not below epochs (3)". Such a space is refused now (test_space), but
    studies searched with one before are promoted still: the study is written here as an
    earlier kdsearch wrote it, without that check."""
    space = SMALL_SPACE.replace(
        "  distill.kd.temperature:",
        "  schedule.kind: {type: categorical, choices: [cosine, multistep]}\n"
        "  distill.kd.temperature:",
    )
    with pytest.raises(RecipeError, match=r"multistep needs the base's schedule\.milestones"):
        SearchSpace.from_yaml(space, source="space.yaml")
    monkeypatch.setattr(SearchSpace, "_check", lambda self: None)
    storage = open_storage(write_study(tmp_path, space))
    monkeypatch.undo()
    study = optuna.load_study(study_name="s", storage=storage)
    runs = plan(study, top_k=3, seeds=1, epochs=None)
    assert {r.recipe.schedule.epochs for r in runs} == {3}
    assert {tuple(r.recipe.schedule.milestones) for r in runs} == {()}
    kinds = {r.source_trial: r.recipe.schedule.kind for r in runs}
    assert kinds == {
        t.number: t.params["schedule.kind"] for t in study.trials if t.number in kinds
    } | {
        STUDENT_ALONE: "cosine",
        PLAIN_KD: "cosine",
    }
    assert "multistep" in kinds.values(), "the case the plan refused is in this study"


def test_a_promotion_refuses_runs_recorded_on_other_data(tmp_path: Path) -> None:
    """Runs on other images, splits or normalisation (another machine, a changed folder) were averaged with
    the new ones over seeds."""
    storage, study, promoted_study = searched(tmp_path)
    runs = plan(study, top_k=1, seeds=1, epochs=2)
    for run in runs:
        _record(promoted_study, run, result_of(run, 0.5), tmp_path, None, DATA)
    promoted_study.set_user_attr("budget", 3)  # a promotion at 3 epochs came after
    kept = dict(promoted_study.user_attrs)
    with pytest.raises(StudyError) as info:
        promote(storage, "s", top_k=1, seeds=2, epochs=2, weights_dir=tmp_path)
    assert "trained on other images, splits or normalisation" in str(info.value)
    assert "(data fingerprint 0123456789ab, here" in str(info.value)
    assert len(promoted_study.trials) == len(runs), "nothing trained on this data"
    # refused, it changed nothing: the budget shown, and so the leaderboard, the report and
    # what `export` ships, had become this refused promotion's
    assert optuna.load_study(study_name="s-promoted", storage=storage).user_attrs == kept


def test_a_promotion_ray_refuses_records_no_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`promote --seeds 5 --address HOST:1` (nothing answers): exit 2, and the study said 5
    seeds were planned, so the export's note asked for runs no promotion had started."""
    storage, _, promoted_study = searched(tmp_path)
    model = build_model("resnet8", 10, 1)

    def prepare(recipe: Recipe, data: ImageData, heads: bool) -> Teacher:
        return Teacher(model, "cache", tmp_path / "teacher.pt", 0.5)

    def refused(*_: object, **__: object) -> None:
        raise KdsearchError("cannot join the Ray cluster at 127.0.0.1:1: nothing answers there")

    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", refused)
    torch.save(model.state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(KdsearchError, match="cannot join"):
        promote(storage, "s", top_k=1, seeds=5, epochs=2, weights_dir=tmp_path, prepare=prepare)
    assert "seeds:2" not in promoted_study.user_attrs


def test_runs_recorded_before_budgets_were_keyed_are_not_trained_again(tmp_path: Path) -> None:
    _, study, promoted_study = searched(tmp_path)
    for run in plan(study, top_k=1, seeds=1, epochs=3):
        promoted_study.add_trial(
            create_trial(
                value=0.7,
                params={"source_trial": run.source_trial, "seed": run.seed},
                distributions={
                    "source_trial": IntDistribution(-2, 10**6),
                    "seed": IntDistribution(0, 10**6),
                },
                user_attrs={
                    "run_key": f"{run.source_trial}/{run.seed}",  # the old key, no budget
                    "label": run.label,
                    "source_trial": run.source_trial,
                    "seed": run.seed,
                    "recipe": run.recipe.to_yaml(),
                    "test_acc": 0.6,
                },
            )
        )
    keys = {r.key for r in plan(study, top_k=1, seeds=1, epochs=3)}
    assert finished_keys(promoted_study) == keys
    assert len(leaderboard(promoted_study)) == 3


@pytest.mark.parametrize("baselines_train", [True, False])
def test_a_promotion_whose_searched_runs_all_failed_exits_with_status_1(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch, baselines_train: bool
) -> None:
    """It printed the baselines' leaderboard and exited 0; `kdsearch run` then exported the
    best search trial instead, as if no promotion had been asked for. With no run finished at
    all, it printed an empty leaderboard "promoted at full budget (..., one seed)"."""
    write_study(tmp_path)

    def diverging(storage: BaseStorage, name: str, **kwargs: Any) -> optuna.Study:
        study = optuna.load_study(study_name=name, storage=storage)
        runs = plan(study, top_k=kwargs["top_k"], seeds=kwargs["seeds"], epochs=kwargs["epochs"])
        kwargs["on_plan"](runs, len(runs))
        promoted = open_promoted(storage, name)
        kwargs["weights_dir"].mkdir(parents=True)
        for run in runs:  # every searched recipe diverges
            diverges = run.source_trial >= 0 or not baselines_train
            failure = "NonFiniteLoss: nan" if diverges else None
            result = replace(result_of(run, 0.5, failure), weights=None if failure else {})
            _record(promoted, run, result, kwargs["weights_dir"], None, DATA)
            kwargs["on_run"](run, result)
        return promoted

    monkeypatch.setattr("kdsearch.promote.promote", diverging)
    ran = cli_here("promote", "s", "--seeds", "1", "--top-k", "2", cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    assert "trial 1 seed 0: failed: NonFiniteLoss: nan" in ran.stderr
    assert "every run of the searched recipes failed at the base recipe's 3 epochs:" in ran.stderr
    assert (
        "with 1 seed, next to the student alone and plain KD, at the base recipe's 3 epochs;"
        in (" ".join(ran.stderr.split()))
    )
    assert ("promoted at " in ran.stderr) == baselines_train, ran.stderr


def test_a_driver_that_ends_while_others_still_run_trials_leaves_them_the_promotion(
    tmp_path: Path,
) -> None:
    """It promoted (and exported) the best of the trials finished so far, while another
    driver's trials ran; one whose own trials had all been pruned was told "no COMPLETE
    trial to promote" and exited 2 after a healthy search."""
    url = write_study(tmp_path, SMALL_SPACE + "promote: {top_k: 1, seeds: 2, epochs: 2}\n")
    space = SearchSpace.from_yaml((tmp_path / "space.yaml").read_text(), source="space.yaml")
    other = Record(open_storage(url), "s", space, target=6, resume=True)
    other.driver = "elsewhere:123"  # a driver on another machine, alive by its heartbeat
    assert other.next_plan("ray5") is not None
    other.heartbeat()
    ran = run_cli("run", "space.yaml", "--resume", "--trials", "6", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    said = " ".join(ran.stderr.split())
    assert "1 trial of other drivers is still running" in said
    assert (
        "leaves the space's promotion and export to the driver that finishes the search last"
        in said
    )
    assert "`kdsearch promote s --top-k 1 --seeds 2 --epochs 2`" in said
    assert "s-promoted" not in optuna.get_all_study_names(url), "nothing promoted"


def test_every_run_takes_this_machines_settings_not_its_proposers(tmp_path: Path) -> None:
    """A trial proposed by a driver on another machine kept that machine's device and data
    folder in the promotion (a `device: cpu` driver's trial trained on the CPU of a GPU
    machine), and `kdsearch run` promoted with the base of whichever driver joined last."""
    _, study, _ = searched(tmp_path)
    theirs = Recipe.from_yaml(study.trials[1].user_attrs["recipe"]).override(
        {"device": "cuda:1", "data.root": "/their/data"}
    )
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:  # as that driver recorded it
        db.execute(
            "UPDATE trial_user_attributes SET value_json = ? WHERE key = 'recipe' AND trial_id = ?",
            (json.dumps(theirs.to_yaml()), study.trials[1]._trial_id),
        )
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/studies/s.db")
    assert trial_recipe(study.trials[1]).device == "cuda:1"
    runs = plan(study, top_k=1, seeds=1, epochs=2)
    assert [r.source_trial for r in runs] == [1, STUDENT_ALONE, PLAIN_KD]
    mine = base_recipe(study).data.root
    assert {(r.recipe.device, r.recipe.data.root) for r in runs} == {("cpu", mine)}
    assert runs[0].recipe.distill == theirs.distill, "what it searched is kept"
    here = {"device": "auto", "data.root": "/mine"}
    runs = plan(study, top_k=1, seeds=1, epochs=2, here=here)
    assert {(r.recipe.device, r.recipe.data.root) for r in runs} == {("auto", "/mine")}


def test_the_winner_takes_the_settings_of_the_machine_that_promoted_it(tmp_path: Path) -> None:
    """`kdsearch export` run alone took the data folder and device of the study's base recipe,
    that of whichever driver joined the search last, over those the promoted weights trained
    with on the machine that holds them."""
    from kdsearch.export import find_winner

    storage, study, promoted_study = searched(tmp_path)
    mine = {"data.root": "/promoted/here", "device": "cpu"}
    for run in plan(study, top_k=1, seeds=1, epochs=2, here=mine):
        _record(promoted_study, run, result_of(run, 0.5), tmp_path, None, DATA)
    winner = find_winner(storage, "s")
    assert winner.source == "promoted" and winner.recipe.data.root == "/promoted/here"
    assert winner.base.data.root == "/promoted/here", "its teacher and data as well"
    assert base_recipe(study).data.root != "/promoted/here"
    assert find_winner(storage, "s", {"data.root": "/x"}).recipe.data.root == "/x"


def test_a_search_named_as_anothers_promotion_is_never_taken_for_it_nor_written_to(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """An earlier kdsearch let a search take the name S-promoted; promote, export and report
    of S took it for S's promotion (and promote marked it so, spoiling it)."""
    url = write_study(tmp_path)
    optuna.copy_study(
        from_study_name="s", from_storage=url, to_storage=url, to_study_name="s-promoted"
    )
    storage = open_storage(url)
    held = optuna.load_study(study_name="s-promoted", storage=storage).user_attrs
    # not s's promotion, so export trains the search's best trial instead
    assert promoted_study(storage, "s") is None
    out = cli_here("promote", "s", cwd=tmp_path)
    assert out.returncode == 2 and "promoting" not in out.stderr
    assert (
        "study 's-promoted' is not the promotion of study 's' but a search of its own"
        in " ".join(out.stderr.split())
    )
    assert optuna.load_study(study_name="s-promoted", storage=storage).user_attrs == held
    with pytest.raises(StudyError, match="is not the promotion of study 's'"):
        open_promoted(storage, "s")
    optuna.copy_study(
        from_study_name="s", from_storage=url, to_storage=url, to_study_name="x-promoted"
    )
    with pytest.raises(StudyError, match="is not the promotion of study 'x'"):
        Record(storage, "x", SearchSpace.from_yaml(SMALL_SPACE, source="s"), target=5, resume=False)
    # a promotion another promote just created, its source_study not yet written: s's
    optuna.create_study(study_name="z-promoted", storage=storage)
    assert open_promoted(storage, "z").user_attrs["source_study"] == "z"
    # one that an earlier `promote s` already marked as s's (source_study): still a search
    optuna.load_study(study_name="s-promoted", storage=storage).set_user_attr("source_study", "s")
    assert not has_promoted(promoted_study(storage, "s"))
    listed = cli_here("trials", "s-promoted", cwd=tmp_path)
    assert listed.returncode == 0 and "temperature" in listed.stdout, listed.stderr
    # no new search takes such a name, from --study or the space file; a study recorded under
    # one still loads (its recorded space names it)
    ran = cli_here("run", "space.yaml", "--study", "t-promoted", cwd=tmp_path)
    assert ran.returncode == 2
    assert "'t-promoted': a name ending in -promoted is kept for the promotion runs" in ran.stderr
    # with --resume the name is refused where the study would be made: the file made for it
    # goes again (`trials t-promoted` would have found it before studies/t.db)
    ran = cli_here("run", "space.yaml", "--study", "t-promoted", "--resume", cwd=tmp_path)
    assert ran.returncode == 2 and "'t-promoted': a name ending in -promoted" in ran.stderr
    assert sorted(p.name for p in (tmp_path / "studies").iterdir()) == ["s.db"]
    (tmp_path / "p.yaml").write_text(SMALL_SPACE.replace("name: s}", "name: p-promoted}"))
    ran = cli_here("run", "p.yaml", cwd=tmp_path)
    assert ran.returncode == 2 and "'p-promoted': a name ending in -promoted" in ran.stderr
    with pytest.raises(StudyError, match="'q-promoted': a name ending in -promoted"):
        Record(
            storage,
            "q-promoted",
            SearchSpace.from_yaml(SMALL_SPACE, source="s"),
            target=5,
            resume=True,
        )
    legacy = optuna.load_study(study_name="s-promoted", storage=storage)
    legacy.set_user_attr("space", SMALL_SPACE.replace("name: s}", "name: s-promoted}"))
    assert space_config(legacy).study.name == "s-promoted"


def trained_at_once(
    jobs: dict[str, Recipe], data: ImageData, teacher: object, **kwargs: Any
) -> None:
    """`run_jobs` as if every run had trained to 0.5 at once."""
    for key in jobs:
        kwargs["on_done"](JobResult(key, {1: 0.5}, 0.5, 0.5, 1, 0.1, 10.0, {}, None))


def fake_teacher(tmp_path: Path) -> Any:
    """A `prepare` that hands back a resnet8 saved in tmp_path, and records each call."""
    model = build_model("resnet8", 10, 1)
    torch.save(model.state_dict(), tmp_path / "teacher.pt")
    calls: list[Recipe] = []

    def prepare(recipe: Recipe, data: ImageData, heads: bool) -> Teacher:
        calls.append(recipe)
        return Teacher(model, "cache", tmp_path / "teacher.pt", 0.5)

    prepare.calls = calls  # type: ignore[attr-defined]
    return prepare


def test_a_read_only_storage_shows_a_promotions_board_and_refuses_new_runs_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`promote` on a read-only study was a traceback through Optuna's create_study (exit 1),
    even with nothing to train."""
    url = write_study(tmp_path)
    read_only = RDBStorage(f"sqlite:///file:{tmp_path}/studies/s.db?mode=ro&uri=true")
    prepare = fake_teacher(tmp_path)
    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", trained_at_once)
    weights = tmp_path / "w"
    with pytest.raises(StorageError) as first:  # no promotion yet: it would be created
        promote(read_only, "s", top_k=1, seeds=1, epochs=2, weights_dir=weights, prepare=prepare)
    assert str(first.value).endswith(
        "/s.db?mode=ro&uri=true: attempt to write a readonly database; the runs recorded so far "
        "are kept, and promoting again once it works trains the others"
    )
    assert not weights.exists()
    kwargs: dict[str, Any] = {"top_k": 1, "epochs": 2, "weights_dir": weights, "prepare": prepare}
    promote(open_storage(url), "s", seeds=1, **kwargs)
    assert len(prepare.calls) == 1
    shown = promote(read_only, "s", seeds=1, **kwargs)  # nothing to train: nothing written
    assert sorted(leaderboard(shown)["recipe"]) == ["plain KD", "student alone", "trial 1"]
    with pytest.raises(StorageError, match="attempt to write a readonly database; the runs"):
        promote(read_only, "s", seeds=2, **kwargs)
    assert len(prepare.calls) == 1, "refused before the data and the teacher"
    assert len(promoted_study(read_only, "s").trials) == 3  # type: ignore[union-attr]


def test_a_promotion_stopped_before_recording_a_run_leaves_nothing_and_takes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped before its first run was recorded, it left an empty promoted study (which the
    report then showed as a promotion with no run) and an empty weights folder. Nor may it
    take back the study and folder of another promotion of the search that began meanwhile."""
    storage = open_storage(write_study(tmp_path))
    weights = tmp_path / "w" / "s-promoted"
    prepare = fake_teacher(tmp_path)
    kwargs: dict[str, Any] = {"top_k": 1, "seeds": 1, "epochs": 2, "weights_dir": weights}

    def stopped(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", stopped)
    with pytest.raises(KeyboardInterrupt):
        promote(storage, "s", prepare=prepare, **kwargs)
    assert "s-promoted" not in [s.study_name for s in storage.get_all_studies()]
    assert not (tmp_path / "w").exists()

    def beside(*_: object, **__: object) -> None:  # another promotion starts, then this one stops
        open_promoted(storage, "s")
        weights.mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", beside)
    with pytest.raises(KeyboardInterrupt):
        promote(storage, "s", prepare=prepare, **kwargs)
    assert "s-promoted" in [s.study_name for s in storage.get_all_studies()] and weights.is_dir()
    # runs recorded before stay, with their weights
    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", trained_at_once)
    promote(storage, "s", prepare=prepare, **kwargs)
    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", stopped)
    with pytest.raises(KeyboardInterrupt):
        promote(storage, "s", prepare=prepare, **{**kwargs, "seeds": 2})
    assert len(promoted_study(storage, "s").trials) == 3  # type: ignore[union-attr]
    assert len(list(weights.iterdir())) == 3


def test_a_storage_lost_as_a_run_is_recorded_is_one_line_and_leaves_no_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was a traceback through Optuna's commit."""
    storage = open_storage(write_study(tmp_path))

    def lost(*_: object) -> None:
        cause = sqlite3.OperationalError("disk I/O error")
        raise optuna.exceptions.StorageInternalError(
            "An exception is raised during the commit"
        ) from cause

    monkeypatch.setattr("kdsearch.search.jobs.run_jobs", trained_at_once)
    monkeypatch.setattr(optuna.Study, "add_trial", lost)
    kwargs: dict[str, Any] = {"top_k": 1, "seeds": 1, "epochs": 2, "weights_dir": tmp_path / "w"}
    with pytest.raises(StorageError) as err:
        promote(storage, "s", prepare=fake_teacher(tmp_path), **kwargs)
    assert str(err.value).endswith(
        ": disk I/O error; the runs recorded so far are kept, and promoting again once it "
        "works trains the others"
    )
    assert list((tmp_path / "w").iterdir()) == [], "no weights that no run names"


def test_a_storage_lost_before_the_plan_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study's first reads (its trials, for the plan) were outside the promotion's own
    handler: `kdsearch run`'s promotion, the first read after a long search, gave Optuna's
    traceback where the storage had gone meanwhile."""
    storage = open_storage(write_study(tmp_path))

    def lost(*_: object, **__: object) -> None:
        raise optuna.exceptions.StorageInternalError("read") from sqlite3.OperationalError(
            "disk I/O error"
        )

    monkeypatch.setattr(RDBStorage, "get_all_trials", lost)
    monkeypatch.setattr(RDBStorage, "_get_trials", lost)
    kwargs: dict[str, Any] = {"top_k": 1, "seeds": 1, "epochs": 2, "weights_dir": tmp_path / "w"}
    with pytest.raises(StorageError, match=r"^cannot use the study storage .*: disk I/O error$"):
        promote(storage, "s", prepare=fake_teacher(tmp_path), **kwargs)
    assert not (tmp_path / "w").exists()


def test_a_storage_lost_as_the_leaderboard_is_read_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the promotion's last run, the leaderboard and the runs finished are read again."""
    from kdsearch.commands.promote import run_promotion

    url = write_study(tmp_path)
    storage = open_storage(url)

    def lost(*_: object) -> None:
        raise optuna.exceptions.StorageInternalError("read") from sqlite3.OperationalError(
            "disk I/O error"
        )

    monkeypatch.setattr("kdsearch.promote.promote", lambda *_, **__: None)  # every run done
    monkeypatch.setattr("kdsearch.promote.leaderboard", lost)
    with pytest.raises(StorageError, match=r"^cannot use the study storage .*: disk I/O error$"):
        run_promotion(storage, url, "s", 1, 1, 2, None)
