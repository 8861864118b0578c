"""Data sets decoded once into uint8 tensors, split with a seed, and served as augmented batches.

Every source becomes an `ImageData`: train / val / test splits of uint8 images (N, C, H, W) with
int64 labels. The validation split is carved from the training images with `data.seed`; the test
split is never used for model selection. Batches are cut, cropped, flipped and normalised on the
training device with tensor indexing only, no per-image Python. The random draws of an epoch
(order, crop offsets, flips) are a pure function of (seed, epoch, the training split's size, an
image's place in it), so every trial of a search sees the same stream.

`load_data` reads a source (`bundled`: digits and synthetic; `cifar`; `fashion_mnist`;
`imagefolder`), `download` fetching CIFAR and Fashion-MNIST where they are missing, and cuts the
splits; `base` holds the types every source makes, `batches` the on-device batches.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdsearch.data.base import (
    ImageData,
    Progress,
    Raw,
    Split,
    derive_seed,
    seeded_generator,
    stratified_take,
    subset_indices,
    take,
)
from kdsearch.data.batches import Batch, Loader, from_host
from kdsearch.data.bundled import read_digits, read_synthetic
from kdsearch.data.cifar import read_cifar
from kdsearch.data.fashion_mnist import read_fashion_mnist
from kdsearch.data.imagefolder import check_folder, read_imagefolder
from kdsearch.errors import DataError, KdsearchWarning
from kdsearch.recipe import DataConfig


def check_data(cfg: DataConfig) -> None:
    """Refuse, reading no image, a data set that cannot load as `cfg` names it, where that is
    cheap to tell: an image folder's `data.root` without train/ and test/ (the other sources
    can download what they lack, or say where they looked once they read)."""
    if cfg.dataset == "imagefolder":
        check_folder(cfg)


def load_data(cfg: DataConfig, *, progress: Progress | None = None) -> ImageData:
    """Read the data set the recipe names and cut its splits."""
    raw = SOURCES[cfg.dataset](cfg, progress)
    _check_labels(raw, cfg.dataset)
    train, test = raw.train, raw.test
    if not raw.cut and (keep := subset_indices(train.y, cfg)) is not None:
        train = take(train, keep)
    if cfg.image_size is not None and cfg.image_size != train.x.shape[-1]:  # the kept images
        train, test = _resize(train, cfg.image_size), _resize(test, cfg.image_size)
    n_val = round(cfg.val_fraction * len(train))
    n_classes = len(raw.classes)
    if n_val < 1 or len(train) - n_val < n_classes:
        raise DataError(
            f"data.val_fraction: {cfg.val_fraction} of {len(train)} images leaves {n_val} to "
            f"validate and {len(train) - n_val} to train; validation needs at least one and "
            f"training at least one per class ({n_classes}): change data.val_fraction or "
            "data.subset"
        )
    val_idx, train_idx = stratified_take(train.y, n_val, seeded_generator(cfg.seed, "val"))
    val, train = take(train, val_idx), take(train, train_idx)
    fixes = "change data.subset or data.val_fraction"
    for name, split, fix in (
        ("training", train, fixes),
        ("validation", val, fixes),
        ("test", test, "add its images to the test set"),  # a folder's test/ lacking a class
    ):
        lacking = n_classes - len(torch.unique(split.y))
        if lacking:
            warnings.warn(
                f"data: the {name} split has no image of {lacking} of the {n_classes} classes; "
                f"its accuracy says little ({fix})",
                KdsearchWarning,
                stacklevel=2,
            )
    if cfg.mean is not None and cfg.std is not None:
        if len(cfg.mean) != train.x.shape[1]:
            raise DataError(
                f"data.mean and data.std: {len(cfg.mean)} values each, but the images have "
                f"{train.x.shape[1]} channel(s); give one of each per channel"
            )
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    else:
        mean, std = channel_stats(train.x)
    return ImageData(
        name=cfg.dataset,
        train=train,
        val=val,
        test=test,
        classes=raw.classes,
        hflip=raw.hflip if cfg.hflip is None else cfg.hflip,
        mean=mean,
        std=std,
        fingerprint=_fingerprint(train, val, test, cfg=cfg, default=raw.hflip),
    )


def _resize(split: Split, size: int, chunk: int = 256) -> Split:
    """Every image resized to `size` x `size`, a chunk at a time (in float, an image set whole
    would take four times its bytes again, twice over)."""
    out = torch.empty((len(split), split.x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(split), chunk):
        x = split.x[i : i + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out[i : i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return Split(out, split.y)


STATS_CHUNK = 2**24  # values per step of `channel_stats`: 16 MiB of images


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units, from each
    channel's histogram of the 256 values, counted over chunks of images (exact counts, and no
    float copy of the set: CIFAR-10's would be 1.1 GB in float64, a large folder's tens of GB)."""
    channels = x.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.int64)
    for chunk in torch.split(x, max(1, STATS_CHUNK // max(1, x[0].numel()))):
        per_channel = chunk.transpose(0, 1).reshape(channels, -1)
        for c in range(channels):
            counts[c] += torch.bincount(per_channel[c], minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = int(counts[0].sum())
    mean = (counts * values).sum(dim=1) / n
    var = (counts * (values - mean[:, None]).square()).sum(dim=1) / max(1, n - 1)  # as Tensor.std
    return tuple(mean.tolist()), tuple(var.sqrt().clamp_min(1e-3).tolist())


def _fingerprint(*splits: Split, cfg: DataConfig, default: bool) -> str:
    """A hash of the splits, of `data.hflip` where it is not the data set's default, and of
    `data.mean` and `data.std` where given (so every fingerprint, and the cached teachers keyed
    by it, stayed as it was before those keys)."""
    h = hashlib.blake2b(digest_size=8)
    for s in splits:
        h.update(str(tuple(s.x.shape)).encode())
        h.update(s.x.contiguous().numpy().data)  # the buffer itself, not a copy of it
        h.update(s.y.contiguous().numpy().data)
    if cfg.hflip is not None and cfg.hflip != default:
        h.update(f"hflip={cfg.hflip}".encode())
    if cfg.mean is not None:
        h.update(f"mean={cfg.mean} std={cfg.std}".encode())
    return h.hexdigest()


def _check_labels(raw: Raw, dataset: str) -> None:
    """Refuse a source with fewer than two classes, or labels that name no class."""
    if len(raw.classes) < 2:
        raise DataError(
            f"{dataset}: has {len(raw.classes)} class(es) ({', '.join(raw.classes)}); "
            "a classifier needs at least two"
        )
    for name, split in (("training", raw.train), ("test", raw.test)):
        if len(split) and (split.y.min() < 0 or split.y.max() >= len(raw.classes)):
            raise DataError(
                f"{dataset}: {name} labels run from {int(split.y.min())} to "
                f"{int(split.y.max())}, but there are {len(raw.classes)} classes"
            )


SOURCES: dict[str, Callable[[DataConfig, Progress | None], Raw]] = {
    "digits": read_digits,
    "cifar10": read_cifar,
    "cifar100": read_cifar,
    "fashion_mnist": read_fashion_mnist,
    "imagefolder": read_imagefolder,
    "synthetic": read_synthetic,
}


__all__ = [
    "SOURCES",
    "Batch",
    "ImageData",
    "Loader",
    "Progress",
    "Split",
    "channel_stats",
    "check_data",
    "derive_seed",
    "from_host",
    "load_data",
]
