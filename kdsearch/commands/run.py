"""`kdsearch run`: search a space, then the space's promotion and export."""

from __future__ import annotations

import argparse
import math
import os
import shlex
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from rich.live import Live
from rich.text import Text

from kdsearch import __version__
from kdsearch.commands.common import (
    loaded_data,
    parse_sets,
    password_hidden,
    prepare_teacher,
    refuse_other_kdsearch,
    run_resumed,
    storage_url,
    use_ray_token,
)
from kdsearch.commands.export import run_export
from kdsearch.commands.promote import run_promotion
from kdsearch.display import console, search_status, status_line
from kdsearch.errors import KdsearchError, StudyError
from kdsearch.paths import remove_empty, writable_folder
from kdsearch.space import search_name_problem

if TYPE_CHECKING:
    from kdsearch.data import ImageData
    from kdsearch.space import SearchSpace
    from kdsearch.study.record import Record, Tally


def cmd_run(args: argparse.Namespace) -> int:
    """Search a space: trials on Ray Tune with ASHA, every one recorded in an Optuna study."""
    refuse_other_kdsearch(Path.cwd())
    if args.address not in (None, "auto"):
        use_ray_token(os.environ)  # before Ray is imported
    from kdsearch.study.contents import retuned_settings
    from kdsearch.study.record import Record
    from kdsearch.study.storage import (
        open_storage,
        redact,
        refuse_foreign,
        sqlite_file,
        storage_errors,
    )

    space, name, given, url, target = checked_search(args)
    if args.check:
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
            with storage_errors(record.storage):
                held = len(record.study.trials)
                retuned = retuned_settings(record.study, space)
            if record.all_started():  # --resume of a finished search, or --trials at most it holds
                console.print(
                    f"kdsearch {__version__}: study {name!r} in {redact(url)} already holds {held} "
                    f"trials ({target} asked for); none to run"
                )
                tally, seconds, complete = record.tally(), 0.0, True
                target = max(target, held)
            else:
                target = max(target, held)  # --trials below what it holds: its orphans run
                if retuned:
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
                console.print(stopped_line(record.tally(), target, space, args, url, resumed))
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
    return after_search(args, space, name, url, tally, given=given)


