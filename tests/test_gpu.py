"""CUDA paths; skipped where no GPU is present (CI never has one)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from kdsearch.data import ImageData, load_data
from kdsearch.recipe import DataConfig
from kdsearch.train import train

from .conftest import tiny_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture
def synthetic() -> ImageData:
    return load_data(DataConfig(dataset="synthetic"))


@pytest.fixture
def linear_dtypes() -> Iterator[list[torch.dtype]]:
    """The dtypes every nn.Linear's output had while the test ran (a probe of autocast)."""
    seen: list[torch.dtype] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, nn.Linear) and torch.is_grad_enabled():
            seen.append(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


@pytest.fixture
def scalers(monkeypatch: pytest.MonkeyPatch) -> list[torch.amp.GradScaler]:
    """Every GradScaler made while the test ran."""
    made: list[torch.amp.GradScaler] = []

    class Recording(torch.amp.GradScaler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    return made


def test_auto_device_trains_on_cuda_in_bf16(
    synthetic: ImageData, linear_dtypes: list[torch.dtype]
) -> None:
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("`auto` is bf16 from Ampere on (fp16 before)")
    teacher = train(tiny_recipe({"distill.kd.weight": 0.0, "device": "auto"}), synthetic).student
    linear_dtypes.clear()
    result = train(
        tiny_recipe({"device": "auto", "schedule.epochs": 3}), synthetic, teacher=teacher
    )
    assert next(result.student.parameters()).is_cuda
    assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16}
    assert result.val_acc > 0.3


def test_fp16_uses_loss_scaling_and_trains(
    synthetic: ImageData, scalers: list[torch.amp.GradScaler]
) -> None:
    recipe = tiny_recipe(
        {"distill.kd.weight": 0.0, "device": "cuda", "precision": "fp16", "schedule.epochs": 3}
    )
    assert train(recipe, synthetic).val_acc > 0.3
    (scaler,) = scalers
    assert scaler.is_enabled() and scaler._scale is not None  # it scaled the steps


def test_teacher_heads_in_fp16_use_loss_scaling_too(scalers: list[torch.amp.GradScaler]) -> None:
    from kdsearch.teacher import get_teacher

    recipe = tiny_recipe(
        {
            "distill.hsakd.weight": 1.0,
            "teacher.heads.epochs": 1,
            "device": "cuda",
            "precision": "fp16",
        }
    )
    get_teacher(recipe, load_data(recipe.data))
    assert [s.is_enabled() for s in scalers] == [True, True]  # the teacher's, then the heads'


def test_cuda_training_runs_channels_last_too(synthetic: ImageData) -> None:
    result = train(tiny_recipe({"distill.kd.weight": 0.0, "device": "cuda"}), synthetic)
    convs = [p for p in result.student.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_a_teacher_trained_on_the_gpu_is_shared_from_host_memory() -> None:
    """Trials rebuild what the driver shares; CUDA tensors would land on the driver's GPU in
    every trial, and fail on a node without one."""
    from kdsearch.search.worker import share
    from kdsearch.teacher import get_teacher

    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    recipe = recipe.override({"device": "cuda"})
    data = load_data(recipe.data)
    teacher = get_teacher(recipe, data)
    assert not next(teacher.model.parameters()).is_cuda  # back in host memory
    shared = share(data, teacher, recipe.teacher.arch)
    tensors = [*shared.teacher_state.values()]
    tensors += [t for state in shared.heads_state.values() for t in state.values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


@pytest.mark.parametrize("term", ["kd", "pkt", "crd", "cktf", "sskd", "hsakd", "stkd"])
def test_compiled_training_replays_cuda_graphs_and_gives_the_eager_run(
    synthetic: ImageData, term: str
) -> None:
    """`compile: true` on CUDA replays each model's passes as CUDA graphs, whose outputs the
    next step overwrites: every term must have read them before (or the losses drift), and no
    pass may fall back to launching its kernels one by one (a skipped graph raises here). The
    validation accuracy of these barely trained students (two epochs) is not compared: with
    CRD, training losses within 0.5% of each other ended 6 of 80 validation images apart."""
    from torch._inductor import config as inductor

    from kdsearch.distill import HEAD_TERMS
    from kdsearch.losses import LOSSES

    teacher = train(tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": 1}), synthetic)
    heads = {n: LOSSES[n].teacher_heads(teacher.student, synthetic.num_classes) for n in HEAD_TERMS}
    weights = {f"distill.{n}.weight": 0.0 for n in LOSSES if n != "ce"}
    recipe = tiny_recipe(
        {**weights, f"distill.{term}.weight": 1.0, "device": "cuda", "precision": "fp32"}
    )
    runs = []
    for compiled in (False, True):
        with warnings.catch_warnings(), inductor.patch({"triton.cudagraph_or_error": True}):
            warnings.filterwarnings("error", message="torch.compile failed")
            run = recipe.override({"compile": compiled})
            runs.append(train(run, synthetic, teacher=teacher.student, teacher_heads=heads))
    eager, graphs = runs
    for e, g in zip(eager.history, graphs.history, strict=True):
        assert g.train_loss == pytest.approx(e.train_loss, rel=5e-3)
