"""An image folder (`train/` and `test/`, a folder per class): listed, decoded once, on threads
where that pays, into one size, and cached decoded, keyed by every file it read."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from stat import S_ISREG
from typing import NamedTuple

import numpy as np
import torch

from kdsearch.cache import cache_dir, digest
from kdsearch.data.base import (
    Progress,
    Raw,
    Split,
    as_split,
    data_root,
    first_line,
    load_failure,
    subset_indices,
    take,
)
from kdsearch.errors import DataError, KdsearchWarning
from kdsearch.paths import replaced_whole
from kdsearch.recipe import DataConfig

IMAGE_SUFFIXES = (  # what torchvision's ImageFolder reads, and GIF and JFIF
    ".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".gif",
    ".webp",
)  # fmt: skip
# Bump when decoding changes what an image becomes (2: greyscale in a colour set made colour,
# 16-bit scaled, not clipped), so that no set decoded the old way is read from the cache.
DECODE_FORMAT = 2


def check_folder(cfg: DataConfig) -> None:
    """Refuse a `data.root` that cannot be an image folder, reading no image: no folder there,
    or no train/ and test/ in it (what it holds named: val/ where test/ should be, or class
    folders given for the whole)."""
    root = data_root(cfg)
    if not root.is_dir():
        kind = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"imagefolder: data.root {root} {kind}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return
    try:
        with os.scandir(root) as entries:
            visible = sorted(
                (e for e in entries if not e.name.startswith(".")), key=lambda e: e.name
            )
    except OSError as err:
        raise _unreadable(str(root), err) from None
    held = []
    for entry in visible:
        try:  # follows links: one that loops is named, not the root
            if entry.is_dir():
                held.append(entry.name)
        except OSError as err:
            raise _unreadable(entry.path, err) from None
    shown = ", ".join(f"{name}/" for name in held[:6]) + (", ..." if len(held) > 6 else "")
    raise DataError(
        f"imagefolder: {root} needs train/ and test/ folders of class folders; it holds "
        f"{shown or 'no folder'}"
    )


def read_imagefolder(cfg: DataConfig, progress: Progress | None) -> Raw:
    """The folder's train and test splits, from the decoded cache where it holds them. With
    `data.subset`, the training images it keeps are decoded alone (and cached apart), unless a
    decode of the whole folder is cached: the same images either way."""
    check_folder(cfg)
    root = data_root(cfg)
    listing = {split: _list_images(root, split) for split in ("train", "test")}
    classes = tuple(sorted({found.cls for found in listing["train"]}))
    unknown = sorted({found.cls for found in listing["test"]} - set(classes))
    if unknown:
        named = {c.lower(): c for c in classes}  # `Cat` beside `cat`: the case alone differs
        shown = [
            f"{u} (train/ has {named[u.lower()]})" if u.lower() in named else u for u in unknown
        ]
        raise DataError(f"imagefolder: test/ has classes that train/ lacks: {', '.join(shown)}")
    index = {c: i for i, c in enumerate(classes)}
    labels = {split: [index[found.cls] for found in listing[split]] for split in listing}
    keep = subset_indices(torch.tensor(labels["train"], dtype=torch.int64), cfg)
    # named for the folder (and size) first: a decode of it replaces those before, which the
    # folder's files changing since (or another decoding format) left unread for good
    folder = digest({"root": str(root.resolve()), "size": cfg.image_size})
    sizes = len(listing["train"]), len(listing["test"])
    whole = _cached_path(folder, cfg, listing)
    saved = _read_decoded(whole, sizes)
    if saved is not None:
        train, test = saved
        train = train if keep is None else take(train, keep)
        return Raw(train, test, classes, hflip=True, cut=True)
    cached, subset, left_out = whole, None, []
    if keep is not None:  # its own entry, until a whole decode
        subset = f"s{cfg.subset}x{cfg.seed}"
        cached = _cached_path(folder, cfg, listing, subset)
        picked = keep.tolist()
        saved = _read_decoded(cached, (len(picked), sizes[1]))
        if saved is not None:
            return Raw(*saved, classes, hflip=True, cut=True)
        kept = set(picked)
        left_out = [f.path for i, f in enumerate(listing["train"]) if i not in kept]
        listing["train"] = [listing["train"][i] for i in picked]
        labels["train"] = [labels["train"][i] for i in picked]
    paths = [found.path for split in listing.values() for found in split]
    images = _decode_all(paths, cfg.image_size, progress)
    # in colour if any image of the folder is (as torchvision's ImageFolder reads every image
    # as RGB), those a subset leaves out too (their headers say), else greyscale
    if any(a.shape[2] == 3 for a in images) or _any_colour(left_out, progress):
        images = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in images]
    n = len(listing["train"])
    train = as_split(np.stack(images[:n]).transpose(0, 3, 1, 2), labels["train"])
    test = as_split(np.stack(images[n:]).transpose(0, 3, 1, 2), labels["test"])
    _write_decoded(cached, train, test)
    _prune(cached, folder, subset)
    return Raw(train, test, classes, hflip=True, cut=True)


def _cached_path(
    folder: str,
    cfg: DataConfig,
    listing: dict[str, list[Found]],
    subset: str | None = None,
) -> Path:
    """Where the decode of the folder `listing` lists is cached, or that of its `subset` (named
    by the training images kept and the seed that drew them): keyed by every file's name, size,
    time and inode, so that a folder changed since is decoded again."""
    spec = {
        "format": DECODE_FORMAT,
        "root": str(data_root(cfg).resolve()),
        "size": cfg.image_size,
        "files": [found.key for split in listing.values() for found in split],
    }
    if subset is None:  # the key of every decode of a whole folder so far
        return cache_dir() / "decoded" / f"imagefolder-{folder}-{digest(spec)}.pt"
    key = digest({**spec, "subset": subset})
    return cache_dir() / "decoded" / f"imagefolder-{folder}-{subset}-{key}.pt"


def _prune(cached: Path, folder: str, subset: str | None) -> None:
    """Remove the folder's other decoded entries that no load will read again: after a whole
    decode, every other (it serves every subset); after a `subset`'s, the whole decodes and the
    entries of that subset of the folder as it was. Also any entry named as before the folder
    was in the name, whose key (files without their inodes) no decode makes now."""
    for stale in cached.parent.glob("imagefolder-*.pt"):
        if stale == cached:
            continue
        rest = stale.stem.removeprefix(f"imagefolder-{folder}-")
        ours = rest != stale.stem
        if stale.stem.count("-") == 1 or (
            ours and (subset is None or "-" not in rest or rest.startswith(f"{subset}-"))
        ):
            stale.unlink(missing_ok=True)


def _any_colour(paths: list[str], progress: Progress | None) -> bool:
    """Whether any image at `paths` is in colour, from its header (no pixel is decoded): a
    subset decoded in greyscale is read in colour where an image it left out is, as the whole
    folder is. A file that cannot be opened does not count (nor is it decoded)."""
    from PIL import Image, UnidentifiedImageError

    shown = time.monotonic()
    for done, path in enumerate(paths, start=1):
        try:
            with Image.open(path) as file:
                if not _is_grey(file.mode):
                    return True
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
            pass
        if progress is not None and (done == len(paths) or time.monotonic() - shown >= PROGRESS_S):
            progress("reading the headers of the images left out", done, len(paths))
            shown = time.monotonic()
    return False


def _read_decoded(path: Path, sizes: tuple[int, int]) -> tuple[Split, Split] | None:
    """The train and test splits cached at `path`, of `sizes` images; None when none, or (with
    a warning) when damaged or of other sizes."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        train, test = Split(*saved["train"]), Split(*saved["test"])
        if (
            (len(train), len(test)) != sizes
            or len(train.x) != len(train)
            or len(test.x) != len(test)
        ):
            raise ValueError(
                f"it holds {len(train.x)} and {len(test.x)} training and test images with "
                f"{len(train)} and {len(test)} labels, where the folder has {sizes[0]} and "
                f"{sizes[1]}"
            )
        return train, test
    except Exception as err:  # a damaged file: torch.load raises many kinds
        warnings.warn(
            f"cannot use the cached {path} ({load_failure(err)}); decoding the images again",
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
            f"cannot cache the decoded images in {path.parent} ({first_line(err)}); "
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

    def is_folder(entry: os.DirEntry[str]) -> bool:
        try:  # follows links: one that loops (to itself, or two to each other) cannot be read
            return entry.is_dir()
        except OSError as err:
            raise _unreadable(entry.path, err) from None

    def images(cls: str, path: str, under: str) -> Iterator[Found]:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(
                f"imagefolder: {seen[real]} and {path} are one folder, {real} (reached through a "
                "link); remove the link, or copy the images it should add"
            )
        seen[real] = path
        for entry in visible(path):
            if is_folder(entry):
                yield from images(cls, entry.path, f"{under}/{entry.name}")
            elif _is_image(entry.name):
                try:
                    stat = entry.stat()
                except OSError as err:
                    raise _unreadable(entry.path, err) from None
                if not S_ISREG(stat.st_mode):  # a pipe named x.jpg: reading it waits for ever
                    raise DataError(
                        f"imagefolder: {entry.path} is not a file (a pipe, socket or device)"
                    )
                key = (f"{under}/{entry.name}", stat.st_size, stat.st_mtime_ns, stat.st_ino)
                yield Found(cls, entry.path, key)

    folder = str(root / split)
    classes = [e for e in visible(folder) if is_folder(e)]
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
SHOWN_BAD = 5  # images that cannot be decoded named in the error, of all there are
PROGRESS_S = 5.0  # seconds between lines on the decoding's progress (photos: a few a second)
THREADED_FROM = 0.001  # seconds an image, from which threads decoded faster (benchmarks/README.md)


def _decode_all(paths: list[str], size: int | None, progress: Progress | None) -> list[np.ndarray]:
    """Decode every image (height x width x channels). Images that cannot be read or decoded
    are all named at the end (`SHOWN_BAD` of them), not one per load. Without `size`, the first
    image that is not square, or not the size of the first, stops the decoding, naming it
    (decoded whole first, a folder of photos could take more memory than the machine has
    before being refused)."""
    images: list[np.ndarray] = []
    kept: list[str] = []  # the paths of `images`
    bad: list[DataError] = []
    decoded = decode_images(paths, size)
    shown = time.monotonic()
    try:
        for done, (path, image) in enumerate(zip(paths, decoded, strict=True), start=1):
            if isinstance(image, DataError):
                bad.append(image)
            elif size is None and (problem := _size_problem(image, images, kept, path)):
                also = f"; and before it, {bad[0]}" if bad else ""  # found now, not next load
                raise DataError(problem + also)
            else:
                images.append(image)
                kept.append(path)
            if progress is not None and (
                done == len(paths) or time.monotonic() - shown >= PROGRESS_S
            ):
                progress("decoding images", done, len(paths))
                shown = time.monotonic()
    finally:  # a refusal or Ctrl-C: the images not started are not decoded
        decoded.close()
    if len(bad) == 1:
        raise bad[0]
    if bad:
        more = f"; and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
        raise DataError(
            f"imagefolder: {len(bad)} images cannot be read or decoded (remove or replace "
            f"them): {'; '.join(str(e) for e in bad[:SHOWN_BAD])}{more}"
        )
    return images


def decode_images(
    paths: list[str], size: int | None, threaded: bool | None = None
) -> Generator[np.ndarray | DataError, None, None]:
    """Each image decoded (and resized to `size` square), or why it cannot be, in order, in
    this thread or on one
    thread per core (`threaded`; None: chosen by timing the first images). Images that decode in
    under `THREADED_FROM` seconds each (those of CIFAR or MNIST, JPEGs up to about 128 pixels
    wide) are decoded in this thread: PIL holds Python's lock between its short calls, and two
    threads taking turns at it decoded 32-pixel JPEGs 2-2.5 times slower than one thread
    (benchmarks/README.md, "Loading an image folder"). Larger ones, whose decoding and resizing
    run outside that lock, are decoded on threads."""
    if threaded is None:
        threaded = yield from probe_decoding(paths, size)
        paths = paths[PROBE_IMAGES + 1 :]
    if not threaded:
        for path in paths:
            yield _decoded(path, size)
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        decoding = [pool.submit(_decoded, p, size) for p in paths]
        try:
            for future in decoding:
                yield future.result()
        finally:
            for future in decoding:
                future.cancel()


def probe_decoding(
    paths: list[str], size: int | None
) -> Generator[np.ndarray | DataError, None, bool]:
    """The first `PROBE_IMAGES` + 1 images decoded, in order; returns whether the rest are to be
    decoded on threads. The first image is not timed: it pays for importing PIL and setting up
    its format's decoder (16 ms, against 0.13 ms for each 32x32 JPEG after it, here; timed with
    them, it took their average to 0.8-0.9 ms, near `THREADED_FROM`)."""
    for path in paths[:1]:
        yield _decoded(path, size)
    probe = paths[1 : PROBE_IMAGES + 1]
    started = time.perf_counter()
    for path in probe:
        yield _decoded(path, size)
    per_image = (time.perf_counter() - started) / max(1, len(probe))
    return per_image >= THREADED_FROM and (os.cpu_count() or 1) > 1


def _size_problem(image: np.ndarray, before: list[np.ndarray], kept: list[str], path: str) -> str:
    """Why the image at `path` (decoded without resizing) cannot join those `before` it (from
    the paths `kept`), or ''."""
    height, width = image.shape[:2]
    if not before:
        return (
            ""
            if height == width
            else (
                f"imagefolder: {path} is {height} high and {width} wide; kdsearch trains on "
                "square images: set data.image_size to resize them to a square"
            )
        )
    if (height, width) == before[0].shape[:2]:
        return ""
    first = "x".join(map(str, before[0].shape[:2]))
    return (
        f"imagefolder: images of different sizes: {path} is {height}x{width} (height x "
        f"width), {kept[0]} {first}; set data.image_size to resize them all to a square"
    )


def _is_grey(mode: str) -> bool:
    """Whether an image of PIL's `mode` decodes to one channel (16-bit greyscale rescaled)."""
    return mode.startswith("I") or mode in ("1", "L", "LA")


def _decoded(path: str, size: int | None) -> np.ndarray | DataError:
    """The image at `path` decoded, or the error that says why it cannot be."""
    try:
        return _decode(path, size)
    except DataError as err:
        return err


def _decode(path: str, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            if file.mode.startswith("I"):  # 16-bit greyscale: rescale 0..65535 to 0..255
                grey = np.asarray(file, dtype=np.float64) / 257.0
                img = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))
            else:
                img = file.convert("L" if _is_grey(file.mode) else "RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        if isinstance(err, OSError) and err.errno is not None:  # not PIL's: the file's own
            raise DataError(f"{path}: cannot read: {err.strerror}") from None
        why = str(err).replace(f" {path!r}", "").replace(f" {path}", "")  # named once, first
        raise DataError(f"{path}: cannot decode: {why}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr
