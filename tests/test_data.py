from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdsearch import data as data_module
from kdsearch.data import Loader, bundled, imagefolder, load_data
from kdsearch.data import download as download_module
from kdsearch.data.base import seeded_generator, stratified_take
from kdsearch.data.batches import crop_flip, epoch_draws
from kdsearch.data.fashion_mnist import read_idx
from kdsearch.errors import DataError, KdsearchWarning
from kdsearch.recipe import DATASET_CHANNELS, DataConfig, Recipe

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def test_digits_splits_are_disjoint_seeded_and_stratified() -> None:
    data = load_data(DataConfig(dataset="digits"))
    assert (len(data.train), len(data.val), len(data.test)) == (1294, 144, 359)
    assert (data.channels, data.image_size, data.num_classes) == (1, 8, 10)
    assert data.hflip is False  # a mirrored 2 is not a 2
    assert data.train.x.dtype == torch.uint8 and data.train.x.max() == 255
    rows = {bytes(x.numpy()) for x in torch.cat([data.train.x, data.val.x])}
    assert not any(bytes(x.numpy()) in rows for x in data.test.x[:50]), "test images leak"
    counts = torch.bincount(data.val.y, minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16
    again = load_data(DataConfig(dataset="digits"))
    assert again.fingerprint == data.fingerprint
    other = load_data(DataConfig(dataset="digits", seed=1))
    assert other.fingerprint != data.fingerprint


def test_digits_are_scikit_learns_read_without_importing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    table = bundled.digits_table()
    assert np.array_equal(table[:, :64].reshape(-1, 8, 8), bunch.images)
    assert np.array_equal(table[:, 64], bunch.target)
    # the same images and splits as when they were loaded through scikit-learn: a study's
    # recorded data fingerprint still holds
    assert load_data(DataConfig(dataset="digits")).fingerprint == "b8f425612f7de4c1"
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, kdsearch.data.bundled as d; d.digits_table(); print('sklearn' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "False", "seconds of start-up in every process"
    # where a scikit-learn keeps the file elsewhere: through load_digits, the same table
    monkeypatch.setattr(bundled, "find_spec", lambda name: None)
    assert np.array_equal(bundled.digits_table(), table)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_the_test_split_is_the_same_for_every_data_seed(dataset: str) -> None:
    data, other = (load_data(DataConfig(dataset=dataset, seed=s)) for s in (0, 1))  # type: ignore[arg-type]
    assert torch.equal(data.test.x, other.test.x) and torch.equal(data.test.y, other.test.y)
    assert not torch.equal(data.val.x, other.val.x)  # data.seed still draws the validation split


def test_subset_is_stratified_and_taken_before_the_validation_split() -> None:
    data = load_data(DataConfig(dataset="synthetic", subset=300, val_fraction=0.2))
    assert (len(data.train), len(data.val)) == (240, 60)
    assert torch.bincount(data.train.y).tolist() == [24] * 10
    assert torch.bincount(data.val.y).tolist() == [6] * 10


def test_stratified_take_uses_largest_remainders() -> None:
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    picked, rest = stratified_take(y, 5, torch.Generator().manual_seed(0))
    assert len(picked) == 5 and len(rest) == 5
    assert torch.bincount(y[picked], minlength=3).tolist() in ([3, 1, 1], [2, 2, 1])
    assert set(picked.tolist()).isdisjoint(rest.tolist())


def test_subset_larger_than_the_training_set_is_an_error() -> None:
    with pytest.raises(DataError, match=r"data.subset: 5000 is more than the 800"):
        load_data(DataConfig(dataset="synthetic", subset=5000))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DataConfig(dataset="synthetic", val_fraction=0.999), r"leaves 799 to validate and 1 to"),
        (
            DataConfig(dataset="digits", subset=3, val_fraction=0.3),
            r"at least one per class \(10\)",
        ),
        (DataConfig(dataset="synthetic", subset=15, val_fraction=0.02), r"leaves 0 to validate"),
    ],
)
def test_a_split_too_small_to_learn_or_validate_is_refused(cfg: DataConfig, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data(cfg)


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16], "test": [16]})
    with pytest.raises(
        DataError, match=r"imagefolder: has 1 class\(es\) \(class0\); .* at least two"
    ):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_splits_lacking_some_classes_warn(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"the validation split has no image of 5 of the 10"):
        load_data(DataConfig(dataset="synthetic", subset=100, val_fraction=0.05))
    _write_fashion(tmp_path, classes=8)  # no Bag or Ankle boot among the images
    with pytest.warns(UserWarning) as record:
        load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False))
    assert [str(w.message).split(";")[0] for w in record] == [
        f"data: the {split} split has no image of 2 of the 10 classes"
        for split in ("training", "validation", "test")
    ]
    # a folder whose test/ lacks a class: the test accuracy is over the others alone
    _folder(tmp_path / "f", {"train": [8, 8, 8], "test": [8, 8, 8]})
    shutil.rmtree(tmp_path / "f" / "test" / "class2")
    with pytest.warns(UserWarning) as record:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "f")))
    assert [str(w.message) for w in record] == [
        "data: the test split has no image of 1 of the 3 classes; its accuracy says little (add "
        "its images to the test set)"
    ]


@pytest.mark.parametrize(
    "cfg",
    [
        Recipe.load(REPO / "search_spaces" / "recipes" / "digits.yaml").data,
        DataConfig(dataset="digits", subset=300, val_fraction=0.3),  # conftest's SMALL_SPACE
        DataConfig(dataset="synthetic", subset=200, val_fraction=0.2),
        DataConfig(dataset="synthetic", val_fraction=0.2),
    ],
)
def test_the_shipped_and_tested_splits_are_accepted_without_warnings(cfg: DataConfig) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_data(cfg)
    assert len(torch.unique(data.val.y)) == len(torch.unique(data.train.y)) == 10


