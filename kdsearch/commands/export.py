"""`kdsearch export`: the winner as a folder a production job trains from."""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.commands.common import (
    device_type,
    loaded_data,
    note_unfinished_search,
    numbered,
    parse_sets,
    password_hidden,
    prepare_teacher,
    storage_option,
    student_trained,
    study_storage,
)
from kdsearch.display import console
from kdsearch.errors import KdsearchError
from kdsearch.recipe import Recipe, flatten

LIKE_HERE = "a machine like this one"  # where an export's command gives its weights again

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from torch import Tensor

    from kdsearch.data import ImageData
    from kdsearch.export import Winner
    from kdsearch.teacher import TeacherFiles

# what a promotion's baselines train (`kdsearch.promote.plan`), by their label there
BASELINE_TERMS = {
    "student alone": "every distill weight but ce's at 0",
    "plain KD": "every distill weight but ce's and kd's at 0",
}


def cmd_export(args: argparse.Namespace) -> int:
    """Write the winner as a folder: its recipe, student, teacher, metadata, hyperparameters."""
    from kdsearch.study.storage import storage_errors

    storage, url = study_storage(args.study, args.storage)
    with storage_errors(storage):
        run_export(storage, url, args.study, Path(args.out))
    return 0


def run_export(
    storage: BaseStorage,
    url: str,
    name: str,
    out: Path,
    here: dict[str, Any] | None = None,
    option: str = "--out",
    *,
    after_search: bool = False,
) -> None:
    """Export the winner of study `name` in `storage` (at `url`) and the teacher it learned
    from; without a promotion, train the winning trial's recipe once first, against the
    search's teacher. `here`: this machine's settings (`export.find_winner`); `option`: what
    set `out`, as an error names it; `after_search`: `kdsearch run`'s export, which follows a
    search it has seen finish (nothing to note of it)."""
    from kdsearch.distill import needs_teacher_heads
    from kdsearch.export import HEADS_FILE, TEACHER_FILE, check_out, export, find_winner

    check_out(out, name, url, option)
    winner = find_winner(storage, name, here)
    if not after_search:
        note_unfinished_search(storage, url, name, "exports")
    # weights trained on the CPU where the recipe's device here is not (a search or promotion
    # with `per_trial: {gpu: 0}` on a GPU machine): retrained and reproduced on the CPU too
    on_cpu = winner.device == "cpu" and device_type(winner.recipe.device) != "cpu"
    data = loaded_data(winner.recipe.data)
    heads = needs_teacher_heads(winner.recipe)
    if winner.weights is not None:
        weights, files, checked = promoted_student(winner.weights, winner, data, heads)
        better: list[tuple[str, str]] = []
    else:
        winner, weights, files, better = trial_student(storage, url, name, winner, data, on_cpu)
        checked = True
    export(winner, name, url, out, weights, data, files, teacher_checked=checked, option=option)
    note_seeds_and_trials(winner, name, url)
    note_better_baselines(storage, name, out, winner, better)
    env = "" if winner.threads is None else f"OMP_NUM_THREADS={winner.threads} "
    if cap := cap_set(winner.device, winner.onednn_cap):  # its kernels, its weights
        env += f"ONEDNN_MAX_CPU_ISA={cap} "
    written = ["recipe.yaml", "student.pt"]
    if files is not None:
        written += [TEACHER_FILE] + ([HEADS_FILE] if files.heads else [])
    recipe_path = shlex.quote(f"{out}/recipe.yaml") + (" --set device=cpu" if on_cpu else "")
    where = reproduced_on(winner.recipe, on_cpu, winner.device, winner.precision, winner.onednn_cap)
    console.print(
        f"exported the winner of {name!r} ({winner.source} #{winner.trial}) to {out}/: "
        f"{', '.join([*written, 'meta.json', 'hyperparameters.json'])}; "
        f"`{env}kdsearch train {recipe_path}` reproduces it on {where}"
    )


