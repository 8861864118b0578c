"""The commands of the `kdsearch` CLI; each takes the parsed arguments and returns an exit code.

Heavy modules (torch, Ray) are imported inside the commands, after the input is checked, so a
mistake in a recipe or a space is reported at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.live import Live
from rich.text import Text

from kdsearch import __version__
from kdsearch.display import (
    RunsStatus,
    console,
    epoch_progress,
    leaderboard_table,
    print_whole,
    results,
    search_status,
    status_line,
    trials_view,
)
from kdsearch.errors import KdsearchError, RecipeError, StudyError
from kdsearch.paths import (
    placed_files,
    remove_empty,
    replaced_whole,
    run_files,
    writable_file,
    writable_folder,
    write_errors,
)
from kdsearch.recipe import Recipe, empty_section, flatten, leaf_changes, load_yaml
from kdsearch.space import (  # not kdsearch.study's promoted_name: that imports Optuna
    NAME_MAX,
    PROMOTED,
    search_name_problem,
    study_name_problem,
)

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import optuna
    import pandas as pd
    from optuna.storages import BaseStorage

    from kdsearch.data import ImageData
    from kdsearch.promote import Run
    from kdsearch.search import JobResult
    from kdsearch.space import SearchSpace
    from kdsearch.study import Record, Tally
    from kdsearch.teacher import Teacher, TeacherFiles


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`path=value` pairs; each value is read as YAML, so `6`, `true`, `[1, 2]` keep their types,
    and a mapping sets the keys it names (`optim={lr: 0.1}` is `optim.lr=0.1`)."""
    changes: dict[str, Any] = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise KdsearchError(
                f"--set {item!r}: expected PATH=VALUE, e.g. distill.kd.temperature=6"
            )
        value = load_yaml(text, source=f"--set {path}")
        if empty := empty_section(path.strip(), value):
            raise KdsearchError(
                f"--set {item}: {empty} is an empty mapping, which changes nothing; name the "
                f"keys to change ({empty}.KEY=VALUE)"
            )
        for key, leaf in leaf_changes({path.strip(): value}).items():
            if key in changes:  # the last would win without a word
                raise KdsearchError(
                    f"--set {key} given twice ({changes[key]!r}, then {leaf!r}); give it once"
                )
            changes[key] = leaf
    return changes


def load_recipe(path: str, sets: Sequence[str]) -> Recipe:
    """A recipe file with the command line's `--set` overrides applied."""
    recipe = Recipe.load(path)
    if not sets:
        return recipe
    # paths given on the command line: relative to the working folder
    return recipe.override(parse_sets(sets), source="--set").resolve_paths(Path.cwd())


def prepare_teacher(
    recipe: Recipe, data: ImageData, heads: bool, record: Record | None = None
) -> Teacher:
    """The recipe's teacher (and its heads when asked), with progress while either trains.
    With `record` (a search resumed or joined), a teacher or heads file its trials learned
    from that this machine would have to train again is refused before the training: trained
    again, weights need not hash the same (on a GPU they never do), and `same_teacher` would
    refuse them only after hours."""
    from kdsearch.teacher import cached_teacher_path, get_teacher, teacher_heads_path, with_heads

    if record is not None and recipe.teacher.checkpoint is None:
        not_retrained(record, cached_teacher_path(recipe, data), heads=False)
    with epoch_progress("teacher", recipe.teacher.train.epochs) as report:
        teacher = get_teacher(recipe, data, report, heads=False)
    if heads:
        path = teacher_heads_path(recipe, data, teacher)  # hashes a checkpoint teacher: once
        if record is not None and recipe.teacher.heads.checkpoint is None:
            not_retrained(record, path, heads=True)
        with epoch_progress("teacher heads", recipe.teacher.heads.epochs) as heads_report:
            teacher = with_heads(recipe, data, teacher, report=heads_report, path=path)
    return teacher


