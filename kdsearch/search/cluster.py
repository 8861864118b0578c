"""Ray itself: starting a local instance sized to this machine or joining a cluster, what a
trial may ask of its nodes, and a watch that ends the command with one clear line where the
Ray it runs on is lost."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TypedDict

import ray
import torch

from kdsearch.errors import KdsearchError, RecipeError
from kdsearch.space import SearchConfig, SearchSpace, cluster_address
from kdsearch.study.drivers import STALE_S


def local_resources() -> list[dict[str, float]]:
    """What the local Ray that `start_ray` starts will have: one node with every CPU this
    process may use and every visible GPU."""
    return [{"CPU": float(usable_cpus()), "GPU": float(torch.cuda.device_count())}]


def usable_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's or `taskset`'s share of the machine),
    where the system says; else every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected Ray."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]


def trial_resources(
    search: SearchConfig,
    nodes: Sequence[Mapping[str, float]] | None = None,
    *,
    devices: Collection[str] = ("auto",),
    precisions: Collection[str] = (),
    source: str = "",
) -> tuple[float, float]:
    """CPUs and GPUs of one trial on a cluster of `nodes`, by default the connected Ray's
    (`gpu: auto`: an equal share of a GPU, as many to a GPU as `concurrent` trials need, where
    there are GPUs); a request no node can meet, or a CUDA device or fp16 among the `devices`
    and `precisions` trials may take for trials given no GPU, is refused at once, since Tune and
    Ray would wait forever for the one and the trials would fail on the other. `source`: the
    space file the search settings came from, to name in the error."""
    file = f"{source}: " if source else ""
    if nodes is None:
        nodes = cluster_nodes()
    gpus = sum(float(node.get("GPU", 0.0)) for node in nodes)
    per_trial = search.per_trial
    if per_trial.gpu == "auto":  # 1/k of a GPU, k the trials each must hold for `concurrent`
        gpu = 1.0 / math.ceil(search.concurrent / gpus) if gpus else 0.0
    else:
        gpu = per_trial.gpu
    for kind, wanted in (("cpu", per_trial.cpu), ("gpu", gpu)):
        most = max((float(node.get(kind.upper(), 0.0)) for node in nodes), default=0.0)
        if wanted > most:
            where = "the Ray cluster has" if len(nodes) == 1 else "its largest Ray node has"
            raise RecipeError(
                f"{file}search.per_trial.{kind} is {wanted:g}, but {where} {most:g} {kind.upper()}s"
            )
    if not any(
        node.get("CPU", 0.0) >= per_trial.cpu and node.get("GPU", 0.0) >= gpu for node in nodes
    ):
        raise RecipeError(
            f"{file}search.per_trial is {per_trial.cpu:g} CPUs with {gpu:g} GPUs, but no Ray node "
            "has both"
        )
    why = "search.per_trial.gpu is 0" if gpus else "the Ray cluster has no GPU"
    if gpu == 0 and (cuda := [d for d in devices if d.startswith("cuda")]):
        raise RecipeError(f"device: {cuda[0]}, but trials get no GPU ({why}); use auto or cpu")
    if gpu == 0 and "fp16" in precisions:
        raise RecipeError(
            f"precision: fp16 needs CUDA, but trials get no GPU ({why}); use bf16 or fp32"
        )
    return per_trial.cpu, gpu


class MachineChoices(TypedDict):
    devices: list[str]
    precisions: list[str]


def machine_choices(space: SearchSpace) -> MachineChoices:
    """The devices and precisions a trial of `space` may train with (`trial_resources`)."""
    return {
        "devices": [str(v) for v in space.reachable("device")],
        "precisions": [str(v) for v in space.reachable("precision")],
    }


CONNECT_S = 10  # how long a cluster's address may take to accept a connection


def start_ray(address: str | None) -> None:
    """A local Ray sized to this machine, or a connection to the cluster at `address`."""
    if address is not None:
        check_answers(address)
    # Ray's core installs its own SIGTERM handler in this process, which prints a crash report
    # and kills it; keep the one the caller had (the CLI's stops the search as Ctrl-C does).
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(
            # "local": a Ray of its own; None would join the Ray whose address `ray start` left
            # in Ray's temp folder (and refuse num_cpus there), even one long dead
            address=address or "local",
            num_cpus=None if address else usable_cpus(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError) as err:
        raise KdsearchError(f"cannot join the Ray cluster at {address}: {err}") from None
    except SystemExit as exit_:  # Ray's own SIGTERM handler, while it starts: a stop
        if exit_.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    finally:
        if callable(on_term) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)


def stop_ray() -> None:
    """Leave the Ray this process started or joined (`start_ray`)."""
    ray.shutdown()


WATCH_S = 2.0  # how often a search or promotion checks that its Ray still answers
STOPPING_S = 0.05  # how often once a SIGTERM came: Ray may end the process itself in moments
STOPPED_S = 1.0  # how long a block a SIGTERM ended waits to see whether the GCS went with it
BEFORE_S = 5.0  # how long a RayWatch waits for its caller's last record


def ray_patience_s() -> float:
    """How long Ray waits for its lost GCS (a cluster's head, a local Ray's own) before it ends
    the process: its `gcs_rpc_server_reconnect_timeout_s`, 60 s unless the environment says
    otherwise as Ray reads it."""
    name = "RAY_gcs_rpc_server_reconnect_timeout_s"  # Ray's spelling, not upper case
    with contextlib.suppress(ValueError):
        return float(os.environ.get(name, "60"))
    return 60.0


class RayWatch:
    """Ends this process cleanly where the Ray it runs on is lost. Ray itself waits
    `ray_patience_s()` for its GCS and then ends the process with status 1, its own tracebacks
    and no word of what is kept; a watch checks every WATCH_S, from a thread, that something
    accepts connections at the GCS address, and once nothing has for half that time it calls
    `before` (what the caller must record first; given BEFORE_S at most), says
    `kdsearch: error:` what was lost and `then` (what is kept, what to run), and exits with
    status 2. A SIGTERM to the whole process group (GNU timeout, SLURM) stops Ray's processes
    with the driver: once one has come, the watch checks every STOPPING_S, and a silent GCS
    ends the process at once, as interrupted (status 130), instead of after that wait. The
    watch hears of a SIGTERM through Python's wakeup file descriptor, written by the signal
    handler in C at once: the Python handler runs only once the main thread is back in
    Python, which a call into a Ray that is gone may never return from."""

    def __init__(self, address: str | None, then: str, before: Callable[[], None]) -> None:
        host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
        self.where = (host.strip("[]"), int(port))
        self.what = f"the Ray cluster at {address}" if address else "this machine's Ray"
        self.then = then
        self.before = before
        self._stop = threading.Event()
        self._ending = threading.Lock()  # the watch's thread or the caller's: one line, one exit
        self._thread = threading.Thread(target=self._watch, name="kdsearch-ray-watch", daemon=True)
        self.stopped = threading.Event()  # a SIGTERM came while the watch was on
        # the signals' numbers as the C handler writes them, and a 0 from `__exit__`
        self._heard, self._told = os.pipe()
        for fd in (self._heard, self._told):
            os.set_blocking(fd, False)
        self._wakeup: int | None = None  # the wakeup fd before this watch's, where it set one

    def __enter__(self) -> RayWatch:
        if threading.current_thread() is threading.main_thread():
            self._wakeup = signal.set_wakeup_fd(self._told, warn_on_full_buffer=False)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        # raised for want of the Ray, perhaps; or stopped, where a group SIGTERM ends the
        # GCS a moment after the driver heard it (left before, Ray's shutdown waited ~10 s)
        if kind is not None:
            self._listen(0)  # a SIGTERM that no thread has read yet
            if self._goes_silent(STOPPED_S if self.stopped.is_set() else 0):
                self._wait_while_silent(time.monotonic())
        self._stop.set()
        os.write(self._told, b"\0")
        self._thread.join()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._wakeup)
        os.close(self._heard)
        os.close(self._told)

    def answers(self) -> bool:
        """Whether something accepts a connection at the GCS address now."""
        return refusal(self.where, WATCH_S) is None

    def wait_if_lost(self) -> None:
        """Asked where a trial's or a run's process died, before that is recorded as its
        failure: where the GCS stops answering within 2 x WATCH_S (`ray stop` kills the workers
        before the head), wait until it answers again, and return, or until the watch's time
        is up, and end the process as the watch does. (The caller must not go on meanwhile:
        a search or promotion whose last runs died with the Ray would end as if they had
        failed, and leave the watch.)"""
        if self._goes_silent(2 * WATCH_S):
            self._wait_while_silent(time.monotonic())

    def _goes_silent(self, within: float) -> bool:
        """Whether the GCS stops answering within `within` seconds (or does not now)."""
        end = time.monotonic() + within
        while self.answers():
            if time.monotonic() >= end:
                return False
            self._listen(STOPPING_S)
        return True

    def _listen(self, timeout: float) -> None:
        """Wait up to `timeout` for a signal (or `__exit__`); a SIGTERM sets `stopped`. The
        numbers go on to the wakeup fd that was there before, if any."""
        ready, _, _ = select.select([self._heard], [], [], timeout)
        if not ready:
            return
        with contextlib.suppress(BlockingIOError):  # the other thread read them first
            heard = os.read(self._heard, 512)
            if signal.SIGTERM in heard:
                self.stopped.set()
            if self._wakeup is not None and self._wakeup >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wakeup, heard.replace(b"\0", b""))

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._listen(STOPPING_S if self.stopped.is_set() else WATCH_S)
            if not self._stop.is_set() and not self.answers():
                self._wait_while_silent(time.monotonic(), self._stop)

    def _wait_while_silent(self, since: float, stop: threading.Event | None = None) -> None:
        """Return once the GCS answers again (or `stop` is set); end the process where it has
        not for half of Ray's patience since `since`."""
        while not self.answers():
            silent = time.monotonic() - since
            if self.stopped.is_set() or silent >= ray_patience_s() / 2:
                self._give_up(silent)
            if stop is not None and stop.is_set():
                return
            self._listen(WATCH_S / 4)

    def _give_up(self, silent: float) -> None:
        with self._ending:  # never released: the process ends here
            marked = threading.Thread(target=self.before, daemon=True)  # a storage on the lost
            marked.start()  # machine may not answer either: waited for BEFORE_S at most
            marked.join(BEFORE_S)
            unmarked = (
                " (this driver's end could not be written to the study: other drivers take its "
                f"trials over once its heartbeat is {STALE_S / 60:.0f} minutes old)"
                if marked.is_alive()
                else ""
            )
            host, port = self.where
            if self.stopped.is_set():
                line, status = f"kdsearch: interrupted, and {self.what} with it; ", 130
            else:
                line, status = (
                    f"kdsearch: error: {self.what} stopped answering (nothing at its GCS "
                    f"address {host}:{port} for {silent:.0f} s); ",
                    2,
                )
            try:  # past any live display, which may hold a lock
                os.write(2, f"{line}{self.then}{unmarked}\n".encode())
            finally:  # a closed stderr (`... 2>&1 | head`) ends the process all the same
                os._exit(status)


def elsewhere(address: str | None) -> str:
    """How to go on without the lost cluster at `address` (a RayWatch's `then`)."""
    return " (or, without --address, on this machine)" if address else ""


def check_answers(address: str) -> None:
    """Refuse a `host:port` where nothing accepts a connection: Ray
    itself would retry it without end. (`auto` Ray resolves, and refuses, on its own.)"""
    try:
        where = cluster_address(address)
    except ValueError as err:
        raise KdsearchError(f"--address: {err}") from None
    if where is not None and (refused := refusal(where, CONNECT_S)) is not None:
        reason = refused.strerror or type(refused).__name__
        raise KdsearchError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({reason}); "
            "`ray status` on the head node prints its address"
        )


def refusal(where: tuple[str, int], timeout: float) -> OSError | None:
    """Why nothing accepted a TCP connection at `where` within `timeout`; None where
    something did."""
    try:
        socket.create_connection(where, timeout=timeout).close()
    except OSError as err:
        return err
    return None
