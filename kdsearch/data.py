"""Data sets decoded once into uint8 tensors, split with a seed, and served as augmented batches.

Every source becomes an `ImageData`: train / val / test splits of uint8 images (N, C, H, W) with
int64 labels. The validation split is carved from the training images with `data.seed`; the test
split is never used for model selection. Batches are cut, cropped, flipped and normalised on the
training device with tensor indexing only, no per-image Python. The random draws of an epoch
(order, crop offsets, flips) are a pure function of (seed, epoch, image index), so every trial of a
search sees the same stream.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdsearch.cache import cache_dir, digest
from kdsearch.errors import DataError, KdsearchWarning
from kdsearch.paths import remove_empty, replaced_whole
from kdsearch.recipe import DataConfig

Progress = Callable[[str, int, int], None]
"""progress(what, done, total), called during long work such as decoding an image folder."""

IMAGE_SUFFIXES = (  # what torchvision's ImageFolder reads, and GIF and JFIF
    ".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".gif",
    ".webp",
)  # fmt: skip


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
    mean: tuple[float, ...]  # per channel, of the training split, in [0, 1]
    std: tuple[float, ...]
    fingerprint: str  # changes whenever any image, label or split changes, or `hflip`
    # against the data set's own default

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


def load_data(cfg: DataConfig, *, progress: Progress | None = None) -> ImageData:
    """Read the data set the recipe names and cut its splits."""
    raw = SOURCES[cfg.dataset](cfg, progress)
    _check_labels(raw, cfg.dataset)
    train, test = raw.train, raw.test
    if cfg.subset is not None:
        if cfg.subset > len(train):
            raise DataError(
                f"data.subset: {cfg.subset} is more than the {len(train)} training images"
            )
        keep, _ = stratified_take(train.y, cfg.subset, _generator(cfg.seed, "subset"))
        train = _index(train, keep)
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
    val_idx, train_idx = stratified_take(train.y, n_val, _generator(cfg.seed, "val"))
    val, train = _index(train, val_idx), _index(train, train_idx)
    for name, split in (("training", train), ("validation", val)):
        lacking = n_classes - len(torch.unique(split.y))
        if lacking:
            warnings.warn(
                f"data: the {name} split has no image of {lacking} of the {n_classes} classes; "
                "its accuracy says little (change data.subset or data.val_fraction)",
                KdsearchWarning,
                stacklevel=2,
            )
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
        fingerprint=_fingerprint(train, val, test, flips=cfg.hflip, default=raw.hflip),
    )


# --------------------------------------------------------------------------------------------
# Splits


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one purpose of one seed (a split, an epoch, a step)."""
    key = hashlib.blake2b(f"{seed}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") & (2**63 - 1)


def _generator(seed: int, purpose: str) -> torch.Generator:
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


def _index(split: Split, idx: Tensor) -> Split:
    return Split(split.x[idx].contiguous(), split.y[idx].contiguous())


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


def _fingerprint(*splits: Split, flips: bool | None, default: bool) -> str:
    """A hash of the splits, and of `data.hflip` where it is not the data set's default (so
    every fingerprint, and the cached teachers keyed by it, stayed as it was before the key)."""
    h = hashlib.blake2b(digest_size=8)
    for s in splits:
        h.update(str(tuple(s.x.shape)).encode())
        h.update(s.x.contiguous().numpy().data)  # the buffer itself, not a copy of it
        h.update(s.y.contiguous().numpy().data)
    if flips is not None and flips != default:
        h.update(f"hflip={flips}".encode())
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


def _split(x: np.ndarray | Tensor, y: np.ndarray | Tensor | list[int]) -> Split:
    xt = torch.as_tensor(x, dtype=torch.uint8).contiguous()
    if xt.ndim == 3:
        xt = xt.unsqueeze(1)
    return Split(xt, torch.as_tensor(y, dtype=torch.int64).contiguous())


# --------------------------------------------------------------------------------------------
# Sources


def _root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser()