def not_retrained(record: Record, path: Path, *, heads: bool) -> None:
    """Refuse where the study records the teacher file (with `heads`: its heads' file) its
    trials learned from, and `path`, where this machine would find it cached, holds nothing."""
    recorded = record.study.user_attrs.get("teacher_files", {})
    part = "heads_" if heads else ""
    if f"teacher_{part}file" not in recorded or path.is_file():
        return
    what, key = (
        ("teacher's heads", "teacher.heads.checkpoint")
        if heads
        else ("teacher", "teacher.checkpoint")
    )
    source = Path(str(recorded[f"teacher_{part}file"]))
    learned = (
        f"study {record.study.study_name!r}: its trials learned from the {what} in {source} "
        f"(weights hash {recorded[f'teacher_{part}digest']}), "
    )
    retrain = (
        "trained again here it need not hash the same, and would be refused after its training"
    )
    way_out = f"or name it with --set {key}=FILE, or search in a new study (--study NAME)"
    if source == path.absolute():  # this machine's own cache, emptied since
        raise StudyError(
            f"{learned}which is gone from this machine; {retrain}: put a copy of it back at "
            f"{path}, {way_out}"
        )
    raise StudyError(
        f"{learned}and this machine has no copy at {path}; {retrain}: copy that file to {path}, "
        f"{way_out}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train one student from a recipe and write recipe.yaml, metrics.json and student.pt."""
    recipe = load_recipe(args.recipe, args.set)  # before the heavy imports: bad input fails fast
    import torch

    from kdsearch.data import load_data
    from kdsearch.distill import needs_teacher, needs_teacher_heads
    from kdsearch.teacher import refuse_missing_checkpoints
    from kdsearch.train import autocast_dtype, evaluate_split, resolve_device, train

    if needs_teacher(recipe):
        refuse_missing_checkpoints(recipe)

    out = (
        Path(args.out)
        if args.out
        else Path("studies/runs") / f"{run_name(args.recipe)}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    writable_folder(out, "--out")
    held = run_files(out) if out.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise KdsearchError(f"--out {out} already holds files ({shown}); choose another folder")
    device = resolve_device(recipe.device)
    dtype = autocast_dtype(recipe.precision, device)
    console.print(
        f"kdsearch {__version__}: {recipe.teacher.arch} -> {recipe.student.arch} on "
        f"{recipe.data.dataset}, {device.type}, {dtype or torch.float32}"
    )
    with console.status("loading data"):
        data = load_data(
            recipe.data, progress=lambda what, done, total: console.print(f"{what}: {done}/{total}")
        )
    console.print(
        f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
        f"{data.channels}x{data.image_size}x{data.image_size}, {data.num_classes} classes"
    )
    exported = export_meta(Path(args.recipe))
    if (searched := exported.get("data_fingerprint")) not in (None, data.fingerprint):
        console.print(
            f"note: these are not the images or splits the exported student in "
            f"{Path(args.recipe).parent} trained on (data fingerprint {data.fingerprint[:12]}, "
            f"there {str(searched)[:12]}); its meta.json's accuracies do not carry over",
        )
    teacher = None
    if needs_teacher(recipe):
        teacher = prepare_teacher(recipe, data, needs_teacher_heads(recipe))
        console.print(
            f"teacher {recipe.teacher.arch} ({teacher.source}, {teacher.path}): "
            f"val acc {100 * teacher.val_acc:.2f}%"
            + (f"; its heads: {teacher.heads_path}" if teacher.heads_path else "")
        )
        if (replaced := replaced_teacher(Path(args.recipe), exported, teacher.path)) is not None:
            console.print(
                f"note: {teacher.path} is not the teacher the exported student in "
                f"{Path(args.recipe).parent} learned from (weights hash {replaced[0]}, there "
                f"{replaced[1]}); its meta.json's accuracies do not carry over"
            )
    with epoch_progress("student", recipe.schedule.epochs) as report:
        result = train(
            recipe,
            data,
            report,
            teacher=teacher.model if teacher else None,
            teacher_heads=teacher.heads if teacher else None,
        )
    test_acc, test_loss = evaluate_split(result.student, data.test, data, recipe)
    metrics = {
        "val_acc": result.val_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "epochs": len(result.history),
        "seconds": round(result.seconds, 2),
        "images_per_sec": round(result.images_per_sec, 1),
        "student_params": result.params,
        "device": str(device),
        "precision": str(dtype or torch.float32),
        "teacher": None
        if teacher is None
        else {
            "arch": recipe.teacher.arch,
            "source": teacher.source,
            "path": str(teacher.path),
            "val_acc": teacher.val_acc,
            **({"heads_path": str(teacher.heads_path)} if teacher.heads_path else {}),
        },
        "history": [vars(s) for s in result.history],
        "inputs": data.inputs(),  # what serving the student needs: size, normalisation, classes
        "kdsearch": __version__,
    }

    def write(folder: Path) -> None:
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        weights = {k: v.cpu() for k, v in result.student.state_dict().items()}
        torch.save(weights, folder / "student.pt")

    with write_errors(f"--out {out}"):
        written = placed_files(out, write)
    if written != out:
        console.print(f"note: another run wrote into {out} while this one trained")
    console.print(
        f"student {recipe.student.arch}: val acc {100 * result.val_acc:.2f}%, "
        f"test acc {100 * test_acc:.2f}%; wrote {written}/recipe.yaml, metrics.json, student.pt"
    )
    return 0


# what a promotion's baselines train (`kdsearch.promote.plan`), by their label there
BASELINE_TERMS = {
    "student alone": "every distill weight but ce's at 0",
    "plain KD": "every distill weight but ce's and kd's at 0",
}


def run_name(recipe: str) -> str:
    """What names a run of `recipe` by default: its file's name, but an export's `recipe.yaml`
    its folder's (the runs of two exports are told apart)."""
    path = Path(recipe).resolve()
    return path.parent.name if path.name == "recipe.yaml" and path.parent.name else path.stem


def cmd_run(args: argparse.Namespace) -> int:
    """Search a space: trials on Ray Tune with ASHA, every one recorded in an Optuna study."""
    refuse_other_kdsearch(Path.cwd())
    if args.address not in (None, "auto"):
        use_ray_token(os.environ)  # before Ray is imported
    from kdsearch.space import SearchSpace
    from kdsearch.study import (
        Record,
        default_storage,
        machine_settings,
        open_storage,
        redact,
        refuse_foreign,
        retuned_settings,
        sqlite_file,
    )
    from kdsearch.teacher import refuse_missing_checkpoints

    changes = parse_sets(args.set)
    space = SearchSpace.load(args.space, changes)
    refuse_missing_checkpoints(space.base)  # before the data loads, and before the study
    for idle in space.idle_settings():
        console.print(f"note: {space.source}: {idle}")
    for ignored in space.searched_changes(changes):
        console.print(f"note: {ignored}")
    name = args.study or space.config.study.name
    if not args.resume and (problem := search_name_problem(name)):  # before any file is made
        raise KdsearchError(problem)  # (one --resume would start: `Record` refuses it)
    target = args.trials or space.config.search.trials
    at_once = f"{space.config.search.concurrent} at a time (on the cluster's resources)"
    if args.address is None or args.check:  # refuse a request Ray cannot meet before any work
        at_once = fitted_trials(space, args.address)
    given = args.storage or space.config.study.storage
    url = storage_url(given or default_storage(name))
    if space.config.export is not None:  # now, not after the search
        from kdsearch.export import check_out

        check_out(Path(space.config.export.dir), name, url, export_option(space))
    if args.check:  # every check made before the study opens, and nothing written
        console.print(
            f"{space.source}: checked: {len(space.params)} parameter"
            f"{'s' * (len(space.params) != 1)}, {target} trial{'s' * (target != 1)} of at most "
            f"{space.config.asha.max_epochs} epochs, {at_once}, for study {name!r} in "
            f"{redact(url)}; the data, the teacher and the study are first read when it runs"
        )
        return 0
    file = sqlite_file(url)
    made: list[Path] = []  # ./studies where this command makes it, once nothing has refused
    if file is not None and not given and not file.parent.exists():
        file.parent.mkdir(exist_ok=True)
        made.append(file.parent)
    new_file = file is not None and not file.exists()
    if file is not None and file.is_file():
        refuse_foreign(file, empty_ok=True)
    try:
        record = Record(open_storage(url), name, space, target=target, resume=args.resume)
    except BaseException:
        if new_file and file is not None:  # a refused run leaves no file (that a later
            forget_if_empty(file)  # `trials NAME` would find before the right one)
            remove_empty(made)
        raise
    if args.resume and record.created:  # a typo in --study would otherwise pass unseen
        console.print(f"note: no study {name!r} in {redact(url)} yet, so --resume starts it")
    resumed = password_hidden(url) if args.storage else ""  # after the --resume command
    try:
        with record.alive():
            held = len(record.study.trials)
            if record.all_started():  # --resume of a finished search, or --trials at most it holds
                console.print(
                    f"kdsearch {__version__}: study {name!r} in {redact(url)} already holds {held} "
                    f"trials ({target} asked for); none to run"
                )
                tally, seconds, complete = record.tally(), 0.0, True
                target = max(target, held)
            else:
                target = max(target, held)  # --trials below what it holds: its orphans run
                if retuned := retuned_settings(record.study, space):
                    console.print(
                        f"note: study {name!r} was searched with other settings "
                        f"({'; '.join(retuned)}); the trials still to run are stopped and "
                        "proposed by this run's, and the finished ones stay as they were"
                    )
                console.print(
                    f"kdsearch {__version__}: study {name!r} in {redact(url)}: {target} trials "
                    f"({held - record.tally().running} finished before, {len(record.orphans)} to "
                    f"run again), at most {space.config.asha.max_epochs} epochs each"
                )
                finish = f"`{resume_command(args, url)}`{resumed}"
                record.record_options(
                    {
                        "space": str(Path(args.space).resolve()),
                        "study": args.study,
                        "trials": args.trials,
                        "set": list(args.set),
                        "address": args.address,
                    }
                )
                tally, seconds, complete = search_trials(
                    args, space, record, file, new_file, made, target, finish
                )
    except KeyboardInterrupt:  # a second Ctrl-C (Tune waits on the first only), or one as
        # the search ended: the resume line, where the study kept what this run began
        with suppress(Exception):
            if record.study.get_trials(deepcopy=False):
                console.print(
                    f"stopped; `{resume_command(args, url)}`{resumed} finishes the search"
                )
        raise
    console.print(status_line(tally, target) + f" in {seconds:.0f} s")
    for line in tally.failures[-5:]:
        console.print(f"  failed {line}")
    finished = tally.complete + tally.pruned + tally.failed
    if not complete:
        console.print(
            f"stopped with {finished} of {target} trials finished; "
            f"`{resume_command(args, url)}`{resumed} finishes the search",
        )
        return 130
    if tally.running:
        others = (
            "1 trial of other drivers is"
            if tally.running == 1
            else f"{tally.running} trials of other drivers are"
        )
        console.print(f"this driver is done; {others} still running in the study")
    console.print(
        f"study {name!r}: {redact(url)} (`kdsearch dashboard {redact(url)}`{password_hidden(url)})"
    )
    if not tally.complete and not tally.running:
        console.print("no trial completed, so there is no result to promote or export")
        return 1
    if tally.running and (space.config.promote or space.config.export):
        # from the trials finished so far, the best might not be the search's: the last
        # driver to finish promotes and exports (or, should it be gone, the user)
        hidden = password_hidden(url) if given else ""
        console.print(
            "so this driver leaves the space's promotion and export to the driver that "
            "finishes the search last (if its space file has them); should none, run "
            f"{left_to_user(args, space, url)}{hidden} once it is done",
        )
        return 0
    # this driver's data folder, device, teacher files: the study records the base recipe of
    # whichever driver joined it last, perhaps on another machine
    here = machine_settings(space.base, space.params)
    try:
        if space.config.promote is not None:
            p = space.config.promote
            if not run_promotion(
                open_storage(url), url, name, p.top_k, p.seeds, p.epochs, args.address, here
            ):
                if space.config.export is not None:
                    console.print("so the space's export is not done")
                return 1
        if space.config.export is not None:
            out = Path(space.config.export.dir)
            run_export(open_storage(url), url, name, out, here, export_option(space))
    except KeyboardInterrupt:  # the search is done; say how to finish what follows it
        cfg = space.config
        steps = [w for w, on in (("promotion", cfg.promote), ("export", cfg.export)) if on]
        kept = " (the promotion runs already finished are kept)" if cfg.promote else ""
        console.print(
            f"stopped after the search; `{resume_command(args, url)}`{resumed} does the "
            f"space's {' and '.join(steps)}{kept}"
        )
        raise
    return 0


def export_option(space: SearchSpace) -> str:
    """What names a search's export folder, in an error about it."""
    return f"{space.source}: export.dir"


def left_to_user(args: argparse.Namespace, space: SearchSpace, url: str) -> str:
    """The commands that do the space's promotion and export as `kdsearch run` would."""
    from kdsearch.study import redact

    name = args.study or space.config.study.name
    named = args.storage or space.config.study.storage  # else the default, which they find
    storage = f" --storage {shlex.quote(redact(url))}" if named else ""
    address = f" --address {shlex.quote(args.address)}" if args.address else ""  # its cluster
    commands = []
    if (p := space.config.promote) is not None:
        epochs = f" --epochs {p.epochs}" if p.epochs else ""
        commands.append(
            f"kdsearch promote {name}{storage}{address} --top-k {p.top_k} --seeds {p.seeds}"
            + epochs
        )
    if (e := space.config.export) is not None:
        commands.append(f"kdsearch export {name}{storage} --out {shlex.quote(e.dir)}")
    return " and ".join(f"`{c}`" for c in commands)


def same_teacher(record: Record, files: TeacherFiles) -> None:
    """Record in the study the teacher files its trials learn from, or, where a driver before
    recorded them, refuse other ones: one study, one teacher."""
    recorded = record.study.user_attrs.get("teacher_files")
    if recorded is None:
        record.study.set_user_attr("teacher_files", files.attrs())
    elif problem := files.changed_since(recorded):
        raise StudyError(
            f"study {record.study.study_name!r}: {problem}; put that file back, or search in a "
            "new study (--study NAME)"
        )


def fitted_trials(space: SearchSpace, address: str | None) -> str:
    """Check that a trial of `space` fits a node of this machine's Ray, or of the cluster at
    `address` (joined and left here: `--check`); say so where fewer than `search.concurrent`
    fit at once, and return how many run at a time, where."""
    from kdsearch.search import (
        cluster_nodes,
        local_resources,
        machine_choices,
        start_ray,
        stop_ray,
        trial_resources,
    )

    if address is None:
        nodes, where = local_resources(), "this machine"
    else:
        with console.status(Text(f"joining the Ray cluster at {address}")):
            start_ray(address)
        try:
            nodes = cluster_nodes()
        finally:
            stop_ray()
        where = f"the cluster's {len(nodes)} node{'s' * (len(nodes) != 1)}"
    cpu, gpu = trial_resources(
        space.config.search, nodes, **machine_choices(space), source=space.source
    )
    room = sum(
        min(node.get("CPU", 0.0) // cpu, node.get("GPU", 0.0) // gpu if gpu else math.inf)
        for node in nodes
    )
    if (concurrent := space.config.search.concurrent) > room:
        has = "have" if len(nodes) > 1 else "has"
        console.print(
            f"note: {space.source}: search.concurrent is {concurrent}, but {where} {has} room "
            f"for {room:.0f} trial{'s' * (room > 1)} at once ({cpu:g} CPU{'s' * (cpu != 1)}"
            f"{f' and {gpu:g} GPU' if gpu else ''} each), so {room:.0f} run at a time"
        )
    return f"{min(concurrent, room):.0f} at a time on {where}"


def search_trials(
    args: argparse.Namespace,
    space: SearchSpace,
    record: Record,
    file: Path | None,
    new_file: bool,
    made: list[Path],
    target: int,
    resume: str,
) -> tuple[Tally, float, bool]:
    """Load the data, prepare the teacher and run the trials: the tally, seconds, and whether
    every trial this driver started has finished; `resume` is the command that finishes them.
    `new_file`: whether this command made the SQLite `file`, `made`: the folders it made for
    it."""
    from kdsearch.data import load_data
    from kdsearch.losses import LOSSES
    from kdsearch.search import (
        active_terms,
        machine_choices,
        run_search,
        start_ray,
        stop_ray,
        trial_resources,
    )
    from kdsearch.teacher import TeacherFiles

    try:
        if args.address is not None:  # join the cluster first: a wrong address costs no work
            # Text: a spinner's words are read as markup whatever the console's setting, and
            # an address such as [fe80::1]:6379 would lose its brackets
            with console.status(Text(f"joining the Ray cluster at {args.address}")):
                start_ray(args.address)
            trial_resources(space.config.search, **machine_choices(space), source=space.source)
        with console.status("loading data"):
            data = load_data(space.base.data)
        terms = active_terms(space)
        teacher = None
        if any(LOSSES[t].needs_teacher for t in terms):
            heads = any(LOSSES[t].has_teacher_heads for t in terms)
            teacher = prepare_teacher(space.base, data, heads, record)
            console.print(
                f"teacher {space.base.teacher.arch} ({teacher.source}): "
                f"val acc {100 * teacher.val_acc:.2f}%"
            )
            same_teacher(record, TeacherFiles.of(teacher, heads))
        record.record_settings()  # once the data and the teacher have passed
        with Live(console=console, refresh_per_second=2, transient=True) as live:
            outcome = run_search(
                space,
                record,
                data,
                teacher,
                address=args.address,
                status=search_status(live, target),
                resume=resume,
            )
    except BaseException:
        # Failed before its first trial (no data, Ctrl-C while the teacher trains): take back
        # the SQLite study this command created, and its file, so a rerun starts clean. (Not
        # on a shared server: another driver may have joined the study and be preparing.)
        with suppress(Exception):  # the error that stopped the search is the one to show
            if file is not None and record.discard_if_unused() and new_file:
                file.unlink(missing_ok=True)
                remove_empty(made)
        raise
    finally:
        if args.address is not None:
            stop_ray()
    return outcome.tally, outcome.seconds, outcome.complete


def forget_if_empty(file: Path) -> None:
    """Remove the SQLite `file` this command created, where it holds no study after all."""
    from kdsearch.study import holds_no_study

    if file.is_file() and holds_no_study(file):
        with suppress(OSError):  # the error that refused the run is the one to show
            file.unlink()


def password_hidden(url: str) -> str:
    """' (its password hidden)' to follow a printed command whose storage URL `redact` has
    shortened, else ''."""
    from kdsearch.study import redact

    return " (its password hidden)" if redact(url) != url else ""


def resume_command(args: argparse.Namespace, url: str) -> str:
    """The command that finishes this search: the same options, and --resume."""
    from kdsearch.study import redact

    return run_resumed(
        args.space, args.study, args.storage and redact(url), args.trials, args.address, args.set
    )


def run_resumed(
    space: str,
    study: str | None,
    storage: str | None,
    trials: int | None,
    address: str | None,
    sets: Sequence[str],
) -> str:
    """`kdsearch run SPACE` with the options given (those that are not None), and --resume."""
    parts = ["kdsearch", "run", space]
    for option, value in (
        ("--study", study),
        ("--storage", storage),
        ("--trials", trials and str(trials)),
        ("--address", address),
    ):
        if value:
            parts += [option, value]
    for item in sets:
        parts += ["--set", item]
    return shlex.join([*parts, "--resume"])


def storage_url(given: str) -> str:
    """A --storage value as a URL: an SQLAlchemy URL as it is, a file's path as
    sqlite:///ABSOLUTE_PATH."""
    return given if "://" in given else f"sqlite:///{Path(given).expanduser().resolve()}"


def study_file(study: str) -> Path:
    """./studies/<study>.db; for a promoted study without a file of its own, the search's,
    where `promote` records it."""
    own = Path("studies") / f"{study}.db"
    search = Path("studies") / f"{study.removesuffix(PROMOTED)}.db"
    return search if not own.is_file() and search.is_file() else own


def storage_option(study: str, url: str) -> str:
    """` --storage URL` (its password hidden) for a command on `study` in the storage at `url`,
    or nothing where that is the storage the command finds by itself (`study_file`)."""
    from kdsearch.study import redact, storage_place

    found = storage_place(f"sqlite:///{study_file(study)}")
    return "" if storage_place(url) == found else f" --storage {shlex.quote(redact(url))}"


def study_storage(study: str, given: str | None) -> tuple[BaseStorage, str]:
    """The storage of an existing study and its URL: `given` (a URL or an SQLite file), else
    `study_file`."""
    if given is None:
        if len(study.removesuffix(PROMOTED)) > NAME_MAX:  # no study file can have such a
            # name: one line, no OSError (a promoted study's is its search's file)
            raise KdsearchError(str(study_name_problem(study)))
        path = study_file(study)
        if not path.is_file():
            raise KdsearchError(
                f"no study database at {path} ({studies_here()}); pass --storage URL"
            )
        given = f"sqlite:///{path}"
    url = storage_url(given)
    return existing_storage(url), url


def studies_here(shown: int = 8) -> str:
    """What ./studies holds, for a study name that names no file there (a typo, or a command
    run from another folder than the search's)."""
    folder = Path("studies")
    if not folder.is_dir():
        return "no studies/ folder here: a search keeps its study in studies/ where it ran"
    names = sorted(f.stem for f in folder.glob("*.db"))
    if not names:
        return "studies/ holds no study database"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"studies/ holds {', '.join(names[:shown])}{more}"


def existing_storage(url: str) -> BaseStorage:
    """The storage at `url`, which holds studies already: a missing SQLite file, or one that is
    not Optuna's, is an error, where opening it would silently make it a study database."""
    from kdsearch.study import open_storage, refuse_foreign, sqlite_file

    file = sqlite_file(url)
    if file is not None and file.is_dir():
        raise KdsearchError(f"{file} is a folder, not a study database")
    if file is not None and not file.is_file():
        raise KdsearchError(f"no study database at {file}")
    if file is not None:
        refuse_foreign(file, empty_ok=False)
    return open_storage(url)


def cmd_promote(args: argparse.Namespace) -> int:
    """Re-train the best trials at full budget over several seeds, and the baselines."""
    refuse_other_kdsearch(Path.cwd())
    if args.address not in (None, "auto"):
        use_ray_token(os.environ)  # before Ray is imported
    from kdsearch.space import short_promotion
    from kdsearch.study import base_recipe, load_study, space_config

    storage, url = study_storage(args.study, args.storage)
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
    note_search_running(storage, args.study, "promotes")
    return 0 if run_promotion(storage, url, args.study, top_k, seeds, epochs, args.address) else 1


def note_search_running(storage: BaseStorage, name: str, does: str) -> None:
    """Say so where another process searches study `name` now: what `does` (promotes,
    exports) the best trials so far is not the search's last word."""
    from kdsearch.study import searching_now

    if drivers := searching_now(storage, name):
        more = f" and {len(drivers) - 1} more" if len(drivers) > 1 else ""
        console.print(
            f"note: {name!r} is still being searched (by {drivers[0]}{more}); this {does} its "
            "best trials so far, and once the search ends they may be others"
        )


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
    from kdsearch.study import promoted_name, redact

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
        promoted = promote(
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


def cmd_export(args: argparse.Namespace) -> int:
    """Write the winner as a folder: its recipe, student, teacher, metadata, hyperparameters."""
    storage, url = study_storage(args.study, args.storage)
    run_export(storage, url, args.study, Path(args.out))
    return 0


def run_export(
    storage: BaseStorage,
    url: str,
    name: str,
    out: Path,
    here: dict[str, Any] | None = None,
    option: str = "--out",
) -> None:
    """Export the winner of study `name` in `storage` (at `url`) and the teacher it learned
    from; without a promotion, train the winning trial's recipe once first, against the
    search's teacher. `here`: this machine's settings (`export.find_winner`); `option`: what
    set `out`, as an error names it."""
    import torch

    from kdsearch.data import load_data
    from kdsearch.distill import needs_teacher, needs_teacher_heads
    from kdsearch.export import HEADS_FILE, TEACHER_FILE, check_out, export, find_winner
    from kdsearch.promote import failed_searched_runs, first_run, leaderboard
    from kdsearch.study import promoted_name, promoted_study
    from kdsearch.teacher import TeacherFiles
    from kdsearch.train import evaluate_split, train

    check_out(out, name, url, option)
    hidden = password_hidden(url)  # after each command the notes print with --storage
    promoted = promoted_name(name)
    winner = find_winner(storage, name, here)
    note_search_running(storage, name, "exports")
    # weights trained on the CPU where the recipe's device here is not (a search or promotion
    # with `per_trial: {gpu: 0}` on a GPU machine): retrained and reproduced on the CPU too
    on_cpu = winner.device == "cpu" and device_type(winner.recipe.device) != "cpu"
    data = load_data(winner.recipe.data)
    heads = needs_teacher_heads(winner.recipe)
    files = winner.teacher
    checked = True
    # a baseline that did better than the exported recipe, and how: named once the export is
    # written, with the command that trains its first run from the exported recipe
    better: list[tuple[str, str]] = []
    if winner.weights is not None:
        if not winner.weights.is_file():
            raise KdsearchError(
                f"the promoted student's weights are not at {winner.weights} (moved, or "
                f"promoted on another machine); put {winner.weights.parent.name}/ back there, "
                "or export on the machine that promoted"
            )
        weights = torch.load(winner.weights, map_location="cpu", weights_only=True)
        if winner.data_fingerprint not in (None, data.fingerprint):
            console.print(
                "note: the promoted student trained on other images or splits than this machine "
                f"loads for {winner.recipe.data.dataset} (data fingerprint "
                f"{str(winner.data_fingerprint)[:12]}, here {data.fingerprint[:12]}); meta.json "
                "records the promotion's",
            )
        if files is None and needs_teacher(winner.recipe):
            files = unrecorded_teacher(winner.base, data, heads)
            checked = False
    else:
        if winner.threads is not None:  # the trial's thread count: the trial's own student
            torch.set_num_threads(winner.threads)
        console.print(
            f"nothing promoted: training the best trial (#{winner.trial}) of {name!r} "
            "once to export its student"
        )
        promotion = promoted_study(storage, name)
        failed, bad = failed_searched_runs(promotion)
        if failed and promotion is not None:  # not "nothing": nothing finished
            console.print(
                f"note: no run of a searched recipe has finished in the promotion ({failed} "
                f"failed, {bad} of them diverged; `kdsearch trials {promoted}"
                f"{storage_option(promoted, url)}`{hidden} says why); no promotion confirms "
                "this trial's score, which is from the search's budget"
            )
            board = leaderboard(promotion)  # the baselines that finished there, to weigh it against
            better += [
                (
                    str(row["recipe"]),
                    f"finished in the promotion, {row['val_mean']:.2f}% on validation at "
                    f"{row['epochs']} epochs (mean of {row['seeds']} seeds)",
                )
                for _, row in board[board["source_trial"] < 0].iterrows()
            ]
        teacher, files = None, None
        if needs_teacher(winner.recipe):
            teacher = prepare_teacher(winner.base, data, heads)  # the search's own teacher
            files = TeacherFiles.of(teacher, heads)
            if winner.teacher and (problem := files.changed_since(winner.teacher.attrs())):
                console.print(
                    f"note: {problem}; the search chose this recipe against that teacher, and "
                    "the exported student learns from this one",
                )
        trained = winner.recipe.override({"device": "cpu"}) if on_cpu else winner.recipe
        with epoch_progress("winner", trained.schedule.epochs) as report:
            result = train(
                trained,
                data,
                report,
                teacher=teacher.model if teacher else None,
                teacher_heads=teacher.heads if teacher else None,
            )
        winner.metrics.update(
            val_acc=result.val_acc,
            test_acc=evaluate_split(result.student, data.test, data, trained)[0],
        )
        winner = replace(winner, device=device_type(trained.device))  # where these trained
        weights = result.student.state_dict()
    export(winner, name, url, out, weights, data, files, teacher_checked=checked, option=option)
    # the promotion that trains the winner's missing seeds: a bare `promote` plans the space's
    # (or the default) top-k, seeds and epochs, perhaps another budget altogether
    tried = len(winner.seeds) + len(winner.failed_seeds)
    top_k = f" --top-k {winner.rank}" if winner.rank else ""
    again = (
        f"`kdsearch promote {name}{storage_option(name, url)}{top_k} --seeds "
        f"{max(tried, winner.planned_seeds or 0)} --epochs {winner.recipe.schedule.epochs}`"
        + hidden
    )
    why = f"`kdsearch trials {promoted}{storage_option(promoted, url)}`{hidden} says why"
    epochs = winner.recipe.schedule.epochs
    if lost := [s for s in winner.failed_seeds if s not in winner.diverged_seeds]:
        console.print(
            f"note: {numbered('seed', lost)} of the winner "
            f"failed at {epochs} epochs ({why}; {again} tries them again); its mean is over the "
            "seeds that finished",
        )
    if gone := winner.diverged_seeds:  # the recipe's and seed's doing, not the machine's
        console.print(
            f"note: {numbered('seed', gone)} of the winner "
            f"diverged at {epochs} epochs, its loss non-finite ({why}); its mean is over the "
            "seeds that finished, and a try again with the same seed, on the CPU with the same "
            "thread count, diverges the same way",
        )
    if winner.planned_seeds and tried < winner.planned_seeds:
        console.print(
            f"note: the winner's mean is over {len(winner.seeds)} of the "
            f"{winner.planned_seeds} seeds a promotion asked for (interrupted, or a promotion "
            f"at this budget with fewer seeds or other recipes); {again} "
            "trains the rest, then export again",
        )
    if winner.passed_over:  # a search resumed after its promotion, say: its winner is not ours
        one = len(winner.passed_over) == 1
        console.print(
            f"note: {numbered('trial', winner.passed_over, '#')} of the search scored higher "
            f"there than the exported recipe's (#{winner.trial}) "
            f"and no promotion at {epochs} epochs has trained "
            f"{'it' if one else 'them'} ({'it' if one else 'they'} finished after the promotion "
            f"ran, or it stopped first); {again} does, then export again"
        )
    if winner.all_failed:
        one = len(winner.all_failed) == 1
        console.print(
            f"note: {numbered('trial', winner.all_failed, '#')} of the search scored higher "
            f"there than the exported recipe's (#{winner.trial}), but "
            f"{'its recipe' if one else 'their recipes'} finished no seed at {epochs} epochs "
            f"({why})"
        )
    better += [
        (
            baseline,
            f"scored higher on validation ({100 * scores['val_acc_mean']:.2f}% against "
            f"{100 * winner.metrics['val_acc_mean']:.2f}%) than the best searched recipe, "
            "which is exported all the same",
        )
        for baseline, scores in winner.metrics.get("baselines", {}).items()
        if scores["val_acc_mean"] > winner.metrics["val_acc_mean"]
    ]
    for baseline, what in better:
        how = f"`kdsearch train` the base recipe with {BASELINE_TERMS[baseline]}"
        if (run := first_run(promoted_study(storage, name), baseline)) is not None:
            trained_as = Recipe.from_yaml(str(run.user_attrs["recipe"]))
            command = train_command(
                out / "recipe.yaml",
                trained_as,
                threads=run.user_attrs.get("threads"),
                cpu=run.user_attrs.get("device") == "cpu"
                and device_type(winner.recipe.device) != "cpu",
            )
            how = f"`{command}` trains its seed {trained_as.seed} run again"
        console.print(f"note: {baseline} {what}; for {baseline}, {how}")
    threads = "" if winner.threads is None else f"OMP_NUM_THREADS={winner.threads} "
    written = ["recipe.yaml", "student.pt"]
    if files is not None:
        written += [TEACHER_FILE] + ([HEADS_FILE] if files.heads else [])
    recipe_path = shlex.quote(f"{out}/recipe.yaml") + (" --set device=cpu" if on_cpu else "")
    console.print(
        f"exported the winner of {name!r} ({winner.source} #{winner.trial}) to {out}/: "
        f"{', '.join([*written, 'meta.json', 'hyperparameters.json'])}; "
        f"`{threads}kdsearch train {recipe_path}` reproduces it on a machine like this one"
    )


def train_command(file: Path, wanted: Recipe, *, threads: int | None, cpu: bool) -> str:
    """`kdsearch train FILE` with the `--set` items that make the recipe in `file` train as
    `wanted` (not its settings of the machine, which `file` has as this one needs them), with
    the `threads` it trained with and, where it trained on the CPU of a machine whose device
    is not (`cpu`), on the CPU."""
    from kdsearch.study import PER_MACHINE

    have, want = flatten(Recipe.load(file).to_dict()), flatten(wanted.to_dict())
    sets = []
    for key in sorted(want.keys() - PER_MACHINE):
        if want[key] != have.get(key):
            text = json.dumps(want[key])  # YAML reads JSON's numbers, lists, null and strings
            if isinstance(want[key], str) and bare(key, want[key]):
                text = want[key]  # a bare word, as a user writes it
            sets.append(f" --set {shlex.quote(f'{key}={text}')}")
    if cpu:
        sets.append(" --set device=cpu")
    pinned = "" if threads is None else f"OMP_NUM_THREADS={threads} "
    return f"{pinned}kdsearch train {shlex.quote(str(file))}{''.join(sets)}"


def bare(key: str, text: str) -> bool:
    """Whether `--set KEY=TEXT` sets KEY to the string `text` itself."""
    try:
        return bool(parse_sets([f"{key}={text}"])[key] == text)
    except KdsearchError:
        return False


def numbered(word: str, items: Sequence[int], mark: str = "") -> str:
    """`word`, in the plural for more than one, and the `items` marked: "seed 2", "trials #1,
    #4"."""
    return f"{word}{'s' * (len(items) > 1)} " + ", ".join(f"{mark}{i}" for i in items)


def device_type(name: str) -> str | None:
    """The type of device a recipe's `device` is here; None where it names one not here."""
    from kdsearch.train import resolve_device

    try:
        return resolve_device(name).type
    except RecipeError:
        return None


def export_meta(recipe_file: Path) -> dict[str, Any]:
    """The meta.json of the export holding `recipe_file`; empty for a recipe that is not in an
    export. Here, not in kdsearch.export, which writes it: `train` should not import Ray to
    read it."""
    try:
        found = json.loads((recipe_file.parent / "meta.json").read_text())
    except (OSError, ValueError):  # no meta.json, not JSON
        return {}
    return found if isinstance(found, dict) else {}


def replaced_teacher(recipe_file: Path, meta: dict[str, Any], path: Path) -> tuple[str, str] | None:
    """Where the teacher at `path` is a file of the export holding `recipe_file` whose weights
    hash otherwise than its meta.json records (the file replaced since): both hashes."""
    from kdsearch.teacher import weights_digest

    files = meta.get("teacher_files")
    for name, recorded in files.items() if isinstance(files, dict) else ():
        if not isinstance(recorded, dict) or not isinstance(recorded.get("digest"), str):
            continue
        if (recipe_file.parent / str(name)).resolve() == path.resolve():
            here = weights_digest(path)
            return (here, recorded["digest"]) if here != recorded["digest"] else None
    return None


def unrecorded_teacher(base: Recipe, data: ImageData, heads: bool) -> TeacherFiles:
    """The files of the teacher a promotion by an earlier kdsearch trained against, which it did
    not record: the base recipe's, as this machine has it, never trained here (a teacher
    trained now would not be the students')."""
    from kdsearch.teacher import (
        TeacherFiles,
        cached_teacher_path,
        get_teacher,
        teacher_heads_path,
        with_heads,
    )

    missing = (
        "the promotion recorded no teacher file (an earlier kdsearch promoted it), and the "
        "teacher it trained against{} is not on this machine; export on the machine that promoted"
    )
    if base.teacher.checkpoint is None and not cached_teacher_path(base, data).is_file():
        raise KdsearchError(missing.format(""))
    teacher = get_teacher(base, data, heads=False)  # loaded, not trained
    if heads:
        if not teacher_heads_path(base, data, teacher).is_file():
            raise KdsearchError(missing.format("'s heads"))
        teacher = with_heads(base, data, teacher)
    console.print(
        "note: the promotion recorded no teacher file (an earlier kdsearch promoted it); "
        "exporting the teacher of the study's base recipe on this machine, unchecked "
        '(meta.json: "checked": false)'
    )
    return TeacherFiles.of(teacher, heads)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve optuna-dashboard on a study storage until Ctrl-C."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    given = args.storage
    named = study_file(given.removesuffix(".db"))  # `digits` or `digits.db`: studies/digits.db
    if "://" not in given and not Path(given).is_file():
        if named.is_file():
            given = str(named)  # a study name, as the other commands take
        elif Path(given).name == given and not Path(given).is_dir():  # a bare name: say both
            # places it was looked for (a folder is refused as one below)
            raise KdsearchError(f"no study database at {named} or {Path(given).resolve()}")
    storage = existing_storage(storage_url(given))
    from optuna_dashboard import wsgi  # a second of imports: after a mistyped STORAGE is refused

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """One line per request would bury the address; stay quiet."""

    try:
        server = make_server(args.host, args.port, wsgi(storage), handler_class=Quiet)
    except OSError as err:
        raise KdsearchError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    print(
        f"optuna-dashboard: http://{args.host}:{server.server_port}/dashboard/ (Ctrl-C stops)",
        flush=True,
    )
    serve_until_stopped(server)
    return 0


def serve_until_stopped(server: WSGIServer) -> None:
    """Serve requests on a thread of their own until Ctrl-C or SIGTERM. Served on this thread, a
    stop that lands while a request is handled is swallowed by wsgiref's error handler, and the
    server serves on."""
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    with suppress(KeyboardInterrupt):  # from the start: the thread may serve a request (and a
        serving.start()  # stop land) before `start` returns to this one
        while serving.is_alive():
            serving.join(0.5)
    if serving.is_alive():  # it serves, or is about to: shutdown waits for it to stop
        server.shutdown()
    server.server_close()


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML report of a study."""
    from kdsearch.report import TITLE, build_report, search_study
    from kdsearch.study import ranked, sqlite_file

    storage, url = study_storage(args.study, args.storage)
    # refused before anything is written
    study = search_study(storage, args.study, lambda study: storage_option(study, url))
    option = "--out"
    if args.out is None:  # beside its study, as a promotion's weights: one per study
        file = sqlite_file(url)
        out = (file.parent if file else Path("studies")) / f"{args.study}-report.html"
        option = "the default report file"
        if not out.parent.exists():  # ./studies, for a study on a server
            out.parent.mkdir()
    else:
        out = Path(args.out)
    writable_file(out, option)
    replaceable(out, option, "a kdsearch report", lambda head: f"<title>{TITLE}" in head)
    page = build_report(storage, args.study)
    with write_errors(f"{option} {out}"), replaced_whole(out, follow_link=True) as tmp:
        tmp.write_text(page, encoding="utf-8")
    note = "" if ranked(study.trials) else f"; study {args.study!r} has no COMPLETE trial yet"
    size = out.stat().st_size  # a page of a few lines, without figures, is under a KiB
    shown = f"{size:,} bytes" if size < 10 * 1024 else f"{size // 1024:,} KiB"
    console.print(f"wrote {out} ({shown}, opens offline){note}")
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    """Print the trials of a study as a table, or write them as CSV (`-`: to stdout); a
    promoted study's runs as their leaderboard."""
    from kdsearch.report import trials_table
    from kdsearch.study import is_promotion, left_running, load_study

    if args.csv and args.csv != "-":
        writable_file(Path(args.csv), "--csv")
        replaceable(
            Path(args.csv), "--csv", "a table kdsearch wrote", lambda h: h.startswith(CSV_HEADS)
        )
    storage, url = study_storage(args.study, args.storage)
    study = load_study(storage, args.study)
    if is_promotion(study.user_attrs):
        show_promoted(study, args.csv)
        return 0
    # a CSV has a column for every parameter of the space: one file of a search has the
    # columns of another's, whatever their trials sampled
    table = trials_table(study, by_value=args.sort == "value", unsampled=bool(args.csv))
    searched = "space" in study.user_attrs  # a kdsearch search, not another tool's study
    if args.csv:
        write_csv(table, args.csv, "trials")
    elif table.empty:
        console.print(f"study {args.study!r} holds no trials yet")
    else:
        print_whole(results, trials_view(table, accuracy=searched))
    if searched and (stopped := left_running(storage, args.study, study.trials)):
        one = len(stopped) == 1
        console.print(
            f"note: {numbered('trial', stopped, '#')} {'is' if one else 'are'} RUNNING in the "
            "study, but the search that ran "
            f"{'it' if one else 'them'} has stopped (Ctrl-C, or killed); "
            f"`{recorded_resume(study.user_attrs, args.study, url)}`{password_hidden(url)} runs "
            f"{'it' if one else 'them'} again",
            soft_wrap=True,
        )
    return 0


def recorded_resume(attrs: Mapping[str, Any], name: str, url: str) -> str:
    """The command that resumes the search of study `name`, from the options its latest driver
    recorded (`Record.record_options`; a study searched before they were: SPACE for its file,
    and no other options)."""
    from kdsearch.study import redact

    options = attrs.get("run_options", {})
    space = options.get("space")
    if space is not None and Path(space).is_relative_to(Path.cwd()):
        space = str(Path(space).relative_to(Path.cwd()))
    storage = redact(url) if storage_option(name, url) else None
    return run_resumed(
        space or "SPACE",
        options.get("study", name),  # None: the run named none (the space's)
        storage,
        options.get("trials"),
        options.get("address"),
        options.get("set", []),
    )


def show_promoted(promoted: optuna.Study, csv: str | None) -> None:
    """A promoted study: its leaderboard as `promote` ends with it, then the runs it leaves out
    (failed at its budget and not finished by a later try, or at another budget); with `csv`,
    every run."""
    from kdsearch.promote import board_budget, failed_line, failed_runs, leaderboard, runs_table

    runs = runs_table(promoted)
    if csv:
        write_csv(runs, csv, "runs")
        return
    board = leaderboard(promoted)
    if board.empty:
        console.print(f"study {promoted.study_name!r}: no promoted run has finished yet")
    else:
        print_whole(results, leaderboard_table(board))
    # with the table, where `> FILE` keeps them, one line each whatever the width (for grep)
    for run in failed_runs(promoted):
        results.print(failed_line(run), soft_wrap=True)
    budget = board_budget(promoted)
    other = runs[(runs["state"] == "COMPLETE") & (runs["budget"] != budget)]
    if budget is not None and len(other):
        budgets = ", ".join(str(b) for b in sorted(set(other["budget"])))
        results.print(
            f"{len(other)} finished runs at other budgets ({budgets} epochs) are not in this "
            "table; `--csv -` lists every run",
            soft_wrap=True,
        )


CSV_HEADS = ("number,state,", "recipe,source_trial,")  # trials_table's, runs_table's columns


def replaceable(path: Path, option: str, what: str, ours: Callable[[str], bool]) -> None:
    """Refuse to write over a file that is not empty and not an earlier output of the same
    command (`ours` of its first 4 KiB): `--out recipe.yaml` is a slip, not a wish to lose the
    recipe."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    if not ours(head):
        raise KdsearchError(
            f"{option} {path} already holds a file that is not {what}; move it or name another"
        )


def write_csv(table: pd.DataFrame, dest: str, rows: str) -> None:
    """A pandas table as CSV to file `dest` (whole or not at all), or to stdout for `-`."""
    if dest == "-":
        table.to_csv(sys.stdout, index=False)
    else:
        with write_errors(f"--csv {dest}"), replaced_whole(Path(dest), follow_link=True) as tmp:
            table.to_csv(tmp, index=False)
        console.print(f"wrote {len(table)} {rows} to {dest}")


def refuse_other_kdsearch(cwd: Path) -> None:
    """Ray's workers import from the driver's working directory first: refuse a kdsearch there
    other than the one running (a checkout of another version), whose code every trial would
    run instead, failing on recipes this one writes."""
    theirs, ours = cwd / "kdsearch", Path(__file__).resolve().parent
    if not (theirs / "__init__.py").is_file() or theirs.resolve() == ours:
        return
    if _sources(theirs) != _sources(ours):
        raise KdsearchError(
            f"{theirs} is another kdsearch than the one running ({ours}), and Ray's workers "
            "would import it from the working directory; run kdsearch from another directory"
        )


def _sources(package: Path) -> dict[Path, bytes]:
    return {f.relative_to(package): f.read_bytes() for f in sorted(package.rglob("*.py"))}


def use_ray_token(env: MutableMapping[str, str]) -> None:
    """Clusters started with `ray start` check a token that Ray loads by itself only for
    `--address auto`; for an explicit address, turn token mode on when a token is at hand. Ray
    reads this setting when it is first imported, so this runs before kdsearch.search is."""
    if "RAY_AUTH_MODE" in env:
        return
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_TOKEN" in env or token_file.is_file():
        env["RAY_AUTH_MODE"] = "token"
