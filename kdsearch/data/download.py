"""Getting CIFAR and Fashion-MNIST where they are missing: torchvision's download, or the
official archive the user copied, unpacked so that its folder appears whole or not at all."""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

from kdsearch.errors import DataError
from kdsearch.paths import remove_empty

UNPACK_STALE_S = 3600.0  # an unpack folder this old is a killed process's (CIFAR takes seconds)


def extract(archive: Path, folder: str) -> None:
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
        place(tmp / folder, archive.parent / folder)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(
            f"{archive}: cannot unpack it ({err}); replace it with the official archive"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place(src: Path, dst: Path) -> None:
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


def download(dataset: str, root: Path, folder: str) -> None:
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
            place(Path(tmp) / folder, root / folder)
    except Exception as err:  # network, disk or checksum: the user can only act on the message
        remove_empty(created)  # deepest first
        raise DataError(
            f"could not download {dataset} into {root} from {url}: {' '.join(str(err).split())}; "
            f"to work offline, copy {offline} into {root} and set data.download: false"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)