def checked_search(args: argparse.Namespace) -> tuple[SearchSpace, str, str | None, str, int]:
    """Every check `run` makes before its study opens, each refusal one line (with `--check`,
    then what the search would run): the space, the study's name, the storage given (on the
    command line or in the space), its URL, and the number of trials asked for."""
    from kdsearch.space import SearchSpace
    from kdsearch.study.contents import already_held
    from kdsearch.study.storage import (
        check_driver,
        check_sqlite_file,
        default_storage,
        redact,
        refuse_foreign,
        sqlite_file,
        trials_held,
    )

    changes = parse_sets(args.set)
    space = SearchSpace.load(args.space, changes)
    name = args.study or space.config.study.name
    if not args.resume and (problem := search_name_problem(name)):  # before any file is made
        raise KdsearchError(problem)  # (one --resume would start: `Record` refuses it)
    given = args.storage or space.config.study.storage
    url = storage_url(given or default_storage(name))
    # the same command run twice: refused before torch and Ray are imported (seconds), and
    # by `--check`, which reads the file without writing; `Record` refuses it on any storage
    known = None if args.resume else sqlite_file(url)
    if known is not None and known.is_file() and (held := trials_held(known, name)):
        raise already_held(name, held)
    from kdsearch.data import check_data
    from kdsearch.teacher import refuse_unusable_checkpoints

    refuse_unusable_checkpoints(space.base)  # before the data loads, and before the study
    check_data(space.base.data)  # a folder that is not there, or not laid out as one: likewise
    for idle in space.idle_settings():
        console.print(f"note: {space.source}: {idle}")
    for ignored in space.searched_changes(changes):
        console.print(f"note: {ignored}")
    check_driver(url)  # before Ray joins a cluster, and `--check` says so too
    file = sqlite_file(url)
    if file is not None and not given and not file.exists():  # ./studies/NAME.db, made as the
        try:  # search starts: a read-only working folder was a traceback after the checks
            writable_folder(file.parent, "the study storage's folder")
        except KdsearchError as err:
            raise StudyError(
                f"{err}; run from a folder you can write in, or name a study storage with --storage"
            ) from None
    target = args.trials or space.config.search.trials
    distinct = space.distinct_samples(most=target - 1)
    if distinct is not None:
        again = target - distinct
        console.print(
            f"note: {space.source}: the space holds {distinct} different "
            f"trial{'s' if distinct > 1 else ''} and the search asks for {target}, so at least "
            f"{again} repeat{'s' if again == 1 else ''} an earlier trial's configuration, "
            f"trained again from the start; set search.trials (or --trials) to {distinct}, or "
            "widen the space"
        )
    at_once = f"{space.config.search.concurrent} at a time (on the cluster's resources)"
    if args.address is None or args.check:  # refuse a request Ray cannot meet before any work
        at_once = fitted_trials(space, args.address)
    if space.config.export is not None:  # now, not after the search
        from kdsearch.export import check_out

        check_out(Path(space.config.export.dir), name, url, export_option(space))
    if args.check:  # every check made before the study opens, and nothing written
        if given and url.startswith("sqlite"):  # (the default's ./studies is made as it runs)
            check_sqlite_file(url)
        if file is not None and file.is_file():  # as the run refuses it, before it opens
            refuse_foreign(file, empty_ok=True)
        console.print(
            f"{space.source}: checked: {len(space.params)} parameter"
            f"{'s' * (len(space.params) != 1)}, {target} trial{'s' * (target != 1)} of at most "
            f"{space.config.asha.max_epochs} epochs, {at_once}, for study {name!r} in "
            f"{redact(url)}; the data, the teacher and the study are first read when it runs"
        )
    return space, name, given, url, target


def after_search(
    args: argparse.Namespace,
    space: SearchSpace,
    name: str,
    url: str,
    tally: Tally,
    *,
    given: str | None,
) -> int:
    """Once every trial this driver started has finished: where the study is, then the space's
    promotion and export where this driver is the last to finish; the command's status."""
    from kdsearch.study.contents import machine_settings
    from kdsearch.study.storage import open_storage, redact, storage_errors

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
    resumed = password_hidden(url) if args.storage else ""
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
            where = export_option(space)
            with storage_errors(storage := open_storage(url)):
                run_export(storage, url, name, out, here, where, after_search=True)
    except KeyboardInterrupt:  # the search is done; say how to finish what follows it
        console.print(after_search_line(space, f"`{resume_command(args, url)}`{resumed}"))
        raise
    return 0


def stopped_line(
    tally: Tally,
    target: int,
    space: SearchSpace,
    args: argparse.Namespace,
    url: str,
    resumed: str,
) -> str:
    """What is left to do after a Ctrl-C that stopped the search part of `kdsearch run`: one
    that lands as the last trial is recorded leaves no trial to run again."""
    command = f"`{resume_command(args, url)}`{resumed}"
    finished = tally.complete + tally.pruned + tally.failed
    if tally.running or finished < target:
        return f"stopped; {command} finishes the search"
    if tally.complete and (space.config.promote or space.config.export):
        return after_search_line(space, command)
    none = "" if tally.complete else ", none complete"  # so no promotion or export follows
    return f"stopped as the search ended: its {finished} trials had all finished{none}"


def after_search_line(space: SearchSpace, command: str) -> str:
    """How to finish the promotion and export of a space whose search is done."""
    cfg = space.config
    steps = [w for w, on in (("promotion", cfg.promote), ("export", cfg.export)) if on]
    kept = " (the promotion runs already finished are kept)" if cfg.promote else ""
    return f"stopped after the search; {command} does the space's {' and '.join(steps)}{kept}"


def export_option(space: SearchSpace) -> str:
    """What names a search's export folder, in an error about it."""
    return f"{space.source}: export.dir"


