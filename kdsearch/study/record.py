"""How a driver writes its trials into the study.

Every trial is written from the driver process only, by `Record`: created RUNNING when it is
proposed (with its Ray trial id, driver and full recipe), and finished exactly once as COMPLETE
(it reached the trial budget), PRUNED (ASHA stopped it) or FAIL (it raised, or its loss went
non-finite; the reason is a user attribute), with one intermediate value per epoch. A trial left
RUNNING by a driver that is gone (killed, interrupted) is adopted by `kdsearch run --resume` and
run again under the same number, so the study ends with exactly the trials asked for.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import update_wrapper
from typing import Any, Concatenate, ParamSpec, TypeVar

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from kdsearch import __version__
from kdsearch.errors import KdsearchWarning, RecipeError, StorageError, StudyError
from kdsearch.recipe import Recipe
from kdsearch.space import SearchSpace, search_name_problem
from kdsearch.study.contents import (
    METRIC,
    already_held,
    changed_settings,
    machine_settings,
    not_the_promotion,
    promoted_name,
    promotion_held,
    recorded,
    study_names,
    trial_recipe,
)
from kdsearch.study.drivers import HEARTBEAT_S, driver_gone, live_drivers, this_driver
from kdsearch.study.storage import (
    password_hidden_text,
    storage_failure,
    transaction,
    write_trial,
)

MAX_CRASHES = 3  # a trial whose driver died this often is not adopted again
P = ParamSpec("P")
R = TypeVar("R")


def clear_storage_errors(
    method: Callable[Concatenate[Record, P], R],
) -> Callable[Concatenate[Record, P], R]:
    """A `Record` method whose storage failure is a `StudyError` (see `storage_failure`)."""

    def checked(record: Record, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(record, *args, **kwargs)
        except optuna.exceptions.StorageInternalError as err:
            raise storage_failure(record.storage, err) from None

    update_wrapper(checked, method)
    return checked


@dataclass
class Plan:
    """A trial to run: its number in the study and its recipe."""

    number: int
    recipe: Recipe
    adopted: bool = False  # an orphan's recorded recipe, trained again


@dataclass
class Tally:
    """What the record holds, for the live display."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    best: tuple[float, int, dict[str, Any]] | None = None  # value, number, params
    failures: list[str] = field(default_factory=list)


