from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from contextlib import closing
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState
from sqlalchemy import DateTime, column, make_url, text
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.base import SQLiteDialect

from kdsearch.errors import KdsearchError, KdsearchWarning, StorageError, StudyError
from kdsearch.space import SearchSpace
from kdsearch.study.contents import ranked, space_config, study_names, trial_recipe
from kdsearch.study.drivers import STALE_S, driver_alive, pid_scope
from kdsearch.study.record import Record
from kdsearch.study.storage import (
    check_driver,
    check_writes,
    holds_no_study,
    holds_studies,
    open_storage,
    redact,
    sqlite_file,
    storage_place,
    trials_held,
    write_trial,
)

POSTGRES = os.environ.get("KDSEARCH_TEST_POSTGRES")
SPACE = """
study: {name: s}
base:
  data: {dataset: digits}
  teacher: {arch: resnet8}
  student: {arch: resnet8}
  distill: {hsakd: {weight: 1.0}}
space:
  optim.lr: {type: float, low: 0.01, high: 0.2, log: true}
  distill.hsakd.placement: {type: categorical, choices: [[1, 2, 3], [3]]}
asha: {max_epochs: 4, grace_epochs: 1, reduction_factor: 2}
"""


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.from_yaml(SPACE, source="s.yaml")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/s.db"


@pytest.fixture
def beating(space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch) -> Record:
    """A new driver of study "s" whose `alive` beats every 0.05 s."""
    monkeypatch.setattr("kdsearch.study.record.HEARTBEAT_S", 0.05)
    return Record(open_storage(url), "s", space, target=2, resume=False)


def test_trials_are_proposed_until_the_target_and_finished_once(
    space: SearchSpace, url: str
) -> None:
    record = Record(open_storage(url), "s", space, target=3, resume=False)
    plans = [record.next_plan(f"ray{i}") for i in range(4)]
    assert [p.number for p in plans[:3] if p] == [0, 1, 2] and plans[3] is None
    assert plans[0] is not None and plans[0].recipe.schedule.epochs == 4
    record.finish(0, TrialState.COMPLETE, {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}, {"epochs": 4})
    record.finish(1, TrialState.PRUNED, {1: 0.3}, {"epochs": 1})
    record.finish(2, TrialState.FAIL, {}, {"epochs": 1, "failure": "NonFiniteLoss: nan"})
    record.finish(0, TrialState.FAIL, {}, {})  # a second finish changes nothing
    study = optuna.load_study(study_name="s", storage=url)
    t0, t1, t2 = study.trials
    assert (t0.state, t0.value, t0.intermediate_values) == (
        TrialState.COMPLETE,
        0.8,
        {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8},
    )
    assert (t1.state, t1.value) == (TrialState.PRUNED, 0.3)
    assert t2.state == TrialState.FAIL and t2.user_attrs["failure"] == "NonFiniteLoss: nan"
    assert t0.user_attrs["ray_trial_id"] == "ray0" and t0.user_attrs["attempt"] == 1
    assert trial_recipe(t0) == plans[0].recipe
    assert study.user_attrs["space"] == SPACE and study.user_attrs["max_epochs"] == 4
    assert [t.number for t in ranked(study.trials)] == [0]
    tally = record.tally()
    assert (tally.complete, tally.pruned, tally.failed, tally.running) == (1, 1, 1, 0)
    assert tally.best is not None and tally.best[:2] == (0.8, 0)


