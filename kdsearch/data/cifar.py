"""CIFAR-10 and CIFAR-100 from the official Python pickles (or their archive, or a download)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from kdsearch.data.base import Progress, Raw, Split, as_split, data_root, first_line
from kdsearch.data.download import download, extract
from kdsearch.errors import DataError
from kdsearch.recipe import DataConfig

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


def read_cifar(cfg: DataConfig, progress: Progress | None) -> Raw:
    folder, archive, train_files, test_files, label_key, meta, names_key = CIFAR_LAYOUT[cfg.dataset]
    root = data_root(cfg)
    if (root / meta).is_file() and not (root / folder).is_dir():  # root is that folder itself
        root, folder = root.parent, root.name
    if not (root / folder).is_dir():
        if (root / archive).is_file():
            extract(root / archive, folder)
        elif cfg.download:
            download(cfg.dataset, root, folder)
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
        return as_split(np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys))

    meta_path = root / folder / meta
    names = _field(meta_path, _read_pickle(meta_path, cfg.dataset), names_key, np.str_)
    classes = tuple(str(c) for c in names.tolist())
    return Raw(load(train_files), load(test_files), classes, hflip=True)


def _read_pickle(path: Path, dataset: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return dict(pickle.load(f, encoding="latin1"))
    except Exception as err:  # a damaged pickle: pickle.load raises many kinds
        raise DataError(f"{path}: cannot read the {dataset} file: {first_line(err)}") from None


def _field(path: Path, body: dict[str, Any], key: str, dtype: type) -> np.ndarray:
    """The entry `key` of a CIFAR pickle as an array, or a DataError naming what is wrong."""
    if key not in body:
        raise DataError(f"{path}: has no '{key}' entry; replace it with the official file")
    try:
        return np.asarray(body[key], dtype=dtype)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: its '{key}' entry is not an array: {first_line(err)}") from None
