"""Student alone against the student distilled with KD, on digits, over several seeds.

    python benchmarks/digits_kd.py [--recipe search_spaces/recipes/digits.yaml] [--seeds 5]

The teacher is trained once (and cached); each seed changes the student's initialisation and the
order and augmentation of its data. Prints validation and test accuracy, mean and spread.
"""

from __future__ import annotations

import argparse
import statistics

from kdsearch.data import load_data
from kdsearch.recipe import Recipe
from kdsearch.teacher import get_teacher
from kdsearch.train import evaluate_split, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="search_spaces/recipes/digits.yaml")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    base = Recipe.load(args.recipe)
    data = load_data(base.data)
    teacher = get_teacher(base, data)
    t_test = evaluate_split(teacher.model, data.test, data, base)[0]
    print(
        f"teacher {base.teacher.arch}: val {100 * teacher.val_acc:.2f}%  test {100 * t_test:.2f}%"
    )
    variants = {
        "student alone (kd weight 0)": {"distill.kd.weight": 0.0},
        f"KD (weight {base.distill.kd.weight}, T {base.distill.kd.temperature})": {},
    }
    print(f"{'student ' + base.student.arch:<34} {'val acc %':>16} {'test acc %':>16}  seeds")
    for name, changes in variants.items():
        val, test = [], []
        for seed in range(args.seeds):
            recipe = base.override({**changes, "seed": seed})
            result = train(recipe, data, teacher=teacher.model)
            val.append(100 * result.val_acc)
            test.append(100 * evaluate_split(result.student, data.test, data, recipe)[0])
        print(
            f"{name:<34} {statistics.mean(val):7.2f} ± {statistics.stdev(val):5.2f}  "
            f"{statistics.mean(test):7.2f} ± {statistics.stdev(test):5.2f}  {args.seeds}"
        )


if __name__ == "__main__":
    main()
