"""`kdsearch promote`: the best trials at full budget over several seeds."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.commands.common import (
    note_unfinished_search,
    prepare_teacher,
    refuse_other_kdsearch,
    study_storage,
    use_ray_token,
)
from kdsearch.display import RunsStatus, console, leaderboard_table
from kdsearch.errors import KdsearchError

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from kdsearch.promote import Run
    from kdsearch.search.worker import JobResult


def cmd_promote(args: argparse.Namespace) -> int:
    """Re-train the best trials at full budget over several seeds, and the baselines."""
    refuse_other_kdsearch(Path.cwd())
    if args.address not in (None, "auto"):
        use_ray_token(os.environ)  # before Ray is imported
    from kdsearch.space import short_promotion
    from kdsearch.study.contents import base_recipe, load_study, space_config
    from kdsearch.study.storage import storage_errors

    storage, url = study_storage(args.study, args.storage)
    with storage_errors(storage):
        study = load_study(storage, args.study)
        space = space_config(study)
        cfg = space.promote
        top_k = args.top_k or (cfg.top_k if cfg else 3)
        seeds = args.seeds or (cfg.seeds if cfg else 3)
        epochs = args.epochs or (cfg.epochs if cfg else None)
        if args.epochs:
            what = "--epochs"
        elif epochs:
            what = "the search's promote.epochs"  # checked at load too, by a kdsearch that does
        else:
            what = "the base recipe's schedule.epochs"
        fix = f"pass --epochs {space.asha.max_epochs} or more"
        if short := short_promotion(what, epochs or base_recipe(study).schedule.epochs, space, fix):
            raise KdsearchError(short)
        note_unfinished_search(storage, url, args.study, "promotes")
    return 0 if run_promotion(storage, url, args.study, top_k, seeds, epochs, args.address) else 1


def run_promotion(
    storage: BaseStorage,
    url: str,
    name: str,
    top_k: int,
    seeds: int,
    epochs: int | None,
    address: str | None,
    here: dict[str, Any] | None = None,
) -> bool:
    """Promote, with a line per finished run, then print the leaderboard; whether a run of a
    searched recipe is recorded finished at the promotion's budget (not: every one failed).
    `here`: this machine's settings (`promote.plan`)."""
    from kdsearch.promote import finished_keys, leaderboard, promote, weights_dir_for
    from kdsearch.study.contents import promoted_name
    from kdsearch.study.storage import redact, storage_errors

    weights_dir = weights_dir_for(url, name)
    status = RunsStatus()
    searched: list[str] = []  # the keys of the plan's runs of searched recipes
    at = ""  # the plan's budget, as the first line says it

    def on_plan(runs: list[Run], todo: int) -> None:
        nonlocal at
        searched[:] = [r.key for r in runs if r.source_trial >= 0]
        found = len({r.source_trial for r in runs if r.source_trial >= 0})
        if found == top_k:
            trials = "best trial" if found == 1 else f"top {top_k} trials"
        else:
            trials = f"{found} COMPLETE trial{'s' * (found > 1)}"
        fewer = "" if found == top_k else f" (all its distinct recipes; {top_k} asked for)"
        planned = runs[0].recipe.schedule.epochs
        at = f"{planned} epochs" if epochs else f"the base recipe's {planned} epochs"
        console.print(
            f"promoting the {trials} of {name!r}{fewer} with {seeds} seed{'s' * (seeds > 1)}, "
            f"next to the student alone and plain KD, at {at}; runs to train: {todo}, recorded "
            f"before: {len(runs) - todo}"
        )
        status.total = todo

    def on_epoch(run: Run, epoch: int, val_acc: float) -> None:
        status.epoch(f"{run.label} seed {run.seed}", epoch, run.recipe.schedule.epochs, val_acc)

    def on_run(run: Run, result: JobResult) -> None:
        status.done(f"{run.label} seed {run.seed}")
        if result.failure:
            console.print(f"  {run.label} seed {run.seed}: failed: {result.failure}")
        else:
            console.print(
                f"  {run.label} seed {run.seed}: val {100 * result.val_acc:.2f}%  "
                f"test {100 * result.test_acc:.2f}%  ({result.seconds:.0f} s)"
            )

    try:
        promoted = promote(  # which fails in one line where the storage does, saying what it kept
            storage,
            name,
            top_k=top_k,
            seeds=seeds,
            epochs=epochs,
            weights_dir=weights_dir,
            address=address,
            on_plan=on_plan,
            on_run=on_run,
            on_epoch=on_epoch,
            prepare=prepare_teacher,
            here=here,
        )
    finally:
        status.close()
    with storage_errors(storage):
        board = leaderboard(promoted)
        if not board.empty:  # every run failed: their lines above say why
            console.print(leaderboard_table(board))
        console.print(
            f"runs recorded in study {promoted_name(name)!r} of {redact(url)}; the students' "
            f"weights in {weights_dir}/"
        )
        if finished_keys(promoted) & set(searched):
            return True
    console.print(f"every run of the searched recipes failed at {at}: nothing is promoted")
    return False
