"""The teacher-output store: the frozen teacher's outputs for one epoch of training data, computed
once and read by every trial of a search on the same machine.

Within a search every trial sees the same images in the same order with the same augmentation draws
(a pure function of the recipe's seed, which a space cannot search, the epoch and the image's place
in the training split, see `data.Loader`), so the teacher's outputs for an epoch are the same for
every trial. The first trials to reach an epoch compute them, over the batches they train on, and
write them to the store; later trials read them instead of running the teacher. What is stored is
what the terms read of the teacher: final logits and pooled features, on the batch (`plain`) or on
its four rotations (`rot`), and the outputs of the teacher's HSAKD heads on the rotations. Terms
that read the teacher's stage maps (CKTF) or its outputs on images a trial mixes with its own
parameters (STKD) run the teacher live.

An epoch is one folder of `.npy` files, one row an image, in the precision the teacher ran in (bf16
as its 16 bits). Its batches are cut into `SHARES` shares, each with a lock: trials that reach an
epoch at the same time (a search's first trials all do, at every epoch) compute the shares between
them, each taking one nobody has, then waiting for those the others are computing, and each trial
then trains on the whole epoch. A share whose trial stopped half-way is computed by the next trial
to wait for it. Only once every share is in is the epoch marked complete; a reader never sees half
an epoch.

Its files are made at their full size, on the disk, before any share is computed, by a trial
holding the store's one lock and only when they fit `budget_bytes` beside the epochs already there
(complete or not) and the disk's free space: trials computing epochs at once cannot grow the store
past the budget, and a full disk shows then, not half-way (where the file system allocates ahead:
on macOS, ZFS or a copy-on-write btrfs it shows as a failed write, and that trial runs the teacher
live for the epoch). An epoch that does not fit is not computed: the first time, one batch tells
its size, and the trial runs the teacher live for it, as do the trials reaching it while there is
no room. Room is made by removing epochs that are not complete and that no trial is working on
(their trials stopped), where that makes enough. A trial waits for a share another trial is
computing only so long (see `_filled`), then runs the teacher live, and later trials do not wait
for that share again. Stored epochs are memory-mapped (the page cache holds them in host memory);
an epoch that fits `device_bytes` is copied to the training device at the start of the epoch.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdsearch.cache import digest
from kdsearch.data import ImageData, Loader
from kdsearch.distill import Distiller
from kdsearch.losses import LOSSES
from kdsearch.losses.base import ROTATIONS, TapsFn, rotate
from kdsearch.paths import flocked, staging_path
from kdsearch.recipe import Recipe

Outputs = dict[str, Tensor]
"""Teacher outputs of a set of images by name, one row per image (rotations: one row of 4)."""


@dataclass(frozen=True)
class StoreConfig:
    """Where a search's store lives and how large it may grow."""

    root: Path
    budget_bytes: int
    device_bytes: int


class EpochOutputs:
    """One epoch's teacher outputs for every training image, indexed by image, each in the
    dtype the teacher computed it in."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device) -> EpochOutputs:
        return EpochOutputs({k: v.to(device) for k, v in self.tensors.items()})

    def rows(self, idx: Tensor, device: torch.device) -> Outputs:
        """The outputs of the images `idx`, on `device`, in the training step's layout: plain
        tensors (B, ...), rotated ones (4B, ...) with the four rotations as consecutive blocks."""
        out = {}
        for name, t in self.tensors.items():
            rows = t[idx.to(t.device)].to(device, non_blocking=True)
            if name.startswith("rot"):
                rows = rows.transpose(0, 1).reshape(-1, *rows.shape[2:])
            out[name] = rows
        return out


def per_image(outputs: Outputs, batch: int) -> Outputs:
    """Step-layout outputs (rotated: 4B rows, rotation blocks) to one row per image."""
    out = {}
    for name, t in outputs.items():
        if name.startswith("rot"):
            t = t.reshape(ROTATIONS, batch, *t.shape[1:]).transpose(0, 1)
        out[name] = t
    return out


SHARES = 16
"""Into how many shares an epoch's batches are cut for the trials computing it at once."""

PATIENCE = 4
PATIENCE_S = 600.0
POLL_S = 0.02
"""How long a trial waits for a share another trial holds (see `TeacherStore._filled`), and how
often it looks."""

COMPLETE = "complete"
"""The file that marks an epoch folder whose every share has been computed."""

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Each stored output's shape for one image (its row) and dtype."""

Compute = Callable[[range], Iterator[tuple[Tensor, Outputs]]]
"""The teacher's outputs over some of an epoch's batches: each batch's image indices and its
step-layout outputs."""