def digits_table() -> np.ndarray:
    """scikit-learn's 1,797 digits, a row each: 64 pixels (8x8, values 0..16), then the label.
    Read from the file scikit-learn ships, without importing scikit-learn, which takes seconds
    (with SciPy) in every process that loads them; through `load_digits` where the file is not
    where scikit-learn has always kept it."""
    spec = find_spec("sklearn")
    folders = spec.submodule_search_locations if spec else None
    for folder in folders or []:
        file = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if file.is_file():
            return np.loadtxt(file, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.column_stack([bunch.data, bunch.target])


def _digits(cfg: DataConfig, progress: Progress | None) -> Raw:
    table = torch.as_tensor(digits_table())
    # 8x8 images with values 0..16 (17 levels), times 16: 0..240, and 16 clamped to 255.
    x = table[:, :64].reshape(-1, 1, 8, 8).mul(16).clamp(0, 255).to(torch.uint8)
    y = table[:, 64].to(torch.int64)
    # The test split is the same for every data.seed (which seeds only the subset and the
    # validation split), as the other sources' official splits are; seed 0 is the split of old.
    test_idx, train_idx = stratified_take(y, round(0.2 * len(y)), _generator(0, "test"))
    every = Split(x, y)
    classes = tuple(str(c) for c in range(10))
    return Raw(_index(every, train_idx), _index(every, test_idx), classes, hflip=False)


def _synthetic(cfg: DataConfig, progress: Progress | None) -> Raw:
    """Ten classes of noisy coloured blobs: learnable in a few epochs, for tests. The same
    images for every data.seed, which draws the subset and the validation split."""
    gen = _generator(0, "synthetic")
    size = cfg.image_size or 16
    templates = F.interpolate(
        torch.rand(10, 3, 4, 4, generator=gen),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )

    def draw(n: int) -> Split:
        y = torch.arange(n) % 10
        noise = torch.randn(n, 3, size, size, generator=gen) * 0.25
        x = (templates[y] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Split(x, y)

    return Raw(draw(800), draw(200), tuple(f"class{c}" for c in range(10)), hflip=True)


CIFAR_LAYOUT = {
    # name: (folder, archive, train files, test files, label key, meta file, names key)
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ["train"],
        ["test"],
        "fine_labels",
        "meta",
        "fine_label_names",
    ),
}


def _cifar(cfg: DataConfig, progress: Progress | None) -> Raw:
    folder, archive, train_files, test_files, label_key, meta, names_key = CIFAR_LAYOUT[cfg.dataset]
    root = _root(cfg)
    if (root / meta).is_file() and not (root / folder).is_dir():  # root is that folder itself
        root, folder = root.parent, root.name
    if not (root / folder).is_dir():
        if (root / archive).is_file():
            _extract(root / archive, folder)
        elif cfg.download:
            _download(cfg.dataset, root, folder)
        else:
            raise DataError(
                f"{cfg.dataset} is not in {root} (looked for {folder}/ and {archive}); "
                "set data.download: true, or copy the official archive there"
            )

    def load(files: list[str]) -> Split:
        xs, ys = [], []
        for name in files:
            path = root / folder / name
            body = _read_pickle(path, cfg.dataset)
            x, y = _field(path, body, "data", np.uint8), _field(path, body, label_key, np.int64)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise DataError(
                    f"{path}: holds images of shape {x.shape}, not N x 3072 (32x32 RGB); "
                    f"replace it with the official {cfg.dataset} file"
                )
            if y.shape != (len(x),):
                raise DataError(f"{path}: holds {len(x)} images but {y.size} labels")
            xs.append(x)
            ys.append(y)
        return _split(np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys))

    meta_path = root / folder / meta
    names = _field(meta_path, _read_pickle(meta_path, cfg.dataset), names_key, np.str_)
    classes = tuple(str(c) for c in names.tolist())
    return Raw(load(train_files), load(test_files), classes, hflip=True)


