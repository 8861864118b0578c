"""The study is the record of a search (DESIGN section 5).

Every trial is written from the driver process only, by `Record`: created RUNNING when it is
proposed (with its Ray trial id, driver and full recipe), and finished exactly once as COMPLETE
(it reached the trial budget), PRUNED (ASHA stopped it) or FAIL (it raised, or its loss went
non-finite; the reason is a user attribute), with one intermediate value per epoch. A trial left
RUNNING by a driver that is gone (killed, interrupted) is adopted by `kdsearch run --resume` and
run again under the same number, so the study ends with exactly the trials asked for.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, update_wrapper
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import optuna
import yaml
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState
from pydantic import ValidationError

from kdsearch import __version__
from kdsearch.errors import KdsearchWarning, RecipeError, StorageError, StudyError
from kdsearch.paths import writable_file
from kdsearch.recipe import Recipe, describe, flatten, load_yaml, yaml_text
from kdsearch.space import PROMOTED, SearchSpace, SpaceFile, parse_url, search_name_problem

METRIC = "val_acc"
MAX_CRASHES = 3  # a trial whose driver died this often is not adopted again
PG_CONNECT_S = 10  # how long a PostgreSQL server may take to answer a connection
OPEN_ATTEMPTS = 3
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}  # where a URL that names none connects
HEARTBEAT_S = 30.0  # a driver refreshes its heartbeat this often ...
STALE_S = 300.0  # ... and is presumed gone after this long without one

optuna.logging.set_verbosity(optuna.logging.WARNING)


def default_storage(study_name: str) -> str:
    """SQLite under ./studies/ (which `kdsearch run` creates where it is missing)."""
    folder = Path("studies")
    if folder.exists() and not folder.is_dir():
        raise StudyError(
            "./studies is a file, not the folder the default storage goes in; move it, or pass "
            "--storage URL"
        )
    return f"sqlite:///studies/{study_name}.db"


def password_hidden_text(text: str, url: str | None, source: str) -> str:
    """A space file's `text` (from `source`) with the password of its study.storage `url`
    hidden, as every reader of the study sees the text; where the file does not write the URL
    as it is (a quoted string with escapes, a scalar folded over lines), its document again,
    without its comments."""
    if not url or redact(url) == url:
        return text
    shown = text.replace(url, redact(url))
    document = load_yaml(shown, source=source)
    if document["study"]["storage"] == redact(url):
        return shown
    document["study"]["storage"] = redact(url)
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def redact(url: str) -> str:
    """The URL with any password replaced, for messages: everything between the user's name
    and the URL's last `@`, so that a password holding an unencoded `@` (which SQLAlchemy
    splits at its first) is hidden whole; an `@` later in the URL hides more, never less."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL: nothing secret can be parsed out of it either
        return url.rpartition("@")[2]
    userinfo, at, place = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon or "/" in user:  # no password (or a path, as SQLite's)
        return url
    return f"{scheme}://{user}:***@{place}"


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite URL names (None for another database, or SQLite in memory)."""
    parsed = parse_url(url)
    if parsed is None or not parsed.drivername.startswith("sqlite"):
        return None
    if parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def storage_place(url: str) -> str:
    """Where the storage at `url` is, to tell apart two studies of one name: an SQLite file's
    absolute path, else the database's backend, host, port and name (not the driver, user,
    password or options, which name the same database in other ways)."""
    file = sqlite_file(url)
    if file is not None:
        return str(file.resolve())
    parsed = parse_url(url)
    if parsed is None:
        return redact(url)
    backend = parsed.get_backend_name()
    port = parsed.port or DEFAULT_PORTS.get(backend)
    host = (parsed.host or "").lower()
    return f"{backend}://{host}{f':{port}' if port else ''}/{parsed.database or ''}"


def open_storage(url: str) -> BaseStorage:
    """An Optuna RDB storage; an unreachable or malformed URL is one clear line."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    driver = url.partition("://")[0]
    if (
        driver in ("postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg")
        and "connect_timeout" not in url
        and "PGCONNECT_TIMEOUT" not in os.environ  # the user's own
    ):
        # libpq waits without end for a host that drops packets: each of the attempts below
        # would cost the kernel's SYN timeout (about two minutes) before the one clear line
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_S}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # the dashboard may be reading at the same time
        file = sqlite_file(url)
        if file is None:
            raise StudyError(
                f"{url}: an SQLite database in memory is lost when the command ends; name a "
                "file, e.g. sqlite:///studies/NAME.db"
            )
        if not file.parent.is_dir():
            raise StudyError(f"cannot open the study storage {url}: no folder {file.parent}")
        if file.is_dir():
            raise StudyError(f"cannot open the study storage {url}: {file} is a folder")
        if not file.exists():  # where it cannot be made, SQLite says "unable to open database file"
            writable_file(file, "the study storage")
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    parsed = parse_url(url)  # one SQLAlchemy cannot read fails below
    if (
        parsed is not None
        and parsed.password is not None
        and (
            "@" in f"{parsed.host}{parsed.database}"  # what came after an '@' in the password
        )
    ):
        raise StudyError(
            f"cannot open the study storage {redact(url)}: its password holds an '@', "
            "which SQLAlchemy reads as the end of the password; write it as %40"
        )
    failure: Exception | None = None
    for _ in range(OPEN_ATTEMPTS):
        try:
            return RDBStorage(with_driver(url), engine_kwargs=kwargs)
        except ImportError as err:  # no retry mends this; Optuna's own message names nothing
            module = getattr(err.__cause__, "name", None) or "?"
            hint = ", or write postgresql://, which uses psycopg2" if "postgres" in driver else ""
            raise StudyError(
                f"cannot open the study storage {redact(url)}: the module {module!r} its driver "
                f"needs is not installed; pip install it{hint}"
            ) from None
        except (ArgumentError, NoSuchModuleError) as err:  # no retry mends these
            failure = err
            break
        except Exception as err:  # SQLAlchemy, driver and Optuna errors: cannot use this URL
            # Two processes opening a new database at once (two drivers on PostgreSQL; a search
            # and a reader of its new SQLite file) race to create Optuna's tables, and one of
            # them fails; a moment later the tables are there.
            failure = err
            time.sleep(0.5 + random.random())
    text = str(failure).strip()
    reason = text.splitlines()[0] if text else type(failure).__name__
    reason = reason.replace(url, redact(url))
    raise StudyError(f"cannot open the study storage {redact(url)}: {reason}")