def shares(batches: int) -> list[range]:
    """An epoch's batch numbers in at most `SHARES` runs of near-equal length."""
    n = min(SHARES, batches)
    return [range(i * batches // n, (i + 1) * batches // n) for i in range(n)]


class TeacherStore:
    """The store of one search (or one training run) for one stream of training batches.

    `stream` names everything the outputs depend on besides the epoch: the recipe's seed, the batch
    size, the precision and the device type; trials that differ in any of these never share.
    """

    def __init__(self, config: StoreConfig, stream: str, num_images: int) -> None:
        self.config = config
        self.folder = config.root / stream
        with suppress(OSError):  # where it cannot be made, no lock can be: the teacher runs live
            self.folder.mkdir(parents=True, exist_ok=True)
        self.num_images = num_images

    def epoch(
        self, epoch: int, group: str, device: torch.device, compute: Compute, batches: int
    ) -> EpochOutputs | None:
        """The outputs of `epoch` (of `batches` batches) for `group`: read from the store, or
        computed into it here, sharing the work with the trials computing it at the same time;
        None when the teacher is to run live for this epoch (the store has no room for it, or
        its folder cannot be written)."""
        final = self.folder / f"{group}-epoch{epoch}"
        if not self.folder.is_dir():
            return None
        if not (final / COMPLETE).exists():
            layout = self._layout(group, compute)
            if layout is None:
                return None
            with ExitStack() as working:
                with flocked(self.config.root / "writer.lock", wait=True) as mine:
                    if not mine or not (final.is_dir() or self._made(final, layout)):
                        return None
                    # held while this trial fills it: an epoch nobody holds may be removed
                    users = flocked(final / "users.lock", wait=True, shared=True)
                    if not working.enter_context(users):
                        return None
                with suppress(OSError):  # the store is a saving, never a reason to fail
                    if self._filled(final, layout, compute, batches):
                        return self._placed(self._read(final), device)
                return None
        return self._placed(self._read(final), device)

    def _layout(self, group: str, compute: Compute) -> Layout | None:
        """What `group` stores, from the store, or from the teacher's outputs on one batch
        (then written for the epochs after it); None when it cannot be written."""
        path = self.folder / f"{group}.layout"
        with suppress(OSError, ValueError, TypeError, AttributeError):
            return {
                name: (tuple(shape), getattr(torch, dtype))
                for name, (shape, dtype) in json.loads(path.read_text()).items()
            }
        idx, outputs = next(compute(range(1)))
        rows_of = per_image(outputs, len(idx))
        layout = {name: (tuple(rows.shape[1:]), rows.dtype) for name, rows in rows_of.items()}
        text = {
            name: (shape, str(dtype).removeprefix("torch."))
            for name, (shape, dtype) in layout.items()
        }
        staged = staging_path(path)
        try:
            staged.write_text(json.dumps(text))
            staged.replace(path)
        except OSError:
            staged.unlink(missing_ok=True)
            return None
        return layout

    def _bytes(self, layout: Layout) -> int:
        """The size of one epoch of `layout`."""
        return self.num_images * sum(
            math.prod(shape) * dtype.itemsize for shape, dtype in layout.values()
        )

    def _made(self, final: Path, layout: Layout) -> bool:
        """`final`'s files made at their full size (called holding the store's lock), when they
        fit the budget and the disk, after removing what no trial works on if need be; first
        the temporary folders of trials killed while making an epoch's files."""
        for made in self.config.root.glob("*/.*-epoch*"):  # a trial's, killed while making it
            shutil.rmtree(made, ignore_errors=True)
        need = self._bytes(layout)
        if not self._has_room(need):
            return False
        staged = final.with_name(f".{final.name}.{uuid.uuid4().hex}")
        try:
            staged.mkdir()
            for name, (shape, dtype) in layout.items():
                array = np.lib.format.open_memmap(
                    staged / f"{name}.npy", "w+", NUMPY[dtype], (self.num_images, *shape)
                )
                data, size = array.offset, array.nbytes
                del array  # its header is written and its rows are a hole in the file: their
                # room on the disk is taken now (macOS has no posix_fallocate: a full disk shows
                # there when a row is written, as an OSError too)
                if hasattr(os, "posix_fallocate") and size:
                    with open(staged / f"{name}.npy", "r+b") as f:
                        os.posix_fallocate(f.fileno(), data, size)
                (staged / f"{name}.dtype").write_text(str(dtype).removeprefix("torch."))
            staged.rename(final)
        except OSError:  # the disk is full after all, or the folder cannot be written
            shutil.rmtree(staged, ignore_errors=True)
            return False
        return True

    def _has_room(self, need: int) -> bool:
        """Whether an epoch of `need` bytes fits the budget beside the epochs in the store, and
        the disk, once the abandoned epochs (`_abandoned`) are removed; they are removed where
        that makes it fit (and only then: an epoch a stopped trial left may be finished by the
        next). They are looked for only where the epoch does not fit without."""
        with suppress(OSError):
            used, free = self._used(), shutil.disk_usage(self.folder).free
            if used + need <= self.config.budget_bytes and free >= need:
                return True
            abandoned = self._abandoned()
            held = sum(f.stat().st_size for epoch in abandoned for f in epoch.glob("*.npy"))
            if used - held + need <= self.config.budget_bytes and free + held >= need:
                for epoch in abandoned:
                    gone = epoch.with_name(f".{epoch.name}.{uuid.uuid4().hex}")  # never half-seen
                    epoch.rename(gone)
                    shutil.rmtree(gone, ignore_errors=True)
                return True
        return False

    def _filled(self, final: Path, layout: Layout, compute: Compute, batches: int) -> bool:
        """Every share of `final`'s epoch computed, here or by other trials: first the shares
        nobody is computing, then, waiting for each, those others were (computed here where a
        trial stopped before it was done). False when the shares' locks cannot be taken, or when
        a trial computing a share seems stuck: it has held it, since this trial began to wait for
        it, `PATIENCE` times as long as the longest share this trial computed, and at least
        `PATIENCE_S` seconds; the share is then marked, and later trials do not wait for it."""
        with closing(Rows(final, layout)) as rows:
            return self._shares_filled(final, rows, compute, batches)

    def _shares_filled(self, final: Path, rows: Rows, compute: Compute, batches: int) -> bool:
        took = 0.0  # the longest share computed here, in seconds
        for wait in (False, True):
            for number, share in enumerate(shares(batches)):
                done = final / f"share{number}.done"
                stuck = final / f"share{number}.stuck"  # another trial gave up waiting for it
                give_up = time.monotonic() + max(PATIENCE_S, PATIENCE * took)
                while not done.exists():
                    with flocked(final / f"share{number}.lock", wait=False) as mine:
                        if mine is None:
                            return False
                        if mine and not done.exists():
                            started = time.monotonic()
                            for idx, outputs in compute(share):
                                rows.write(idx, per_image(outputs, len(idx)))
                            done.touch()
                            took = max(took, time.monotonic() - started)
                            continue
                    if not wait or stuck.exists():
                        break
                    if time.monotonic() > give_up:
                        stuck.touch()
                        break
                    time.sleep(POLL_S)
                if not done.exists() and wait:
                    return False
        (final / COMPLETE).touch()
        return True

    def _used(self) -> int:
        """Bytes of the epochs in the store, complete or not (made under the store's lock, and
        removed only under it, so none vanishes under this count)."""
        return sum(
            f.stat().st_size
            for epoch in self.config.root.glob("*/*-epoch*")
            if not epoch.name.startswith(".") and epoch.is_dir()
            for f in epoch.glob("*.npy")
        )

    def _abandoned(self) -> list[Path]:
        """Epochs that are not complete and that no trial is working on (called holding the
        store's lock, under which every trial starts to work on an epoch, so none can start on
        these)."""
        found = []
        for epoch in self.config.root.glob("*/*-epoch*"):
            if epoch.name.startswith(".") or (epoch / COMPLETE).exists():
                continue
            with flocked(epoch / "users.lock", wait=False) as nobody:
                if nobody and not (epoch / COMPLETE).exists():  # not completed meanwhile
                    found.append(epoch)
        return found

    def _read(self, final: Path) -> EpochOutputs:
        with warnings.catch_warnings():  # memory-mapped read-only; nothing writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {
                f.stem: torch.from_numpy(np.load(f, mmap_mode="r")).view(
                    getattr(torch, f.with_suffix(".dtype").read_text())
                )
                for f in final.glob("*.npy")
            }
        return EpochOutputs(tensors)

    def _placed(self, outputs: EpochOutputs, device: torch.device) -> EpochOutputs:
        if device.type != "cpu" and outputs.nbytes <= self.config.device_bytes:
            return outputs.to(device)
        return outputs


NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}
"""How each output dtype is kept in a `.npy` file (NumPy has no bf16: its 16 bits)."""