def _write_cifar(root: Path, name: str, n_train: int, n_test: int, *, as_archive: bool) -> None:
    rng = np.random.default_rng(0)
    folder, label_key, classes = {
        "cifar10": ("cifar-10-batches-py", "labels", 10),
        "cifar100": ("cifar-100-python", "fine_labels", 100),
    }[name]
    d = root / folder
    d.mkdir(parents=True)

    def dump(fname: str, n: int) -> None:
        labels = [i % classes for i in range(n)]
        body = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: labels}
        if name == "cifar100":
            body["coarse_labels"] = [c // 5 for c in labels]
        with open(d / fname, "wb") as f:
            pickle.dump(body, f)

    if name == "cifar10":
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train // 5)
        dump("test_batch", n_test)
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        dump("train", n_train)
        dump("test", n_test)
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    with open(d / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    if as_archive:
        archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
        with tarfile.open(root / archive, "w:gz") as tar:
            tar.add(d, arcname=folder)
        shutil.rmtree(d)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar_reads_the_official_pickle_format(
    tmp_path: Path, name: str, as_archive: bool
) -> None:
    n_classes = 10 if name == "cifar10" else 100
    _write_cifar(tmp_path, name, n_train=2 * n_classes * 5, n_test=n_classes, as_archive=as_archive)
    data = load_data(DataConfig(dataset=name, root=str(tmp_path), download=False, val_fraction=0.1))
    assert data.num_classes == n_classes and data.classes[1] == "c1"
    assert len(data.train) + len(data.val) == 10 * n_classes and len(data.test) == n_classes
    assert data.train.x.shape[1:] == (3, 32, 32) and data.hflip
    # the first test image is the first row of the file, reshaped channel-major
    folder = "cifar-10-batches-py/test_batch" if name == "cifar10" else "cifar-100-python/test"
    with open(tmp_path / folder, "rb") as f:
        first = pickle.load(f)["data"][0]
    assert torch.equal(data.test.x[0], torch.as_tensor(first).view(3, 32, 32))
    if not as_archive:  # `root` naming the data set's folder itself: it looked, and would
        # download, inside it
        inside = DataConfig(
            dataset=name,
            root=str(tmp_path / folder.split("/")[0]),
            download=False,
            val_fraction=0.1,
        )
        assert load_data(inside).fingerprint == data.fingerprint


def test_a_broken_archive_is_a_clear_error_and_leaves_no_folder(tmp_path: Path) -> None:
    _write_cifar(tmp_path, "cifar10", n_train=100, n_test=10, as_archive=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    whole = archive.read_bytes()
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), download=False)
    for broken in (b"not an archive", whole[: len(whole) // 2]):  # garbage, and cut short
        archive.write_bytes(broken)
        with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: cannot unpack it"):
            load_data(cfg)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]
    archive.write_bytes(whole)
    assert len(load_data(cfg).test) == 10


@pytest.mark.parametrize("link", ["back up", "another class"])
def test_a_link_to_a_folder_read_already_is_refused(tmp_path: Path, link: str) -> None:
    """A link back up the tree added the images again and again until the path was too long;
    one to another class's folder added its images under the wrong class."""
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    made = tmp_path / "train" / "a" / "more"
    made.symlink_to(tmp_path / "train" / ("a" if link == "back up" else "b"))
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), download=False))
    # classes are read in order, a's folder (and what it links to) before b's
    first, second = (made.parent, made) if link == "back up" else (made, tmp_path / "train/b")
    assert str(err.value) == (
        f"imagefolder: {first} and {second} are one folder, {first.resolve()} (reached through "
        "a link); remove the link, or copy the images it should add"
    )
    made.unlink()
    made.symlink_to(tmp_path / "test" / "b")  # a folder elsewhere, read once: its images count
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), download=False, val_fraction=0.5)
    data = load_data(cfg)
    assert len(data.train) + len(data.val) == 6


def test_an_unpack_a_killed_process_left_is_removed_by_the_next(tmp_path: Path) -> None:
    """`kill -9` during the unpack skips its cleanup: the half-unpacked copy stayed for good."""
    _write_cifar(tmp_path, "cifar10", n_train=100, n_test=10, as_archive=True)
    left, running = tmp_path / ".unpack-killed", tmp_path / ".unpack-running"
    for folder in (left, running):
        (folder / "cifar-10-batches-py").mkdir(parents=True)
        (folder / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    an_hour_ago = time.time() - 3601
    os.utime(left, (an_hour_ago, an_hour_ago))
    load_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    assert not left.exists(), "a killed unpack's folder is gone"
    assert running.is_dir(), "one another process may still be writing is left alone"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "fashion_mnist"])
def test_missing_data_set_without_download_is_a_clear_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=f"{name} is not in {tmp_path}.*data.download: true"):
        load_data(DataConfig(dataset=name, root=str(tmp_path), download=False))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_gzipped_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 30)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False))
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 30)
    assert (data.channels, data.image_size) == (1, 28)
    assert torch.equal(
        data.test.x[:, 0], torch.as_tensor(read_idx(raw / "t10k-images-idx3-ubyte.gz"))
    )


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_fashion_mnist_real_data_from_debian() -> None:
    data = load_data(DataConfig(dataset="fashion_mnist", root=str(DEBIAN_FASHION), download=False))
    assert (len(data.train) + len(data.val), len(data.test)) == (60_000, 10_000)
    assert torch.bincount(data.test.y).tolist() == [1000] * 10
    assert data.mean[0] == pytest.approx(0.2860, abs=0.001)  # the published train mean


@pytest.mark.slow
def test_imagefolder_reads_the_real_cifar10_jpegs_and_caches_them(
    cifar10_folder: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(dataset="imagefolder", root=str(cifar10_folder), val_fraction=0.1)
    seen: list[tuple[int, int]] = []
    data = load_data(cfg, progress=lambda what, done, total: seen.append((done, total)))
    assert (len(data.train), len(data.val), len(data.test)) == (45_000, 5_000, 10_000)
    assert data.classes[:3] == ("airplane", "automobile", "bird") and data.hflip
    assert torch.bincount(data.test.y).tolist() == [1000] * 10
    # JPEG at quality 75 shifts the official means (0.4914, 0.4822, 0.4465) by under 0.002
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.003)
    assert seen[-1] == (60_000, 60_000)
    cached = list((isolated_cache / "decoded").glob("imagefolder-*.pt"))
    assert len(cached) == 1
    seen.clear()
    again = load_data(cfg, progress=lambda what, done, total: seen.append((done, total)))
    assert not seen, "the second load must come from the cache, not decode again"
    assert again.fingerprint == data.fingerprint
    # a subset: read from the whole folder's decode, or decoded alone (its 1,000 training
    # images and the test split), the same images
    subset = cfg.model_copy(update={"subset": 1000})
    from_whole = load_data(subset, progress=lambda what, done, total: seen.append((done, total)))
    assert not seen
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(isolated_cache / "another"))
    alone = load_data(subset, progress=lambda what, done, total: seen.append((done, total)))
    assert seen[-1] == (11_000, 11_000)
    assert (len(alone.train), len(alone.val), len(alone.test)) == (900, 100, 10_000)
    assert alone.fingerprint == from_whole.fingerprint


def test_channel_stats_summed_in_chunks_are_those_of_the_whole_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    x[:, 2] = 7  # a constant channel: its deviation is clamped, not 0
    whole = x.transpose(0, 1).reshape(3, -1).double() / 255.0
    monkeypatch.setattr(data_module, "STATS_CHUNK", 1000)  # 5 images a chunk
    mean, std = data_module.channel_stats(x)
    assert mean == pytest.approx(whole.mean(dim=1).tolist(), rel=1e-12)
    assert std[:2] == pytest.approx(whole.std(dim=1)[:2].tolist(), rel=1e-12)
    assert std[2] == 1e-3


