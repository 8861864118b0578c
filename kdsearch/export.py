"""Export: the winner of a study as a folder a production training job runs as is.

recipe.yaml           the complete recipe; `kdsearch train DIR/recipe.yaml` reproduces it
student.pt            the student's state dict alone (heads dropped), for the bare architecture
teacher.pt            the teacher the student learned from (when a term reads one), which
                      recipe.yaml names as `teacher.checkpoint`
teacher.heads.pt      its HSAKD/SSKD heads (when a term reads them): `teacher.heads.checkpoint`
meta.json             study and its storage, trial, seeds, metrics, teacher files, versions of
                      kdsearch and its libraries
hyperparameters.json  the recipe as a flat {"dotted.path": value} map, for other stacks

The teacher's files are copied only if their weights are those the promotion recorded: a student
exported with another teacher than its own would not train again to the same weights.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdsearch import __version__
from kdsearch.data import ImageData
from kdsearch.distill import needs_teacher_heads
from kdsearch.errors import KdsearchError, StudyError
from kdsearch.models import build_model
from kdsearch.paths import (
    moved_into_place,
    remove_empty,
    staged_for,
    staging_path,
    writable_folder,
    write_errors,
)
from kdsearch.promote import (
    current_runs,
    distinct_best,
    diverged,
    failed_runs,
    has_promoted,
    leaderboard,
    run_budget,
)
from kdsearch.recipe import Recipe, flatten
from kdsearch.study.contents import (
    base_recipe,
    load_study,
    machine_settings,
    promoted_study,
    ranked,
    recorded,
    space_config,
    trial_recipe,
)
from kdsearch.study.storage import sqlite_file, storage_place
from kdsearch.teacher import TeacherFiles, weights_digest

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

TEACHER_FILE = "teacher.pt"
HEADS_FILE = "teacher.heads.pt"
EXPORT_FILES = frozenset(
    {"recipe.yaml", "student.pt", TEACHER_FILE, HEADS_FILE, "meta.json", "hyperparameters.json"}
)


@dataclass(frozen=True)
class Winner:
    """The best recipe of a study, where it comes from, its trained weights if any, and the
    teacher those learned from, where the promotion recorded it (without a promotion: the
    teacher the search's trials learned from, where the search recorded it)."""

    recipe: Recipe
    base: Recipe  # the study's base recipe: the search's (and the promotion's) teacher
    source: str  # "promoted" or "search"
    trial: int
    metrics: dict[str, Any]
    weights: Path | None
    seeds: list[int] = field(default_factory=list)
    threads: int | None = None  # CPU threads the weights were trained with, where recorded
    teacher: TeacherFiles | None = None
    data_fingerprint: str | None = None  # of the data the promoted weights trained on
    inputs: dict[str, Any] | None = None  # what that data gave them (channels, mean, ...)
    failed_seeds: list[int] = field(default_factory=list)  # at the budget, not tried again
    diverged_seeds: list[int] = field(default_factory=list)  # those of them that diverged
    planned_seeds: int | None = None  # the most seeds a promotion at its budget asked for
    rank: int | None = None  # the promoted recipe's trial's place among the search's best
    # trials of the search ranked above that one that no promotion at its budget has tried
    # (finished since it ran, or it stopped before them)
    passed_over: list[int] = field(default_factory=list)
    # trials ranked above it whose recipe the promotion at its budget tried and no seed finished
    all_failed: list[int] = field(default_factory=list)
    device: str | None = None  # the device type the weights (or the trial) trained on, if recorded
    precision: str | None = None  # the precision they trained in there (`auto` resolved), likewise
    onednn_cap: str | None = None  # the cap on oneDNN's instruction set there ("": none), likewise


def find_winner(storage: BaseStorage, name: str, here: Mapping[str, Any] | None = None) -> Winner:
    """The promoted recipe with the best mean validation accuracy over seeds (its best seed's
    weights); without a promotion, the best COMPLETE trial of the search (no weights yet).
    `here`: this machine's settings (`machine_settings`; default: those the promoted weights
    trained with, on the machine that holds them, else the study's base recipe's)."""
    study = load_study(storage, name)
    recorded(study, "space")  # a search study, not a promoted one or another tool's
    base = base_recipe(study)
    searched_keys = space_config(study).space
    promoted = promoted_study(storage, name)
    if promoted is not None and has_promoted(promoted):
        board = leaderboard(promoted)
        searched = board[board["source_trial"] >= 0]
        best = searched.iloc[0]
        source = int(best["source_trial"])
        runs = [t for t in current_runs(promoted) if int(t.user_attrs["source_trial"]) == source]
        failed = [t for t in failed_runs(promoted) if int(t.user_attrs["source_trial"]) == source]
        top = max(runs, key=lambda t: (float(t.value or 0.0), -int(t.user_attrs["seed"])))
        trained = Recipe.from_yaml(str(top.user_attrs["recipe"]))
        if here is None:
            here = machine_settings(trained, searched_keys)
        # ranked as the promotion ranked them: one trial of each recipe
        budget = {
            "schedule.epochs": trained.schedule.epochs,
            "schedule.milestones": trained.schedule.milestones,
        }
        above: list[int] = []  # the search's recipes ranked above the winner's
        rank = None
        for number in distinct_best(study.trials, {**budget, **here}):
            if number == source:
                rank = len(above) + 1
                break
            above.append(number)
        if rank is None:  # the winner's trial is not among them: none is known to rank above
            above = []
        on_board = set(board["source_trial"])
        tried = {
            int(t.user_attrs["source_trial"])
            for t in promoted.trials
            if run_budget(t) == int(best["epochs"])
        }
        metrics = {
            "val_acc_mean": best["val_mean"] / 100,
            "val_acc_sd": best["val_sd"] / 100,
            "test_acc_mean": best["test_mean"] / 100,
            "test_acc_sd": best["test_sd"] / 100,
            "runs": {
                f"seed {t.user_attrs['seed']}": {
                    "val_acc": t.value,
                    "test_acc": t.user_attrs["test_acc"],
                }
                for t in sorted(runs, key=lambda t: int(t.user_attrs["seed"]))
            },
            "exported_seed": int(top.user_attrs["seed"]),
            "baselines": {
                str(r["recipe"]): {
                    "val_acc_mean": r["val_mean"] / 100,
                    "test_acc_mean": r["test_mean"] / 100,
                }
                for _, r in board[board["source_trial"] < 0].iterrows()
            },
        }
        return Winner(
            trained.override(here),
            base.override(here),
            "promoted",
            source,
            metrics,
            Path(str(top.user_attrs["weights"])),
            sorted(int(t.user_attrs["seed"]) for t in runs),
            int(top.user_attrs["threads"]) if "threads" in top.user_attrs else None,
            TeacherFiles.from_attrs(top.user_attrs),
            top.user_attrs.get("data_fingerprint"),  # absent from older promotions
            top.user_attrs.get("inputs"),
            sorted(int(t.user_attrs["seed"]) for t in failed),
            sorted(int(t.user_attrs["seed"]) for t in failed if diverged(t)),
            promoted.user_attrs.get(f"seeds:{int(best['epochs'])}"),
            rank,
            [n for n in above if n not in tried],
            [n for n in above if n in tried and n not in on_board],
            top.user_attrs.get("device"),  # absent from older promotions
            top.user_attrs.get("precision"),  # absent from older promotions
            top.user_attrs.get("onednn_cap"),  # likewise
        )
    best_trials = ranked(study.trials)
    if not best_trials:
        raise StudyError(f"study {name!r} has no COMPLETE trial to export")
    best_trial = best_trials[0]
    if here is None:
        here = machine_settings(base, searched_keys)
    base = base.override(here)
    recipe = trial_recipe(best_trial).override(here)
    metrics = {"search_val_acc": best_trial.value, "epochs": best_trial.user_attrs.get("epochs")}
    threads = best_trial.user_attrs.get("threads")  # absent from studies of older versions
    return Winner(
        recipe,
        base,
        "search",
        best_trial.number,
        metrics,
        None,
        [recipe.seed],
        None if threads is None else int(threads),
        TeacherFiles.from_attrs(study.user_attrs.get("teacher_files") or {}),
        device=best_trial.user_attrs.get("device"),
        precision=best_trial.user_attrs.get("precision"),
        onednn_cap=best_trial.user_attrs.get("onednn_cap"),
    )


def export(
    winner: Winner,
    name: str,
    url: str,
    out: Path,
    weights: dict[str, torch.Tensor],
    data: ImageData,
    teacher: TeacherFiles | None,
    *,
    teacher_checked: bool = True,
    option: str = "--out",
) -> None:
    """Write the files of an export of study `name` (in the storage at `url`) into `out` (a
    previous export of the same study may be replaced; anything else there is refused, so
    nothing is lost). `teacher`: the files of the
    teacher the student learned from, None when no term reads a teacher; `teacher_checked`:
    whether their hashes are the ones recorded when the student trained; `option`: what set
    `out`, as an error names it.

    Every file is written beside its place first and moved there only when all are ready,
    meta.json last: a failure or Ctrl-C leaves the folder as it was."""
    check_out(out, name, url, option)
    promoted = winner.source == "promoted"
    model = build_model(winner.recipe.student.arch, data.num_classes, data.channels)
    model.load_state_dict(weights)  # the bare architecture must take the weights as they are
    if teacher is not None and teacher.heads is None and needs_teacher_heads(winner.recipe):
        raise KdsearchError(
            "the winner's terms read the teacher's heads, but no heads file was recorded with "
            "its teacher; search again in a new study (`kdsearch run SPACE --study NAME`) and "
            "promote that"
        )
    copies: dict[str, tuple[Path, str] | None] = {TEACHER_FILE: None, HEADS_FILE: None}
    if teacher is not None:
        copies[TEACHER_FILE] = (teacher.weights, teacher.digest)
        if teacher.heads is not None and teacher.heads_digest is not None:
            copies[HEADS_FILE] = (teacher.heads, teacher.heads_digest)
    # The exported teacher, or none: never a path of the machine that searched.
    recipe = winner.recipe.override(
        {
            "teacher.checkpoint": TEACHER_FILE if copies[TEACHER_FILE] else None,
            "teacher.heads.checkpoint": HEADS_FILE if copies[HEADS_FILE] else None,
        },
        source="export",
    )
    meta = {
        "study": name,
        "storage": storage_place(url),
        "source": winner.source,
        "trial": winner.trial,
        "seeds": winner.seeds,
        "failed_seeds": winner.failed_seeds,
        "planned_seeds": winner.planned_seeds,
        "threads": winner.threads,
        "device": winner.device,  # the type it trained on; None where not recorded
        "precision": winner.precision,  # what it trained in there; None where not recorded
        "onednn_cap": winner.onednn_cap,  # the cap on oneDNN it trained under ("": none), likewise
        "metrics": winner.metrics,
        "student": winner.recipe.student.arch,
        "teacher": winner.recipe.teacher.arch,
        "teacher_files": {
            file: {"digest": source[1], "copied_from": str(source[0]), "checked": teacher_checked}
            for file, source in copies.items()
            if source is not None
        },
        "data": winner.recipe.data.dataset,
        # the data the weights trained on: the promotion's (null where an older one did not
        # record it), else this machine's, on which the search's winner trained just now
        "data_fingerprint": winner.data_fingerprint if promoted else data.fingerprint,
        "inputs": winner.inputs if promoted and winner.inputs else data.inputs(),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions(),
    }
    created = [p for p in (out, *out.parents) if not p.exists()]  # the folder's, and above
    out.mkdir(parents=True, exist_ok=True)
    for leftover in filter(_leftover, out.iterdir()):
        leftover.unlink()
    staged: dict[str, Path] = {}
    try:
        with write_errors(f"{option} {out}"):
            _stage(staged, copies, out, recipe, weights, meta)
    except BaseException:  # refused, failed or interrupted: nothing of this export is left
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise
    # all at once (a Ctrl-C half-way would leave a folder no rerun may replace), in order:
    # meta.json, which names the export, last
    moved_into_place([(tmp, out / file) for file, tmp in staged.items()])
    for file, source in copies.items():  # then an earlier export's teacher, which it no longer
        if source is None:  # names: a kill before this leaves a spare file, not a lost one
            (out / file).unlink(missing_ok=True)


def _stage(
    staged: dict[str, Path],
    copies: dict[str, tuple[Path, str] | None],
    out: Path,
    recipe: Recipe,
    weights: Mapping[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Write every file of the export beside its place in `out`, each named in `staged` as
    soon as it exists (so that the caller removes them all if one fails)."""
    for file, source in copies.items():
        if source is not None:
            staged[file] = _copy_checked(*source, out / file)
    staged["recipe.yaml"] = staging_path(out / "recipe.yaml")
    staged["recipe.yaml"].write_text(recipe.to_yaml())
    staged["student.pt"] = staging_path(out / "student.pt")
    torch.save({k: v.cpu() for k, v in weights.items()}, staged["student.pt"])
    staged["hyperparameters.json"] = staging_path(out / "hyperparameters.json")
    flat = flatten(recipe.to_dict())
    staged["hyperparameters.json"].write_text(json.dumps(flat, indent=2) + "\n")
    staged["meta.json"] = staging_path(out / "meta.json")
    staged["meta.json"].write_text(json.dumps(meta, indent=2, default=float) + "\n")


def _leftover(path: Path) -> bool:
    """A file an export killed before it could clean up staged (`staging_path`), and nothing else
    (older versions named them without the random part)."""
    return staged_for(path) in EXPORT_FILES and path.is_file()


def _copy_checked(source: Path, digest: str, dest: Path) -> Path:
    """A copy of `source` beside `dest` (not yet in its place), if the weights in it hash to
    `digest`: the teacher file the student learned from, not one trained again or replaced."""
    if not source.is_file():
        raise KdsearchError(
            f"the teacher file the exported student learned from is not at {source} (moved, or "
            "promoted on another machine); put it back there, or export on the machine that "
            "promoted"
        )
    try:  # a file that cannot be read is its own fault, not the export folder's
        src = source.open("rb")
    except OSError as err:
        raise KdsearchError(f"cannot read the teacher file {source} ({err.strerror})") from None
    tmp = staging_path(dest)
    try:
        with src, tmp.open("wb") as copy:
            shutil.copyfileobj(src, copy)
        found = weights_digest(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if found != digest:
        tmp.unlink()
        raise KdsearchError(
            f"{source} is not the teacher file the exported student learned from (its hash is "
            f"{found}, the promotion recorded {digest}): it was trained again or replaced "
            "since; put the original back, or search again in a new study (`kdsearch run "
            "SPACE --study NAME`) and promote that"
        )
    return tmp


def check_out(out: Path, name: str, url: str, option: str = "--out") -> None:
    """Refuse, before any training, a folder an export of study `name` in the storage at `url`
    must not write into: a file, a place that cannot be written, or a folder holding anything
    but an earlier export of the same study (of that name, in that storage: studies take the
    name of their space file, so two databases often hold one of the same name). `option`:
    what set `out` (`--out`, a space file's `export.dir`), as the error names it; a folder that
    is, or will be, where the study's SQLite file is kept too (a search writes it after this
    check, and an export beside it would be refused only then)."""
    writable_folder(out, option)
    file = sqlite_file(url)
    if file is not None and file.resolve().is_relative_to(out.resolve()):
        raise KdsearchError(
            f"{option} {out} is where the study's database is kept ({file}); an export needs a "
            "folder of its own, so choose another"
        )
    if out.is_dir() and any(not _leftover(p) for p in out.iterdir()):
        try:
            previous = json.loads((out / "meta.json").read_text())
        except (OSError, ValueError):
            previous = {}
        if not isinstance(previous, dict) or previous.get("study") != name:
            raise KdsearchError(
                f"{option} {out} already holds files that are not an export of study "
                f"{name!r}; choose another folder"
            )
        place = storage_place(url)
        if previous.get("storage", place) != place:  # an export before kdsearch recorded it
            raise KdsearchError(
                f"{option} {out} holds an export of another study named {name!r}, the one in "
                f"{previous['storage']} (this one is in {place}); choose another folder, or "
                "remove that export if it is not wanted (a database moved since counts as "
                "another)"
            )


def versions() -> dict[str, str]:
    """Versions of kdsearch, Python and the libraries a result depends on."""
    found = {"kdsearch": __version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "optuna", "ray", "numpy"):
        found[package] = version(package)
    return found
