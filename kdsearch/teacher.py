"""Getting the teacher a recipe names: from a checkpoint, or trained once and cached.

A trained teacher is cached under `<cache>/teachers/`, keyed by a hash of everything that
determines it (architecture, data and split, training recipe), so every later run, trial and
promotion that asks for the same teacher loads it instead of training it again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch.cache import cache_dir, digest
from kdsearch.data import ImageData, Loader, derive_seed
from kdsearch.data.base import load_failure
from kdsearch.distill import HEAD_TERMS, needs_teacher_heads
from kdsearch.errors import KdsearchWarning, NonFiniteLoss, TeacherError
from kdsearch.losses import LOSSES
from kdsearch.losses.base import frozen_taps, rotate
from kdsearch.models import TapModel, build_model
from kdsearch.paths import flocked, replaced_whole, writable_folder, write_errors
from kdsearch.recipe import DistillConfig, Recipe
from kdsearch.train import (
    EpochStats,
    M,
    Report,
    autocast,
    autocast_dtype,
    batch_ticks,
    cosine,
    descend,
    evaluate_split,
    free_device_memory,
    freeze,
    place,
    ready,
    resolve_device,
    set_lr,
    sgd,
    train,
)

CACHE_FORMAT = 1  # bump when the cached file's layout or the teacher training loop changes
HEADS_FORMAT = 2  # likewise for the heads (2: last-stage heads of ShuffleNetV2, MobileNetV2, VGG)
# Settings added to distillation terms since CACHE_FORMAT 1. A teacher trains on cross-entropy
# alone, so they cannot change it; leaving them out of its key keeps every cached teacher's key
# (and its heads') as it was, where hashing them would have every cached teacher trained again.
UNKEYED_TERM_SETTINGS = {"stkd": ("kl_weight",)}
TEACHER_DIGEST = "teacher_digest"  # a heads file's key: the teacher they were trained on
MAKE_ROOM = "make room, or set KDSEARCH_CACHE_DIR to a folder with room"


@dataclass(frozen=True)
class Teacher:
    """A ready teacher, where it came from, its validation accuracy, and its trained heads."""

    model: TapModel
    source: str  # "checkpoint", "cache" or "trained"
    path: Path
    val_acc: float
    heads: Mapping[str, nn.Module] = field(default_factory=dict)  # term name -> frozen heads
    heads_path: Path | None = None  # where the heads were loaded from or saved to


@dataclass(frozen=True)
class TeacherFiles:
    """The files of a teacher a student was trained against, each with a hash of the weights
    in it (`weights_digest`), as a search and a promotion record them and an export copies
    them."""

    weights: Path
    digest: str
    heads: Path | None = None
    heads_digest: str | None = None

    @classmethod
    def of(cls, teacher: Teacher, heads: bool, digest: str | None = None) -> TeacherFiles:
        """The files of a ready `teacher` (absolute paths); its heads' file too when `heads`.
        `digest`: its weights', where hashed already."""
        heads_file = teacher.heads_path.absolute() if heads and teacher.heads_path else None
        heads_digest = None if heads_file is None else weights_digest(heads_file)
        weights = digest or weights_digest(teacher.path)
        return cls(teacher.path.absolute(), weights, heads_file, heads_digest)

    def without_heads(self) -> TeacherFiles:
        """The teacher's weights alone (a run that reads no heads)."""
        return replace(self, heads=None, heads_digest=None)

    def changed_since(self, recorded: Mapping[str, Any]) -> str | None:
        """How these files differ from those `recorded` (as `attrs()` wrote them), or None when
        every file recorded there hashes the same now."""
        for path, now, key in (
            (self.weights, self.digest, "teacher_digest"),
            (self.heads, self.heads_digest, "teacher_heads_digest"),
        ):
            was = recorded.get(key)
            if was is not None and now is not None and was != now:
                return (
                    f"the teacher file {path} hashes {now}, but the runs recorded before learned "
                    f"from one that hashed {was}: it was trained again or replaced since (the same "
                    "weights saved under other names, or in another dtype, hash otherwise)"
                )
        return None

    def attrs(self) -> dict[str, str]:
        """As user attributes of a study's trial (strings only)."""
        found = {"teacher_file": str(self.weights), "teacher_digest": self.digest}
        if self.heads is not None and self.heads_digest is not None:
            found.update(teacher_heads_file=str(self.heads), teacher_heads_digest=self.heads_digest)
        return found

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TeacherFiles | None:
        """Back from `attrs()`; None where nothing was recorded (a run without a teacher, or a
        promotion by an earlier kdsearch)."""
        if "teacher_file" not in attrs:
            return None
        heads = attrs.get("teacher_heads_file")
        return cls(
            Path(str(attrs["teacher_file"])),
            str(attrs["teacher_digest"]),
            None if heads is None else Path(str(heads)),
            attrs.get("teacher_heads_digest"),
        )


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The recipe that trains the teacher: cross-entropy alone, a cosine schedule over
    `teacher.train.epochs` from `teacher.train.lr`, the student's optimizer and batch size."""
    tt = recipe.teacher.train
    distill = {
        name: {"weight": 1.0 if name == "ce" else 0.0} for name in DistillConfig.model_fields
    }
    return recipe.override(
        {
            "student.arch": recipe.teacher.arch,
            "distill": distill,
            "optim.lr": tt.lr,
            "schedule": {"epochs": tt.epochs, "kind": "cosine"},
            "seed": tt.seed,
        },
        source="teacher.train",
    )


