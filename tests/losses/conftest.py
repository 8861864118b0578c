"""Helpers to build terms on small real models and run single training steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from kdsearch.data import Batch, ImageData, Loader, load_data
from kdsearch.distill import HEAD_TERMS, Distiller
from kdsearch.losses import LOSSES, BuildContext, Step
from kdsearch.models import TapModel, build_model
from kdsearch.recipe import DataConfig, Recipe

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_data() -> ImageData:
    """Synthetic 3x16x16 images, ten classes: every model of the zoo runs on it in milliseconds."""
    return load_data(DataConfig(dataset="synthetic", subset=200, val_fraction=0.2))


def recipe_with(
    terms: dict[str, dict[str, Any]], student: str = "resnet8", teacher: str = "resnet14"
) -> Recipe:
    """A recipe whose only active terms are `terms` (name -> settings including weight)."""
    distill: dict[str, Any] = {name: {"weight": 0.0} for name in LOSSES}
    distill.update(terms)
    return Recipe.from_dict(
        {
            "data": {"dataset": "synthetic"},
            "teacher": {"arch": teacher},
            "student": {"arch": student},
            "distill": distill,
            "device": "cpu",
            "batch_size": 8,
        }
    )


def context(data: ImageData, student: TapModel, teacher: TapModel) -> BuildContext:
    heads = {n: LOSSES[n].teacher_heads(teacher, data.num_classes).eval() for n in HEAD_TERMS}
    for h in heads.values():
        h.requires_grad_(False)
    teacher.eval().requires_grad_(False)
    return BuildContext(
        student,
        teacher,
        data.num_classes,
        train_labels=data.train.y,
        image_shape=(data.channels, data.image_size, data.image_size),
        teacher_heads=heads,
    )


def build(recipe: Recipe, data: ImageData) -> tuple[Distiller, BuildContext]:
    torch.manual_seed(0)
    student = build_model(recipe.student.arch, data.num_classes, data.channels)
    teacher = build_model(recipe.teacher.arch, data.num_classes, data.channels)
    ctx = context(data, student, teacher)
    return Distiller.build(recipe, ctx), ctx


def first_batch(data: ImageData, size: int = 8) -> Batch:
    loader = Loader(data.train, data, CPU, batch_size=size, train=True, seed=0)
    return next(iter(loader.epoch(0)))


def step_for(distiller: Distiller, ctx: BuildContext, batch: Batch, seed: int = 0) -> Step:
    teacher = ctx.teacher.taps if ctx.teacher is not None else None
    return Step(batch, ctx.student.taps, teacher, rotations=distiller.rotations, seed=seed)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
