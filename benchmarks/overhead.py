"""What share of the digits search's wall time is not spent training.

    python benchmarks/overhead.py [--space search_spaces/digits.yaml] [--runs 2] [--work DIR]

Runs `kdsearch run SPACE` as a user does (a fresh process, a local Ray, the SQLite study) with
the teacher already in the cache, `--runs` times. A trial's busy time is its training steps
plus its validation passes (the trial attributes `train_seconds` and `eval_seconds`); the search
had `concurrent` slots for the whole wall time of the command, so

    overhead = 1 - sum(busy) / (concurrent x command wall time)

and it splits into what happened inside trials (a trial's life in the study, from proposal to
record, minus its busy time: the worker's start, the data and teacher hand-off, the database
writes) and outside them (Python and Ray start-up, data loading, slots left idle while the last
trials of a rung finish, shutdown).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from pathlib import Path

import yaml
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
    rows = []
    for _ in range(args.runs):
        shutil.rmtree(work / "studies")
        wall = run_search(space, work)
        trials = finished_trials(work, name)
        busy = sum(
            t.user_attrs.get("train_seconds", 0) + t.user_attrs.get("eval_seconds", 0)
            for t in trials
        )
        lives = sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.datetime_complete and t.datetime_start
        )
        capacity = slots * wall
        rows.append((len(trials), wall, busy, lives - busy, capacity - lives, capacity))
    lines = [
        f"`kdsearch run {args.space}` with the teacher cached, {slots} trials at a time, "
        f"{os.cpu_count()} CPU cores; {args.runs} runs",
        "",
        "| run | trials | wall s | busy slot-s | in trials, not busy | outside trials | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (n, wall, busy, inside, outside, capacity) in enumerate(rows, 1):
        lines.append(
            f"| {i} | {n} | {wall:.1f} | {busy:.1f} | {100 * inside / capacity:.1f}% | "
            f"{100 * outside / capacity:.1f}% | {100 * (1 - busy / capacity):.1f}% |"
        )
    median = statistics.median(1 - r[2] / r[5] for r in rows)
    lines += ["", f"median overhead: {100 * median:.1f}% of {slots} x wall time"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
