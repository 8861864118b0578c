"""ASHA search against a full-budget random search of the same number of trials, on a real
CIFAR-10 subset: the best validation accuracy reached against the compute spent.

    python benchmarks/search_quality.py --root DIR [--subset 2000] [--val-fraction 0.2]
        [--trials 12] [--max-epochs 18] [--grace 2] [--reduction 3] [--teacher-epochs 30]
        [--seed 0] [--lr LR] [--orders 200] [--work DIR] [--out-dir DIR]

DIR is CIFAR-10 as an image folder (the JPEG archive in ../shared/data extracts to one). Both
arms run `kdsearch run` on the same space (resnet20 -> resnet8; KD temperature and weight, the
learning rate, and one extra term of PKT, HSAKD or STKD) with the same cached teacher; `--lr`
fixes the learning rate instead of searching it, leaving the distillation terms, and
`--val-fraction` how much of the subset validates (more resolves smaller differences):

- ASHA: the product's default, TPE proposals and ASHA stopping at `--grace` epochs and every
  `--reduction` times more;
- random: random proposals, every trial trained for `--max-epochs` (nothing is stopped).

Only trials that reached `--max-epochs` count towards an arm's best (a pruned trial's score is a
shorter budget's). Compute is counted in epochs trained, summed over trials, and in wall time.
A run says whether it met the target (within 0.5 points of random search's best with at most a
third of its epochs), and how far apart random search's final accuracies lie against the
validation set's binomial standard error (when they are within it, no rung can rank the trials).
Writes `search_quality.png` (best so far against epochs spent) and `search_quality.md` into
`--out-dir`. The teacher is trained once into the cache before either arm is timed.

One live ASHA run depends on which trials happen to reach a rung first. So ASHA's rule (Ray's:
a trial reaching a rung stops when it is below the (1 - 1/reduction) quantile of the results
recorded there before it) is also replayed on the random arm's full learning curves, the trials
arriving in `--orders` random orders (and once in the order they ran), `concurrent` at a time,
every epoch one time step, for several first rungs and reduction factors: how far below the
random search's best it ends and what share of its epochs it spends, on average, and in how many
orders both halves of the target hold. The replay proposes the random arm's configurations, not
TPE's. `--seed` draws another subset, split, teacher and set of proposals: a rung setting chosen
on one seed's curves can be checked on another's.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import TrialState
from searches import finished_trials, run_search, trial_device, work_dir, write_space
from tables import command_line, positive, run, stdev

SLOTS = 2  # trials at a time, in both arms and in the replay
TARGET_POINTS = 0.5  # how far below random search's best ASHA may end

SPACE = {
    "distill.kd.temperature": {"type": "float", "low": 1.0, "high": 8.0},
    "distill.kd.weight": {"type": "float", "low": 0.0, "high": 2.0},
    "optim.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
    "$extra": {"type": "categorical", "choices": ["none", "pkt", "hsakd", "stkd"]},
    "distill.pkt.weight": {
        "type": "float",
        "low": 50.0,
        "high": 2000.0,
        "log": True,
        "when": {"$extra": "pkt"},
    },
    "distill.hsakd.weight": {"type": "float", "low": 0.2, "high": 2.0, "when": {"$extra": "hsakd"}},
    "distill.stkd.weight": {"type": "float", "low": 0.2, "high": 2.0, "when": {"$extra": "stkd"}},
}


@dataclass(frozen=True)
class Arm:
    """What one arm's study recorded, trial by trial."""

    name: str
    wall: float
    epochs: list[int]  # per trial, in the order they finished
    full: list[float | None]  # val acc of trials that reached max epochs, else None
    pruned: int
    curves: list[dict[int, float]]  # each trial's validation accuracy by epoch
    numbers: list[int]  # each trial's number: the order the trials started in
    lrs: list[float | None]  # each trial's learning rate where it was searched

    @property
    def best(self) -> float:
        """The best validation accuracy of the trials that reached the full budget."""
        return max(v for v in self.full if v is not None)

    def best_so_far(self) -> tuple[list[int], list[float]]:
        """Epochs spent and best full-budget accuracy (%) so far, after each trial finished."""
        spent, best, xs, ys = 0, float("-inf"), [], []
        for e, v in zip(self.epochs, self.full, strict=True):
            spent += e
            if v is not None and v > best:
                best = v
            if best > float("-inf"):
                xs.append(spent)
                ys.append(100 * best)
        return xs, ys


