"""Where a command will write, checked before it does any work, so that a mistyped path fails at
once instead of after a training run whose result would then be lost; and the locks that
processes sharing a folder take turns by."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kdsearch.errors import KdsearchError


def writable_folder(folder: Path, option: str) -> None:
    """`folder` is a folder, or can be created as one, and can be written in."""
    if folder.is_symlink() and not folder.exists():
        raise KdsearchError(f"{option} {folder} is a link to nothing; name a folder")
    if folder.exists() and not folder.is_dir():
        raise KdsearchError(f"{option} {folder} is a file; name a folder")
    ancestor = next(p for p in (folder, *folder.parents) if p.exists())
    if not ancestor.is_dir():
        raise KdsearchError(f"{option} {folder}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise KdsearchError(f"{option} {folder}: cannot write in {ancestor} ({_refusal(ancestor)})")
    _probe(folder, f"{option} {folder}")


def _refusal(path: Path) -> str:
    """Why `path`, which `os.access` says cannot be written, cannot: a read-only mount refuses
    root too, where a folder's permissions do not."""
    with contextlib.suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return "permission denied"


def _probe(folder: Path, where: str) -> None:
    """Create `folder` and a file in it, then take both away again: permissions alone do not
    tell (root passes every check; a read-only mount or /proc refuses only the write)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise KdsearchError(f"{where}: cannot write there ({err.strerror})") from None
    finally:
        remove_empty(made)


def writable_file(path: Path, option: str) -> None:
    """`path` names a regular file, or none yet (not a folder, a device or a pipe, which the
    file written in its place would replace), in an existing folder that can be written in; a
    link is followed, as `replaced_whole(follow_link=True)` writes its target."""
    if path.is_dir():
        raise KdsearchError(f"{option} {path} is a folder; name a file")
    if path.exists() and not path.is_file():
        raise KdsearchError(
            f"{option} {path} is not a regular file (a device or a pipe); name a file"
        )
    target = path
    if path.is_symlink():
        try:
            target = path.resolve()
        except (RuntimeError, OSError):  # a loop of links: RuntimeError before Python 3.13
            raise KdsearchError(
                f"{option} {path} is a link that leads round to itself; name a file"
            ) from None
    folder = target.parent
    if not folder.is_dir():
        raise KdsearchError(f"{option} {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KdsearchError(f"{option} {path}: cannot write in {folder} ({_refusal(folder)})")
    if target.exists() and not os.access(target, os.W_OK):
        raise KdsearchError(f"{option} {path}: cannot write it ({_refusal(target)})")
    _probe(folder, f"{option} {path}")  # a read-only mount or /proc passes the checks above


@contextlib.contextmanager
def write_errors(
    where: str, then: str = "nothing was written", error: type[KdsearchError] = KdsearchError
) -> Iterator[None]:
    """An OSError while writing (or torch.save's RuntimeError, its word for a full disk) as
    one line: `where` (the option and its value), why, and `then`."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "write failed"
        raise error(f"{where}: cannot write there ({reason}); {then}") from None


# what writing to a stream whose file cannot take more says (a full disk, a quota, a device)
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def output_failure(err: OSError) -> str:
    """What a failed write of the command's output (stdout) says, in one line."""
    return f"cannot write the output: {err.strerror}"


@contextlib.contextmanager
def output_errors() -> Iterator[None]:
    """A write to stdout that fails in the block for want of room (`trials S --csv - > FILE` on
    a full disk) as one line, where it was a traceback. A reader gone (BrokenPipeError) stays
    one, for `main`'s status 141; an error naming a file is another's."""
    try:
        yield
    except OSError as err:
        if isinstance(err, BrokenPipeError) or err.filename is not None or err.errno not in FULL:
            raise
        raise KdsearchError(output_failure(err)) from None


@contextlib.contextmanager
def flocked(path: Path, *, wait: bool, shared: bool = False) -> Iterator[bool | None]:
    """Hold the lock of `path` (a folder, or a file, made if missing; released when the process
    dies, too): True when this process got it; without `wait`, False at once when another
    process holds it; None when `path` cannot be opened (a full or read-only folder), so that
    nothing is locked. A `shared` lock is held by any number of processes at once, and keeps out
    the one lock that is not."""
    try:
        try:
            fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_CREAT | os.O_RDWR, 0o644)
        except PermissionError:  # another user's lock file in a shared cache: flock needs no write
            fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield None
        return
    try:
        try:
            kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            fcntl.flock(fd, kind | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:  # NFS, whose locks need a file open for writing: nothing is locked
            yield None
            return
        yield True
    finally:
        os.close(fd)


def staging_path(dest: Path) -> Path:
    """Where `dest` is written before it is moved into place: beside it (one file system, so the
    move is atomic), hidden, and unique to this writer. The PID alone is not: two containers'
    PID 1 sharing a cache folder would write one file."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def staged_for(path: Path) -> str | None:
    """The name of the file that `path`, a staging file (`staging_path`), was written for; None
    where it is none (earlier versions named them without the random part)."""
    found = re.fullmatch(r"\.(.+)\.\d+(-[0-9a-f]+)?\.tmp", path.name)
    return None if found is None else found.group(1)


STALE_S = 24 * 3600  # a staging file this old belongs to a writer that was killed


@contextlib.contextmanager
def replaced_whole(dest: Path, *, follow_link: bool = False) -> Iterator[Path]:
    """A staging path to write `dest` to, moved into place when the block ends without error and
    removed otherwise (a Ctrl-C too): no reader sees half a file, and none is left behind. The
    file is on disk before the move (a power loss leaves the old file or the new one, never an
    empty one under the name), and staging files of `dest` that a killed writer left over a day
    ago are removed first (a decoded data set's are hundreds of MB). With `follow_link`, a
    link has its target replaced and is kept (a user's `--out` through a link; `writable_file`
    has refused a loop); without, a link is replaced (a cache's own files)."""
    if follow_link and dest.is_symlink():
        dest = dest.resolve()
    for left in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if staged_for(left) == dest.name and time.time() - left.stat().st_mtime > STALE_S:
                left.unlink()
    tmp = staging_path(dest)
    try:
        yield tmp
        moved_into_place([(tmp, dest)])
    finally:
        tmp.unlink(missing_ok=True)


def moved_into_place(moves: list[tuple[Path, Path]]) -> None:
    """Move each written file (source, destination) into place, in order: every source on disk
    first (a power loss leaves the old files or the new ones, never an empty one under the name),
    all the moves or, for a Ctrl-C or SIGTERM in between, all of them before it takes effect,
    and then the folders' entries on disk too."""
    for source, _ in moves:
        with open(source, "rb") as written:
            os.fsync(written.fileno())
    with stops_deferred():
        for source, dest in moves:
            shutil.move(source, dest)
    for folder in {dest.parent for _, dest in moves}:
        _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """Put a folder's entries (a rename into it) on disk, where its file system allows."""
    with contextlib.suppress(OSError):  # some file systems refuse a folder's fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


STAGING = ".kdsearch-staging-"  # the hidden folder a run writes its files in before moving them


def run_files(folder: Path) -> list[str]:
    """The names in `folder`, but the staging folder of a run killed while it wrote there."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(STAGING))


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove the `folders` a command made (deepest first) that are empty; one that holds
    something stays, and so do those above it."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def placed_files(out: Path, write: Callable[[Path], None]) -> Path:
    """Have `write` fill a hidden folder inside `out`, then move its files into `out` (a write
    that fails or is interrupted leaves none of them, nor the folders made for them); where `out`
    holds files by then (another run given the same folder, or the same second's default name),
    into the first of `out-2`, `out-3`, ... made anew: no run's files overwrite another's.
    Returns the folder they are in."""
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
        try:
            write(staged)
            dest = _beside(out) if run_files(out) else out
            moved_into_place([(file, dest / file.name) for file in sorted(staged.iterdir())])
            return dest
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    except BaseException:
        remove_empty(made)
        raise


def _beside(out: Path) -> Path:
    """A new folder `out-2` (or -3, ...), made here, so no other run takes it meanwhile."""
    base = out.resolve()
    n = 2
    while True:
        try:
            (folder := base.with_name(f"{base.name}-{n}")).mkdir()
            return folder
        except FileExistsError:
            n += 1


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that come during the block take effect when it ends, for steps that
    must happen all or none (moving an export's files into place). In the main thread only,
    where Python runs signal handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _: caught.append(signum)) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in caught:
            signal.raise_signal(signum)  # to the handler it would have reached
