from __future__ import annotations

import io
import re
import subprocess
import sys

import pandas as pd
import pytest
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kdsearch.display import (
    EpochBars,
    RunsStatus,
    console,
    leaderboard_table,
    print_whole,
    search_status,
    trials_view,
)
from kdsearch.study.record import Tally


def test_off_a_terminal_the_search_status_is_a_line_when_trials_have_finished(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not console.is_terminal  # pytest captures stderr
    show = search_status(live=None, target=4)  # type: ignore[arg-type]
    for tally in (
        Tally(running=2),
        Tally(complete=1, running=2),
        Tally(complete=1, running=1),  # nothing new finished: no line
        Tally(complete=1, pruned=2, running=1, best=(0.5, 0, {"optim.lr": 0.1})),
        Tally(complete=2, pruned=2),  # the last: the command prints it with the time taken
    ):
        show(tally)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "trials 1/4: 1 complete, 0 pruned, 0 failed, 2 running",
        "trials 3/4: 1 complete, 2 pruned, 0 failed, 1 running; best 50.00% (#0: optim.lr=0.1)",
    ]


def test_off_a_terminal_runs_side_by_side_show_a_line_at_each_quarter_of_their_epochs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = RunsStatus(total=3)
    for epoch in range(1, 9):
        status.epoch("trial 4 seed 0", epoch, 8, epoch / 10)
        if epoch == 3:
            status.epoch("plain KD seed 1", 1, 2, 0.55)
            status.done("plain KD seed 1")
    status.done("trial 4 seed 0")
    status.close()
    assert capsys.readouterr().err.splitlines() == [
        "runs 0/3 done; trial 4 seed 0 epoch 2/8 (val 20.00%)",
        "runs 0/3 done; trial 4 seed 0 epoch 3/8 (val 30.00%); plain KD seed 1 epoch 1/2 (val 55.00%)",
        "runs 1/3 done; trial 4 seed 0 epoch 4/8 (val 40.00%)",
        "runs 1/3 done; trial 4 seed 0 epoch 6/8 (val 60.00%)",
    ]
    assert status.line() == "runs 2/3 done"


def _rendered(view: Table, width: int) -> list[str]:
    out = Console(width=width, file=io.StringIO())
    out.print(view)
    return out.file.getvalue().splitlines()  # type: ignore[attr-defined]


def test_the_trials_table_fits_80_columns_with_conditional_parameters_in_one_column() -> None:
    columns = ["number", "state", "value", "epochs", "distill.kd.temperature", "distill.kd.weight"]
    columns += ["optim.lr", "$extra", "distill.pkt.weight", "distill.crd.weight"]
    columns += ["distill.crd.negatives", "distill.hsakd.weight", "distill.hsakd.placement"]
    columns += ["distill.stkd.weight", "distill.stkd.mix", "failure"]
    why = "NonFiniteLoss: the training loss became nan in epoch 3; lower optim.lr or the weights"
    n = None  # a parameter the trial did not draw
    rows = [
        [0, "COMPLETE", 0.96111, 12, 4.2345, 0.9123, 0.0123, "hsakd", n, n, n, 0.5, "[3]", n, n, n],
        [1, "PRUNED", 0.8, 2, 1.2345, 1.5, 0.15, "crd", n, 0.5, 1024, n, n, n, n, n],
        [2, "FAIL", n, 0, 6.0, 0.2, 0.05, "stkd", n, n, n, n, n, 1.2, "cutmix", why],
        [3, "RUNNING", n, n, 3.0, 0.9, 0.02, "none", n, n, n, n, n, n, n, n],
    ]
    view = trials_view(pd.DataFrame(rows, columns=columns), accuracy=True)
    narrow = _rendered(view, 80)
    assert max(len(line) for line in narrow) <= 80
    # nothing cut to fit: values go on over lines; only the failure is cut, on purpose
    assert sum(line.count("…") for line in narrow) == 1
    assert "".join("".join(line.split()) for line in narrow).count("=") == 6
    wide = _rendered(view, 200)
    # a column for each parameter every trial drew, named without `distill.` over two lines
    assert wide[0].split() == ["kd.", "kd.", "optim.", "conditional"]
    header = "# state val acc epochs temperature weight lr $extra parameters failure"
    assert wide[1].split() == header.split()
    # accuracy in percent, floats to 4 significant digits, conditional parameters as name=value
    first = "0 COMPLETE 96.11% 12 4.234 0.9123 0.0123 hsakd hsakd.weight=0.5 hsakd.placement=[3]"
    assert wide[2].split() == first.split()
    assert wide[3].split()[-2:] == ["crd.weight=0.5", "crd.negatives=1024"]
    # a failure's first 40 characters (the CSV has it whole)
    assert " ".join(wide[4].split()).endswith("cutmix NonFiniteLoss: the training loss became…")
    assert wide[5].split() == ["3", "RUNNING", "-", "-", "3", "0.9", "0.02", "none"]
    # on a terminal too narrow for it, the table goes past the terminal's width (which then
    # wraps its lines) rather than dropping the columns that do not fit
    out = Console(width=50, file=io.StringIO(), force_terminal=True)
    print_whole(out, view)
    tight = re.sub(r"\x1b\[[0-9;]*m", "", out.file.getvalue()).splitlines()  # type: ignore[attr-defined]
    assert "$extra" in tight[1] and "conditional" in tight[0]
    assert "".join("".join(line.split()) for line in tight).count("=") == 6
    assert 50 < max(len(line) for line in tight) < max(len(line) for line in wide)
    # into a pipe or a file (no terminal, no width), one line per trial, as wide as it takes
    out = Console(width=80, file=io.StringIO())
    print_whole(out, view)
    piped = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert len(piped) == 2 + len(rows) and piped[2].split() == first.split()