def space_file(args: argparse.Namespace, work: Path, arm: str) -> Path:
    """The space file of an arm (`asha`, `random`, or the one-epoch `warmup`)."""
    asha = arm != "random"
    epochs = 1 if arm == "warmup" else args.max_epochs
    space = {k: v for k, v in SPACE.items() if args.lr is None or k != "optim.lr"}
    doc = {
        "study": {"name": arm},
        "base": {
            "data": {
                "dataset": "imagefolder",
                "root": str(Path(args.root).resolve()),
                "subset": args.subset,
                "val_fraction": args.val_fraction,
                "seed": args.seed,
            },
            "teacher": {
                "arch": "resnet20",
                "train": {"epochs": args.teacher_epochs, "lr": 0.05, "seed": args.seed},
                "heads": {"epochs": 15, "lr": 0.05},
            },
            "student": {"arch": "resnet8"},
            "distill": {"ce": {"weight": 1.0}, "kd": {"weight": 0.9, "temperature": 4.0}},
            "optim": {"lr": 0.05 if args.lr is None else args.lr},
            "schedule": {"epochs": epochs, "kind": "cosine"},
            "batch_size": 64,
            "seed": args.seed,
        },
        "space": space,
        "search": {
            "trials": args.trials,
            "concurrent": SLOTS,
            "per_trial": {"cpu": 1},
            "sampler": "tpe" if asha else "random",
            "seed": args.seed,
        },
        "asha": {
            "max_epochs": epochs,
            "grace_epochs": min(args.grace, epochs) if asha else epochs,
            "reduction_factor": args.reduction,
        },
    }
    return write_space(doc, work / f"{arm}.yaml")


