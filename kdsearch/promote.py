"""Promotion: the best trials of a search re-trained at full budget over several seeds, scored on
the test split, next to the student alone and plain KD trained the same way.

Every run is recorded in the study `<name>-promoted` (same storage) when it ends, with its source
trial, seed, budget, validation and test accuracy and learning curve, so a promotion interrupted
and run again skips every run already COMPLETE there (a failed run is tried again). A promotion at
another budget (`--epochs`) trains its own runs, and earlier ones stay in the study; the
leaderboard and the export read the runs at the budget the latest promotion asked for, as soon as
a searched recipe has finished at it (until then, the budget before).
"""

from __future__ import annotations

import collections
import itertools
import json
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.distributions import IntDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState, create_trial

from kdsearch import __version__
from kdsearch.errors import KdsearchError, KdsearchWarning, NonFiniteLoss, StudyError
from kdsearch.paths import writable_folder
from kdsearch.recipe import DistillConfig, Recipe
from kdsearch.study.contents import (
    base_recipe,
    load_study,
    machine_settings,
    not_the_promotion,
    promoted_name,
    promotion_held,
    ranked,
    space_config,
    trial_recipe,
)
from kdsearch.study.storage import check_writes, sqlite_file, storage_errors

if TYPE_CHECKING:  # torch: `trials` and `report` read promotions without it
    from kdsearch.data import ImageData
    from kdsearch.search.worker import JobResult
    from kdsearch.teacher import Teacher, TeacherFiles

STUDENT_ALONE = -1  # `source_trial` of the baselines, in the promoted study
PLAIN_KD = -2
BASELINE_LABELS = {STUDENT_ALONE: "student alone", PLAIN_KD: "plain KD"}


def run_key(source_trial: int, seed: int, budget: int) -> str:
    """What identifies a promotion run: its recipe, seed and budget."""
    return f"{source_trial}/{seed}/{budget}"


@dataclass(frozen=True)
class Run:
    """One promotion run: a recipe at full budget with one seed."""

    source_trial: int  # a trial number of the search, or STUDENT_ALONE / PLAIN_KD
    seed: int
    recipe: Recipe

    @property
    def key(self) -> str:
        return run_key(self.source_trial, self.seed, self.recipe.schedule.epochs)

    @property
    def label(self) -> str:
        return BASELINE_LABELS.get(self.source_trial, f"trial {self.source_trial}")

    @property
    def slug(self) -> str:
        """A file name for the run's weights: "trial-3-seed0-20ep", "plain-kd-seed1-20ep"."""
        name = self.label.lower().replace(" ", "-")
        return f"{name}-seed{self.seed}-{self.recipe.schedule.epochs}ep"


def plan(
    study: optuna.Study,
    *,
    top_k: int,
    seeds: int,
    epochs: int | None,
    here: Mapping[str, Any] | None = None,
) -> list[Run]:
    """The runs of a promotion: the top-k COMPLETE trials of distinct recipes (all ran the same
    budget, so their values compare) and the two baselines, each at the full budget, for every
    seed. A trial keeps the schedule settings it searched (kind, gamma); its epochs and
    milestones become the base's. Every run takes the machine settings `here`
    (`machine_settings`; default: the study's base recipe's), not those of the driver that
    proposed its trial."""
    base = base_recipe(study)
    if here is None:
        here = machine_settings(base, space_config(study).space)
    base = base.override(here)
    # at the base's own epochs too: a cosine base may keep milestones past its end, which a trial
    # that searched `schedule.kind` = multistep never trained with (and a recipe refuses)
    full = base.with_epochs(epochs or base.schedule.epochs)
    budget = {
        "schedule.epochs": full.schedule.epochs,
        "schedule.milestones": full.schedule.milestones,
    }
    trials = {t.number: t for t in study.trials}
    best = itertools.islice(distinct_best(study.trials, {**budget, **here}), top_k)
    sources = {n: trial_recipe(trials[n]).override({**budget, **here}) for n in best}
    if not sources:
        raise StudyError(f"study {study.study_name!r} has no COMPLETE trial to promote")
    off = {f"distill.{name}.weight": 0.0 for name in DistillConfig.model_fields if name != "ce"}
    alone = full.override({**off, "distill.ce.weight": 1.0})
    kd = base.distill.kd
    sources[STUDENT_ALONE] = alone
    sources[PLAIN_KD] = alone.override(
        {
            "distill.kd.weight": kd.weight if kd.weight > 0 else 0.9,
            "distill.kd.temperature": kd.temperature,
        }
    )
    return [
        Run(number, seed, recipe.override({"seed": seed}))
        for number, recipe in sources.items()
        for seed in range(seeds)
    ]