def refuse_foreign(file: Path, *, empty_ok: bool) -> None:
    """Refuse an SQLite `file` that is not an Optuna database (opening it would add Optuna's
    tables to it); an empty one only where a new study may start in it."""
    if not (empty_ok and file.stat().st_size == 0) and not holds_studies(file):
        with open(file, "rb") as head:  # SQLite's files start so
            start = head.read(16)
        why = (
            "it holds no Optuna tables"
            if start == b"SQLite format 3\x00"
            else ("it is empty" if not start else "it is not an SQLite database")
        )
        raise StudyError(f"{file} is not a study database ({why})")


def holds_studies(file: Path) -> bool:
    """Whether SQLite `file` is an Optuna database (read without writing to it)."""
    try:
        with read_only(file) as db:
            return has_studies_table(db)
    except sqlite3.Error as err:  # only "not a database" says foreign: a file locked, left
        # with a journal by a killed writer (which only a writable open rolls back) or
        # unreadable is for the real open to deal with
        return getattr(err, "sqlite_errorcode", None) != sqlite3.SQLITE_NOTADB


def holds_no_study(file: Path) -> bool:
    """Whether SQLite `file` is known to hold no study: no Optuna tables, or no row in its
    studies table (False where it cannot be read: locked, or unreadable)."""
    try:
        with read_only(file) as db:
            return not has_studies_table(db) or not db.execute("SELECT 1 FROM studies").fetchone()
    except sqlite3.Error:
        return False


def trials_held(file: Path, name: str) -> int | None:
    """How many trials study `name` holds in SQLite `file`, read without Optuna's storage (which
    is slower to open, and may write) and without writing; None where the file cannot tell
    (no Optuna tables; locked, or unreadable)."""
    query = (
        "SELECT COUNT(*) FROM trials WHERE study_id = "
        "(SELECT study_id FROM studies WHERE study_name = ?)"
    )
    try:
        with read_only(file) as db:
            return int(db.execute(query, (name,)).fetchone()[0]) if has_studies_table(db) else None
    except sqlite3.Error:
        return None


