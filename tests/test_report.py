from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from kdsearch.display import trials_view
from kdsearch.promote import PLAIN_KD, open_promoted
from kdsearch.report import build_report, learning_curves, trials_table
from kdsearch.space import SearchSpace
from kdsearch.study.drivers import this_driver
from kdsearch.study.record import Record
from kdsearch.study.storage import open_storage

from .conftest import SEARCH_VALUES, SMALL_SPACE, CliHere, run_cli, write_study

# SMALL_SPACE with a parameter outside `distill.` and two conditional ones
WHEN_SPACE = SMALL_SPACE.replace(
    "  distill.kd.temperature: {type: float, low: 1.0, high: 8.0}\n",
    "  distill.kd.temperature: {type: float, low: 1.0, high: 8.0}\n"
    "  optim.lr: {type: float, low: 0.01, high: 0.2, log: true}\n"
    "  $extra: {type: categorical, choices: [none, pkt, crd]}\n"
    "  distill.pkt.weight: {type: float, low: 50.0, high: 1000.0, when: {$extra: pkt}}\n"
    "  distill.crd.weight: {type: float, low: 0.1, high: 2.0, when: {$extra: crd}}\n",
)


def record_study(
    url: str,
    name: str,
    trials: list[tuple[str, list[float]]],
    *,
    space: str = SMALL_SPACE,
    params: list[dict[str, Any]] | None = None,
) -> None:
    """A study as `kdsearch run` writes it, without training: one trial per (state, learning
    curve), the first ones with `params`; a RUNNING trial has its curve so far."""
    parsed = SearchSpace.from_yaml(space, source="space.yaml")
    chosen = params or []
    # the study counts enqueued trials as held: without them in the target, none is proposed
    target = len(trials) + len(chosen)
    record = Record(open_storage(url), name, parsed, target=target, resume=False)
    for values in chosen:
        record.study.enqueue_trial(values)
    for number, (state, values) in enumerate(trials):
        assert record.next_plan(f"ray{number}") is not None
        curve = {epoch + 1: v for epoch, v in enumerate(values)}
        if state == "RUNNING":
            trial_id = record.storage.get_trial_id_from_study_id_trial_number(
                record.study_id, number
            )
            for epoch, value in curve.items():
                record.storage.set_trial_intermediate_value(trial_id, epoch, value)
            continue
        failure = {"failure": f"ValueError: trial {number} broke"} if state == "FAIL" else {}
        record.finish(number, TrialState[state], curve, {"epochs": len(values), **failure})


def write_promoted(url: str) -> None:
    """A promotion of study `s` at 4 epochs as `kdsearch promote` records it: trial 1 and plain
    KD with two seeds each."""
    promoted = open_promoted(open_storage(url), "s")
    for source, label, values in ((1, "trial 1", (0.90, 0.92)), (PLAIN_KD, "plain KD", (0.8, 0.8))):
        for seed, value in enumerate(values):
            promoted.add_trial(
                create_trial(
                    state=TrialState.COMPLETE,
                    value=value,
                    params={"source_trial": source, "seed": seed},
                    distributions={
                        "source_trial": IntDistribution(-2, 10**6),
                        "seed": IntDistribution(0, 10**6),
                    },
                    user_attrs={
                        "label": label,
                        "source_trial": source,
                        "seed": seed,
                        "budget": 4,
                        "test_acc": value - 0.05,
                    },
                )
            )
    promoted.set_user_attr("budget", 4)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