def distinct_best(trials: Sequence[FrozenTrial], settings: Mapping[str, Any]) -> Iterator[int]:
    """The numbers of the COMPLETE trials best first (`ranked`), one for each recipe they trained
    under `settings` (the promotion's budget and machine): where a sampler proposed a recipe again
    (a categorical space, say), promoting both trials would train the same runs twice, bit for
    bit. The recipe's first trial stands for it, at its best trial's place, so a better score
    for a recipe already promoted trains nothing new."""
    best = ranked(trials)
    same_params: dict[str, list[FrozenTrial]] = collections.defaultdict(list)  # parse only these
    for t in best:
        same_params[json.dumps(t.params, sort_keys=True, default=str)].append(t)
    first: dict[int, int] = {}  # a trial's number -> that of the recipe's first trial
    for group in same_params.values():
        if len(group) > 1:
            recipes = [(t.number, trial_recipe(t).override({**settings, "seed": 0})) for t in group]
            for number, recipe in recipes:
                first[number] = min(n for n, other in recipes if other == recipe)
    seen: set[int] = set()
    for t in best:
        if (number := first.get(t.number, t.number)) not in seen:
            seen.add(number)
            yield number


def open_promoted(storage: BaseStorage, name: str) -> optuna.Study:
    """The promoted study of `name`, created on first use; one that exists is only read (its
    leaderboard shows from a read-only storage)."""
    held = promotion_held(storage, name)
    if held is False:
        raise not_the_promotion(name)
    if held:
        study = optuna.load_study(study_name=promoted_name(name), storage=storage)
    else:
        study = optuna.create_study(
            study_name=promoted_name(name),
            storage=storage,
            direction="maximize",
            load_if_exists=True,
        )
    if study.user_attrs.get("source_study") != name:  # (another promote's, created just now)
        study.set_user_attr("source_study", name)
        study.set_user_attr("kdsearch_version", __version__)
    return study


def run_budget(run: FrozenTrial) -> int:
    """The epochs a recorded run was planned for (runs recorded before the budget was recorded
    by itself carry it in their recipe)."""
    if "budget" in run.user_attrs:
        return int(run.user_attrs["budget"])
    return Recipe.from_yaml(str(run.user_attrs["recipe"])).schedule.epochs


def key_of(run: FrozenTrial) -> str:
    """The run (recipe, seed, budget) a recorded try of it trained."""
    return run_key(run.params["source_trial"], run.params["seed"], run_budget(run))


def latest_budget(runs: Iterable[FrozenTrial]) -> int | None:
    """The budget of the last recorded of `runs`; None for none."""
    last = max(runs, key=lambda t: t.number, default=None)
    return None if last is None else run_budget(last)


def finished_runs(promoted: optuna.Study) -> dict[str, FrozenTrial]:
    """The COMPLETE runs by key, the first recorded of a run that two promotions running at once
    both trained."""
    done: dict[str, FrozenTrial] = {}
    for t in promoted.trials:
        if t.state == TrialState.COMPLETE:
            done.setdefault(key_of(t), t)
    return done


def finished_keys(promoted: optuna.Study) -> set[str]:
    """Runs already COMPLETE; a promotion run again does not redo them."""
    return set(finished_runs(promoted))


def current_budget(promoted: optuna.Study) -> int | None:
    """The budget the leaderboard and the export read (see the module's docstring); None while
    no searched recipe has finished."""
    if "budget" in promoted.user_attrs:
        return int(promoted.user_attrs["budget"])
    return latest_budget(  # a study of an older version: the budget of the latest searched run
        t
        for t in promoted.trials
        if t.state == TrialState.COMPLETE and int(t.user_attrs["source_trial"]) >= 0
    )


def board_budget(promoted: optuna.Study) -> int | None:
    """The budget of the leaderboard: the current budget, else (no searched recipe has finished
    yet, only baselines) that of the latest finished run; None while no run has finished."""
    budget = current_budget(promoted)
    return latest_budget(finished_runs(promoted).values()) if budget is None else budget


def current_runs(promoted: optuna.Study) -> list[FrozenTrial]:
    """The COMPLETE runs at the leaderboard's budget (`board_budget`), each once."""
    budget = board_budget(promoted)
    return [t for t in finished_runs(promoted).values() if run_budget(t) == budget]


