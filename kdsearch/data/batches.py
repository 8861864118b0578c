"""Augmented batches on the training device: an epoch's order, crops and flips drawn from
(seed, epoch, the split's size, an image's place in it), and cut, cropped, flipped and
normalised with tensor indexing only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdsearch.data.base import ImageData, Split, seeded_generator


class Batch(NamedTuple):
    """Normalised float images, labels, and each image's index in its split (`idx`)."""

    x: Tensor
    y: Tensor
    idx: Tensor


class Loader:
    """Serves one split, resident on `device`, as batches.

    Training batches are shuffled, randomly cropped (zero padding of 1/8 of the side, 4 pixels for
    32x32) and flipped where the data set allows it; evaluation batches are neither.
    """

    def __init__(
        self,
        split: Split,
        data: ImageData,
        device: torch.device,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
    ) -> None:
        self.split = split.to(device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.hflip = data.hflip
        self.pad = max(1, data.image_size // 8)
        self.device = device
        std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std

    def __len__(self) -> int:
        n = len(self.split)
        if self.train and n >= self.batch_size:
            return n // self.batch_size  # full batches only: batch norm needs more than one image
        return -(-n // self.batch_size)

    @property
    def images(self) -> int:
        """How many images an epoch serves."""
        return min(len(self) * self.batch_size, len(self.split))

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images to normalised floats, channels-last (the layout the models are in)."""
        out = torch.addcmul(self.shift, x.float(), self.scale)
        return out.contiguous(memory_format=torch.channels_last)

    def epoch(self, epoch: int, batches: range | None = None) -> Iterator[Batch]:
        """The batches of one epoch, or those numbered in `batches`; for training, a pure
        function of (seed, epoch), whichever of them are asked for."""
        n = len(self.split)
        numbers = range(len(self)) if batches is None else batches
        if not self.train:
            for b in numbers:
                start = b * self.batch_size
                idx = torch.arange(start, min(start + self.batch_size, n), device=self.device)
                yield Batch(self.normalize(self.split.x[idx]), self.split.y[idx], idx)
            return
        draws = epoch_draws(n, seed=self.seed, epoch=epoch, pad=self.pad, hflip=self.hflip)
        order, offsets, flips = (from_host(d, self.device) for d in draws)
        for b in numbers:
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = crop_flip(self.split.x[idx], offsets[idx], flips[idx], self.pad)
            yield Batch(self.normalize(x), self.split.y[idx], idx)


def from_host(t: Tensor, device: torch.device) -> Tensor:
    """`t`, drawn on the host, on `device`; to a GPU from pinned memory and without waiting, so
    the host goes on queueing work instead of stopping until the GPU has done its queue."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def epoch_draws(n: int, *, seed: int, epoch: int, pad: int, hflip: bool) -> tuple[Tensor, ...]:
    """Order of the images, and each image's crop offsets and flip, for one epoch."""
    gen = seeded_generator(seed, f"epoch{epoch}")
    order = torch.randperm(n, generator=gen)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    return order, offsets, flips & hflip


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Random crops of zero-padded images, mirrored where `flips` is set, in one gather."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