def _read_pickle(path: Path, dataset: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return dict(pickle.load(f, encoding="latin1"))
    except Exception as err:  # a damaged pickle: pickle.load raises many kinds
        raise DataError(f"{path}: cannot read the {dataset} file: {_first_line(err)}") from None


def _field(path: Path, body: dict[str, Any], key: str, dtype: type) -> np.ndarray:
    """The entry `key` of a CIFAR pickle as an array, or a DataError naming what is wrong."""
    if key not in body:
        raise DataError(f"{path}: has no '{key}' entry; replace it with the official file")
    try:
        return np.asarray(body[key], dtype=dtype)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: its '{key}' entry is not an array: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


UNPACK_STALE_S = 3600.0  # an unpack folder this old is a killed process's (CIFAR takes seconds)


def _extract(archive: Path, folder: str) -> None:
    """Unpack `archive` beside itself so that its `folder` appears whole or not at all; first
    remove what unpacks killed before their cleanup (`kill -9`, a lost machine) left there."""
    for left in archive.parent.glob(".unpack-*"):
        with contextlib.suppress(OSError):  # removed meanwhile by another process
            if time.time() - left.stat().st_mtime > UNPACK_STALE_S:
                shutil.rmtree(left)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=archive.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        if not (tmp / folder).is_dir():
            raise DataError(f"{archive}: holds no {folder}/ folder; is it the official archive?")
        _place(tmp / folder, archive.parent / folder)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(
            f"{archive}: cannot unpack it ({err}); replace it with the official archive"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _place(src: Path, dst: Path) -> None:
    """Move the folder `src` to `dst` in one rename; where `dst` is there already (another
    process unpacked the same archive meanwhile, or a folder held some of the files), move in
    only the files it lacks."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        src.rename(dst)
    except OSError:
        if not dst.is_dir():
            raise
        for entry in src.iterdir():
            if not (dst / entry.name).exists():
                with contextlib.suppress(OSError):  # put there meanwhile by another process
                    entry.rename(dst / entry.name)


DOWNLOADS = {
    # data set: (where torchvision downloads it from, what to copy into data.root instead)
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar-100-python.tar.gz",
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "the four *-ubyte.gz files (Debian's dataset-fashion-mnist package has them)",
    ),
}
# urlopen waits forever for a server that accepts the connection but never answers.
DOWNLOAD_TIMEOUT_S = 60.0


def _download(dataset: str, root: Path, folder: str) -> None:
    """Download `dataset` with torchvision into a temporary folder in `root`, then move its
    `folder` into `root`; a failed download leaves no file or folder behind."""
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "fashion_mnist": tvd.FashionMNIST}
    url, offline = DOWNLOADS[dataset]
    print(f"kdsearch: downloading {dataset} from {url} into {root}", file=sys.stderr, flush=True)
    created = [p for p in (root, *root.parents) if not p.exists()]
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
            for train in (True, False):
                cls[dataset](tmp, train=train, download=True)
            _place(Path(tmp) / folder, root / folder)
    except Exception as err:  # network, disk or checksum: the user can only act on the message
        remove_empty(created)  # deepest first
        raise DataError(
            f"could not download {dataset} into {root} from {url}: {' '.join(str(err).split())}; "
            f"to work offline, copy {offline} into {root} and set data.download: false"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _fashion_mnist(cfg: DataConfig, progress: Progress | None) -> Raw:
    root = _root(cfg)
    raw_dir = root / "FashionMNIST" / "raw"  # where torchvision puts them
    pairs = [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ]
    wanted = [n for pair in pairs for n in pair]

    def find(name: str) -> Path | None:
        for folder in (root, raw_dir):  # root: Debian's /usr/share/datasets/fashion-mnist
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    if cfg.download and any(find(n) is None for n in wanted):
        _download("fashion_mnist", root, "FashionMNIST/raw")
    found = {n: p for n in wanted if (p := find(n)) is not None}
    missing = [n for n in wanted if n not in found]
    if missing:
        raise DataError(
            f"fashion_mnist is not in {root} (looked there and in {raw_dir} for "
            f"{', '.join(missing)}, optionally .gz); "
            + ("copy" if cfg.download else "set data.download: true, or copy")
            + " the IDX files there"
        )

    def load(pair: tuple[str, str]) -> Split:
        images, labels = (read_idx(found[n]) for n in pair)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{found[pair[0]]} holds images of shape {images.shape} but {found[pair[1]]} holds "
                f"{labels.shape} labels; one image per label is needed"
            )
        return _split(images, labels)

    return Raw(load(pairs[0]), load(pairs[1]), FASHION_CLASSES, hflip=True)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # EOFError: a .gz cut short
        raise DataError(f"{path}: cannot read: {err}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: holds {body.size} bytes, its header says {dims}")
    return body.reshape(dims)


# Bump when decoding changes what an image becomes (2: greyscale in a colour set made colour,
# 16-bit scaled, not clipped), so that no set decoded the old way is read from the cache.
DECODE_FORMAT = 2


def _imagefolder(cfg: DataConfig, progress: Progress | None) -> Raw:
    root = _root(cfg)
    if not root.is_dir():
        kind = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"imagefolder: data.root {root} {kind}")
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"imagefolder: {root} needs train/ and test/ folders of class folders")
    listing = {split: _list_images(root, split) for split in ("train", "test")}
    classes = tuple(sorted({found.cls for found in listing["train"]}))
    unknown = sorted({found.cls for found in listing["test"]} - set(classes))
    if unknown:
        raise DataError(f"imagefolder: test/ has classes that train/ lacks: {', '.join(unknown)}")
    key = digest(
        {
            "format": DECODE_FORMAT,
            "root": str(root.resolve()),
            "size": cfg.image_size,
            "files": [found.key for split in listing.values() for found in split],
        }
    )
    # named for the folder (and size) first: a decode of it replaces those before, which the
    # folder's files changing since (or another decoding format) left unread for good
    folder = digest({"root": str(root.resolve()), "size": cfg.image_size})
    cached = cache_dir() / "decoded" / f"imagefolder-{folder}-{key}.pt"
    saved = _read_decoded(cached)
    if saved is not None:
        return Raw(*saved, classes, hflip=True)
    paths = [found.path for split in listing.values() for found in split]
    images = _same_channels(_decode_all(paths, cfg.image_size, progress))
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[found.cls] for split in listing.values() for found in split]
    n = len(listing["train"])
    train = _split(np.stack(images[:n]).transpose(0, 3, 1, 2), labels[:n])
    test = _split(np.stack(images[n:]).transpose(0, 3, 1, 2), labels[n:])
    _write_decoded(cached, train, test)
    for stale in cached.parent.glob("imagefolder-*.pt"):  # this folder's, and any named
        # as before the folder was in the name, whose keys (files without their inodes) no
        # decode makes now
        if stale != cached and (
            stale.name.startswith(f"imagefolder-{folder}-") or stale.stem.count("-") == 1
        ):
            stale.unlink(missing_ok=True)
    return Raw(train, test, classes, hflip=True)


def _read_decoded(path: Path) -> tuple[Split, Split] | None:
    """The train and test splits cached at `path`; None (with a warning if damaged) when none."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        return Split(*saved["train"]), Split(*saved["test"])
    except Exception as err:  # a damaged file: torch.load raises many kinds
        warnings.warn(
            f"cannot use the cached {path} ({_first_line(err)}); decoding the images again",
            KdsearchWarning,
            stacklevel=3,
        )
        return None


def _write_decoded(path: Path, train: Split, test: Split) -> None:
    """Cache the decoded splits at `path`; where that fails, warn and go on without."""
    try:  # whole or not at all, a Ctrl-C too: no half-written copy of the data set is left
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_whole(path) as tmp:
            torch.save({"train": (train.x, train.y), "test": (test.x, test.y)}, tmp)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        warnings.warn(
            f"cannot cache the decoded images in {path.parent} ({_first_line(err)}); "
            "going on without the cache",
            KdsearchWarning,
            stacklevel=3,
        )


class Found(NamedTuple):
    """An image of an image folder: its class, its path, and what the decoded cache's key holds
    of it: its path under the root, size, modification time (ns) and inode. The inode tells
    apart two files of one size and time that swapped names (class folders renamed into each
    other, the files' times as an archive set them)."""

    cls: str
    path: str
    key: tuple[str, int, int, int]


def _unreadable(path: str, err: OSError) -> DataError:
    """An OSError reading `path` as one line naming it (a link to nothing, a folder not ours)."""
    return DataError(f"imagefolder: cannot read {path}: {err.strerror}")


def _list_images(root: Path, split: str) -> list[Found]:
    """Every image in the class folders of `root/split` and the folders in them, as
    torchvision's ImageFolder finds them, hidden entries (such as .ipynb_checkpoints, .DS_Store,
    macOS's ._ files) left out, in name order. A folder reached a second time (a link to another
    class's folder, or back up the tree) is refused: its images would count twice, under a class
    that is not theirs, or without end. One `scandir` a folder and one `stat` an image (a
    search's every command lists the folder again, to know its cached decode is current)."""
    seen: dict[str, str] = {}  # each folder read, by where it really is

    def visible(path: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(path) as entries:
                return sorted(
                    (e for e in entries if not e.name.startswith(".")), key=lambda e: e.name
                )
        except OSError as err:
            raise _unreadable(path, err) from None

    def images(cls: str, path: str, under: str) -> Iterator[Found]:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(
                f"imagefolder: {seen[real]} and {path} are one folder, {real} (reached through a "
                "link); remove the link, or copy the images it should add"
            )
        seen[real] = path
        for entry in visible(path):
            if entry.is_dir():
                yield from images(cls, entry.path, f"{under}/{entry.name}")
            elif _is_image(entry.name):
                try:
                    stat = entry.stat()
                except OSError as err:
                    raise _unreadable(entry.path, err) from None
                key = (f"{under}/{entry.name}", stat.st_size, stat.st_mtime_ns, stat.st_ino)
                yield Found(cls, entry.path, key)

    folder = str(root / split)
    classes = [e for e in visible(folder) if e.is_dir()]
    found = {c.name: list(images(c.name, c.path, f"{split}/{c.name}")) for c in classes}
    if empty := [name for name, images_of in found.items() if not images_of]:
        raise DataError(  # as torchvision's ImageFolder refuses it: a class would go missing
            f"imagefolder: {folder}/{empty[0]} holds no {'/'.join(IMAGE_SUFFIXES)} image; "
            "remove the folder, or convert its images"
        )
    items = [image for images_of in found.values() for image in images_of]
    if not items:
        loose = [e for e in visible(folder) if _is_image(e.name)]
        if loose:
            raise DataError(
                f"imagefolder: {len(loose)} images lie directly in {folder}; they must be in "
                f"one subfolder per class, {folder}/<class>/"
            )
        raise DataError(f"imagefolder: no images under {folder}")
    return items


def _is_image(name: str) -> bool:
    """Whether a (visible) file's suffix is one of the image suffixes, in any case."""
    return name.lower().endswith(IMAGE_SUFFIXES)


PROBE_IMAGES = 32  # timed in the calling thread, to choose how to decode the rest
THREADED_FROM = 0.001  # seconds an image, from which threads decoded faster (README)


def _decode_all(paths: list[str], size: int | None, progress: Progress | None) -> list[np.ndarray]:
    """Decode every image (height x width x channels). Without `size`, the first image that is
    not square, or not the size of the first, stops the decoding, naming it (decoded whole
    first, a folder of photos could take more memory than the machine has before being
    refused)."""
    images: list[np.ndarray] = []
    decoded = decode_images(paths, size)
    try:
        for done, image in enumerate(decoded, start=1):
            if size is None and (problem := _size_problem(image, images, paths, done - 1)):
                raise DataError(problem)
            images.append(image)
            if progress is not None and (done % 2000 == 0 or done == len(paths)):
                progress("decoding images", done, len(paths))
    finally:  # a refusal, a bad image or Ctrl-C: the images not started are not decoded
        decoded.close()
    return images


def decode_images(
    paths: list[str], size: int | None, threaded: bool | None = None
) -> Generator[np.ndarray, None, None]:
    """Each image decoded (and resized to `size` square), in order, in this thread or on one
    thread per core (`threaded`; None: chosen by timing the first images). Images that decode in
    under `THREADED_FROM` seconds each (those of CIFAR or MNIST, JPEGs up to about 128 pixels
    wide) are decoded in this thread: PIL holds Python's lock between its short calls, and two
    threads taking turns at it decoded 32-pixel JPEGs 2-2.5 times slower than one thread (README,
    "Performance"). Larger ones, whose decoding and resizing run outside that lock, are decoded
    on threads."""
    if threaded is None:
        threaded = yield from probe_decoding(paths, size)
        paths = paths[PROBE_IMAGES + 1 :]
    if not threaded:
        for path in paths:
            yield _decode(path, size)
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        decoding = [pool.submit(_decode, p, size) for p in paths]
        try:
            for future in decoding:
                yield future.result()
        finally:
            for future in decoding:
                future.cancel()


def probe_decoding(paths: list[str], size: int | None) -> Generator[np.ndarray, None, bool]:
    """The first `PROBE_IMAGES` + 1 images decoded, in order; returns whether the rest are to be
    decoded on threads. The first image is not timed: it pays for importing PIL and setting up
    its format's decoder (16 ms, against 0.13 ms for each 32x32 JPEG after it, here; timed with
    them, it took their average to 0.8-0.9 ms, near `THREADED_FROM`)."""
    for path in paths[:1]:
        yield _decode(path, size)
    probe = paths[1 : PROBE_IMAGES + 1]
    started = time.perf_counter()
    for path in probe:
        yield _decode(path, size)
    per_image = (time.perf_counter() - started) / max(1, len(probe))
    return per_image >= THREADED_FROM and (os.cpu_count() or 1) > 1


def _size_problem(image: np.ndarray, before: list[np.ndarray], paths: list[str], i: int) -> str:
    """Why image `i` (decoded without resizing) cannot join those `before` it, or ''."""
    height, width = image.shape[:2]
    if not before:
        return (
            ""
            if height == width
            else (
                f"imagefolder: {paths[0]} is {height} high and {width} wide; kdsearch trains on "
                "square images: set data.image_size to resize them to a square"
            )
        )
    if (height, width) == before[0].shape[:2]:
        return ""
    first = "x".join(map(str, before[0].shape[:2]))
    return (
        f"imagefolder: images of different sizes: {paths[i]} is {height}x{width} (height x "
        f"width), {paths[0]} {first}; set data.image_size to resize them all to a square"
    )


def _same_channels(images: list[np.ndarray]) -> list[np.ndarray]:
    """The images in colour if any is (as torchvision's ImageFolder reads every image as RGB),
    else greyscale."""
    if any(a.shape[2] == 3 for a in images):
        images = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in images]
    return images


def _decode(path: str, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            if file.mode.startswith("I"):  # 16-bit greyscale: rescale 0..65535 to 0..255
                grey = np.asarray(file, dtype=np.float64) / 257.0
                img = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))
            else:
                img = file.convert("L" if file.mode in ("1", "L", "LA") else "RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode: {err}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


SOURCES: dict[str, Callable[[DataConfig, Progress | None], Raw]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "fashion_mnist": _fashion_mnist,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


# --------------------------------------------------------------------------------------------
# Batches


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

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch; for training, a pure function of (seed, epoch)."""
        n = len(self.split)
        if not self.train:
            for start in range(0, n, self.batch_size):
                idx = torch.arange(start, min(start + self.batch_size, n), device=self.device)
                yield Batch(self.normalize(self.split.x[idx]), self.split.y[idx], idx)
            return
        draws = epoch_draws(n, seed=self.seed, epoch=epoch, pad=self.pad, hflip=self.hflip)
        order, offsets, flips = (from_host(d, self.device) for d in draws)
        for b in range(len(self)):
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
    gen = _generator(seed, f"epoch{epoch}")
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