def failed_runs(promoted: optuna.Study) -> list[FrozenTrial]:
    """The FAIL runs at the leaderboard's budget (while no run has finished: the latest
    run's) that no later try of the same run (recipe, seed, budget) has finished, each once."""
    budget = board_budget(promoted)
    if budget is None:
        budget = latest_budget(promoted.trials)
    return unfinished_failures(promoted, lambda t: run_budget(t) == budget)


def first_run(promoted: optuna.Study | None, label: str) -> FrozenTrial | None:
    """The run of `label` ("plain KD", "trial 3") with the lowest seed finished at the
    leaderboard's budget, where `promoted` (a search's `promoted_study`) has one."""
    runs = [] if promoted is None else current_runs(promoted)
    runs = [t for t in runs if t.user_attrs["label"] == label]
    return min(runs, key=lambda t: int(t.params["seed"])) if runs else None


def failed_line(run: FrozenTrial) -> str:
    """One line for a failed run: which recipe and seed, at what budget, and why."""
    why = str(run.user_attrs.get("failure", "no reason recorded")).strip().splitlines() or [""]
    return (
        f"failed: {run.user_attrs['label']}, seed {run.user_attrs['seed']}, "
        f"{run_budget(run)} epochs: {why[0]}"
    )


def unfinished_failures(
    promoted: optuna.Study, keep: Callable[[FrozenTrial], bool]
) -> list[FrozenTrial]:
    """Of the FAIL runs `keep` takes, one per run (recipe, seed, budget) that no try finished:
    the latest try, but a divergence over a machine's failure (a seed lost to an OOM and
    diverged when tried again is a diverged seed, whichever came first)."""
    done = finished_runs(promoted)
    failed: dict[str, FrozenTrial] = {}
    for t in promoted.trials:  # in the order they were tried
        key = key_of(t)
        if t.state != TrialState.FAIL or key in done or not keep(t):
            continue
        if key not in failed or diverged(t) or not diverged(failed[key]):
            failed[key] = t
    return list(failed.values())


def plan_seeds(promoted: optuna.Study, budget: int, seeds: int) -> None:
    """Record the seeds a promotion at `budget` asks for: what the export's mean should be over,
    the most any promotion there asked for (a later, quicker `--seeds 1` over more recipes does
    not let a mean over one seed pass unremarked)."""
    key = f"seeds:{budget}"
    most = max(seeds, int(promoted.user_attrs.get(key, 0)))
    if promoted.user_attrs.get(key) != most:
        promoted.set_user_attr(key, most)


def diverged(run: FrozenTrial) -> bool:
    """Whether a failed run failed of its recipe, its loss become non-finite, rather than of
    its machine (out of memory, a lost node: a promotion run again retries those)."""
    return str(run.user_attrs.get("failure", "")).startswith(NonFiniteLoss.__name__)


