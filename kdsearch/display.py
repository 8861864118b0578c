"""What kdsearch shows in the terminal: progress per epoch, the search's status line, tables."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    import pandas as pd

    from kdsearch.study.record import Tally
    from kdsearch.train import EpochStats


class Results(Console):
    """stdout, where a command prints its result (a table)."""

    def on_broken_pipe(self) -> None:
        # `kdsearch trials S | head`: end as the CSV does (the CLI's exit status 141, as for
        # SIGPIPE), where Rich exits with status 1
        self.quiet = True
        raise BrokenPipeError


class Log(Console):
    """stderr, where a command prints its messages and progress."""

    def on_broken_pipe(self) -> None:
        # `kdsearch promote S 2>&1 | head`: the reader went away. End as a command that SIGPIPE
        # ends (status 141), where Rich exits with status 1 ("no result" here) and leaves stderr
        # broken for what is printed after; SystemExit passes the commands' `except Exception`.
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        raise SystemExit(141)


# markup=False, emoji=False: what kdsearch prints holds users' paths, names and errors, which
# are printed as they are (a file out[bold].csv, a path such as run:fire:1), never as Rich markup
PLAIN: dict[str, Any] = {"highlight": False, "emoji": False, "markup": False}  # every console's
console = Log(stderr=True, soft_wrap=True, **PLAIN)
results = Results(**PLAIN)
UNBOUNDED = 10_000  # columns: a width no table here needs, to measure what one does
FAILURE_CHARS = 40  # a failure's first line is cut here in the terminal; the CSV has it whole


class EpochBars:
    """The report of a training run in the terminal: a bar over epochs with time elapsed and
    left, a bar over the running epoch's batches, and one printed line per epoch. The bars
    appear with the first batch: a run that trains nothing (a teacher read from its cache)
    shows none."""

    def __init__(self, progress: Progress, label: str, epochs: int) -> None:
        self.progress = progress
        self.label = label
        self.epochs = epochs
        self.tasks: tuple[TaskID, TaskID] | None = None  # the epochs' and the batches' bars

    def _bars(self) -> tuple[TaskID, TaskID]:
        if self.tasks is None:
            self.tasks = (
                self.progress.add_task(f"{self.label} epochs", total=self.epochs),
                self.progress.add_task(f"{self.label} batches", total=None),
            )
        return self.tasks

    def __call__(self, stats: EpochStats) -> None:
        parts = " ".join(f"{k} {v:.3f}" for k, v in stats.parts.items())
        self.progress.console.print(
            f"{self.label} epoch {stats.epoch:>3}/{self.epochs}  loss {stats.train_loss:.4f} "
            f"({parts})  val acc {100 * stats.val_acc:6.2f}%  lr {stats.lr:.4g}  "
            f"{stats.images_per_sec:,.0f} img/s  {stats.seconds:.1f}s"
        )
        self.progress.advance(self._bars()[0])

    def batch(self, done: int, total: int) -> None:
        batches = self._bars()[1]
        if done == 1:  # a new epoch: its own elapsed and remaining time
            self.progress.reset(batches, total=total)
        self.progress.update(batches, completed=done, total=total)


@contextmanager
def epoch_progress(label: str, epochs: int) -> Iterator[EpochBars]:
    """Progress bars over a run's epochs and batches, gone when it ends; yields the report."""
    columns = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    # no bars off a terminal, where Rich's left an empty line behind them (the epoch lines stay)
    bars = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    with bars as progress:
        yield EpochBars(progress, label, epochs)


def status_line(tally: Tally, target: int) -> str:
    """One line: trials by state and the best so far."""
    finished = tally.complete + tally.pruned + tally.failed
    line = (
        f"trials {finished}/{target}: {tally.complete} complete, {tally.pruned} pruned, "
        f"{tally.failed} failed, {tally.running} running"
    )
    if tally.best is not None:
        value, number, params = tally.best
        shown = ", ".join(f"{k}={value_text(v)}" for k, v in params.items())
        line += f"; best {100 * value:.2f}% (#{number}: {shown})"
    return line