def already_held(name: str, trials: int) -> StudyError:
    """The refusal of a search without --resume in study `name`, which holds `trials`."""
    return StudyError(
        f"study {name!r} already holds {trials} trials; add --resume to finish it, or choose "
        "another --study name"
    )


@contextmanager
def read_only(file: Path) -> Iterator[sqlite3.Connection]:
    """A connection to SQLite `file` that cannot write to it."""
    uri = f"{file.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=60)) as db:
        yield db


def has_studies_table(db: sqlite3.Connection) -> bool:
    """Whether the SQLite database `db` has Optuna's studies table."""
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'studies'"
    return db.execute(query).fetchone() is not None


def with_driver(url: str) -> str:
    """`postgresql://` with the PostgreSQL driver kdsearch installs (psycopg2), where SQLAlchemy
    would pick psycopg 3, which is not installed, and so `postgres://`, the scheme many hosting
    services give out, which SQLAlchemy no longer reads; any other URL as it is."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if not url.startswith("postgresql://"):
        return url
    try:
        import psycopg  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def study_names(storage: BaseStorage) -> list[str]:
    """Names of the studies a storage holds."""
    return [s.study_name for s in storage.get_all_studies()]


def load_study(storage: BaseStorage, name: str) -> optuna.Study:
    """An existing study; a missing one lists the names the storage holds."""
    if name not in study_names(storage):
        held = ", ".join(study_names(storage)) or "none"
        raise StudyError(f"no study named {name!r} in this storage (it holds: {held})")
    return optuna.load_study(study_name=name, storage=storage)


def recorded(study: optuna.Study, key: str) -> str:
    """A study attribute `kdsearch run` records; a study it did not write is a clear error."""
    if key not in study.user_attrs:
        source = study.user_attrs.get("source_study")
        hint = f"; it holds the promotion runs of study {source!r}: use that" if source else ""
        raise StudyError(
            f"study {study.study_name!r} was not written by `kdsearch run` (it records no "
            f"{key!r}){hint}"
        )
    return str(study.user_attrs[key])


def space_config(study: optuna.Study) -> SpaceFile:
    """The search's space file as recorded in the study (its base is not loaded again); one
    that this kdsearch's checks refuse (recorded by an earlier one) is a clear error."""
    refused = (
        f"study {study.study_name!r}: the space file it recorded no longer passes this "
        "kdsearch's checks"
    )
    try:
        return SpaceFile.model_validate(load_yaml(recorded(study, "space"), source="study"))
    except ValidationError as err:
        raise StudyError(f"{refused}: {describe(err, SpaceFile)}") from None
    except RecipeError as err:  # YAML this kdsearch reads more strictly (a key given twice)
        raise StudyError(f"{refused}: {err}") from None


def base_recipe(study: optuna.Study) -> Recipe:
    """The search's base recipe, as recorded in its study."""
    return Recipe.from_yaml(recorded(study, "base_recipe"), source="study base recipe")


def promoted_name(name: str) -> str:
    """The promoted study of a search study (`kdsearch.promote`), in the same storage."""
    return f"{name}{PROMOTED}"


def promotion_held(storage: BaseStorage, name: str) -> bool | None:
    """Whether the study `promoted_name(name)` holds the promotion runs of search `name`: None
    where there is no such study, False where it is a search of its own (which an earlier
    kdsearch let take that name, and whose `promote` of `name` marked it as the promotion)."""
    for summary in storage.get_all_studies():
        if summary.study_name == promoted_name(name):
            return not is_search(summary.user_attrs)
    return None


def promoted_study(storage: BaseStorage, name: str) -> optuna.Study | None:
    """The study of search `name`'s promotion runs, where there is one (`promotion_held`)."""
    if not promotion_held(storage, name):
        return None
    return optuna.load_study(study_name=promoted_name(name), storage=storage)


def is_search(attrs: Mapping[str, Any]) -> bool:
    """Whether a study with these user attributes is a search: `kdsearch run` records its space
    when it creates one, `promote` never (its studies may lack `source_study` for a moment)."""
    return "space" in attrs


def is_promotion(attrs: Mapping[str, Any]) -> bool:
    """Whether a study with these user attributes holds `promote`'s runs (a search an earlier
    `promote` marked with `source_study` is still a search)."""
    return "source_study" in attrs and not is_search(attrs)


