"""Where studies are kept: opening an SQLAlchemy storage from a URL (SQLite by default,
PostgreSQL for clusters) with one clear line for each way that fails, reading an SQLite file
without writing to it, and writes Optuna has no call for or makes one transaction at a time."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import BaseStorage, RDBStorage

from kdsearch.errors import StorageError, StudyError
from kdsearch.paths import writable_file
from kdsearch.recipe import load_yaml
from kdsearch.space import parse_url

PG_CONNECT_S = 10  # how long a PostgreSQL server may take to answer a connection
OPEN_ATTEMPTS = 3
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}  # where a URL that names none connects


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


def check_sqlite_file(url: str) -> None:
    """Refuse, in one line, an SQLite URL no study can be kept in: a database in memory, a file
    in a folder that does not exist, a folder, a file that cannot be made."""
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
    if (
        scheme(url) in ("postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg")
        and "connect_timeout" not in url
        and "PGCONNECT_TIMEOUT" not in os.environ  # the user's own
    ):
        # libpq waits without end for a host that drops packets: each of the attempts below
        # would cost the kernel's SYN timeout (about two minutes) before the one clear line
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_S}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # the dashboard may be reading at the same time
        check_sqlite_file(url)
    check_driver(url)  # what no retry mends
    failure: Exception | None = None
    for _ in range(OPEN_ATTEMPTS):
        try:
            return RDBStorage(with_driver(url), engine_kwargs=kwargs)
        except Exception as err:  # SQLAlchemy, driver and Optuna errors: cannot use this URL
            # Two processes opening a new database at once (two drivers on PostgreSQL; a search
            # and a reader of its new SQLite file) race to create Optuna's tables, and one of
            # them fails; a moment later the tables are there.
            failure = err
            time.sleep(0.5 + random.random())
    raise cannot_open(url, failure)


def scheme(url: str) -> str:
    """The part of `url` before `://`: the dialect, and its driver where one is named."""
    return url.partition("://")[0]


def cannot_open(url: str, err: Exception | None) -> StudyError:
    """The storage at `url` cannot be opened: the first line of `err`, the password hidden."""
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    return StudyError(
        f"cannot open the study storage {redact(url)}: {reason.replace(url, redact(url))}"
    )


# The pip distributions of SQLAlchemy's database drivers whose module is named otherwise
DISTRIBUTIONS = {
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
    "mysql.connector": "mysql-connector-python",
    "cx_Oracle": "cx-Oracle",
}


def check_driver(url: str) -> None:
    """Refuse `url` where SQLAlchemy cannot read it or the module of its driver is not
    installed (no retry mends these, and Optuna's message names no module), without
    connecting: what `run --check` can tell of a storage it does not open. A dialect of
    SQLAlchemy 1's kind (a `dbapi` method, no `import_dbapi`) is left for the opening to try.
    A password holding an '@' is refused too: SQLAlchemy reads the rest as the host."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    parsed = parse_url(url)  # one SQLAlchemy cannot read fails below
    if (
        parsed is not None
        and parsed.password is not None
        and "@" in f"{parsed.host}{parsed.database}"  # what came after an '@' in the password
    ):
        raise StudyError(
            f"cannot open the study storage {redact(url)}: its password holds an '@', "
            "which SQLAlchemy reads as the end of the password; write it as %40"
        )
    try:
        make_url(with_driver(url)).get_dialect().import_dbapi()
    except ImportError as err:
        module = err.name or "?"
        install = (
            f"pip install {DISTRIBUTIONS[module]}" if module in DISTRIBUTIONS else "pip install it"
        )
        hint = ", or write postgresql://, which uses psycopg2" if "postgres" in scheme(url) else ""
        raise StudyError(
            f"cannot open the study storage {redact(url)}: the module {module!r} its driver "
            f"needs is not installed; {install}{hint}"
        ) from None
    except (ArgumentError, NoSuchModuleError, ValueError) as err:  # not a URL SQLAlchemy reads
        raise cannot_open(url, err) from None
    except NotImplementedError:  # SQLAlchemy 1's kind of dialect: no import_dbapi to call
        pass


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


def storage_failure(storage: BaseStorage, err: Exception) -> StorageError:
    """A failed read or write of the study (a read-only file, a full disk, a lost server) as
    one line naming its cause, where Optuna guesses at "invalid data"."""
    cause = getattr(err.__cause__, "orig", None) or err.__cause__ or err
    text = str(cause).strip()
    reason = text.splitlines()[0] if text else type(cause).__name__
    url = redact(str(getattr(storage, "url", "")))
    return StorageError(f"cannot use the study storage {url}: {reason}")


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
    call for or takes a transaction for each of; a write the database refuses fails as Optuna's
    own do (`storage_errors`), but for a broken unique constraint, which the caller reads."""
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    assert isinstance(storage, RDBStorage)  # open_storage's
    try:
        with storage.engine.begin() as connection:
            yield connection
    except IntegrityError:
        raise
    except SQLAlchemyError as err:
        raise optuna.exceptions.StorageInternalError(str(err)) from err


def write_trial(
    storage: BaseStorage,
    trial_id: int,
    attrs: Mapping[str, Any],
    *,
    curve: Mapping[int, float] | None = None,
    driver: str | None = None,
) -> bool:
    """Set a running trial's user attributes `attrs`, and with `curve` (epoch: value) make its
    intermediate values that curve (any others deleted), as Optuna's `set_trial_user_attr` and
    `set_trial_intermediate_value` write them, in one transaction where Optuna takes one for
    each write (on SQLite each commit waits for the disk: 1.6 ms on the Zen 4 EPYC, so about
    35 ms for a trial's curve and attributes). With `driver`, only while the trial is that
    driver's; False where it wrote nothing for that reason. A trial that has finished raises
    Optuna's `UpdateFinishedTrialError`, as its own writes do. The trial's row is locked first
    (as Optuna's `tell` locks it), so two writers of one trial take turns: on PostgreSQL the
    second's delete would otherwise miss the first's new rows, and its inserts break their
    unique keys."""
    from optuna.storages._rdb.models import TrialModel
    from optuna.storages._rdb.models import TrialUserAttributeModel as Attr
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    try:
        with transaction(storage) as connection:
            row = select(TrialModel.state).where(TrialModel.trial_id == trial_id)
            if connection.execute(row.with_for_update()).scalar_one().is_finished():
                raise optuna.exceptions.UpdateFinishedTrialError(
                    f"trial {trial_id} has already finished and cannot be updated"
                )
            if driver is not None:
                mine = (Attr.trial_id == trial_id, Attr.key == "driver")
                named = connection.execute(select(Attr.value_json).where(*mine)).scalar()
                if named != json.dumps(driver):
                    return False
            _write(connection, trial_id, attrs, curve)
    except IntegrityError as err:  # another writer's, that no lock kept out (MySQL's gaps)
        raise optuna.exceptions.StorageInternalError(str(err)) from err
    return True


def _write(
    connection: Any, trial_id: int, attrs: Mapping[str, Any], curve: Mapping[int, float] | None
) -> None:
    """`write_trial`'s writes, on a connection in its transaction."""
    from optuna.storages._rdb.models import TrialIntermediateValueModel as Step
    from optuna.storages._rdb.models import TrialUserAttributeModel as Attr
    from sqlalchemy import delete, insert

    if attrs:
        connection.execute(delete(Attr).where(Attr.trial_id == trial_id, Attr.key.in_(attrs)))
        rows = [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
        ]
        connection.execute(insert(Attr), rows)
    if curve is not None:
        connection.execute(delete(Step).where(Step.trial_id == trial_id))
        steps = []
        for step, value in curve.items():
            stored, kind = Step.intermediate_value_to_stored_repr(value)
            steps.append(
                {
                    "trial_id": trial_id,
                    "step": step,
                    "intermediate_value": stored,
                    "intermediate_value_type": kind,
                }
            )
        if steps:
            connection.execute(insert(Step), steps)


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
