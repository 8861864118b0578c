from __future__ import annotations

import gzip
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdsearch.data import Loader, crop_flip, epoch_draws, load_data, read_idx, stratified_take
from kdsearch.errors import DataError
from kdsearch.recipe import DataConfig

CPU = torch.device("cpu")


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
def test_fashion_mnist_real_data_from_debian(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DEBIAN_FASHION.glob("*-ubyte.gz"):
        (raw / f.name).symlink_to(f)
    data = load_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path), download=False))
    assert (len(data.train) + len(data.val), len(data.test)) == (60_000, 10_000)
    assert torch.bincount(data.test.y).tolist() == [1000] * 10
    assert data.mean[0] == pytest.approx(0.2860, abs=0.001)  # the published train mean


@pytest.mark.slow
def test_imagefolder_reads_the_real_cifar10_jpegs_and_caches_them(
    cifar10_folder: Path, isolated_cache: Path
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


def _folder(root: Path, sizes: dict[str, list[int]]) -> None:
    for split, per_class in sizes.items():
        for c, size in enumerate(per_class):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (size, size), (20 * i, 10 * c, 99)).save(d / f"{i}.png")


def test_imagefolder_with_mixed_sizes_needs_image_size(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16, 20], "test": [16, 16]})
    with pytest.raises(DataError, match=r"different shapes.*data.image_size"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    data = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=12))
    assert data.train.x.shape[1:] == (3, 12, 12)


def test_imagefolder_without_a_test_folder_is_an_error(tmp_path: Path) -> None:
    _folder(tmp_path, {"train": [16, 16]})
    with pytest.raises(DataError, match="needs train/ and test/"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


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
    assert all(b.x.shape == (64, 3, 16, 16) and b.x.dtype == torch.float32 for b in batches)
    seen = torch.cat([b.idx for b in batches])
    assert len(set(seen.tolist())) == len(seen), "no image twice in one epoch"
    again = list(Loader(data.train, data, CPU, batch_size=64, train=True, seed=0).epoch(0))
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, again, strict=True))


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
    assert calls == [(str(tmp_path / "new"), True, True), (str(tmp_path / "new"), False, True)]
    assert len(data.test) == 20


def test_failed_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets as tvd

    def offline(root: str, train: bool, download: bool) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "CIFAR100", offline)
    with pytest.raises(DataError, match=r"could not download cifar100 into .*name resolution"):
        load_data(DataConfig(dataset="cifar100", root=str(tmp_path), download=True))
