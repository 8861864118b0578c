"""What runs in Ray's workers: a trial (`run_trial`, reporting to Tune every epoch) and a
promotion run (`train_job`), each from the data and teacher the driver put in the object store
once (`share`)."""

from __future__ import annotations

import contextlib
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune
from ray.util.queue import Queue

from kdsearch.data import ImageData, Split
from kdsearch.errors import KdsearchWarning
from kdsearch.losses import LOSSES
from kdsearch.models import TapModel, build_model, count_parameters
from kdsearch.recipe import Recipe
from kdsearch.store import StoreConfig
from kdsearch.study.contents import METRIC
from kdsearch.teacher import Teacher
from kdsearch.train import (
    EpochStats,
    evaluate_split,
    fixed,
    free_device_memory,
    kernel_cap,
    resolve_device,
    train,
    trained_precision,
)


@dataclass(frozen=True)
class Shared:
    """What every trial reads and nobody changes: the data as numpy arrays (the object store
    hands them to every trial on a node without copying) and the teacher's weights."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    teacher_arch: str
    teacher_state: dict[str, torch.Tensor]
    heads_state: dict[str, dict[str, torch.Tensor]]
    # tells this share from any other a process may see (Ray reuses a task's process)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def share(data: ImageData, teacher: Teacher | None, arch: str) -> Shared:
    """Pack the data and teacher for the object store."""
    arrays = {
        f"{name}_{part}": getattr(getattr(data, name), part).numpy()
        for name in ("train", "val", "test")
        for part in ("x", "y")
    }
    meta = {
        "name": data.name,
        "classes": data.classes,
        "hflip": data.hflip,
        "mean": data.mean,
        "std": data.std,
        "fingerprint": data.fingerprint,
    }
    return Shared(
        arrays,
        meta,
        arch,
        {} if teacher is None else host_state(teacher.model.state_dict()),
        {}
        if teacher is None
        else {n: host_state(h.state_dict()) for n, h in teacher.heads.items()},
    )


def host_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in host memory: a CUDA tensor would be rebuilt on its GPU in every trial,
    and fail on a node without one."""
    return {k: v.cpu() for k, v in state.items()}


Unshared = tuple[ImageData, TapModel | None, dict[str, torch.nn.Module]]
UNSHARED: dict[str, Unshared] = {}  # the last share this process unpacked, by its token


def unshare(shared: Shared) -> Unshared:
    """Data, teacher and heads back as torch objects (the data without a copy); the same
    objects again for every later trial or run in this process of the same share, which only
    read them: the teacher is built once, and `train` folds and places it once (`fixed`)."""
    if shared.token not in UNSHARED:
        UNSHARED.clear()  # an earlier search's or promotion's
        data, teacher, heads = unpack(shared)
        UNSHARED[shared.token] = (
            data,
            None if teacher is None else fixed(teacher),
            {name: fixed(head) for name, head in heads.items()},
        )
    return UNSHARED[shared.token]


def unpack(shared: Shared) -> Unshared:
    """`shared` as torch objects."""
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = {k: torch.from_numpy(v) for k, v in shared.arrays.items()}
    m = shared.meta
    data = ImageData(
        m["name"],
        Split(t["train_x"], t["train_y"]),
        Split(t["val_x"], t["val_y"]),
        Split(t["test_x"], t["test_y"]),
        tuple(m["classes"]),
        m["hflip"],
        tuple(m["mean"]),
        tuple(m["std"]),
        m["fingerprint"],
    )
    if not shared.teacher_state:
        return data, None, {}
    teacher = build_model(shared.teacher_arch, data.num_classes, data.channels)
    teacher.load_state_dict(shared.teacher_state)
    heads: dict[str, torch.nn.Module] = {}
    for name, state in shared.heads_state.items():
        heads[name] = LOSSES[name].teacher_heads(teacher, data.num_classes)
        heads[name].load_state_dict(state)
    return data, teacher, heads


def run_trial(config: dict[str, Any], shared: Shared) -> None:
    """One trial: train the recipe, report every epoch; any failure is reported, not raised,
    so the driver records its reason and the search goes on."""
    torch.set_num_threads(max(1, int(config["threads"])))
    free_device_memory()  # what an earlier trial of this reused worker left cached
    started = time.perf_counter()
    # the last finished epoch and the busy time to it, for a failure's report too
    progress = {"epoch": 0.0, "train_seconds": 0.0, "eval_seconds": 0.0, "train_images": 0.0}
    with kept_warnings() as told:
        try:
            _train_trial(config, shared, started, progress, told)
            return
        except Exception as err:  # recorded as FAIL with its reason; nothing is lost
            failure = f"{type(err).__name__}: {err}"[:2000]
    # Out of the handler, the failed trial's tensors (its traceback held them) are garbage:
    # a trial out of GPU memory leaves none held for the others.
    free_device_memory()
    tune.report(
        {
            "epoch": int(progress["epoch"]) + 1,
            METRIC: float("nan"),
            "failure": failure,
            "wall_seconds": time.perf_counter() - started,
            "train_seconds": progress["train_seconds"],
            "eval_seconds": progress["eval_seconds"],
            "train_images": progress["train_images"],
            **({"warnings": said} if (said := told()) else {}),  # what led up to it, too
        }
    )