def _count_writes(storage: BaseStorage) -> list[int]:
    """A counter, in a one-item list, of the transactions that write to `storage`'s database
    (a read's commit costs no wait for the disk)."""
    from sqlalchemy import event

    assert isinstance(storage, RDBStorage)
    writes, wrote = [0], set()

    def executed(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            wrote.add(id(connection))

    def committed(connection: Any) -> None:
        if id(connection) in wrote:
            wrote.discard(id(connection))
            writes[0] += 1

    event.listen(storage.engine, "before_cursor_execute", executed)
    event.listen(storage.engine, "commit", committed)
    return writes


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_trials_attributes_and_curve_are_one_write_that_reads_as_optunas_own(
    url: str, backend: str
) -> None:
    """Optuna commits every attribute and every epoch on its own, and on SQLite each commit
    waits for the disk: finishing a trial took 16 write transactions, a third of the study's
    time per trial in a search of short trials."""
    if backend == "postgresql":
        if not POSTGRES:
            pytest.skip("set KDSEARCH_TEST_POSTGRES to a PostgreSQL URL (.ci/run does)")
        url = POSTGRES
    storage = open_storage(url)
    study = optuna.create_study(study_name=f"w-{uuid.uuid4().hex[:8]}", storage=storage)
    by_optuna, by_kdsearch = study.ask(), study.ask()
    attrs = {"epochs": 3, "device": "cpu", "seconds": 1.5, "warnings": ["a", "b"], "cap": ""}
    curve = {1: 0.25, 2: 0.5, 3: float("inf")}
    for key, value in attrs.items():
        storage.set_trial_user_attr(by_optuna._trial_id, key, value)
    for epoch, value in curve.items():
        storage.set_trial_intermediate_value(by_optuna._trial_id, epoch, value)
    storage.set_trial_user_attr(by_kdsearch._trial_id, "epochs", 7)  # an earlier attempt's
    storage.set_trial_intermediate_value(by_kdsearch._trial_id, 7, 0.9)
    writes = _count_writes(storage)
    write_trial(storage, by_kdsearch._trial_id, attrs, curve=curve)
    assert writes == [1]
    ours, optunas = storage.get_trial(by_kdsearch._trial_id), storage.get_trial(by_optuna._trial_id)
    assert ours.user_attrs == optunas.user_attrs == attrs
    assert ours.intermediate_values == optunas.intermediate_values == curve, "epoch 7 is gone"
    write_trial(storage, by_kdsearch._trial_id, {"seconds": 2.0})  # the curve is left alone
    ours = storage.get_trial(by_kdsearch._trial_id)
    assert ours.user_attrs["seconds"] == 2.0 and ours.intermediate_values == curve
    study.tell(by_kdsearch, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        write_trial(storage, by_kdsearch._trial_id, {"epochs": 4})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_writers_of_one_trial_take_turns(url: str, backend: str) -> None:
    """On PostgreSQL the second writer's delete missed the first's new rows, and its insert
    broke their unique key: a raw IntegrityError out of the search. It now waits for the
    trial's row, and then replaces what the first wrote."""
    from optuna.storages._rdb.models import TrialModel
    from optuna.storages._rdb.models import TrialUserAttributeModel as Attr
    from sqlalchemy import insert, select

    if backend == "postgresql":
        if not POSTGRES:
            pytest.skip("set KDSEARCH_TEST_POSTGRES to a PostgreSQL URL (.ci/run does)")
        url = POSTGRES
    storage = open_storage(url)
    assert isinstance(storage, RDBStorage)
    study = optuna.create_study(study_name=f"w-{uuid.uuid4().hex[:8]}", storage=storage)
    trial_id = study.ask()._trial_id
    done: dict[str, object] = {}

    def second() -> None:
        try:
            done["wrote"] = write_trial(storage, trial_id, {"k": "second"})
        except Exception as err:
            done["failed"] = err

    # a writer halfway through, as write_trial writes
    with storage.engine.connect() as first, first.begin():
        row = select(TrialModel.state).where(TrialModel.trial_id == trial_id)
        first.execute(row.with_for_update())
        first.execute(insert(Attr).values(trial_id=trial_id, key="k", value_json='"first"'))
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the second writes once the first has committed"
    thread.join(30)
    assert done == {"wrote": True}
    assert storage.get_trial(trial_id).user_attrs == {"k": "second"}


def test_a_driver_whose_trial_was_taken_over_marks_nothing_in_it(
    space: SearchSpace, url: str
) -> None:
    """A driver thought gone (suspended for 5 minutes) that woke as Tune gave the trial a slot
    wrote its own attempt into the trial another driver had adopted since: had that driver then
    died training it, its death went uncounted."""
    storage = open_storage(url)
    record = Record(storage, "s", space, target=1, resume=False)
    assert record.next_plan("r0") is not None
    trial_id = storage.get_trial_id_from_study_id_trial_number(record.study_id, 0)
    _own(storage, record.study_id, 0, "elsewhere:42")  # adopted: its second attempt, training
    storage.set_trial_user_attr(trial_id, "attempt", 2)
    storage.set_trial_user_attr(trial_id, "training_attempt", 2)
    record.training(0)
    assert storage.get_trial(trial_id).user_attrs["training_attempt"] == 2
    assert not write_trial(storage, trial_id, {"x": 1}, driver=record.driver)
    assert write_trial(storage, trial_id, {"x": 1}, driver="elsewhere:42")
    assert storage.get_trial(trial_id).user_attrs["x"] == 1


def test_a_trials_writes_do_not_grow_with_its_epochs_or_attributes(
    space: SearchSpace, url: str
) -> None:
    """Proposing a trial writes its creation, its claim, one write per parameter (Optuna's
    `suggest`) and what it runs as; training it, one mark; finishing it, its curve and
    attributes in one write and its state in another, however long the curve."""
    storage = open_storage(url)
    record = Record(storage, "s", space, target=2, resume=False)
    writes = _count_writes(storage)
    for number, epochs in ((0, 1), (1, 4)):
        before = writes[0]
        plan = record.next_plan(f"r{number}")
        assert plan is not None and plan.number == number
        assert writes[0] - before == 3 + len(space.params), "create, claim, params, started"
        record.training(number)
        assert writes[0] - before == 4 + len(space.params)
        curve = {epoch: 0.1 * epoch for epoch in range(1, epochs + 1)}
        attrs = {f"attr{i}": i for i in range(11)}
        state = TrialState.COMPLETE if epochs == 4 else TrialState.PRUNED
        record.finish(number, state, curve, attrs)
        assert writes[0] - before == 6 + len(space.params)
    assert [t.intermediate_values for t in record.study.trials] == [{1: 0.1}, curve]


def test_a_trial_trained_again_is_valued_at_its_own_last_epoch_not_an_earlier_attempts(
    space: SearchSpace, url: str
) -> None:
    """A driver that stopped while writing a trial's curve (killed, or a write refused) left
    epochs 1-4 of it; trained again on --resume and pruned at epoch 1, the trial was PRUNED at
    the old epoch 4's value (Optuna values a pruned trial at its last step), and that old curve
    went into a later resume's ASHA rungs."""
    storage = open_storage(url)
    record = Record(storage, "s", space, target=2, resume=False)
    assert record.next_plan("r0") is not None
    trial_id = storage.get_trial_id_from_study_id_trial_number(record.study_id, 0)
    for epoch, value in {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}.items():  # the first attempt's
        storage.set_trial_intermediate_value(trial_id, epoch, value)
    record.finish(0, TrialState.PRUNED, {1: 0.3}, {"epochs": 1})
    trial = storage.get_trial(trial_id)
    assert (trial.state, trial.value) == (TrialState.PRUNED, 0.3)
    assert trial.intermediate_values == {1: 0.3}, "TPE ranks a pruned trial by its last step"
    assert record.finished_curves() == {"study#0": {1: 0.3}}
    # the usual case, no steps of an earlier attempt, is Optuna's own `tell`
    assert record.next_plan("r1") is not None
    record.finish(1, TrialState.PRUNED, {1: 0.2, 2: 0.4}, {"epochs": 2})
    assert record.study.trials[1].value == 0.4
    assert record.finished_curves()["study#1"] == {1: 0.2, 2: 0.4}


def test_a_placement_is_stored_as_text_and_recorded_as_a_list(space: SearchSpace, url: str) -> None:
    record = Record(open_storage(url), "s", space, target=6, resume=False)
    plans = [record.next_plan(str(i)) for i in range(6)]
    stored = {t.number: t.params for t in record.study.trials}
    for plan in plans:
        assert plan is not None
        text = stored[plan.number]["distill.hsakd.placement"]
        assert text in ("[1, 2, 3]", "[3]")
        assert plan.recipe.distill.hsakd.placement == json.loads(text)


def test_an_existing_study_needs_resume(space: SearchSpace, url: str) -> None:
    record = Record(open_storage(url), "s", space, target=2, resume=False)
    record.next_plan("a")
    with pytest.raises(StudyError, match="already holds 1 trials; add --resume"):
        Record(open_storage(url), "s", space, target=2, resume=False)
    assert Record(open_storage(url), "s", space, target=2, resume=True).target == 2


def test_trials_held_counts_a_study_s_trials_without_writing(
    space: SearchSpace, url: str, tmp_path: Path
) -> None:
    """What `kdsearch run` reads to refuse the same search again before torch and Ray load."""
    record = Record(open_storage(url), "s", space, target=3, resume=False)
    record.next_plan("a")
    record.next_plan("b")
    file = sqlite_file(url)
    assert file is not None
    before = file.read_bytes()
    assert trials_held(file, "s") == 2
    assert trials_held(file, "s-other") == 0  # no such study
    assert file.read_bytes() == before
    (tmp_path / "notes.db").write_text("not a database\n")
    assert trials_held(tmp_path / "notes.db", "s") is None  # for the real open to refuse
    sqlite3.connect(tmp_path / "empty.db").close()
    assert trials_held(tmp_path / "empty.db", "s") is None  # no Optuna tables


def test_a_search_named_as_one_whose_promotion_outlived_it_is_refused(
    space: SearchSpace, url: str
) -> None:
    """`optuna delete-study s` leaves s-promoted: a new search named s would have had trial N's
    promoted runs taken for its own trial N, never trained again."""
    optuna.create_study(study_name="s-promoted", storage=url)
    with pytest.raises(StudyError, match="'s-promoted' holds the promotion of an earlier search"):
        Record(open_storage(url), "s", space, target=2, resume=False)
    assert study_names(open_storage(url)) == ["s-promoted"], "nothing created"
    assert Record(open_storage(url), "t", space, target=2, resume=False).created


WRITTEN = SPACE.replace(  # a section's choices, which a study labels with their JSON text
    "distill.hsakd.placement: {type: categorical, choices: [[1, 2, 3], [3]]}",
    "distill.hsakd: {type: categorical, choices: [{weight: 0.0}, "
    "{weight: 1.0, placement: [2, 3]}]}",
)
OTHERWISE = WRITTEN.replace("{weight: 1.0, placement: [2, 3]}", "{placement: [2, 3], weight: 1}")


def driver_of(url: str, text: str, target: int, resume: bool) -> Record:
    """A driver as `kdsearch run` has one once its data and teacher have passed."""
    record = Record(
        open_storage(url),
        "s",
        SearchSpace.from_yaml(text, source="s.yaml"),
        target=target,
        resume=resume,
    )
    record.record_settings()
    return record


def test_a_resume_with_section_choices_written_otherwise_proposes_as_the_study_did(
    url: str,
) -> None:
    """Choices equal as values but written otherwise passed the settings check, and Optuna then
    refused their JSON text as a new value space: a traceback, and a trial left RUNNING."""
    number = 0
    for writing in (WRITTEN, OTHERWISE, WRITTEN, OTHERWISE):  # each resume, not only the
        # first: one that recorded its own writing made the next one's labels new again
        number += 2
        driver = driver_of(url, writing, number, resume=number > 2)
        for n in range(number - 2, number):
            assert driver.next_plan(f"ray{n}") is not None
            driver.finish(n, TrialState.COMPLETE, {4: 0.5}, {"epochs": 4})
    study = optuna.load_study(study_name="s", storage=url)
    # the file as the last resume gave it (its promote and export may change): the labels were
    # kept by keeping the first writing whole, which lost those
    assert study.user_attrs["space"] == OTHERWISE
    labels = {t.params["distill.hsakd"] for t in study.trials}
    assert labels == {'{"weight": 0.0}', '{"weight": 1.0, "placement": [2, 3]}'}, "seeded"


def test_a_driver_beside_another_with_section_choices_written_otherwise_draws_their_labels(
    url: str,
) -> None:
    """It joined before any trial held the parameter, so the labels must be the study's at each
    draw, not at its start."""
    first = driver_of(url, WRITTEN, 8, resume=False)
    with pytest.MonkeyPatch.context() as m:
        m.setattr("kdsearch.study.drivers.os.getpid", os.getppid)  # another driver, alive
        beside = driver_of(url, OTHERWISE, 8, resume=False)
    for n in range(4):
        assert first.next_plan(f"a{n}") is not None and beside.next_plan(f"b{n}") is not None
    study = optuna.load_study(study_name="s", storage=url)
    labels = {t.params["distill.hsakd"] for t in study.trials}
    assert labels == {'{"weight": 0.0}', '{"weight": 1.0, "placement": [2, 3]}'}, "seeded"


def test_an_empty_study_of_other_settings_is_refused_without_resume(
    space: SearchSpace, url: str
) -> None:
    # another driver created it and is still preparing (loading data, training the teacher)
    Record(open_storage(url), "s", space, target=2, resume=False)
    other = SearchSpace.from_yaml(SPACE.replace("high: 0.2", "high: 0.3"), source="o.yaml")
    with pytest.raises(StudyError, match=r"is being prepared by .* with other settings"):
        Record(open_storage(url), "s", other, target=2, resume=False)
    study = optuna.load_study(study_name="s", storage=url)
    assert study.user_attrs["space"] == SPACE, "the first driver's record is untouched"
    assert Record(open_storage(url), "s", space, target=2, resume=False).target == 2


@pytest.mark.parametrize("same", [True, False])
def test_of_two_drivers_starting_one_study_at_once_the_second_to_describe_it_joins_or_refuses(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    # the second driver opens the study the first has just created and not yet described, and
    # describes it first; the first then finds the study described
    second = (
        space
        if same
        else SearchSpace.from_yaml(SPACE.replace("high: 0.2", "high: 0.3"), source="o.yaml")
    )
    beat = Record.heartbeat
    started: list[str] = []

    def second_starts(record: Record, at: float | None = None) -> None:
        beat(record, at)
        if not started:  # at the first driver's first beat
            started.append("second")
            Record(open_storage(url), "s", second, target=2, resume=False)

    monkeypatch.setattr(Record, "heartbeat", second_starts)
    if same:
        assert Record(open_storage(url), "s", space, target=2, resume=False).target == 2
    else:
        with pytest.raises(StudyError, match=r"was just started by .* with other settings"):
            Record(open_storage(url), "s", space, target=2, resume=False)
    assert started, "the second driver started"
    attrs = optuna.load_study(study_name="s", storage=url).user_attrs
    assert attrs["space"] == second.text, "the second driver's settings, whole"
    assert attrs["base_recipe"] == second.base.to_yaml()


def test_a_study_whose_driver_died_writing_its_settings_is_taken_over(
    space: SearchSpace, url: str
) -> None:
    # an earlier kdsearch wrote the settings one at a time, and its driver died before "space"
    optuna.create_study(study_name="s", storage=url, direction="maximize").set_user_attr(
        "base_recipe", "left: over\n"
    )
    assert Record(open_storage(url), "s", space, target=2, resume=False).target == 2
    attrs = optuna.load_study(study_name="s", storage=url).user_attrs
    assert attrs["space"] == SPACE and attrs["base_recipe"] == space.base.to_yaml()


def test_an_empty_study_nobody_prepares_is_taken_over(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:  # a driver killed while it prepared the study
        m.setattr("kdsearch.study.drivers.os.getpid", _dead_pid)
        Record(open_storage(url), "s", space, target=2, resume=False)
    other = SearchSpace.from_yaml(SPACE.replace("high: 0.2", "high: 0.3"), source="o.yaml")
    assert Record(open_storage(url), "s", other, target=2, resume=False).target == 2
    study = optuna.load_study(study_name="s", storage=url)
    assert "high: 0.3" in study.user_attrs["space"], "now recorded with this driver's settings"
    # a study made outside kdsearch (optuna create-study --direction maximize) is taken over too
    optuna.create_study(study_name="made", storage=url, direction="maximize")
    assert Record(open_storage(url), "made", space, target=2, resume=False).target == 2
    # one made to minimize (create-study's default) is not: TPE would seek the worst recipes
    optuna.create_study(study_name="low", storage=url)
    with pytest.raises(StudyError) as refused:
        Record(open_storage(url), "low", space, target=2, resume=False)
    assert str(refused.value) == (
        "study 'low' was made to minimize, and kdsearch maximizes validation accuracy; delete it "
        "(optuna delete-study --study-name low --storage URL) and make it with --direction "
        "maximize, or choose another --study name"
    )
    assert optuna.load_study(study_name="low", storage=url).user_attrs == {}, "left as it was"


def test_resume_joins_a_study_its_first_driver_has_created_but_not_yet_described(
    space: SearchSpace, url: str
) -> None:
    # two `run --resume` started together: the other driver has made the study and not yet
    # written its settings; this one joins it, as one without --resume would
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    record = Record(open_storage(url), "s", space, target=2, resume=True)
    assert record.study.user_attrs["space"] == space.text
    # a study of another tool, with trials and no settings, is still refused
    other = optuna.create_study(study_name="theirs", storage=url)
    other.add_trial(optuna.trial.create_trial(value=1.0))
    with pytest.raises(StudyError, match="was not written by `kdsearch run`"):
        Record(open_storage(url), "theirs", space, target=2, resume=True)


def test_resume_refuses_a_search_of_other_settings(space: SearchSpace, url: str) -> None:
    Record(open_storage(url), "s", space, target=2, resume=False).next_plan("a")
    changed = SearchSpace.from_yaml(
        SPACE, source="s.yaml", base_changes={"data.subset": 100, "optim.momentum": 0.8}
    )
    with pytest.raises(StudyError) as err:
        Record(open_storage(url), "s", changed, target=2, resume=True)
    assert "base.data.subset None -> 100; base.optim.momentum 0.9 -> 0.8" in str(err.value)
    other = SearchSpace.from_yaml(
        SPACE.replace("high: 0.2", "high: 0.3").replace("max_epochs: 4", "max_epochs: 5"),
        source="s.yaml",
    )
    with pytest.raises(StudyError) as err:  # it said only "space.optim.lr differs"
        Record(open_storage(url), "s", other, target=2, resume=True)
    assert "asha.max_epochs 4 -> 5; space.optim.lr.high 0.2 -> 0.3" in str(err.value)
    swapped = SearchSpace.from_yaml(
        SPACE.replace("[[1, 2, 3], [3]]", "[[1, 2, 3], [2, 3]]").replace(
            "  optim.lr: {type: float, low: 0.01, high: 0.2, log: true}\n",
            "  optim.momentum: {type: float, low: 0.8, high: 0.9}\n",
        ),
        source="s.yaml",
    )
    with pytest.raises(StudyError) as err:
        Record(open_storage(url), "s", swapped, target=2, resume=True)
    assert (
        "space.distill.hsakd.placement.choices [[1, 2, 3], [3]] -> [[1, 2, 3], [2, 3]]; "
        "space.optim.lr removed; space.optim.momentum added"
    ) in str(err.value)
    more = SearchSpace.from_yaml(SPACE + "search: {trials: 9, concurrent: 1}\n", source="t.yaml")
    assert Record(open_storage(url), "s", more, target=9, resume=True).target == 9
    # where another machine keeps the data, and what it runs on, may differ
    elsewhere = SearchSpace.from_yaml(
        SPACE, source="s.yaml", base_changes={"data.root": "/mnt/data", "device": "cpu"}
    )
    assert Record(open_storage(url), "s", elsewhere, target=2, resume=True).target == 2


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_adopts_trials_whose_driver_is_gone_and_only_those(
    space: SearchSpace, url: str
) -> None:
    storage = open_storage(url)
    first = Record(storage, "s", space, target=4, resume=False)
    for i in range(4):
        first.next_plan(f"r{i}")
    first.finish(0, TrialState.COMPLETE, {4: 0.9}, {})
    study_id = storage.get_study_id_from_name("s")
    drivers = {1: _here(_dead_pid()), 2: _here(os.getppid()), 3: "elsewhere:42"}
    for number, driver in drivers.items():
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        storage.set_trial_user_attr(trial_id, "driver", driver)
    for driver in drivers.values():
        storage.set_study_system_attr(study_id, f"heartbeat:{driver}", time.time())
    again = Record(storage, "s", space, target=4, resume=True)
    assert [t.number for t in again.orphans] == [1]  # 2's process lives and beats; 3 beats
    plan = again.next_plan("new")
    assert plan is not None and plan.number == 1 and plan.adopted
    trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, 1))
    assert trial.user_attrs["attempt"] == 2 and trial.user_attrs["ray_trial_id"] == "new"
    assert again.next_plan("more") is None, "the study already holds its four trials"
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:42", time.time() - STALE_S - 1)
    # A later driver: 3 now, and 1, whose driver (`again`) is this process, not a live other one
    assert [t.number for t in Record(storage, "s", space, target=4, resume=True).orphans] == [1, 3]
    # 2's driver stopped beating: the process under its PID is another one (the PID was reused)
    storage.set_study_system_attr(study_id, f"heartbeat:{drivers[2]}", time.time() - STALE_S - 1)
    orphans = Record(storage, "s", space, target=4, resume=True).orphans
    assert [t.number for t in orphans] == [1, 2, 3]


def _here(pid: int, scope: str | None = None) -> str:
    """The name of a driver of this host name with process id `pid`, where this process is
    (its boot and PID namespace) or in `scope`."""
    return f"{socket.gethostname()}@{pid_scope() if scope is None else scope}:{pid}"


def test_a_driver_of_this_host_name_that_is_not_on_this_machine_and_namespace_lives_by_its_beat(
    space: SearchSpace, url: str
) -> None:
    """Containers on the host's network share its name but not its PIDs (so do two machines of
    one name). A driver in another one was taken for dead (its PID is nobody here) and its live
    trials taken over at every proposal, each driver taking them back from the other; two such
    drivers that were both PID 1 had one name, and each ran all of the other's trials again."""
    storage = open_storage(url)
    first = Record(storage, "s", space, target=3, resume=False)
    for i in range(3):
        first.next_plan(f"r{i}")
    study_id = storage.get_study_id_from_name("s")
    elsewhere = "0123abcd-4026599999"  # another container, or a machine of the same name
    others = {1: _here(_dead_pid(), elsewhere), 2: _here(os.getpid(), elsewhere)}
    for number, driver in others.items():
        _own(storage, study_id, number, driver)
        storage.set_study_system_attr(study_id, f"heartbeat:{driver}", time.time())
    assert first.driver == _here(os.getpid()) and pid_scope(), "named with where its PID holds"
    assert first.driver not in others.values(), "a name of its own, though PID and host agree"
    # trial 0 was this process's (`first`): taken over; 1 and 2 run in the other container
    assert [t.number for t in Record(storage, "s", space, target=3, resume=True).orphans] == [0]
    for driver in others.values():  # the other container's driver stopped beating
        storage.set_study_system_attr(study_id, f"heartbeat:{driver}", time.time() - STALE_S - 1)
    orphans = Record(storage, "s", space, target=3, resume=True).orphans
    assert [t.number for t in orphans] == [0, 1, 2]


def test_a_trial_taken_over_trains_with_this_machines_settings(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial of a driver that named its GPU, taken over by a driver on a machine without one,
    failed for good: it kept the device (and data folder) of the machine it was proposed on."""
    storage = open_storage(url)
    theirs = SearchSpace.from_yaml(
        SPACE.replace(
            "data: {dataset: digits}", "data: {dataset: digits, root: /gpu/data}"
        ).replace("  student: {arch: resnet8}", "  student: {arch: resnet8}\n  device: cuda:1"),
        source="s.yaml",
    )
    with monkeypatch.context() as m:  # the first driver's process is gone
        m.setattr("kdsearch.study.drivers.os.getpid", _dead_pid)
        first = Record(storage, "s", theirs, target=1, resume=False)
        proposed = first.next_plan("r0")
    assert proposed is not None and proposed.recipe.device == "cuda:1"
    again = Record(storage, "s", space, target=1, resume=True)  # this machine: device auto
    plan = again.next_plan("new")
    assert plan is not None and plan.adopted
    assert plan.recipe.device == "auto" and plan.recipe.data.root == space.base.data.root
    assert plan.recipe.optim.lr == proposed.recipe.optim.lr, "what it searched is kept"
    trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(again.study_id, 0))
    assert trial_recipe(trial) == plan.recipe, "recorded as it trains now"


def test_a_trial_taken_over_while_this_driver_ran_it_is_left_to_its_new_driver(
    space: SearchSpace, url: str
) -> None:
    """A driver suspended for 5 minutes (Ctrl-Z, a paused VM) wakes to finish trials another
    driver has taken over: it wrote its curve over theirs."""
    storage = open_storage(url)
    record = Record(storage, "s", space, target=2, resume=False)
    record.next_plan("r0")
    study_id = storage.get_study_id_from_name("s")
    _own(storage, study_id, 0, "elsewhere:42")  # took it over
    with pytest.warns(KdsearchWarning, match="trial 0 was taken over by driver elsewhere:42"):
        record.finish(0, TrialState.COMPLETE, {4: 0.9}, {"epochs": 4})
    trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, 0))
    assert trial.state == TrialState.RUNNING and trial.intermediate_values == {}
    assert "epochs" not in trial.user_attrs


def test_a_trial_another_driver_finishes_while_this_one_writes_it_keeps_the_first_finish(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna's refusal to write a finished trial escaped `finish`, and Tune never gave the
    trial's slot back: after as many such trials as slots the search hung."""
    storage = open_storage(url)
    record = Record(storage, "s", space, target=2, resume=False)
    record.next_plan("r0")
    trial_id = storage.get_trial_id_from_study_id_trial_number(record.study_id, 0)

    def finished_meanwhile(store: BaseStorage, tid: int, *args: Any, **kwargs: Any) -> None:
        if not store.get_trial(tid).state.is_finished():  # the other driver's finish
            store.set_trial_state_values(tid, TrialState.COMPLETE, [0.5])
        write_trial(store, tid, *args, **kwargs)

    monkeypatch.setattr("kdsearch.study.record.write_trial", finished_meanwhile)
    record.finish(0, TrialState.COMPLETE, {4: 0.9}, {"epochs": 4})
    trial = storage.get_trial(trial_id)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.5


def test_an_orphan_that_cannot_train_is_failed_rather_than_adopted_on_every_resume(
    space: SearchSpace, url: str
) -> None:
    """A trial that took its driver down (the host out of memory) was trained again first on
    every --resume, without end; one whose recorded recipe no longer loads stopped every resume
    at it. A driver stopped as Ctrl-C stops one (its heartbeat zeroed) is no such death."""
    storage = open_storage(url)
    first = Record(storage, "s", space, target=3, resume=False)
    for i in range(3):
        first.next_plan(f"r{i}")
    study_id = storage.get_study_id_from_name("s")
    ids = [storage.get_trial_id_from_study_id_trial_number(study_id, n) for n in range(3)]
    drivers = [_here(_dead_pid()) for _ in ids]
    for trial_id, driver, beat in zip(ids, drivers, (time.time() - 60, 0.0, 0.0), strict=True):
        storage.set_trial_user_attr(trial_id, "driver", driver)
        storage.set_trial_user_attr(trial_id, "crashes", 2)  # two drivers died with each
        storage.set_study_system_attr(study_id, f"heartbeat:{driver}", beat)
    # recorded by a kdsearch before `training_attempt`: each of those deaths still counts
    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
        db.execute("DELETE FROM trial_user_attributes WHERE key = 'training_attempt'")
    storage.set_trial_user_attr(ids[1], "recipe", "student: {arch: resnet9000}\n")
    again = Record(storage, "s", space, target=3, resume=True)
    plan = again.next_plan("new")
    assert plan is not None and plan.number == 2 and plan.adopted, "stopped, not killed by it"
    assert storage.get_trial(ids[2]).user_attrs["crashes"] == 2
    assert again.next_plan("more") is None
    t0, t1, _ = (storage.get_trial(i) for i in ids)
    assert t0.state == TrialState.FAIL and t0.user_attrs["failure"].startswith(
        "its driver died while training it 3 times"
    )
    assert t1.state == TrialState.FAIL and t1.user_attrs["failure"].startswith(
        "its recorded recipe does not load: "
    )
    assert "resnet9000" in t1.user_attrs["failure"]


def test_a_trial_that_waited_for_a_slot_is_no_death_of_its_driver(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune proposes `concurrent` trials and holds back those the machine has no slot for: a
    driver killed then counted a death against every one of them, and after three such kills
    trials that had never trained were failed as the likely cause."""
    storage = open_storage(url)
    with monkeypatch.context() as m:  # the driver that is killed
        m.setattr("kdsearch.study.drivers.os.getpid", _dead_pid)
        first = Record(storage, "s", space, target=2, resume=False)
        for n in range(2):
            assert first.next_plan(f"r{n}") is not None
        first.training(0)  # Tune gave trial 0 a slot; trial 1 waited for one
        first.heartbeat()  # then it died: its beat stays, not zeroed as a stop zeroes it
    for kill in range(2):  # resumed by drivers of this process's name, killed in turn
        again = Record(storage, "s", space, target=2, resume=True)
        adopted = [again.next_plan(f"k{kill}-{n}") for n in range(2)]
        assert all(p is not None and p.adopted for p in adopted), f"resume {kill + 1}"
        again.training(0)
        again.heartbeat()
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.user_attrs["crashes"] for t in trials] == [2, 0]
    last = Record(storage, "s", space, target=2, resume=True)
    plan = last.next_plan("last")  # the third death: trial 0 is failed, trial 1 trains
    assert plan is not None and plan.number == 1 and last.next_plan("more") is None
    t0, t1 = optuna.load_study(study_name="s", storage=url).trials
    assert (
        t0.state == TrialState.FAIL and "died while training it 3 times" in t0.user_attrs["failure"]
    )
    assert t0.user_attrs["crashes"] == 3, "the count its failure gives"
    assert t1.state == TrialState.RUNNING and t1.user_attrs["crashes"] == 0


def test_a_driver_of_the_same_name_stopped_cleanly_is_no_death(
    space: SearchSpace, url: str
) -> None:
    """A container's PID 1 resumes the trials of the PID 1 before it, a driver of its own
    name: its first beat overwrote how that one ended, so every clean stop counted as a death
    and the third FAILed the trial."""
    storage = open_storage(url)
    record = Record(storage, "s", space, target=1, resume=False)
    assert record.next_plan("r0") is not None
    for n in range(4):
        record.heartbeat(0.0)  # stopped as Ctrl-C stops it
        record = Record(storage, "s", space, target=1, resume=True)
        plan = record.next_plan(f"again{n}")
        assert plan is not None and plan.adopted, f"resume {n + 1}"
    trial = record.study.trials[0]
    assert trial.state == TrialState.RUNNING and trial.user_attrs["crashes"] == 0


def test_a_refused_delete_of_old_steps_is_a_storage_failure(space: SearchSpace, url: str) -> None:
    """Raised as SQLAlchemy's own error, it escaped the searcher's handling: the trial stayed
    RUNNING, claimed by a driver that went on as if it had been recorded."""
    from optuna.storages import RDBStorage

    impatient = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 0.3}})
    record = Record(impatient, "s", space, target=1, resume=False)
    assert record.next_plan("r0") is not None
    trial_id = impatient.get_trial_id_from_study_id_trial_number(record.study_id, 0)
    for epoch in (1, 2, 3):  # an earlier attempt's
        impatient.set_trial_intermediate_value(trial_id, epoch, 0.5)
    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
        db.execute("BEGIN IMMEDIATE")  # another writer holds the file
        with pytest.raises(
            StorageError, match=r"cannot use the study storage .*: database is locked"
        ):
            record.finish(0, TrialState.PRUNED, {1: 0.3}, {"epochs": 1})
        db.rollback()
    # nothing of the refused write landed: the trial is as it was
    trial = impatient.get_trial(trial_id)
    assert trial.state == TrialState.RUNNING
    assert trial.intermediate_values == dict.fromkeys((1, 2, 3), 0.5)


def _own(storage: BaseStorage, study_id: int, number: int, driver: str) -> None:
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    storage.set_trial_user_attr(trial_id, "driver", driver)


def test_two_resuming_drivers_never_take_over_one_trial_twice(space: SearchSpace, url: str) -> None:
    storage = open_storage(url)
    killed = Record(storage, "s", space, target=4, resume=False)
    for i in range(4):
        killed.next_plan(f"r{i}")
    study_id = storage.get_study_id_from_name("s")
    for number in range(4):
        _own(storage, study_id, number, "elsewhere:1")  # a driver killed on another host
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:1", time.time() - STALE_S - 1)
    first = Record(storage, "s", space, target=4, resume=True)
    assert [t.number for t in first.orphans] == [0, 1, 2, 3]
    plan = first.next_plan("a0")
    assert plan is not None and plan.number == 0
    # a second driver resumes beside it and takes over trial 1, then trial 2, which it finishes
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:2", time.time())
    _own(storage, study_id, 1, "elsewhere:2")
    _own(storage, study_id, 2, "elsewhere:2")
    trial_2 = storage.get_trial_id_from_study_id_trial_number(study_id, 2)
    storage.set_trial_state_values(trial_2, TrialState.COMPLETE, [0.9])
    plan = first.next_plan("a1")  # neither 1 (the other's now) nor 2 (finished)
    assert plan is not None and plan.number == 3 and plan.adopted
    assert first.next_plan("a2") is None and first.all_started()


def test_a_trial_finished_between_reading_and_taking_it_over_is_passed_over(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(url)
    killed = Record(storage, "s", space, target=2, resume=False)
    killed.next_plan("r0")
    killed.next_plan("r1")
    study_id = storage.get_study_id_from_name("s")
    for number in (0, 1):
        _own(storage, study_id, number, "elsewhere:1")
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:1", time.time() - STALE_S - 1)
    record = Record(storage, "s", space, target=2, resume=True)
    as_read = record._orphans()
    trial_0 = storage.get_trial_id_from_study_id_trial_number(study_id, 0)
    storage.set_trial_state_values(trial_0, TrialState.COMPLETE, [0.9])  # by another driver
    monkeypatch.setattr(record, "_orphans", lambda: as_read)
    plan = record.next_plan("a0")  # Optuna refuses to write to 0 now: 1 is taken instead
    assert plan is not None and plan.number == 1
    assert storage.get_trial(trial_0).user_attrs["driver"] == "elsewhere:1"


@pytest.mark.parametrize("proposed", [True, False], ids=["trained", "killed-proposing"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_of_two_drivers_taking_over_one_orphan_at_once_only_one_gets_it(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch, proposed: bool, backend: str
) -> None:
    """Both read the orphans, then each takes the first: the second finds it taken since (it
    used to train it too, and the later finish dropped the other's result)."""
    if backend == "postgresql":
        if not POSTGRES:
            pytest.skip("set KDSEARCH_TEST_POSTGRES to a PostgreSQL URL (.ci/run does)")
        url = POSTGRES
    name = f"s-{uuid.uuid4().hex[:8]}"  # a server's database outlives the test
    storage = open_storage(url)
    assert isinstance(storage, RDBStorage)
    killed = Record(storage, name, space, target=2, resume=False)
    killed.next_plan("r0")
    killed.next_plan("r1")
    study_id = storage.get_study_id_from_name(name)
    for number in (0, 1):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        if proposed:
            _own(storage, study_id, number, "elsewhere:1")
            continue
        # killed after Optuna created it and before kdsearch named its driver, long ago (as
        # Optuna stored its start: in UTC or local time, by its version)
        with storage.engine.begin() as db:
            where: dict[str, Any] = {"id": trial_id}
            start = text("SELECT datetime_start FROM trials WHERE trial_id = :id")
            stored = db.execute(start.columns(column("datetime_start", DateTime)), where)
            where["at"] = stored.scalar_one() - timedelta(seconds=STALE_S + 1)
            db.execute(text("DELETE FROM trial_user_attributes WHERE trial_id = :id"), where)
            db.execute(text("UPDATE trials SET datetime_start = :at WHERE trial_id = :id"), where)
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:1", time.time() - STALE_S - 1)
    killed.heartbeat(at=0.0)
    first = Record(storage, name, space, target=2, resume=True)
    second = Record(storage, name, space, target=2, resume=True)
    second.driver = "elsewhere:2"  # another process (these two share this one's name)
    second.heartbeat()
    as_read = second._orphans()
    assert [t.number for t in as_read] == [0, 1]
    plan = first.next_plan("a0")
    assert plan is not None and plan.number == 0
    monkeypatch.setattr(second, "_orphans", lambda: as_read)
    theirs = second.next_plan("b0")
    assert theirs is not None and theirs.number == 1, "trial 0 is the first driver's"
    trial_0 = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, 0))
    assert trial_0.user_attrs["driver"] == first.driver
    assert trial_0.user_attrs["ray_trial_id"] == "a0"
    assert second.next_plan("b1") is None and first.next_plan("a1") is None


def test_a_driver_takes_over_the_trials_of_one_that_died_beside_it(
    space: SearchSpace, url: str
) -> None:
    storage = open_storage(url)
    record = Record(storage, "s", space, target=4, resume=False)  # no --resume
    study_id = storage.get_study_id_from_name("s")
    for i in range(4):
        record.next_plan(f"r{i}")
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:3", time.time())
    for number in (2, 3):  # a second driver joined with --resume and runs these
        _own(storage, study_id, number, "elsewhere:3")
    assert record.next_plan("r4") is None and record.all_started()  # they run elsewhere
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:3", time.time() - STALE_S - 1)
    assert not record.all_started()  # it died: its trials are this driver's to finish
    adopted = [record.next_plan("r5"), record.next_plan("r6")]
    assert [p.number for p in adopted if p is not None] == [2, 3]
    assert record.next_plan("r7") is None and record.all_started()


def test_a_beat_in_flight_as_the_driver_ends_lands_before_the_mark_of_its_end(
    beating: Record, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, storage = beating, beating.storage
    writes = record.heartbeat
    in_flight = threading.Event()

    def slow(at: float | None = None) -> None:  # a beat waiting 1.5 s on a busy storage
        if at is None:
            in_flight.set()
            time.sleep(1.5)
        writes(at)

    monkeypatch.setattr(record, "heartbeat", slow)
    with record.alive():
        assert in_flight.wait(10)
    time.sleep(2.0)  # past the late beat, had it been left to land after the end
    study_id = storage.get_study_id_from_name("s")
    assert storage.get_study_system_attrs(study_id)[f"heartbeat:{record.driver}"] == 0.0


@pytest.mark.parametrize(
    "error",
    [
        StorageError("cannot use the study storage sqlite:///s.db: disk I/O error"),
        OSError("disk I/O error"),  # not one kdsearch has named: told the same way
    ],
)
def test_a_heartbeat_the_storage_refuses_stops_the_search_in_the_drivers_thread(
    beating: Record, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from kdsearch.search.tuner import Progress

    record = beating

    def refused(at: float | None = None) -> None:
        raise error

    monkeypatch.setattr(record, "heartbeat", refused)
    with (
        pytest.raises(StorageError, match=r"cannot use the study storage .*disk I/O"),
        record.alive(),
    ):
        deadline = time.time() + 30
        while record.beat_failure is None and time.time() < deadline:
            time.sleep(0.05)
        Progress(record, None).on_step_end(0, [])  # Tune's next step stops the search


def test_drivers_rank_by_when_they_joined_not_by_their_latest_beat(
    space: SearchSpace, url: str
) -> None:
    storage = open_storage(url)
    Record(storage, "s", space, target=2, resume=False)
    study_id = storage.get_study_id_from_name("s")
    # a driver on another host joined first; its clock runs a minute ahead, so its latest beat
    # reads later than this driver's
    storage.set_study_system_attr(study_id, "joined:elsewhere:42", time.time() - 10)
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:42", time.time() + 60)
    second = Record(storage, "s", space, target=2, resume=True)
    assert second._earlier_drivers() == ["elsewhere:42"]


def test_a_driver_beats_while_alive_and_marks_its_end(beating: Record) -> None:
    record, storage = beating, beating.storage
    study_id = storage.get_study_id_from_name("s")
    key = f"heartbeat:{record.driver}"

    def beat() -> float:
        return float(storage.get_study_system_attrs(study_id)[key])

    first = beat()
    with record.alive():
        deadline = time.time() + 30
        while beat() == first and time.time() < deadline:  # a step that runs for a while
            time.sleep(0.05)
        assert beat() > first, "the heartbeat is refreshed with no trial running"
        assert driver_alive(record.driver, storage.get_study_system_attrs(study_id))
    assert beat() == 0.0
    assert not driver_alive(record.driver, storage.get_study_system_attrs(study_id))


def test_trials_left_by_an_earlier_process_of_the_same_host_and_pid_are_adopted(
    space: SearchSpace, url: str
) -> None:
    """A restarted container runs the driver as PID 1 again, on the same host name: its trials
    looked alive (the resuming process itself), were never run again and stayed RUNNING."""
    storage = open_storage(url)
    first = Record(storage, "s", space, target=2, resume=False)  # this host, this pid
    first.next_plan("r0")
    first.next_plan("r1")
    first.finish(0, TrialState.COMPLETE, {4: 0.9}, {})
    again = Record(storage, "s", space, target=2, resume=True)  # same host, same pid
    assert [t.number for t in again.orphans] == [1]
    plan = again.next_plan("new")
    assert plan is not None and plan.number == 1 and plan.adopted


@pytest.mark.parametrize("draws_one", [False, True], ids=["nothing drawn", "one value drawn"])
def test_a_trial_whose_driver_died_while_proposing_it_is_proposed_again_on_resume(
    space: SearchSpace, url: str, draws_one: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill -9 between Optuna creating the trial and kdsearch recording its recipe leaves a
    RUNNING trial with no recipe (and no driver); resuming must not stop at it."""
    storage = open_storage(url)
    with monkeypatch.context() as m:  # the first driver's process is gone
        m.setattr("kdsearch.study.drivers.os.getpid", _dead_pid)
        first = Record(storage, "s", space, target=3, resume=False)
    first.next_plan("r0")
    first.finish(0, TrialState.COMPLETE, {4: 0.9}, {})
    killed = first.study.ask()  # the driver dies here, or after drawing some values
    drawn = {"optim.lr": killed.suggest_float("optim.lr", 0.01, 0.2, log=True)} if draws_one else {}
    again = Record(storage, "s", space, target=3, resume=True)
    assert [t.number for t in again.orphans] == [killed.number]
    plan = again.next_plan("new")
    assert plan is not None and plan.number == killed.number
    trial = storage.get_trial(killed._trial_id)
    assert trial_recipe(trial) == plan.recipe and trial.user_attrs["ray_trial_id"] == "new"
    assert set(trial.params) == {"optim.lr", "distill.hsakd.placement"}
    for name, value in drawn.items():
        assert trial.params[name] == value and plan.recipe.get(name) == value
    third = again.next_plan("third")
    assert third is not None and third.number == 2 and again.next_plan("more") is None


def test_a_trial_a_live_driver_is_proposing_is_left_to_it(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drivers share a study: one has just created a trial and not yet claimed it; the
    other, resuming, must not take it over (both would train it, with different values)."""
    storage = open_storage(url)
    proposer = Record(storage, "s", space, target=3, resume=False)
    proposing = proposer.study.ask()
    study_id = storage.get_study_id_from_name("s")
    # The proposer's heartbeat as another host sees it: this process is the resuming driver.
    storage.set_study_system_attr(study_id, "heartbeat:elsewhere:42", time.time())
    assert Record(storage, "s", space, target=3, resume=True).orphans == []
    later = datetime.now() + timedelta(seconds=STALE_S + 1)  # a proposal that never finished

    class Later(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Later:
            return cls.fromtimestamp(later.timestamp(), tz)

    monkeypatch.setattr("kdsearch.study.record.datetime", Later)
    orphans = Record(storage, "s", space, target=3, resume=True).orphans
    assert [t.number for t in orphans] == [proposing.number]


def test_drivers_that_start_on_a_study_at_once_propose_different_trials(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drivers started together see the same trial count; seeded from it alone, they drew
    the same values and trained every trial twice. A driver alone draws as it always did."""
    storage = open_storage(url)
    with monkeypatch.context() as m:  # the other driver: a live process that is not this one
        m.setattr("kdsearch.study.drivers.os.getpid", os.getppid)
        first = Record(storage, "s", space, target=8, resume=False)
    second = Record(storage, "s", space, target=8, resume=False)
    ours = [first.next_plan(f"a{i}") for i in range(4)]
    theirs = [second.next_plan(f"b{i}") for i in range(4)]
    assert all(p is not None for p in ours + theirs)
    drawn = [p.recipe.optim.lr for p in ours + theirs if p is not None]
    assert len(set(drawn)) == 8, drawn
    alone = Record(
        open_storage(url.replace("s.db", "alone.db")), "s", space, target=4, resume=False
    )
    plan = alone.next_plan("c0")
    assert plan is not None and ours[0] is not None and plan.recipe == ours[0].recipe


def test_a_driver_stopped_while_preparing_keeps_a_study_another_driver_joined(
    space: SearchSpace, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the teacher trains takes back the study this driver created, but not from
    under a second driver that joined it meanwhile (it crashed later: no such study)."""
    storage = open_storage(url)
    with monkeypatch.context() as m:
        m.setattr("kdsearch.study.drivers.os.getpid", os.getppid)
        creator = Record(storage, "s", space, target=2, resume=False)
    assert creator.created
    joined = Record(storage, "s", space, target=2, resume=False)
    assert not creator.discard_if_unused()
    plan = joined.next_plan("r0")
    assert plan is not None and plan.number == 0
    alone = Record(storage, "t", space, target=2, resume=False)
    assert alone.discard_if_unused() is False, "study s is still there"
    assert study_names(storage) == ["s"]


def test_a_study_that_cannot_be_written_is_one_line_naming_why(
    space: SearchSpace, url: str, tmp_path: Path
) -> None:
    """A read-only file (or a full disk) was a traceback ending in Optuna's guess: "invalid
    data in the commit, e.g. exceeding max length"."""
    Record(open_storage(url), "s", space, target=2, resume=False).next_plan("a")
    read_only = RDBStorage(f"sqlite:///file:{tmp_path}/s.db?mode=ro&uri=true")
    with pytest.raises(StudyError) as err:
        Record(read_only, "s", space, target=2, resume=True)
    message = str(err.value)
    assert message.startswith("cannot use the study storage sqlite:///file")
    assert message.endswith("/s.db?mode=ro&uri=true: attempt to write a readonly database")


def test_a_storage_is_placed_by_its_database_not_by_how_its_url_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path.resolve() / "studies" / "s.db")
    assert storage_place("sqlite:///studies/s.db") == here
    assert storage_place(f"sqlite:///{tmp_path}/studies/../studies/s.db") == here
    place = storage_place("postgresql://kd:hunter2@db.lan:5433/kd")
    assert place == "postgresql://db.lan:5433/kd", "no user or password in an export"
    for same in (
        "postgresql+psycopg2://reader@db.lan:5433/kd?sslmode=require",
        "postgresql+psycopg://kd:other@DB.lan:5433/kd?connect_timeout=5",
    ):
        assert storage_place(same) == place
    assert storage_place("postgresql://kd@db.lan:5433/other") != place
    assert storage_place("postgresql://db.lan/kd") == storage_place("postgresql://db.lan:5432/kd")
    assert "hunter2" not in storage_place("postgresql://kd:hunter2@db.lan:port/kd")  # no trace


def test_a_sample_the_recipe_rejects_is_a_failed_trial_and_the_search_goes_on(url: str) -> None:
    # each value fits the base alone; together they break a rule of the recipe
    text = SPACE.replace(
        "  optim.lr: {type: float, low: 0.01, high: 0.2, log: true}\n",
        "  optim.momentum: {type: categorical, choices: [0.0, 0.9]}\n"
        "  optim.nesterov: {type: categorical, choices: [false, true]}\n",
    ).replace("student: {arch: resnet8}", "student: {arch: resnet8}\n  optim: {nesterov: false}")
    record = Record(
        open_storage(url), "s", SearchSpace.from_yaml(text, source="s.yaml"), target=3, resume=False
    )
    record.study.enqueue_trial({"optim.momentum": 0.0, "optim.nesterov": True})
    plan = record.next_plan("x")
    assert plan is not None and plan.number == 1
    first = record.study.trials[0]
    assert first.state == TrialState.FAIL
    assert "nesterov: true needs momentum > 0" in first.user_attrs["failure"]
    # it never ran on Ray: the id is the trial's that did (one Ray trial, one study trial)
    assert "ray_trial_id" not in first.user_attrs
    assert record.study.trials[1].user_attrs["ray_trial_id"] == "x"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nosuchdb://x/y", "cannot open the study storage nosuchdb://x/y: "),
        (
            "postgresql+psycopg2://kd:hunter2@127.0.0.1:1/none",
            "cannot open the study storage postgresql+psycopg2://kd:***@127.0.0.1:1/none: ",
        ),
        # plain postgresql:// reaches the server with psycopg2 (SQLAlchemy's own pick,
        # psycopg 3, is not installed), so the error is the server's, not a missing module
        (
            "postgresql://kd:hunter2@127.0.0.1:1/none",
            "cannot open the study storage postgresql://kd:***@127.0.0.1:1/none: "
            "(psycopg2.OperationalError)",
        ),
        (  # the scheme hosting services give out, which SQLAlchemy no longer reads ("Can't
            # load plugin: sqlalchemy.dialects:postgres")
            "postgres://kd:hunter2@127.0.0.1:1/none",
            "cannot open the study storage postgres://kd:***@127.0.0.1:1/none: "
            "(psycopg2.OperationalError)",
        ),
        (  # SQLAlchemy ends the password at its first '@' and took the rest for the host, so
            # the message printed the password's tail
            "postgresql://kd:x@hunter2@127.0.0.1:1/none",
            "cannot open the study storage postgresql://kd:***@127.0.0.1:1/none: its password "
            "holds an '@', which SQLAlchemy reads as the end of the password; write it as %40",
        ),
        (  # Optuna's own message named no module: "Failed to import DB access module ..."
            "postgresql+psycopg://kd:hunter2@127.0.0.1:1/none",
            "cannot open the study storage postgresql+psycopg://kd:***@127.0.0.1:1/none: the "
            "module 'psycopg' its driver needs is not installed; pip install it, or write "
            "postgresql://, which uses psycopg2",
        ),
        (
            "mysql://kd:hunter2@127.0.0.1:1/none",
            "cannot open the study storage mysql://kd:***@127.0.0.1:1/none: the module "
            "'MySQLdb' its driver needs is not installed; pip install mysqlclient",
        ),
        (  # the pip distribution, where its module is named otherwise
            "mysql+pymysql://kd:hunter2@127.0.0.1:1/none",
            "cannot open the study storage mysql+pymysql://kd:***@127.0.0.1:1/none: the module "
            "'pymysql' its driver needs is not installed; pip install PyMySQL",
        ),
        (
            "sqlite://",
            "sqlite://: an SQLite database in memory is lost when the command ends",
        ),
        (
            "sqlite:////no/such/folder/s.db",
            "cannot open the study storage sqlite:////no/such/folder/s.db: no folder /no/such",
        ),
    ],
)
def test_bad_storage_is_one_line_without_the_password(url: str, expected: str) -> None:
    if (missing := re.search(r"the module '([\w.]+)' its driver", expected)) and (
        importlib.util.find_spec(missing[1]) is not None
    ):
        pytest.skip(f"{missing[1]} is installed here")
    with pytest.raises(StudyError) as info:
        open_storage(url)
    message = str(info.value)
    assert message.startswith(expected) and "hunter2" not in message and "\n" not in message


class OldStyleDialect(SQLiteDialect):
    """A dialect written for SQLAlchemy 1: a `dbapi` class method and no `import_dbapi` but the
    interface's (which raises NotImplementedError), which SQLAlchemy 2's engines still accept
    (with a warning)."""

    driver = "pysqlite"
    supports_statement_cache = True

    @classmethod
    def dbapi(cls) -> Any:
        return sqlite3


def test_a_dialect_without_import_dbapi_is_left_to_the_opening(tmp_path: Path) -> None:
    """`check_driver` called `import_dbapi`, which such a dialect lacks: a NotImplementedError
    traceback from every command, on a URL that had opened."""
    registry.register("oldstylekd", __name__, "OldStyleDialect")
    url = f"oldstylekd:///{tmp_path}/s.db"
    check_driver(url)  # nothing to say: the opening tries it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy's, on the dialect's old-style `dbapi`
        assert study_names(open_storage(url)) == [], "and the URL opens"


def test_a_postgresql_server_that_never_answers_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that takes the connection and says nothing (or drops packets): libpq waited
    without end, and the one clear line never came."""
    from kdsearch.study import storage

    monkeypatch.setattr(storage, "PG_CONNECT_S", 2)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nothing ever speaks
        url = f"postgresql://kd@127.0.0.1:{silent.getsockname()[1]}/none"
        with pytest.raises(StudyError) as info:
            open_storage(url)
    assert str(info.value).startswith(f"cannot open the study storage {url}: ")
    assert "timeout expired" in str(info.value)


def test_a_wrong_postgresql_password_is_one_line_without_it() -> None:
    """The server's refusal, as a user mistyping the password sees it (.ci/run's server asks
    for passwords over TCP, as a cluster's does)."""
    if not POSTGRES:
        pytest.skip("set KDSEARCH_TEST_POSTGRES to a PostgreSQL URL (.ci/run does)")
    parts = make_url(POSTGRES)
    wrong = parts.set(password="hunter2").render_as_string(hide_password=False)
    with pytest.raises(StudyError) as info:
        open_storage(wrong)
    message = str(info.value)
    assert message.startswith(f"cannot open the study storage {redact(wrong)}: ")
    assert "password authentication failed" in message
    assert "hunter2" not in message and "\n" not in message


def test_an_sqlite_file_in_a_folder_with_an_at_sign_opens(tmp_path: Path) -> None:
    """Not taken for a password holding an '@' (no URL with a password names a file)."""
    folder = tmp_path / "me@lab"
    folder.mkdir()
    assert study_names(open_storage(f"sqlite:///{folder}/s.db")) == []


def test_redact_hides_passwords_only() -> None:
    assert redact("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert redact("sqlite:///studies/x.db") == "sqlite:///studies/x.db"
    assert redact("sqlite:////home/me@lab/x.db") == "sqlite:////home/me@lab/x.db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("postgresql://u:a:b@h:5433/db?sslmode=require") == (
        "postgresql://u:***@h:5433/db?sslmode=require"
    )
    # an unencoded '@' in the password: all of it hidden (SQLAlchemy's own rendering kept
    # the part after its first '@'); a user name with an '@' (as Azure's) is kept
    assert redact("postgresql://u:se@cret@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u@server:secret@h/db") == "postgresql://u@server:***@h/db"


def test_a_study_file_a_killed_writer_left_mid_transaction_is_still_a_study(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=url)
    study.add_trial(optuna.trial.create_trial(value=1.0))
    writer = (
        "import os, signal, sqlite3\n"
        f"db = sqlite3.connect({str(tmp_path / 's.db')!r}, isolation_level=None)\n"
        "db.execute('PRAGMA cache_size = 1')\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "db.execute(\"UPDATE studies SET study_name = study_name || 'x'\")\n"
        "db.execute('UPDATE trials SET number = number + 10')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", writer], check=False)
    assert (tmp_path / "s.db-journal").is_file(), "the kill left a journal to roll back"
    # a read-only look cannot roll it back, but the file is a study all the same
    assert holds_studies(tmp_path / "s.db")
    assert [t.number for t in optuna.load_study(study_name="s", storage=url).trials] == [0]
    (tmp_path / "text.db").write_text("not a database\n")
    (tmp_path / "empty.db").write_bytes(b"")
    assert not holds_studies(tmp_path / "text.db") and not holds_studies(tmp_path / "empty.db")


def test_a_database_is_known_to_hold_no_study_only_where_it_can_be_read(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="s", storage=url)
    assert not holds_no_study(tmp_path / "s.db")
    optuna.delete_study(study_name="s", storage=url)
    assert holds_no_study(tmp_path / "s.db"), "Optuna's tables, but no study in them"
    (tmp_path / "empty.db").write_bytes(b"")
    assert holds_no_study(tmp_path / "empty.db")
    (tmp_path / "text.db").write_text("not a database\n")
    assert not holds_no_study(tmp_path / "text.db"), "unreadable: not known to be empty"


def test_the_password_of_a_space_files_storage_is_not_recorded(url: str) -> None:
    """The study kept the space file's text whole, and the dashboard showed its
    `study.storage` with the password to whoever could open it."""
    secret = SPACE.replace(
        "study: {name: s}", "study: {name: s, storage: 'postgresql://kd:hunter2@db.lan/kd'}"
    )
    assert "kd:hunter2@" in secret
    space = SearchSpace.from_yaml(secret, source="s.yaml")
    record = Record(open_storage(url), "s", space, target=1, resume=False)
    recorded = record.study.user_attrs["space"]
    assert "hunter2" not in recorded
    assert recorded == secret.replace("kd:hunter2@", "kd:***@")
    assert space_config(record.study).study.storage == "postgresql://kd:***@db.lan/kd"
    # a URL the file does not write as it is, escaped in a double-quoted string or folded over
    # two lines: its document again, without comments, the password hidden all the same
    for written in (
        'storage: "postgresql://kd:hunter\\x32@db.lan/kd"',  # \x32 is "2"
        "storage: postgresql://kd:hunter2@db.lan/\n    kd",  # folded: "... db.lan/ kd"
    ):
        escaped = SPACE.replace("study: {name: s}", f"study:\n  name: s2  # mine\n  {written}")
        space = SearchSpace.from_yaml(escaped, source="s.yaml")
        assert "hunter2" in str(space.config.study.storage)
        record = Record(open_storage(url), "s2", space, target=1, resume=False)
        recorded = record.study.user_attrs["space"]
        assert "hunter2" not in recorded and "# mine" not in recorded
        again = space_config(record.study)
        assert str(again.study.storage).startswith("postgresql://kd:***@db.lan/")
        assert again.space == space.config.space and again.asha == space.config.asha
        record.storage.delete_study(record.study_id)  # name s2 free for the next


def test_a_new_sqlite_file_where_none_can_be_made_is_refused_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that refuses new files (read-only, immutable) gave SQLite's "unable to open
    database file", after three tries a second apart."""

    def refused(*_: object, **__: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("kdsearch.paths.tempfile.TemporaryFile", refused)
    with pytest.raises(KdsearchError) as err:
        open_storage(f"sqlite:///{tmp_path}/x.db")
    assert str(err.value) == (
        f"the study storage {tmp_path}/x.db: cannot write there (Operation not permitted)"
    )
    assert not (tmp_path / "x.db").exists()


def test_check_writes_fails_on_a_read_only_database_and_passes_a_storage_of_none(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=url)
    check_writes(open_storage(url), "s")  # a write that changes nothing
    read_only = RDBStorage(f"sqlite:///file:{tmp_path}/s.db?mode=ro&uri=true")
    with pytest.raises(optuna.exceptions.StorageInternalError):
        check_writes(read_only, "s")
    check_writes(optuna.storages.InMemoryStorage(), "s")  # not a database: nothing to check
