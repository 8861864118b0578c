"""The teacher-output store: a run reading it trains exactly as one running the teacher live."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kdsearch.data import ImageData, Loader, load_data
from kdsearch.distill import HEAD_TERMS
from kdsearch.losses import LOSSES
from kdsearch.models import TapModel, build_model
from kdsearch.recipe import DataConfig
from kdsearch.store import (
    Compute,
    EpochOutputs,
    Outputs,
    StoreConfig,
    TeacherStore,
    per_image,
    shares,
)
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


def test_a_run_finishing_an_epoch_another_run_began_trains_as_one_with_the_teacher_live(
    data: ImageData,
    teacher: tuple[TapModel, dict[str, torch.nn.Module]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs computing an epoch together each compute some of its shares; here the first run
    stops after a few of the first epoch's shares and the second computes the rest."""
    live = run(data, teacher, {}, None)
    from kdsearch import store

    rows = store.per_image
    calls = 0

    def stops(outputs: Outputs, batch: int) -> Outputs:
        nonlocal calls
        calls += 1
        if calls == 4:  # after the layout's batch and two shares (of four, a batch each)
            raise KeyboardInterrupt
        return rows(outputs, batch)

    monkeypatch.setattr(store, "per_image", stops)
    with pytest.raises(KeyboardInterrupt):
        run(data, teacher, {}, config(tmp_path))
    monkeypatch.undo()
    (stream,) = streams(tmp_path)
    begun = stream / "plain-epoch0"
    assert sorted(p.name for p in begun.glob("*.done")) == ["share0.done", "share1.done"]
    assert not (begun / "complete").exists()
    assert_same(live, run(data, teacher, {}, config(tmp_path)))
    assert (begun / "complete").exists()