def not_the_promotion(name: str) -> StudyError:
    """The error for a study named as search `name`'s promotion that is not it."""
    return StudyError(
        f"study {promoted_name(name)!r} is not the promotion of study {name!r} but a search of "
        f"its own, where {name!r}'s promotion runs would go; copy it under another name "
        "(optuna copy-study) and delete it, or search again under another name"
    )


def trial_recipe(trial: FrozenTrial) -> Recipe:
    """The full recipe a trial trained with, as recorded."""
    if "recipe" not in trial.user_attrs:
        raise StudyError(f"trial {trial.number} records no recipe: not a trial of `kdsearch run`")
    return Recipe.from_yaml(str(trial.user_attrs["recipe"]), source=f"trial {trial.number}")


def storage_failure(storage: BaseStorage, err: Exception) -> StorageError:
    """A failed read or write of the study (a read-only file, a full disk, a lost server) as
    one line naming its cause, where Optuna guesses at "invalid data"."""
    cause = getattr(err.__cause__, "orig", None) or err.__cause__ or err
    text = str(cause).strip()
    reason = text.splitlines()[0] if text else type(cause).__name__
    url = redact(str(getattr(storage, "url", "")))
    return StorageError(f"cannot use the study storage {url}: {reason}")


P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def storage_errors(storage: BaseStorage, then: str = "") -> Iterator[None]:
    """A failed read or write of `storage` in the block as one line (`storage_failure`),
    followed by `then` (what was kept, what to do)."""
    try:
        yield
    except optuna.exceptions.StorageInternalError as err:
        failure = storage_failure(storage, err)
        raise StorageError(f"{failure}; {then}" if then else str(failure)) from None


@contextmanager
def transaction(storage: BaseStorage) -> Iterator[Any]:
    """A connection in one transaction on `storage`'s database, for the writes Optuna has no
    call for; a write the database refuses fails as Optuna's own do (`storage_errors`), but
    for a broken unique constraint, which the caller reads."""
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    assert isinstance(storage, RDBStorage)  # open_storage's
    try:
        with storage.engine.begin() as connection:
            yield connection
    except IntegrityError:
        raise
    except SQLAlchemyError as err:
        raise optuna.exceptions.StorageInternalError(str(err)) from err