def left_to_user(args: argparse.Namespace, space: SearchSpace, url: str) -> str:
    """The commands that do the space's promotion and export as `kdsearch run` would."""
    from kdsearch.study.storage import redact

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


def same_data(record: Record, data: ImageData) -> None:
    """Refuse data other than the study's (an image folder whose files changed since, which no
    setting says): where its trials trained on other data, or another driver is preparing a
    study of no trials yet on other data. One study, one data set. A study of no trials takes
    this driver's data as its own at once, for drivers that join it; `adopt_data` records it
    in a study an earlier kdsearch left without."""
    from kdsearch.study.storage import storage_errors

    with storage_errors(record.storage):
        recorded = record.study.user_attrs.get("data_fingerprint")
        if recorded == data.fingerprint:
            return
        trials = record.study.get_trials(deepcopy=False)
        if recorded is not None and (trials or record.others_alive()):
            raise StudyError(
                f"study {record.study.study_name!r}: its trials "
                f"{'trained' if trials else 'are prepared by another driver'} on other data "
                f"than {data.name} loads here (data fingerprint {str(recorded)[:12]}, here "
                f"{data.fingerprint[:12]}): its files changed since, or decode otherwise on "
                "this machine; put them back as they were, or search in a new study "
                "(--study NAME)"
            )
        if not trials:  # no trial trained on other data: a run refused before left it, say
            record.study.set_user_attr("data_fingerprint", data.fingerprint)


def adopt_data(record: Record, data: ImageData) -> None:
    """Record the data of a study whose trials an earlier kdsearch recorded without it, once
    this driver's data and teacher have passed their checks, saying so."""
    from kdsearch.study.storage import storage_errors

    with storage_errors(record.storage):
        if "data_fingerprint" in record.study.user_attrs:
            return
        record.study.set_user_attr("data_fingerprint", data.fingerprint)
    console.print(
        f"note: study {record.study.study_name!r} recorded no data fingerprint (an earlier "
        f"kdsearch); its trials are taken to have trained on the data loaded here "
        f"({data.fingerprint[:12]})"
    )


def fitted_trials(space: SearchSpace, address: str | None) -> str:
    """Check that a trial of `space` fits a node of this machine's Ray, or of the cluster at
    `address` (joined and left here: `--check`); say so where fewer than `search.concurrent`
    fit at once, and return how many run at a time, where."""
    from kdsearch.search.cluster import (
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
    from kdsearch.losses import LOSSES
    from kdsearch.search.cluster import machine_choices, start_ray, stop_ray, trial_resources
    from kdsearch.search.tuner import active_terms, run_search

    try:
        if args.address is not None:  # join the cluster first: a wrong address costs no work
            # Text: a spinner's words are read as markup whatever the console's setting, and
            # an address such as [fe80::1]:6379 would lose its brackets
            with console.status(Text(f"joining the Ray cluster at {args.address}")):
                start_ray(args.address)
            trial_resources(space.config.search, **machine_choices(space), source=space.source)
        data = loaded_data(space.base.data)
        same_data(record, data)
        terms = active_terms(space)
        teacher = None
        if any(LOSSES[t].needs_teacher for t in terms):
            heads = any(LOSSES[t].has_teacher_heads for t in terms)
            teacher = prepare_teacher(space.base, data, heads, record)
            console.print(
                f"teacher {space.base.teacher.arch} ({teacher.source}): "
                f"val acc {100 * teacher.val_acc:.2f}%"
            )
        adopt_data(record, data)
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
    from kdsearch.study.storage import holds_no_study

    if file.is_file() and holds_no_study(file):
        with suppress(OSError):  # the error that refused the run is the one to show
            file.unlink()


def resume_command(args: argparse.Namespace, url: str) -> str:
    """The command that finishes this search: the same options, and --resume."""
    from kdsearch.study.storage import redact

    return run_resumed(
        args.space, args.study, args.storage and redact(url), args.trials, args.address, args.set
    )