class Record:
    """Writes one driver's trials into a study. Not thread-safe: call it from one thread
    (`alive` writes the heartbeat from a thread of its own, and `mark_ended` may be called
    from any)."""

    @clear_storage_errors
    def __init__(
        self,
        storage: BaseStorage,
        name: str,
        space: SearchSpace,
        *,
        target: int,
        resume: bool,
    ) -> None:
        self.storage = storage
        self.space = space
        self.target = target
        self.driver = this_driver()
        self.beat_failure: StudyError | None = None  # why the heartbeat thread stopped
        self._beating = False
        self._beat_lock = threading.Lock()  # no beat lands after the mark of the end
        self._ended = False  # `mark_ended`: the process ends now
        self._claimed: set[int] = set()  # trial ids this driver runs
        self._attempts: dict[int, tuple[int, int]] = {}  # number: (trial id, attempt) it started
        names = study_names(storage)
        exists = name in names
        if not exists and (problem := search_name_problem(name)):
            raise StudyError(problem)
        if not exists and promotion_held(storage, name) is False:
            raise not_the_promotion(name)
        if not exists and promoted_name(name) in names:
            raise StudyError(
                f"study {promoted_name(name)!r} holds the promotion of an earlier search named "
                f"{name!r}, which is gone: its runs would be taken for this search's; delete it "
                f"(optuna delete-study --study-name {promoted_name(name)} --storage URL) or "
                "choose another --study name"
            )
        self.created = not exists
        self._described = False  # the study records a space (this driver's or another's)
        if exists:
            study_id = storage.get_study_id_from_name(name)
            n = len(storage.get_all_trials(study_id, deepcopy=False))
            if n and not resume:
                raise already_held(name, n)
            # Empty and without settings: another driver may be creating it this moment, or
            # preparing it (data, teacher); a study nobody prepares, or one made outside
            # kdsearch, this driver takes over. Trials without settings: another tool's study.
            found = optuna.load_study(study_name=name, storage=storage)
            if n and "space" not in found.user_attrs:
                recorded(found, "space")
            if found.directions != [optuna.study.StudyDirection.MAXIMIZE]:
                # `optuna create-study` minimizes by default: taken over as it was, TPE sought
                # the worst recipes and every ranking but kdsearch's own read upside down
                kinds = ", ".join(d.name.lower() for d in found.directions)
                raise StudyError(
                    f"study {name!r} was made to {kinds}, and kdsearch maximizes validation "
                    f"accuracy; delete it (optuna delete-study --study-name {name} --storage "
                    "URL) and make it with --direction maximize, or choose another --study name"
                )
            self._described = "space" in found.user_attrs
            changed = changed_settings(found, space) if self._described else []
            if changed and resume:
                raise StudyError(
                    f"study {name!r} was started with other settings ({'; '.join(changed)}); "
                    "resume it with the space and --set it was started with, or choose another "
                    "--study name"
                )
            beats = storage.get_study_system_attrs(study_id)
            live = live_drivers(beats)
            if changed and live:
                raise StudyError(
                    f"study {name!r} is being prepared by {live[0]} with other settings "
                    f"({'; '.join(changed)}); choose another --study name"
                )
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True
        )
        self.study_id = storage.get_study_id_from_name(name)
        storage.set_study_system_attr(self.study_id, f"joined:{self.driver}", time.time())
        # a driver of this one's name before it (a container's PID 1 again): how it ended, which
        # this driver's first beat overwrites
        self._namesake_beat = storage.get_study_system_attrs(self.study_id).get(
            f"heartbeat:{self.driver}", 0.0
        )
        self.heartbeat()
        # Drivers that start on the same study at once see the same trial count; each draws
        # from its own stream, or they would propose (and train) the same trials in pairs.
        # A driver alone keeps the stream of the count only: it draws what a search of the same
        # seed drew at that count. Past the random start-up what it draws depends on the trials
        # before, and with trials at once on which of them ASHA stopped: on who came first.
        rank = len(self._earlier_drivers())
        stream = f"sampler/{len(study.trials)}" + (f"/driver{rank}" if rank else "")
        from kdsearch.data import derive_seed  # torch: not for the commands that read a study

        seed = derive_seed(space.config.search.seed, stream) % 2**32
        sampler: optuna.samplers.BaseSampler = (
            optuna.samplers.TPESampler(seed=seed, constant_liar=True)
            if space.config.search.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=seed)
        )
        self.study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        if not self.study.trials:  # new or taken over: what it is, for drivers joining it
            self.record_settings()
        self.orphans = self._orphans() if resume else []  # as found on opening the study

    @clear_storage_errors
    def record_settings(self) -> None:
        """Record this driver's space and base recipe as the study's: at once in a study of no
        trials yet; in one resumed or joined, once this driver's data and teacher have passed
        their checks (a run refused before would leave its machine settings, say a teacher
        file that is not there, for `promote` and `export` to read). A study this driver found
        undescribed it describes in one transaction that fails where another driver has done so
        since: a driver joining then sees all the settings or none, and of two drivers with
        other settings that start on one new study at once, the second to write refuses."""
        space = self.space
        settings = {
            "space_file": space.source,
            "kdsearch_version": __version__,
            "base_recipe": space.base.to_yaml(),
            "metric": METRIC,
            "max_epochs": space.config.asha.max_epochs,
            # the mark of a kdsearch study: last, for the readers of one being rewritten
            "space": password_hidden_text(space.text, space.config.study.storage, space.source),
        }
        if self._described:
            self._write(settings)
        elif not self._describe_first(settings):
            self._join_described(settings)
        self._described = True

    def _join_described(self, settings: Mapping[str, Any]) -> None:
        """After another driver described the study first (`record_settings`): take it over
        where that driver died half-way, join it where its settings are this driver's, and
        refuse it otherwise."""
        if "space" not in self.study.user_attrs:  # a driver died writing one key at a time
            self._write(settings)
        elif changed := changed_settings(self.study, self.space):
            beats = self.storage.get_study_system_attrs(self.study_id)
            first = [d for d in live_drivers(beats) if d != self.driver]
            self.heartbeat(at=0.0)  # this driver ends here: nobody waits for it
            raise StudyError(
                f"study {self.study.study_name!r} was just started by "
                f"{first[0] if first else 'another driver'} with other settings "
                f"({'; '.join(changed)}); choose another --study name"
            )

    def _write(self, settings: Mapping[str, Any]) -> None:
        """Write `settings` as the study's user attributes, one at a time, in their order."""
        for key, value in settings.items():
            self.study.set_user_attr(key, value)

    def _describe_first(self, settings: Mapping[str, Any]) -> bool:
        """Write `settings` as the study's user attributes in one transaction, unless it holds
        one of them already: False then, and nothing written."""
        from optuna.storages._rdb.models import StudyUserAttributeModel as Attr
        from sqlalchemy import insert
        from sqlalchemy.exc import IntegrityError

        rows = [
            {"study_id": self.study_id, "key": key, "value_json": json.dumps(value)}
            for key, value in settings.items()
        ]
        try:  # (study, key) is unique: where another driver wrote first, the insert fails
            with transaction(self.storage) as connection:
                connection.execute(insert(Attr), rows)
        except IntegrityError:
            return False
        return True

    @clear_storage_errors
    def record_options(self, options: Mapping[str, Any]) -> None:
        """The space file and the options this driver's command line gave (`--trials`, `--set`,
        `--address`), the latest driver's to run trials, for `trials` to name the command that
        resumes the search."""
        self.study.set_user_attr("run_options", dict(options))

    @clear_storage_errors
    def discard_if_unused(self) -> bool:
        """Delete the study again if this driver created it, no trial was ever written in it
        and no other live driver has joined it; True when the storage then holds no study."""
        if not self.created or self.storage.get_all_trials(self.study_id, deepcopy=False):
            return False
        if self.others_alive():
            return False
        self.storage.delete_study(self.study_id)
        return not self.storage.get_all_studies()

    # -- proposing -----------------------------------------------------------------------

    @clear_storage_errors
    def next_plan(self, ray_trial_id: str) -> Plan | None:
        """The next trial for Ray: an orphan first (looked for again at each call, so that a
        driver that dies beside this one is taken over too), else a new sample while the study
        holds fewer trials than the target; None when there is nothing left to start."""
        beats: Mapping[str, Any] | None = None
        for orphan in self._orphans():
            attempt = int(orphan.user_attrs.get("attempt", 1))
            owner = orphan.user_attrs.get("driver")
            try:
                if "recipe" in orphan.user_attrs:
                    try:
                        recorded_recipe = trial_recipe(orphan)
                    except RecipeError as err:  # recorded by another kdsearch, say
                        self._give_up(orphan, f"its recorded recipe does not load: {err}")
                        continue
                    # a driver that died (its heartbeat not zeroed as a stop zeroes it) while
                    # training it, again: the trial may be what kills them
                    if beats is None:
                        beats = self.storage.get_study_system_attrs(self.study_id)
                    last = (
                        self._namesake_beat
                        if owner == self.driver
                        else beats.get(f"heartbeat:{owner}", 0.0)
                    )
                    # only an attempt that had started training: one Tune held back waiting
                    # for a free slot was not what killed its driver
                    # (absent: recorded by a kdsearch before this mark, so counted as before)
                    training = orphan.user_attrs.get("training_attempt", attempt) == attempt
                    crashes = int(orphan.user_attrs.get("crashes", 0)) + (
                        float(last) != 0.0 and training
                    )
                    if crashes >= MAX_CRASHES:
                        self.storage.set_trial_user_attr(orphan._trial_id, "crashes", crashes)
                        self._give_up(
                            orphan,
                            f"its driver died while training it {crashes} times (killed: out "
                            "of memory? a GPU fault?; or cut off from the study's storage), so "
                            "it is not tried again",
                        )
                        continue
                    # what it trains, with this machine's settings (a GPU its driver had, a
                    # data folder of its own), as a trial this driver proposes
                    here = machine_settings(self.space.base, self.space.params)
                    recipe = recorded_recipe.override(here)
                    if not self._claim(orphan._trial_id, owner):
                        continue
                    self._started(orphan, ray_trial_id, attempt + 1, recipe, crashes=crashes)
                    return Plan(orphan.number, recipe, adopted=True)
                # Its driver was killed while proposing it, so it never trained: propose it
                # again, keeping the values it had drawn (Optuna returns those), drawing the rest.
                if not self._claim(orphan._trial_id, owner):
                    continue
                plan = self._propose(Trial(self.study, orphan._trial_id), ray_trial_id, attempt)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another driver took it over and finished it since it was read
            if plan is not None:
                return plan
        while len(self.study.get_trials(deepcopy=False)) < self.target:
            trial = self.study.ask()
            if self._claim(trial._trial_id, None):
                plan = self._propose(trial, ray_trial_id, 1)
                if plan is not None:
                    return plan
        return None

    def _propose(self, trial: Trial, ray_trial_id: str, attempt: int) -> Plan | None:
        """Draw the trial's values (claimed by this driver) and record its recipe; None (and a
        FAIL trial) for a combination the recipe rejects."""
        # The same choices written otherwise (keys in another order, 1 for 1.0; by a resume, or
        # a driver beside this one) would be new labels to Optuna, which refuses them: take the
        # labels the study's trials hold by now
        self.space.labelled_as(
            {
                param: d.choices
                for t in self.study.get_trials(deepcopy=False)
                for param, d in t.distributions.items()
                if isinstance(d, optuna.distributions.CategoricalDistribution)
            }
        )
        chosen = self.space.suggest(trial)
        try:
            recipe = self.space.recipe_for(chosen)
        except RecipeError as err:  # a combination the recipe rejects: a failed trial
            self.storage.set_trial_user_attr(trial._trial_id, "failure", str(err))
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        self._started(trial, ray_trial_id, attempt, recipe)
        return Plan(trial.number, recipe)

    def _started(
        self,
        trial: Trial | FrozenTrial,
        ray_trial_id: str,
        attempt: int,
        recipe: Recipe,
        **more: Any,
    ) -> None:
        """Record what a claimed trial runs as: its Ray trial, its attempt and its recipe (and
        the attributes `more`)."""
        attrs = {
            "ray_trial_id": ray_trial_id,
            "attempt": attempt,
            "training_attempt": 0,  # not yet: Tune may hold it back for a slot (`training`)
            "recipe": recipe.to_yaml(),
        }
        write_trial(self.storage, trial._trial_id, attrs | more)
        self._attempts[trial.number] = (trial._trial_id, attempt)

    @clear_storage_errors
    def training(self, number: int) -> None:
        """Record that trial `number`'s attempt, which this driver started, has started training
        (Tune gave it a slot): should its driver die now, the trial may be what killed it."""
        trial_id, attempt = self._attempts[number]
        # not once another driver has taken it over (this one's heartbeat had stopped): the
        # attempt it trains is that driver's to mark
        write_trial(self.storage, trial_id, {"training_attempt": attempt}, driver=self.driver)

    @clear_storage_errors
    def all_started(self) -> bool:
        """Whether every trial of the target has been started (by this driver or another)."""
        held = len(self.study.get_trials(deepcopy=False))
        return held >= self.target and not self._orphans()

    def _give_up(self, orphan: FrozenTrial, why: str) -> None:
        """Record an orphan as failed, `why`, rather than train it again."""
        self.storage.set_trial_user_attr(orphan._trial_id, "failure", why)
        self.study.tell(orphan.number, state=TrialState.FAIL, skip_if_finished=True)

    def _claim(self, trial_id: int, was: Any) -> bool:
        """Make a RUNNING trial this driver's, if it still names driver `was`, the one it named
        when it was read (None: it names none, being proposed): False when another driver took it
        between that read and now, or it has finished. The driver is swapped in one
        conditional write, so of two drivers taking over one orphan at once only one wins (a
        read, then writes, let both train it and the last to finish drop the other's result)."""
        from optuna.storages._rdb.models import TrialModel
        from optuna.storages._rdb.models import TrialUserAttributeModel as Attr
        from sqlalchemy import insert, select, update
        from sqlalchemy.exc import IntegrityError

        mine = (Attr.trial_id == trial_id, Attr.key == "driver")
        running = (TrialModel.trial_id == trial_id, TrialModel.state == TrialState.RUNNING)
        value = json.dumps(self.driver)  # as Optuna writes a user attribute
        try:
            with transaction(self.storage) as connection:
                # the trial's row locked, as `write_trial` locks it: a write of this trial's
                # driver waits for the swap, and then sees it
                held = select(TrialModel.trial_id).where(*running).with_for_update()
                if connection.execute(held).first() is None:
                    return False
                if was is None:  # (trial, key) is unique: of two inserts, the second fails
                    connection.execute(
                        insert(Attr).values(trial_id=trial_id, key="driver", value_json=value)
                    )
                else:
                    swap = update(Attr).where(*mine, Attr.value_json == json.dumps(was))
                    if connection.execute(swap.values(value_json=value)).rowcount != 1:
                        return False
        except IntegrityError:
            return False
        self._claimed.add(trial_id)
        return True

    # -- finishing -----------------------------------------------------------------------

    @clear_storage_errors
    def finish(
        self,
        number: int,
        state: TrialState,
        curve: Mapping[int, float],
        attrs: Mapping[str, Any],
    ) -> None:
        """Write the trial's learning curve and attributes, then its final state, once, while
        the trial is this driver's: one that another driver has finished, or taken over since
        (this driver's heartbeat had stopped: a suspended process, a storage out of reach), is
        that driver's to record."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        trial = self.storage.get_trial(trial_id)
        if trial.state.is_finished():
            return
        owner = trial.user_attrs.get("driver")
        if owner != self.driver:
            warnings.warn(
                f"trial {number} was taken over by driver {owner} while this one ran it (this "
                "one's heartbeat had stopped for 5 minutes); its result is left to that driver",
                KdsearchWarning,
                stacklevel=2,
            )
            return
        last = max(curve, default=0)
        try:
            # the whole curve: a killed attempt's steps past this one's last would be read as
            # this attempt's (a pruned trial's value is its last step's, and TPE ranks by it)
            if not write_trial(self.storage, trial_id, attrs, curve=curve, driver=self.driver):
                return  # taken over since it was read above
            if state == TrialState.COMPLETE:
                self.study.tell(number, curve[last], skip_if_finished=True)
            else:
                self.study.tell(number, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another driver finished it as this one wrote: the first finish stands

    # -- liveness ------------------------------------------------------------------------

    @clear_storage_errors
    def heartbeat(self, at: float | None = None) -> None:
        """Tell other drivers this one is alive (they adopt its trials only once it is not);
        `at=0.0` tells them it has ended."""
        beat = time.time() if at is None else at
        self.storage.set_study_system_attr(self.study_id, f"heartbeat:{self.driver}", beat)

    @contextmanager
    def alive(self) -> Iterator[None]:
        """Keep this driver's heartbeat fresh, every HEARTBEAT_S from a thread, so through
        loading data and training a teacher as well as the trials, until the block ends; then
        mark it ended, so that other drivers adopt its trials at once. A block within another
        beats with the outer one. A beat the storage refuses stops the thread, and
        `check_beat` raises why in the driver's own thread."""
        if self._beating:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                with self._beat_lock:
                    if stop.is_set() or self._ended:  # the end was marked meanwhile
                        return
                    try:
                        self.heartbeat()
                    except Exception as err:  # told in the driver's thread, not as a trace
                        failure = err if isinstance(err, StudyError) else None
                        self.beat_failure = failure or storage_failure(self.storage, err)
                        return

        thread = threading.Thread(target=beat, name="kdsearch-heartbeat", daemon=True)
        self._beating = True
        thread.start()
        storage_works = True
        try:
            yield
        except StorageError:
            storage_works = False
            raise
        finally:
            stop.set()
            thread.join(timeout=1.0)  # a beat waiting on a busy storage is not waited for...
            self._beating = False
            if storage_works and self.beat_failure is None:
                with self._beat_lock, suppress(Exception):  # ...but it lands before the end
                    self.heartbeat(at=0.0)  # (the error that ended the block is the one to show)

    def mark_ended(self) -> None:
        """Tell other drivers at once that this one has ended, from any thread, and let no
        later beat of `alive` say otherwise: for a driver about to end its process."""
        with self._beat_lock:
            self._ended = True
            self.heartbeat(at=0.0)

    def check_beat(self) -> None:
        """Raise the storage failure that stopped the heartbeat, if one did: the trials would
        otherwise run on while other drivers take this one for gone."""
        if self.beat_failure is not None:
            raise self.beat_failure

    def _orphans(self) -> list[FrozenTrial]:
        """RUNNING trials whose driver is gone (`driver_gone`). Read at every proposal: the
        heartbeats only while some trial runs that this driver did not claim."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        others = [
            t
            for t in running
            if t._trial_id not in self._claimed or t.user_attrs.get("driver") != self.driver
        ]
        if not others:
            return []
        beats = self.storage.get_study_system_attrs(self.study_id)
        others_alive = self.others_alive(beats)
        now = datetime.now()
        # one that names this driver but that this Record did not claim: an earlier process of
        # the same host and pid left it (a container restarted: PID 1)
        return [
            t
            for t in others
            if t.user_attrs.get("driver") == self.driver or driver_gone(t, beats, others_alive, now)
        ]

    def others_alive(self, beats: Mapping[str, Any] | None = None) -> bool:
        """Whether another driver of the study is alive (by `beats`, else read now)."""
        if beats is None:
            beats = self.storage.get_study_system_attrs(self.study_id)
        return any(d != self.driver for d in live_drivers(beats))

    def _earlier_drivers(self) -> list[str]:
        """The live drivers of the study that opened it before this driver, by the time each
        wrote as it did (not by their heartbeats, which they refresh; a driver of an earlier
        kdsearch wrote none, and its first heartbeat stands in)."""
        beats = self.storage.get_study_system_attrs(self.study_id)

        def joined(driver: str) -> tuple[float, str]:
            return float(beats.get(f"joined:{driver}", beats[f"heartbeat:{driver}"])), driver

        mine = joined(self.driver)
        return [d for d in live_drivers(beats) if joined(d) < mine]

    # -- reading -------------------------------------------------------------------------

    @clear_storage_errors
    def finished_curves(self) -> dict[str, dict[int, float]]:
        """Learning curves of the study's finished trials, keyed "study#<number>", to the epoch
        each reached (an earlier kdsearch left an earlier attempt's steps past it)."""
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        return {
            f"study#{t.number}": {
                step: value
                for step, value in t.intermediate_values.items()
                if step <= int(t.user_attrs.get("epochs", step))
            }
            for t in self.study.get_trials(deepcopy=False, states=done)
        }

    @clear_storage_errors
    def tally(self) -> Tally:
        """Counts by state and the best complete trial so far."""
        t = Tally()
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state == TrialState.COMPLETE:
                t.complete += 1
                if trial.value is not None and (t.best is None or trial.value > t.best[0]):
                    t.best = (trial.value, trial.number, dict(trial.params))
            elif trial.state == TrialState.PRUNED:
                t.pruned += 1
            elif trial.state == TrialState.FAIL:
                t.failed += 1
                t.failures.append(f"#{trial.number}: {trial.user_attrs.get('failure', '?')}")
            elif trial.state == TrialState.RUNNING:
                t.running += 1
        return t
