"""Channels-last against NCHW for the convolutions a KD step runs, in one run.

    python benchmarks/layout.py [--pairs resnet20:resnet8,resnet32x4:resnet8x4,wrn_40_2:wrn_16_2]
        [--threads 1,2] [--steps 8] [--rounds 3] [--device auto] [--precision fp32]
        [--out FILE.md]

For each pair and thread count: milliseconds of a student training step (forward, cross-entropy,
backward, SGD step) and of the teacher's forward pass under inference mode, on a random batch of
64 32x32 images with 100 classes, with models and batch in NCHW and in channels-last, and of the
channels-last forward pass with the teacher's batch norms folded into its convolutions, as a
trial runs its frozen teacher (`fold_batch_norm`; the batch norms carry running statistics and
affine maps a trained teacher could have, so that no folded one is the identity). Each figure
is the mean of `--steps` calls after two warm-up calls (the two forward passes' calls
interleaved); the layouts alternate `--rounds` times and the table shows the medians and the
median of the per-round ratios. kdsearch trains channels-last on every device; this is the
measurement behind that choice and behind folding.
`--precision` is a recipe's (`auto`, `fp32`, `bf16`): every pass runs under its autocast. The
columns also estimate what the teacher-output store can gain: a KD step that no longer runs the
teacher saves about the forward pass, (step + folded forward) / step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tables import Table, command_line, device_line, pairs, positive, run, step_options
from torch import nn

from kdsearch.models import build_model, fold_batch_norm
from kdsearch.train import autocast, autocast_dtype, resolve_device

BATCH = 64
CLASSES = 100
PAIRS = "resnet20:resnet8,resnet32x4:resnet8x4,wrn_40_2:wrn_16_2"
LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


def mean_ms(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Mean milliseconds of `fn` over `steps` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return 1000 * (time.perf_counter() - started) / steps


def interleaved_ms(
    first: Callable[[], object], second: Callable[[], object], steps: int, device: torch.device
) -> tuple[float, float]:
    """Mean milliseconds of each of `first` and `second` over `steps` calls, after two warm-up
    calls of each. The calls alternate, in turn first-second and second-first, so that the
    machine's drift and whatever one call leaves warm for the next fall on both alike."""
    for _ in range(2):
        first()
        second()
    total = [0.0, 0.0]
    for i in range(steps):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            sync(device)
            started = time.perf_counter()
            (first, second)[which]()
            sync(device)
            total[which] += time.perf_counter() - started
    return 1000 * total[0] / steps, 1000 * total[1] / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trained_looking(teacher: nn.Module) -> nn.Module:
    """`teacher`, frozen, with batch-norm statistics and affine maps away from a fresh model's
    identity (folding an identity would skip nothing a trained teacher's folding does not)."""
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None  # the zoo tracks them
            nn.init.normal_(m.running_mean, std=0.3)
            nn.init.uniform_(m.running_var, 0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.1)
    return teacher.eval().requires_grad_(False)


def step_and_forward(
    t_arch: str,
    s_arch: str,
    layout: torch.memory_format,
    steps: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[float, float, float]:
    """Milliseconds of a student step, of a teacher forward pass and of the folded teacher's
    forward pass, in `layout`."""
    torch.manual_seed(0)
    student = build_model(s_arch, CLASSES, 3).to(device).to(memory_format=layout)
    teacher = trained_looking(build_model(t_arch, CLASSES, 3))
    folded = fold_batch_norm(teacher).to(device).to(memory_format=layout)
    teacher = teacher.to(device).to(memory_format=layout)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(BATCH, 3, 32, 32, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)

    def step() -> None:
        with autocast(device, dtype):
            loss = F.cross_entropy(student(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def forward(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode(), autocast(device, dtype):
                model(x)

        return call

    return mean_ms(step, steps, device), *interleaved_ms(
        forward(teacher), forward(folded), steps, device
    )


def thread_counts(text: str) -> list[int]:
    """`--threads`: a comma-separated list of thread counts (an argparse type)."""
    return [positive(t) for t in text.split(",")]


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--pairs", type=pairs, default=PAIRS)
    parser.add_argument("--threads", type=thread_counts, default="1,2")
    step_options(parser, steps=8)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    table = Table(
        f"{device_line(device)}, torch {torch.__version__}, "
        f"{dtype or torch.float32}, batch {BATCH}, means of {args.steps} calls, "
        f"medians of {args.rounds} rounds",
        "",
        "| teacher -> student | threads | student step ms, NCHW / channels-last | speed-up "
        "| teacher forward ms, NCHW / channels-last | speed-up "
        "| folded forward ms, channels-last | speed-up over channels-last |",
        "|---|---|---|---|---|---|---|---|",
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        for t_arch, s_arch in args.pairs:
            runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in LAYOUTS}
            for _ in range(args.rounds):
                for name, layout in LAYOUTS.items():
                    runs[name].append(
                        step_and_forward(t_arch, s_arch, layout, args.steps, device, dtype)
                    )
            cells = []
            for part in (0, 1):
                nchw = [r[part] for r in runs["nchw"]]
                last = [r[part] for r in runs["channels-last"]]
                ratio = statistics.median(a / b for a, b in zip(nchw, last, strict=True))
                cells.append(
                    f"{statistics.median(nchw):.1f} / {statistics.median(last):.1f} | {ratio:.2f}x"
                )
            last = [r[1] for r in runs["channels-last"]]
            folded = [r[2] for r in runs["channels-last"]]
            ratio = statistics.median(a / b for a, b in zip(last, folded, strict=True))
            cells.append(f"{statistics.median(folded):.1f} | {ratio:.2f}x")
            table.row(f"| {t_arch} -> {s_arch} | {threads} | {' | '.join(cells)} |")
    table.save(args.out)


if __name__ == "__main__":
    run(main)
