"""`kdsearch run`: trials on Ray Tune with ASHA, proposed by Optuna, recorded by `study.Record`.

The only module that imports Ray. The driver loads the data and prepares the teacher (and its
heads) once, puts them in Ray's object store, and starts trials that each train one recipe for
at most `asha.max_epochs`, reporting every epoch. Proposals and the record both live in the
study: `KdSearcher` asks Optuna for a trial when Tune has a free slot and tells it the outcome
itself, so a trial ASHA stopped is PRUNED (Ray's OptunaSearch would call it COMPLETE) and a
search killed half-way resumes from the database alone, without Tune's experiment checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypedDict

import numpy as np
import ray
import torch
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kdsearch.data import ImageData, Split
from kdsearch.errors import KdsearchError, KdsearchWarning, RecipeError, StudyError
from kdsearch.leftover import remove, remove_once_released
from kdsearch.losses import LOSSES
from kdsearch.models import TapModel, build_model, count_parameters
from kdsearch.paths import flocked
from kdsearch.recipe import Recipe
from kdsearch.space import SearchConfig, SearchSpace, cluster_address
from kdsearch.store import StoreConfig
from kdsearch.study.contents import METRIC
from kdsearch.study.drivers import STALE_S, process_alive
from kdsearch.study.record import Plan, Record, Tally
from kdsearch.teacher import Teacher
from kdsearch.train import EpochStats, evaluate_split, free_device_memory, resolve_device, train

Status = Callable[[Tally], None]
SCRATCH = "kdsearch-search"


@dataclass(frozen=True)
class Shared:
    """What every trial reads and nobody changes: the data as numpy arrays (the object store
    hands them to every trial on a node without copying) and the teacher's weights."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    teacher_arch: str
    teacher_state: dict[str, torch.Tensor]
    heads_state: dict[str, dict[str, torch.Tensor]]


def share(data: ImageData, teacher: Teacher | None, arch: str) -> Shared:
    """Pack the data and teacher for the object store."""
    arrays = {
        f"{name}_{part}": getattr(getattr(data, name), part).numpy()
        for name in ("train", "val", "test")
        for part in ("x", "y")
    }
    meta = {
        "name": data.name,
        "classes": data.classes,
        "hflip": data.hflip,
        "mean": data.mean,
        "std": data.std,
        "fingerprint": data.fingerprint,
    }
    return Shared(
        arrays,
        meta,
        arch,
        {} if teacher is None else host_state(teacher.model.state_dict()),
        {}
        if teacher is None
        else {n: host_state(h.state_dict()) for n, h in teacher.heads.items()},
    )


def host_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in host memory: a CUDA tensor would be rebuilt on its GPU in every trial,
    and fail on a node without one."""
    return {k: v.cpu() for k, v in state.items()}


def unshare(shared: Shared) -> tuple[ImageData, TapModel | None, dict[str, torch.nn.Module]]:
    """Data, teacher and heads back as torch objects (the data without a copy)."""
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = {k: torch.from_numpy(v) for k, v in shared.arrays.items()}
    m = shared.meta
    data = ImageData(
        m["name"],
        Split(t["train_x"], t["train_y"]),
        Split(t["val_x"], t["val_y"]),
        Split(t["test_x"], t["test_y"]),
        tuple(m["classes"]),
        m["hflip"],
        tuple(m["mean"]),
        tuple(m["std"]),
        m["fingerprint"],
    )
    if not shared.teacher_state:
        return data, None, {}
    teacher = build_model(shared.teacher_arch, data.num_classes, data.channels)
    teacher.load_state_dict(shared.teacher_state)
    heads: dict[str, torch.nn.Module] = {}
    for name, state in shared.heads_state.items():
        heads[name] = LOSSES[name].teacher_heads(teacher, data.num_classes)
        heads[name].load_state_dict(state)
    return data, teacher, heads


def run_trial(config: dict[str, Any], shared: Shared) -> None:
    """One trial: train the recipe, report every epoch; any failure is reported, not raised,
    so the driver records its reason and the search goes on."""
    torch.set_num_threads(max(1, int(config["threads"])))
    free_device_memory()  # what an earlier trial of this reused worker left cached
    started = time.perf_counter()
    # the last finished epoch and the busy time to it, for a failure's report too
    progress = {"epoch": 0.0, "train_seconds": 0.0, "eval_seconds": 0.0, "train_images": 0.0}
    with kept_warnings() as told:
        try:
            _train_trial(config, shared, started, progress, told)
            return
        except Exception as err:  # recorded as FAIL with its reason; nothing is lost
            failure = f"{type(err).__name__}: {err}"[:2000]
    # Out of the handler, the failed trial's tensors (its traceback held them) are garbage:
    # a trial out of GPU memory leaves none held for the others.
    free_device_memory()
    tune.report(
        {
            "epoch": int(progress["epoch"]) + 1,
            METRIC: float("nan"),
            "failure": failure,
            "wall_seconds": time.perf_counter() - started,
            "train_seconds": progress["train_seconds"],
            "eval_seconds": progress["eval_seconds"],
            "train_images": progress["train_images"],
            **({"warnings": said} if (said := told()) else {}),  # what led up to it, too
        }
    )


def _train_trial(
    config: dict[str, Any],
    shared: Shared,
    started: float,
    progress: dict[str, float],
    told: Callable[[], list[str]],
) -> None:
    recipe = worker_recipe(Recipe.from_yaml(config["recipe"], source=f"trial {config['number']}"))
    device = resolve_device(recipe.device).type  # what `auto` became here: the export pins it
    data, teacher, heads = unshare(shared)
    params = count_parameters(build_model(recipe.student.arch, data.num_classes, data.channels))
    busy = {"train_seconds": 0.0, "eval_seconds": 0.0, "train_images": 0.0}
    store = config.get("store")

    def report(stats: EpochStats) -> None:
        busy["train_seconds"] += stats.seconds
        busy["eval_seconds"] += stats.eval_seconds
        busy["train_images"] += round(stats.images_per_sec * stats.seconds)
        progress.update(epoch=stats.epoch, **busy)
        tune.report(
            {
                "epoch": stats.epoch,
                METRIC: stats.val_acc,
                "train_loss": stats.train_loss,
                "images_per_sec": stats.images_per_sec,
                "student_params": params,
                "threads": torch.get_num_threads(),
                "device": device,
                "wall_seconds": time.perf_counter() - started,
                **busy,
                **({"warnings": said} if (said := told()) else {}),
            }
        )

    train(
        recipe,
        data,
        report,
        teacher=teacher,
        teacher_heads=heads,
        store=None if store is None else StoreConfig(Path(store[0]), store[1], store[2]),
    )


@contextlib.contextmanager
def kept_warnings() -> Iterator[Callable[[], list[str]]]:
    """Within: kdsearch's warnings are kept, not shown, and the function given returns their
    distinct messages so far. A Ray worker's warnings reach no console (`log_to_driver` is
    off), so a trial or promotion run hands them to the driver with its results (`tell_once`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KdsearchWarning)  # each run's, not once per worker
        yield lambda: sorted(
            {str(w.message) for w in caught if issubclass(w.category, KdsearchWarning)}
        )