def test_trials_prints_a_table_or_writes_csv(tmp_path: Path, cli_here: CliHere) -> None:
    write_study(tmp_path)
    shown = cli_here("trials", "s", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # the parameter's name without `distill.`, split at its dot over two header lines
    assert lines[0].split() == ["kd."]
    assert lines[1].split() == ["#", "state", "val", "acc", "epochs", "temperature", "failure"]
    # accuracy in percent as `run` prints it; "-" where there is no value
    rows = [line.split()[:4] for line in lines[2:]]
    assert rows[1] == ["1", "COMPLETE", "90.00%", "2"] and rows[4] == ["4", "FAIL", "-", "0"]
    url = f"sqlite:///{tmp_path}/studies/s.db"
    optuna.create_study(study_name="only-running", storage=url).ask()  # no value, no epochs yet
    running = cli_here("trials", "only-running", "--storage", url, cwd=tmp_path)
    assert running.stdout.splitlines()[1].split() == ["0", "RUNNING", "-", "-"], running.stdout
    (tmp_path / "t.csv").write_text("a,number,state,b\n1,2\n")  # the user's, not a kdsearch table
    ran = cli_here("trials", "s", "--csv", "t.csv", cwd=tmp_path)
    assert (
        ran.returncode == 2 and "--csv t.csv already holds a file that is not a table" in ran.stderr
    )
    assert (tmp_path / "t.csv").read_text() == "a,number,state,b\n1,2\n"
    (tmp_path / "t.csv").write_text("")  # empty (`touch`, a run killed at its start): replaced
    for _ in range(2):  # the second time over its own table
        written = cli_here("trials", "s", "--csv", "t.csv", cwd=tmp_path)
        assert written.returncode == 0
    table = pd.read_csv(tmp_path / "t.csv")
    assert list(table["state"]) == [state for state, _ in SEARCH_VALUES.values()]
    assert list(table["epochs"]) == [len(v) for _, v in SEARCH_VALUES.values()]
    # to stdout, best COMPLETE first (the pruned trial's 0.95 came at a shorter budget)
    piped = cli_here("trials", "s", "--csv", "-", "--sort", "value", cwd=tmp_path)
    assert piped.returncode == 0 and piped.stderr == ""
    assert list(pd.read_csv(io.StringIO(piped.stdout))["number"]) == [1, 3, 0, 2, 4]


def test_trials_a_stopped_search_left_running_are_said_to_be_so(
    tmp_path: Path, cli_here: CliHere
) -> None:
    (tmp_path / "studies").mkdir()
    url = f"sqlite:///{tmp_path}/studies/s.db"
    record_study(url, "s", [("COMPLETE", [0.5, 0.6]), ("RUNNING", [0.4]), ("RUNNING", [])])
    optuna.load_study(study_name="s", storage=url).ask()  # #3: being proposed, no driver yet
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name("s")
    # their driver, this process, is alive and beats: a search under way, nothing to say
    running = cli_here("trials", "s", cwd=tmp_path)
    assert running.returncode == 0 and running.stderr == "", running.stderr
    assert [line.split()[1] for line in running.stdout.splitlines()[2:]] == [
        "COMPLETE",
        "RUNNING",
        "RUNNING",
        "RUNNING",
    ]
    # a proposal an hour old was never claimed (its driver killed while proposing): stopped,
    # whoever else is alive, as `--resume` counts it
    with closing(sqlite3.connect(tmp_path / "studies" / "s.db")) as db, db:
        db.execute(
            "UPDATE trials SET datetime_start = datetime(datetime_start, '-3600 seconds') "
            "WHERE number = 3"
        )
    proposing = cli_here("trials", "s", cwd=tmp_path)
    assert " ".join(proposing.stderr.split()) == (
        "note: trial #3 is RUNNING in the study, but the search that ran it has stopped "
        "(Ctrl-C, or killed); `kdsearch run SPACE --study s --resume` runs it again"
    )
    storage.set_study_system_attr(study_id, f"heartbeat:{this_driver()}", 0.0)  # as a stop ends it
    stopped = cli_here("trials", "s", "--csv", "-", cwd=tmp_path)
    assert stopped.returncode == 0
    assert " ".join(stopped.stderr.split()) == (
        "note: trials #1, #2, #3 are RUNNING in the study, but the search that ran them has "
        "stopped (Ctrl-C, or killed); `kdsearch run SPACE --study s --resume` runs them again"
    )
    assert list(pd.read_csv(io.StringIO(stopped.stdout))["state"])[1:] == ["RUNNING"] * 3


def test_promote_export_and_report_say_a_search_stopped_short_of_its_trials(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search stopped by Ctrl-C with 2 of its space's 5 trials finished: `promote` and
    `export` chose from those 2 without a word (they noted only a search running now), and the
    report counted its trial left RUNNING as running."""
    from kdsearch.errors import DataError

    (tmp_path / "studies").mkdir()
    url = f"sqlite:///{tmp_path}/studies/s.db"
    record_study(url, "s", [("COMPLETE", [0.5, 0.6]), ("PRUNED", [0.4]), ("RUNNING", [0.3])])
    study = optuna.load_study(study_name="s", storage=url)
    study.set_user_attr("run_options", {"study": "s"})  # run without --trials: its space's 5
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name("s")
    storage.set_study_system_attr(study_id, f"heartbeat:{this_driver()}", 0.0)  # stopped
    note = (
        "note: the search of 's' stopped with 2 of its 5 trials finished, trial #2 left RUNNING; "
        "this {} its best trials so far, and `kdsearch run SPACE --study s --resume` finishes "
        "the search"
    )
    monkeypatch.setattr("kdsearch.commands.promote.run_promotion", lambda *_, **__: True)
    promoted = cli_here("promote", "s", cwd=tmp_path)
    assert promoted.returncode == 0 and promoted.stderr.splitlines() == [note.format("promotes")]

    def no_data(*_: object, **__: object) -> None:  # the export stops where it would load the data
        raise DataError("no data here")

    monkeypatch.setattr("kdsearch.data.load_data", no_data)
    exported = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert exported.stderr.splitlines() == [
        note.format("exports"),
        "kdsearch: error: no data here",
    ]
    reported = cli_here("report", "s", cwd=tmp_path)
    assert reported.returncode == 0
    assert reported.stderr.splitlines()[0] == note.format("reports on")
    page = (tmp_path / "studies" / "s-report.html").read_text()
    assert (
        "<p>3 trials: 1 complete, 1 pruned, 1 running. The search stopped (Ctrl-C, or killed) "
        "and left #2 RUNNING: the best trials here are the best so far, and `kdsearch trials` "
        "names the command that runs them again.</p>"
    ) in page
    # another driver searches it now, and takes #2 over: said so, and no trial is "left"
    storage.set_study_system_attr(study_id, "heartbeat:far:4242", time.time())
    reported = cli_here("report", "s", cwd=tmp_path)
    assert reported.stderr.splitlines()[0].startswith("note: 's' is still being searched (by far")
    page = (tmp_path / "studies" / "s-report.html").read_text()
    assert "<p>3 trials: 1 complete, 1 pruned, 1 running.</p>" in page
    storage.set_study_system_attr(study_id, "heartbeat:far:4242", 0.0)  # it stopped too
    # run with `--trials 2`: as many finished as it asked for, but one left to run again
    study.set_user_attr("run_options", {"study": "s", "trials": 2})
    reported = cli_here("report", "s", cwd=tmp_path)
    assert reported.stderr.splitlines()[0] == (
        "note: the search of 's' stopped with 2 trials finished, trial #2 left RUNNING; this "
        "reports on its best trials so far, and `kdsearch run SPACE --study s --trials 2 "
        "--resume` finishes the search"
    )
    # stopped between trials: none left RUNNING, but 3 of the 5 finished
    study.set_user_attr("run_options", {"study": "s"})
    study.tell(2, state=TrialState.FAIL)
    reported = cli_here("report", "s", cwd=tmp_path)
    assert reported.stderr.splitlines()[0] == (
        "note: the search of 's' stopped with 3 of its 5 trials finished; this reports on its "
        "best trials so far, and `kdsearch run SPACE --study s --resume` finishes the search"
    )
    # searched before kdsearch recorded how (no run_options): its count is not known, so its
    # space's is not taken for it (the search may have been run with fewer --trials)
    with closing(sqlite3.connect(tmp_path / "studies" / "s.db")) as db, db:
        db.execute("DELETE FROM study_user_attributes WHERE key = 'run_options'")
    assert "note:" not in cli_here("report", "s", cwd=tmp_path).stderr
    page = (tmp_path / "studies" / "s-report.html").read_text()
    assert "<p>3 trials: 1 complete, 1 pruned, 1 failed.</p>" in page
    # one trial finished, of one asked for: "1 trial", and the one left RUNNING named
    record_study(url, "one", [("COMPLETE", [0.5]), ("RUNNING", [])])
    optuna.load_study(study_name="one", storage=url).set_user_attr(
        "run_options", {"study": "one", "trials": 1}
    )
    ended = f"heartbeat:{this_driver()}"
    storage.set_study_system_attr(storage.get_study_id_from_name("one"), ended, 0.0)
    reported = cli_here("report", "one", "--storage", url, cwd=tmp_path)
    assert reported.stderr.splitlines()[0].startswith(
        "note: the search of 'one' stopped with 1 trial finished, trial #1 left RUNNING;"
    ), reported.stderr
    # the same search finished: nothing to say
    done = write_study(tmp_path / "done")
    for command in (["report", "s"], ["promote", "s"]):
        ran = cli_here(*command, "--storage", done, cwd=tmp_path)
        assert ran.returncode == 0 and "note:" not in ran.stderr, ran.stderr


def test_another_tools_parameters_named_as_a_column_do_not_take_its_place(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """A parameter `value` or `epochs` took the trial's own column: the table showed the
    sampled number as the trial's value, with no word."""
    url = f"sqlite:///{tmp_path}/other.db"
    study = optuna.create_study(study_name="other", storage=url, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"value": 1.5, "epochs": 7, "params_value": 3},
            distributions={
                "value": optuna.distributions.FloatDistribution(0.0, 2.0),
                "epochs": optuna.distributions.IntDistribution(1, 9),
                "params_value": optuna.distributions.IntDistribution(1, 9),
            },
            value=0.5,
        )
    )
    ran = cli_here("trials", "other", "--storage", url, "--csv", "-", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    table = pd.read_csv(io.StringIO(ran.stdout))
    # `value` renamed past the parameter that holds its first new name
    params = ["params_params_value", "params_epochs", "params_value"]
    assert list(table.columns[:4]) == ["number", "state", "value", "epochs"]
    assert sorted(table.columns[4:-1]) == sorted(params) and table.columns[-1] == "failure"
    row = table.iloc[0]
    assert [row[p] for p in ["value", *params]] == [0.5, 1.5, 7, 3]
    assert pd.isna(row["epochs"]), "the study recorded no epochs run"
    shown = cli_here("trials", "other", "--storage", url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr  # a column twice was a traceback here
    cells = shown.stdout.splitlines()[-1].split()
    assert cells[:4] == ["0", "COMPLETE", "0.5", "-"] and sorted(cells[4:]) == ["1.5", "3", "7"]


@pytest.mark.parametrize("name", ["out[bold]y.csv", "a[/b].csv"])
def test_a_path_is_printed_as_it_is_never_as_markup(
    tmp_path: Path, cli_here: CliHere, name: str
) -> None:
    """Rich would drop `[bold]` from the line, and raise on `[/b]` after the file is written."""
    write_study(tmp_path)
    (tmp_path / name).parent.mkdir(exist_ok=True)  # folder `a[`
    written = cli_here("trials", "s", "--csv", name, cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert written.stderr.strip() == f"wrote {len(SEARCH_VALUES)} trials to {name}"
    assert (tmp_path / name).is_file()


def test_whole_numbers_stay_whole_beside_trials_that_have_none(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    negatives = IntDistribution(256, 4096)
    study.add_trial(
        create_trial(
            value=0.9,
            params={"distill.crd.negatives": 256},
            distributions={"distill.crd.negatives": negatives},
            user_attrs={"epochs": 12},
        )
    )
    study.add_trial(create_trial(state=TrialState.RUNNING))  # no value, epochs or parameter yet
    table = trials_table(study)
    csv = table.to_csv(index=False).splitlines()
    # pandas would write 12.0 and 256.0, which `--set distill.crd.negatives=256.0` refuses
    assert csv[1:] == ["0,COMPLETE,0.9,12,256,", "1,RUNNING,,,,"]
    out = Console(width=120, file=io.StringIO())
    out.print(trials_view(table, accuracy=True))
    lines = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[-2].split() == ["0", "COMPLETE", "90.00%", "12", "256"]
    assert lines[-1].split() == ["1", "RUNNING", "-", "-", "-"]


@pytest.mark.parametrize("csv", [["--csv", "-"], []])
def test_trials_written_to_a_reader_that_stopped_reading_ends_quietly(
    tmp_path: Path, csv: list[str]
) -> None:
    write_study(tmp_path)
    proc = subprocess.Popen(  # `kdsearch trials s [--csv -] | head -0`
        [sys.executable, "-m", "kdsearch.cli", "trials", "s", *csv],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, "as a command that SIGPIPE ended, table or CSV"
    assert stderr == "", "no traceback"


@pytest.mark.parametrize("csv", [["--csv", "-"], []])
@pytest.mark.parametrize("buffered", [True, False])
def test_trials_written_to_a_full_disk_say_so_in_one_line(
    tmp_path: Path, csv: list[str], buffered: bool
) -> None:
    """`kdsearch trials s --csv - > FILE` on a full disk: a traceback where the rows were written
    as they came (PYTHONUNBUFFERED, or more rows than the stream's buffer), and nothing at all
    where they waited in it. Both are now one line and status 2."""
    write_study(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        ran = subprocess.run(
            [sys.executable, "-m", "kdsearch.cli", "trials", "s", *csv],
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env=env if buffered else {**env, "PYTHONUNBUFFERED": "1"},
        )
    assert ran.returncode == 2
    assert ran.stderr == "kdsearch: error: cannot write the output: No space left on device\n"


def test_trials_and_report_show_why_a_trial_failed(tmp_path: Path, cli_here: CliHere) -> None:
    url = write_study(tmp_path)
    reason = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n(the rest of it)"
    optuna.load_study(study_name="s", storage=url).add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"distill.kd.temperature": 2.0},
            distributions={"distill.kd.temperature": FloatDistribution(1.0, 8.0)},
            user_attrs={"failure": reason},
        )
    )
    shown = cli_here("trials", "s", cwd=tmp_path)
    rows = {line.split()[0]: line.rstrip() for line in shown.stdout.splitlines()[2:]}
    assert rows["4"].endswith(" NonFiniteLoss: nan")
    assert rows["5"].endswith(" RuntimeError: CUDA out of memory. Tried…")  # first line, cut
    cli_here("trials", "s", "--csv", "t.csv", cwd=tmp_path)
    failures = pd.read_csv(tmp_path / "t.csv")["failure"].fillna("")
    assert list(failures) == ["", "", "", "", "NonFiniteLoss: nan", reason]  # whole
    page = build_report(open_storage(url), "s")
    assert "<h2>Failed trials</h2>\n<p>trial 4: NonFiniteLoss: nan</p>" in page
    assert "<p>trial 5: RuntimeError: CUDA out of memory" in page


def test_trials_columns_follow_the_space_and_sort_by_value_in_the_study_direction(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    crd = {
        "distill.kd.temperature": 2.0,
        "optim.lr": 0.1,
        "$extra": "crd",
        "distill.crd.weight": 1.0,
    }
    pkt = {
        "distill.kd.temperature": 3.0,
        "optim.lr": 0.1,
        "$extra": "pkt",
        "distill.pkt.weight": 99.0,
    }
    record_study(
        url, "w", [("COMPLETE", [0.5]), ("COMPLETE", [0.6])], space=WHEN_SPACE, params=[crd, pkt]
    )
    table = trials_table(optuna.load_study(study_name="w", storage=url))
    assert list(table.columns) == [
        "number",
        "state",
        "value",
        "epochs",
        "distill.kd.temperature",
        "optim.lr",
        "$extra",
        "distill.pkt.weight",  # the space's order, though trial 0 drew crd.weight first
        "distill.crd.weight",
        "failure",
    ]
    low = optuna.create_study(study_name="low", storage=url, direction="minimize")
    for x in (3.0, 1.0, 2.0):
        low.enqueue_trial({"x": x})
    low.optimize(lambda t: t.suggest_float("x", 0.0, 5.0), n_trials=3)
    assert list(trials_table(low, by_value=True)["number"]) == [1, 2, 0]


def test_a_promoted_study_is_listed_as_its_leaderboard_and_not_reported_as_a_search(
    tmp_path: Path, cli_here: CliHere
) -> None:
    url = write_study(tmp_path)
    promoted = open_promoted(open_storage(url), "s")
    shown = cli_here("trials", "s-promoted", cwd=tmp_path)
    assert shown.stderr == "study 's-promoted': no promoted run has finished yet\n"
    write_promoted(url)
    for state, seed, budget, attrs in (
        (TrialState.FAIL, 2, 4, {"failure": "OutOfMemoryError: CUDA out of memory\nmore"}),
        (TrialState.COMPLETE, 2, 2, {"test_acc": 0.5}),  # an earlier, shorter promotion
        (TrialState.FAIL, 0, 4, {"failure": "RayTaskError: node lost"}),  # finished since
        (TrialState.FAIL, 1, 2, {"failure": "NonFiniteLoss: nan"}),  # at another budget
    ):
        promoted.add_trial(
            create_trial(
                state=state,
                value=0.6 if state == TrialState.COMPLETE else None,
                params={"source_trial": 1, "seed": seed},
                distributions={
                    "source_trial": IntDistribution(-2, 10**6),
                    "seed": IntDistribution(0, 10**6),
                },
                user_attrs={"label": "trial 1", "source_trial": 1, "seed": seed, "budget": budget}
                | attrs,
            )
        )
    # no --storage: `promote` recorded it in the search's file, studies/s.db
    shown = cli_here("trials", "s-promoted", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    title = "promoted at 4 epochs (accuracy %, mean ± sd over seeds)"
    assert shown.stdout.splitlines()[0].strip() == title
    row = r"trial 1\W+2 \(1 failed\)\W+91\.00 ± 1\.41\W+86\.00 ± 1\.41"
    assert re.search(row, shown.stdout), shown.stdout
    # what the leaderboard leaves out is said, not dropped, under the table on stdout (on
    # stderr, `> FILE` kept a table whose failed recipe had vanished); a run that failed and has
    # finished since is not a failure, and one at another budget is in the CSV
    under = [
        "failed: trial 1, seed 2, 4 epochs: OutOfMemoryError: CUDA out of memory",
        "1 finished runs at other budgets (2 epochs) are not in this table; `--csv -` lists "
        "every run",
    ]
    assert shown.stdout.strip().splitlines()[-2:] == under
    assert not shown.stderr
    # one line each at any width (at CI's 80 columns the second broke in two), the table whole
    narrow = run_cli("trials", "s-promoted", cwd=tmp_path, env={"COLUMNS": "40"})
    assert narrow.stdout.strip().splitlines()[-2:] == under
    assert re.search(row, narrow.stdout), narrow.stdout
    every = pd.read_csv(
        io.StringIO(cli_here("trials", "s-promoted", "--csv", "-", cwd=tmp_path).stdout)
    )
    assert list(every["state"]) == ["COMPLETE"] * 4 + ["FAIL", "COMPLETE", "FAIL", "FAIL"]
    assert list(every["budget"]) == [4, 4, 4, 4, 4, 2, 4, 2] and every["val_acc"].max() == 0.92
    for _ in range(2):  # to a file, the second time over its own table
        assert cli_here("trials", "s-promoted", "--csv", "runs.csv", cwd=tmp_path).returncode == 0
    assert pd.read_csv(tmp_path / "runs.csv").equals(every)
    proc = cli_here("report", "s-promoted", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        "kdsearch: error: study 's-promoted' holds the promotion runs of study 's': their "
        "leaderboard is in `kdsearch report s` and `kdsearch trials s-promoted`\n"
    )
    (tmp_path / "studies" / "s.db").rename(tmp_path / "elsewhere.db")
    proc = cli_here("report", "s-promoted", "--storage", "elsewhere.db", cwd=tmp_path)
    where = f"--storage sqlite:///{tmp_path}/elsewhere.db"  # the commands as they work here
    assert proc.returncode == 2 and (
        f"`kdsearch report s {where}` and `kdsearch trials s-promoted {where}`"
    ) in " ".join(proc.stderr.split())
    # in studies/s-promoted.db, where `trials s-promoted` looks by itself and `report s` does not
    (tmp_path / "elsewhere.db").rename(tmp_path / "studies" / "s-promoted.db")
    proc = cli_here("report", "s-promoted", cwd=tmp_path)
    where = "--storage sqlite:///studies/s-promoted.db"
    assert (f"`kdsearch report s {where}` and `kdsearch trials s-promoted`") in " ".join(
        proc.stderr.split()
    )
    assert not list(tmp_path.glob("**/*.html"))


def test_the_report_leaderboard_counts_each_recipes_seeds_and_lists_its_failed_runs(
    tmp_path: Path,
) -> None:
    url = write_study(tmp_path)
    write_promoted(url)
    promoted = open_promoted(open_storage(url), "s")
    for seed, failure in ((2, "NonFiniteLoss: nan at epoch 3"), (3, "RayTaskError: node lost")):
        promoted.add_trial(
            create_trial(
                state=TrialState.FAIL,
                params={"source_trial": 1, "seed": seed},
                distributions={
                    "source_trial": IntDistribution(-2, 10**6),
                    "seed": IntDistribution(0, 10**6),
                },
                user_attrs={
                    "label": "trial 1",
                    "source_trial": 1,
                    "seed": seed,
                    "budget": 4,
                    "failure": failure,
                },
            )
        )
    page = build_report(open_storage(url), "s")
    section = page[page.index("<h2>Promoted leaderboard</h2>") :]
    # the bars are named as the terminal's leaderboard counts the seeds (plotly escapes "<")
    assert "trial 1\\u003cbr\\u003eseeds: 2 (1 diverged, 1 failed)" in section
    assert "plain KD\\u003cbr\\u003eseeds: 2" in section
    assert "<p>failed: trial 1, seed 2, 4 epochs: NonFiniteLoss: nan at epoch 3</p>" in section
    assert "<p>failed: trial 1, seed 3, 4 epochs: RayTaskError: node lost</p>" in section


def test_storage_may_be_the_path_of_the_study_file(tmp_path: Path, cli_here: CliHere) -> None:
    url = write_study(tmp_path)
    optuna.create_study(study_name="other", storage=url)
    shown = cli_here("trials", "s", "--storage", "studies/s.db", cwd=tmp_path)
    assert shown.returncode == 0 and "COMPLETE" in shown.stdout, shown.stderr
    for command, extra in (("promote", []), ("export", ["--out", "x"])):
        proc = cli_here(command, "other", "--storage", "studies/s.db", *extra, cwd=tmp_path)
        # the file was opened as a storage: the study in it is what is refused
        assert "study 'other' was not written by `kdsearch run`" in proc.stderr, proc.stderr


def test_a_missing_study_is_one_line(tmp_path: Path, cli_here: CliHere) -> None:
    """A mistyped name was told to pass --storage, with the right file beside it unnamed."""
    ran = cli_here("trials", "nothere", cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr.strip() == (
        "kdsearch: error: no study database at studies/nothere.db (no studies/ folder here: a "
        "search keeps its study in studies/ where it ran); check the name, or pass --storage "
        "with the study's file or URL"
    )
    write_study(tmp_path)
    (tmp_path / "studies" / "digits.db").write_bytes(b"")
    for command in (["trials"], ["report"], ["promote"], ["export", "--out", "x"]):
        ran = cli_here(*command, "digit", cwd=tmp_path)
        assert ran.returncode == 2 and " ".join(ran.stderr.split()) == (
            "kdsearch: error: no study database at studies/digit.db (studies/ holds digits, s); "
            "check the name, or pass --storage with the study's file or URL"
        )
    ran = cli_here(
        "report", "other", "--storage", f"sqlite:///{tmp_path}/studies/s.db", cwd=tmp_path
    )
    assert (
        ran.returncode == 2 and "no study named 'other' in this storage (it holds: s)" in ran.stderr
    )


def test_a_file_that_is_not_a_study_database_is_left_as_it_was(
    tmp_path: Path, cli_here: CliHere
) -> None:
    mine = tmp_path / "mine.db"
    with closing(sqlite3.connect(mine)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text.db").write_text("not a database\n")
    for file in ("mine.db", "empty", "text.db"):
        before = (tmp_path / file).read_bytes()
        for args in (
            ["trials", "s", "--storage", f"sqlite:///{file}"],
            ["dashboard", file, "--port", "0"],
        ):
            ran = cli_here(*args, cwd=tmp_path)
            why = {"mine.db": "it holds no Optuna tables", "empty": "it is empty"}.get(
                file, "it is not an SQLite"
            )
            assert ran.returncode == 2 and f"{file} is not a study database ({why}" in " ".join(
                ran.stderr.split()
            ), ran.stderr
        assert (tmp_path / file).read_bytes() == before


def test_a_mistyped_storage_or_output_creates_nothing(tmp_path: Path, cli_here: CliHere) -> None:
    write_study(tmp_path)
    for command in ("promote", "export", "report", "trials"):
        extra = ["--out", "x"] if command == "export" else []
        ran = cli_here(command, "s", "--storage", "sqlite:///studies/typo.db", *extra, cwd=tmp_path)
        assert ran.returncode == 2 and "no study database at studies/typo.db" in ran.stderr
    ran = cli_here("dashboard", "studies/typo.db", "--port", "0", cwd=tmp_path)
    assert ran.returncode == 2 and f"no study database at {tmp_path}/studies/typo.db" in ran.stderr
    ran = cli_here("dashboard", "typo", "--port", "0", cwd=tmp_path)
    assert ran.returncode == 2
    assert f"no study database at studies/typo.db or {tmp_path}/typo" in " ".join(
        ran.stderr.split()
    )
    ran = cli_here("dashboard", "typo.db", "--port", "0", cwd=tmp_path)  # not studies/typo.db.db
    assert f"no study database at studies/typo.db or {tmp_path}/typo.db" in " ".join(
        ran.stderr.split()
    )
    (tmp_path / "folder").mkdir()
    ran = cli_here("trials", "s", "--storage", "folder", cwd=tmp_path)
    assert ran.returncode == 2 and f"{tmp_path}/folder is a folder, not a study" in ran.stderr
    ran = cli_here("dashboard", "folder", "--port", "0", cwd=tmp_path)  # was "no study database at"
    assert ran.returncode == 2 and f"{tmp_path}/folder is a folder, not a study" in ran.stderr
    (tmp_path / "folder" / "r.yaml").write_text(SMALL_SPACE)
    ran = cli_here("run", "folder/r.yaml", "--storage", "folder", cwd=tmp_path)
    assert ran.returncode == 2 and f"{tmp_path}/folder is a folder" in ran.stderr, ran.stderr
    for args, expected in (
        (["report", "s", "--out", "nowhere/r.html"], "--out nowhere/r.html: no folder nowhere"),
        (["report", "s", "--out", "folder"], "--out folder is a folder; name a file"),
        (["trials", "s", "--csv", "nowhere/t.csv"], "--csv nowhere/t.csv: no folder nowhere"),
        # as root, permissions allow it and only the write does not: it was a traceback
        (["report", "s", "--out", "/proc/r.html"], "--out /proc/r.html: cannot write"),
        (["trials", "s", "--csv", "/proc/t.csv"], "--csv /proc/t.csv: cannot write"),
    ):
        ran = cli_here(*args, cwd=tmp_path)
        assert ran.returncode == 2 and expected in ran.stderr, ran.stderr
        # refused by the folder's probe, before any work: not by the write at the end
        assert "nothing was written" not in ran.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "space.yaml", "studies"]
    assert [p.name for p in (tmp_path / "studies").iterdir()] == ["s.db"]


def test_a_path_the_system_refuses_to_look_at_is_one_line(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """Looking at a path can fail (a name too long, a folder one may not enter): pathlib's
    checks then raise, which was a traceback."""
    write_study(tmp_path)
    long = "x" * 300
    for args in (
        ["report", "s", "--out", long],
        ["trials", "s", "--csv", long],
        ["trials", "é" * 150],  # 150 characters, 300 bytes: a study file's name
        ["dashboard", long, "--port", "0"],
        ["run", "space.yaml", "--storage", long],
    ):
        ran = cli_here(*args, cwd=tmp_path)  # before the fix, it raised here
        assert ran.returncode == 2, ran.stderr
        assert ran.stderr.startswith("kdsearch: error: ") and ran.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "studies"]


def test_a_pipe_is_refused_and_a_link_has_its_target_written(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """The file is written beside its name and moved there: over a pipe or a device (as root,
    `--out /dev/null`) that would replace the pipe or the device, over a link the link."""
    write_study(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    for args in (["trials", "s", "--csv", "pipe"], ["report", "s", "--out", "pipe"]):
        ran = cli_here(*args, cwd=tmp_path)
        assert ran.returncode == 2, ran.stderr
        assert f"{args[-2]} pipe is not a regular file (a device or a pipe); name a file" in (
            " ".join(ran.stderr.split())
        )
        assert (tmp_path / "pipe").is_fifo()
    (tmp_path / "loop").symlink_to("loop")  # was a traceback
    ran = cli_here("trials", "s", "--csv", "loop", cwd=tmp_path)
    assert ran.returncode == 2 and "--csv loop is a link that leads round to itself" in ran.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t.csv").write_text("")
    (tmp_path / "latest.csv").symlink_to("out/t.csv")
    (tmp_path / "new.html").symlink_to("out/r.html")  # to no file yet
    assert cli_here("trials", "s", "--csv", "latest.csv", cwd=tmp_path).returncode == 0
    assert cli_here("report", "s", "--out", "new.html", cwd=tmp_path).returncode == 0
    for link, target in (("latest.csv", "t.csv"), ("new.html", "r.html")):
        assert (tmp_path / link).is_symlink()
        assert (tmp_path / "out" / target).stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "out" / "t.csv")) == len(SEARCH_VALUES)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_a_report_or_table_the_disk_cannot_take_is_one_line_and_leaves_nothing(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_study(tmp_path)
    real_write = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name.endswith(".tmp"):  # the staged report, half written
            real_write(self, "<html>", encoding="utf-8")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda _, path, **__: full(Path(path), ""))
    for args, option in (
        (["report", "s", "--out", "r.html"], "--out r.html"),
        (["trials", "s", "--csv", "t.csv"], "--csv t.csv"),
    ):
        ran = cli_here(*args, cwd=tmp_path)
        assert ran.returncode == 2 and ran.stderr.strip().splitlines()[-1] == (
            f"kdsearch: error: {option}: cannot write there (No space left on device); "
            "nothing was written"
        ), ran.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "studies"]


def test_a_study_kdsearch_did_not_write_is_one_line(tmp_path: Path, cli_here: CliHere) -> None:
    url = write_study(tmp_path)
    optuna.create_study(study_name="other", storage=url).optimize(lambda t: 1.0, n_trials=1)
    for command, extra in (("promote", []), ("export", ["--out", "x"]), ("report", [])):
        ran = cli_here(command, "other", "--storage", url, *extra, cwd=tmp_path)
        assert (
            ran.returncode == 2 and "study 'other' was not written by `kdsearch run`" in ran.stderr
        ), ran.stderr
        assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob("**/*.html"))
    two = optuna.create_study(study_name="two", storage=url, directions=["maximize", "minimize"])
    two.optimize(lambda t: (1.0, 2.0), n_trials=1)
    ran = cli_here("trials", "two", "--storage", url, cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr == (
        "kdsearch: error: study 'two' has 2 objectives; kdsearch reads studies of one, as "
        "`kdsearch run` writes them\n"
    )


def test_report_holds_every_section_and_needs_no_network(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    chosen = [
        {"$extra": "pkt", "distill.pkt.weight": 100.0 * (i + 1)} if i < 2 else {"$extra": "none"}
        for i in range(6)
    ]
    curves = [("COMPLETE", [0.5, 0.6 + 0.05 * i]) for i in range(6)] + [("PRUNED", [0.4])]
    record_study(url, "w", [*curves, ("FAIL", [])], space=WHEN_SPACE, params=chosen)
    page = build_report(open_storage(url), "w")
    for title in (
        "Optimization history",
        "Learning curves",
        "Failed trials",
        "Parallel coordinates",
        "Parameter importances",
        # every searched parameter, in the space's order
        "distill.kd.temperature against the metric",
        "optim.lr against the metric",
        "$extra against the metric",
        "distill.pkt.weight against the metric",
    ):
        assert f"<h2>{title}</h2>" in page
    assert page.count("Plotly.newPlot") == 8
    assert "<script src=" not in page, "plotly.js is inlined, not fetched"
    assert "<p>8 trials: 6 complete, 1 pruned, 1 failed.</p>" in page
    assert "Best: trial 5, validation accuracy 85.00% (" in page
    # PED-ANOVA would rank pkt.weight on the two trials that drew it
    assert (
        "<p>not assessed, sampled by fewer than 5 COMPLETE trials: distill.pkt.weight</p>" in page
    )


def test_importances_wait_for_five_complete_trials_and_accuracy_is_in_percent(
    tmp_path: Path,
) -> None:
    url = write_study(tmp_path)  # 3 COMPLETE trials
    page = build_report(open_storage(url), "s")
    assert (
        "<h2>Parallel coordinates and parameter importances</h2>\n<p>from 5 COMPLETE trials on; the study has 3</p>"
        in page
    )
    assert (
        "<h2>Parameter importances</h2>" not in page and "<h2>Parallel coordinates</h2>" not in page
    )
    assert "<p>Best: trial 1, validation accuracy 90.00% (distill.kd.temperature = " in page
    curves = learning_curves(optuna.load_study(study_name="s", storage=url))
    assert (
        list(curves.data[0].y) == [50.0, 70.0]
        and curves.layout.yaxis.title.text == "validation accuracy %"
    )


def test_a_report_without_a_complete_trial_says_so_and_draws_only_what_there_is(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    record_study(url, "empty", [])
    record_study(url, "failed", [("FAIL", [])])
    record_study(url, "pruned", [("PRUNED", [0.5]), ("PRUNED", [0.6]), ("FAIL", [])])
    record_study(url, "running", [("RUNNING", [0.4, 0.5])])
    storage = open_storage(url)
    pages = {name: build_report(storage, name) for name in ("empty", "failed", "pruned", "running")}
    assert "<p>The study holds no trial yet.</p>" in pages["empty"]
    assert "<p>1 trial: 1 failed.</p>" in pages["failed"]
    assert "<p>3 trials: 2 pruned, 1 failed.</p>" in pages["pruned"]
    assert "<p>1 trial: 1 running.</p>" in pages["running"]
    for page in pages.values():
        assert "<p>No COMPLETE trial yet (none has reached the full budget)" in page
        assert "Optimization history" not in page and "against the metric" not in page
        assert "Parallel coordinates" not in page
    # no figure, so no plotly.js: a page of a few lines, not 4.7 MB of empty axes
    assert len(pages["empty"]) < 2000 and len(pages["failed"]) < 2000
    for name in ("pruned", "running"):  # their curves, as far as they got
        assert (
            pages[name].count("Plotly.newPlot") == 1 and "<h2>Learning curves</h2>" in pages[name]
        )
    assert "no complete trials" not in capfd.readouterr().err.lower()
    ended = f"heartbeat:{this_driver()}"  # the searches that wrote them ended, as one ends
    for name in ("pruned", "empty"):
        storage.set_study_system_attr(storage.get_study_id_from_name(name), ended, 0.0)
    proc = run_cli("report", "pruned", "--storage", url, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.startswith(f"wrote {tmp_path}/pruned-report.html (")
    assert proc.stderr.endswith("opens offline); study 'pruned' has no COMPLETE trial yet\n")
    proc = run_cli("report", "empty", "--storage", url, "--out", "e.html", cwd=tmp_path)
    size = (tmp_path / "e.html").stat().st_size  # under a KiB: in bytes, not "0 KiB"
    assert proc.stderr.startswith(f"wrote e.html ({size:,} bytes, opens offline)"), proc.stderr


def test_report_writes_over_its_own_report_only(tmp_path: Path, cli_here: CliHere) -> None:
    write_study(tmp_path)
    for _ in range(2):
        ran = cli_here("report", "s", cwd=tmp_path)
        assert (
            ran.returncode == 0
            and "<title>kdsearch report: s</title>"
            in (tmp_path / "studies" / "s-report.html").read_text()
        )
    (tmp_path / "recipe.yaml").write_text("mine\n")
    ran = cli_here("report", "s", "--out", "recipe.yaml", cwd=tmp_path)
    assert ran.returncode == 2
    assert "--out recipe.yaml already holds a file that is not a kdsearch report" in ran.stderr
    assert (tmp_path / "recipe.yaml").read_text() == "mine\n"
    # the default file is named as such, where no --out was given
    (tmp_path / "studies" / "s-report.html").write_text("mine\n")
    ran = cli_here("report", "s", cwd=tmp_path)
    assert ran.returncode == 2
    assert (
        "the default report file studies/s-report.html already holds a file that is not a "
        "kdsearch report"
    ) in " ".join(ran.stderr.split())


@needs_chromium
def test_report_figures_are_drawn_in_a_browser(tmp_path: Path, cli_here: CliHere) -> None:
    write_study(tmp_path)
    assert cli_here("report", "s", "--out", "r.html", cwd=tmp_path).returncode == 0
    dom = chromium("--dump-dom", (tmp_path / "r.html").as_uri(), profile=tmp_path / "p").stdout
    figures = (tmp_path / "r.html").read_text().count("Plotly.newPlot")
    assert dom.count('class="main-svg"') >= figures == 3, "plotly drew an SVG for every figure"
    assert "trial 1" in dom  # hover labels of the learning curves are in the drawn traces


def _serve(tmp_path: Path, storage: str = "studies/s.db") -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdsearch.cli", "dashboard", storage, "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the address alone, for a script to read
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/dashboard/\n", line)
    assert match, line + proc.stderr.read() if proc.stderr else line
    return proc, int(match.group(1))


def _get(url: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


SLOW_SERVER = """
import signal, sys, time
from wsgiref.simple_server import make_server
from kdsearch.cli import stop_as_ctrl_c
from kdsearch.commands.studies import serve_until_stopped

def slow(environ, start_response):
    print("handling", flush=True)
    time.sleep(float(sys.argv[1]))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]

signal.signal(signal.SIGTERM, stop_as_ctrl_c)
server = make_server("127.0.0.1", 0, slow)
print(server.server_port, flush=True)
serve_until_stopped(server)
print("stopped", flush=True)
"""


def test_a_stop_during_a_request_stops_the_server() -> None:
    """wsgiref's error handler swallows a KeyboardInterrupt raised inside a request: a SIGTERM
    that lands then must still stop the dashboard, not leave it serving."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert proc.stdout.readline() == "handling\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and out == "stopped\n"
        client.close()
    finally:
        proc.kill()


def test_dashboard_serves_the_study_on_loopback(tmp_path: Path) -> None:
    write_study(tmp_path)
    (tmp_path / "s").mkdir()  # a folder of the same name does not hide the study
    proc, port = _serve(tmp_path, "s")  # a study name, as the other commands take
    try:
        summaries = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["s"]  # type: ignore[index,union-attr]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}")  # type: ignore[index]
        trials = detail["trials"]
        assert [t["state"] for t in trials] == [s.capitalize() for s, _ in SEARCH_VALUES.values()]  # type: ignore[union-attr]
        assert {"recipe", "ray_trial_id", "epochs"} <= {
            a["key"] for a in detail["union_user_attrs"]
        }  # type: ignore[union-attr]
        assert detail["has_intermediate_values"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.stderr is not None
    assert proc.stderr.read() == (
        f"optuna-dashboard on sqlite:///{tmp_path}/studies/s.db; Ctrl-C stops it\n"
    )


@needs_chromium
def test_dashboard_page_renders_the_trials(tmp_path: Path) -> None:
    write_study(tmp_path)
    proc, port = _serve(tmp_path)
    try:
        dom = chromium(
            "--dump-dom",
            f"http://127.0.0.1:{port}/dashboard/studies/1/trials",
            profile=tmp_path / "p",
        ).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for number in SEARCH_VALUES:
        assert f"Trial {number}" in dom


def test_dashboard_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    write_study(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("dashboard", "studies/s.db", "--port", str(port), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"kdsearch: error: cannot listen on 127.0.0.1:{port}"
    )


def test_dashboard_to_a_full_disk_says_so_in_one_line(tmp_path: Path) -> None:
    """Its address line went to stdout through a bare print: a traceback on a full disk."""
    write_study(tmp_path)
    with open("/dev/full", "w") as full:
        ran = subprocess.run(
            [sys.executable, "-m", "kdsearch.cli", "dashboard", "s", "--port", "0"],
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert ran.returncode == 2
    assert ran.stderr == "kdsearch: error: cannot write the output: No space left on device\n"


@pytest.mark.parametrize(
    ("was", "now", "why"),
    [
        ("seed: 0}", "seed: 8589934592}", "search.seed"),
        # YAML read more strictly since: `trials` and `report` stopped at it, in one line
        ("study: {name: s}", "study: {name: s}\nstudy: {name: s}", "key 'study' is given twice"),
    ],
    ids=["a sampler seed past 2**32 - 1", "a key given twice"],
)
def test_a_study_whose_recorded_space_no_longer_passes_is_shown_and_refused_in_one_line(
    tmp_path: Path, cli_here: CliHere, was: str, now: str, why: str
) -> None:
    """Recorded by an earlier kdsearch, whose checks allowed what this one's refuse."""
    url = write_study(tmp_path)
    study = optuna.load_study(study_name="s", storage=url)
    space = study.user_attrs["space"]
    assert was in space
    study.set_user_attr("space", space.replace(was, now))
    listed = cli_here("trials", "s", cwd=tmp_path)
    assert listed.returncode == 0 and "temperature" in listed.stdout
    drawn = cli_here("report", "s", cwd=tmp_path)
    assert drawn.returncode == 0 and "wrote studies/s-report.html" in drawn.stderr
    for command in (["promote", "s"], ["export", "s", "--out", "w"]):
        ran = cli_here(*command, cwd=tmp_path)
        assert ran.returncode == 2, ran.stderr
        assert (
            "study 's': the space file it recorded no longer passes this kdsearch's checks: "
            in (" ".join(ran.stderr.split()))
        )
        assert why in " ".join(ran.stderr.split()) and "Traceback" not in ran.stderr


def test_a_trials_csv_has_a_column_for_every_parameter_of_the_space(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """Its columns were the parameters some trial sampled, so two CSVs of one space differed
    (a search whose trials never drew PKT had no distill.pkt.weight); the table shows those."""
    (tmp_path / "studies").mkdir()
    text = SMALL_SPACE.replace(
        "space:\n",
        "space:\n  $extra: {type: categorical, choices: [none, pkt]}\n"
        "  distill.pkt.weight: {type: float, low: 50.0, high: 1000.0, when: {$extra: pkt}}\n",
    )
    space = SearchSpace.from_yaml(text, source="space.yaml")
    url = f"sqlite:///{tmp_path}/studies/s.db"
    record = Record(open_storage(url), "s", space, target=3, resume=False)
    for number in range(3):  # the random sampler's first three (seed 0) draw none
        assert record.next_plan(f"ray{number}") is not None
        record.finish(number, TrialState.COMPLETE, {1: 0.5, 2: 0.6}, {"epochs": 2})
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert all("distill.pkt.weight" not in t.params for t in trials)
    csv = cli_here("trials", "s", "--csv", "-", cwd=tmp_path)
    assert csv.returncode == 0, csv.stderr
    head = "number,state,value,epochs,$extra,distill.pkt.weight,distill.kd.temperature,failure"
    assert csv.stdout.splitlines()[0] == head
    assert csv.stdout.splitlines()[1].startswith("0,COMPLETE,0.6,2,none,,")
    # the table keeps to what was sampled (its own header would not show the name whole)
    table = trials_table(optuna.load_study(study_name="s", storage=url))
    assert "distill.pkt.weight" not in table.columns and "$extra" in table.columns


def test_reading_a_study_does_not_import_torch(tmp_path: Path) -> None:
    """`trials` and a refused `report` or `dashboard` imported torch (through the promotion's
    training and the sampler's seed), which took most of their time: 6.5 s for `trials` on a
    2-core machine where it now takes 2.7 s."""
    write_study(tmp_path)
    script = (
        "import contextlib, io, sys\n"
        "from kdsearch.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main(['trials', 's']), main(['trials', 's', '--csv', '-']),\n"
        "             main(['report', 'typo']), main(['dashboard', 'typo'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert ran.stdout.strip() == "[0, 0, 2, 2] False", ran.stdout + ran.stderr
