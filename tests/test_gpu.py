"""CUDA paths; skipped where no GPU is present (CI never has one)."""

from __future__ import annotations

import pytest
import torch

from kdsearch.data import load_data
from kdsearch.recipe import DataConfig
from kdsearch.train import train

from .conftest import tiny_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_auto_device_trains_on_cuda_in_bf16() -> None:
    data = load_data(DataConfig(dataset="synthetic"))
    teacher = train(tiny_recipe({"distill.kd.weight": 0.0, "device": "auto"}), data).student
    result = train(tiny_recipe({"device": "auto", "schedule.epochs": 3}), data, teacher=teacher)
    assert next(result.student.parameters()).is_cuda
    assert result.val_acc > 0.3


def test_fp16_uses_loss_scaling_and_trains() -> None:
    data = load_data(DataConfig(dataset="synthetic"))
    recipe = tiny_recipe(
        {"distill.kd.weight": 0.0, "device": "cuda", "precision": "fp16", "schedule.epochs": 3}
    )
    assert train(recipe, data).val_acc > 0.3


def test_cuda_training_runs_channels_last_too() -> None:
    data = load_data(DataConfig(dataset="synthetic"))
    result = train(tiny_recipe({"distill.kd.weight": 0.0, "device": "cuda"}), data)
    convs = [p for p in result.student.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