def promote(
    storage: BaseStorage,
    name: str,
    *,
    top_k: int,
    seeds: int,
    epochs: int | None,
    weights_dir: Path,
    address: str | None = None,
    on_plan: Callable[[list[Run], int], None] | None = None,
    on_run: Callable[[Run, JobResult], None] | None = None,
    on_epoch: Callable[[Run, int, float], None] | None = None,
    prepare: Callable[[Recipe, ImageData, bool], Teacher] | None = None,
    here: Mapping[str, Any] | None = None,
) -> optuna.Study:
    """Train every run of the plan not yet recorded, on Ray, and record each as it ends.
    `on_plan` hears the plan's runs and how many of them are to train, `on_epoch` each epoch
    of a run (its number and validation accuracy) as it ends; `here`: this machine's settings
    (see `plan`)."""
    from kdsearch.data import load_data
    from kdsearch.distill import needs_teacher, needs_teacher_heads
    from kdsearch.teacher import TeacherFiles
    from kdsearch.train import arithmetic, unlike

    with storage_errors(storage):  # nothing recorded yet: nothing to say is kept
        study = load_study(storage, name)
        if here is None:
            here = machine_settings(base_recipe(study), space_config(study).space)
        runs = plan(study, top_k=top_k, seeds=seeds, epochs=epochs, here=here)
    if weights_dir.exists() and not weights_dir.is_dir():
        raise KdsearchError(
            f"{weights_dir} is a file, where the promotion keeps its students' weights; move it "
            "away"
        )
    kept = "the runs recorded so far are kept, and promoting again once it works trains the others"
    with storage_errors(storage, kept):
        held = promotion_held(storage, name)
        if held is False:
            raise not_the_promotion(name)
        # Made when its first run is recorded (`open_promoted`), and its weights folder with it:
        # a promotion stopped or refused before leaves neither, and takes nothing back that
        # another promotion of the study, started meanwhile, may be using.
        promoted = (
            optuna.load_study(study_name=promoted_name(name), storage=storage) if held else None
        )
        recorded = [] if promoted is None else promoted.trials
        done = set() if promoted is None else finished_keys(promoted)
        budget = runs[0].recipe.schedule.epochs
        todo = {r.key: r for r in runs if r.key not in done}

        def planned(into: optuna.Study) -> None:
            """Record the plan in the promotion `into`: its seeds, and its budget as the one
            shown where runs of it had finished before (asked for again). Only once a run has
            ended, or none is to train: a promotion refused before (its data, its teacher, Ray)
            leaves the study as it was."""
            finished = any(r.key in done for r in runs if r.source_trial >= 0)
            if finished and into.user_attrs.get("budget") != budget:
                into.set_user_attr("budget", budget)
            plan_seeds(into, budget, seeds)

        if on_plan is not None:
            on_plan(runs, len(todo))
        if not todo:
            assert promoted is not None  # it holds every run of the plan
            planned(promoted)  # writing only what changes: the board shows from a read-only file
            return promoted
        # Before the data and the teacher: a folder the weights cannot go to, and a storage
        # that takes no writes, are found now, not once a run has trained.
        writable_folder(weights_dir, "the promotion's weights folder")
        check_writes(storage, name)
        # The data and the teacher as the search prepared them: from the base recipe, whose
        # optimizer and batch size the teacher trains with, not from a run's, which a trial may
        # have searched.
        base = base_recipe(study).override(here)
        data = load_data(base.data)
        for t in recorded:  # one data set behind every mean over seeds
            trained_on = t.user_attrs.get("data_fingerprint")  # absent from older promotions
            if t.state == TrialState.COMPLETE and trained_on not in (None, data.fingerprint):
                raise StudyError(
                    f"{promoted_name(name)}: its run {t.user_attrs['label']}, seed "
                    f"{t.user_attrs['seed']} trained on other images, splits or normalisation "
                    f"than this machine loads for {base.data.dataset} (data fingerprint "
                    f"{str(trained_on)[:12]}, here {data.fingerprint[:12]}); promote where that "
                    "data is, or delete the study "
                    f"{promoted_name(name)!r} (optuna delete-study) to promote afresh"
                )
        teacher = None
        files: dict[bool, TeacherFiles] = {}  # the teacher's files, without and with its heads
        if any(needs_teacher(r.recipe) for r in todo.values()):
            heads = any(needs_teacher_heads(r.recipe) for r in todo.values())
            teacher = (prepare or _prepare)(base, data, heads)
            full = TeacherFiles.of(teacher, heads)
            files = {True: full, False: full.without_heads()}
            if problem := full.changed_since(study.user_attrs.get("teacher_files", {})):
                warnings.warn(  # the search's file lost here, say: a fair promotion all the same
                    f"the search {name!r}: {problem}; its recipes were chosen against that "
                    "teacher, and the promotion trains against this one",
                    KdsearchWarning,
                    stacklevel=2,
                )
            for t in recorded:  # one teacher behind every mean over seeds
                if t.state == TrialState.COMPLETE and (problem := full.changed_since(t.user_attrs)):
                    raise StudyError(
                        f"{promoted_name(name)}: {problem}; put that file back, or delete the "
                        f"study {promoted_name(name)!r} (optuna delete-study) to promote afresh"
                    )
        # the data every run trains on; `inputs`: what serving its student needs, as this data
        # gave it
        trained_on = {"data_fingerprint": data.fingerprint, "inputs": data.inputs()}
        ended: list[str] = []
        # how each recipe's finished seeds at a budget did their arithmetic (precision, oneDNN
        # cap): a mean over seeds that mixes them is said (another kind of machine since, a
        # mixed cluster)
        arithmetics: dict[tuple[str, int], set[str]] = {}
        for t in recorded:
            if t.state == TrialState.COMPLETE and "precision" in t.user_attrs:
                how = arithmetic(t.user_attrs["precision"], t.user_attrs.get("onednn_cap"))
                arithmetics.setdefault((str(t.user_attrs["label"]), run_budget(t)), set()).add(how)

        def record(result: JobResult) -> None:
            nonlocal promoted
            if promoted is None:  # the first run recorded makes the promotion
                promoted = open_promoted(storage, name)
            if not ended:
                planned(promoted)
            ended.append(result.key)
            run = todo[result.key]
            # The teacher the run learned from, for the export to ship with the student.
            learned = (
                files.get(needs_teacher_heads(run.recipe)) if needs_teacher(run.recipe) else None
            )
            _record(promoted, run, result, weights_dir, learned, trained_on)
            if result.failure is None:
                how = arithmetic(result.precision, result.onednn_cap)
                seen = arithmetics.setdefault((run.label, run.recipe.schedule.epochs), set())
                if (before := unlike(seen, how)) is not None:
                    warnings.warn(
                        f"{run.label}, seed {run.seed}, trained {how}, and seeds of it before "
                        f"{before}: its mean over seeds mixes them",
                        KdsearchWarning,
                        stacklevel=2,
                    )
            if on_run is not None:
                on_run(run, result)

        from kdsearch.search.jobs import run_jobs  # Ray: not imported by export, report or trials

        run_jobs(
            {k: r.recipe for k, r in todo.items()},
            data,
            teacher,
            search=space_config(study).search,
            address=address,
            on_done=record,
            on_epoch=None if on_epoch is None else lambda key, e, acc: on_epoch(todo[key], e, acc),
        )
        assert promoted is not None  # each run that ended was recorded
        return promoted


