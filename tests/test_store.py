"""The teacher-output store: a run reading it trains exactly as one running the teacher live."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch

from kdsearch.data import ImageData, Loader, load_data
from kdsearch.distill import HEAD_TERMS
from kdsearch.losses import LOSSES
from kdsearch.models import TapModel, build_model
from kdsearch.recipe import DataConfig
from kdsearch.store import StoreConfig, per_image
from kdsearch.train import Result, train

from .conftest import tiny_recipe

STORED_TERMS = {  # every term that reads the teacher's outputs, and a recipe that runs it
    "kd": {},
    "pkt": {"distill.pkt.weight": 100.0},
    "crd": {"distill.crd.weight": 0.8, "distill.crd.negatives": 64},
    "sskd": {"distill.sskd.weight": 1.0},
    "hsakd": {"distill.hsakd.weight": 1.0, "distill.hsakd.placement": [1, 3]},
    "hsakd+crd+kd": {"distill.hsakd.weight": 1.0, "distill.crd.weight": 0.5},
}


@pytest.fixture(scope="module")
def data() -> ImageData:
    return load_data(DataConfig(dataset="synthetic", val_fraction=0.2, subset=320))


@pytest.fixture(scope="module")
def teacher(data: ImageData) -> tuple[TapModel, dict[str, torch.nn.Module]]:
    torch.manual_seed(0)
    model = build_model("resnet8", data.num_classes, data.channels)
    heads = {n: LOSSES[n].teacher_heads(model, data.num_classes) for n in HEAD_TERMS}
    return model, heads


def config(root: Path, budget_mb: float = 64.0) -> StoreConfig:
    return StoreConfig(root, int(budget_mb * 2**20), 0)


def run(
    data: ImageData,
    teacher: tuple[TapModel, dict[str, torch.nn.Module]],
    changes: dict[str, object],
    store: StoreConfig | None,
) -> Result:
    recipe = tiny_recipe({"schedule.epochs": 2, **changes})
    return train(recipe, data, teacher=teacher[0], teacher_heads=teacher[1], store=store)


def assert_same(a: Result, b: Result) -> None:
    for x, y in zip(a.history, b.history, strict=True):
        assert x.train_loss == pytest.approx(y.train_loss, rel=1e-5)
        assert x.parts == pytest.approx(y.parts, rel=1e-5)
        assert x.val_acc == pytest.approx(y.val_acc, abs=1e-9)
    for p, q in zip(a.student.parameters(), b.student.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("term", list(STORED_TERMS))
def test_a_run_reading_the_store_trains_as_one_running_the_teacher_live(
    term: str,
    data: ImageData,
    teacher: tuple[TapModel, dict[str, torch.nn.Module]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changes = STORED_TERMS[term]
    live = run(data, teacher, changes, None)
    writer = run(data, teacher, changes, config(tmp_path))  # computes each epoch, stores it
    stored = sorted(p.name for p in next(tmp_path.iterdir()).iterdir() if p.is_dir())
    assert len(stored) == 2, "both epochs are in the store"

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher ran although the store holds its outputs")

    monkeypatch.setattr(teacher[0], "taps", no_teacher)
    reader = run(data, teacher, changes, config(tmp_path))  # reads both epochs
    assert_same(live, writer)
    assert_same(live, reader)


def test_terms_that_read_stage_maps_or_mix_their_own_images_run_live(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    for changes in (
        {"distill.cktf.weight": 1.0},
        {"distill.kd.weight": 0.0, "distill.stkd.weight": 1.0},
    ):
        run(data, teacher, changes, config(tmp_path))
        assert not list(tmp_path.rglob("*.npy"))


def test_stkd_beside_kd_reads_kd_s_outputs_from_the_store(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    changes = {"distill.stkd.weight": 1.0}
    live = run(data, teacher, changes, None)
    run(data, teacher, changes, config(tmp_path))
    assert_same(live, run(data, teacher, changes, config(tmp_path)))
    assert {p.name for p in tmp_path.rglob("*.npy")} == {"logits.npy", "pooled.npy"}


def test_an_epoch_another_run_is_computing_is_run_live_and_not_written_twice(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    live = run(data, teacher, {}, None)
    run(data, teacher, {"schedule.epochs": 1}, config(tmp_path / "probe"))
    (stream,) = (tmp_path / "probe").iterdir()
    folder = tmp_path / "store" / stream.name
    folder.mkdir(parents=True)
    fd = os.open(folder / "plain-epoch1.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is computing epoch 1 (the second)
    try:
        result = run(data, teacher, {}, config(tmp_path / "store"))
    finally:
        os.close(fd)
    assert_same(live, result)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["plain-epoch0"]


def test_an_epoch_over_the_budget_is_used_but_not_stored(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    live = run(data, teacher, {}, None)
    result = run(data, teacher, {}, config(tmp_path, budget_mb=0.01))
    assert_same(live, result)
    assert not list(tmp_path.rglob("*.npy"))


def test_an_epoch_the_disk_has_no_room_for_is_used_and_leaves_nothing_behind(
    data: ImageData,
    teacher: tuple[TapModel, dict[str, torch.nn.Module]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full $TMPDIR failed every trial (OSError out of np.save) and left half-written files
    that counted against the budget; the store is a saving, never a reason to fail."""
    live = run(data, teacher, {}, None)

    def full(path: Path, array: object) -> None:
        Path(path).write_bytes(b"\x93NUMPY")  # the first bytes made it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kdsearch.store.np.save", full)
    assert_same(live, run(data, teacher, {}, config(tmp_path)))
    assert not list(tmp_path.rglob("*.npy"))


def test_trials_with_another_seed_or_batch_size_do_not_share(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    for changes in ({}, {"seed": 1}, {"batch_size": 32}, {"distill.pkt.weight": 100.0}):
        run(data, teacher, {"schedule.epochs": 1, **changes}, config(tmp_path))
    assert len(list(tmp_path.iterdir())) == 3  # kd and kd+pkt read the same outputs


def test_trials_share_by_the_precision_they_train_in_not_the_one_they_name(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    for precision in ("auto", "bf16", "fp32"):
        run(data, teacher, {"schedule.epochs": 1, "precision": precision}, config(tmp_path))
    # auto is bf16 on a CPU with AMX and fp32 elsewhere: it shares with one of the other two
    assert len(list(tmp_path.iterdir())) == 2


def test_rotated_outputs_are_kept_per_image_and_served_in_step_layout(data: ImageData) -> None:
    from kdsearch.store import EpochOutputs

    loader = Loader(data.train, data, torch.device("cpu"), batch_size=4, train=True)
    batch = next(iter(loader.epoch(0)))
    step_layout = {"rot_logits": torch.arange(16.0)[:, None], "logits": torch.arange(4.0)[:, None]}
    rows = per_image(step_layout, 4)
    assert rows["rot_logits"].shape == (4, 4, 1) and rows["rot_logits"][1].flatten().tolist() == [
        1,
        5,
        9,
        13,
    ]
    full = {k: torch.zeros(len(data.train), *v.shape[1:]) for k, v in rows.items()}
    for k, v in rows.items():
        full[k][batch.idx] = v
    served = EpochOutputs(full, torch.float32).rows(batch.idx, torch.device("cpu"))
    assert torch.equal(served["rot_logits"], step_layout["rot_logits"])
    assert torch.equal(served["logits"], step_layout["logits"])
