"""The teacher-output store: the frozen teacher's outputs for one epoch of training data,
computed once and read by every trial of a search on the same machine.

Within a search every trial sees the same images in the same order with the same augmentation
draws (a pure function of the recipe's seed, which a space cannot search, the epoch and the
image index, see `data.Loader`), so the teacher's outputs for an epoch are the same for every
trial. The first trial to reach an epoch computes them, over the batches it trains on, and
writes them to the store; later trials read them instead of running the teacher. What is stored
is what the terms read of the teacher: final logits and pooled features, on the batch (`plain`)
or on its four rotations (`rot`), and the outputs of the teacher's HSAKD heads on the rotations.
Terms that read the teacher's stage maps (CKTF) or its outputs on images a trial mixes with its
own parameters (STKD) run the teacher live.

An epoch is one folder of `.npy` files, in the precision the teacher ran in (bf16 as its 16
bits), written under a temporary name and renamed into place, so a reader never sees half an
epoch; a lock file per epoch lets one trial compute it while a trial reaching it at the same
time runs the teacher live for that epoch instead of waiting or computing it twice. Stored
epochs are memory-mapped (the page cache holds them in host memory); an epoch that fits
`device_bytes` is copied to the training device at the start of the epoch. Writers take turns
(one lock for the whole store) to check `budget_bytes` and write, so trials computing different
epochs at once cannot grow the store past it together. An epoch that would grow the store past
the budget (or the disk's free space) is not computed: its first batch tells its size, and the
trial runs the teacher live, as do later trials for the epochs of the kind not stored. An epoch
that fitted when its computing began but not once it was done (trials computing others at the
same time took the room) is used by the trial that computed it and not stored.
"""

from __future__ import annotations

import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
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
from kdsearch.paths import flocked
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
        self,
        epoch: int,
        group: str,
        device: torch.device,
        compute: Callable[[], Iterator[tuple[Tensor, Outputs]]],
    ) -> EpochOutputs | None:
        """The outputs of `epoch` for `group`: read from the store; else computed here (by
        `compute`, which yields each batch's image indices and its step-layout outputs) and
        stored when the budget allows; None when the teacher is to run live for this epoch
        (another trial is computing it right now, the store is known to have no room for it,
        or the store's folder cannot be written)."""
        final = self.folder / f"{group}-epoch{epoch}"
        if not final.is_dir():
            with flocked(final.with_suffix(".lock"), wait=False) as mine:
                if not mine:
                    return None
                if not final.is_dir():
                    return self._computed(group, final, device, compute)
        return self._placed(self._read(final), device)

    def _computed(
        self,
        group: str,
        final: Path,
        device: torch.device,
        compute: Callable[[], Iterator[tuple[Tensor, Outputs]]],
    ) -> EpochOutputs | None:
        """`final`'s epoch computed here, and stored if it fits; None when it is known not to:
        from an earlier epoch of the group, or from this one's first batch, before the rest is
        computed (so an epoch over the budget never takes more memory than a batch's outputs)."""
        size = self.folder / f"{group}.bytes"  # every epoch of a group is the same size
        with suppress(OSError, ValueError):
            if not self._has_room(int(size.read_text())):
                return None  # computing it would only cost its memory and syncs
        outputs = self._compute(compute, size)
        if outputs is None:
            return None
        with flocked(self.config.root / "writer.lock", wait=True) as mine:
            if mine:
                self._clear_dead_writers()
                if self._used() + outputs.nbytes <= self.config.budget_bytes:
                    self._write(outputs, final)
        return self._placed(outputs, device)

    def _has_room(self, need: int) -> bool:
        """Whether an epoch of `need` bytes fits the budget beside the stored epochs, and the
        disk."""
        return (
            self._used() + need <= self.config.budget_bytes
            and shutil.disk_usage(self.folder).free >= need
        )

    def _compute(
        self, compute: Callable[[], Iterator[tuple[Tensor, Outputs]]], size: Path
    ) -> EpochOutputs | None:
        """The epoch's outputs, or None when its first batch shows that it cannot be stored
        (its size, one row an image, is then written to `size` for the epochs after it)."""
        tensors: dict[str, Tensor] = {}
        for idx, batch_outputs in compute():
            rows_of = per_image(batch_outputs, len(idx))
            if not tensors:
                need = self.num_images * sum(r[0].nbytes for r in rows_of.values())
                with suppress(OSError):
                    size.write_text(str(need))
                with suppress(OSError):  # a folder that cannot be read: the write will tell
                    if not self._has_room(need):
                        return None
                tensors = {
                    name: torch.empty((self.num_images, *rows.shape[1:]), dtype=rows.dtype)
                    for name, rows in rows_of.items()
                }
            for name, rows in rows_of.items():
                tensors[name][idx.cpu()] = rows.cpu()
        return EpochOutputs(tensors)

    def _used(self) -> int:
        """Bytes of the stored epochs (renamed into place; epochs are never removed while a
        search runs, so none vanishes under this count)."""
        return sum(
            f.stat().st_size
            for epoch in self.config.root.glob("*/*-epoch*")
            if not epoch.name.startswith(".") and epoch.is_dir()
            for f in epoch.glob("*.npy")
        )

    def _clear_dead_writers(self) -> None:
        """Remove the temporary folders of writers killed while writing (called by the writer
        holding the store's lock: no live writer has one)."""
        for partial in self.config.root.glob("*/.*-epoch*"):
            shutil.rmtree(partial, ignore_errors=True)

    def _write(self, outputs: EpochOutputs, final: Path) -> None:
        partial = final.with_name(f".{final.name}.{uuid.uuid4().hex}")
        try:
            partial.mkdir()
            for name, t in outputs.tensors.items():
                bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # NumPy has no bf16
                np.save(partial / f"{name}.npy", bits.numpy())
                (partial / f"{name}.dtype").write_text(str(t.dtype).removeprefix("torch."))
            partial.rename(final)
        except OSError:  # the disk is full (the epoch is used, not stored), or another process
            # wrote it in the meantime (theirs is kept)
            shutil.rmtree(partial, ignore_errors=True)

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
        """This epoch's outputs (stored, or computed now over the run's own batches), or None
        when another run is computing them: the teacher then runs live for this epoch."""

        def compute() -> Iterator[tuple[Tensor, Outputs]]:
            for batch in self.loader.epoch(epoch):
                yield batch.idx, self.outputs(batch.x)

        return self.store.epoch(epoch, self.group, self.loader.device, compute)
