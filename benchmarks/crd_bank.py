"""What CRD's memory costs a training step as the training set grows, in kdsearch's loop and in
the reference loop of `throughput.py`, measured in one run.

    python benchmarks/crd_bank.py [--banks 256,50000] [--steps 20] [--rounds 3]
                                  [--device auto] [--out FILE.md]

`throughput.py` trains on `--steps` x 64 random images, so CRD's memory banks hold a few hundred
rows, where CIFAR-100's hold one per training image (45,000 with kdsearch's validation split
taken out, 50,000 in the papers). kdsearch scores each anchor with one product against the whole
bank (cost growing with it); the reference gathers the K + 1 rows it samples (cost growing only
as the bank leaves the caches). This times, per training step of batch 64, CRD's part of the
step alone, at each bank size: a 256-wide student and teacher feature (resnet8x4's and
resnet32x4's) embedded to 128, scored against 16,384 negatives of other classes, the NCE loss,
the memories' momentum update and the backward pass through both embeddings, as kdsearch's
`ContrastiveLayer` computes it (negatives drawn on the device in the step; fp32, as under any
autocast) and as the reference's `GatherMemory` does (negatives drawn beforehand, as RepDistiller's
data loader draws them in its worker processes, outside the training step). Each figure is the
median over `--steps` timed steps after three untimed ones, and the median of `--rounds` rounds;
the last columns are the milliseconds a step at each larger bank costs beyond one at the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tables import Table, command_line, machine_line, positive, run, step_options
from terms import BATCH, CLASSES
from throughput import GatherMemory

from kdsearch.data import Batch
from kdsearch.losses import BuildContext, Step
from kdsearch.losses.crd import ContrastiveLayer, Embed
from kdsearch.models import build_model
from kdsearch.train import resolve_device

NEGATIVES = 16384
DIM = 128


def banks(text: str) -> list[int]:
    """`--banks`: comma-separated bank sizes (rows, one a training image), at least 100 each so
    that every one of the 100 classes has an image."""
    sizes = sorted({positive(part) for part in text.split(",")})
    if sizes[0] < CLASSES:
        raise argparse.ArgumentTypeError(
            f"a bank of {sizes[0]} rows holds fewer than {CLASSES} classes"
        )
    return sizes


def median_ms(step: Callable[[], float], steps: int) -> float:
    """Median milliseconds of what `step()` times of itself, over `steps` calls after three
    untimed ones."""
    times = [step() for _ in range(steps + 3)][3:]
    return 1000 * statistics.median(times)


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kdsearch_ms(n: int, steps: int, device: torch.device) -> float:
    """A step of kdsearch's CRD objective with a bank of `n` rows, its negatives' draw included."""
    labels = (torch.arange(n) % CLASSES).to(device)
    ctx = BuildContext(
        build_model("resnet8x4", CLASSES, 3),
        build_model("resnet32x4", CLASSES, 3),
        CLASSES,
        train_labels=labels,
        image_shape=(3, 32, 32),
    )
    layer = ContrastiveLayer(
        256, 256, ctx, feat_dim=DIM, temperature=0.07, negatives=NEGATIVES, momentum=0.5
    ).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    seeds = iter(range(2**31))

    def step() -> float:
        idx = torch.randint(0, n, (BATCH,), generator=gen, device=device)
        batch = Batch(torch.empty(0, device=device), labels[idx], idx)
        f_s = torch.randn(BATCH, 256, device=device, requires_grad=True)
        f_t = torch.randn(BATCH, 256, device=device)
        synced(device)
        started = time.perf_counter()
        terms_see = Step(batch, ctx.student.taps, None, seed=next(seeds))  # no model runs
        loss = layer(f_s, f_t, terms_see)
        loss.backward()
        synced(device)
        return time.perf_counter() - started

    return median_ms(step, steps)


def reference_ms(n: int, steps: int, device: torch.device) -> float:
    """A step of the reference's CRD objective with a bank of `n` rows, its negatives drawn
    before (in the data loader's workers there; which rows they are does not change what
    gathering them costs, so here they are any rows)."""
    memory = GatherMemory(n, DIM).to(device)
    embed_s, embed_t = Embed(256, DIM).to(device), Embed(256, DIM).to(device)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        idx = torch.randint(0, n, (BATCH,), generator=gen)
        sample = torch.cat(
            [idx[:, None], torch.randint(0, n, (BATCH, NEGATIVES), generator=gen)], 1
        )
        idx, sample = idx.to(device), sample.to(device)
        f_s = torch.randn(BATCH, 256, device=device, requires_grad=True)
        f_t = torch.randn(BATCH, 256, device=device)
        synced(device)
        started = time.perf_counter()
        loss = memory(embed_s(f_s), embed_t(f_t), idx, sample)
        loss.backward()
        synced(device)
        return time.perf_counter() - started

    return median_ms(step, steps)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--banks", type=banks, default="256,50000")
    step_options(parser, steps=20)
    args = parser.parse_args()
    device = resolve_device(args.device)
    sizes: list[int] = args.banks
    first = sizes[0]
    table = Table(
        f"{machine_line(device)}, "
        f"batch {BATCH}, {NEGATIVES} negatives, medians of {args.steps} steps and "
        f"{args.rounds} rounds",
        "",
        "| bank rows | kdsearch ms/step | reference ms/step | kdsearch, beyond "
        f"{first} rows | reference, beyond {first} rows |",
        "|---|---|---|---|---|",
    )
    ours: dict[int, float] = {}
    ref: dict[int, float] = {}
    for n in sizes:
        torch.manual_seed(0)
        ours[n] = statistics.median(kdsearch_ms(n, args.steps, device) for _ in range(args.rounds))
        ref[n] = statistics.median(reference_ms(n, args.steps, device) for _ in range(args.rounds))
        table.row(
            f"| {n} | {ours[n]:.1f} | {ref[n]:.1f} | {ours[n] - ours[first]:+.1f} | "
            f"{ref[n] - ref[first]:+.1f} |"
        )
    table.save(args.out)


if __name__ == "__main__":
    run(main)
