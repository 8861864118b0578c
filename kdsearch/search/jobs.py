"""Full trainings on Ray (a promotion's runs): as many at once as a trial's resources allow,
each epoch shown as it ends, a run whose process died failing alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ray
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kdsearch.data import ImageData
from kdsearch.recipe import Recipe
from kdsearch.search.cluster import RayWatch, elsewhere, start_ray, trial_resources
from kdsearch.search.worker import JobResult, share, tell_once, train_job
from kdsearch.space import SearchConfig
from kdsearch.teacher import Teacher

PROGRESS_S = 1.0  # how often the driver of full trainings looks for finished epochs


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