def teacher_key(recipe: Recipe, data: ImageData) -> str:
    """Hash of everything that determines a trained teacher (not the machine's settings: the
    device it ran on, whether it was compiled, which a resume may change)."""
    spec = teacher_recipe(recipe).to_dict()
    for irrelevant in ("data", "device", "teacher"):
        spec.pop(irrelevant)
    spec["compile"] = False  # the default, as keys before it was left out hold it
    for term, settings in UNKEYED_TERM_SETTINGS.items():
        for setting in settings:
            spec["distill"][term].pop(setting)
    spec["teacher_train"] = recipe.teacher.train.model_dump()
    return digest({"format": CACHE_FORMAT, "data": data.fingerprint, "recipe": spec})


def cached_teacher_path(recipe: Recipe, data: ImageData) -> Path:
    """Where the trained teacher of `recipe` on `data` is (or will be) cached."""
    return cache_dir() / "teachers" / f"{recipe.teacher.arch}-{teacher_key(recipe, data)}.pt"


def get_teacher(
    recipe: Recipe,
    data: ImageData,
    report: Report | None = None,
    *,
    heads: bool | None = None,
    heads_report: Report | None = None,
) -> Teacher:
    """Load the checkpoint the recipe names, else the cached teacher, else train and cache one.

    With `heads` (by default: when an active term reads them) the teacher also comes with its
    heads for every term that has some, trained once on the frozen teacher and cached.
    """
    teacher = _backbone(recipe, data, report)
    if heads if heads is not None else needs_teacher_heads(recipe):
        teacher = with_heads(recipe, data, teacher, report=heads_report)
    return teacher


def with_heads(
    recipe: Recipe,
    data: ImageData,
    teacher: Teacher,
    *,
    report: Report | None = None,
    path: Path | None = None,
) -> Teacher:
    """`teacher` with its heads (`get_teacher_heads`) and the file they are in (`path`:
    `teacher_heads_path`, where the caller has it already)."""
    path = path or teacher_heads_path(recipe, data, teacher)  # hashes a checkpoint teacher
    heads = get_teacher_heads(recipe, data, teacher, report, path=path)
    return replace(teacher, heads=heads, heads_path=path)


def _backbone(recipe: Recipe, data: ImageData, report: Report | None) -> Teacher:
    if recipe.teacher.checkpoint is not None:
        path = Path(recipe.teacher.checkpoint).expanduser()
        model = load_checkpoint(path, recipe.teacher.arch, data)
        val_acc = _val_acc(model, data, recipe)
        return Teacher(freeze(on_host(model)), "checkpoint", path, val_acc)
    path = cached_teacher_path(recipe, data)
    with training_turn(path, "this teacher"):
        return _cached_or_trained(recipe, data, report, path)


def _cached_or_trained(
    recipe: Recipe, data: ImageData, report: Report | None, path: Path
) -> Teacher:
    meta: dict[str, Any] = {"recipe": teacher_recipe(recipe).to_dict(), "data": data.fingerprint}
    if path.is_file():
        try:
            model = load_checkpoint(path, recipe.teacher.arch, data, where="")
        except TeacherError as err:
            _damaged(path, err)
        else:
            val_acc = _cached_val_acc(model, path, meta, recipe, data)
            return Teacher(freeze(on_host(model)), "cache", path, val_acc)
    writable_folder(path.parent, "the teacher cache")  # before hours of training, not after
    blank = build_model(recipe.teacher.arch, data.num_classes, data.channels)
    _room_for(blank, path, "teacher")
    # Heads cached for the teacher this one replaces stay where they name the teacher they
    # were trained on: reused if this training gives the same weights (a CPU does), trained
    # again otherwise. Heads that name none cannot be checked against the new teacher.
    for stale in path.parent.glob(f"{path.stem}-heads-*.pt"):
        if _names_no_teacher(stale):
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
    try:
        result = train(teacher_recipe(recipe), data, report)
    except NonFiniteLoss as err:  # not the student's optim.lr, which the teacher does not use
        raise err.of("training the teacher", "lower teacher.train.lr") from None
    meta.update(val_acc=result.val_acc, seconds=result.seconds)
    _save(result.student, path, "teacher", meta)
    return Teacher(freeze(on_host(result.student)), "trained", path, result.val_acc)