def as_numpy(rows: Tensor) -> np.ndarray:
    """`rows` on the host as NumPy keeps them (`NUMPY`)."""
    rows = rows.detach().cpu()
    return (rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows).numpy()


class Rows:
    """An epoch's files, open to write images' rows into, each at its place with `os.pwrite` (a
    full disk is then an OSError; a write through a memory map would kill the process instead,
    on file systems that do not allocate ahead, such as ZFS). Closed with `close`."""

    def __init__(self, final: Path, layout: Layout) -> None:
        self.files: dict[str, tuple[int, int, int]] = {}  # name: descriptor, data offset, row
        try:
            for name in layout:
                header = np.load(final / f"{name}.npy", mmap_mode="r")
                fd = os.open(final / f"{name}.npy", os.O_WRONLY)
                self.files[name] = (fd, header.offset, header.strides[0])
        except BaseException:
            self.close()
            raise

    def write(self, idx: Tensor, rows_of: Outputs) -> None:
        """Each image's row of each output (one row an image, see `per_image`)."""
        images = idx.cpu().tolist()
        for name, rows in rows_of.items():
            fd, data, row = self.files[name]
            values = as_numpy(rows)
            for i, image in enumerate(images):
                if os.pwrite(fd, values[i].tobytes(), data + image * row) != row:
                    raise OSError(errno.ENOSPC, "a row written in part")  # a full disk

    def close(self) -> None:
        for fd, _, _ in self.files.values():
            os.close(fd)