def _prepare(recipe: Recipe, data: ImageData, heads: bool) -> Teacher:
    from kdsearch.teacher import get_teacher

    return get_teacher(recipe, data, heads=heads)


def _record(
    promoted: optuna.Study,
    run: Run,
    result: JobResult,
    weights_dir: Path,
    teacher: TeacherFiles | None,
    trained_on: dict[str, Any],
) -> None:
    from kdsearch.teacher import save_weights

    attrs: dict[str, Any] = {
        "run_key": run.key,
        "label": run.label,
        "source_trial": run.source_trial,
        "seed": run.seed,
        "budget": run.recipe.schedule.epochs,
        "recipe": run.recipe.to_yaml(),
        "epochs": max(result.curve, default=0),
        "threads": result.threads,
        "device": result.device,
        "precision": result.precision,
        "onednn_cap": result.onednn_cap,
        "wall_seconds": round(result.seconds, 2),
        "images_per_sec": round(result.images_per_sec, 1),
        **trained_on,
        **(teacher.attrs() if teacher is not None else {}),
    }
    path = None
    if result.failure is None:
        assert result.weights is not None
        weights_dir.mkdir(parents=True, exist_ok=True)  # made with the promotion's first run
        path = new_file(weights_dir, run.slug, ".pt")
        try:
            save_weights(result.weights, path)  # a promotion reading it at once sees it whole
        except BaseException:  # Ctrl-C, a full disk: no empty file is left taken
            path.unlink(missing_ok=True)
            raise
        attrs.update(test_acc=result.test_acc, student_params=result.params, weights=str(path))
        state, value = TrialState.COMPLETE, result.val_acc
    else:
        attrs["failure"] = result.failure
        state, value = TrialState.FAIL, None
    trial = create_trial(
        state=state,
        value=value,
        params={"source_trial": run.source_trial, "seed": run.seed},
        distributions={
            "source_trial": IntDistribution(-2, 10**6),
            "seed": IntDistribution(0, 10**6),
        },
        intermediate_values=result.curve,
        user_attrs=attrs,
    )
    try:
        promoted.add_trial(trial)
    except optuna.exceptions.StorageInternalError:  # refused, so not recorded: no file is left
        # that no run names (a Ctrl-C in the call may come after the commit: its file stays)
        if path is not None:
            path.unlink(missing_ok=True)
        raise
    if state == TrialState.COMPLETE and run.source_trial >= 0:
        promoted.set_user_attr("budget", run.recipe.schedule.epochs)


def new_file(folder: Path, stem: str, suffix: str) -> Path:
    """A file of `folder` no one else has: `stem`, else `stem-2`, `stem-3`, ..., created empty
    (and so taken) at once. Two promotions training one run at once each keep their own
    weights; the first recorded counts (`finished_runs`), so it must point at its own."""
    n = 1
    while True:
        path = folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"
        try:
            path.open("x").close()
        except FileExistsError:
            n += 1
            continue
        return path.resolve()