def read_arm(name: str, work: Path, wall: float, max_epochs: int) -> Arm:
    """The arm `name` as its study recorded it."""
    done = finished_trials(work, name)
    epochs = [int(t.user_attrs.get("epochs", 0)) for t in done]
    full = [
        t.value if t.state == TrialState.COMPLETE and e >= max_epochs else None
        for t, e in zip(done, epochs, strict=True)
    ]
    pruned = sum(t.state == TrialState.PRUNED for t in done)
    curves = [dict(t.intermediate_values) for t in done]
    lrs = [t.params.get("optim.lr") for t in done]
    return Arm(name, wall, epochs, full, pruned, curves, [t.number for t in done], lrs)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation of two paired lists."""
    return float(pd.Series(xs).corr(pd.Series(ys), method="spearman"))


def rank_correlation(curves: list[dict[int, float]], epoch: int, last: int) -> float:
    """Spearman's rank correlation, over the trials that ran to `last`, between the validation
    accuracy after `epoch` and after `last`: how well a rung at `epoch` foretells the end."""
    full = [c for c in curves if epoch in c and last in c]
    return spearman([c[epoch] for c in full], [c[last] for c in full])


def lr_correlation(arm: Arm, epoch: int, last: int) -> float:
    """Spearman's rank correlation, over the trials that ran to `last`, between the learning rate
    and the validation accuracy after `epoch`."""
    full = [
        (lr, c[epoch])
        for lr, c in zip(arm.lrs, arm.curves, strict=True)
        if lr is not None and last in c
    ]
    return spearman([lr for lr, _ in full], [acc for _, acc in full])


def spread(arm: Arm, n_val: int) -> str:
    """How far apart an arm's full-budget accuracies lie, against what `n_val` validation images
    can tell apart: the binomial standard error at their mean."""
    final = [v for v in arm.full if v is not None]
    mean = statistics.mean(final)
    return (
        f"{arm.name}'s trials that ran to the end: {100 * min(final):.2f}-{100 * max(final):.2f}%, "
        f"standard deviation {100 * stdev(final):.2f} points "
        f"(the binomial standard error of {n_val} validation images at {100 * mean:.1f}%: "
        f"{100 * (mean * (1 - mean) / n_val) ** 0.5:.2f} points)."
    )


def rungs(grace: int, reduction: int, max_epochs: int) -> list[int]:
    """The epochs at which ASHA compares trials (Ray's milestones below the budget)."""
    out, rung = [], grace
    while rung < max_epochs:
        out.append(rung)
        rung *= reduction
    return out


def points_below(best: float, random_best: float) -> float:
    """How many points (accuracies given as fractions) `best` ends below random search's."""
    return round(100 * (random_best - best), 6)  # 0.5 is 0.5, not 0.50000001


def meets_target(best: float, random_best: float, share: float) -> bool:
    """The issue's target: within half a point of random search's best, with at most a third of
    its epochs."""
    return points_below(best, random_best) <= TARGET_POINTS and share <= 1 / 3


Rule = Callable[[int, int, float], bool]  # (trial, epoch, accuracy) -> stop it there


def asha_rule(grace: int, reduction: int, max_epochs: int) -> Rule:
    """Ray's ASHA stopping rule: a trial reaching a rung stops when its accuracy is below the
    (1 - 1/reduction) quantile of the accuracies recorded at that rung before it."""
    recorded: dict[int, list[float]] = {m: [] for m in rungs(grace, reduction, max_epochs)}

    def stops(trial: int, epoch: int, value: float) -> bool:
        if epoch not in recorded:
            return False
        before = recorded[epoch]
        stop = bool(before) and bool(value < np.nanpercentile(before, 100 * (1 - 1 / reduction)))
        before.append(value)
        return stop

    return stops


def replay(
    curves: list[dict[int, float]], order: list[int], stops: Rule, max_epochs: int, slots: int
) -> tuple[float, int]:
    """A stopping rule on recorded full learning curves, trials started in `order` as slots
    free up: the best last-epoch accuracy of the trials that ran to the end, and epochs spent."""
    rank = {trial: i for i, trial in enumerate(order)}  # of two epochs ending at once, the
    waiting = list(order)  # trial that arrived first is first at a rung
    running: list[tuple[int, int, int, int]] = []  # (time the epoch ends, rank, trial, epoch)
    finished: list[float] = []
    spent = 0

    def start(now: int) -> None:
        if waiting:
            trial = waiting.pop(0)
            heapq.heappush(running, (now + 1, rank[trial], trial, 1))

    for _ in range(slots):
        start(0)
    while running:
        now, _, trial, epoch = heapq.heappop(running)
        spent += 1
        value = curves[trial][epoch]
        if epoch == max_epochs:
            finished.append(value)
            start(now)
        elif stops(trial, epoch, value):
            start(now)
        else:
            heapq.heappush(running, (now + 1, rank[trial], trial, epoch + 1))
    return max(finished), spent


def replay_table(args: argparse.Namespace, rand: Arm) -> list[str]:
    """ASHA replayed on the random arm's curves (see the module's text), as markdown lines."""
    started = sorted(zip(rand.numbers, rand.curves, strict=True))
    curves = [c for _, c in started if len(c) == args.max_epochs]
    budget = len(curves) * args.max_epochs
    best = max(c[args.max_epochs] for c in curves)
    shuffle = random.Random(0)
    orders = [shuffle.sample(range(len(curves)), len(curves)) for _ in range(args.orders)]
    lines = [
        f"ASHA's rule replayed on the random search's {len(curves)} learning curves, "
        f"{args.orders} random arrival orders, {SLOTS} at a time:",
        "",
        "| first rung | reduction | rungs | below random's best, points: mean / in run order | "
        "share of its epochs: mean / in run order | orders meeting the target |",
        "|---|---|---|---|---|---|",
    ]
    for grace in sorted({1, 2, 3, args.grace}):
        for reduction in sorted({2, 3, 4, args.reduction}):
            runs = [
                replay(
                    curves, o, asha_rule(grace, reduction, args.max_epochs), args.max_epochs, SLOTS
                )
                for o in [list(range(len(curves))), *orders]
            ]
            gaps = [points_below(b, best) for b, _ in runs]
            shares = [e / budget for _, e in runs]
            met = sum(meets_target(b, best, e / budget) for b, e in runs[1:])
            lines.append(
                f"| {grace} | {reduction} | {rungs(grace, reduction, args.max_epochs)} | "
                f"{statistics.mean(gaps[1:]):.2f} / {gaps[0]:.2f} | "
                f"{statistics.mean(shares[1:]):.2f} / {shares[0]:.2f} | "
                f"{100 * met / args.orders:.0f}% |"
            )
    return lines


def plot(arms: list[Arm], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for arm in arms:
        xs, ys = arm.best_so_far()
        ax.step(xs, ys, where="post", marker="o", label=f"{arm.name} ({sum(arm.epochs)} epochs)")
    ax.set_xlabel("epochs trained, summed over trials")
    ax.set_ylabel("best validation accuracy at full budget (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--subset", type=positive, default=2000)
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="of the subset, for validation"
    )
    parser.add_argument("--trials", type=positive, default=12)
    parser.add_argument("--max-epochs", type=positive, default=18)
    parser.add_argument("--grace", type=positive, default=2)
    parser.add_argument("--reduction", type=positive, default=3)
    parser.add_argument("--teacher-epochs", type=positive, default=30)
    parser.add_argument(
        "--seed", type=int, default=0, help="data subset, split, teacher and proposals"
    )
    parser.add_argument("--lr", type=float, help="fix the learning rate instead of searching it")
    parser.add_argument("--orders", type=positive, default=200, help="arrival orders to replay")
    parser.add_argument("--work", help="folder for the studies (default: a temporary one)")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()
    if args.reduction < 2:
        parser.error("--reduction must be at least 2")
    if args.lr is not None and args.lr <= 0:
        parser.error("--lr must be positive")
    n_val = round(args.val_fraction * args.subset)
    if not 0 < n_val < args.subset:
        parser.error("--val-fraction must leave validation and training images")
    work = work_dir(args.work, "kdsearch-quality-")
    # Teacher and heads into the cache first (a one-trial, one-epoch search of the same space
    # reads the same teacher), so neither arm's wall time includes them.
    run_search(space_file(args, work, "warmup"), work, "--trials", "1")
    arms = []
    for name in ("asha", "random"):
        space = space_file(args, work, name)
        wall = run_search(space, work, "--trials", str(args.trials))
        arms.append(read_arm(name, work, wall, args.max_epochs))
    asha, rand = arms
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(arms, out / "search_quality.png")
    lines = [
        f"CIFAR-10 subset of {args.subset} images ({n_val} of them for validation), "
        f"resnet20 -> resnet8, {args.trials} trials of at most {args.max_epochs} epochs, "
        f"{SLOTS} at a time, {trial_device()}, {os.cpu_count()} CPU cores, seed {args.seed}, "
        + ("learning rate searched" if args.lr is None else f"learning rate fixed at {args.lr}"),
        "",
        "| search | trials complete / pruned | epochs trained | wall s | best val acc % |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        complete = sum(v is not None for v in arm.full)
        lines.append(
            f"| {arm.name} | {complete} / {arm.pruned} | {sum(arm.epochs)} | {arm.wall:.0f} | "
            f"{100 * arm.best:.2f} |"
        )
    share = sum(asha.epochs) / sum(rand.epochs)
    lines += [
        "",
        f"ASHA's best minus random's best: {100 * (asha.best - rand.best):+.2f} points, with "
        f"{share:.2f} of its epochs and {asha.wall / rand.wall:.2f} of its wall time: the target "
        f"(within {TARGET_POINTS} points, at most a third of the epochs) is "
        + ("met." if meets_target(asha.best, rand.best, share) else "missed."),
        "",
        spread(rand, n_val),
    ]
    asha_rungs = rungs(args.grace, args.reduction, args.max_epochs)
    searched = args.lr is None
    lines += [
        "",
        "How well an early epoch ranks the random search's trials as their last epoch does "
        + ("and how the learning rate ranks them at that epoch " if searched else "")
        + "(Spearman):",
        "",
        f"| epoch | rank correlation with epoch {args.max_epochs} |"
        + (" learning rate's rank correlation with it |" if searched else ""),
        "|---|---|" + ("---|" if searched else ""),
    ]
    lines += [
        f"| {e}{' (a rung)' if e in asha_rungs else ''} | "
        f"{rank_correlation(rand.curves, e, args.max_epochs):.2f} |"
        + (f" {lr_correlation(rand, e, args.max_epochs):.2f} |" if searched else "")
        for e in range(1, args.max_epochs + 1)
    ]
    lines += ["", *replay_table(args, rand)]
    text = "\n".join(lines) + "\n"
    (out / "search_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run(main)
