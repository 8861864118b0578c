"""What every data source makes and what splits them: `Split` and `ImageData` (uint8 images,
int64 labels), and the seeded streams that cut the subset, validation and test splits."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kdsearch.errors import DataError
from kdsearch.recipe import DataConfig

Progress = Callable[[str, int, int], None]
"""progress(what, done, total), called during long work such as decoding an image folder."""


@dataclass(frozen=True)
class Split:
    """Images (uint8, N x C x H x W) and their labels (int64, N)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """The same split on another device."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class ImageData:
    """A decoded data set with its splits and what augmentation and normalisation it takes."""

    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    hflip: bool  # whether training images are flipped left-right (not digits, by default)
    mean: tuple[float, ...]  # per channel, in [0, 1]: `data.mean`, else the training split's
    std: tuple[float, ...]  # `data.std`, else the training split's
    fingerprint: str  # changes whenever any image, label or split changes, `hflip` against
    # the data set's own default, or `data.mean` and `data.std` where given

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    def inputs(self) -> dict[str, Any]:
        """What a model trained on this data takes and gives, for code that serves it outside
        kdsearch: images of `channels` x `image_size` x `image_size` in [0, 1], minus `mean`
        and divided by `std` per channel; logits over `classes`, in that order."""
        return {
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "classes": list(self.classes),
        }


class Raw(NamedTuple):
    """What a source reads: the official train and test sets."""

    train: Split
    test: Split
    classes: tuple[str, ...]
    hflip: bool  # whether a flip keeps an image's class (not so for digits)
    cut: bool = False  # whether `train` is already `data.subset`'s images (an image folder's
    # subset is decoded alone), not the whole training set


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one purpose of one seed (a split, an epoch, a step)."""
    key = hashlib.blake2b(f"{seed}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") & (2**63 - 1)


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """An independent CPU random stream for one purpose of one seed."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


def stratified_take(y: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pick `n` indices with each class in proportion to its share (largest remainder); return
    (picked, rest), both sorted."""
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / len(y)
    quota = exact.floor().long()
    short = n - int(quota.sum())
    if short:
        quota[torch.argsort(exact - quota, descending=True, stable=True)[:short]] += 1
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:q]])
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[torch.cat(picked)] = True
    return torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()


def subset_indices(y: Tensor, cfg: DataConfig) -> Tensor | None:
    """Which of the training images with labels `y` `data.subset` keeps, sorted (None without a
    subset, or with one of every image): drawn by class with `data.seed`, the same whether the
    images are decoded yet or not."""
    if cfg.subset is None or cfg.subset == len(y):
        return None
    if cfg.subset > len(y):
        raise DataError(f"data.subset: {cfg.subset} is more than the {len(y)} training images")
    keep, _ = stratified_take(y, cfg.subset, seeded_generator(cfg.seed, "subset"))
    return keep


def take(split: Split, idx: Tensor) -> Split:
    return Split(split.x[idx].contiguous(), split.y[idx].contiguous())


def as_split(x: np.ndarray | Tensor, y: np.ndarray | Tensor | list[int]) -> Split:
    xt = torch.as_tensor(x, dtype=torch.uint8).contiguous()
    if xt.ndim == 3:
        xt = xt.unsqueeze(1)
    return Split(xt, torch.as_tensor(y, dtype=torch.int64).contiguous())


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser()


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_failure(err: Exception) -> str:
    """Why `torch.load` could not read a file, in one line: its reader's own words, without
    torch's advice (to load with weights_only=False, which runs the file's code) or its zip
    reader's note on itself. Said in words: a file of torch's legacy .tar format (or of zeros,
    which reads as one), and a byte its pickle reader has no op for (a number, or "Unsupported
    operand" and one), a "global" that names no Python object (text starting with a c) or a
    lookup that failed inside the reader (an IndexError or a KeyError: text starting with an r
    reads as a memo pickle never wrote): no torch.save file, or a damaged one."""
    text = " ".join(str(err).split())
    text = text.partition("WeightsUnpickler error: ")[2] or text
    advice = r"\.? (?:In PyTorch 2\.6|Please use|Check the documentation|This is an internal)"
    reader = re.split(advice, text)[0].strip()
    if "legacy .tar format" in reader:  # as a file of zeros reads too
        return "in torch's legacy .tar format, which weights alone cannot be read from, or damaged"
    named = re.fullmatch(
        r"Unsupported global: GLOBAL (.*) was not an allowed global by default", reader
    )
    if named and not re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*", named[1]):
        reader = f"GLOBAL {named[1]}"  # no Python name: text whose c reads as pickle's GLOBAL
    elif not re.fullmatch(r"(?:Unsupported operand )?\d*", reader) and not isinstance(
        err, LookupError
    ):
        return reader
    return (
        "not a torch.save file, or a damaged one: its reader stopped at "
        f"{type(err).__name__} {reader}".strip()
    )