def test_an_image_folder_with_a_link_to_nothing_is_one_line(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [8, 8], "test": [8, 8]})
    (tmp_path / "train" / "class0" / "moved.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"cannot read .*moved.png: No such file or directory"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("loop", "loop"),  # a link to itself, in a class folder
        ("x.png", "x.png"),  # an image's name linked to itself
        ("class1", "class1"),  # a class folder that is such a link
        ("a", "b"),  # two links to each other
    ],
)
def test_an_image_folder_with_a_link_that_loops_is_one_line(
    tmp_path: Path, name: str, target: str
) -> None:
    """`entry.is_dir()` follows the link and raised "Too many levels of symbolic links" out of
    `load_data`: a traceback, exit status 1."""
    _folder(tmp_path, {"train": [8, 8], "test": [8, 8]})
    where = tmp_path / "train" if name == "class1" else tmp_path / "train" / "class0"
    if name == "class1":
        shutil.rmtree(where / name)
    (where / name).symlink_to(where / target)
    if name != target:
        (where / target).symlink_to(where / name)
    with pytest.raises(DataError, match=r"cannot read .*: Too many levels of symbolic links$"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_a_folder_s_decoding_says_how_far_it_got_every_few_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its progress was a line every 2,000 images: for photos decoding at a few a second, the
    first line came after minutes. It is a line every PROGRESS_S seconds, and one at the end."""
    _folder(tmp_path, {"train": [8, 8], "test": [8, 8]})  # 40 images, decoded together
    lines: list[tuple[str, int, int]] = []
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path))
    load_data(cfg, progress=lambda *line: lines.append(line))
    assert lines == [("decoding images", 40, 40)]  # at the end, no more
    monkeypatch.setattr(imagefolder, "PROGRESS_S", 0.0)  # as if each image took that long
    shutil.rmtree(Path(os.environ["KDSEARCH_CACHE_DIR"]) / "decoded")  # decoded again
    lines.clear()
    load_data(cfg, progress=lambda *line: lines.append(line))
    assert lines == [("decoding images", n, 40) for n in range(1, 41)]


def test_an_image_that_cannot_be_read_or_decoded_is_one_line_naming_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path came twice ("x.png: cannot decode: cannot identify image file 'x.png'"), a file
    that could not be read was said not to decode, and a pipe named like an image waited for
    ever."""
    _folder(tmp_path, {"train": [8, 8], "test": [8, 8]})
    bad = tmp_path / "train" / "class0" / "0.png"
    bad.write_bytes(b"not an image")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path))
    with pytest.raises(DataError) as garbage:
        load_data(cfg)
    assert str(garbage.value) == f"{bad}: cannot decode: cannot identify image file"
    bad.unlink()
    os.mkfifo(bad)
    with pytest.raises(DataError) as pipe:
        load_data(cfg)
    assert str(pipe.value) == f"imagefolder: {bad} is not a file (a pipe, socket or device)"
    bad.unlink()
    Image.new("RGB", (8, 8)).save(bad)
    opened = Image.open

    def refused(path: str, *args: object, **kwargs: object) -> object:  # chmod 0, as not root
        if path == str(bad):
            raise PermissionError(13, "Permission denied", path)
        return opened(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", refused)
    with pytest.raises(DataError) as unreadable:
        load_data(cfg)
    assert str(unreadable.value) == f"{bad}: cannot read: Permission denied"


def test_every_image_that_cannot_be_decoded_is_named_in_one_error(tmp_path: Path) -> None:
    """Only the first was named, so a folder with several took a decode (minutes, for photos)
    per bad file to find them all."""
    _folder(tmp_path, {"train": [8, 8], "test": [8, 8]})
    bad = [  # in the order they are read: train/ then test/, each class in turn
        tmp_path / "train" / "class0" / "9.png",
        *(tmp_path / split / "class1" / f"{i}.png" for split in ("train", "test") for i in (2, 5)),
    ]
    for path in bad:
        path.write_bytes(b"")
    with pytest.raises(DataError) as many:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    shown = [f"{path}: cannot decode: cannot identify image file" for path in bad]
    assert str(many.value) == (
        "imagefolder: 5 images cannot be read or decoded (remove or replace them): "
        + "; ".join(shown)
    )
    wide = tmp_path / "test" / "class1" / "9.png"  # a size problem stops the decoding there,
    Image.new("RGB", (8, 4)).save(wide)  # naming the bad image before it too
    with pytest.raises(DataError) as size:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert str(size.value).endswith(
        f"; and before it, {bad[0]}: cannot decode: cannot identify image file"
    )
    Image.new("RGB", (8, 8)).save(wide)
    (tmp_path / "test" / "class0" / "0.png").write_bytes(b"")
    with pytest.raises(DataError) as more:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert str(more.value).startswith("imagefolder: 6 images cannot be read or decoded")
    assert str(more.value).endswith("; and 1 more")


def test_a_subset_of_an_image_folder_decodes_only_the_images_it_keeps(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data.subset` was cut after the whole folder was decoded (and cached): a quick search on
    a few thousand images of a large folder waited for all of them. The training images it keeps
    are decoded alone now (with the test split, kept whole), into the images the whole folder's
    decode cut by class with `data.seed` gives; that decode, where cached, serves the subset,
    and replaces its entry."""
    _folder(tmp_path / "f", {"train": [8] * 4, "test": [8] * 4})  # 40 images a split
    decoded: list[str] = []
    decode = imagefolder._decode

    def counted(path: str, size: int | None) -> np.ndarray:
        decoded.append(path)
        return decode(path, size)

    monkeypatch.setattr(imagefolder, "_decode", counted)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "f"), subset=16, val_fraction=0.25)
    with pytest.raises(DataError, match=r"^data.subset: 41 is more than the 40 training images$"):
        load_data(cfg.model_copy(update={"subset": 41}))
    assert not decoded, "refused before decoding"
    alone = imagefolder.read_imagefolder(cfg, None)
    assert sum("/train/" in p for p in decoded) == 16 and len(decoded) == 56
    assert load_data(cfg).fingerprint == load_data(cfg).fingerprint and len(decoded) == 56
    everything = imagefolder.read_imagefolder(cfg.model_copy(update={"subset": None}), None)
    assert len(decoded) == 56 + 80
    assert len(list((isolated_cache / "decoded").glob("*.pt"))) == 1, "the subset's replaced"
    kept, _ = stratified_take(everything.train.y, 16, seeded_generator(0, "subset"))
    for split in (alone.train, imagefolder.read_imagefolder(cfg, None).train):  # and from it
        assert torch.equal(split.x, everything.train.x[kept])
        assert torch.equal(split.y, everything.train.y[kept])
    assert torch.equal(alone.test.x, everything.test.x) and len(decoded) == 56 + 80
    # a subset of every image is the whole folder: read from its entry, or decoded into it
    assert len(load_data(cfg.model_copy(update={"subset": 40})).train) == 30
    assert len(decoded) == 56 + 80
    shutil.rmtree(isolated_cache)
    load_data(cfg.model_copy(update={"subset": 40}))
    assert [p.name.count("-") for p in (isolated_cache / "decoded").glob("*.pt")] == [2]


def test_a_subset_of_a_folder_with_a_colour_image_left_out_is_in_colour(
    tmp_path: Path, isolated_cache: Path
) -> None:
    """A folder with any colour image is read in colour. A subset decoded alone went by its
    own images: greyscale where those it kept were, colour when cut from the whole folder's
    decode, so its fingerprint hung on what the cache held. The headers of the images it leaves
    out are read now."""
    _folder(tmp_path, {"train": [8] * 4, "test": [8] * 4})
    for image in tmp_path.glob("*/*/*.png"):
        Image.open(image).convert("L").save(image)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), subset=16, val_fraction=0.25)
    seen: list[tuple[str, int, int]] = []
    assert load_data(cfg, progress=lambda *step: seen.append(step)).channels == 1
    assert seen[-1] == ("reading the headers of the images left out", 24, 24)
    whole = imagefolder.read_imagefolder(cfg.model_copy(update={"subset": None}), None)
    kept, _ = stratified_take(whole.train.y, 16, seeded_generator(0, "subset"))
    left_out = sorted(set(range(40)) - set(kept.tolist()))[-1]
    shutil.rmtree(isolated_cache)
    colour = sorted(tmp_path.glob("train/*/*.png"))[left_out]
    Image.new("RGB", (8, 8), (200, 10, 10)).save(colour)
    alone = load_data(cfg)
    load_data(cfg.model_copy(update={"subset": None}))
    from_whole = load_data(cfg)
    assert alone.channels == from_whole.channels == 3
    assert alone.fingerprint == from_whole.fingerprint


def test_a_damaged_or_outdated_decode_of_a_folder_is_removed(
    tmp_path: Path, isolated_cache: Path
) -> None:
    """A damaged whole-folder entry was left in place when a subset was decoded, and warned at
    every later load; nor did a subset's decode remove the whole decode of the folder as it was
    before its files changed."""
    _folder(tmp_path, {"train": [8] * 4, "test": [8] * 4})
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), subset=16, val_fraction=0.25)
    load_data(cfg.model_copy(update={"subset": None}))
    (whole,) = (isolated_cache / "decoded").glob("*.pt")
    whole.write_bytes(b"not a torch file")
    with pytest.warns(KdsearchWarning) as told:
        load_data(cfg)
    assert str(told[0].message) == (
        f"cannot use the cached {whole} (not a torch.save file, or a damaged one: its reader "
        "stopped at UnpicklingError Unsupported operand 110); decoding the images again"
    )
    (subset,) = (isolated_cache / "decoded").glob("*.pt")
    assert "-s16x0-" in subset.name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_data(cfg)
    # a torch file, but not of this subset's images: said, and decoded again
    few = imagefolder.Split(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.zeros(10).long())
    torch.save({"train": (few.x, few.y), "test": (few.x, few.y)}, subset)
    with pytest.warns(KdsearchWarning) as told:
        assert load_data(cfg).fingerprint == loaded.fingerprint
    assert str(told[0].message) == (
        f"cannot use the cached {subset} (it holds 10 and 10 training and test images with 10 "
        "and 10 labels, where the folder has 16 and 40); decoding the images again"
    )
    load_data(cfg.model_copy(update={"subset": 20}))  # another subset's entry
    load_data(cfg.model_copy(update={"subset": None}))
    (whole,) = (isolated_cache / "decoded").glob("*.pt")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "class0" / "new.png")
    load_data(cfg)
    (subset,) = (isolated_cache / "decoded").glob("*.pt")
    assert "-s16x0-" in subset.name, "the whole decode of the folder as it was is removed"
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "class0" / "newer.png")
    load_data(cfg)
    (newer,) = (isolated_cache / "decoded").glob("*.pt")
    assert newer != subset, "the subset's entry for the folder as it was is removed"


def test_a_source_that_cut_the_subset_is_not_cut_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source that decoded `data.subset`'s images alone says so (`Raw.cut`); `load_data`
    takes its training split as that subset."""
    raw = bundled.read_synthetic(DataConfig(dataset="synthetic"), None)
    monkeypatch.setitem(
        data_module.SOURCES, "synthetic", lambda cfg, progress: raw._replace(cut=True)
    )
    data = load_data(DataConfig(dataset="synthetic", subset=100, val_fraction=0.25))
    assert len(data.train) + len(data.val) == 800


def _folder(root: Path, sizes: dict[str, list[int]]) -> None:
    for split, per_class in sizes.items():
        for c, size in enumerate(per_class):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (size, size), (20 * i, 10 * c, 99)).save(d / f"{i}.png")


def test_imagefolder_with_mixed_sizes_needs_image_size(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16, 20], "test": [16, 16]})
    with pytest.raises(DataError) as refused:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert str(refused.value) == (  # it named no file
        f"imagefolder: images of different sizes: {tmp_path}/train/class1/0.png is 20x20 "
        f"(height x width), {tmp_path}/train/class0/0.png 16x16; set data.image_size to resize "
        "them all to a square"
    )
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=12))
    assert data.train.x.shape[1:] == (3, 12, 12)


def test_imagefolder_reads_every_kind_imagefolder_does_and_images_in_nested_folders(
    tmp_path: Path,
) -> None:
    """TIFF, PPM/PGM and JFIF files, and images a level down, were skipped without a word: a
    class of TIFFs went missing and the set trained with a class fewer."""
    _folder(tmp_path, {"train": [16, 16, 16], "test": [16, 16, 16]})
    for split in ("train", "test"):
        for i, png in enumerate(sorted((tmp_path / split / "class2").glob("*.png"))):
            suffix, kind = [(".tif", "TIFF"), (".ppm", "PPM"), (".jfif", "JPEG")][i % 3]
            Image.open(png).save(png.with_suffix(suffix), kind)
            png.unlink()
        nested = tmp_path / split / "class1" / "batch1"
        nested.mkdir()
        for png in sorted((tmp_path / split / "class1").glob("[0-4].png")):
            png.rename(nested / png.name)
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.2))
    assert data.classes == ("class0", "class1", "class2")
    assert torch.bincount(data.test.y).tolist() == [10, 10, 10]
    assert torch.bincount(torch.cat([data.train.y, data.val.y])).tolist() == [10, 10, 10]


@pytest.mark.parametrize("splits", [("train",), ("train", "test")])
def test_a_class_folder_of_unread_files_is_named(tmp_path: Path, splits: tuple[str, ...]) -> None:
    """Its class went missing: from both splits without a word, or named as one test/ has and
    train/ lacks, though train/ has its folder."""
    _folder(tmp_path, {"train": [16, 16, 16], "test": [16, 16, 16]})
    for split in splits:
        for png in (tmp_path / split / "class1").iterdir():
            png.rename(png.with_suffix(".heic"))
    with pytest.raises(DataError) as refused:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert str(refused.value) == (
        f"imagefolder: {tmp_path}/train/class1 holds no "
        ".jpg/.jpeg/.jfif/.png/.ppm/.pgm/.pbm/.bmp/.tif/.tiff/.gif/.webp image; remove the "
        "folder, or convert its images"
    )


def test_imagefolder_of_images_that_are_not_square_needs_image_size(tmp_path: Path) -> None:
    """16 x 32 images loaded, were described as 32 x 32 (in an export's `inputs` too), and a
    recipe with HSAKD or SSKD crashed in its rotations once the teacher had trained."""
    for split in ("train", "test"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (32, 16), (40 * i, 99 * c, 9)).save(
                    tmp_path / split / f"c{c}" / f"{i}.png"
                )
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.25)
    with pytest.raises(DataError) as refused:
        load_data(cfg)
    assert str(refused.value) == (
        f"imagefolder: {tmp_path}/train/c0/0.png is 16 high and 32 wide; kdsearch trains on "
        "square images: set data.image_size to resize them to a square"
    )
    data = load_data(cfg.model_copy(update={"image_size": 16}))
    assert data.train.x.shape[1:] == (3, 16, 16) and data.inputs()["image_size"] == 16


def test_an_image_of_another_size_stops_the_decoding_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every image was decoded before the sizes were compared: a folder of large photos took
    more memory than the machine had before it could be refused."""
    _folder(tmp_path, {"train": [12, 12], "test": [12, 12]})
    Image.new("RGB", (12, 9)).save(tmp_path / "train" / "class0" / "0.png")  # the first
    decoded: list[Path] = []
    decode = imagefolder._decode

    def slow(path: Path, size: int | None) -> np.ndarray:
        time.sleep(0.02)
        decoded.append(path)
        return decode(path, size)

    monkeypatch.setattr(imagefolder, "_decode", slow)
    with pytest.raises(DataError, match=r"class0/0.png is 9 high and 12 wide"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    time.sleep(0.2)  # any decoding still going on has finished
    assert len(decoded) < 10, f"{len(decoded)} of 40 images decoded"


def test_small_images_are_decoded_in_this_thread_and_slow_ones_on_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every folder was decoded on one thread per core, and threads taking turns at Python's
    lock between PIL's short calls decoded CIFAR's 32x32 JPEGs 2 times slower than one thread:
    images that decode fast are decoded in the calling thread now, slow ones still on threads,
    in the same order. The first image's decoding (PIL's import: 16 ms against 0.13 ms an image)
    is not timed: counted in, it took CIFAR's images near the threads' threshold."""
    decode = imagefolder._decode
    # seconds the first image and each other one take to decode, besides decoding them
    delays = {
        "fast": (0.0, 0.0),
        "slow first": (0.2, 0.0),
        "slow": (0.0, imagefolder.THREADED_FROM),
    }
    seen: dict[str, set[int]] = {speed: set() for speed in delays}
    loaded = {}
    for speed, (first, each) in delays.items():

        def recorded(
            path: str,
            size: int | None,
            speed: str = speed,
            first: float = first,
            each: float = each,
        ) -> np.ndarray:
            seen[speed].add(threading.get_ident())
            time.sleep(first if path.endswith("train/class0/0.png") else each)
            return decode(path, size)

        monkeypatch.setattr(imagefolder, "_decode", recorded)
        _folder(tmp_path / speed, {"train": [8] * 4, "test": [8] * 4})  # 80, past the 33 probed
        loaded[speed] = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / speed)))
    here = threading.get_ident()
    assert seen["fast"] == {here} and seen["slow first"] == {here}
    if (os.cpu_count() or 1) > 1:
        assert seen["slow"] - {here}, "the pool's threads decoded"
    assert len({data.fingerprint for data in loaded.values()}) == 1  # the same images, in order


def test_class_folders_that_swapped_names_are_read_again(tmp_path: Path) -> None:
    """The decoded cache knew a file by its path, size and time: class folders renamed into
    each other, holding files of one size and time (as an archive sets them), were served from
    the cache with the old labels."""
    for c, shade in (("cat", 20), ("dog", 220)):
        for split in ("train", "test"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(8):
                file = tmp_path / split / c / f"{i}.bmp"
                Image.new("RGB", (8, 8), (shade, shade, shade)).save(file)
                os.utime(file, ns=(10**18, 10**18))
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.25)

    def shade_of(name: str) -> float:
        data = load_data(cfg)
        label = data.classes.index(name)
        return float(data.test.x[data.test.y == label].float().mean())

    assert shade_of("cat") == 20
    for split in ("train", "test"):
        (tmp_path / split / "cat").rename(tmp_path / split / "was-cat")
        (tmp_path / split / "dog").rename(tmp_path / split / "cat")
        (tmp_path / split / "was-cat").rename(tmp_path / split / "dog")
    assert shade_of("cat") == 220


def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16, 16], "test": [16, 16]})
    bomb = tmp_path / "train" / "class0" / "bomb.bmp"
    width = height = 60_000  # a 54-byte header claiming 3.6 G pixels
    header = b"BM" + (54).to_bytes(4, "little") + bytes(4) + (54).to_bytes(4, "little")
    header += (40).to_bytes(4, "little") + width.to_bytes(4, "little")
    header += height.to_bytes(4, "little") + (1).to_bytes(2, "little") + (24).to_bytes(2, "little")
    header += bytes(24)
    bomb.write_bytes(header)
    with pytest.raises(DataError, match=rf"^{re.escape(str(bomb))}: cannot decode: Image size"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_image_size_resizes_the_kept_subset_as_it_resized_the_whole_set() -> None:
    """Only the images `subset` keeps are resized now, a chunk at a time (the whole set was,
    in float at once: about three float copies of it, for a subset of ten images); what they
    become is unchanged."""
    cfg = DataConfig(dataset="digits", subset=100, image_size=20)
    data = load_data(cfg)
    whole = load_data(cfg.model_copy(update={"subset": None}))
    raw = load_data(cfg.model_copy(update={"image_size": None}))
    assert data.train.x.shape[1:] == (1, 20, 20)

    def resized(x: torch.Tensor) -> torch.Tensor:  # all at once, as before the chunks
        x = F.interpolate(x.float(), size=(20, 20), mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8)

    assert torch.equal(data.train.x, resized(raw.train.x))
    assert len(raw.test) > 256, "the test split spans two chunks"
    assert torch.equal(data.test.x, resized(raw.test.x)) and torch.equal(whole.test.x, data.test.x)
    assert data.fingerprint != raw.fingerprint


def test_imagefolder_without_a_test_folder_is_an_error(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16, 16], "val": [16, 16]})  # ImageNet's layout
    with pytest.raises(DataError) as layout:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert str(layout.value) == (  # it said the same whatever it found
        f"imagefolder: {tmp_path} needs train/ and test/ folders of class folders; it holds "
        "train/, val/"
    )
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # named, not the root it lies in
    with pytest.raises(DataError) as loop:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert str(loop.value) == (
        f"imagefolder: cannot read {tmp_path}/loop: Too many levels of symbolic links"
    )
    (tmp_path / "loop").unlink()
    with pytest.raises(DataError) as split:  # one split's class folders given as the root
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "train")))
    assert str(split.value).endswith("; it holds class0/, class1/")
    (tmp_path / "val").rename(tmp_path / "test")
    (tmp_path / "test" / "class1").rename(tmp_path / "test" / "Class1")
    with pytest.raises(DataError) as case:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert str(case.value) == (
        "imagefolder: test/ has classes that train/ lacks: Class1 (train/ has class1)"
    )
    shutil.rmtree(tmp_path / "test")
    # a mistyped root said the same, as if the folder were there and laid out wrong
    with pytest.raises(DataError) as typo:
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "typo")))
    assert str(typo.value) == f"imagefolder: data.root {tmp_path}/typo does not exist"
    image = tmp_path / "train" / "class0" / "0.png"
    with pytest.raises(DataError) as file:
        load_data(DataConfig(dataset="imagefolder", root=str(image)))
    assert str(file.value) == f"imagefolder: data.root {image} is not a folder"


def test_data_hflip_turns_the_flips_on_or_off_and_keys_what_trains_on_them() -> None:
    """An image folder was always flipped (letters, text and left/right signs trained on
    mirrored images), and nothing could flip digits."""
    plain = load_data(DataConfig(dataset="synthetic"))
    off = load_data(DataConfig(dataset="synthetic", hflip=False))
    on = load_data(DataConfig(dataset="synthetic", hflip=True))
    assert plain.hflip is True and off.hflip is False and on.hflip is True
    # the data set's own default leaves the fingerprint (and the teachers keyed by it) as it was
    assert on.fingerprint == plain.fingerprint != off.fingerprint
    # the same draws of order and crops; only the flips differ
    b_off, b_on = (
        next(iter(Loader(d.train, d, CPU, batch_size=64, train=True).epoch(0))) for d in (off, on)
    )
    assert torch.equal(b_off.idx, b_on.idx)
    same = (b_on.x == b_off.x).flatten(1).all(1)
    mirrored = (b_on.x == b_off.x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < int((~same).sum()) < 54
    digits = load_data(DataConfig(dataset="digits", hflip=True))
    assert (
        digits.hflip and digits.fingerprint != load_data(DataConfig(dataset="digits")).fingerprint
    )


def test_crop_at_the_centre_offset_is_the_identity_and_flip_mirrors() -> None:
    x = torch.randint(0, 256, (3, 2, 8, 8), dtype=torch.uint8)
    centre = torch.full((3, 2), 1)
    assert torch.equal(crop_flip(x, centre, torch.zeros(3, dtype=torch.bool), 1), x)
    assert torch.equal(crop_flip(x, centre, torch.ones(3, dtype=torch.bool), 1), x.flip(3))


def test_crop_shifts_the_image_and_pads_with_zeros() -> None:
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4) + 1
    out = crop_flip(x, torch.tensor([[0, 2]]), torch.zeros(1, dtype=torch.bool), 1)
    # offset (0, 2) with padding 1: one row of zeros on top, shifted one column left
    expected = torch.tensor([[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]])
    assert torch.equal(out[0, 0], expected.to(torch.uint8))


def test_epoch_draws_are_a_pure_function_of_seed_and_epoch() -> None:
    a = epoch_draws(100, seed=3, epoch=5, pad=4, hflip=True)
    b = epoch_draws(100, seed=3, epoch=5, pad=4, hflip=True)
    c = epoch_draws(100, seed=3, epoch=6, pad=4, hflip=True)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert a[1].min() >= 0 and a[1].max() <= 8
    assert not epoch_draws(100, seed=3, epoch=5, pad=4, hflip=False)[2].any()


def test_loader_serves_full_shuffled_batches_with_normalised_images() -> None:
    data = load_data(DataConfig(dataset="synthetic"))
    loader = Loader(data.train, data, CPU, batch_size=64, train=True, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == len(data.train) // 64
    assert loader.images == sum(len(b.idx) for b in batches) == len(loader) * 64
    # a split smaller than a batch: one batch of all of it (speeds are reported per image)
    few = Loader(data.train, data, CPU, batch_size=4096, train=True, seed=0)
    assert [len(b.idx) for b in few.epoch(0)] == [few.images] == [len(data.train)]
    assert all(b.x.shape == (64, 3, 16, 16) and b.x.dtype == torch.float32 for b in batches)
    seen = torch.cat([b.idx for b in batches])
    assert len(set(seen.tolist())) == len(seen), "no image twice in one epoch"
    again = list(Loader(data.train, data, CPU, batch_size=64, train=True, seed=0).epoch(0))
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, again, strict=True))


def test_some_of_an_epochs_batches_are_those_batches_of_the_whole_epoch() -> None:
    """Trials computing one epoch's teacher outputs between them each make a share of its
    batches: a share must be the same images, crops and flips as in the whole epoch."""
    data = load_data(DataConfig(dataset="synthetic"))
    for train in (True, False):
        loader = Loader(data.train, data, CPU, batch_size=64, train=train, seed=0)
        whole = list(loader.epoch(3))
        share = list(loader.epoch(3, range(2, 4)))
        assert len(share) == 2
        for a, b in zip(whole[2:4], share, strict=True):
            assert torch.equal(a.idx, b.idx) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_eval_loader_keeps_order_and_every_image() -> None:
    data = load_data(DataConfig(dataset="synthetic"))
    loader = Loader(data.test, data, CPU, batch_size=64, train=False)
    idx = torch.cat([b.idx for b in loader.epoch(0)])
    assert torch.equal(idx, torch.arange(len(data.test)))
    assert len(loader) == 4


def test_normalisation_uses_the_training_split_statistics() -> None:
    data = load_data(DataConfig(dataset="synthetic"))
    loader = Loader(data.train, data, CPU, batch_size=1000, train=False)
    x = torch.cat([b.x for b in loader.epoch(0)]).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(x.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(1), torch.ones(3), atol=1e-3, rtol=0)


def test_normalisation_constants_can_be_given_for_a_teacher_trained_with_them(
    tmp_path: Path,
) -> None:
    """Inputs were normalised with the training split's own statistics only: a teacher from
    elsewhere, trained with its code's constants (ImageNet's, say), saw other inputs here.
    `data.mean` and `data.std` set them; they are in the data's fingerprint, so a teacher
    cached for other inputs is not reused, and what a served model takes says them."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    own = load_data(DataConfig(dataset="synthetic"))
    data = load_data(DataConfig(dataset="synthetic", mean=mean, std=std))
    assert (data.mean, data.std) == (tuple(mean), tuple(std))
    assert (data.inputs()["mean"], data.inputs()["std"]) == (mean, std)
    assert data.fingerprint != own.fingerprint
    loader = Loader(data.val, data, CPU, batch_size=1000, train=False)
    x = torch.cat([b.x for b in loader.epoch(0)])
    expected = (data.val.x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"have 3 values each, but the images of digits have 1 "):
        DataConfig(dataset="digits", mean=mean, std=std)  # refused before any image is read
    folder = tmp_path / "letters"  # an image folder's channels are known once it is read
    _folder(folder, {"train": [8, 8], "test": [8, 8]})
    for image in folder.glob("*/*/*.png"):
        Image.open(image).convert("L").save(image)
    with pytest.raises(DataError) as channels:
        load_data(DataConfig(dataset="imagefolder", root=str(folder), mean=mean, std=std))
    assert str(channels.value) == (
        "data.mean and data.std: 3 values each, but the images have 1 channel(s); give one of "
        "each per channel"
    )


def test_the_channels_known_before_reading_are_those_read(tmp_path: Path) -> None:
    """`DATASET_CHANNELS` lets a recipe's `data.mean` be checked before any image is read."""
    _write_cifar(tmp_path / "cifar10", "cifar10", n_train=100, n_test=10, as_archive=False)
    _write_cifar(tmp_path / "cifar100", "cifar100", n_train=1000, n_test=100, as_archive=False)
    _write_fashion(tmp_path / "fashion_mnist")
    for dataset, channels in DATASET_CHANNELS.items():
        cfg = DataConfig(dataset=dataset, root=str(tmp_path / dataset), download=False)
        assert load_data(cfg).channels == channels, dataset


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"mean": [0.5]}, "data.mean needs data.std: inputs are normalised with both"),
        ({"std": [0.5]}, "data.std needs data.mean"),
        ({"mean": [0.5], "std": [0.2, 0.2]}, "data.mean has 1 values and data.std 2"),
        ({"mean": [0.5], "std": [0.0]}, "each deviation from 0.001 to 1"),
        ({"mean": [0.5], "std": [58.0]}, "are in [0, 1] units, as images scaled to [0, 1] (0-255"),
        ({"mean": [], "std": []}, "at least 1 item"),
        ({"mean": [124.0], "std": [0.2]}, "data.mean [124.0] and data.std [0.2] are in [0, 1]"),
    ],
)
def test_normalisation_constants_are_checked(given: dict[str, list[float]], expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        DataConfig(dataset="synthetic", **given)


def test_missing_cifar_is_downloaded_with_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    calls: list[tuple[str, bool, bool]] = []

    def fake_download(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        if not (Path(root) / "cifar-10-batches-py").exists():
            _write_cifar(Path(root), "cifar10", n_train=100, n_test=20, as_archive=False)

    monkeypatch.setattr(tvd, "CIFAR10", fake_download)
    data = load_data(DataConfig(dataset="cifar10", root=str(tmp_path / "new"), download=True))
    # into a temporary folder inside root, whose cifar-10-batches-py/ is then moved into root
    assert [(Path(r).parent, t, d) for r, t, d in calls] == [
        (tmp_path / "new", True, True),
        (tmp_path / "new", False, True),
    ]
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["cifar-10-batches-py"]
    assert len(data.test) == 20


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets as tvd

    def offline(root: str, train: bool, download: bool) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "CIFAR100", offline)
    with pytest.raises(DataError, match=r"could not download cifar100 into .*name resolution"):
        load_data(DataConfig(dataset="cifar100", root=str(tmp_path), download=True))


def test_a_download_that_never_answers_times_out_with_an_offline_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchvision.datasets as tvd

    server = socket.socket()  # accepts connections (the kernel's backlog) but never answers
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/cifar-10-python.tar.gz"
    # without a timeout the request would wait forever: close the server after 10 s so that
    # such a failure shows as a connection reset instead
    guard = threading.Timer(10.0, server.close)
    guard.start()
    monkeypatch.setattr(tvd.CIFAR10, "url", url)
    monkeypatch.setattr(download_module, "DOWNLOADS", {"cifar10": (url, "cifar-10-python.tar.gz")})
    monkeypatch.setattr(download_module, "DOWNLOAD_TIMEOUT_S", 0.5)
    root = tmp_path / "data" / "new"
    try:
        with pytest.raises(DataError) as err:
            load_data(DataConfig(dataset="cifar10", root=str(root), download=True))
    finally:
        guard.cancel()
        server.close()
    assert "timed out" in str(err.value) and "\n" not in str(err.value)
    assert f"copy cifar-10-python.tar.gz into {root} and set data.download: false" in str(err.value)
    assert f"downloading cifar10 from {url} into {root}" in capsys.readouterr().err
    assert socket.getdefaulttimeout() is None, "the timeout is for the download only"
    assert list(tmp_path.iterdir()) == [], "a failed download leaves no folder behind"


def test_imagefolder_skips_hidden_folders_and_files(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16, 16], "test": [16, 16]})
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / ".ipynb_checkpoints" / "0.png")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "test" / "class1" / "._0.png").write_bytes(b"macOS resource fork")
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert data.classes == ("class0", "class1")
    assert torch.bincount(data.test.y).tolist() == [10, 10]


def test_a_flat_image_folder_says_images_need_class_subfolders(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / split / f"{i}.jpg")
    with pytest.raises(DataError, match=r"3 images lie directly in .*train; .*train/<class>/"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


def test_imagefolder_reads_greyscale_images_in_a_colour_set_as_colour(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16, 16], "test": [16, 16]})
    Image.new("L", (16, 16), 77).save(tmp_path / "train" / "class1" / "grey.jpg", quality=100)
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert data.channels == 3 and len(data.train) + len(data.val) == 21
    every = torch.cat([data.train.x, data.val.x])
    grey = every[(every[:, 0] == 77).flatten(1).all(1)]
    assert len(grey) == 1 and (grey == 77).all(), "the greyscale image in all three channels"


def test_16_bit_pngs_are_rescaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for c, level in enumerate((1000, 60000)):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(10):
                image = Image.fromarray(np.full((8, 8), level + i, dtype=np.uint16))
                assert image.mode == "I;16"
                image.save(d / f"{i}.png")
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    assert data.channels == 1
    assert sorted(set(data.test.x.flatten().tolist())) == [4, 233]  # round(1000/257), 60000/257


@pytest.mark.parametrize("damage", ["empty", "truncated", "junk"])
def test_a_damaged_decoded_cache_entry_is_decoded_again_and_replaced(
    tmp_path: Path, isolated_cache: Path, damage: str
) -> None:
    root = tmp_path / "images"
    _folder(root, {"train": [16, 16], "test": [16, 16]})
    cfg = DataConfig(dataset="imagefolder", root=str(root))
    first = load_data(cfg)
    (cached,) = (isolated_cache / "decoded").glob("imagefolder-*.pt")
    whole = cached.read_bytes()
    cached.write_bytes({"empty": b"", "truncated": whole[:200], "junk": b"junk" * 50}[damage])
    with pytest.warns(UserWarning, match=r"cannot use the cached .*decoding the images again"):
        again = load_data(cfg)
    assert again.fingerprint == first.fingerprint
    # the damaged entry is replaced by a whole one (torch.save's bytes name the file they were
    # written to, a staging file of its own each time: compare what they hold)
    before, after = torch.load(io.BytesIO(whole)), torch.load(cached)
    for split in ("train", "test"):
        assert all(torch.equal(a, b) for a, b in zip(before[split], after[split], strict=True))


def test_images_decoded_by_another_decoding_format_are_decoded_again_and_replaced(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    _folder(root, {"train": [16, 16], "test": [16, 16]})
    cfg = DataConfig(dataset="imagefolder", root=str(root))
    with monkeypatch.context() as m:
        m.setattr(imagefolder, "DECODE_FORMAT", imagefolder.DECODE_FORMAT - 1)
        load_data(cfg)
    (old,) = (isolated_cache / "decoded").glob("imagefolder-*.pt")
    old.write_bytes(b"")  # would warn if read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_data(cfg)
    (new,) = (isolated_cache / "decoded").glob("imagefolder-*.pt")  # the old one is gone
    assert new != old
    # so is the decode of a folder changed since (an image added), which nothing would read
    Image.new("RGB", (16, 16)).save(root / "train" / "class0" / "added.png")
    load_data(cfg)
    (newer,) = (isolated_cache / "decoded").glob("imagefolder-*.pt")
    assert newer != new
    # an entry named as before the folder was in the name (whose key no later kdsearch
    # makes: it knew files without their inodes) is removed by the next decode of any folder
    old_name = newer.parent / f"imagefolder-{newer.stem.rsplit('-', 1)[1]}.pt"
    shutil.copy(newer, old_name)
    # a decode of the folder at another size, or of another folder, stays
    load_data(DataConfig(dataset="imagefolder", root=str(root), image_size=8))
    assert not old_name.exists() and newer.is_file()
    _folder(tmp_path / "other", {"train": [16, 16], "test": [16, 16]})
    load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "other")))
    assert len(list((isolated_cache / "decoded").glob("imagefolder-*.pt"))) == 3


def test_an_unwritable_cache_folder_warns_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    _folder(root, {"train": [16, 16], "test": [16, 16]})
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match=r"cannot cache the decoded images in .*a-file"):
        data = load_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert len(data.test) == 20


def test_a_ctrl_c_while_the_decoded_images_are_cached_leaves_no_partial_copy(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "images"
    _folder(root, {"train": [16, 16], "test": [16, 16]})

    def cut(obj: object, file: Path) -> None:  # Ctrl-C halfway through the file
        Path(file).write_bytes(b"PK half of the data set")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        load_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert list((isolated_cache / "decoded").iterdir()) == []


def _cifar_dir(tmp_path: Path) -> Path:
    _write_cifar(tmp_path, "cifar10", n_train=100, n_test=10, as_archive=False)
    return tmp_path / "cifar-10-batches-py"


def _repickle(path: Path, change: dict[str, object], drop: str | None = None) -> None:
    with open(path, "rb") as f:
        body = pickle.load(f)
    body.update(change)
    body.pop(drop, None)
    with open(path, "wb") as f:
        pickle.dump(body, f)


def test_cifar_with_more_labels_than_images_is_a_clear_error(tmp_path: Path) -> None:
    batch = _cifar_dir(tmp_path) / "data_batch_2"
    _repickle(batch, {"labels": list(range(10)) * 6})
    with pytest.raises(DataError, match=r"data_batch_2: holds 20 images but 60 labels$"):
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("junk meta", r"batches\.meta: cannot read the cifar10 file: unsupported pickle"),
        ("meta not a dict", r"batches\.meta: cannot read the cifar10 file"),
        ("no labels", r"data_batch_3: has no 'labels' entry"),
        ("wrong width", r"data_batch_3: holds images of shape \(20, 1024\), not N x 3072"),
    ],
)
def test_damaged_cifar_files_are_one_line_errors(tmp_path: Path, damage: str, message: str) -> None:
    folder = _cifar_dir(tmp_path)
    if damage == "junk meta":
        (folder / "batches.meta").write_bytes(b"\x80\x09junk")  # pickle.load: ValueError
    elif damage == "meta not a dict":
        (folder / "batches.meta").write_bytes(pickle.dumps("junk"))
    elif damage == "no labels":
        _repickle(folder / "data_batch_3", {}, drop="labels")
    else:
        _repickle(folder / "data_batch_3", {"data": np.zeros((20, 1024), dtype=np.uint8)})
    with pytest.raises(DataError, match=message) as err:
        load_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    assert "\n" not in str(err.value)


def test_an_archive_unpacked_meanwhile_by_another_process_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_cifar(tmp_path, "cifar10", n_train=100, n_test=10, as_archive=True)
    real_extractall = tarfile.TarFile.extractall

    def racing_extractall(self: tarfile.TarFile, path: str, **kwargs: object) -> None:
        real_extractall(self, path, **kwargs)  # type: ignore[arg-type]
        # the other process renames its copy into place while this one is still unpacking
        shutil.copytree(Path(path) / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")

    monkeypatch.setattr(tarfile.TarFile, "extractall", racing_extractall)
    data = load_data(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    assert len(data.test) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]


def _write_fashion(
    folder: Path, n_train: int = 100, n_train_labels: int = 100, classes: int = 10, seed: int = 0
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n, n_labels in (("train", n_train, n_train_labels), ("t10k", 30, 30)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n_labels) % classes)


def test_fashion_mnist_with_more_labels_than_images_is_a_clear_error(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "FashionMNIST" / "raw", n_train=100, n_train_labels=600)
    with pytest.raises(DataError, match=r"train-images.*\(100, 28, 28\) but .*train-labels.*600"):
        load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False))


def test_a_truncated_gz_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_fashion(raw)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: cannot read"):
        load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False))


def test_fashion_mnist_files_directly_in_root_are_read_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    def no_download(root: str, train: bool, download: bool) -> None:
        raise AssertionError("the files are there; nothing to download")

    monkeypatch.setattr(tvd, "FashionMNIST", no_download)
    _write_fashion(tmp_path)  # as Debian's package lays them out
    data = load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=True))
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 30)
    assert not (tmp_path / "FashionMNIST").exists()


def test_a_download_completes_a_folder_that_held_some_of_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    def download(root: str, train: bool, download: bool) -> None:
        # all four, as torchvision does; other pixels than the file kept, so a kept file
        # overwritten by the download's would show
        _write_fashion(Path(root) / "FashionMNIST" / "raw", seed=1)

    monkeypatch.setattr(tvd, "FashionMNIST", download)
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_fashion(raw)
    kept = (raw / "train-images-idx3-ubyte.gz").read_bytes()
    for name in ("train-labels", "t10k-images", "t10k-labels"):
        (raw / f"{name}-idx{1 if 'labels' in name else 3}-ubyte.gz").unlink()
    data = load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=True))
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 30)
    assert (
        len(list(raw.iterdir())) == 4 and (raw / "train-images-idx3-ubyte.gz").read_bytes() == kept
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FashionMNIST"]  # no download folder


def test_a_failed_fashion_mnist_download_is_one_line_and_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    def offline(root: str, train: bool, download: bool) -> None:
        (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)  # as torchvision does
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x, got:\n")

    monkeypatch.setattr(tvd, "FashionMNIST", offline)
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(
        DataError, match=r"could not download fashion_mnist .*Tried http://x"
    ) as err:
        load_data(DataConfig(dataset="fashion_mnist", root=str(root), download=True))
    assert "\n" not in str(err.value) and "Debian" in str(err.value)
    assert list(root.iterdir()) == []
