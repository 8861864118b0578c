"""Removing a search's scratch folder where its driver cannot: a driver ended by its Ray watch
(`os._exit`) has other threads that still write in the folder until the very end (Tune saves its
experiment state on a stop), so a removal from inside it races them. A process of its own, started
just before, waits until the driver's lock on the folder is released (the driver has ended) and
removes the folder then. A stopped search's driver removes its folder itself and hands it over
too, for what writes in it after that removal.

    python -I path/to/kdsearch/leftover.py FOLDER
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRIES = 5  # removals of a folder, 0.2 s apart: a dying worker may still write in it meanwhile
RELEASE_S = 120.0  # how long a remover waits for the folder's lock before it leaves the folder
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
    removes `folder` once no process holds its lock (`settled`). Where none can be started, the
    next search from this host removes the folder (its driver is gone). It runs this file, which
    needs only the standard library, isolated (`-I`): a `kdsearch` folder in the working
    directory or on PYTHONPATH cannot stand in for it."""
    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-I", __file__, str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def main(folder: Path) -> None:
    """Remove `folder` once its lock is free; leave it where it cannot be locked (NFS) or is still
    held after RELEASE_S."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # removed already (by its driver, which has let it go): should something
        settled(folder)  # write in it again in a moment, removed again
        return
    try:
        end = time.monotonic() + RELEASE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= end:
                    return
                time.sleep(POLL_S)
                continue
            except OSError:
                return
            settled(folder)
            return
    finally:
        os.close(fd)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