def _cached_val_acc(
    model: TapModel, path: Path, meta: dict[str, Any], recipe: Recipe, data: ImageData
) -> float:
    """The validation accuracy the metadata beside a cached teacher records; measured again
    (and written down) where that file is missing or unreadable, as when the weights alone were
    copied from another machine: the weights are what took hours."""
    try:
        return float(json.loads(path.with_suffix(".json").read_text())["val_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    val_acc = _val_acc(model, data, recipe)
    with suppress(OSError):  # a read-only cache: measured again next time
        _write_meta(path, {**meta, "val_acc": val_acc})
    return val_acc


@contextmanager
def training_turn(path: Path, what: str) -> Iterator[None]:
    """One process at a time loads, or trains and caches, what `path` holds; another waits for
    it and then loads its result. (Two trained at once: each replaced the other's file, under a
    search that had recorded, and trained heads on, the one it replaced.)"""
    lock = path.with_suffix(".lock")
    with suppress(OSError):  # a fresh cache: the lock needs its folder (an unwritable one, none)
        path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(lock, wait=False) as free:
        if free is not False:  # this process's turn, or a cache folder that takes no lock
            yield
            return
    warnings.warn(
        f"another process is training {what} ({path}); waiting for it, to use its result",
        KdsearchWarning,
        stacklevel=4,
    )
    with flocked(lock, wait=True):
        yield


def teacher_heads_path(recipe: Recipe, data: ImageData, teacher: Teacher) -> Path:
    """`teacher.heads.checkpoint` if the recipe names one, else where the heads trained on
    `teacher` are (or will be) cached, beside the teacher. The heads of an HSAKD teacher file
    with auxiliary classifiers (`_given_aux`) are cached under a key of their own; where heads
    an earlier kdsearch trained for that file are cached under the key without them, those are
    used, as the studies and promotions that learned from them recorded them, and a warning
    says how to use the file's classifiers instead."""
    if recipe.teacher.heads.checkpoint is not None:
        return Path(recipe.teacher.heads.checkpoint).expanduser()
    classifiers = []
    if teacher.source == "checkpoint":
        ident = f"{recipe.teacher.arch}-ckpt{_file_digest(teacher.path)}"
        classifiers = _aux_classifiers(teacher.path)
    else:
        ident = teacher.path.stem
    opt = recipe.optim
    spec = {
        "format": HEADS_FORMAT,
        "teacher": ident,
        "data": data.fingerprint,
        "heads": recipe.teacher.heads.model_dump(exclude={"checkpoint"}),
        "terms": HEAD_TERMS,
        "optim": [opt.momentum, opt.weight_decay, opt.nesterov],
        "batch_size": recipe.batch_size,
        "precision": recipe.precision,
        "seed": recipe.teacher.train.seed,
    }
    path = cache_dir() / "teachers" / f"{ident}-heads-{digest(spec)}.pt"
    if not classifiers:
        return path
    given = path.with_stem(f"{ident}-heads-{digest({**spec, 'teacher_aux': len(classifiers)})}")
    if path.is_file() and not given.is_file():
        warnings.warn(
            f"teacher.checkpoint: {teacher.path}: using the teacher heads an earlier kdsearch "
            f"trained for it ({path}), not its own auxiliary classifiers; to use those, move that "
            "file out of the cache (a study that learned from it names it with --set "
            "teacher.heads.checkpoint=FILE)",
            KdsearchWarning,
            stacklevel=2,
        )
        return path
    return given


def get_teacher_heads(
    recipe: Recipe,
    data: ImageData,
    teacher: Teacher,
    report: Report | None = None,
    *,
    path: Path | None = None,
) -> dict[str, nn.Module]:
    """The teacher-side heads of every term that has some (HSAKD: an auxiliary classifier on
    every stage that can carry one; SSKD: the projection): from `teacher.heads.checkpoint`,
    else from the cache, else trained now (HSAKD's taken from an HSAKD teacher file's own
    auxiliary classifiers where they fit, `_given_aux`). `path`: `teacher_heads_path`, where the
    caller has it already."""

    def fresh() -> nn.ModuleDict:
        # the same initial heads for the same key (its seed), whatever ran before
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(recipe.teacher.train.seed, "teacher heads"))
            return nn.ModuleDict(
                {n: LOSSES[n].teacher_heads(teacher.model, data.num_classes) for n in HEAD_TERMS}
            )

    heads = fresh()
    path = path or teacher_heads_path(recipe, data, teacher)
    if recipe.teacher.heads.checkpoint is not None:
        load_heads(heads, path, teacher)  # as they are: never trained again in their place
    else:
        with training_turn(path, "the teacher's heads"):
            if not _load_cached_heads(heads, path, teacher):
                heads = fresh()  # a failed load may have copied some of the tensors already
                writable_folder(path.parent, "the teacher cache")
                _room_for(heads, path, "teacher's heads")
                given = _given_aux(heads[AUX_TERM], teacher, recipe.teacher.arch)
                untrained = {n: h for n, h in heads.items() if not (given and n == AUX_TERM)}
                train_teacher_heads(nn.ModuleDict(untrained), teacher.model, recipe, data, report)
                _save(
                    heads,
                    path,
                    "teacher's heads",
                    {
                        "teacher": str(teacher.path),
                        "heads": recipe.teacher.heads.model_dump(),
                    },
                    teacher_digest=weights_digest(teacher.path),
                )
    on_host(teacher.model)
    return {name: freeze(on_host(head)) for name, head in heads.items()}


AUX = "auxiliary_classifier."  # before the names of an HSAKD teacher file's classifiers
AUX_TERM = "hsakd"  # the term whose teacher heads those classifiers are


def _aux_classifiers(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The auxiliary classifiers of the HSAKD teacher file at `path` (`_backbone_of`'s layout),
    each with its number and its tensors in the file's order, in the order of their numbers
    (`block_extractor2`, `bn2`, `fc2`: classifier "2"); none for any other file. The official
    code lists every classifier's feature layers first, then their batch norms, then their
    linear layers, so a classifier's tensors lie apart in the file. Tensors under no number
    go together, as classifier "", first. The heads' cache key and their loading both ask:
    the file is read once while it stays as it is."""
    stat = path.stat()
    return _read_aux_classifiers(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _read_aux_classifiers(path: Path, mtime_ns: int, size: int) -> list[tuple[str, dict[str, Any]]]:
    """`_aux_classifiers` of the file at `path` as it was at `mtime_ns` and `size`."""
    saved = _state_in(path, "teacher.checkpoint: ")
    if _backbone_of(saved) is saved:
        return []
    numbered: dict[str, dict[str, Any]] = {}
    for key, value in saved.items():
        if key.startswith(AUX):
            number = re.search(r"\d+$", key.removeprefix(AUX).split(".", 1)[0])
            numbered.setdefault(number.group() if number else "", {})[key] = value
    return sorted(numbered.items(), key=lambda item: int(item[0] or -1))


def _given_aux(heads: nn.Module, teacher: Teacher, arch: str) -> bool:
    """Load an HSAKD teacher file's auxiliary classifiers into HSAKD's teacher `heads` (one per
    stage that can carry one, in order), where each fits kdsearch's head on the stage of its
    place by position (`_by_position`; the official code names the layers otherwise): whether
    they were. Trained with that teacher (HSAKD's teachers train them on the frozen backbone
    for 100 epochs, or with it), they are the heads its method reads. Said either way."""
    assert isinstance(heads, nn.ModuleDict)
    classifiers = _aux_classifiers(teacher.path) if teacher.source == "checkpoint" else []
    if not classifiers:
        return False
    loads: list[tuple[nn.Module, dict[str, Any]]] = []
    why = ""
    if unnumbered := dict(classifiers).get(""):
        why = f"its {next(iter(unnumbered))} belongs to no numbered classifier"
    elif len(classifiers) != len(heads):
        why = (
            f"it holds {_counted(len(classifiers), 'auxiliary classifier')} where kdsearch's "
            f"{arch} carries {_counted(len(heads), 'head')} (on stages {', '.join(heads)})"
        )
    else:
        for (number, saved), (stage, head) in zip(classifiers, heads.items(), strict=True):
            expected = head.state_dict()
            pairs, why_not = _by_position(expected, saved, ours=("the head", "the head's"))
            if not pairs:
                why = f"its classifier {number} does not fit kdsearch's head on stage {stage}: "
                why += why_not
                break
            loads.append((head, {**expected, **{ours: saved[t] for t, ours in pairs}}))
    where = f"teacher.checkpoint: {teacher.path}"
    if why:
        warnings.warn(
            f"{where}: its auxiliary classifiers are left out, as {why}; kdsearch trains HSAKD's "
            "teacher heads itself",
            KdsearchWarning,
            stacklevel=3,
        )
        return False
    for head, state in loads:
        head.load_state_dict(state)
    others = " and ".join(f"{n.upper()}'s" for n in HEAD_TERMS if n != AUX_TERM)
    warnings.warn(
        f"{where}: its {len(classifiers)} auxiliary classifiers are HSAKD's teacher heads (on "
        f"stages {', '.join(heads)}, loaded by their order); kdsearch trains {others} heads alone",
        KdsearchWarning,
        stacklevel=3,
    )
    return True


def _load_cached_heads(heads: nn.ModuleDict, path: Path, teacher: Teacher) -> bool:
    """Load the heads cached at `path` into `heads`: whether they were there, whole, and
    trained on `teacher` (said when not)."""
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if (trained_on := _trained_on(saved)) not in (None, weights_digest(teacher.path)):
            raise TeacherError(f"trained on another teacher (its weights hash {trained_on})")
        heads.load_state_dict(_unwrapped(saved))
    except Exception as err:  # a damaged file: torch.load raises many kinds
        _damaged(path, err)
        return False
    return True


def load_heads(heads: nn.ModuleDict, path: Path, teacher: Teacher) -> None:
    """Load `teacher.heads.checkpoint` into `heads`, or say in one line why it does not fit:
    the wrong shapes, or heads that record having been trained on another teacher (kdsearch
    writes the teacher's `weights_digest` into every heads file it trains; heads from
    elsewhere record none, and only their shapes can be checked)."""
    where = "teacher.heads.checkpoint: "
    loaded = _load_weights(path, where)
    trained_on = _trained_on(loaded)
    saved = _unwrapped(loaded)
    mismatch = _mismatch(heads.state_dict(), saved) if isinstance(saved, dict) else "no weights"
    if mismatch:
        raise TeacherError(
            f"{where}{path} does not hold the heads of this teacher and data "
            f"({', '.join(heads)}): {mismatch}"
        )
    if trained_on is not None and trained_on != (ours := weights_digest(teacher.path)):
        raise TeacherError(
            f"{where}{path} holds heads trained on another teacher (its weights hash "
            f"{trained_on}; {teacher.path} hashes {ours}): name the teacher they were trained "
            "on in teacher.checkpoint, or drop teacher.heads.checkpoint to train heads for this one"
        )
    heads.load_state_dict(saved)


def on_host(model: M) -> M:
    """`model`, trained or scored on the device, back in host memory, and the device memory it
    used given back: a search's driver shares the teacher from there and holds no GPU memory
    its trials could use."""
    model.cpu()
    free_device_memory()
    return model


def train_teacher_heads(
    heads: nn.ModuleDict, teacher: TapModel, recipe: Recipe, data: ImageData, report: Report | None
) -> None:
    """Train `heads` on the frozen teacher's rotated batches (cosine schedule from
    `teacher.heads.lr` over `teacher.heads.epochs`, the recipe's optimizer and batch size)."""
    device = resolve_device(recipe.device)
    dtype = autocast_dtype(recipe.precision, device)
    teacher = ready(teacher, device)
    place(heads, device)
    cfg = recipe.teacher.heads
    optimizer = sgd(heads.parameters(), recipe.optim, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    seed = recipe.teacher.train.seed
    loader = Loader(data.train, data, device, batch_size=recipe.batch_size, train=True, seed=seed)
    val_loader = Loader(data.val, data, device, batch_size=recipe.batch_size, train=False)

    def objective(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        with autocast(device, dtype):
            t_rot = frozen_taps(teacher.taps, rotate(x))
            return {n: LOSSES[n].teacher_head_objective(heads[n], t_rot, y) for n in heads}

    tick = batch_ticks(report)
    for epoch in range(cfg.epochs):
        lr = cosine(cfg.lr, epoch, cfg.epochs)
        set_lr(optimizer, lr)
        heads.train()
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {n: torch.zeros((), device=device) for n in heads}
        for b, batch in enumerate(loader.epoch(epoch)):
            parts = objective(batch.x, batch.y)
            total = torch.stack([loss for loss, _ in parts.values()]).sum()
            descend(optimizer, scaler, total)
            for n, (loss, _) in parts.items():
                sums[n] += loss.detach()
            if tick is not None:
                tick(b + 1, len(loader))
        seconds = time.perf_counter() - started
        train_parts = {n: float(v) / len(loader) for n, v in sums.items()}
        train_loss = sum(train_parts.values())
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(
                epoch + 1,
                train_loss,
                run="training the teacher's heads",
                hint="lower teacher.heads.lr",
            )
        heads.eval()
        t1 = time.perf_counter()
        with torch.no_grad():  # each batch's means weighed by its images (the last is short)
            scores = [(objective(b.x, b.y), len(b.y)) for b in val_loader.epoch(0)]
        seen = sum(n for _, n in scores)
        val_acc = sum(float(acc) * n for s, n in scores for _, acc in s.values()) / (
            seen * len(heads)
        )
        val_loss = sum(float(loss) * n for s, n in scores for loss, _ in s.values()) / seen
        if report is not None:
            report(
                EpochStats(
                    epoch + 1,
                    train_loss,
                    train_parts,
                    val_acc,
                    val_loss,
                    lr,
                    loader.images / seconds,
                    seconds,
                    time.perf_counter() - t1,
                )
            )


def _damaged(path: Path, err: Exception) -> None:
    """Say that a cache file cannot be used; the caller trains it again and replaces it."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0].replace(f"{path}: ", "")
    warnings.warn(
        f"cannot use the cached {path} ({first}); training it again", KdsearchWarning, stacklevel=3
    )


def load_checkpoint(
    path: Path, arch: str, data: ImageData, where: str = "teacher.checkpoint: "
) -> TapModel:
    """A model of `arch` for `data`'s classes and channels with the weights in `path`; errors
    start with `where` (the recipe key by default).

    Accepts a bare state dict or one under "state_dict", "model" or "net" (as other training
    scripts save it), and an HSAKD teacher's backbone beside its auxiliary classifiers. Weights
    named otherwise than kdsearch's but in its order load by position (`_by_position`).
    Loading uses `weights_only=True`: a checkpoint cannot run code.
    """
    unwrapped = _state_in(path, where)
    saved = _backbone_of(unwrapped)
    model = build_model(arch, data.num_classes, data.channels)
    expected = model.state_dict()
    if mismatch := _mismatch(expected, saved):
        pairs, why_not = _by_position(expected, saved)
        if not pairs:
            named_otherwise = any(k not in saved for k in expected) and any(
                k not in expected for k in saved
            )
            raise TeacherError(
                f"{where}{path} does not fit {arch} with {data.num_classes} classes and "
                f"{_counted(data.channels, 'input channel')}: {mismatch}"
                + (f"; by position, {why_not}" if named_otherwise and why_not else "")
            )
        for (of, name), what in COMPUTES_OTHERWISE.items():
            if of == arch and name in saved:
                raise TeacherError(
                    f"{where}{path} holds {what}: its weights have the shapes of kdsearch's "
                    f"{arch}, but its network computes otherwise; kdsearch has no such model"
                )
        renamed = [(t, o) for t, o in pairs if t != o]  # none: kdsearch's, batch norms' counts
        if renamed:  # left out (as torch before 0.4.1 saved them)
            backbone = "backbone." if saved is not unwrapped else ""  # an HSAKD teacher's
            warnings.warn(
                f"{where}{path} names its weights otherwise than kdsearch's {arch} (its "
                f"{backbone}{renamed[0][0]} is kdsearch's {renamed[0][1]}); loaded by their "
                f"order, as each of its {len(saved)} {backbone and 'backbone '}tensors has the "
                "shape and kind of kdsearch's in that place"
                + " (the teacher's validation accuracy, printed when it is ready, tells whether "
                "its layers are in kdsearch's order)",
                KdsearchWarning,
                stacklevel=2,
            )
        saved = {**expected, **{o: saved[t] for t, o in pairs}}
    model.load_state_dict(saved)
    return model


# Official models whose weights fit kdsearch's of that name by position, but whose network
# computes otherwise, by a weight's name that only their files hold. Every other model of the
# official RepDistiller and HSAKD code computes what kdsearch's does from its weights loaded
# by position (checked against their code, README "Teachers").
COMPUTES_OTHERWISE = {
    ("mobilenetv2", "classifier.weight"): (
        "HSAKD's MobileNetV2, whose first convolution has stride 1 (kdsearch's, as "
        "RepDistiller's, 2)"
    ),
}


def _backbone_of(saved: Any) -> Any:
    """The backbone's weights where `saved` is an HSAKD teacher (its backbone and auxiliary
    classifiers, under "backbone." and AUX); else `saved`. The classifiers are read apart, as
    HSAKD's teacher heads (`_given_aux`)."""
    if not isinstance(saved, dict) or not any(str(k).startswith("backbone.") for k in saved):
        return saved
    if not all(str(k).startswith(("backbone.", AUX)) for k in saved):
        return saved
    return {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}


WRAPPED = ("module.", "_orig_mod.")  # before every name in a wrapped model's state dict


def _unwrapped(saved: Any) -> Any:
    """The state dict in what a checkpoint holds: itself, or the one under "state_dict", "model"
    or "net" (as other training scripts save it), its names without what a wrapper puts before
    every one: "module." (`nn.DataParallel`, DistributedDataParallel, and the `AveragedModel` of
    SWA and EMA teachers, whose count of models averaged, "n_averaged", is dropped too) and
    "_orig_mod." (a model of `torch.compile`), in any nesting."""
    if isinstance(saved, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(saved.get(key), dict):
                saved = saved[key]
                break
    if not isinstance(saved, dict):
        return saved
    while saved:
        names = {k: v for k, v in saved.items() if k != "n_averaged"}
        if len(names) < len(saved) and names and all(str(k).startswith("module.") for k in names):
            saved = names  # an AveragedModel's
        prefix = next((p for p in WRAPPED if all(str(k).startswith(p) for k in saved)), None)
        if prefix is None:
            break
        saved = {str(k).removeprefix(prefix): v for k, v in saved.items()}
    return saved


def _names_no_teacher(path: Path) -> bool:
    """Whether the heads file at `path` cannot say which teacher it was trained on (an earlier
    kdsearch's, or one that cannot be read)."""
    try:
        return _trained_on(torch.load(path, map_location="cpu", weights_only=True)) is None
    except Exception:  # a damaged file: torch.load raises many kinds
        return True


def _trained_on(saved: Any) -> str | None:
    """The `weights_digest` of the teacher a heads file names, where it names one."""
    found = saved.get(TEACHER_DIGEST) if isinstance(saved, dict) else None
    return None if found is None else str(found)


def weights_digest(path: Path) -> str:
    """A short hash of the weights in `path` (their names, types, shapes and values), not of
    the file's bytes: `torch.save` writes the same weights differently under another name."""
    state = _unwrapped(_load_weights(path, ""))
    h = hashlib.blake2b(digest_size=8)
    for name, value in sorted(state.items()) if isinstance(state, dict) else [("", state)]:
        h.update(str(name).encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def refuse_unusable_checkpoints(recipe: Recipe) -> None:
    """A teacher or heads checkpoint the recipe names that this machine lacks, or that holds no
    torch weights (a text file, one cut short), refused in the words loading it would say,
    before the data set loads (minutes, for a large one). Whether the weights fit is known once
    the data set is: its classes and channels."""
    named = [
        (key, Path(path).expanduser())
        for key, path in (
            ("teacher.checkpoint", recipe.teacher.checkpoint),
            ("teacher.heads.checkpoint", recipe.teacher.heads.checkpoint),
        )
        if path is not None
    ]
    for key, path in named:
        if not path.exists():
            raise TeacherError(f"{key}: {path}: no such file")
    for key, path in named:
        _state_in(path, f"{key}: ")


def _state_in(path: Path, where: str) -> dict[str, Any]:
    """The state dict a checkpoint holds (`_unwrapped`), or a one-line TeacherError."""
    saved = _unwrapped(_load_weights(path, where))
    if not isinstance(saved, dict):
        raise TeacherError(f"{where}{path}: holds a {type(saved).__name__}, not weights")
    return saved


def _load_weights(path: Path, where: str) -> Any:
    """What `torch.load(weights_only=True)` reads from `path`, or a one-line TeacherError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TeacherError(f"{where}{path}: no such file") from None
    except Exception as err:  # torch.load of a file that is no checkpoint raises many kinds
        # torch's advice (load with weights_only=False, which runs the file's code) is not for
        # this: say what the reader met, and, for a pickled object, how to save weights alone
        reader = load_failure(err)
        if reader.startswith("Unsupported global"):
            raise TeacherError(
                f"{where}{path}: not a file of weights alone ({reader}); kdsearch reads tensors "
                "and never runs a file's code: save the model's state_dict, "
                "torch.save(model.state_dict(), PATH)"
            ) from None
        raise TeacherError(f"{where}{path}: not a loadable weights file ({reader})") from None


def _mismatch(expected: dict[str, torch.Tensor], saved: dict[str, Any]) -> str:
    """A short description of how `saved` differs from `expected`, or '' if it fits."""
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    shapes = [
        f"{k} is {tuple(saved[k].shape)}, expected {tuple(v.shape)}"
        if isinstance(saved[k], torch.Tensor)
        else f"{k} is a {type(saved[k]).__name__}, not a tensor"
        for k, v in expected.items()
        if k in saved and not (isinstance(saved[k], torch.Tensor) and saved[k].shape == v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{_counted(len(missing), 'weight')} missing (first: {missing[0]})")
    if extra:
        problems.append(f"{_counted(len(extra), 'unexpected weight')} (first: {extra[0]})")
    problems += shapes[:2]
    return "; ".join(problems)


def _by_position(
    expected: dict[str, torch.Tensor],
    saved: dict[str, Any],
    ours: tuple[str, str] = ("kdsearch's model", "kdsearch's"),
) -> tuple[list[tuple[str, str]], str]:
    """`saved`'s names paired with `expected`'s in order, where the two hold as many tensors and
    each pair has one shape and one kind (the name's last part: weight, bias, running_mean...):
    a model built as kdsearch's is, layer for layer, whose code names its layers otherwise (as
    the official RepDistiller and HSAKD code does); else no pairs, and the first reason, which
    names the module `expected` comes from as `ours` says (its name, and its possessive). A
    file without batch norm's `num_batches_tracked` (saved by a torch before 0.4.1) is paired
    without them (the module keeps its own)."""
    names = list(expected)
    counts = ""
    if not any(str(k).endswith("num_batches_tracked") for k in saved):
        names = [k for k in names if not k.endswith("num_batches_tracked")]
        counts = " besides batch norm's num_batches_tracked, which the file lacks"
    if len(saved) != len(names):
        return [], (
            f"it holds {_counted(len(saved), 'entry', 'entries')} where {ours[0]} holds "
            f"{len(names)} tensors{counts}"
        )
    for (theirs, value), name in zip(saved.items(), names, strict=True):
        like = expected[name]
        if not isinstance(value, torch.Tensor):
            return [], f"its {theirs} is a {type(value).__name__}, not a tensor"
        if str(theirs).rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]:
            return [], f"its {theirs} stands where {ours[1]} {name} does"
        if value.shape != like.shape:  # of one name: as `_mismatch` says already
            return [], "" if theirs == name else (
                f"its {theirs} is {tuple(value.shape)} where {ours[1]} {name} is "
                f"{tuple(like.shape)}"
            )
    return list(zip(map(str, saved), names, strict=True)), ""


def _counted(n: int, one: str, many: str = "") -> str:
    """`n` and the word for one thing or for `many` (by default `one` and an s): "1 weight"."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _val_acc(model: TapModel, data: ImageData, recipe: Recipe) -> float:
    return evaluate_split(model, data.val, data, recipe)[0]


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _room_for(model: nn.Module, path: Path, what: str) -> None:
    """Refuse to train `what` (shaped as `model`) where its cache folder has no room for the
    file: torch.save on a full disk fails only once the training is over, and the training lost."""
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2**20
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise TeacherError(
            f"the teacher cache {path.parent} has {free / 2**20:.1f} MB free, and the {what} "
            f"needs {need / 2**20:.1f} MB there; {MAKE_ROOM}"
        )


def _save(
    model: nn.Module,
    path: Path,
    what: str,
    meta: dict[str, Any],
    teacher_digest: str | None = None,
) -> None:
    """Write weights and metadata atomically, so a concurrent reader never sees half a file;
    a write that fails (a disk that filled during the training) is one line naming it.
    With `teacher_digest` (heads) the weights go under "state_dict" beside it, so the file
    names the teacher it belongs to wherever it is copied."""
    weights: dict[str, Any] = {k: v.cpu() for k, v in model.state_dict().items()}
    if teacher_digest is not None:
        weights = {"state_dict": weights, TEACHER_DIGEST: teacher_digest}
    lost = f"the trained {what} is lost; {MAKE_ROOM}"
    with write_errors(f"the teacher cache {path}", lost, TeacherError):
        save_weights(weights, path)  # its folder: made by `training_turn`
    with suppress(OSError):  # the weights are what counts: without this, measured again
        _write_meta(path, {**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    """The metadata beside the weights at `path`, whole or not at all."""
    with replaced_whole(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def save_weights(weights: Any, path: Path) -> None:
    """`torch.save` to `path`, whole or not at all: written beside it and moved into place, so a
    concurrent reader never sees half a file and a Ctrl-C leaves none."""
    with replaced_whole(path) as tmp:
        torch.save(weights, tmp)