def store_group(distiller: Distiller, heads: Mapping[str, torch.nn.Module]) -> str | None:
    """Which stored outputs a run reads: `plain` (the batch), `rot-...` (its rotations, with the
    outputs of the named teacher heads), or None when no active term can read from a store
    (none reads the teacher's outputs, or one reads its stage maps)."""
    reads = {term.teacher_reads for term in distiller.terms.values()}
    if "stages" in reads or "outputs" not in reads:
        return None
    if not distiller.rotations:
        return "plain"
    return "-".join(["rot", *sorted(heads)])


def teacher_outputs(
    teacher: TapsFn, heads: Mapping[str, torch.nn.Module], rotations: bool
) -> Callable[[Tensor], Outputs]:
    """What the store keeps of the teacher for a batch, in the step's layout (see `Step`)."""

    @torch.inference_mode()  # the outputs are copied into the store, never into a graph
    def outputs(x: Tensor) -> Outputs:
        if not rotations:
            t = teacher(x)
            return {"logits": t.logits, "pooled": t.pooled}
        t_rot = teacher(rotate(x))
        out = {"rot_logits": t_rot.logits, "rot_pooled": t_rot.pooled}
        for name, module in heads.items():
            out |= LOSSES[name].stored_extras(module, t_rot)
        return out

    return outputs


class StoreReader:
    """One training run's view of the store: its group of outputs, for its stream of batches."""

    def __init__(
        self, store: TeacherStore, group: str, outputs: Callable[[Tensor], Outputs], loader: Loader
    ) -> None:
        self.store, self.group, self.outputs, self.loader = store, group, outputs, loader

    @classmethod
    def open(
        cls,
        config: StoreConfig,
        recipe: Recipe,
        data: ImageData,
        distiller: Distiller,
        teacher: TapsFn,
        heads: Mapping[str, torch.nn.Module],
        loader: Loader,
        dtype: torch.dtype | None,
    ) -> StoreReader | None:
        """The reader for a run that trains in autocast `dtype` (None: fp32), or None when its
        terms cannot read from a store."""
        group = store_group(distiller, heads)
        if group is None:
            return None
        # Everything besides the epoch that decides the batches and the teacher's numbers on them
        # (the teacher itself is the search's one teacher: a store belongs to one search).
        stream = digest(
            [
                data.fingerprint,
                recipe.seed,
                recipe.batch_size,
                str(dtype),  # the precision it resolved to: `auto` differs between machines
                recipe.compile,
                str(loader.device),
            ]
        )
        store = TeacherStore(config, stream, len(data.train))
        return cls(store, group, teacher_outputs(teacher, heads, distiller.rotations), loader)

    def epoch(self, epoch: int) -> EpochOutputs | None:
        """This epoch's outputs (stored, or computed now over the run's own batches, with the
        runs computing them at the same time), or None when the teacher is to run live for this
        epoch."""

        def compute(batches: range) -> Iterator[tuple[Tensor, Outputs]]:
            for batch in self.loader.epoch(epoch, batches):
                yield batch.idx, self.outputs(batch.x)

        return self.store.epoch(epoch, self.group, self.loader.device, compute, len(self.loader))