def test_a_run_whose_epochs_are_over_the_budget_trains_as_one_without_a_store(
    data: ImageData, teacher: tuple[TapModel, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    live = run(data, teacher, {}, None)
    result = run(data, teacher, {}, config(tmp_path, budget_mb=0.01))
    assert_same(live, result)
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
BATCHES = 10  # of 100 images: one share each
CPU = torch.device("cpu")


def epoch_of(
    seen: list[int] | None = None, delay: float = 0.0, stop_after: int | None = None
) -> Compute:
    """A `compute` over batches of 100 images whose logits are their indices; notes the batches
    it computes in `seen`, takes `delay` seconds a batch, and raises after `stop_after`."""

    def compute(batches: range) -> Iterator[tuple[torch.Tensor, Outputs]]:
        for b in batches:
            if stop_after is not None and seen is not None and len(seen) == stop_after:
                raise KeyboardInterrupt
            if seen is not None:
                seen.append(b)
            time.sleep(delay)
            idx = torch.arange(b * 100, b * 100 + 100)
            yield idx, {"logits": idx[:, None].float().expand(100, 256).contiguous()}

    return compute


def expected_logits() -> torch.Tensor:
    return torch.arange(float(ROWS))[:, None].expand(ROWS, 256)


def store_of(tmp_path: Path, budget: int) -> TeacherStore:
    return TeacherStore(StoreConfig(tmp_path, budget, 0), "s", ROWS)


def test_runs_reaching_an_epoch_together_compute_its_shares_between_them(tmp_path: Path) -> None:
    """The first trials of a search reach every epoch together: one computed it while the others
    ran the teacher live, so each paid for the whole teacher."""
    store_of(tmp_path, 100 * EPOCH_BYTES).epoch(0, "plain", CPU, epoch_of(), BATCHES)
    seen: list[list[int]] = [[], [], []]
    whole: list[bool] = []  # whether a run's outputs were all there when it got them
    together = threading.Barrier(3)  # each has taken a share before any takes a second

    def reach(i: int) -> None:
        compute = epoch_of(seen[i], delay=0.05)

        def meeting(batches: range) -> Iterator[tuple[torch.Tensor, Outputs]]:
            if not seen[i]:
                together.wait(timeout=30)
            yield from compute(batches)

        store = store_of(tmp_path, 100 * EPOCH_BYTES)
        outputs = store.epoch(1, "plain", CPU, meeting, BATCHES)
        whole.append(
            outputs is not None and torch.equal(outputs.tensors["logits"], expected_logits())
        )

    threads = [threading.Thread(target=reach, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(seen), f"each computed a share: {seen}"
    assert sorted(b for batches in seen for b in batches) == list(range(BATCHES)), "once each"
    assert whole == [True, True, True]


def test_a_share_a_killed_run_was_computing_is_computed_by_the_next_run(tmp_path: Path) -> None:
    """A trial killed with -9 halfway through an epoch: the kernel lets go of its locks, and the
    next trial to reach the epoch computes what it had not."""
    store_of(tmp_path, 100 * EPOCH_BYTES).epoch(0, "plain", CPU, epoch_of(), BATCHES)
    here = Path(__file__).resolve().parents[1]  # the kdsearch these tests test
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(here)},
    )
    assert child.stdout is not None
    for line in child.stdout:  # the batches it computes, one a line
        if line.strip() == "3":
            break
    child.kill()
    child.wait(timeout=30)
    epoch = tmp_path / "s" / "plain-epoch1"
    assert sorted(p.name for p in epoch.glob("*.done")) == [f"share{i}.done" for i in range(3)]
    seen: list[int] = []
    outputs = store_of(tmp_path, 100 * EPOCH_BYTES).epoch(1, "plain", CPU, epoch_of(seen), 10)
    assert seen == [3, 4, 5, 6, 7, 8, 9], "share 3 was the killed run's: its lock is free"
    assert outputs is not None and torch.equal(outputs.tensors["logits"], expected_logits())


KILLED = """
import sys, time
from pathlib import Path
import torch
from kdsearch.store import StoreConfig, TeacherStore

def compute(batches):
    for b in batches:
        print(b, flush=True)
        time.sleep(0.2 if b < 3 else 60)
        idx = torch.arange(b * 100, b * 100 + 100)
        yield idx, {"logits": idx[:, None].float().expand(100, 256).contiguous()}

store = TeacherStore(StoreConfig(Path(sys.argv[1]), 2**30, 0), "s", 1000)
store.epoch(1, "plain", torch.device("cpu"), compute, 10)
"""


def within(seconds: float, call: Callable[[], object]) -> tuple[object, float]:
    """`call()`'s result and how long it took; fails, rather than hangs, past `seconds`."""
    got: list[object] = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: got.append(call()), daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert got, f"still waiting after {seconds} s"
    return got[0], time.monotonic() - started


def test_a_run_holding_a_share_too_long_is_not_waited_for_past_the_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial stuck while computing a share (stopped, hung on its device) held every trial
    reaching the epoch for as long as it was stuck."""
    monkeypatch.setattr("kdsearch.store.PATIENCE_S", 0.0)
    store = store_of(tmp_path, 100 * EPOCH_BYTES)
    store.epoch(0, "plain", CPU, epoch_of(), BATCHES)
    with pytest.raises(KeyboardInterrupt):  # makes the epoch's files
        store.epoch(1, "plain", CPU, epoch_of([], stop_after=0), BATCHES)
    fd = os.open(tmp_path / "s" / "plain-epoch1" / "share4.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # stuck
    try:
        seen: list[int] = []
        first = epoch_of(seen, delay=0.1)  # its longest share: 0.1 s, so it waits 0.4 s
        outputs, waited = within(30, lambda: store.epoch(1, "plain", CPU, first, BATCHES))
        assert outputs is None and seen == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        assert waited >= 9 * 0.1 + 0.4
        assert (tmp_path / "s" / "plain-epoch1" / "share4.stuck").exists()
        monkeypatch.setattr("kdsearch.store.PATIENCE_S", 20.0)
        outputs, waited = within(30, lambda: store.epoch(1, "plain", CPU, epoch_of(), BATCHES))
        assert outputs is None and waited < 0.4, "a later run does not wait for it again"
    finally:
        os.close(fd)
    seen = []
    outputs, _ = within(30, lambda: store.epoch(1, "plain", CPU, epoch_of(seen), BATCHES))
    assert seen == [4], "once the stuck run is gone, its share is computed"
    assert outputs is not None


def test_a_share_whose_run_stopped_half_way_is_computed_by_the_next_run(tmp_path: Path) -> None:
    store = store_of(tmp_path, 100 * EPOCH_BYTES)
    store.epoch(0, "plain", CPU, epoch_of(), BATCHES)  # the layout is known from here on
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        store.epoch(1, "plain", CPU, epoch_of(seen, stop_after=4), BATCHES)
    assert seen == [0, 1, 2, 3]
    assert not (tmp_path / "s" / "plain-epoch1" / "complete").exists()
    seen.clear()
    lock = os.open(tmp_path / "s" / "plain-epoch1" / "share6.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another run computing share 6, until it stops
    threading.Timer(0.5, os.close, (lock,)).start()
    outputs = store.epoch(1, "plain", CPU, epoch_of(seen), BATCHES)
    assert seen == [4, 5, 7, 8, 9, 6], "the free shares first, then the one the other run left"
    assert outputs is not None and torch.equal(outputs.tensors["logits"], expected_logits())


def test_a_share_another_run_finishes_while_its_lock_is_taken_is_not_computed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between seeing a share not done and getting its lock, its run can finish it."""
    from kdsearch import store as module

    store = store_of(tmp_path, 100 * EPOCH_BYTES)
    store.epoch(0, "plain", CPU, epoch_of(), BATCHES)
    lock = module.flocked

    def finished_meanwhile(path: Path, **how: bool) -> object:
        if path.name == "share2.lock":
            path.with_name("share2.done").touch()  # the other run, just before this one got it
        return lock(path, **how)

    monkeypatch.setattr(module, "flocked", finished_meanwhile)
    seen: list[int] = []
    assert store.epoch(1, "plain", CPU, epoch_of(seen), BATCHES) is not None
    assert seen == [0, 1, 3, 4, 5, 6, 7, 8, 9]


def test_runs_making_epochs_at_the_same_time_keep_the_store_within_its_budget(
    tmp_path: Path,
) -> None:
    """Each checked the budget before either had written, and both wrote: 2 epochs in a store
    with room for 1. An epoch's files now take their room before it is computed."""
    store_of(tmp_path, EPOCH_BYTES).epoch(0, "other", CPU, epoch_of(), BATCHES)  # its layout
    shutil.rmtree(tmp_path / "s" / "other-epoch0")
    (tmp_path / "s" / "plain.layout").write_text((tmp_path / "s" / "other.layout").read_text())
    got: list[object] = []
    threads = [
        threading.Thread(
            target=lambda e=e: got.append(
                store_of(tmp_path, EPOCH_BYTES).epoch(
                    e, "plain", CPU, epoch_of(delay=0.02), BATCHES
                )
            )
        )
        for e in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(g is None for g in got) == [False, True], "one stored, one run live"
    stored = [p.name for p in (tmp_path / "s").iterdir() if p.is_dir()]
    assert len(stored) == 1 and sum(f.stat().st_size for f in tmp_path.rglob("*.npy")) <= (
        EPOCH_BYTES + 128  # .npy header
    )


def test_a_full_store_runs_the_teacher_live_instead_of_computing_epochs_it_cannot_keep(
    tmp_path: Path,
) -> None:
    store = store_of(tmp_path, EPOCH_BYTES + 4096)
    seen: list[int] = []
    first = store.epoch(0, "plain", CPU, epoch_of(seen), BATCHES)
    assert seen == [0, *range(BATCHES)], "one batch for the layout, then the epoch"
    assert first is not None and (tmp_path / "s" / "plain-epoch0" / "complete").exists()
    seen.clear()
    assert store.epoch(1, "plain", CPU, epoch_of(seen), BATCHES) is None and seen == []
    read = store.epoch(0, "plain", CPU, epoch_of(seen), BATCHES)
    assert read is not None and seen == []
    assert torch.equal(read.tensors["logits"], expected_logits())


def test_an_epoch_over_the_budget_is_not_computed_past_its_first_batch(
    tmp_path: Path,
) -> None:
    """The first epoch of a kind was computed whole in host memory (the budget's size or more),
    used by the trial and thrown away, whatever the budget: now its first batch tells its size."""
    store = store_of(tmp_path, EPOCH_BYTES - 1)
    seen: list[int] = []
    assert store.epoch(0, "plain", CPU, epoch_of(seen), BATCHES) is None and seen == [0]
    assert json.loads((tmp_path / "s" / "plain.layout").read_text()) == {
        "logits": [[256], "float32"]
    }
    seen.clear()
    assert store.epoch(1, "plain", CPU, epoch_of(seen), BATCHES) is None and seen == []
    assert not list(tmp_path.rglob("*.npy"))


def test_a_full_disk_runs_the_teacher_live_instead_of_computing_epochs_it_cannot_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the budget but not the disk's free space: every epoch was computed (its host
    memory and a sync per batch) and thrown away."""
    store = store_of(tmp_path, 100 * EPOCH_BYTES)
    seen: list[int] = []
    assert store.epoch(0, "plain", CPU, epoch_of(seen), BATCHES) is not None and len(seen) == 11
    room = shutil.disk_usage(tmp_path)._replace(free=EPOCH_BYTES - 1)
    monkeypatch.setattr("kdsearch.store.shutil.disk_usage", lambda _: room)
    seen.clear()
    assert store.epoch(1, "plain", CPU, epoch_of(seen), BATCHES) is None and seen == []
    assert store.epoch(0, "plain", CPU, epoch_of(seen), BATCHES) is not None and seen == []


def test_an_epoch_the_disk_cannot_hold_after_all_is_run_live_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full $TMPDIR failed every trial (OSError out of np.save) and left half-written files
    that counted against the budget; the store is a saving, never a reason to fail. The disk
    filling between the check and the allocation is the same case now."""

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kdsearch.store.os.posix_fallocate", full)
    seen: list[int] = []
    assert store_of(tmp_path, 100 * EPOCH_BYTES).epoch(0, "plain", CPU, epoch_of(seen), 10) is None
    assert seen == [0]  # the layout's batch only
    assert not list(tmp_path.rglob("*.npy"))


def test_a_run_killed_while_making_an_epoch_leaves_nothing_behind(tmp_path: Path) -> None:
    dead = tmp_path / "s" / ".plain-epoch3.0123abcd"  # as `_made` names its folder
    dead.mkdir(parents=True)
    (dead / "logits.npy").write_bytes(bytes(EPOCH_BYTES))
    store = store_of(tmp_path, EPOCH_BYTES + 4096)
    assert store.epoch(0, "plain", CPU, epoch_of(), BATCHES) is not None
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["plain-epoch0"]


def test_an_epoch_no_run_works_on_any_more_is_removed_when_its_room_is_needed(
    tmp_path: Path,
) -> None:
    store = store_of(tmp_path, EPOCH_BYTES + 4096)
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):  # its run stopped: half an epoch, taking the room
        store.epoch(0, "plain", CPU, epoch_of(seen, stop_after=5), BATCHES)
    half = tmp_path / "s" / "plain-epoch0"
    fd = os.open(half / "users.lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a run still working on it
    try:
        assert store.epoch(1, "plain", CPU, epoch_of(), BATCHES) is None
        assert half.is_dir()
    finally:
        os.close(fd)
    outputs = store.epoch(1, "plain", CPU, epoch_of(), BATCHES)
    assert outputs is not None and torch.equal(outputs.tensors["logits"], expected_logits())
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["plain-epoch1"]


def test_an_epoch_a_stopped_run_left_is_kept_where_removing_it_would_not_make_room(
    tmp_path: Path,
) -> None:
    store = store_of(tmp_path, EPOCH_BYTES + EPOCH_BYTES // 2)
    with pytest.raises(KeyboardInterrupt):
        store.epoch(0, "plain", CPU, epoch_of([], stop_after=5), BATCHES)

    def wide(batches: range) -> Iterator[tuple[torch.Tensor, Outputs]]:  # twice the plain rows
        for idx, outputs in epoch_of()(batches):
            yield idx, {"logits": outputs["logits"].repeat(1, 2)}

    assert store.epoch(0, "wide", CPU, wide, BATCHES) is None
    assert (tmp_path / "s" / "plain-epoch0").is_dir(), "kept: the next run may finish it"
    seen: list[int] = []
    assert store.epoch(0, "plain", CPU, epoch_of(seen), BATCHES) is not None
    assert seen == [4, 5, 6, 7, 8, 9]  # the stopped run did shares 0-3 after the layout's batch


def test_without_posix_fallocate_the_store_writes_and_reads_its_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS has no posix_fallocate; zeros written over the whole file in its place wiped the
    files' NumPy headers, and every trial failed."""
    monkeypatch.delattr("kdsearch.store.os.posix_fallocate", raising=False)
    store = store_of(tmp_path, 100 * EPOCH_BYTES)
    assert store.epoch(0, "plain", CPU, epoch_of(), BATCHES) is not None
    outputs = store.epoch(0, "plain", CPU, epoch_of(), BATCHES)
    assert outputs is not None and torch.equal(outputs.tensors["logits"], expected_logits())


def test_bf16_outputs_are_stored_as_their_16_bits_and_read_back_as_they_were(
    tmp_path: Path,
) -> None:
    store = store_of(tmp_path, 2**30)
    values = torch.randn(ROWS, 256).bfloat16()

    def compute(batches: range) -> Iterator[tuple[torch.Tensor, Outputs]]:
        for b in batches:
            idx = torch.arange(b * 100, b * 100 + 100)
            yield idx, {"logits": values[idx], "pooled": values[idx].float()}

    store.epoch(0, "plain", CPU, compute, BATCHES)
    read = store.epoch(0, "plain", CPU, compute, BATCHES)
    assert read is not None
    assert read.tensors["logits"].dtype == torch.bfloat16
    assert torch.equal(read.tensors["logits"], values)
    assert read.tensors["pooled"].dtype == torch.float32  # each output in its own dtype
    assert (tmp_path / "s" / "plain-epoch0" / "logits.npy").stat().st_size < ROWS * 256 * 2 + 256


def test_a_store_whose_folder_cannot_be_written_runs_the_teacher_live(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    store = TeacherStore(StoreConfig(tmp_path / "file" / "store", 2**30, 0), "s", ROWS)
    seen: list[int] = []
    assert store.epoch(0, "plain", CPU, epoch_of(seen), BATCHES) is None
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


def test_an_epoch_is_cut_into_shares_of_whole_batches_in_order() -> None:
    assert [len(s) for s in shares(40)] == [2, 3] * 8
    assert {len(s) for s in shares(1000)} == {62, 63}
    assert shares(3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert [b for s in shares(1000) for b in s] == list(range(1000))
