"""Getting the teacher a recipe names: from a checkpoint, or trained once and cached.

A trained teacher is cached under `<cache>/teachers/`, keyed by a hash of everything that
determines it (architecture, data and split, training recipe), so every later run, trial and
promotion that asks for the same teacher loads it instead of training it again.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdsearch.cache import cache_dir, digest
from kdsearch.data import ImageData
from kdsearch.errors import TeacherError
from kdsearch.models import TapModel, build_model
from kdsearch.recipe import DistillConfig, Recipe
from kdsearch.train import Report, evaluate_split, freeze, train

CACHE_FORMAT = 1  # bump when the cached file's layout or the teacher training loop changes


@dataclass(frozen=True)
class Teacher:
    """A ready teacher, where it came from, and its validation accuracy."""

    model: TapModel
    source: str  # "checkpoint", "cache" or "trained"
    path: Path
    val_acc: float


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
    """Hash of everything that determines a trained teacher (not the device it ran on)."""
    spec = teacher_recipe(recipe).to_dict()
    for irrelevant in ("data", "device", "teacher"):
        spec.pop(irrelevant)
    spec["teacher_train"] = recipe.teacher.train.model_dump()
    return digest({"format": CACHE_FORMAT, "data": data.fingerprint, "recipe": spec})


def cached_teacher_path(recipe: Recipe, data: ImageData) -> Path:
    """Where the trained teacher of `recipe` on `data` is (or will be) cached."""
    return cache_dir() / "teachers" / f"{recipe.teacher.arch}-{teacher_key(recipe, data)}.pt"


def get_teacher(recipe: Recipe, data: ImageData, report: Report | None = None) -> Teacher:
    """Load the checkpoint the recipe names, else the cached teacher, else train and cache one."""
    if recipe.teacher.checkpoint is not None:
        path = Path(recipe.teacher.checkpoint).expanduser()
        model = load_checkpoint(path, recipe.teacher.arch, data)
        return Teacher(freeze(model), "checkpoint", path, _val_acc(model, data, recipe))
    path = cached_teacher_path(recipe, data)
    if path.is_file():
        model = load_checkpoint(path, recipe.teacher.arch, data)
        meta = json.loads(path.with_suffix(".json").read_text())
        return Teacher(freeze(model), "cache", path, float(meta["val_acc"]))
    result = train(teacher_recipe(recipe), data, report)
    _save(
        result.student,
        path,
        {
            "val_acc": result.val_acc,
            "recipe": teacher_recipe(recipe).to_dict(),
            "data": data.fingerprint,
            "seconds": result.seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    return Teacher(freeze(result.student), "trained", path, result.val_acc)


def load_checkpoint(path: Path, arch: str, data: ImageData) -> TapModel:
    """A model of `arch` for `data`'s classes and channels with the weights in `path`.

    Accepts a bare state dict or one under "state_dict" / "model" (as other training scripts
    save it). Loading uses `weights_only=True`: a checkpoint cannot run code.
    """
    try:
        saved: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TeacherError(f"teacher.checkpoint: {path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TeacherError(
            f"teacher.checkpoint: {path}: not a loadable weights file ({first})"
        ) from None
    if isinstance(saved, dict):
        for key in ("state_dict", "model"):
            if isinstance(saved.get(key), dict):
                saved = saved[key]
    if not isinstance(saved, dict):
        raise TeacherError(
            f"teacher.checkpoint: {path}: holds a {type(saved).__name__}, not weights"
        )
    model = build_model(arch, data.num_classes, data.channels)
    mismatch = _mismatch(model.state_dict(), saved)
    if mismatch:
        raise TeacherError(
            f"teacher.checkpoint: {path} does not fit {arch} with {data.num_classes} classes and "
            f"{data.channels} input channels: {mismatch}"
        )
    model.load_state_dict(saved)
    return model


def _mismatch(expected: dict[str, torch.Tensor], saved: dict[str, Any]) -> str:
    """A short description of how `saved` differs from `expected`, or '' if it fits."""
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    shapes = [
        f"{k} is {tuple(saved[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected weights (first: {extra[0]})")
    problems += shapes[:2]
    return "; ".join(problems)


def _val_acc(model: TapModel, data: ImageData, recipe: Recipe) -> float:
    return evaluate_split(model, data.val, data, recipe)[0]


def _save(model: TapModel, path: Path, meta: dict[str, Any]) -> None:
    """Write weights and metadata atomically, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    tmp.replace(path)