def _train_trial(
    config: dict[str, Any],
    shared: Shared,
    started: float,
    progress: dict[str, float],
    told: Callable[[], list[str]],
) -> None:
    recipe = worker_recipe(Recipe.from_yaml(config["recipe"], source=f"trial {config['number']}"))
    device = resolve_device(recipe.device)  # what `auto` became here: the export pins it
    precision, cap = trained_precision(recipe, device), kernel_cap(device)
    data, teacher, heads = unshare(shared)
    params = count_parameters(build_model(recipe.student.arch, data.num_classes, data.channels))
    busy = {"train_seconds": 0.0, "eval_seconds": 0.0, "train_images": 0.0}
    store = config.get("store")

    def report(stats: EpochStats) -> None:
        busy["train_seconds"] += stats.seconds
        busy["eval_seconds"] += stats.eval_seconds
        busy["train_images"] += round(stats.images_per_sec * stats.seconds)
        progress.update(epoch=stats.epoch, **busy)
        tune.report(
            {
                "epoch": stats.epoch,
                METRIC: stats.val_acc,
                "train_loss": stats.train_loss,
                "images_per_sec": stats.images_per_sec,
                "student_params": params,
                "threads": torch.get_num_threads(),
                "device": device.type,
                "precision": precision,
                "onednn_cap": cap,
                "wall_seconds": time.perf_counter() - started,
                **busy,
                **({"warnings": said} if (said := told()) else {}),
            }
        )

    train(
        recipe,
        data,
        report,
        teacher=teacher,
        teacher_heads=heads,
        store=None if store is None else StoreConfig(Path(store[0]), store[1], store[2]),
    )


@contextlib.contextmanager
def kept_warnings() -> Iterator[Callable[[], list[str]]]:
    """Within: kdsearch's warnings are kept, not shown, and the function given returns their
    distinct messages so far. A Ray worker's warnings reach no console (`log_to_driver` is
    off), so a trial or promotion run hands them to the driver with its results (`tell_once`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KdsearchWarning)  # each run's, not once per worker
        yield lambda: sorted(
            {str(w.message) for w in caught if issubclass(w.category, KdsearchWarning)}
        )


def tell_once(told: set[str], where: str, messages: Iterable[str]) -> None:
    """Warn in the driver of each of a run's `messages` not in `told` yet (the same warning
    comes from every run of a search: it is said once), naming the run."""
    for message in messages:
        if message not in told:
            told.add(message)
            warnings.warn(f"{where}: {message}", KdsearchWarning, stacklevel=2)


def worker_recipe(recipe: Recipe) -> Recipe:
    """The recipe as a Ray worker trains it: on the GPU Ray gave the worker, which it sees as
    `cuda` whatever `cuda:N` the recipe names, and on the CPU where Ray gave it none (`auto`
    would otherwise take GPU 0, which no one reserved)."""
    if recipe.device == "cpu" or not ray.is_initialized():
        return recipe
    if ray.get_gpu_ids():
        return recipe.override({"device": "cuda"}) if recipe.device.startswith("cuda:") else recipe
    return recipe.override({"device": "cpu"}) if recipe.device == "auto" else recipe


@dataclass(frozen=True)
class JobResult:
    """One full training run done on Ray: its curve, validation and test accuracy, weights."""

    key: str
    curve: dict[int, float]
    val_acc: float
    test_acc: float
    params: int
    seconds: float
    images_per_sec: float
    weights: dict[str, torch.Tensor] | None
    failure: str | None = None
    threads: int = 1  # CPU threads it trained with: the same weights need the same count
    warnings: tuple[str, ...] = ()  # kdsearch's warnings in the run (`kept_warnings`)
    device: str = "cpu"  # the type of the device it trained on (what `auto` became there)
    precision: str = "fp32"  # the precision it trained in there (likewise)
    onednn_cap: str = ""  # the cap on oneDNN's instruction set it trained under (`kernel_cap`)

    @classmethod
    def failed(
        cls, key: str, failure: str, curve: dict[int, float] | None = None, seconds: float = 0.0
    ) -> JobResult:
        """A run that ended without a student: no accuracy (NaN), the epochs it reported."""
        nan = float("nan")
        return cls(key, curve or {}, nan, nan, 0, seconds, 0.0, None, failure[:2000])


def train_job(
    key: str, recipe_yaml: str, shared: Shared, threads: float, progress: Queue | None
) -> JobResult:
    """Train one recipe to the end and score it on the test split (a promotion run); each
    epoch's validation accuracy goes to `progress` as (key, epoch, accuracy) as it ends."""
    torch.set_num_threads(max(1, int(threads)))
    used = torch.get_num_threads()
    curve: dict[int, float] = {}
    started = time.perf_counter()

    def report(stats: EpochStats) -> None:
        curve[stats.epoch] = stats.val_acc
        if progress is not None:
            with contextlib.suppress(ray.exceptions.RayError):  # a driver gone: train on
                progress.put_nowait((key, stats.epoch, stats.val_acc))

    told: Callable[[], list[str]] = list
    device, precision, cap = "cpu", "fp32", ""  # JobResult's defaults, until the recipe resolves
    try:
        recipe = worker_recipe(Recipe.from_yaml(recipe_yaml, source=key))
        resolved = resolve_device(recipe.device)
        device, precision = resolved.type, trained_precision(recipe, resolved)
        cap = kernel_cap(resolved)
        data, teacher, heads = unshare(shared)
        with kept_warnings() as told:
            result = train(recipe, data, report, teacher=teacher, teacher_heads=heads)
        test_acc, _ = evaluate_split(result.student, data.test, data, recipe)
        weights = {k: v.cpu() for k, v in result.student.state_dict().items()}
        job = JobResult(
            key,
            curve,
            result.val_acc,
            test_acc,
            result.params,
            time.perf_counter() - started,
            result.images_per_sec,
            weights,
        )
    except Exception as err:  # recorded as a failed run with its reason
        job = JobResult.failed(
            key, f"{type(err).__name__}: {err}", curve, time.perf_counter() - started
        )
    # how it trained, finished or failed
    return replace(
        job,
        threads=used,
        warnings=tuple(told()),
        device=device,
        precision=precision,
        onednn_cap=cap,
    )
