"""What share of the digits search's wall time is not spent training, and where it goes.

    python benchmarks/overhead.py [--space search_spaces/digits.yaml] [--runs 2] [--work DIR]

Runs `kdsearch run SPACE` as a user does (a fresh process, a local Ray, the SQLite study) with
the teacher already in the cache, `--runs` times. A trial's busy time is its training steps
plus its validation passes (the trial attributes `train_seconds` and `eval_seconds`); the search
had `concurrent` slots for the whole wall time of the command, so

    overhead = 1 - sum(busy) / (concurrent x command wall time)

and it splits, from the command's start and end and the study's trial timestamps, into: before
the first trial is proposed (Python imports, Ray start-up, data and teacher loading, opening the
study); the first trial of each slot, proposal to record, minus its busy time (a fresh worker
process: importing torch and kdsearch, unpacking the data and teacher); the same for every other
trial (a reused worker: building models, reporting epochs, the study's writes); slots idle while
trials run (between trials, and one slot waiting while the last trials finish); after the last
trial is recorded (Ray's shutdown, printing the leaderboard, the process's exit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml
from optuna.trial import FrozenTrial
from searches import finished_trials, run_search, work_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/digits.yaml")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--work", help="folder for the studies (default: a temporary one)")
    args = parser.parse_args()
    space = Path(args.space).resolve()
    doc = yaml.safe_load(space.read_text())
    name, slots = doc["study"]["name"], int(doc["search"]["concurrent"])
    work = work_dir(args.work, "kdsearch-overhead-")
    shutil.rmtree(work / "studies", ignore_errors=True)
    run_search(space, work, "--trials", "1")  # the teacher (and heads) into the cache
    rows = [measure(space, work, name, slots) for _ in range(args.runs)]
    lines = [
        f"`kdsearch run {args.space}` with the teacher cached, {slots} trials at a time, "
        f"{os.cpu_count()} CPU cores; {args.runs} runs; shares of {slots} x wall time",
        "",
        "| run | trials | wall s | busy slot-s | before the first trial | first trial per slot, "
        "not busy | other trials, not busy | slots idle | after the last trial | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        shares = " | ".join(f"{100 * part / row.capacity:.1f}%" for part in row.parts)
        lines.append(
            f"| {i} | {row.trials} | {row.wall:.1f} | {row.busy:.1f} | {shares} | "
            f"{100 * row.overhead:.1f}% |"
        )
    median = statistics.median(r.overhead for r in rows)
    lines += ["", f"median overhead: {100 * median:.1f}% of {slots} x wall time"]
    print("\n".join(lines))


@dataclass(frozen=True)
class Run:
    trials: int
    wall: float
    busy: float
    capacity: float  # slot-seconds: slots x wall
    parts: tuple[float, ...]  # slot-seconds of each column of the table, in its order

    @property
    def overhead(self) -> float:
        return 1 - self.busy / self.capacity


def measure(space: Path, work: Path, name: str, slots: int) -> Run:
    """One search from an empty study, and where its slot-seconds went."""
    shutil.rmtree(work / "studies", ignore_errors=True)
    started = time.time()
    wall = run_search(space, work)
    ended = started + wall
    trials = sorted(finished_trials(work, name), key=lambda t: t.datetime_start or datetime.min)

    def busy(t: FrozenTrial) -> float:
        return float(t.user_attrs.get("train_seconds", 0) + t.user_attrs.get("eval_seconds", 0))

    def life(t: FrozenTrial) -> float:
        assert t.datetime_start is not None and t.datetime_complete is not None
        return (t.datetime_complete - t.datetime_start).total_seconds()

    first = trials[0].datetime_start
    last = max(t.datetime_complete for t in trials if t.datetime_complete is not None)
    assert first is not None
    before = slots * (first.timestamp() - started)
    after = slots * (ended - last.timestamp())
    first_trials = sum(life(t) - busy(t) for t in trials[:slots])
    other_trials = sum(life(t) - busy(t) for t in trials[slots:])
    total_busy = sum(busy(t) for t in trials)
    capacity = slots * wall
    idle = capacity - before - after - sum(life(t) for t in trials)
    return Run(
        len(trials),
        wall,
        total_busy,
        capacity,
        (before, first_trials, other_trials, idle, after),
    )


if __name__ == "__main__":
    main()