def check_writes(storage: BaseStorage, name: str) -> None:
    """Fail as a write to `storage` does (`storage_errors`) where it takes none (a read-only
    file or mount, a standby server), by a write to the study `name` that changes nothing;
    a storage not of a database (Optuna's in memory, its journal) passes unchecked."""
    from optuna.storages._rdb.models import StudyModel
    from sqlalchemy import update

    if not isinstance(storage, RDBStorage):
        return
    with transaction(storage) as connection:
        same = update(StudyModel).where(StudyModel.study_name == name).values(study_name=name)
        connection.execute(same)


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
        # A driver alone keeps the stream of the count only, so a search is reproducible.
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
        if self._others_alive():
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
                    self.storage.set_trial_user_attr(orphan._trial_id, "crashes", crashes)
                    self._started(orphan._trial_id, ray_trial_id, attempt + 1, recipe)
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
        self._started(trial._trial_id, ray_trial_id, attempt, recipe)
        return Plan(trial.number, recipe)

    def _started(self, trial_id: int, ray_trial_id: str, attempt: int, recipe: Recipe) -> None:
        """Record what a claimed trial runs as: its Ray trial, its attempt and its recipe."""
        for key, value in (
            ("ray_trial_id", ray_trial_id),
            ("attempt", attempt),
            ("training_attempt", 0),  # not yet: Tune may hold it back for a slot (`training`)
            ("recipe", recipe.to_yaml()),
        ):
            self.storage.set_trial_user_attr(trial_id, key, value)

    @clear_storage_errors
    def training(self, number: int) -> None:
        """Record that trial `number`'s attempt has started training (Tune gave it a slot):
        should its driver die now, the trial may be what killed it."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        attempt = self.storage.get_trial(trial_id).user_attrs.get("attempt", 1)
        self.storage.set_trial_user_attr(trial_id, "training_attempt", attempt)

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
                if connection.execute(select(TrialModel.trial_id).where(*running)).first() is None:
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
        if any(step > last for step in trial.intermediate_values):
            self._drop_steps_after(trial_id, last)
        try:
            for epoch, value in sorted(curve.items()):
                self.storage.set_trial_intermediate_value(trial_id, epoch, value)
            for key, value in attrs.items():
                self.storage.set_trial_user_attr(trial_id, key, value)
            if state == TrialState.COMPLETE:
                self.study.tell(number, curve[last], skip_if_finished=True)
            else:
                self.study.tell(number, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another driver finished it as this one wrote: the first finish stands

    def _drop_steps_after(self, trial_id: int, last: int) -> None:
        """Delete a trial's intermediate values past step `last`: an earlier attempt's, whose
        driver stopped while recording it (killed, or a write the storage refused) before the
        trial was adopted. Optuna has no call for it, and would read them as this attempt's:
        a pruned trial's value is its last step's, and TPE ranks pruned trials by it."""
        from optuna.storages._rdb.models import TrialIntermediateValueModel as Step
        from sqlalchemy import delete

        with transaction(self.storage) as connection:
            connection.execute(delete(Step).where(Step.trial_id == trial_id, Step.step > last))

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
        others_alive = self._others_alive(beats)
        now = datetime.now()
        # one that names this driver but that this Record did not claim: an earlier process of
        # the same host and pid left it (a container restarted: PID 1)
        return [
            t
            for t in others
            if t.user_attrs.get("driver") == self.driver or driver_gone(t, beats, others_alive, now)
        ]

    def _others_alive(self, beats: Mapping[str, Any] | None = None) -> bool:
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


# Where a machine finds things and runs them, not what a trial trains: a driver joining a study
# from another machine may set these its own way.
PER_MACHINE = frozenset(
    {
        "data.root",
        "data.download",
        "teacher.checkpoint",
        "teacher.heads.checkpoint",
        "device",
        "compile",
    }
)


def machine_settings(recipe: Recipe, searched: Iterable[str]) -> dict[str, Any]:
    """The PER_MACHINE settings of `recipe`, but for those a space searches (`searched`)."""
    return {key: recipe.get(key) for key in PER_MACHINE if key not in searched}


def changed_settings(study: optuna.Study, space: SearchSpace) -> list[str]:
    """What `space` changes of the settings `study` recorded, that its trials depend on: the
    trial budget, the base recipe and the searched parameters (not the trial count, the
    resources or what follows the search)."""
    changed = []
    recorded_space = space_config(study)
    budget = recorded_space.asha.max_epochs
    if budget != space.config.asha.max_epochs:
        changed.append(f"asha.max_epochs {budget} -> {space.config.asha.max_epochs}")
    was = flatten(base_recipe(study).to_dict())
    now = flatten(space.base.to_dict())
    changed += [
        f"base.{key} {was.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(was.keys() | now.keys())
        if was.get(key) != now.get(key) and key not in PER_MACHINE
    ]
    params = recorded_space.space
    for key in sorted(params.keys() | space.params.keys()):
        old, new = params.get(key), space.params.get(key)
        if old is None or new is None:
            changed.append(f"space.{key} {'added' if old is None else 'removed'}")
        elif old != new:  # each field that differs, as the base's keys are
            was_p, now_p = old.model_dump(), new.model_dump()
            changed += [
                f"space.{key}.{field} {yaml_text(was_p.get(field))} -> "
                f"{yaml_text(now_p.get(field))}"
                for field in sorted(was_p.keys() | now_p.keys())
                if was_p.get(field) != now_p.get(field)
            ]
    return changed


def retuned_settings(study: optuna.Study, space: SearchSpace) -> list[str]:
    """What `space` changes of the study's recorded settings that a resume may change (not the
    trials' own, which `changed_settings` guards) but that decide how its remaining trials are
    stopped or proposed: ASHA's rungs, the sampler and its seed."""
    if "space" not in study.user_attrs:
        return []
    try:
        was = space_config(study)
    except StudyError:  # recorded by a kdsearch whose file this one refuses: nothing to compare
        return []
    now = space.config
    pairs = [
        ("asha.grace_epochs", was.asha.grace_epochs, now.asha.grace_epochs),
        ("asha.reduction_factor", was.asha.reduction_factor, now.asha.reduction_factor),
        ("search.sampler", was.search.sampler, now.search.sampler),
        ("search.seed", was.search.seed, now.search.seed),
    ]
    return [f"{key} {a!r} -> {b!r}" for key, a, b in pairs if a != b]


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


def ranked(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials, best first (all of them reached the same budget)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(done, key=lambda t: (-float(t.value or 0.0), t.number))