def test_the_leaderboard_title_is_one_line_however_narrow_its_rows() -> None:
    board = pd.DataFrame(
        [["trial 11", 2, 98.89, 0.0, 98.33, 0.39, 24], ["plain KD", 2, 97.78, 0.0, 97.21, 0.0, 24]],
        columns=["recipe", "seeds", "val_mean", "val_sd", "test_mean", "test_sd", "epochs"],
    )
    lines = _rendered(leaderboard_table(board), 120)
    assert lines[0].strip() == "promoted at 24 epochs (accuracy %, mean ± sd over seeds)"
    assert "trial 11" in lines[4] and "98.89 ± 0.00" in lines[4]


def test_the_leaderboard_tells_diverged_seeds_from_failed_ones() -> None:
    steady = {"recipe": "trial 3", "seeds": 3, "failed": 0, "diverged": 0, "val_mean": 94.0}
    shaky = {"recipe": "trial 1", "seeds": 1, "failed": 3, "diverged": 2, "val_mean": 95.0}
    spread = {"val_sd": 0.0, "test_mean": 93.0, "test_sd": 0.0, "epochs": 24}
    board = pd.DataFrame([steady | spread, shaky | spread])
    text = "\n".join(_rendered(leaderboard_table(board), 120))
    assert re.search(r"trial 3\W+3\W+94\.00", text)
    assert "1 (2 diverged, 1 failed)" in text, text


def test_a_log_whose_reader_went_away_ends_as_sigpipe_ends_a_command() -> None:
    """`kdsearch promote S 2>&1 | head -1` exited with status 1 (Rich's), which kdsearch
    documents as "no result"; `trials S | head` exits 141."""
    script = (
        "from kdsearch.display import console\n"
        "for i in range(100_000):\n"
        "    console.print(f'line {i}')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None and proc.stdout is not None
    assert proc.stderr.readline() == "line 0\n"
    proc.stderr.close()  # as `head -1` does
    assert proc.wait(timeout=120) == 141
    assert proc.stdout.read() == "", "nothing, no traceback, went to stdout instead"


def test_a_run_that_trains_nothing_shows_no_bars() -> None:
    """A teacher read from its cache showed its bars, `teacher epochs 0/40` and `teacher
    batches 0/?`, as if it were training again; a run shows them from its first batch."""
    shown = {}
    for batches in (0, 1):
        terminal = Console(width=100, file=io.StringIO(), force_terminal=True)
        with Progress(console=terminal, transient=True) as progress:
            bars = EpochBars(progress, "teacher", 40)
            for done in range(1, batches + 1):
                bars.batch(done, 10)
        shown[batches] = terminal.file.getvalue()  # type: ignore[attr-defined]
    assert "teacher" not in shown[0]
    assert "teacher epochs" in shown[1] and "teacher batches" in shown[1]
