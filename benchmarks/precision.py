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
and bf16 alternately, `--rounds` times (medians, and the median of the rounds' ratios; as
benchmarks/terms.py). The accuracy rows' speeds are their whole runs', all fp32 seeds before the
bf16 ones: a rough figure next to the alternated rows. Prints which bf16
instructions the CPU has: where it has none, PyTorch emulates bf16 arithmetic and it cannot be
faster than fp32.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from searches import cifar10_base
from tables import command_line, cpu_name, pairs, positive, run, stdev
from terms import BATCH, CLASSES, pair_recipe, random_data

from kdsearch.data import ImageData, load_data
from kdsearch.models import build_model
from kdsearch.recipe import Recipe
from kdsearch.teacher import get_teacher
from kdsearch.train import cpu_multiplies_bf16, evaluate_split, onednn_isa_cap, train

PRECISIONS = ("fp32", "bf16")


def cpu_bf16() -> str:
    """The CPU's bf16 and AMX instruction flags, or a note that it has none."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return ", ".join(found) if found else "none (no avx512_bf16, no AMX)"


def speed(archs: list[tuple[str, str]], steps: int, rounds: int) -> list[str]:
    """Rows of KD's training speed in fp32 and bf16 for each (teacher, student) of `archs`."""
    data = random_data(steps * BATCH)
    rows = []
    for t_arch, s_arch in archs:
        teacher = build_model(t_arch, CLASSES, 3)
        measured: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for _ in range(rounds):
            for precision in PRECISIONS:
                recipe = pair_recipe(t_arch, s_arch, "cpu").override({"precision": precision})
                result = train(recipe, data, teacher=teacher)
                measured[precision].append(result.history[-1].images_per_sec)
        fp32, bf16 = measured["fp32"], measured["bf16"]
        ratio = statistics.median(b / f for b, f in zip(bf16, fp32, strict=True))
        rows.append(
            f"| {t_arch} -> {s_arch} | {statistics.median(fp32):.1f} | "
            f"{statistics.median(bf16):.1f} | {ratio:.2f}x |"
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


def accuracy(name: str, base: Recipe, data: ImageData, seeds: int) -> list[str]:
    """Rows of fp32 and bf16 training of `base` over `seeds`, from one fp32 teacher."""
    teacher = get_teacher(base.override({"precision": "fp32"}), data).model
    rows = []
    for precision in PRECISIONS:
        val, test, speeds = [], [], []
        for seed in range(seeds):
            recipe = base.override({"seed": seed, "precision": precision, "device": "cpu"})
            result = train(recipe, data, teacher=teacher)
            val.append(100 * result.val_acc)
            test.append(100 * evaluate_split(result.student, data.test, data, recipe)[0])
            speeds.append(result.images_per_sec)
        rows.append(
            f"| {name}, {precision} | {statistics.mean(val):.2f} ± {stdev(val):.2f} "
            f"| {statistics.mean(test):.2f} ± {stdev(test):.2f} "
            f"| {statistics.median(speeds):.0f} |"
        )
    return rows


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument(
        "--pairs", type=pairs, default=[], help="teacher:student,... (default: none)"
    )
    parser.add_argument("--steps", type=positive, default=3)
    parser.add_argument("--rounds", type=positive, default=2)
    parser.add_argument("--seeds", type=positive, default=3)
    parser.add_argument("--root", help="CIFAR-10 as an image folder (adds the CIFAR-10 rows)")
    parser.add_argument("--subset", type=positive, default=5000)
    parser.add_argument("--epochs", type=positive, default=15)
    args = parser.parse_args()
    runs = [("digits KD", Recipe.load("search_spaces/recipes/digits.yaml"))]
    if args.root:
        recipe = cifar_recipe(args.root, args.subset, args.epochs)
        runs.append((f"CIFAR-10 {args.subset:,}, KD", recipe))
    datas = [load_data(recipe.data) for _, recipe in runs]  # a wrong --root fails before training
    native = cpu_multiplies_bf16()
    print(
        f"CPU: {cpu_name()}; bf16 instructions: {cpu_bf16()}; oneDNN capped at: "
        f"{onednn_isa_cap() or 'nothing'}; precision auto here: {'bf16' if native else 'fp32'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(
        f"| run ({args.seeds} seeds) | val acc % | test acc % | train img/s (median) |", flush=True
    )
    print("|---|---|---|---|", flush=True)
    for (name, recipe), data in zip(runs, datas, strict=True):
        for row in accuracy(name, recipe, data, args.seeds):
            print(row, flush=True)
    if args.pairs:
        print(
            "\n| KD training | fp32 img/s | bf16 img/s | bf16 / fp32 |\n|---|---|---|---|",
            flush=True,
        )
        for row in speed(args.pairs, args.steps, args.rounds):
            print(row, flush=True)


if __name__ == "__main__":
    run(main)