def promoted_student(
    path: Path, winner: Winner, data: ImageData, heads: bool
) -> tuple[dict[str, Tensor], TeacherFiles | None, bool]:
    """The promoted `winner`'s student weights (in `path`), the teacher files it learned from,
    and whether the promotion recorded those (a promotion by a kdsearch that did not: this
    machine's teacher for its base recipe, with `heads`, unchecked)."""
    import torch

    from kdsearch.distill import needs_teacher

    if not path.is_file():
        raise KdsearchError(
            f"the promoted student's weights are not at {path} (moved, or promoted on another "
            f"machine); put {path.parent.name}/ back there, or export on the machine that "
            "promoted"
        )
    weights = torch.load(path, map_location="cpu", weights_only=True)
    if winner.data_fingerprint not in (None, data.fingerprint):
        console.print(
            "note: the promoted student trained on other images, splits or normalisation "
            f"than this machine loads for {winner.recipe.data.dataset} (data fingerprint "
            f"{str(winner.data_fingerprint)[:12]}, here {data.fingerprint[:12]}); meta.json "
            "records the promotion's",
        )
    if winner.teacher is None and needs_teacher(winner.recipe):
        return weights, unrecorded_teacher(winner.base, data, heads), False
    return weights, winner.teacher, True


def trial_student(
    storage: BaseStorage, url: str, name: str, winner: Winner, data: ImageData, on_cpu: bool
) -> tuple[Winner, dict[str, Tensor], TeacherFiles | None, list[tuple[str, str]]]:
    """The best trial of study `name`, nothing promoted, trained once at its budget (on the
    CPU where `on_cpu`) against the search's teacher: the `winner` with its scores and how it
    trained, its student weights, the teacher files, and the promotion's baselines that
    finished (a promotion whose searched recipes all failed), each with how it scored."""
    import torch

    from kdsearch.distill import needs_teacher, needs_teacher_heads
    from kdsearch.promote import failed_searched_runs, leaderboard
    from kdsearch.study.contents import promoted_name, promoted_study
    from kdsearch.teacher import TeacherFiles
    from kdsearch.train import (
        arithmetic,
        evaluate_split,
        kernel_cap,
        recorded_cap,
        resolve_device,
        trained_precision,
    )

    if winner.threads is not None:  # the trial's thread count: the trial's own student
        torch.set_num_threads(winner.threads)
    console.print(
        f"nothing promoted: training the best trial (#{winner.trial}) of {name!r} "
        "once to export its student"
    )
    promotion = promoted_study(storage, name)
    failed, bad = failed_searched_runs(promotion)
    better: list[tuple[str, str]] = []
    if failed and promotion is not None:  # not "nothing": nothing finished
        promoted = promoted_name(name)
        console.print(
            f"note: no run of a searched recipe has finished in the promotion ({failed} "
            f"failed, {bad} of them diverged; `kdsearch trials {promoted}"
            f"{storage_option(promoted, url)}`{password_hidden(url)} says why); no promotion "
            "confirms this trial's score, which is from the search's budget"
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
        heads = needs_teacher_heads(winner.recipe)
        teacher = prepare_teacher(winner.base, data, heads)  # the search's own teacher
        files = TeacherFiles.of(teacher, heads)
        if winner.teacher and (problem := files.changed_since(winner.teacher.attrs())):
            console.print(
                f"note: {problem}; the search chose this recipe against that teacher, and "
                "the exported student learns from this one",
            )
    trained = winner.recipe.override({"device": "cpu"}) if on_cpu else winner.recipe
    device = resolve_device(trained.device)  # where these train, and how
    precision, cap = trained_precision(trained, device), kernel_cap(device)
    # `auto` resolved otherwise for the trial, or it trained under another oneDNN cap
    was_cap = recorded_cap(winner.onednn_cap)
    if winner.precision not in (None, precision) or was_cap not in (None, cap):
        was = arithmetic(winner.precision, was_cap)
        console.print(
            f"note: trial #{winner.trial} trained {was} "
            f"and this run trains {arithmetic(precision, cap)} (`precision: "
            f"{trained.precision}` here), so the exported student is not the trial's own; "
            "export where and as the search ran for that"
        )
    result = student_trained("winner", trained, data, teacher)
    winner.metrics.update(
        val_acc=result.val_acc,
        test_acc=evaluate_split(result.student, data.test, data, trained)[0],
    )
    winner = replace(winner, device=device.type, precision=precision, onednn_cap=cap)
    return winner, result.student.state_dict(), files, better


def note_seeds_and_trials(winner: Winner, name: str, url: str) -> None:
    """Notes on the promoted `winner` of study `name`: seeds of it that failed, diverged or
    never ran, and better trials of the search that no promotion at its budget has trained,
    each with the `kdsearch promote` or `kdsearch trials` to run."""
    from kdsearch.study.contents import promoted_name

    hidden, promoted = password_hidden(url), promoted_name(name)
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


def note_better_baselines(
    storage: BaseStorage, name: str, out: Path, winner: Winner, better: list[tuple[str, str]]
) -> None:
    """A note for each baseline of the promotion (plain KD, the student alone) that did better
    than the exported recipe, `better` (those found already, each with how it did) and those
    whose mean beat the winner's, with the command that trains its first run from the exported
    recipe in `out`."""
    from kdsearch.promote import first_run
    from kdsearch.study.contents import promoted_study

    better = better + [
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
            attrs = run.user_attrs
            cpu = attrs.get("device") == "cpu" and device_type(winner.recipe.device) != "cpu"
            command = train_command(
                out / "recipe.yaml",
                trained_as,
                threads=attrs.get("threads"),
                cpu=cpu,
                cap=cap_set(attrs.get("device"), attrs.get("onednn_cap")),
            )
            where = reproduced_on(
                trained_as,
                cpu,
                attrs.get("device"),
                attrs.get("precision"),
                attrs.get("onednn_cap"),
            )
            how = f"`{command}` trains its seed {trained_as.seed} run again" + (
                "" if where == LIKE_HERE else f" on {where}"
            )
        console.print(f"note: {baseline} {what}; for {baseline}, {how}")


def cap_set(device: object, cap: object) -> str:
    """The cap on oneDNN's instruction set a retraining sets to train as a run on `device` that
    recorded `cap` did; "" where it trained under none, or not on the CPU."""
    from kdsearch.train import recorded_cap

    return (recorded_cap(cap) or "") if device == "cpu" else ""


def reproduced_on(
    recipe: Recipe, on_cpu: bool, device: object, precision: object, cap: object
) -> str:
    """Where `kdsearch train` of `recipe` (on the CPU where `on_cpu`), under the cap it sets
    (`cap_set`), gives again the weights that trained on `device` in `precision` under `cap`:
    `LIKE_HERE`, or what must differ from here (`auto` another precision under that cap, a
    cap set here that the run had not)."""
    from kdsearch.train import onednn_isa_cap, recorded_cap

    here = onednn_isa_cap()
    then = recorded_cap(cap) if device == "cpu" else None  # None: not recorded, or not the CPU
    auto = precision_here(recipe, on_cpu, here if then is None else then)
    where = LIKE_HERE
    if precision is not None and precision != auto:
        where = (
            f"a machine where its `precision: {recipe.precision}` is {precision}, as where it "
            f"trained (here it is {auto})"
        )
    if then == "" and here:  # a cap this process runs under, which the command cannot unset
        where += ", with ONEDNN_MAX_CPU_ISA and DNNL_MAX_CPU_ISA unset"
    return where


def precision_here(recipe: Recipe, on_cpu: bool, cap: str) -> str | None:
    """The precision `recipe` trains in on this machine (on its CPU where `on_cpu`) under the
    cap `cap` on oneDNN: what its `auto` becomes here. None where its device is not here (CUDA
    on a machine without)."""
    from kdsearch.errors import RecipeError
    from kdsearch.train import resolve_device, trained_precision

    try:
        return trained_precision(recipe, resolve_device("cpu" if on_cpu else recipe.device), cap)
    except RecipeError:  # a device this machine lacks, fp16 without CUDA
        return None


def train_command(
    file: Path, wanted: Recipe, *, threads: int | None, cpu: bool, cap: str | None = None
) -> str:
    """`kdsearch train FILE` with the `--set` items that make the recipe in `file` train as
    `wanted` (not its settings of the machine, which `file` has as this one needs them), with
    the `threads` it trained with, under the `cap` on oneDNN it trained under, and, where it
    trained on the CPU of a machine whose device is not (`cpu`), on the CPU."""
    from kdsearch.study.contents import PER_MACHINE

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
    pinned += f"ONEDNN_MAX_CPU_ISA={cap} " if cap else ""
    return f"{pinned}kdsearch train {shlex.quote(str(file))}{''.join(sets)}"


def bare(key: str, text: str) -> bool:
    """Whether `--set KEY=TEXT` sets KEY to the string `text` itself."""
    try:
        return bool(parse_sets([f"{key}={text}"])[key] == text)
    except KdsearchError:
        return False


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
