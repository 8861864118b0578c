"""What `compile: true` costs each of several runs in one process, as a reused trial worker's
trials follow each other.

    python benchmarks/compile_reuse.py [--terms kd,hsakd,stkd,kd,crd] [--device auto]
        [--out FILE.md]

Each term in `--terms` is one run, in that order, in this one process: resnet20 -> resnet8,
cross-entropy plus that term, one epoch of the synthetic data (720 training images, batch 64),
with new models and `compile: true` at the default precision. The teacher and its heads are
untrained: compiling does not depend on the weights. The table gives each run's whole `train`
call in seconds and how many graphs torch.compile had made by its end (torch._dynamo's count of
unique graphs): a run that finds its models' graphs already made pays no compilation.
"""

from __future__ import annotations

import time

from tables import Table, command_line, machine_line, names, run
from terms import TERMS, pair_recipe, variant
from torch._dynamo.utils import counters

from kdsearch.data import load_data
from kdsearch.distill import HEAD_TERMS
from kdsearch.losses import LOSSES
from kdsearch.models import build_model
from kdsearch.train import resolve_device, train


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--terms", type=names(TERMS), default="kd,hsakd,stkd,kd,crd")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    base = pair_recipe("resnet20", "resnet8", args.device).override(
        {"compile": True, "schedule.epochs": 1}
    )
    data = load_data(base.data)
    teacher = build_model("resnet20", data.num_classes, data.channels)
    heads = {n: LOSSES[n].teacher_heads(teacher, data.num_classes) for n in HEAD_TERMS}
    table = Table(
        f"{machine_line(device)}, "
        "resnet20 -> resnet8, one epoch of the synthetic data each, in one process",
        "",
        "| run | term | seconds | graphs made so far |",
        "|---|---|---|---|",
    )
    for i, term in enumerate(args.terms, 1):
        started = time.perf_counter()
        train(variant(base, term), data, teacher=teacher, teacher_heads=heads)
        seconds = time.perf_counter() - started
        table.row(f"| {i} | {term} | {seconds:.1f} | {counters['stats']['unique_graphs']} |")
    table.save(args.out)


if __name__ == "__main__":
    run(main)
