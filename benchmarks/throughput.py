"""Training throughput of kdsearch's trial loop against a reference loop written the way the
official repositories train, measured in one run.

    python benchmarks/throughput.py [--pairs resnet32x4:resnet8x4,wrn_40_2:wrn_16_2]
        [--methods kd,hsakd,crd] [--steps 4] [--rounds 3] [--device auto] [--workers N]
        [--precisions auto] [--compile] [--out FILE.md]

The reference: a CIFAR-style dataset of uint8 images decoded to PIL and transformed per image
(RandomCrop 32 with padding 4, horizontal flip, ToTensor, Normalize) through a DataLoader, fp32,
NCHW; the teacher under `no_grad`; CRD's negatives drawn per image in the dataset and its memory
gathered as B x (K+1) x D before a batched product (RepDistiller); HSAKD's rotations stacked on
the device after the CPU augmentation (HSAKD); DataLoader workers as the official scripts set
them (RepDistiller: 8, HSAKD: none), capped at this machine's cores, and kept from the warm-up
epoch to the timed one (as a full epoch of 782 steps hides their start-up, which a timed epoch
of a few steps would not); on CUDA with `cudnn.benchmark` on, as both official scripts set it.
Both loops train the same models (kdsearch's zoo and HSAKD heads), batch 64, on the same random
images with 100 classes. Each loop runs one warm-up epoch and one timed epoch of `--steps`
steps; the pairs of loops run `--rounds` times and the table shows the median speeds and the
median of the per-round ratios. kdsearch's loop is timed at each of `--precisions` (the recipe's
`precision`; `auto` is what a recipe gets by default on this device), the reference always in
fp32. Left out of the reference: the per-step `loss.item()` logging and accuracy bookkeeping of
both official scripts (a host-device sync every step on CUDA), so it is if anything faster than
they are. On a GPU a step takes milliseconds: give `--steps` in the hundreds there.

CRD's memory banks hold one row per training image, so here `--steps` x 64 rows, not CIFAR-100's
50,000: kdsearch's product with the whole bank (2 x B x N x D multiply-adds forward, about as
many again backward, since both embeddings train) is cheaper here than there by up to 1.6 GMAC a
step, and the reference's gathers read a bank that fits in cache; `crd_bank.py` measures both.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from tables import Table, command_line, machine_line, names, pairs, run, step_options
from terms import BATCH, CLASSES, pair_recipe, random_data, variant
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdsearch.data import ImageData
from kdsearch.distill import HEAD_TERMS
from kdsearch.losses import LOSSES
from kdsearch.losses.crd import Embed
from kdsearch.losses.hsakd import AuxClassifier
from kdsearch.models import TapModel, build_model
from kdsearch.store import StoreConfig
from kdsearch.train import autocast_dtype, resolve_device, train

METHODS = ("kd", "hsakd", "crd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


# ---------------------------------------------------------------------------------------------
# The reference loop


class CifarStyle(Dataset[Any]):
    """A torchvision-CIFAR-style dataset: PIL image per item, transforms per item; with
    `negatives`, CRD's instance sampler (the index and K indices of other classes)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, negatives: int = 0) -> None:
        self.images, self.labels, self.negatives = images, labels, negatives
        self.transform = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )
        self.others = [np.nonzero(labels != c)[0] for c in range(CLASSES)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image = self.transform(Image.fromarray(self.images[i]))
        label = int(self.labels[i])
        if not self.negatives:
            return image, label
        sample = np.random.choice(self.others[label], self.negatives, replace=True)
        return image, label, i, np.hstack(([i], sample))


def distill_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """RepDistiller's DistillKL."""
    p_s = F.log_softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * temperature**2 / s.shape[0]


class GatherMemory(nn.Module):
    """CRD's memory as the official code computes it: gather (B, K+1, D) rows, then bmm."""

    m_s: Tensor
    m_t: Tensor

    def __init__(self, n: int, dim: int, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("m_s", torch.rand(n, dim) * 2 * bound - bound)
        self.register_buffer("m_t", torch.rand(n, dim) * 2 * bound - bound)
        self.t, self.mom, self.n = temperature, momentum, n
        self.z_s = self.z_t = -1.0

    def forward(self, v_s: Tensor, v_t: Tensor, idx: Tensor, sample: Tensor) -> Tensor:
        b, k1 = sample.shape
        w_s = torch.index_select(self.m_s, 0, sample.view(-1)).view(b, k1, -1)
        w_t = torch.index_select(self.m_t, 0, sample.view(-1)).view(b, k1, -1)
        out_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.t)
        out_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.t)
        if self.z_s < 0:
            self.z_s, self.z_t = out_s.mean().item() * self.n, out_t.mean().item() * self.n
        loss = nce(out_s / self.z_s, self.n) + nce(out_t / self.z_t, self.n)
        with torch.no_grad():
            for memory, v in ((self.m_s, v_s), (self.m_t, v_t)):
                rows = torch.index_select(memory, 0, idx) * self.mom + v.detach() * (1 - self.mom)
                memory.index_copy_(0, idx, F.normalize(rows, dim=1))
        return loss


