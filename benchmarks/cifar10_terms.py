"""Each distillation term alone on a real CIFAR-10 subset, against KD and the student alone.

    python benchmarks/cifar10_terms.py --root DIR [--dataset imagefolder] [--subset 4000]
        [--epochs 10] [--seeds 2] [--teacher resnet20] [--student resnet8] [--teacher-epochs 40]
        [--heads-epochs 20] [--terms kd,pkt,crd,cktf,sskd,hsakd,stkd]

DIR is CIFAR-10 as an image folder (`train/<class>/*.jpg`, `test/...`; the JPEG archive in
../shared/data extracts to one) or, with `--dataset cifar10`, the official pickles. Every variant
is cross-entropy plus one term at its paper weight (below), trained for the same epochs with the
same seeds from the same cached teacher; the figure is the validation accuracy after the last
epoch, mean and spread over seeds.
"""

from __future__ import annotations

import statistics
import time

from tables import command_line, device_line, names, positive, run, stdev

from kdsearch.data import load_data
from kdsearch.losses import LOSSES
from kdsearch.recipe import Recipe
from kdsearch.teacher import get_teacher
from kdsearch.train import resolve_device, train

# The weight each paper trains its term with, in kdsearch's units (PKT: 30000 / 64, see pkt.py).
PAPER_WEIGHTS = {
    "kd": 0.9,
    "pkt": 469.0,
    "crd": 0.8,
    "cktf": 1.0,
    "sskd": 1.0,
    "hsakd": 1.0,
    "stkd": 1.0,
}


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "cifar10"])
    parser.add_argument("--subset", type=positive, default=4000)
    parser.add_argument("--epochs", type=positive, default=10)
    parser.add_argument("--seeds", type=positive, default=2)
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--teacher-epochs", type=positive, default=40)
    parser.add_argument("--heads-epochs", type=positive, default=20)
    parser.add_argument("--terms", type=names(list(PAPER_WEIGHTS)), default=",".join(PAPER_WEIGHTS))
    args = parser.parse_args()
    base = Recipe.from_dict(
        {
            "data": {
                "dataset": args.dataset,
                "root": args.root,
                "subset": args.subset,
                "val_fraction": 0.2,
                "download": False,
            },
            "teacher": {
                "arch": args.teacher,
                "train": {"epochs": args.teacher_epochs, "lr": 0.1},
                "heads": {"epochs": args.heads_epochs, "lr": 0.05},
            },
            "student": {"arch": args.student},
            "distill": {name: {"weight": 0.0} for name in LOSSES if name != "ce"},
            "optim": {"lr": 0.05},
            "schedule": {"epochs": args.epochs, "kind": "cosine"},
        }
    )
    data = load_data(base.data)
    started = time.perf_counter()
    teacher = get_teacher(base, data, heads=True)
    print(
        f"{device_line(resolve_device(base.device))}; "
        f"data: {len(data.train)} train / {len(data.val)} val; teacher {args.teacher} "
        f"val acc {100 * teacher.val_acc:.2f}% ({teacher.source}, "
        f"{time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    print(
        f"| variant ({args.teacher} -> {args.student}, {args.epochs} epochs) | val acc % "
        f"(mean ± sd over {args.seeds} seeds) | per seed | train img/s |",
        flush=True,
    )
    print("|---|---|---|---|", flush=True)
    variants: list[tuple[str, dict[str, float]]] = [("student alone", {})]
    variants += [(t, {f"distill.{t}.weight": PAPER_WEIGHTS[t]}) for t in args.terms]
    for name, changes in variants:
        accs, speeds = [], []
        for seed in range(args.seeds):
            result = train(
                base.override({**changes, "seed": seed}),
                data,
                teacher=teacher.model,
                teacher_heads=teacher.heads,
            )
            accs.append(100 * result.val_acc)
            speeds.append(result.images_per_sec)
        label = name if name == "student alone" else f"{name} (weight {PAPER_WEIGHTS[name]:g})"
        print(
            f"| {label} | {statistics.mean(accs):.2f} ± {stdev(accs):.2f} | "
            f"{', '.join(f'{a:.1f}' for a in accs)} | {statistics.mean(speeds):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    run(main)
