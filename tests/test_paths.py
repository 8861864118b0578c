import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kdsearch import paths
from kdsearch.errors import KdsearchError
from kdsearch.paths import (
    flocked,
    placed_files,
    replaced_whole,
    run_files,
    staging_path,
    stops_deferred,
    writable_file,
    writable_folder,
)


def test_staging_paths_are_hidden_beside_their_file_and_never_shared(tmp_path: Path) -> None:
    # two writers with one PID (PID 1 in two containers sharing a cache) get two files
    first, second = staging_path(tmp_path / "t.pt"), staging_path(tmp_path / "t.pt")
    assert first != second
    assert first.parent == second.parent == tmp_path  # one file system: the move is atomic
    assert first.name.startswith(".t.pt.") and first.name.endswith(".tmp")


def test_a_held_lock_is_refused_without_waiting_and_free_once_let_go(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with flocked(lock, wait=False) as held:
        assert held is True
        with flocked(lock, wait=False) as second:
            assert second is False  # another opening of the file, as another process's
    with flocked(lock, wait=False) as again:
        assert again is True
    with flocked(tmp_path / "missing" / "x.lock", wait=False) as unopenable:
        assert unopenable is None


def test_shared_locks_are_held_together_and_keep_out_the_exclusive_one(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with (
        flocked(lock, wait=False, shared=True) as first,
        flocked(lock, wait=False, shared=True) as second,
    ):
        assert first is True and second is True
        with flocked(lock, wait=False) as exclusive:
            assert exclusive is False
    with flocked(lock, wait=False) as exclusive:
        assert exclusive is True
        with flocked(lock, wait=False, shared=True) as shared:
            assert shared is False


def test_another_users_lock_file_still_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cache folder two users share, the lock file the first made (mode 0644) cannot be
    opened for writing by the second, who went on with no lock at all."""
    lock = tmp_path / "t.lock"
    lock.touch()
    real_open = os.open

    def as_another_user(path: str, flags: int, *args: int) -> int:
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(paths.os, "open", as_another_user)
    with flocked(lock, wait=False) as held:
        assert held is True
        monkeypatch.undo()  # the first user's process, holding it meanwhile
        with flocked(lock, wait=False) as first_user:
            assert first_user is False

    def nfs(fd: int, operation: int) -> None:  # an exclusive NFS lock on a file opened to read
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(paths.fcntl, "flock", nfs)
    with flocked(lock, wait=False) as unlockable:
        assert unlockable is None, "nothing locked, as where the file cannot be opened"


def test_a_sigterm_in_a_deferred_block_reaches_its_handler_when_the_block_ends() -> None:
    heard: list[int] = []

    def mine(signum: int, _: object) -> None:
        heard.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with stops_deferred():
            signal.raise_signal(signal.SIGTERM)
            assert heard == []  # not yet
        assert heard == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is mine  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_replaced_file_is_on_disk_before_its_move_and_old_staging_files_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "t.pt"
    dead, live = staging_path(dest), staging_path(dest)  # a killed writer's, a running one's
    other = staging_path(tmp_path / "t.pt.x")  # another file's, however old
    for f in (dead, live, other):
        f.write_bytes(b"half")
    day_old = time.time() - paths.STALE_S - 60
    os.utime(dead, (day_old, day_old))
    os.utime(other, (day_old, day_old))
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        synced.append((name, dest.exists()))
        real_fsync(fd)

    monkeypatch.setattr(paths.os, "fsync", fsync)
    with replaced_whole(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole"
    # the file itself, while its name still held nothing; then the folder, after the move
    assert synced == [(tmp.name, False), (tmp_path.name, True)]
    assert not dead.exists() and live.exists() and other.exists()


def test_a_runs_files_are_placed_whole_and_never_over_another_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `kdsearch train` with one --out (or started in the same second, so one default
    name) both wrote into it, and one run's files were lost."""

    def write(text: str) -> Callable[[Path], None]:
        return lambda folder: (folder / "metrics.json").write_text(text)

    out = tmp_path / "runs" / "r"
    assert placed_files(out, write("first")) == out
    assert placed_files(out, write("second")) == tmp_path / "runs" / "r-2"
    assert placed_files(out, write("third")) == tmp_path / "runs" / "r-3"
    assert [(out.parent / n / "metrics.json").read_text() for n in ("r", "r-2", "r-3")] == [
        "first",
        "second",
        "third",
    ]
    assert [p.name for p in out.iterdir()] == ["metrics.json"], "no staging folder left behind"
    # the folder as the user gave it: made by hand, a link to one, the working folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine").chmod(0o2775)  # setgid: a shared group folder
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    assert placed_files(tmp_path / "link", write("x")) == tmp_path / "link"
    assert (tmp_path / "mine").stat().st_mode & 0o2000, "the folder itself kept"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert placed_files(Path("."), write("y")) == Path(".")
    assert placed_files(Path("."), write("z")) == tmp_path / "here-2"
    killed = tmp_path / "k" / ".kdsearch-staging-x1y2"  # a run killed while it wrote
    killed.mkdir(parents=True)
    assert run_files(tmp_path / "k") == [] and placed_files(tmp_path / "k", write("k")).name == "k"

    def full(folder: Path) -> None:
        (folder / "recipe.yaml").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        placed_files(tmp_path / "f" / "g", full)
    assert not (tmp_path / "f").exists(), "nothing left, not even the folders made for it"


def test_a_link_is_replaced_unless_it_is_to_be_followed(tmp_path: Path) -> None:
    """A cache's own file that is a link (to a share gone since) is replaced where it is; a
    user's `--out` through a link writes the link's target."""
    (tmp_path / "kept").mkdir()
    for follow in (False, True):
        link = tmp_path / f"link-{follow}"
        link.symlink_to(tmp_path / "kept" / f"t-{follow}")
        with replaced_whole(link, follow_link=follow) as tmp:
            tmp.write_text("new")
        assert link.is_symlink() == follow and link.read_text() == "new"
        assert (tmp_path / "kept" / f"t-{follow}").exists() == follow


def test_a_folder_or_file_the_user_may_not_write_is_refused_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user who is not root meets in a read-only folder (root passes every check)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.csv").touch()
    monkeypatch.setattr(paths.os, "access", lambda path, mode: Path(path).name == "locked")
    with pytest.raises(KdsearchError) as folder:
        writable_folder(tmp_path / "out" / "run", "--out")
    assert (
        str(folder.value)
        == f"--out {tmp_path}/out/run: cannot write in {tmp_path} (permission denied)"
    )
    with pytest.raises(KdsearchError) as file:
        writable_file(tmp_path / "new.csv", "--csv")
    assert (
        str(file.value)
        == f"--csv {tmp_path}/new.csv: cannot write in {tmp_path} (permission denied)"
    )
    with pytest.raises(KdsearchError) as kept:
        writable_file(locked / "old.csv", "--csv")
    assert str(kept.value) == f"--csv {locked}/old.csv: cannot write it (permission denied)"


def test_a_read_only_mount_is_said_to_be_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was said as "permission denied", which sends a user to the folder's permissions
    (root, who passes those, meets it too). The mount's flag is the one told apart here."""
    stat = os.statvfs(tmp_path)
    read_only = type("Stat", (), {"f_flag": stat.f_flag | os.ST_RDONLY})()
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)
    monkeypatch.setattr(paths.os, "statvfs", lambda path: read_only)
    with pytest.raises(KdsearchError) as folder:
        writable_folder(tmp_path / "out", "--out")
    assert (
        str(folder.value)
        == f"--out {tmp_path}/out: cannot write in {tmp_path} (read-only file system)"
    )
    (tmp_path / "old.csv").touch()
    with pytest.raises(KdsearchError) as file:
        writable_file(tmp_path / "old.csv", "--csv")
    assert (
        str(file.value)
        == f"--csv {tmp_path}/old.csv: cannot write in {tmp_path} (read-only file system)"
    )
