"""Student alone against the student distilled with KD, on digits, over several seeds.

    python benchmarks/digits_kd.py [--recipe search_spaces/recipes/digits.yaml] [--seeds 5]

The teacher is trained once (and cached); each seed changes the student's initialisation and the
order and augmentation of its data. Prints validation and test accuracy, mean and spread.
"""

from __future__ import annotations

import statistics

from tables import Table, command_line, device_line, positive, run, stdev

from kdsearch.data import load_data
from kdsearch.recipe import Recipe
from kdsearch.teacher import get_teacher
from kdsearch.train import evaluate_split, resolve_device, train


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--recipe", default="search_spaces/recipes/digits.yaml")
    parser.add_argument("--seeds", type=positive, default=5)
    args = parser.parse_args()
    base = Recipe.load(args.recipe)
    data = load_data(base.data)
    teacher = get_teacher(base, data)
    t_test = evaluate_split(teacher.model, data.test, data, base)[0]
    table = Table(
        f"{device_line(resolve_device(base.device))}, "
        + (f"seeds 0-{args.seeds - 1}, mean ± standard deviation" if args.seeds > 1 else "seed 0"),
        "",
        "| | validation acc % | test acc % |",
        "|---|---|---|",
        f"| teacher {base.teacher.arch} | {100 * teacher.val_acc:.2f} | {100 * t_test:.2f} |",
    )
    kd = base.distill.kd
    variants = {
        f"student {base.student.arch} alone (`distill.kd.weight: 0`)": {"distill.kd.weight": 0.0},
        f"student {base.student.arch} with KD (weight {kd.weight:g}, T {kd.temperature:g})": {},
    }
    for name, changes in variants.items():
        val, test = [], []
        for seed in range(args.seeds):
            recipe = base.override({**changes, "seed": seed})
            result = train(recipe, data, teacher=teacher.model)
            val.append(100 * result.val_acc)
            test.append(100 * evaluate_split(result.student, data.test, data, recipe)[0])
        table.row(
            f"| {name} | {statistics.mean(val):.2f} ± {stdev(val):.2f} | "
            f"{statistics.mean(test):.2f} ± {stdev(test):.2f} |"
        )


if __name__ == "__main__":
    run(main)