def leaderboard(promoted: optuna.Study) -> pd.DataFrame:
    """Mean and spread over seeds of each promoted recipe and baseline at the leaderboard's
    budget (`current_runs`; its epochs in column `epochs`) and how many of its seeds failed
    there (`failed_runs`), of them `diverged`: ranked by how many diverged, fewest first, a
    recipe that diverges on some seed being no recipe to ship, then best validation first
    (ties: more seeds, then smaller spread, then lower trial number)."""
    failures = failed_runs(promoted)
    failed = collections.Counter(int(t.user_attrs["source_trial"]) for t in failures)
    bad = collections.Counter(int(t.user_attrs["source_trial"]) for t in failures if diverged(t))
    rows: dict[int, dict[str, Any]] = {}
    for t in current_runs(promoted):
        source = int(t.user_attrs["source_trial"])
        row = rows.setdefault(
            source,
            {
                "recipe": t.user_attrs["label"],
                "source_trial": source,
                "epochs": run_budget(t),
                "val": [],
                "test": [],
            },
        )
        row["val"].append(100 * float(t.value or 0.0))
        row["test"].append(100 * float(t.user_attrs["test_acc"]))
    table = [
        {
            "recipe": r["recipe"],
            "source_trial": r["source_trial"],
            "epochs": r["epochs"],
            "seeds": len(r["val"]),
            "failed": failed[r["source_trial"]],
            "diverged": bad[r["source_trial"]],
            "val_mean": statistics.mean(r["val"]),
            "val_sd": _sd(r["val"]),
            "test_mean": statistics.mean(r["test"]),
            "test_sd": _sd(r["test"]),
        }
        for r in rows.values()
    ]
    columns = [
        "recipe",
        "source_trial",
        "epochs",
        "seeds",
        "failed",
        "diverged",
        "val_mean",
        "val_sd",
        "test_mean",
        "test_sd",
    ]
    frame = pd.DataFrame(table, columns=columns)
    # Ties go to the recipe with more seeds behind its mean, then the steadier one, then the
    # lower trial number: never to the order the runs happened to finish in. Means of equal
    # sums of accuracies differ in their last bits with the order of the sum (0.9 + 0.8 and
    # 0.85 + 0.85), and equal spreads likewise, so they are compared rounded.
    order = frame.assign(val_key=frame["val_mean"].round(9), sd_key=frame["val_sd"].round(9))
    order = order.sort_values(
        ["diverged", "val_key", "seeds", "sd_key", "source_trial"],
        ascending=[True, False, False, True, True],
    )
    return frame.loc[order.index].reset_index(drop=True)


def runs_table(promoted: optuna.Study) -> pd.DataFrame:
    """Every recorded run, finished or failed and at any budget: recipe, seed, budget, state,
    accuracies (fractions) and why it failed."""
    rows = [
        {
            "recipe": t.user_attrs["label"],
            "source_trial": int(t.user_attrs["source_trial"]),
            "seed": int(t.user_attrs["seed"]),
            "budget": run_budget(t),
            "state": t.state.name,
            "val_acc": t.value,
            "test_acc": t.user_attrs.get("test_acc"),
            "failure": t.user_attrs.get("failure"),
        }
        for t in promoted.trials
    ]
    columns = ["recipe", "source_trial", "seed", "budget", "state", "val_acc", "test_acc"]
    return pd.DataFrame(rows, columns=[*columns, "failure"])


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def has_promoted(promoted: optuna.Study | None) -> bool:
    """Whether `promoted` (a search's `promoted_study`) holds a COMPLETE run of a searched
    recipe at its leaderboard's budget."""
    return promoted is not None and any(
        int(t.user_attrs["source_trial"]) >= 0 for t in current_runs(promoted)
    )


def failed_searched_runs(promoted: optuna.Study | None) -> tuple[int, int]:
    """Of the runs (recipe, seed, budget) of searched recipes that `promoted` (a search's
    `promoted_study`) tried and no try finished: how many, and how many of those diverged on
    some try ((0, 0) where there is no such study)."""
    if promoted is None:
        return 0, 0
    failed = unfinished_failures(promoted, lambda t: t.params["source_trial"] >= 0)
    return len(failed), sum(map(diverged, failed))


def weights_dir_for(url: str, name: str) -> Path:
    """Where promoted students' weights go: beside an SQLite file, else under ./studies/."""
    path = sqlite_file(url)
    return (path.parent if path else Path("studies")) / promoted_name(name)
