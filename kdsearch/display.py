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


@contextmanager
def epoch_progress(label: str, epochs: int) -> Iterator[Callable[[Any], None]]:
    """A progress bar over epochs and one printed line per epoch; yields the report callback."""
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
        task = progress.add_task(f"{label} epochs", total=epochs)

        def report(stats: Any) -> None:
            parts = " ".join(f"{k} {v:.3f}" for k, v in stats.parts.items())
            progress.console.print(
                f"{label} epoch {stats.epoch:>3}/{epochs}  loss {stats.train_loss:.4f} ({parts})  "
                f"val acc {100 * stats.val_acc:6.2f}%  lr {stats.lr:.4g}  "
                f"{stats.images_per_sec:,.0f} img/s  {stats.seconds:.1f}s"
            )
            progress.advance(task)

        yield report


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
        if finished != printed[0] and finished < target:  # the last one: the command's last line
            printed[0] = finished
            console.print(status_line(tally, target), markup=False)

    return show


def leaderboard_table(board: Any) -> Table:
    """The promoted leaderboard for the terminal."""
    table = Table(title="promoted at full budget (accuracy %, mean ± sd over seeds)")
    for column in ("recipe", "seeds", "validation", "test"):
        table.add_column(column)
    for _, row in board.iterrows():
        table.add_row(
            str(row["recipe"]),
            str(row["seeds"]),
            f"{row['val_mean']:.2f} ± {row['val_sd']:.2f}",
            f"{row['test_mean']:.2f} ± {row['test_sd']:.2f}",
        )
    return table
