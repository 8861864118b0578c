"""The same searches with and without the teacher-output store, measured in one run.

    python benchmarks/teacher_cache.py [--root DIR] [--only digits,cifar10,r32x4]
        [--r32x4-terms kd,pkt,crd,hsakd] [--r32x4-scale K] [--repeats N] [--work DIR]
        [--out FILE.md]

Each search runs twice, once with `search.teacher_store.enabled: false` (the teacher runs live in
every trial) and once with the store (its default), as `kdsearch run` in a fresh process with
the teacher already cached; the table gives the search's wall time and its trials' training
images per second (median over trials of all the images a trial trained over its training
time, so a trial's figure includes computing its shares of the epochs it was among the first
to reach), and
the ratios. The two arms of a search run the same trials only where its sampler and pruning do
not depend on the order trials finish in (the r32x4 searches: random proposals, no pruning);
the digits and cifar10 searches are TPE with ASHA, so each arm's trials and the epochs they
trained in all are printed, and where those differ, compare the trial speeds, not the walls.
`--repeats N` runs each arm N times, alternating which goes first (live, store, store, live,
...), and gives the medians over the repeats: on a shared machine one run of each is one sample.

- digits: `search_spaces/digits.yaml` as shipped (16 trials, KD plus one extra term);
- cifar10: with `--root` (CIFAR-10 as an image folder), a 2,000-image subset, resnet20 ->
  resnet8, 6 trials of at most 4 epochs searching KD's temperature and weight and the learning
  rate;
- r32x4: with `--root`, resnet32x4 -> resnet8x4 on 256 training images (HSAKD: 128), the
  teacher and its heads trained one epoch (speed does not depend on their accuracy), one search
  per term (KD, PKT, CRD, HSAKD) of trials of 2 epochs searching that term's settings and the
  learning rate (`--r32x4-terms`: some of them); `--r32x4-scale K` takes K times the images, so
  epochs of K times the steps
  (4 steps of 64 images at K = 1, where what an epoch or a trial costs besides its steps
  weighs on the speeds more than in a real search's epochs of hundreds of steps).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from searches import (
    cifar10_kd_search,
    finished_trials,
    run_search,
    shipped_space,
    trial_device,
    work_dir,
    write_space,
)
from tables import Table, command_line, names, run

SEARCHES = ("digits", "cifar10", "r32x4")

R32X4_TERMS: dict[str, tuple[dict[str, Any], dict[str, Any], int, int]] = {
    # term: (its weights in the base recipe, the space, trials, images: 80% train, 20% val)
    "kd": ({}, {"distill.kd.temperature": {"type": "float", "low": 1.0, "high": 8.0}}, 6, 320),
    "pkt": (
        {"pkt": {"weight": 469.0}},
        {"distill.pkt.weight": {"type": "float", "low": 50.0, "high": 2000.0, "log": True}},
        6,
        320,
    ),
    "crd": (
        {"crd": {"weight": 0.8}},
        {"distill.crd.temperature": {"type": "float", "low": 0.03, "high": 0.3, "log": True}},
        6,
        320,
    ),
    "hsakd": (
        {"hsakd": {"weight": 1.0}},
        {"distill.hsakd.placement": {"type": "categorical", "choices": [[1, 2, 3], [2, 3]]}},
        4,
        160,
    ),
}


def searches(
    root: str | None, only: set[str], scale: int = 1, terms: Sequence[str] = tuple(R32X4_TERMS)
) -> dict[str, dict[str, Any]]:
    """The searches to compare, as space documents (the r32x4 ones of `terms`, on `scale` times
    their images)."""
    out: dict[str, dict[str, Any]] = {}
    if "digits" in only:
        here = Path(__file__).resolve().parent.parent / "search_spaces"
        out["digits"] = shipped_space(here / "digits.yaml")
    if root is None:
        return out
    data = {"dataset": "imagefolder", "root": str(Path(root).resolve()), "val_fraction": 0.2}
    lr = {"optim.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}
    if "cifar10" in only:
        out["cifar10"] = cifar10_kd_search(
            root,
            "cifar10",
            subset=2000,
            epochs=4,
            trials=6,
            asha={"grace_epochs": 1, "reduction_factor": 2},
        )
    if "r32x4" in only:
        for term in terms:
            weights, space, trials, images = R32X4_TERMS[term]
            out[f"r32x4-{term}"] = {
                "study": {"name": f"r32x4-{term}"},
                "base": {
                    "data": {**data, "subset": images * scale},
                    "teacher": {
                        "arch": "resnet32x4",
                        "train": {"epochs": 1, "lr": 0.05},
                        "heads": {"epochs": 1, "lr": 0.05},
                    },
                    "student": {"arch": "resnet8x4"},
                    "distill": {"kd": {"weight": 0.9, "temperature": 4.0}, **weights},
                    "schedule": {"epochs": 2, "kind": "cosine"},
                },
                "space": {**space, **lr},
                "search": {"trials": trials, "concurrent": 2, "per_trial": {"cpu": 1}},
                "asha": {"max_epochs": 2, "grace_epochs": 2},
            }
    return out


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--root", help="CIFAR-10 as an image folder (the cifar10, r32x4 rows)")
    parser.add_argument("--only", type=names(SEARCHES), default=",".join(SEARCHES))
    parser.add_argument(
        "--r32x4-scale",
        type=int,
        default=1,
        metavar="K",
        help="the r32x4 searches on K times their images: epochs of 4K steps (default 1)",
    )
    parser.add_argument(
        "--r32x4-terms",
        type=names(tuple(R32X4_TERMS)),
        default=",".join(R32X4_TERMS),
        help="the r32x4 searches to run (default: all four)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, metavar="N", help="runs of each arm (default 1)"
    )
    parser.add_argument("--work", help="folder for the studies (default: a temporary one)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    if args.r32x4_scale < 1 or args.repeats < 1:
        parser.error("--r32x4-scale and --repeats must be at least 1")
    docs = searches(args.root, set(args.only), args.r32x4_scale, args.r32x4_terms)
    skipped = [name for name in args.only if name != "digits" and args.root is None]
    if not docs:
        parser.error(f"--only {','.join(skipped)} needs --root")
    if skipped:
        print(f"without --root, {' and '.join(skipped)} left out", file=sys.stderr)
    work = work_dir(args.work, "kdsearch-teacher-cache-")
    scaled = f"; r32x4 on {args.r32x4_scale}x the images" if args.r32x4_scale > 1 else ""
    if args.repeats > 1:
        scaled += f"; medians of {args.repeats} runs of each arm, alternating which goes first"
    table = Table(
        f"{trial_device()}; {os.cpu_count()} CPU cores; each search with the teacher cached, "
        f"live then stored{scaled}",
        "",
        "| search | trials, live / store | epochs trained, live / store | wall s, live | "
        "wall s, store | trial img/s, live | trial img/s, store | trial speed-up | "
        "search speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    )
    notes: list[str] = []
    for name, doc in docs.items():
        warm = copy.deepcopy(doc)
        warm["study"]["name"] = f"{name}-warmup"
        run_search(write_space(warm, work / f"{name}-warmup.yaml"), work, "--trials", "1")
        runs: dict[str, list[tuple[float, float, int, int]]] = {"live": [], "store": []}
        for repeat in range(args.repeats):
            for arm in ("live", "store") if repeat % 2 == 0 else ("store", "live"):
                study = f"{name}-{arm}" + (f"-{repeat}" if repeat else "")
                arm_doc = copy.deepcopy(doc)
                arm_doc["study"]["name"] = study
                arm_doc["search"]["teacher_store"] = {"enabled": arm == "store"}
                wall = run_search(write_space(arm_doc, work / f"{study}.yaml"), work)
                trials = finished_trials(work, study)
                speed = statistics.median(
                    t.user_attrs["train_images"] / t.user_attrs["train_seconds"]
                    for t in trials
                    if t.user_attrs.get("train_seconds") and "train_images" in t.user_attrs
                )
                done = sum(int(t.user_attrs.get("epochs", 0)) for t in trials)
                runs[arm].append((wall, speed, len(trials), done))
        walls = {arm: statistics.median(r[0] for r in runs[arm]) for arm in runs}
        speeds = {arm: statistics.median(r[1] for r in runs[arm]) for arm in runs}
        counts = {arm: "/".join(sorted({str(r[2]) for r in runs[arm]})) for arm in runs}
        epochs = {arm: "/".join(sorted({str(r[3]) for r in runs[arm]})) for arm in runs}
        row = (
            f"| {name} | {counts['live']} / {counts['store']} | "
            f"{epochs['live']} / {epochs['store']} | {walls['live']:.1f} | "
            f"{walls['store']:.1f} | {speeds['live']:.1f} | {speeds['store']:.1f} | "
            f"{speeds['store'] / speeds['live']:.2f}x | {walls['live'] / walls['store']:.2f}x |"
        )
        table.row(row)
        if epochs["live"] != epochs["store"]:
            notes.append(
                f"{name}: the arms trained {epochs['live']} and {epochs['store']} epochs in all "
                "(ASHA stopped other trials): compare its trial speeds, not its walls"
            )
    for note in notes:  # under the table, not within it
        table.row(f"\n{note}")
    table.save(args.out)


if __name__ == "__main__":
    run(main)
