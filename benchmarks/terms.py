"""Training throughput of every distillation term alone, relative to plain KD, in one run.

    python benchmarks/terms.py [--pairs resnet32x4:resnet8x4,wrn_40_2:wrn_16_2] [--steps 4]
                               [--rounds 3] [--device auto] [--out FILE.md]

Each variant is cross-entropy plus one term (`kd`, `pkt`, `crd`, ...; `student alone` is
cross-entropy only) at the term's defaults, trained by kdsearch's own training loop on random
32x32 images with 100 classes, batch 64. Every variant runs two epochs of `--steps` steps; the
second epoch's training images per second is the figure (the first warms up). The variants run
in turn, `--rounds` times; each round's speeds are divided by that round's KD speed, and the
table shows the medians, so a machine whose speed drifts still compares like with like. The
teacher and its heads are untrained: throughput does not depend on the weights. CRD/CKTF memory
banks are sized to this small training set; on CIFAR-100 (50,000 images) their bank product adds
2 x B x N x D = 0.8 GMAC per contrastive layer and step forward and about as much backward (both
embeddings train), 1.6 GMAC; `crd_bank.py` measures what that costs a step (42 ms for CRD on a
2-core Zen 4: 4% of a resnet32x4 -> resnet8x4 CRD step there in fp32, 7% in bf16).
"""

from __future__ import annotations

import statistics

import torch
from tables import Table, command_line, machine_line, pairs, run, step_options

from kdsearch.data import ImageData, Split
from kdsearch.distill import HEAD_TERMS
from kdsearch.losses import LOSSES
from kdsearch.models import build_model
from kdsearch.recipe import Recipe
from kdsearch.train import resolve_device, train

TERMS = ["kd", "pkt", "crd", "cktf", "sskd", "hsakd", "stkd"]
BATCH = 64
CLASSES = 100


def random_data(n_train: int, classes: int = CLASSES, seed: int = 0) -> ImageData:
    """`n_train` random 32x32 training images, and one batch each to validate and test on."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        return Split(x, torch.arange(n) % classes)

    return ImageData(
        "random",
        split(n_train),
        split(BATCH),
        split(BATCH),
        tuple(str(c) for c in range(classes)),
        True,
        (0.5,) * 3,
        (0.25,) * 3,
        "random",
    )


def pair_recipe(teacher_arch: str, student_arch: str, device: str) -> Recipe:
    """KD from `teacher_arch` to `student_arch` for two epochs at batch 64 on `device`."""
    return Recipe.from_dict(
        {
            "data": {"dataset": "synthetic"},
            "teacher": {"arch": teacher_arch},
            "student": {"arch": student_arch},
            "schedule": {"epochs": 2, "kind": "cosine"},
            "batch_size": BATCH,
            "device": device,
        }
    )


def variant(base: Recipe, term: str | None) -> Recipe:
    """`base` with cross-entropy plus `term` at weight 1 (None: cross-entropy alone)."""
    weights = {f"distill.{n}.weight": 0.0 for n in LOSSES if n != "ce"}
    if term is not None:
        weights[f"distill.{term}.weight"] = 1.0
    return base.override(weights)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--pairs", type=pairs, default="resnet32x4:resnet8x4,wrn_40_2:wrn_16_2")
    step_options(parser, steps=4)
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = random_data(args.steps * BATCH)
    table = Table(
        f"{machine_line(device)}, "
        f"batch {BATCH}, {args.steps} timed steps, medians of {args.rounds} rounds",
        "",
        "| teacher -> student | variant | train img/s (median) | relative to KD (median) |",
        "|---|---|---|---|",
    )
    for teacher_arch, student_arch in args.pairs:
        base = pair_recipe(teacher_arch, student_arch, args.device)
        teacher = build_model(teacher_arch, CLASSES, 3)
        heads = {n: LOSSES[n].teacher_heads(teacher, CLASSES) for n in HEAD_TERMS}
        names = ["student alone", *TERMS]
        speeds: dict[str, list[float]] = {name: [] for name in names}
        ratios: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                recipe = variant(base, None if name == "student alone" else name)
                result = train(recipe, data, teacher=teacher, teacher_heads=heads)
                speeds[name].append(result.history[-1].images_per_sec)
            for name in names:
                ratios[name].append(speeds[name][-1] / speeds["kd"][-1])
        for name in names:
            row = (
                f"| {teacher_arch} -> {student_arch} | {name} | "
                f"{statistics.median(speeds[name]):.1f} | {statistics.median(ratios[name]):.2f}x |"
            )
            table.row(row)
    table.save(args.out)


if __name__ == "__main__":
    run(main)
