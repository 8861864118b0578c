"""The search itself: Tune runs the trials with ASHA, `KdSearcher` asks the study (`Record`)
for each trial's recipe and tells it the outcome, so a trial ASHA stopped is PRUNED and a search
stopped half-way resumes from the database alone."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from kdsearch.data import ImageData
from kdsearch.errors import KdsearchWarning, StudyError
from kdsearch.leftover import remove, remove_once_released
from kdsearch.losses import LOSSES
from kdsearch.paths import flocked
from kdsearch.search.cluster import RayWatch, elsewhere, machine_choices, start_ray, trial_resources
from kdsearch.search.worker import run_trial, share, tell_once
from kdsearch.space import SearchSpace
from kdsearch.study.contents import METRIC
from kdsearch.study.drivers import process_alive
from kdsearch.study.record import Plan, Record, Tally
from kdsearch.teacher import Teacher
from kdsearch.train import arithmetic, unlike

Status = Callable[[Tally], None]
SCRATCH = "kdsearch-search"


class RecordingASHA(ASHAScheduler):
    """ASHA that remembers which trials it stopped before the budget, and why trials errored:
    Tune tells a searcher neither."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float) -> None:
        super().__init__(
            time_attr="epoch",
            max_t=max_t,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            stop_last_trials=True,
        )
        self.stopped: set[str] = set()
        self.errors: dict[str, str] = {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if "failure" in result:  # a failed trial's NaN measures nothing: kept out of the rungs
            # (where, alone, it made numpy warn "All-NaN slice"); its function has returned
            return str(TrialScheduler.CONTINUE)
        decision: str = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("epoch", 0) < self._max_t:
            self.stopped.add(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if result and "failure" in result:
            self._trial_info.pop(trial.trial_id, None)  # as ASHA forgets a trial that ended
            return
        super().on_trial_complete(tune_controller, trial, result)

    def remember(self, curves: Mapping[str, Mapping[int, float]]) -> None:
        """Enter finished trials' results into the rungs they reached, so a resumed search
        prunes against the whole study, not only against the trials it runs itself: each curve
        goes through the rungs as its trial's results went live, epoch by epoch, then its last
        result once more, as Tune hands it to the scheduler when the trial ends (a result fills
        one rung at most, so with a reduction factor near 1 a rung can take a later epoch than
        the first past it, or that last result)."""
        for bracket in self._brackets:
            for key, curve in curves.items():
                trial: Any = SimpleNamespace(trial_id=key)  # all a bracket reads of a trial
                for epoch in sorted(curve):
                    if epoch < self._max_t:  # at max_t, Tune stops the trial without asking
                        bracket.on_result(trial, epoch, curve[epoch])  # its decision: taken
                if curve:
                    last = max(curve)
                    bracket.on_result(trial, last, curve[last])

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.errors[trial.trial_id] = error_line(trial)
        super().on_trial_error(tune_controller, trial)


def error_line(trial: Any) -> str:
    """The last line of the error Tune wrote for a failed `trial` (why its process died, say),
    read from the driver's own copy: Tune tells the scheduler before it copies that file to the
    trial's storage, where `trial.get_error()` looks."""
    text = ""
    with contextlib.suppress(OSError, TypeError):  # TypeError: Tune wrote none (no path)
        text = Path(trial.error_file).read_text()
    lines = text.strip().splitlines()
    return lines[-1][:500] if lines else "the trial's process failed"


class KdSearcher(Searcher):
    """Proposes trials from the study and records their outcome in it."""

    def __init__(
        self,
        record: Record,
        asha: RecordingASHA,
        threads: float,
        store: tuple[str, int, int] | None,
    ) -> None:
        super().__init__(metric=METRIC, mode="max")
        self.record = record
        self.asha = asha
        self.threads = threads
        self.store = store  # the teacher-output store's folder and budgets, or None
        self.max_epochs = record.space.config.asha.max_epochs
        self.plans: dict[str, Plan] = {}
        self.curves: dict[str, dict[int, float]] = {}
        self.latest: dict[str, dict[str, Any]] = {}  # each trial's last result
        self.interrupted: list[int] = []
        self.failure: StudyError | None = None  # the study could not be written
        self.warned: set[str] = set()  # the trials' warnings told so far
        # how the study's trials did their arithmetic (precision, oneDNN cap), to say where a
        # trial does it otherwise: a resume on another kind of machine, a mixed cluster
        self.arithmetics = {
            arithmetic(t.user_attrs["precision"], t.user_attrs.get("onednn_cap"))
            for t in record.study.trials
            if "precision" in t.user_attrs
        }
        self.watch: RayWatch | None = None  # the search's Ray, while Tune runs the trials

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self.failure is not None:  # Tune would log it and go on training trials
            raise self.failure
        plan = self.record.next_plan(trial_id)
        if plan is None:
            return Searcher.FINISHED
        self.plans[trial_id] = plan
        self.curves[trial_id] = {}
        return {
            "number": plan.number,
            "recipe": plan.recipe.to_yaml(),
            "threads": self.threads,
            "store": self.store,
        }

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self.plans:
            self._note(trial_id, self.plans[trial_id].number, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        plan = self.plans.pop(trial_id, None)
        if plan is None:
            return
        if result:
            self._note(trial_id, plan.number, result)
        curve = self.curves.pop(trial_id)
        # a process that died reports nothing at the end, and a failure reports only its
        # progress: what the trial's last epoch said of it (its parameters, device, times) stands
        last = self.latest.pop(trial_id, {}) | (result or {})
        attrs: dict[str, Any] = {"epochs": max(curve, default=0)}
        for key in (
            "wall_seconds",
            "train_seconds",
            "eval_seconds",
            "train_images",
            "images_per_sec",
            "student_params",
            "threads",
            "device",
            "precision",
            "onednn_cap",
            "warnings",
        ):
            if key in last:
                attrs[key] = last[key]
        if error and self.watch is not None:  # the process died: with the Ray, this ends here
            self.watch.wait_if_lost()
        if error or "failure" in last:
            attrs["failure"] = last.get("failure") or self.asha.errors.get(
                trial_id, "the trial failed"
            )
            state = TrialState.FAIL
        elif trial_id in self.asha.stopped:
            state = TrialState.PRUNED
        elif max(curve, default=0) >= self.max_epochs:
            state = TrialState.COMPLETE
        else:  # stopped by an interrupted search: stays RUNNING, `--resume` runs it again
            self.interrupted.append(plan.number)
            return
        try:
            self.record.finish(plan.number, state, curve, attrs)
        except StudyError as err:  # the trial stays RUNNING, for `--resume` to run again
            self.interrupted.append(plan.number)
            self.failure = self.failure or err

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the study is this searcher's whole state (see `--resume`)."""

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its searcher for an experiment restore that kdsearch does not use; the
        # database connection and the watch's thread cannot be pickled and are not needed there.
        return {k: v for k, v in self.__dict__.items() if k not in ("record", "watch")}

    def _note(self, trial_id: str, number: int, result: dict[str, Any]) -> None:
        value = result.get(METRIC)
        if trial_id in self.curves and value is not None and not math.isnan(value):
            self.curves[trial_id][int(result["epoch"])] = float(value)
            self.latest[trial_id] = result
        tell_once(self.warned, f"trial {number}", result.get("warnings", ()))
        if "precision" in result:
            how = arithmetic(result["precision"], result.get("onednn_cap"))
            if (before := unlike(self.arithmetics, how)) is not None:
                warnings.warn(
                    f"trial {number} trains {how}, and trials of the study before it trained "
                    f"{before}: the study ranks them together",
                    KdsearchWarning,
                    stacklevel=2,
                )


class Progress(tune.Callback):
    """Hands the record's tally to the display, and stops the search when the driver's
    heartbeat could not be written."""

    def __init__(self, record: Record, status: Status | None) -> None:
        self.record = record
        self.status = status
        self.last_status = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("record", "status")}

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        with contextlib.suppress(StudyError):  # the heartbeat's failure stops the search
            self.record.training(int(trial.config["number"]))

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.record.check_beat()
        now = time.monotonic()
        if self.status is not None and now - self.last_status > 1.0:
            self.status(self.record.tally())
            self.last_status = now


@dataclass(frozen=True)
class Outcome:
    """How a `run_search` call ended."""

    tally: Tally
    seconds: float
    complete: bool  # every trial this driver started has finished and none is left to start


def run_search(
    space: SearchSpace,
    record: Record,
    data: ImageData,
    teacher: Teacher | None,
    *,
    address: str | None = None,
    status: Status | None = None,
    resume: str = "--resume",
) -> Outcome:
    """Run the trials of `record` on Ray (a local instance sized to this machine, or the cluster
    at `address`) until the study holds the target number of finished trials; a storage lost
    on the way says that `resume` (the caller's command) finishes them."""
    with record.alive():  # beats with the caller's block, where it has one
        started = time.monotonic()
        # Tune's newer console output prints tables and hints even at verbose=0; kdsearch has
        # its own. Off for this search only (a caller's later Tune runs keep theirs), unless the
        # caller chose.
        quiet = "RAY_AIR_NEW_OUTPUT" not in os.environ
        if quiet:
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        own_ray = not ray.is_initialized()
        cfg = space.config
        store = cfg.search.teacher_store
        scratch_held = contextlib.ExitStack()
        try:
            if own_ray:
                start_ray(address)
            scratch = scratch_held.enter_context(scratch_folder())
            # Trials on other nodes of a cluster create the store's folder there (one per node).
            store_root = str(scratch / "teacher-outputs") if store.enabled else None
            cpu, gpu = trial_resources(cfg.search, **machine_choices(space), source=space.source)
            asha = RecordingASHA(
                cfg.asha.max_epochs, cfg.asha.grace_epochs, cfg.asha.reduction_factor
            )
            asha.remember(record.finished_curves())
            budgets = (int(store.budget_mb * 2**20), int(store.device_mb * 2**20))
            searcher = KdSearcher(
                record, asha, cpu, None if store_root is None else (store_root, *budgets)
            )
            trainable = tune.with_resources(
                tune.with_parameters(
                    run_trial, shared=share(data, teacher, space.base.teacher.arch)
                ),
                {"cpu": cpu, "gpu": gpu},
            )
            # Tune's cap on trials: the target, the trials left by drivers gone before this one
            # started, and as many again for drivers that may die beside it (their trials are
            # taken over); the study says when to stop. Past the cap, --resume finishes.
            bound = 2 * record.target + len(record.orphans)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=asha,
                    num_samples=bound,
                    max_concurrent_trials=cfg.search.concurrent,
                    metric=METRIC,
                    mode="max",
                    # A trial that ran to its end hands its worker (torch imported, threads set up)
                    # to the next one; Tune starts a fresh worker where the reset fails.
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=f"kdsearch-{os.getpid()}",
                    storage_path=str(scratch / "tune"),
                    verbose=0,
                    callbacks=[Progress(record, status)],
                    failure_config=tune.FailureConfig(max_failures=0),
                    log_to_file=False,
                ),
            )
            on_int = signal.getsignal(signal.SIGINT)
            lost = (
                "the trials it was training stay unfinished in the study, what had finished is "
                f"kept, and {resume} finishes the search"
                + (" once the cluster is back" if address else "")
                + elsewhere(address)
            )

            def leave() -> None:  # where the watch ends the process: its scratch and its end
                remove_once_released(scratch)  # Tune's thread writes in it until the end
                record.mark_ended()

            try:
                with RayWatch(address, lost, before=leave) as searcher.watch:
                    tuner.fit()
                if searcher.failure is not None:
                    raise searcher.failure
            except StudyError as err:
                kind = type(err)  # a StorageError stays one: its end is not written (`alive`)
                raise kind(
                    f"{err}; what had finished is kept, and {resume} finishes the search once the "
                    "storage works again"
                ) from None
            finally:  # Tune leaves its SIGINT handler behind, which would swallow the next stop
                if on_int is not None and threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGINT, on_int)
        finally:
            if own_ray:
                ray.shutdown()
            scratch_held.close()
            if quiet:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        # Tune stops asking once it has run `num_samples` trials, so "nothing left" is the study's
        # word, not the searcher's; a plan handed out but never finished means Tune was stopped.
        complete = record.all_started() and not searcher.plans and not searcher.interrupted
        return Outcome(record.tally(), time.monotonic() - started, complete)


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new temporary folder for this search (Tune's files, the teacher-output store), named
    after the driver's host and process, locked (`flock`) while the search runs and removed
    after it (a stopped or failed search's also by a process of its own, which removes it again
    where something writes in it later: `remove_once_released`). The folders this user's
    earlier searches driven from this host left behind (killed with -9, so they could not
    remove their own) are removed first: those no process holds whose process is gone or is
    this one (a restarted container's PID 1 before it). One held is another search's, even
    where its PID means nothing here (a container on this host's network sharing its /tmp).
    Trials on other nodes of a cluster create the same name there; a driver never touches a
    folder named after another host, whose process it cannot see."""
    owner = f"{SCRATCH}-{socket.gethostname()}"
    for old in Path(tempfile.gettempdir()).glob(f"{owner}-*-*"):
        named, pid, _ = old.name.rsplit("-", 2)
        if named != owner or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):  # another search may be removing it right now
            if old.stat().st_uid == os.getuid():
                with flocked(old, wait=False) as free:
                    if free:
                        shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{owner}-{os.getpid()}-"))
    ended = False
    try:
        with flocked(folder, wait=True):
            yield folder
        ended = True
    finally:
        remove(folder)
        if not ended:  # stopped or failed: Tune's threads, and workers Ray is still ending, may
            remove_once_released(folder)  # write in it after this removal, which lasts a moment


def active_terms(space: SearchSpace) -> set[str]:
    """Terms that some trial of the space can switch on (a reachable weight above 0)."""
    return {
        name for name in LOSSES if any(w > 0 for w in space.reachable(f"distill.{name}.weight"))
    }
