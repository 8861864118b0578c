"""The teacher-output store: a run reading it trains exactly as one running the teacher live."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kdsearch.data import ImageData, Loader, load_data
from kdsearch.distill import HEAD_TERMS
from kdsearch.losses import LOSSES
from kdsearch.models import TapModel, build_model
from kdsearch.recipe import DataConfig
from kdsearch.store import Outputs, StoreConfig, TeacherStore, per_image
from kdsearch.train import Result, train

from .conftest import tiny_recipe

STORED_TERMS = {  # every term that reads the teacher's outputs, and a recipe that runs it
    "kd": {},
    "pkt": {"distill.pkt.weight": 100.0},
    "crd": {"distill.crd.weight": 0.8, "distill.crd.negatives": 64},
    "sskd": {"distill.sskd.weight": 1.0},
    "hsakd": {"distill.hsakd.weight": 1.0, "distill.hsakd.placement": [1, 3]},
    "hsakd+crd+kd": {"distill.hsakd.weight": 1.0, "distill.crd.weight": 0.5},
    "kd, bf16": {"precision": "bf16"},  # stored as its 16 bits, which NumPy has no type for
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


def streams(root: Path) -> list[Path]:
    """The store's folders, one per stream of batches (beside them: the writers' lock)."""
    return [p for p in root.iterdir() if p.is_dir()]


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
    (stream,) = streams(tmp_path)
    stored = sorted(p.name for p in stream.iterdir() if p.is_dir())
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
    (stream,) = streams(tmp_path / "probe")
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


def test_a_run_whose_epochs_are_over_the_budget_trains_as_one_without_a_store(
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
    assert len(streams(tmp_path)) == 3  # kd and kd+pkt read the same outputs


def test_trials_share_by_the_precision_they_train_in_not_the_one_they_name(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    for precision in ("auto", "bf16", "fp32"):
        run(data, teacher, {"schedule.epochs": 1, "precision": precision}, config(tmp_path))
    # auto is bf16 on a CPU that multiplies bf16 and fp32 elsewhere: it shares with one of the two
    assert len(streams(tmp_path)) == 2


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
    served = EpochOutputs(full).rows(batch.idx, torch.device("cpu"))
    assert torch.equal(served["rot_logits"], step_layout["rot_logits"])
    assert torch.equal(served["logits"], step_layout["logits"])


ROWS = 1000  # images of the epochs below; one epoch of 256 float32 logits each: 1,024,000 bytes
EPOCH_BYTES = ROWS * 256 * 4


def epoch_of(
    seen: list[int] | None = None, barrier: threading.Barrier | None = None
) -> Iterator[tuple[torch.Tensor, Outputs]]:
    """A `compute` of one epoch in batches of 100 (noted in `seen`); then waits at `barrier`."""
    for start in range(0, ROWS, 100):
        idx = torch.arange(start, start + 100)
        if seen is not None:
            seen.append(start)
        yield idx, {"logits": idx[:, None].float().expand(100, 256).contiguous()}
    if barrier is not None:
        barrier.wait(timeout=60)


def test_trials_storing_epochs_at_the_same_time_keep_the_store_within_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checked the budget before either had written, and both wrote: 2 epochs in a store
    with room for 1."""
    write = TeacherStore._write

    def slow_write(self: TeacherStore, *args: Any) -> None:  # a large epoch takes a while
        time.sleep(0.5)
        write(self, *args)

    monkeypatch.setattr(TeacherStore, "_write", slow_write)
    stores = [TeacherStore(StoreConfig(tmp_path, EPOCH_BYTES, 0), "s", ROWS) for _ in range(2)]
    barrier = threading.Barrier(2)  # both have computed their epoch before either writes
    cpu = torch.device("cpu")
    got: list[object] = []
    threads = [
        threading.Thread(
            target=lambda e=e: got.append(
                stores[e].epoch(e, "plain", cpu, lambda: epoch_of(None, barrier))
            )
        )
        for e in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(got) == 2 and all(g is not None for g in got), "both used their epoch"
    stored = [p.name for p in (tmp_path / "s").iterdir() if p.is_dir()]
    assert len(stored) == 1 and sum(f.stat().st_size for f in tmp_path.rglob("*.npy")) <= (
        EPOCH_BYTES + 128  # .npy header
    )


def test_a_full_store_runs_the_teacher_live_instead_of_computing_epochs_it_cannot_keep(
    tmp_path: Path,
) -> None:
    store = TeacherStore(StoreConfig(tmp_path, EPOCH_BYTES + 4096, 0), "s", ROWS)
    cpu = torch.device("cpu")
    seen: list[int] = []
    first = store.epoch(0, "plain", cpu, lambda: epoch_of(seen))
    assert first is not None and len(seen) == 10 and (tmp_path / "s" / "plain-epoch0").is_dir()
    seen.clear()
    assert store.epoch(1, "plain", cpu, lambda: epoch_of(seen)) is None and seen == []
    read = store.epoch(0, "plain", cpu, lambda: epoch_of(seen))
    assert (
        read is not None
        and seen == []
        and torch.equal(read.tensors["logits"], first.tensors["logits"])
    )


def test_an_epoch_over_the_budget_is_not_computed_past_its_first_batch(
    tmp_path: Path,
) -> None:
    """The first epoch of a kind was computed whole in host memory (the budget's size or more),
    used by the trial and thrown away, whatever the budget: now its first batch tells its size."""
    store = TeacherStore(StoreConfig(tmp_path, EPOCH_BYTES - 1, 0), "s", ROWS)
    cpu = torch.device("cpu")
    seen: list[int] = []
    assert store.epoch(0, "plain", cpu, lambda: epoch_of(seen)) is None and seen == [0]
    assert (tmp_path / "s" / "plain.bytes").read_text() == str(EPOCH_BYTES)
    seen.clear()
    assert store.epoch(1, "plain", cpu, lambda: epoch_of(seen)) is None and seen == []
    assert not list(tmp_path.rglob("*.npy"))


def test_a_full_disk_runs_the_teacher_live_instead_of_computing_epochs_it_cannot_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the budget but not the disk's free space: every epoch was computed (its host
    memory and a sync per batch) and thrown away."""
    store = TeacherStore(StoreConfig(tmp_path, 100 * EPOCH_BYTES, 0), "s", ROWS)
    cpu = torch.device("cpu")
    seen: list[int] = []
    assert store.epoch(0, "plain", cpu, lambda: epoch_of(seen)) is not None and len(seen) == 10
    room = shutil.disk_usage(tmp_path)._replace(free=EPOCH_BYTES - 1)
    monkeypatch.setattr("kdsearch.store.shutil.disk_usage", lambda _: room)
    seen.clear()
    assert store.epoch(1, "plain", cpu, lambda: epoch_of(seen)) is None and seen == []
    assert store.epoch(0, "plain", cpu, lambda: epoch_of(seen)) is not None and seen == []


def test_a_writer_killed_while_writing_leaves_nothing_that_counts_against_the_budget(
    tmp_path: Path,
) -> None:
    dead = tmp_path / "s" / ".plain-epoch3.0123abcd"  # as `_write` names its folder
    dead.mkdir(parents=True)
    (dead / "logits.npy").write_bytes(bytes(EPOCH_BYTES))
    store = TeacherStore(StoreConfig(tmp_path, EPOCH_BYTES + 4096, 0), "s", ROWS)
    assert store.epoch(0, "plain", torch.device("cpu"), epoch_of) is not None
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["plain-epoch0"]


def test_bf16_outputs_are_stored_as_their_16_bits_and_read_back_as_they_were(
    tmp_path: Path,
) -> None:
    store = TeacherStore(StoreConfig(tmp_path, 2**30, 0), "s", ROWS)
    cpu = torch.device("cpu")
    values = torch.randn(ROWS, 256).bfloat16()

    def compute() -> Iterator[tuple[torch.Tensor, Outputs]]:
        for start in range(0, ROWS, 100):
            idx = torch.arange(start, start + 100)
            yield idx, {"logits": values[idx], "pooled": values[idx].float()}

    store.epoch(0, "plain", cpu, compute)
    read = store.epoch(0, "plain", cpu, compute)
    assert read is not None
    assert read.tensors["logits"].dtype == torch.bfloat16
    assert torch.equal(read.tensors["logits"], values)
    assert read.tensors["pooled"].dtype == torch.float32  # each output in its own dtype
    assert (tmp_path / "s" / "plain-epoch0" / "logits.npy").stat().st_size < ROWS * 256 * 2 + 256


def test_a_store_whose_folder_cannot_be_written_runs_the_teacher_live(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    store = TeacherStore(StoreConfig(tmp_path / "file" / "store", 2**30, 0), "s", ROWS)
    seen: list[int] = []
    assert store.epoch(0, "plain", torch.device("cpu"), lambda: epoch_of(seen)) is None
    assert seen == []


def test_an_epochs_stored_outputs_are_let_go_before_the_next_epochs_are_placed(
    data: ImageData,
    teacher: tuple[TapModel, dict[str, torch.nn.Module]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU the next epoch was copied to the device while the last one's copy was still
    held: twice `device_mb` per trial."""
    import weakref

    from kdsearch.store import StoreReader

    read = StoreReader.epoch
    earlier: list[weakref.ref[object]] = []

    def epoch(self: StoreReader, number: int) -> object:
        assert all(ref() is None for ref in earlier), "the last epoch's outputs are still held"
        outputs = read(self, number)
        earlier.append(weakref.ref(outputs))
        return outputs

    monkeypatch.setattr(StoreReader, "epoch", epoch)
    run(data, teacher, {"schedule.epochs": 3}, config(tmp_path))
    assert len(earlier) == 3