def search_status(live: Live, target: int) -> Callable[[Tally], None]:
    """The search's status callback: the live line in a terminal; elsewhere (a log file) the
    status printed as a line whenever trials have finished since the last one."""
    if console.is_terminal:
        return lambda tally: live.update(status_line(tally, target))
    printed = [0]

    def show(tally: Tally) -> None:
        finished = tally.complete + tally.pruned + tally.failed
        if finished != printed[0] and finished != target:  # the target: the command's last line
            printed[0] = finished
            console.print(status_line(tally, target))

    return show


class RunsStatus:
    """Progress of full trainings run side by side (a promotion): runs finished of all, and the
    epoch and validation accuracy each running one has reached. In a terminal a live line;
    elsewhere (a log file) the line printed as a run passes each quarter of its epochs."""

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.finished = 0
        self.running: dict[str, tuple[int, int, float]] = {}  # label -> epoch, of, accuracy
        # Started at the first epoch, not before: the teacher's own bars may be showing.
        self.live: Live | None = None

    def epoch(self, label: str, epoch: int, epochs: int, val_acc: float) -> None:
        """Run `label` has finished `epoch` of `epochs` at validation accuracy `val_acc`."""
        self.running[label] = (epoch, epochs, val_acc)
        if console.is_terminal:
            if self.live is None:
                self.live = Live(console=console, refresh_per_second=2, transient=True)
                self.live.start()
            self.live.update(self.line())
        elif 4 * epoch // epochs > 4 * (epoch - 1) // epochs and epoch < epochs:
            console.print(self.line())

    def done(self, label: str) -> None:
        """Run `label` has ended (its scores are printed on their own line)."""
        self.running.pop(label, None)
        self.finished += 1
        if self.live is not None:
            self.live.update(self.line())

    def close(self) -> None:
        """Take the live line away (the runs have ended, or were stopped)."""
        if self.live is not None:
            self.live.stop()
            self.live = None

    def line(self) -> str:
        """'runs 2/8 done; trial 11 seed 0 epoch 14/40 (val 97.22%), ...'."""
        at = [
            f"{label} epoch {e}/{n} (val {100 * acc:.2f}%)"
            for label, (e, n, acc) in self.running.items()
        ]
        return "; ".join([f"runs {self.finished}/{self.total} done", *at])


def leaderboard_table(board: pd.DataFrame) -> Table:
    """The promoted leaderboard (of one recipe at least) for the terminal."""
    over = "mean ± sd over seeds" if board["seeds"].max() > 1 else "one seed"
    title = f"promoted at {board['epochs'].max()} epochs (accuracy %, {over})"
    table = Table(title=title, min_width=len(title))  # a title wider than the rows is not wrapped
    for column in ("recipe", "seeds", "validation", "test"):
        table.add_column(column)
    for _, row in board.iterrows():
        table.add_row(
            str(row["recipe"]),
            seeds_cell(row),
            spread(row["val_mean"], row["val_sd"], row["seeds"]),
            spread(row["test_mean"], row["test_sd"], row["seeds"]),
        )
    return table


def seeds_cell(row: pd.Series) -> str:
    """How many seeds of a leaderboard row finished and, of the others, how many diverged and
    how many failed otherwise: `2`, `1 (2 diverged)`, `2 (1 failed)`."""
    diverged = int(row.get("diverged", 0))
    lost = int(row.get("failed", 0)) - diverged  # to its machine: retried
    told = [f"{diverged} diverged"] * bool(diverged) + [f"{lost} failed"] * bool(lost)
    return f"{row['seeds']} ({', '.join(told)})" if told else str(row["seeds"])


