"""The commands that read a study: `kdsearch dashboard`, `report` and `trials`."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.commands.common import (
    existing_storage,
    note_unfinished_search,
    numbered,
    password_hidden,
    recorded_resume,
    refuse_unnamed,
    storage_option,
    storage_url,
    study_file,
    study_storage,
)
from kdsearch.display import console, leaderboard_table, print_whole, results, trials_view
from kdsearch.errors import KdsearchError
from kdsearch.paths import output_errors, replaced_whole, writable_file, write_errors

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import optuna
    import pandas as pd
    from optuna.storages import BaseStorage


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve optuna-dashboard on a study storage until Ctrl-C."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from kdsearch.study.storage import redact

    given = args.storage
    name = given.removesuffix(".db")  # `digits` or `digits.db`: studies/digits.db
    named = study_file(name)
    if "://" not in given and not Path(given).is_file():
        if named.is_file():
            refuse_unnamed(name, f"to serve that file, give its path ({named})")
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
    with output_errors():  # `dashboard S > FILE` on a full disk: one line, not a traceback
        # the address alone on stdout, for a script to read; what it serves on stderr
        print(f"http://{args.host}:{server.server_port}/dashboard/", flush=True)
    console.print(f"optuna-dashboard on {redact(storage_url(given))}; Ctrl-C stops it")
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
    from kdsearch.study.storage import storage_errors

    storage, url = study_storage(args.study, args.storage)
    with storage_errors(storage):
        return write_report(args, storage, url)


def write_report(args: argparse.Namespace, storage: BaseStorage, url: str) -> int:
    """`cmd_report` on the study's `storage`, at `url`."""
    from kdsearch.report import TITLE, build_report, search_study
    from kdsearch.study.contents import ranked
    from kdsearch.study.storage import sqlite_file

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
    note_unfinished_search(storage, url, args.study, "reports on")
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
    from kdsearch.study.storage import storage_errors

    if args.csv and args.csv != "-":
        writable_file(Path(args.csv), "--csv")
        replaceable(
            Path(args.csv), "--csv", "a table kdsearch wrote", lambda h: h.startswith(CSV_HEADS)
        )
    storage, url = study_storage(args.study, args.storage)
    with storage_errors(storage), output_errors():
        return show_trials(args, storage, url)


def show_trials(args: argparse.Namespace, storage: BaseStorage, url: str) -> int:
    """`cmd_trials` on the study's `storage`, at `url`."""
    from kdsearch.report import trials_table
    from kdsearch.study.contents import is_promotion, load_study
    from kdsearch.study.drivers import left_running

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
