"""Shared fixtures: an isolated cache per test, tiny recipes, and the real CIFAR-10 JPEG set."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from kdsearch.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = Path(
    os.environ.get("KDSEARCH_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache, so no test reuses another's decoded data or teacher."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def tiny_recipe(changes: dict[str, Any] | None = None) -> Recipe:
    """Synthetic data, resnet8 teacher and student, two epochs: a full run in a few seconds."""
    recipe = Recipe.from_dict(
        {
            "data": {"dataset": "synthetic", "val_fraction": 0.2},
            "teacher": {"arch": "resnet8", "train": {"epochs": 2, "lr": 0.05}},
            "student": {"arch": "resnet8"},
            "distill": {"ce": {"weight": 1.0}, "kd": {"weight": 0.9, "temperature": 4.0}},
            "schedule": {"epochs": 2, "kind": "cosine"},
            "device": "cpu",
        }
    )
    return recipe.override(changes) if changes else recipe


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 as JPEG (../shared/data), extracted once per test session."""
    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"the CIFAR-10 JPEG archive is not at {CIFAR10_JPEG}")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(CIFAR10_JPEG) as tar:
        tar.extractall(root, filter="data")
    return root