def tell_once(told: set[str], where: str, messages: Iterable[str]) -> None:
    """Warn in the driver of each of a run's `messages` not in `told` yet (the same warning
    comes from every run of a search: it is said once), naming the run."""
    for message in messages:
        if message not in told:
            told.add(message)
            warnings.warn(f"{where}: {message}", KdsearchWarning, stacklevel=2)


def worker_recipe(recipe: Recipe) -> Recipe:
    """The recipe as a Ray worker trains it: on the GPU Ray gave the worker, which it sees as
    `cuda` whatever `cuda:N` the recipe names, and on the CPU where Ray gave it none (`auto`
    would otherwise take GPU 0, which no one reserved)."""
    if recipe.device == "cpu" or not ray.is_initialized():
        return recipe
    if ray.get_gpu_ids():
        return recipe.override({"device": "cuda"}) if recipe.device.startswith("cuda:") else recipe
    return recipe.override({"device": "cpu"}) if recipe.device == "auto" else recipe


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
    after it. The folders this user's earlier searches driven from this host left behind
    (killed with -9, so they could not remove their own) are removed first: those no process
    holds whose process is gone or is this one (a restarted container's PID 1 before it). One
    held is another search's, even where its PID means nothing here (a container on this
    host's network sharing its /tmp). Trials on other nodes of a cluster create the same name
    there; a driver never touches a folder named after another host, whose process it cannot
    see."""
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
    try:
        with flocked(folder, wait=True):
            yield folder
    finally:
        remove(folder)


PROGRESS_S = 1.0  # how often the driver of full trainings looks for finished epochs


@dataclass(frozen=True)
class JobResult:
    """One full training run done on Ray: its curve, validation and test accuracy, weights."""

    key: str
    curve: dict[int, float]
    val_acc: float
    test_acc: float
    params: int
    seconds: float
    images_per_sec: float
    weights: dict[str, torch.Tensor] | None
    failure: str | None = None
    threads: int = 1  # CPU threads it trained with: the same weights need the same count
    warnings: tuple[str, ...] = ()  # kdsearch's warnings in the run (`kept_warnings`)
    device: str = "cpu"  # the type of the device it trained on (what `auto` became there)

    @classmethod
    def failed(
        cls, key: str, failure: str, curve: dict[int, float] | None = None, seconds: float = 0.0
    ) -> JobResult:
        """A run that ended without a student: no accuracy (NaN), the epochs it reported."""
        nan = float("nan")
        return cls(key, curve or {}, nan, nan, 0, seconds, 0.0, None, failure[:2000])


def train_job(
    key: str, recipe_yaml: str, shared: Shared, threads: float, progress: Queue | None
) -> JobResult:
    """Train one recipe to the end and score it on the test split (a promotion run); each
    epoch's validation accuracy goes to `progress` as (key, epoch, accuracy) as it ends."""
    torch.set_num_threads(max(1, int(threads)))
    used = torch.get_num_threads()
    curve: dict[int, float] = {}
    started = time.perf_counter()

    def report(stats: EpochStats) -> None:
        curve[stats.epoch] = stats.val_acc
        if progress is not None:
            with contextlib.suppress(ray.exceptions.RayError):  # a driver gone: train on
                progress.put_nowait((key, stats.epoch, stats.val_acc))

    told: Callable[[], list[str]] = list
    try:
        recipe = worker_recipe(Recipe.from_yaml(recipe_yaml, source=key))
        data, teacher, heads = unshare(shared)
        with kept_warnings() as told:
            result = train(recipe, data, report, teacher=teacher, teacher_heads=heads)
        test_acc, _ = evaluate_split(result.student, data.test, data, recipe)
        weights = {k: v.cpu() for k, v in result.student.state_dict().items()}
        return JobResult(
            key,
            curve,
            result.val_acc,
            test_acc,
            result.params,
            time.perf_counter() - started,
            result.images_per_sec,
            weights,
            threads=used,
            warnings=tuple(told()),
            device=resolve_device(recipe.device).type,
        )
    except Exception as err:  # recorded as a failed run with its reason
        failed = JobResult.failed(
            key, f"{type(err).__name__}: {err}", curve, time.perf_counter() - started
        )
        return replace(failed, threads=used, warnings=tuple(told()))


def run_jobs(
    jobs: Mapping[str, Recipe],
    data: ImageData,
    teacher: Teacher | None,
    *,
    search: SearchConfig,
    address: str | None,
    on_done: Callable[[JobResult], None],
    on_epoch: Callable[[str, int, float], None] | None = None,
) -> None:
    """Run full trainings as Ray tasks with a trial's resources, as many at once as they allow;
    `on_done` sees each result in the driver as soon as it is in, `on_epoch` each run's key,
    epoch and validation accuracy within about a second of the epoch's end."""
    own_ray = not ray.is_initialized()
    if own_ray:
        start_ray(address)
    try:
        first = next(iter(jobs.values()))
        cpu, gpu = trial_resources(
            search,
            devices={r.device for r in jobs.values()},
            precisions={r.precision for r in jobs.values()},
        )
        shared = ray.put(share(data, teacher, first.teacher.arch))
        # Epochs travel through a queue (a small actor on this node), wherever a run trains.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        progress = (
            None
            if on_epoch is None
            else Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        )

        def drain() -> None:
            if progress is None or on_epoch is None:
                return
            try:
                items = progress.get_nowait_batch(progress.qsize())
            except ray.exceptions.RayError:  # progress is shown, not needed: train on
                return
            for key, epoch, val_acc in items:
                on_epoch(key, epoch, val_acc)

        # A process per run where it holds a GPU: a reused one would keep its cached GPU
        # memory, and the GPU it first started CUDA on, for runs Ray gives another.
        # Not retried: a run whose process died (out of memory, a lost node) fails alone, as a
        # run that raised does, instead of training again from its first epoch.
        remote = ray.remote(num_cpus=cpu, num_gpus=gpu, max_calls=1 if gpu else 0, max_retries=0)(
            train_job
        )
        pending = {
            remote.remote(key, r.to_yaml(), shared, cpu, progress): key for key, r in jobs.items()
        }
        told: set[str] = set()
        lost = (
            "the promotion runs that had finished are kept, and the command again trains the "
            "others (`kdsearch run` with --resume)" + elsewhere(address)
        )
        try:
            with RayWatch(address, lost, before=lambda: None) as watch:
                while pending:
                    timeout = None if progress is None else PROGRESS_S
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
                    drain()  # a run's last epochs before its result
                    for ref in done:
                        result = job_result(ref, pending.pop(ref), watch)
                        tell_once(told, result.key, result.warnings)
                        on_done(result)
        finally:  # stopped or failed: no run trains on, no queue is left behind
            for ref in pending:
                ray.cancel(ref, force=True)
            if progress is not None:
                progress.shutdown(force=True)
    finally:
        if own_ray:
            ray.shutdown()


def job_result(ref: ray.ObjectRef[JobResult], key: str, watch: RayWatch) -> JobResult:
    """The result of the run `key` (see `train_job`), or, where its process died before it
    could return one, a failed result naming why (where it died with the Ray it ran on, the
    `watch` ends the process instead)."""
    try:
        result: JobResult = ray.get(ref)
    except ray.exceptions.RayError as err:
        if not isinstance(err, ray.exceptions.RayTaskError):  # not its own error: it died
            watch.wait_if_lost()
        cause = getattr(err, "cause", None)  # what train_job raised, where it raised
        error = cause if isinstance(cause, Exception) else err
        why = (str(error).strip().splitlines() or [""])[0]
        failure = f"{type(error).__name__}: {why}".removesuffix(": ")
        return JobResult.failed(key, failure)
    return result


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


def active_terms(space: SearchSpace) -> set[str]:
    """Terms that some trial of the space can switch on (a reachable weight above 0)."""
    return {
        name for name in LOSSES if any(w > 0 for w in space.reachable(f"distill.{name}.weight"))
    }
