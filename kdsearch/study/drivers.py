"""The drivers of a study: each `kdsearch run` process names itself and writes a heartbeat
into the study while it runs, so that another process can tell a search still under way from
one that was stopped, and whose RUNNING trials are left over."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT_S = 30.0  # a driver refreshes its heartbeat this often ...
STALE_S = 300.0  # ... and is presumed gone after this long without one


def heartbeats(beats: Mapping[str, Any]) -> list[str]:
    """The drivers (`this_driver`) that wrote a heartbeat into the study system attributes
    `beats`."""
    return [k.removeprefix("heartbeat:") for k in beats if k.startswith("heartbeat:")]


def searching_now(storage: BaseStorage, name: str) -> list[str]:
    """The live drivers (`driver_alive`) of study `name` in `storage` but this process: a search
    still under way elsewhere, whose best trials may yet change."""
    beats = storage.get_study_system_attrs(storage.get_study_id_from_name(name))
    return [d for d in live_drivers(beats) if d != this_driver()]


def left_running(storage: BaseStorage, name: str, trials: Sequence[FrozenTrial]) -> list[int]:
    """The numbers of `trials` of study `name` in `storage` that are RUNNING but whose driver is
    gone (`driver_gone`), left so by a search that stopped (Ctrl-C, a kill): those that
    `kdsearch run --resume` runs again."""
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if not running:
        return []
    beats = storage.get_study_system_attrs(storage.get_study_id_from_name(name))
    anyone, now = bool(live_drivers(beats)), datetime.now()
    return [t.number for t in running if driver_gone(t, beats, anyone, now)]


def live_drivers(beats: Mapping[str, Any]) -> list[str]:
    """The drivers whose heartbeats the study system attributes `beats` hold that are alive
    (`driver_alive`)."""
    return [d for d in heartbeats(beats) if driver_alive(d, beats)]


def driver_gone(
    trial: FrozenTrial, beats: Mapping[str, Any], others_alive: bool, now: datetime
) -> bool:
    """Whether the driver of RUNNING `trial` is gone (`driver_alive`, by the heartbeats
    `beats`). A trial that names no driver yet is being proposed (Optuna creates it before
    kdsearch claims it), so its driver counts as gone only once no other driver is alive
    (`others_alive`) or the trial is older than STALE_S (a proposal takes milliseconds)."""
    driver = trial.user_attrs.get("driver")
    if driver is not None:
        return not driver_alive(str(driver), beats)
    started = trial.datetime_start or now
    return not others_alive or (now - started).total_seconds() > STALE_S


@cache  # a process keeps its boot and namespace
def pid_scope() -> str:
    """Where this process's PID names this process: its machine's boot (the kernel's boot id)
    and its PID namespace, as "boot-namespace"; "" where the system names neither. Containers
    on the host's network share its name but not its PIDs, and two machines may share a name."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        ns = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return f"{boot}-{ns.removeprefix('pid:[').removesuffix(']')}"


def process_host() -> str:
    """The part of a driver's name before its PID: "host@scope" (see `pid_scope`)."""
    scope = pid_scope()
    return socket.gethostname() + (f"@{scope}" if scope else "")


def this_driver() -> str:
    """This process as a driver of studies: "host@scope:pid" (see `process_host`), so that no
    two live drivers share a name. (Earlier kdsearch wrote "host:pid", read as a process whose
    scope is unknown, so judged by its heartbeat alone; and it reads these names the same way.)"""
    return f"{process_host()}:{os.getpid()}"


def driver_alive(driver: str, beats: Mapping[str, Any]) -> bool:
    """Whether `driver` (see `this_driver`) is alive: its heartbeat in the study's system
    attributes `beats` is younger than STALE_S (a driver refreshes it while it runs,
    `Record.alive`, and zeroes it as it ends), and where this process can see its process (the
    same host, boot and PID namespace), that exists too, so that one killed there is gone at
    once. A process under a dead driver's PID is not the driver: it does not beat."""
    owner, _, pid = driver.rpartition(":")
    fresh = time.time() - float(beats.get(f"heartbeat:{driver}", 0.0)) <= STALE_S
    if owner == process_host():
        return fresh and pid.isdigit() and process_alive(int(pid))
    return fresh


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
