"""What `precision: bf16` gains and costs on the CPU, against fp32, measured in one run.

    python benchmarks/precision.py [--seeds 3] [--root DIR] [--subset 5000] [--epochs 15]
        [--pairs resnet32x4:resnet8x4,...] [--steps 3] [--rounds 2]

Accuracy and speed on digits: the digits recipe (search_spaces/recipes/digits.yaml, resnet20 ->
resnet8 with KD) trained in fp32 and in bf16 with the same seeds and the same fp32 teacher;
validation and test accuracy, mean and spread over `--seeds`, and training images per second
(median over seeds). With `--root` (CIFAR-10 as an image folder), the same on a `--subset` of
CIFAR-10 (80% train, 20% validation; the test split in full): resnet20 -> resnet8 with KD for
`--epochs`, the teacher trained once in fp32 for 30 epochs (cached). With `--pairs`, also KD
training images per second of each pair on random 32x32 images with 100 classes, batch 64, fp32
and bf16 alternately, `--rounds` times (medians; as benchmarks/terms.py). Prints which bf16
instructions the CPU has: where it has none, PyTorch emulates bf16 arithmetic and it cannot be
faster than fp32.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from searches import cifar10_base
from terms import BATCH, pair_recipe, random_data

from kdsearch.data import load_data
from kdsearch.models import build_model
from kdsearch.recipe import Recipe
from kdsearch.teacher import get_teacher
from kdsearch.train import evaluate_split, train

PRECISIONS = ("fp32", "bf16")


def cpu_bf16() -> str:
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return ", ".join(found) if found else "none (no avx512_bf16, no AMX)"


def speed(pairs: list[str], steps: int, rounds: int) -> list[str]:
    data = random_data(steps * BATCH)
    rows = []
    for pair in pairs:
        t_arch, s_arch = pair.split(":")
        teacher = build_model(t_arch, 100, 3)
        measured: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for _ in range(rounds):
            for precision in PRECISIONS:
                recipe = pair_recipe(t_arch, s_arch, "cpu").override({"precision": precision})
                result = train(recipe, data, teacher=teacher)
                measured[precision].append(result.history[-1].images_per_sec)
        fp32, bf16 = (statistics.median(measured[p]) for p in PRECISIONS)
        rows.append(
            f"| {t_arch} -> {s_arch} KD | {fp32:.1f} img/s | {bf16:.1f} img/s | "
            f"{bf16 / fp32:.2f}x |"
        )
    return rows


def cifar_recipe(root: str, subset: int, epochs: int) -> Recipe:
    """resnet20 -> resnet8 with KD on a CIFAR-10 subset."""
    return Recipe.from_dict(
        {
            **cifar10_base(root, subset, epochs),
            "distill": {"ce": {"weight": 1.0}, "kd": {"weight": 0.9, "temperature": 4.0}},
            "optim": {"lr": 0.05},
            "batch_size": 64,
        }
    )


def accuracy(name: str, base: Recipe, seeds: int) -> list[str]:
    """Rows of fp32 and bf16 training of `base` over `seeds`, from one fp32 teacher."""
    data = load_data(base.data)
    teacher = get_teacher(base.override({"precision": "fp32"}), data).model
    rows = []
    for precision in PRECISIONS:
        val, test, speed = [], [], []
        for seed in range(seeds):
            recipe = base.override({"seed": seed, "precision": precision, "device": "cpu"})
            result = train(recipe, data, teacher=teacher)
            val.append(100 * result.val_acc)
            test.append(100 * evaluate_split(result.student, data.test, data, recipe)[0])
            speed.append(result.images_per_sec)
        rows.append(
            f"| {name}, {precision} | {statistics.mean(val):.2f} ± {statistics.stdev(val):.2f} "
            f"| {statistics.mean(test):.2f} ± {statistics.stdev(test):.2f} "
            f"| {statistics.median(speed):.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="", help="teacher:student,... (default: none)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--root", help="CIFAR-10 as an image folder (adds the CIFAR-10 rows)")
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    print(
        f"CPU bf16 instructions: {cpu_bf16()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(f"| run ({args.seeds} seeds) | val acc % | test acc % | train img/s |", flush=True)
    print("|---|---|---|---|", flush=True)
    runs = [("digits KD", Recipe.load("search_spaces/recipes/digits.yaml"))]
    if args.root:
        recipe = cifar_recipe(args.root, args.subset, args.epochs)
        runs.append((f"CIFAR-10 {args.subset} KD", recipe))
    for name, recipe in runs:
        for row in accuracy(name, recipe, args.seeds):
            print(row, flush=True)
    if args.pairs:
        print("\n| training | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|", flush=True)
        for row in speed(args.pairs.split(","), args.steps, args.rounds):
            print(row, flush=True)


if __name__ == "__main__":
    main()
