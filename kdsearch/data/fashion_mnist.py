"""Fashion-MNIST from its IDX files, gzipped or not (Debian's dataset-fashion-mnist has them)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from kdsearch.data.base import Progress, Raw, Split, as_split, data_root
from kdsearch.data.download import download
from kdsearch.errors import DataError
from kdsearch.recipe import DataConfig

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


def read_fashion_mnist(cfg: DataConfig, progress: Progress | None) -> Raw:
    root = data_root(cfg)
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
        download("fashion_mnist", root, "FashionMNIST/raw")
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
        return as_split(images, labels)

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