def nce(x: Tensor, n: int) -> Tensor:
    k = x.shape[1] - 1
    noise = k / n
    pos = torch.log(x[:, 0] / (x[:, 0] + noise + 1e-7))
    neg = torch.log(noise / (x[:, 1:] + noise + 1e-7))
    return -(pos.sum() + neg.sum()) / x.shape[0]


@contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """cuDNN's autotuner on CUDA, as RepDistiller's and HSAKD's scripts turn it on; kdsearch's
    loop runs with its own setting again after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def reference_speed(
    method: str,
    teacher: TapModel,
    student: TapModel,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    workers: int,
    device: torch.device,
) -> float:
    """Images per second of the timed epoch of the reference loop."""
    negatives = 16384 if method == "crd" else 0
    workers = 0 if method == "hsakd" else workers
    loader = DataLoader(
        CifarStyle(images, labels, negatives),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    teacher = teacher.to(device).to(memory_format=torch.contiguous_format).eval()
    student = student.to(device).to(memory_format=torch.contiguous_format).train()
    extra = nn.ModuleDict()
    if method == "crd":
        extra["e_s"], extra["e_t"] = Embed(student.feat_dim, 128), Embed(teacher.feat_dim, 128)
        extra["mem"] = GatherMemory(len(labels), 128)
    if method == "hsakd":
        s_at, t_at = student.head_stages, teacher.head_stages  # a head on each of these stages
        extra["s"] = nn.ModuleList(AuxClassifier(student, i, CLASSES) for i in s_at)
        t_heads = nn.ModuleList(AuxClassifier(teacher, i, CLASSES) for i in t_at)
        t_heads.to(device).eval()
    extra.to(device)
    params = list(student.parameters()) + list(extra.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    seconds = 0.0
    with cudnn_autotune(device):
        for _ in range(2):  # a warm-up epoch, then the timed one
            started = time.perf_counter()
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                if method == "kd":
                    with torch.no_grad():
                        t = teacher(x)
                    s = student(x)
                    loss = F.cross_entropy(s, y) + 0.9 * distill_kl(s, t, 4.0)
                elif method == "crd":
                    with torch.no_grad():
                        t_feat = teacher.taps(x).pooled
                    s_taps = student.taps(x)
                    v_s, v_t = extra["e_s"](s_taps.pooled), extra["e_t"](t_feat)
                    crd = extra["mem"](v_s, v_t, batch[2].to(device), batch[3].to(device))
                    loss = F.cross_entropy(s_taps.logits, y) + 0.8 * crd
                else:
                    x = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(4)], 1)
                    x = x.view(-1, *x.shape[2:])  # interleaved: the 4 rotations of each image
                    with torch.no_grad():
                        t = teacher.taps(x)
                        t_aux = [h(t.stages[i]) for i, h in zip(t_at, t_heads, strict=True)]
                    s = student.taps(x)
                    s_heads: nn.ModuleList = extra["s"]  # type: ignore[assignment]
                    s_aux = [h(s.stages[i]) for i, h in zip(s_at, s_heads, strict=True)]
                    loss = F.cross_entropy(s.logits[0::4], y)
                    loss = loss + distill_kl(s.logits, t.logits, 3.0)
                    for a, b in zip(s_aux, t_aux, strict=True):  # heads learn by KL alone
                        loss = loss + distill_kl(a, b, 3.0)
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
    return steps * BATCH / seconds


# ---------------------------------------------------------------------------------------------
# kdsearch's loop


def kdsearch_speed(
    method: str,
    teacher: TapModel,
    data: ImageData,
    pair: tuple[str, str],
    device: str,
    compiled: bool,
    precision: str,
) -> tuple[float, float]:
    """Images per second of the timed epoch of kdsearch's training loop: with the teacher run
    live, and reading the teacher-output store a previous run of the same recipe wrote (what
    every trial of a search but the first ones to reach an epoch does)."""
    recipe = variant(pair_recipe(*pair, device), method).override(
        {"optim.nesterov": False, "compile": compiled, "precision": precision}
    )
    heads = {n: LOSSES[n].teacher_heads(teacher, CLASSES) for n in HEAD_TERMS}
    live = train(recipe, data, teacher=teacher, teacher_heads=heads)
    with tempfile.TemporaryDirectory(prefix="kdsearch-throughput-") as root:
        store = StoreConfig(Path(root), budget_bytes=2**32, device_bytes=2**30)
        train(recipe, data, teacher=teacher, teacher_heads=heads, store=store)  # writes it
        stored = train(recipe, data, teacher=teacher, teacher_heads=heads, store=store)
    return live.history[-1].images_per_sec, stored.history[-1].images_per_sec


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--pairs", type=pairs, default="resnet32x4:resnet8x4,wrn_40_2:wrn_16_2")
    parser.add_argument("--methods", type=names(METHODS), default="kd,hsakd,crd")
    step_options(parser, steps=4)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument(
        "--precisions", type=names(PRECISIONS), default="auto", help="kdsearch's loop at each"
    )
    parser.add_argument("--compile", action="store_true", help="kdsearch's loop with compile: true")
    args = parser.parse_args()
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    device = resolve_device(args.device)
    precisions: list[str] = args.precisions
    for p in precisions:
        autocast_dtype(p, device)  # fp16 without CUDA fails now, not after a round
    data = random_data(args.steps * BATCH)
    # the reference's dataset holds the same images as numpy HWC arrays, as torchvision's does
    images = data.train.x.permute(0, 2, 3, 1).contiguous().numpy()
    labels = data.train.y.numpy()
    table = Table(
        f"{machine_line(device)}, "
        f"batch {BATCH}, {args.steps} timed steps, medians of {args.rounds} rounds, "
        f"reference DataLoader workers {args.workers} (HSAKD: 0)"
        + (", kdsearch with compile: true" if args.compile else ""),
        "",
        "| teacher -> student | method | reference img/s, fp32 |"
        + "".join(
            f" kdsearch img/s, {p} | kdsearch / reference | kdsearch img/s, {p}, teacher outputs "
            "stored | stored / reference |"
            for p in precisions
        ),
        "|---|---|---|" + "---|---|---|---|" * len(precisions),
    )
    for t_arch, s_arch in args.pairs:
        for method in args.methods:
            ref: list[float] = []
            ours: dict[str, list[float]] = {p: [] for p in precisions}
            stored: dict[str, list[float]] = {p: [] for p in precisions}
            for _ in range(args.rounds):
                torch.manual_seed(0)
                teacher = build_model(t_arch, CLASSES, 3)
                ref.append(
                    reference_speed(
                        method,
                        teacher,
                        build_model(s_arch, CLASSES, 3),
                        images,
                        labels,
                        args.steps,
                        args.workers,
                        device,
                    )
                )
                for p in precisions:
                    live, read = kdsearch_speed(
                        method, teacher, data, (t_arch, s_arch), args.device, args.compile, p
                    )
                    ours[p].append(live)
                    stored[p].append(read)
            row = f"| {t_arch} -> {s_arch} | {method} | {statistics.median(ref):.1f} |"
            for p in precisions:
                for speeds in (ours[p], stored[p]):
                    ratio = statistics.median(o / r for o, r in zip(speeds, ref, strict=True))
                    row += f" {statistics.median(speeds):.1f} | {ratio:.2f}x |"
            table.row(row)
    table.save(args.out)


if __name__ == "__main__":
    run(main)
