"""What kdsearch shows in the terminal: progress per epoch, the search's status line, tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True, highlight=False, soft_wrap=True)


class EpochBars:
    """The report of a training run in the terminal: a bar over epochs with time elapsed and
    left, a bar over the running epoch's batches, and one printed line per epoch."""

    def __init__(self, progress: Progress, label: str, epochs: int) -> None:
        self.progress = progress
        self.label = label
        self.epochs = epochs
        self.task = progress.add_task(f"{label} epochs", total=epochs)
        self.batches = progress.add_task(f"{label} batches", total=None)

    def __call__(self, stats: Any) -> None:
        parts = " ".join(f"{k} {v:.3f}" for k, v in stats.parts.items())
        self.progress.console.print(
            f"{self.label} epoch {stats.epoch:>3}/{self.epochs}  loss {stats.train_loss:.4f} "
            f"({parts})  val acc {100 * stats.val_acc:6.2f}%  lr {stats.lr:.4g}  "
            f"{stats.images_per_sec:,.0f} img/s  {stats.seconds:.1f}s"
        )
        self.progress.advance(self.task)

    def batch(self, done: int, total: int) -> None:
        if done == 1:  # a new epoch: its own elapsed and remaining time
            self.progress.reset(self.batches, total=total)
        self.progress.update(self.batches, completed=done, total=total)


@contextmanager
def epoch_progress(label: str, epochs: int) -> Iterator[EpochBars]:
    """Progress bars over a run's epochs and batches, gone when it ends; yields the report."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        yield EpochBars(progress, label, epochs)


def status_line(tally: Any, target: int) -> str:
    """One line: trials by state and the best so far."""
    finished = tally.complete + tally.pruned + tally.failed
    line = (
        f"trials {finished}/{target}: {tally.complete} complete, {tally.pruned} pruned, "
        f"{tally.failed} failed, {tally.running} running"
    )
    if tally.best is not None:
        value, number, params = tally.best
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
        )
        line += f"; best {100 * value:.2f}% (#{number}: {shown})"
    return line


def search_status(live: Live, target: int) -> Callable[[Any], None]:
    """The search's status callback: the live line in a terminal; elsewhere (a log file) the
    status printed as a line whenever trials have finished since the last one."""
    if console.is_terminal:
        return lambda tally: live.update(status_line(tally, target))
    printed = [0]

    def show(tally: Any) -> None:
        finished = tally.complete + tally.pruned + tally.failed
        if finished != printed[0] and finished != target:  # the target: the command's last line
            printed[0] = finished
            console.print(status_line(tally, target), markup=False)

    return show


def leaderboard_table(board: Any) -> Table:
    """The promoted leaderboard for the terminal."""
    budget = f"{board['epochs'].max()} epochs" if len(board) else "full budget"
    over = "mean ± sd over seeds" if len(board) and board["seeds"].max() > 1 else "one seed"
    table = Table(title=f"promoted at {budget} (accuracy %, {over})")
    for column in ("recipe", "seeds", "validation", "test"):
        table.add_column(column)
    for _, row in board.iterrows():
        table.add_row(
            str(row["recipe"]),
            str(row["seeds"]),
            spread(row["val_mean"], row["val_sd"], row["seeds"]),
            spread(row["test_mean"], row["test_sd"], row["seeds"]),
        )
    return table


def spread(mean: float, sd: float, seeds: int) -> str:
    """`mean ± sd`, or the mean alone where one seed gives no spread."""
    return f"{mean:.2f} ± {sd:.2f}" if seeds > 1 else f"{mean:.2f}"
