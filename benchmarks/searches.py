"""Helpers of the benchmarks that run whole searches: write a space file, run `kdsearch run` on it
as a user does (a fresh process), and read the study it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial
from tables import device_line


def work_dir(path: str | None, prefix: str) -> Path:
    """The benchmark's folder (`path`, or a new temporary one), with the kdsearch cache in it
    unless KDSEARCH_CACHE_DIR says otherwise."""
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KDSEARCH_CACHE_DIR", str(work / "cache"))
    return work


def shipped_space(path: Path) -> dict[str, Any]:
    """A space file as a document that can be written anywhere (its base recipe's path made
    absolute)."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    if isinstance(doc.get("base"), str):
        doc["base"] = str((path.parent / doc["base"]).resolve())
    return doc


def cifar10_base(root: str, subset: int, epochs: int) -> dict[str, Any]:
    """resnet20 -> resnet8 on a CIFAR-10 subset (an image folder at `root`; 80% train, 20%
    validation) for `epochs` epochs, the teacher trained 30 epochs."""
    return {
        "data": {
            "dataset": "imagefolder",
            "root": str(Path(root).resolve()),
            "subset": subset,
            "val_fraction": 0.2,
        },
        "teacher": {"arch": "resnet20", "train": {"epochs": 30, "lr": 0.05}},
        "student": {"arch": "resnet8"},
        "schedule": {"epochs": epochs, "kind": "cosine"},
    }


def cifar10_kd_search(
    root: str, name: str, *, subset: int, epochs: int, trials: int, asha: dict[str, int]
) -> dict[str, Any]:
    """A search of KD's temperature and weight and the learning rate on `cifar10_base`, 2 trials
    at a time, each of at most `epochs` epochs."""
    return {
        "study": {"name": name},
        "base": cifar10_base(root, subset, epochs),
        "space": {
            "distill.kd.temperature": {"type": "float", "low": 1.0, "high": 8.0},
            "distill.kd.weight": {"type": "float", "low": 0.0, "high": 2.0},
            "optim.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
        },
        "search": {"trials": trials, "concurrent": 2, "per_trial": {"cpu": 1}},
        "asha": {"max_epochs": epochs, **asha},
    }


def write_space(doc: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_search(space: Path, work: Path, *args: str) -> float:
    """Run `kdsearch run SPACE ARGS` in `work`; its wall time in seconds. Exits on failure, with
    the command's status (2 for an error the user caused, such as a wrong `--root`)."""
    command = [sys.executable, "-m", "kdsearch.cli", "run", str(space), *args]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{' '.join(command)} failed:\n{proc.stderr}", file=sys.stderr, end="")
        sys.exit(max(proc.returncode, 1))  # a signal's negative status is a failure too
    return time.perf_counter() - started


def trial_device() -> str:
    """Where the trials of a search with `device: auto` train (on a GPU where there are GPUs:
    `per_trial.gpu: auto`), and what `precision: auto` is there, for a table's first line."""
    import torch

    from kdsearch.train import autocast_dtype, resolve_device

    device = resolve_device("auto")
    dtype = autocast_dtype("auto", device)
    precision = "fp32" if dtype is None else "bf16" if dtype == torch.bfloat16 else "fp16"
    return f"trials on {device_line(device)}, precision: auto is {precision}"


def finished_trials(work: Path, study: str) -> list[FrozenTrial]:
    """The study's finished trials, in the order they finished."""
    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{work}/studies/{study}.db")
    done = [t for t in loaded.trials if t.state.is_finished()]
    return sorted(done, key=lambda t: t.datetime_complete or t.datetime_start or datetime.min)
