"""One training run: a student distilled from a frozen teacher, as a recipe says.

`train` knows nothing of Ray or Optuna; it calls `report` once per epoch, and whoever drives it
(the CLI, a search trial, a promotion run) decides what to do with the figures. A report that is
also a `BatchReport` (the CLI's progress bars) hears of every training batch as well.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.data import ImageData, Loader, Split, derive_seed
from kdsearch.distill import Distiller
from kdsearch.errors import KdsearchWarning, NonFiniteLoss, RecipeError
from kdsearch.losses import BuildContext, Step
from kdsearch.losses.base import TapsFn
from kdsearch.models import TapModel, Taps, build_model, count_parameters, fold_batch_norm
from kdsearch.recipe import OptimConfig, Recipe
from kdsearch.store import StoreConfig, StoreReader

EVAL_BATCH = 512
# a recipe's precision and its autocast dtype (None: plain fp32)
DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# oneDNN's `MAX_CPU_ISA` settings below AVX-512 BF16: under them its bf16 kernels are emulated
ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)
# and the settings that cap it higher (oneDNN 3's names); ALL, DEFAULT and names it does not know
# cap nothing
ISA_CAPS = ISAS_WITHOUT_BF16 | {
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
}
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch measured. `epoch` counts from 1."""

    epoch: int
    train_loss: float
    parts: dict[str, float]
    val_acc: float
    val_loss: float
    lr: float
    images_per_sec: float
    seconds: float  # the training steps
    eval_seconds: float  # the validation pass after them


@dataclass
class Result:
    """A finished run: the trained student (heads dropped) and its learning curve."""

    student: TapModel
    history: list[EpochStats] = field(default_factory=list)
    params: int = 0
    seconds: float = 0.0

    @property
    def val_acc(self) -> float:
        """Validation accuracy after the last epoch: the model that is kept."""
        return self.history[-1].val_acc

    @property
    def images_per_sec(self) -> float:
        """Training throughput over the whole run."""
        images = sum(s.images_per_sec * s.seconds for s in self.history)
        return images / max(sum(s.seconds for s in self.history), 1e-9)


Report = Callable[[EpochStats], None]


@runtime_checkable
class BatchReport(Protocol):
    """A report that also follows an epoch batch by batch (an epoch may take minutes)."""

    def __call__(self, stats: EpochStats) -> None: ...

    def batch(self, done: int, total: int) -> None: ...


def batch_ticks(report: Report | None) -> Callable[[int, int], None] | None:
    """The batch callback of `report`, if it has one."""
    return report.batch if isinstance(report, BatchReport) else None


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device: {name} asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise RecipeError(
            f"device: {name} asked for, but this machine's are cuda:0 to cuda:{count - 1}"
        )
    return device