def spread(mean: float, sd: float, seeds: int) -> str:
    """`mean ± sd`, or the mean alone where one seed gives no spread."""
    return f"{mean:.2f} ± {sd:.2f}" if seeds > 1 else f"{mean:.2f}"


# `report.trials_table`'s columns besides the parameters
TRIAL_COLUMNS = ("number", "state", "value", "epochs", "failure")


def trials_view(table: pd.DataFrame, *, accuracy: bool) -> Table:
    """`report.trials_table` for the terminal, fitted to its width: a column for each parameter
    that every trial which sampled any drew (named without `distill.`, split at its dots), the
    parameters only some drew (a `when`) together in one column as name=value, and a failure's
    first line, cut. `accuracy`: the value in percent."""
    params = [c for c in table.columns if c not in TRIAL_COLUMNS]
    drew = table[params].notna().any(axis=1)
    shared = [p for p in params if table.loc[drew, p].notna().all()]
    conditional = [p for p in params if p not in shared]
    failures = bool(table["failure"].notna().any())
    headers = ["#", "state", "val acc" if accuracy else "value", "epochs"]
    headers += [_short(p).replace(".", ".\n") for p in shared]
    headers += ["conditional\nparameters"] * bool(conditional) + ["failure"] * failures
    depth = max(h.count("\n") for h in headers)
    view = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0))
    for i, header in enumerate(headers):  # bottom-aligned; the text columns take what is left
        wraps = i >= 4 + len(shared)
        view.add_column(
            "\n" * (depth - header.count("\n")) + header,
            justify="left" if wraps or i == 1 else "right",
            no_wrap=not wraps,
            overflow="fold",  # a value too long for its column goes on over lines, never cut
            min_width=len("conditional") if wraps else None,
        )
    show_value = percent if accuracy else value_text
    for row in table.astype(object).where(table.notna(), None).to_dict("records"):
        cells = [str(row["number"]), row["state"], show_value(row["value"]), whole(row["epochs"])]
        cells += [value_text(row[p]) for p in shared]
        if conditional:
            drawn = [p for p in conditional if _given(row[p])]
            cells.append(" ".join(f"{_short(p)}={value_text(row[p])}" for p in drawn))
        if failures:
            cells.append(_cut(str(row["failure"])) if _given(row["failure"]) else "")
        view.add_row(*(Text(c) for c in cells))
    return view


def print_whole(out: Console, table: Table) -> None:
    """Print `table` on a terminal at its width, or wider where it cannot fit in that (the
    terminal then wraps its lines), rather than dropping the columns that do not fit; into a
    pipe or a file, which have no width, at the table's own, one line per row (for grep)."""
    fits = Measurement.get(out, out.options.update_width(UNBOUNDED), table)
    width = fits.minimum if out.is_terminal else fits.maximum
    if width > out.width or not out.is_terminal:  # `print(width=)` stays within the console's
        out = type(out)(file=out.file, width=width, force_terminal=out.is_terminal, **PLAIN)
    out.print(table)


def _short(param: str) -> str:
    """A parameter's name in the terminal: most are distillation settings."""
    return param.removeprefix("distill.")


def _cut(failure: str) -> str:
    """A failure's first line, cut at FAILURE_CHARS."""
    line = failure.splitlines()[0] if failure.strip() else failure
    return line if len(line) <= FAILURE_CHARS else line[: FAILURE_CHARS - 1] + "…"


def _given(value: Any) -> bool:
    """Whether a cell of a pandas table holds a value (not None or NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def value_text(value: Any) -> str:
    """A parameter's value: a float to 4 significant digits, "-" where there is none."""
    if not _given(value):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def percent(value: Any) -> str:
    """An accuracy as the CLI prints it ("-": none yet)."""
    return f"{100 * value:.2f}%" if _given(value) else "-"


def whole(value: Any) -> str:
    """A count that pandas may have made a float (a column with gaps); "-": none."""
    return str(int(value)) if _given(value) else "-"
