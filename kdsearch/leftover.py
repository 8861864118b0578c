"""Removing a search's scratch folder where its driver cannot: a driver ended by its Ray watch
(`os._exit`) has other threads that still write in the folder until the very end (Tune saves its
experiment state on a stop), so a removal from inside it races them. A process of its own, started
just before, waits until the driver's lock on the folder is released, removes the folder then and
again wherever it is written while the driver lives, and once the driver has ended, until nothing
writes it for a moment. A stopped search's driver removes its folder itself and hands it over too,
for what writes in it after that removal.

    python -I path/to/kdsearch/leftover.py FOLDER FD

FD: the reading end of a pipe whose writing end the driver holds until it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRIES = 5  # removals of a folder, 0.2 s apart: a dying worker may still write in it meanwhile
RELEASE_S = 120.0  # how long a remover waits for the folder's lock, and for its driver's end
POLL_S = 0.05
SETTLE_S = 2.0  # how long a handed-over folder must stay removed before its remover leaves
LEFT_S = 30.0  # how long a remover keeps removing a folder that something writes in again


def remove(folder: Path) -> None:
    """Remove `folder`, again where something wrote in it during the removal (TRIES at most)."""
    for _ in range(TRIES):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.2)


def settled(folder: Path) -> None:
    """Remove `folder` and keep it removed until nothing has written it again for SETTLE_S (a
    worker of the driver's Ray, dying of the same signal, may outlive the driver a moment and
    write in it), for LEFT_S at most."""
    end = time.monotonic() + LEFT_S
    quiet_since = time.monotonic()
    while time.monotonic() < end:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_S:
            return
        time.sleep(POLL_S)


def remove_once_released(folder: Path) -> None:
    """Start a process, in a session of its own (a second signal to this group spares it), that
    removes `folder` once no process holds its lock, again wherever something writes in it while
    this process lives, and once this process has ended, until nothing has written it for
    SETTLE_S (`settled`). Where none can be started, the next search from this host removes the
    folder (its driver is gone). It runs this file, which needs only the standard library,
    isolated (`-I`): a `kdsearch` folder in the working directory or on PYTHONPATH cannot stand
    in for it."""
    with contextlib.suppress(OSError):
        # The remover reads the pipe's end of file once this process has ended: its writing end
        # stays open here, unwritten, and the system closes it as this process ends. (Children
        # this process starts later do not inherit it: pipes are made non-inheritable.)
        ended, alive = os.pipe()
        try:
            subprocess.Popen(
                [sys.executable, "-I", __file__, str(folder), str(ended)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(ended,),
            )
        except OSError:
            os.close(alive)
            raise
        finally:
            os.close(ended)


def released(folder: Path, until: float) -> bool:
    """Wait until no process holds `folder`'s lock (or it is gone): False where it cannot be
    locked (NFS) or is still held at `until`."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # removed already (by its driver, which has let it go)
        return True
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= until:
                    return False
                time.sleep(POLL_S)
            except OSError:
                return False
    finally:
        os.close(fd)


def main(folder: Path, driver: int) -> None:
    """Remove `folder` once its lock is free, again wherever it is written while the driver
    lives (until `driver`, the pipe, reads its end), and then keep it removed (`settled`); leave
    it where it cannot be locked or is still held after RELEASE_S."""
    until = time.monotonic() + RELEASE_S
    if not released(folder, until):
        return
    while time.monotonic() < until:  # the driver's threads (Tune's) may write it until it ends
        shutil.rmtree(folder, ignore_errors=True)
        if select.select([driver], [], [], POLL_S)[0]:  # end of file: the driver has ended
            break
    settled(folder)  # its Ray's workers, dying of the same stop, may outlive it a moment


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
