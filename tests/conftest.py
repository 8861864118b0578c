"""Shared fixtures: an isolated cache per test, tiny recipes, and the real CIFAR-10 JPEG set."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from kdsearch.recipe import Recipe
from kdsearch.train import EpochStats, cpu_multiplies_bf16

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = Path(
    os.environ.get("KDSEARCH_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)


def pytest_configure(config: pytest.Config) -> None:
    """Each worker of a parallel run (pytest-xdist) its own temporary folder, and the searches it
    starts theirs and their Ray's under it: a search removes the folders of dead drivers it finds
    there, which the other worker's kill -9 test had left to look at. And a share of the CPUs:
    torch's threads on every CPU in each worker made the tests training in-process six times
    slower, spinning against the other worker's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        one_ray_token()
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cpus or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(share)  # the searches' drivers this worker starts
    torch.set_num_threads(share)
    own = tempfile.mkdtemp(prefix=f"kd{worker}-")  # short: Ray's socket paths are under it
    os.environ["TMPDIR"] = own
    tempfile.tempdir = None  # asked again, from TMPDIR
    config.add_cleanup(lambda: shutil.rmtree(own, ignore_errors=True))


def one_ray_token() -> None:
    """Where this machine has no Ray token yet, write the one Ray's first local start would
    (~/.ray/auth_token, 64 hex digits) before the workers start: two workers starting their
    first Rays at once would each write their own, and a cluster could read the other's."""
    if {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
        return  # the user's own settings
    token = Path.home() / ".ray" / "auth_token"
    token.parent.mkdir(exist_ok=True)
    with (
        contextlib.suppress(FileExistsError),
        os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file,
    ):
        file.write(secrets.token_hex(32))


def run_cli(
    *args: str, cwd: Path, timeout: float = 900, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`kdsearch ARGS` as a user runs it, in its own process, output captured; `env` is added
    to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "kdsearch.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=timeout,
    )


CliHere = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli_here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> CliHere:
    """`kdsearch ARGS` run in this process, in folder `cwd`, what it printed captured as
    `run_cli` captures it. For commands that start no search, where a process of their own
    spends seconds importing."""
    from kdsearch.cli import main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("COLUMNS", "200")  # as run_cli: tables as wide as they want
        capsys.readouterr()  # what the test printed before is not the command's
        on_term = signal.getsignal(signal.SIGTERM)  # main installs its own
        try:
            status = main(list(args))
        except SystemExit as exit_:  # a usage error
            status = int(exit_.code or 0)
        finally:
            signal.signal(signal.SIGTERM, on_term)
        shown = capsys.readouterr()
        return subprocess.CompletedProcess(["kdsearch", *args], status, shown.out, shown.err)

    return run


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache, so no test reuses another's decoded data or teacher."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


class Recorder:
    """A training report that keeps the epochs and batch ticks it is given."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.ticks: list[tuple[int, int]] = []

    def __call__(self, stats: EpochStats) -> None:
        self.epochs.append(stats.epoch)

    def batch(self, done: int, total: int) -> None:
        self.ticks.append((done, total))


def auto_on_cpu() -> str:
    """What `precision: auto` trains in on this machine's CPU: bf16 where it multiplies bf16."""
    return "bf16" if cpu_multiplies_bf16() else "fp32"


def cpu_like(
    monkeypatch: pytest.MonkeyPatch, *, avx512_bf16: bool, amx: bool = False, amx_on: bool = False
) -> None:
    """torch's probes of the CPU answering as one with these bf16 instructions would (AMX
    tiles that the kernel lets the process use where `amx_on`), whatever this CPU has; and no
    cap on oneDNN's instruction set."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: amx_on)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)


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


SMALL_SPACE = """
study: {name: s}
base:
  data: {dataset: digits, subset: 300, val_fraction: 0.3}
  teacher: {arch: resnet8, train: {epochs: 2, lr: 0.1}}
  student: {arch: resnet8}
  distill: {kd: {weight: 0.9, temperature: 4.0}}
  schedule: {epochs: 3, kind: cosine}
  device: cpu
space:
  distill.kd.temperature: {type: float, low: 1.0, high: 8.0}
search: {trials: 5, concurrent: 2, per_trial: {cpu: 1}, sampler: random, seed: 0}
asha: {max_epochs: 2, grace_epochs: 1, reduction_factor: 2}
"""

# Search results written as a search would write them (values chosen so the ranking is known;
# promotion, export and the report then work on this record for real).
SEARCH_VALUES = {
    0: ("COMPLETE", [0.50, 0.70]),
    1: ("COMPLETE", [0.60, 0.90]),
    2: ("PRUNED", [0.95]),
    3: ("COMPLETE", [0.40, 0.80]),
    4: ("FAIL", []),
}


def write_study(root: Path, space_text: str = SMALL_SPACE) -> str:
    """A finished search study of `space_text` in root/studies/s.db; returns its URL."""
    from optuna.trial import TrialState

    from kdsearch.space import SearchSpace
    from kdsearch.study.record import Record
    from kdsearch.study.storage import open_storage

    (root / "studies").mkdir(parents=True, exist_ok=True)
    (root / "space.yaml").write_text(space_text)
    url = f"sqlite:///{root}/studies/s.db"
    space = SearchSpace.from_yaml(space_text, source="space.yaml")
    record = Record(open_storage(url), "s", space, target=len(SEARCH_VALUES), resume=False)
    for number, (state, values) in SEARCH_VALUES.items():
        assert record.next_plan(f"ray{number}") is not None
        curve = {epoch + 1: v for epoch, v in enumerate(values)}
        attrs = {"epochs": len(values), "threads": 1} | (
            {"failure": "NonFiniteLoss: nan"} if state == "FAIL" else {}
        )
        record.finish(number, TrialState[state], curve, attrs)
    return url
