"""What share of a search's wall time is not spent training, where it goes, and the least it
could be on this machine.

    python benchmarks/overhead.py [--space search_spaces/digits.yaml] [--root DIR] [--runs 2]
        [--work DIR] [--out FILE.md]

Runs `kdsearch run` as a user does (a fresh process, a local Ray, the SQLite study) with the
teacher already in the cache, `--runs` times, on `--space` (the digits search by default) and,
with `--root` (CIFAR-10 as an image folder), on a CIFAR-10 search whose trials train for tens of
seconds: a 5,000-image subset, resnet20 -> resnet8, 8 trials of at most 6 epochs searching KD's
temperature and weight and the learning rate. A trial's busy time is its training steps plus its
validation passes (the trial attributes `train_seconds` and `eval_seconds`; a failed trial's, to
the last epoch it finished); the search had `concurrent` slots for the whole wall time of the
command, so

    overhead = 1 - sum(busy) / (concurrent x command wall time)

and, with the validation passes counted outside the training steps too (the column
"overhead, validation outside"), 1 - sum(train_seconds) / (concurrent x wall);

the first splits, from the command's start and end and the study's trial timestamps, into: before
the first trial is proposed (Python imports, Ray start-up, data and teacher loading, opening the
study); the first trial of each slot, proposal to record, minus its busy time (a fresh worker
process: importing torch and kdsearch, unpacking the data and teacher); the same for every other
trial (a reused worker: building models, reporting epochs, the study's writes); slots idle while
trials run (between trials, and one slot waiting while the last trials finish); after the last
trial is recorded (Ray's shutdown, printing the leaderboard, the process's exit).

The bare start-up is what a search started as `kdsearch run` starts one (on a local Ray) pays
here with no data, teacher, study or trial: a process that imports what `kdsearch run` imports,
starts Ray as it does, has one fresh worker per slot import what a trial imports and make a
torch optimizer (whose first use imports torch._dynamo), shuts Ray down and exits as the
command does (its exit handlers run, Python's teardown of its modules does not); one such
process runs first, uncounted, so that none of the counted ones reads a cold disk. "Least
possible" is the overhead the search would have if that were all it paid besides its busy time:
1 - busy / (concurrent x bare + busy).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from optuna.trial import FrozenTrial
from searches import (
    cifar10_kd_search,
    finished_trials,
    run_search,
    shipped_space,
    trial_device,
    work_dir,
    write_space,
)
from tables import Table, command_line, positive, run


@dataclass(frozen=True)
class Run:
    """One search's wall time, busy time and the slot-seconds of each part of the rest."""

    trials: int
    slots: int
    wall: float
    busy: float
    validation: float  # slot-seconds of it in validation passes
    parts: tuple[float, ...]  # slot-seconds of each column of the table, in its order

    @property
    def capacity(self) -> float:
        return self.slots * self.wall

    @property
    def overhead(self) -> float:
        return 1 - self.busy / self.capacity

    @property
    def overhead_with_validation(self) -> float:
        return 1 - (self.busy - self.validation) / self.capacity

    def least(self, bare: float) -> float:
        """The overhead with nothing but the bare start-up besides the busy time."""
        return 1 - self.busy / (self.slots * bare + self.busy)

    @property
    def later_cost(self) -> float:
        """Seconds a trial on a reused worker costs besides its busy time, on average."""
        return self.parts[2] / max(1, self.trials - self.slots)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--space", default="search_spaces/digits.yaml")
    parser.add_argument("--root", help="CIFAR-10 as an image folder (adds the CIFAR-10 search)")
    parser.add_argument("--runs", type=positive, default=2)
    parser.add_argument("--work", help="folder for the studies (default: a temporary one)")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    # the bare start-up's child: slots and CPUs per slot
    parser.add_argument("--bare", nargs=2, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare is not None:
        bare(int(args.bare[0]), args.bare[1])
        return
    if not Path(args.space).is_file():
        parser.error(f"--space {args.space}: no such file")
    work = work_dir(args.work, "kdsearch-overhead-")
    docs = {Path(args.space).stem: shipped_space(Path(args.space))}
    if args.root:
        # trials that train for tens of seconds each on a 2-core CPU
        docs["cifar10 subset"] = cifar10_kd_search(
            args.root,
            "overhead-cifar10",
            subset=5000,
            epochs=6,
            trials=8,
            asha={"grace_epochs": 2, "reduction_factor": 3},
        )
    slots = {name: int(doc["search"]["concurrent"]) for name, doc in docs.items()}
    shapes = sorted({(slots[n], float(d["search"]["per_trial"]["cpu"])) for n, d in docs.items()})
    measure_bare(*shapes[0])  # not counted: the first process after a while reads a cold disk
    bares = {shape: [measure_bare(*shape) for _ in range(args.runs)] for shape in shapes}
    table = Table(
        f"{trial_device()}; {os.cpu_count()} CPU cores, teacher cached, {args.runs} runs; "
        "bare start-up "
        + ", ".join(
            f"{n} slots of {cpu:g} CPU {' / '.join(f'{s:.1f}' for s in walls)} s"
            for (n, cpu), walls in bares.items()
        ),
        "",
        "| search | run | trials | wall s | busy slot-s | of it validation | before the first "
        "trial | first trial per slot, not busy | other trials, not busy | slots idle | after the "
        "last trial | overhead | least possible | overhead, validation outside | later trial, "
        "not busy s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    )
    for name, doc in docs.items():
        space = write_space(doc, work / f"{name}.yaml")
        study = doc["study"]["name"]
        shutil.rmtree(work / "studies", ignore_errors=True)
        run_search(space, work, "--trials", "1")  # the teacher (and heads) into the cache
        shape = (slots[name], float(doc["search"]["per_trial"]["cpu"]))
        bare_wall = statistics.median(bares[shape])
        for i in range(1, args.runs + 1):
            row = measure(space, work, study, slots[name])
            shares = " | ".join(f"{100 * part / row.capacity:.1f}%" for part in row.parts)
            table.row(
                f"| {name} | {i} | {row.trials} | {row.wall:.1f} | {row.busy:.1f} | "
                f"{row.validation:.1f} | {shares} | {100 * row.overhead:.1f}% | "
                f"{100 * row.least(bare_wall):.1f}% | {100 * row.overhead_with_validation:.1f}% | "
                f"{row.later_cost:.2f} |"
            )
    table.save(args.out)


def measure_bare(slots: int, cpu: float) -> float:
    """Wall seconds of the bare start-up with `slots` workers of `cpu` CPUs, as a fresh
    process."""
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--bare", str(slots), str(cpu)], check=True)
    return time.perf_counter() - started


def bare(slots: int, cpu: float) -> None:
    """The bare start-up itself (see the module's text). Plain Ray tasks: no Tune, no
    placement groups, so a floor under what Tune itself could reach."""
    from kdsearch import cli

    # as `cli.entry` registers it: before Ray's and torch's handlers, so after them
    atexit.register(cli.last_exit_handler, [0], ends=atexit._ncallbacks() == 0)
    import ray

    from kdsearch.search import cluster, tuner  # noqa: F401  (what `kdsearch run` imports)

    cluster.start_ray(None)
    first = ray.remote(num_cpus=cpu)(first_use)
    ray.get([first.remote() for _ in range(slots)])
    ray.shutdown()


def first_use() -> None:
    """What a fresh trial worker does before any trial-specific work."""
    import torch

    from kdsearch.search import worker  # noqa: F401  (the trial function's module)

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


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
    idle = slots * wall - before - after - sum(life(t) for t in trials)
    return Run(
        len(trials),
        slots,
        wall,
        sum(busy(t) for t in trials),
        sum(float(t.user_attrs.get("eval_seconds", 0)) for t in trials),
        (before, first_trials, other_trials, idle, after),
    )


if __name__ == "__main__":
    run(main)