def autocast_dtype(
    precision: str, device: torch.device, cap: str | None = None
) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, under the cap `cap` on oneDNN's
    instruction set (this process's where None); None means plain fp32.

    `auto` is bf16 where the hardware multiplies in bf16 natively: GPUs of compute capability 8
    and later (Ampere on; no loss scaling needed) and CPUs with AVX-512 BF16 or AMX, where
    oneDNN's bf16 convolutions train 1.6-3.6x faster than fp32 at the same accuracy
    (benchmarks/README.md, "bf16 on the CPU"); fp16 with loss scaling on GPUs of capability 7
    (Volta, Turing: fp16 tensor cores, bf16 emulated); fp32 on older GPUs and on other CPUs,
    which emulate bf16 slowly, as oneDNN does under a user's cap on its instruction set below
    AVX-512 BF16.
    """
    if precision == "auto":
        if device.type == "cuda":
            major = torch.cuda.get_device_capability(device)[0]
            return torch.bfloat16 if major >= 8 else torch.float16 if major == 7 else None
        return torch.bfloat16 if device.type == "cpu" and cpu_multiplies_bf16(cap) else None
    if precision == "fp16" and device.type != "cuda":
        raise RecipeError("precision: fp16 needs CUDA; use bf16 or fp32 on the CPU")
    return DTYPES[precision]


def trained_precision(recipe: Recipe, device: torch.device, cap: str | None = None) -> str:
    """The precision a run of `recipe` trains in on `device` (what `auto` becomes there, under
    the cap `cap` on oneDNN, this process's where None), as a recipe writes it: a study and an
    export record it beside the device."""
    dtype = autocast_dtype(recipe.precision, device, cap)
    return next(name for name, d in DTYPES.items() if d is dtype)


def free_device_memory() -> None:
    """Give the GPU memory this process's allocator caches but no longer uses back to the GPU,
    for the other processes (trials) sharing it. Nothing to do where CUDA was never started."""
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        gc.collect()  # tensors that only reference cycles still hold
        torch.cuda.empty_cache()


def cpu_multiplies_bf16(cap: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware, as oneDNN's bf16 kernels need to beat fp32:
    AVX-512 BF16's dot products (Intel from Cooper Lake, AMD from Zen 4) or AMX tiles. Elsewhere
    PyTorch emulates bf16, at a tenth of fp32's speed on an AVX2-only EPYC
    (benchmarks/README.md), and so does oneDNN under a cap on its instruction set below AVX-512
    BF16: `cap`, or where None, this process's."""
    if (onednn_isa_cap() if cap is None else cap) in ISAS_WITHOUT_BF16:
        return False
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(avx512_bf16 is not None and avx512_bf16()) or cpu_has_amx()


def onednn_isa_cap() -> str:
    """The instruction set the user caps oneDNN at, upper-cased, as oneDNN reads it:
    `ONEDNN_MAX_CPU_ISA`, else the older `DNNL_MAX_CPU_ISA`, an empty one skipped; "" where
    none is set or the setting caps nothing (ALL, DEFAULT, a name oneDNN does not know)."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if value := os.environ.get(name, ""):
            return recorded_cap(value) or ""  # (one oneDNN does not know: ignored, as it does)
    return ""


def kernel_cap(device: torch.device) -> str:
    """The cap on oneDNN's instruction set a run on `device` trains under, as a study records it
    beside the precision: it changes oneDNN's CPU kernels, and so the weights, in any precision.
    "" where none is set, and on CUDA, whose kernels are cuDNN's."""
    return onednn_isa_cap() if device.type == "cpu" else ""


def arithmetic(precision: str | None, cap: str | None) -> str:
    """How a run did its arithmetic, as notes name it: "in bf16", "in fp32 under
    ONEDNN_MAX_CPU_ISA=AVX2" (`cap`, "" or None: none set, or none recorded)."""
    said = f"in {precision}" if precision else "in a precision not recorded"
    return said + (f" under ONEDNN_MAX_CPU_ISA={cap}" if cap else "")


def unlike(seen: set[str], how: str) -> str | None:
    """How the runs before did their arithmetic (`seen`, each as `arithmetic` says it), said as
    one, where a new run's `how` is none of them; None where it is one, or none came before.
    `how` joins `seen`."""
    said = " or ".join(sorted(seen)) if seen and how not in seen else None
    seen.add(how)
    return said


def recorded_cap(value: object) -> str | None:
    """A cap on oneDNN as a study or meta.json records it, as `onednn_isa_cap` would give it;
    None where it is not recorded, or not a cap (a hand-edited file)."""
    if not isinstance(value, str):
        return None
    if value.upper() in ("", "ALL", "DEFAULT"):
        return ""
    return value.upper() if value.upper() in ISA_CAPS else None


def cpu_has_amx() -> bool:
    """Whether this process can use AMX tiles (Intel Sapphire Rapids and later), which oneDNN
    uses for bf16 matrix products: the CPU has them and the kernel lets the process use them."""
    has = getattr(torch.cpu, "_is_amx_tile_supported", None)
    enable = getattr(torch.cpu, "_init_amx", None)
    return bool(has is not None and enable is not None and has() and enable())


def lr_at(recipe: Recipe, epoch: int) -> float:
    """The learning rate of epoch `epoch` (counted from 0)."""
    s = recipe.schedule
    if s.kind == "cosine":
        return cosine(recipe.optim.lr, epoch, s.epochs)
    return float(recipe.optim.lr * s.gamma ** sum(epoch >= m for m in s.milestones))


def cosine(lr: float, epoch: int, epochs: int) -> float:
    """Cosine annealing from `lr` to 0 over `epochs`, set once per epoch."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def sgd(params: Iterable[nn.Parameter], opt: OptimConfig, lr: float) -> torch.optim.SGD:
    """SGD with the recipe's momentum, weight decay and Nesterov setting."""
    return torch.optim.SGD(
        params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate, set once per epoch."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def descend(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, total: torch.Tensor
) -> None:
    """One optimizer step down `total`'s gradients, through the loss scaling fp16 needs (a
    scaler that is not enabled passes them as they are)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()  # type: ignore[no-untyped-call]
    scaler.step(optimizer)
    scaler.update()


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[None]:
    """Mixed precision where asked for, a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train(
    recipe: Recipe,
    data: ImageData,
    report: Report | None = None,
    *,
    teacher: TapModel | None = None,
    teacher_heads: Mapping[str, nn.Module] | None = None,
    store: StoreConfig | None = None,
) -> Result:
    """Train the recipe's student on `data`, distilling from `teacher` (and the heads trained on
    it, for the terms that read them); report every epoch. With `store`, the teacher's outputs
    are read from (or computed once into) the teacher-output store, where the terms allow."""
    device = resolve_device(recipe.device)
    dtype = autocast_dtype(recipe.precision, device)
    torch.manual_seed(recipe.seed)
    student = place(build_model(recipe.student.arch, data.num_classes, data.channels), device)
    if teacher is not None:
        teacher = ready(teacher, device)
    heads = {name: ready(h, device) for name, h in (teacher_heads or {}).items()}
    ctx = BuildContext(
        student,
        teacher,
        data.num_classes,
        train_labels=data.train.y.to(device),
        image_shape=(data.channels, data.image_size, data.image_size),
        teacher_heads=heads,
    )
    distiller = place(Distiller.build(recipe, ctx), device)
    optimizer = sgd(distiller.parameters(), recipe.optim, recipe.optim.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = Loader(
        data.train,
        data,
        device,
        batch_size=recipe.batch_size,
        train=True,
        seed=recipe.seed,
    )
    val_loader = Loader(data.val, data, device, batch_size=EVAL_BATCH, train=False)
    student_taps = taps_fn(student, recipe.compile, device)
    teacher_taps = None if teacher is None else taps_fn(teacher, recipe.compile, device)
    graphs = isinstance(student_taps, CompiledTaps) and student_taps.graphs
    result = Result(student, params=count_parameters(student))
    from_store = None
    if store is not None and teacher_taps is not None:
        from_store = StoreReader.open(
            store, recipe, data, distiller, teacher_taps, heads, loader, dtype
        )
    tick = batch_ticks(report)
    started = time.perf_counter()
    for epoch in range(recipe.schedule.epochs):
        lr = lr_at(recipe, epoch)
        set_lr(optimizer, lr)
        distiller.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        part_sums: dict[str, torch.Tensor] = {}
        epoch_outputs = None  # the last epoch's, off the device before the next is placed
        with autocast(device, dtype):
            epoch_outputs = None if from_store is None else from_store.epoch(epoch)
        for b, batch in enumerate(loader.epoch(epoch)):
            seed = derive_seed(recipe.seed, f"step{epoch}.{b}")
            rows = None if epoch_outputs is None else epoch_outputs.rows(batch.idx, device)
            step = Step(
                batch,
                student_taps,
                teacher_taps,
                rotations=distiller.rotations,
                seed=seed,
                stored=rows,
            )
            with autocast(device, dtype):
                total, parts = distiller.loss(step)
            descend(optimizer, scaler, total)
            loss_sum += total.detach()
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0) + value.detach()
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
            if tick is not None:
                tick(b + 1, len(loader))
        steps = len(loader)
        train_loss = loss_sum.item() / steps  # the one host sync of the epoch's training
        seconds = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(epoch + 1, train_loss)
        t1 = time.perf_counter()
        val_acc, val_loss = evaluate(student, val_loader, dtype)
        if not math.isfinite(val_loss):  # the epoch's last updates diverged after its losses
            raise NonFiniteLoss(epoch + 1, val_loss, "validation")
        stats = EpochStats(
            epoch=epoch + 1,
            train_loss=train_loss,
            parts={name: float(v) / steps for name, v in part_sums.items()},
            val_acc=val_acc,
            val_loss=val_loss,
            lr=lr,
            images_per_sec=loader.images / seconds,
            seconds=seconds,
            eval_seconds=time.perf_counter() - t1,
        )
        result.history.append(stats)
        if report is not None:
            report(stats)
    result.seconds = time.perf_counter() - started
    student.eval()
    return result


def taps_fn(model: TapModel, compiled: bool, device: torch.device) -> TapsFn:
    """The model's taps, through `torch.compile` when asked."""
    return CompiledTaps(model, device) if compiled else model.taps


class CompiledTaps:
    """`torch.compile` of a model's taps that falls back to eager execution, once and for the
    rest of the run, where compilation fails (no compiler, an unsupported operation).

    On CUDA the compiled passes are recorded once as CUDA graphs and replayed (`reduce-overhead`):
    a step of these small models at batch 64 is bound by launching its kernels one by one from
    Python, not by the GPU's arithmetic. The training loop marks where each step begins
    (`torch.compiler.cudagraph_mark_step_begin`), after which a step's outputs are overwritten:
    what outlives a step (the store's rows, the summed losses) is copied or computed from them.
    """

    def __init__(self, model: TapModel, device: torch.device) -> None:
        self.model = model
        self.graphs = device.type == "cuda"
        self.compiled = torch.compile(model.taps, mode="reduce-overhead" if self.graphs else None)
        self.failure: str | None = None

    def __call__(self, x: torch.Tensor) -> Taps:
        if self.failure is None:
            try:
                taps: Taps = self.compiled(x)
                return taps
            except torch.OutOfMemoryError:
                raise  # the step's own failure, not the compiler's
            except Exception as err:  # any compiler failure; a real error recurs in eager mode
                self.failure = f"{type(err).__name__}: {err}".splitlines()[0]
                warnings.warn(
                    f"torch.compile failed ({self.failure}); training goes on without it",
                    KdsearchWarning,
                    stacklevel=2,
                )
        return self.model.taps(x)


def place(model: M, device: torch.device) -> M:
    """`model` on `device` in the channels-last layout, which the convolution kernels of both
    oneDNN (CPU) and cuDNN run fastest on; `Loader` serves batches in the same layout."""
    return model.to(device).to(memory_format=torch.channels_last)


def ready(model: M, device: torch.device) -> M:
    """A frozen copy of `model`, its batch norms folded, on `device` in the channels-last
    layout: how a run reads its teacher and the heads trained on them. Made anew for each run,
    but for a model marked `fixed`, whose copy on each device is made once and handed to every
    later run in the process."""
    copies = FIXED.get(model)
    if copies is not None and device in copies:
        return cast(M, copies[device])
    copy = place(fold_batch_norm(freeze(model)), device)
    if copies is not None:
        copies[device] = copy
    return copy


def fixed(model: M) -> M:
    """Mark `model` as never changed from now on (a reused worker's teacher, built from the
    share for its trials alone, which only read it): `ready` prepares it once per device."""
    FIXED.setdefault(model, {})
    return model


FIXED: weakref.WeakKeyDictionary[nn.Module, dict[torch.device, nn.Module]] = (
    weakref.WeakKeyDictionary()
)
"""The models marked `fixed`, each with `ready`'s copies of it by device."""


def freeze(model: M) -> M:
    """Eval mode and no gradients, for the whole run: batch-norm statistics stay as trained."""
    model.eval()
    model.requires_grad_(False)
    return model


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: Loader, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` over every batch of `loader`."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=loader.device)
    loss = torch.zeros((), device=loader.device)
    for batch in loader.epoch(0):
        with autocast(loader.device, dtype):
            logits = model(batch.x).float()
        correct += (logits.argmax(1) == batch.y).sum()
        loss += F.cross_entropy(logits, batch.y, reduction="sum")
    model.train(was_training)
    n = len(loader.split)
    return correct.item() / n, loss.item() / n


def evaluate_split(
    model: TapModel, split: Split, data: ImageData, recipe: Recipe
) -> tuple[float, float]:
    """Accuracy and loss of `model` on one split of `data`, on the recipe's device."""
    device = resolve_device(recipe.device)
    loader = Loader(split, data, device, batch_size=EVAL_BATCH, train=False)
    return evaluate(place(model, device), loader, autocast_dtype(recipe.precision, device))
