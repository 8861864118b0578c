"""What the commands share: recipes and `--set`, the teacher's preparation, a student's
training, a study's storage, and the checks made before Ray is imported."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.display import console, epoch_progress
from kdsearch.errors import KdsearchError, RecipeError, StudyError
from kdsearch.recipe import DataConfig, Recipe, empty_section, leaf_changes, load_yaml
from kdsearch.space import (  # not kdsearch.study's promoted_name: that imports Optuna
    PROMOTED,
    study_name_problem,
)

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from kdsearch.data import ImageData
    from kdsearch.study.record import Record
    from kdsearch.teacher import Teacher, TeacherFiles
    from kdsearch.train import Result


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`path=value` pairs; each value is read as YAML, so `6`, `true`, `[1, 2]` keep their types,
    and a mapping sets the keys it names (`optim={lr: 0.1}` is `optim.lr=0.1`)."""
    changes: dict[str, Any] = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise KdsearchError(
                f"--set {item!r}: expected PATH=VALUE, e.g. distill.kd.temperature=6"
            )
        value = load_yaml(text, source=f"--set {path}")
        if empty := empty_section(path.strip(), value):
            raise KdsearchError(
                f"--set {item}: {empty} is an empty mapping, which changes nothing; name the "
                f"keys to change ({empty}.KEY=VALUE)"
            )
        for key, leaf in leaf_changes({path.strip(): value}).items():
            if key in changes:  # the last would win without a word
                raise KdsearchError(
                    f"--set {key} given twice ({changes[key]!r}, then {leaf!r}); give it once"
                )
            changes[key] = leaf
    return changes


def load_recipe(path: str, sets: Sequence[str]) -> Recipe:
    """A recipe file with the command line's `--set` overrides applied."""
    recipe = Recipe.load(path)
    if not sets:
        return recipe
    # paths given on the command line: relative to the working folder
    return recipe.override(parse_sets(sets), source="--set").resolve_paths(Path.cwd())


def loaded_data(cfg: DataConfig) -> ImageData:
    """The data set `cfg` names, with the progress of a folder's decoding (its first load)
    and a line on its splits."""
    from kdsearch.data import load_data

    with console.status("loading data"):
        data = load_data(
            cfg, progress=lambda what, done, total: console.print(f"{what}: {done}/{total}")
        )
    console.print(
        f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
        f"{data.channels}x{data.image_size}x{data.image_size}, {data.num_classes} classes"
    )
    return data


def prepare_teacher(
    recipe: Recipe, data: ImageData, heads: bool, record: Record | None = None
) -> Teacher:
    """The recipe's teacher (and its heads when asked), with progress while either trains.
    With `record` (a search), a teacher or heads file its trials learned from that this
    machine would have to train again is refused before the training: trained again, weights
    need not hash the same (on a GPU they never do), and `same_teacher`, which then records
    the files or refuses others, would refuse them only after hours."""
    from kdsearch.teacher import (
        TeacherFiles,
        cached_teacher_path,
        get_teacher,
        teacher_heads_path,
        with_heads,
    )

    if record is not None and recipe.teacher.checkpoint is None:
        not_retrained(record, cached_teacher_path(recipe, data), heads=False)
    with epoch_progress("teacher", recipe.teacher.train.epochs) as report:
        teacher = get_teacher(recipe, data, report, heads=False)
    files = None if record is None else TeacherFiles.of(teacher, heads=False)
    if record is not None and files is not None:  # another teacher: said before heads are
        refuse_other_teacher(record, files)  # looked for or trained
    if heads:
        path = teacher_heads_path(recipe, data, teacher)  # hashes a checkpoint teacher: once
        if record is not None and recipe.teacher.heads.checkpoint is None:
            not_retrained(record, path, heads=True)
        with epoch_progress("teacher heads", recipe.teacher.heads.epochs) as heads_report:
            teacher = with_heads(recipe, data, teacher, report=heads_report, path=path)
    if record is not None and files is not None:
        same_teacher(record, TeacherFiles.of(teacher, heads, digest=files.digest))
    return teacher


def student_trained(what: str, recipe: Recipe, data: ImageData, teacher: Teacher | None) -> Result:
    """A student trained from `recipe` (against `teacher`, where its terms need one), with the
    progress of its epochs under the label `what`."""
    from kdsearch.train import train

    with epoch_progress(what, recipe.schedule.epochs) as report:
        return train(
            recipe,
            data,
            report,
            teacher=teacher.model if teacher else None,
            teacher_heads=teacher.heads if teacher else None,
        )


def same_teacher(record: Record, files: TeacherFiles) -> None:
    """Record in the study the teacher files its trials learn from, or, where a driver before
    recorded them, refuse other ones: one study, one teacher."""
    from kdsearch.study.storage import storage_errors

    if recorded_teacher(record) is None:
        with storage_errors(record.storage):
            record.study.set_user_attr("teacher_files", files.attrs())
    refuse_other_teacher(record, files)


def refuse_other_teacher(record: Record, files: TeacherFiles) -> None:
    """Refuse teacher files that hash otherwise than those the study records its trials
    learned from: one study, one teacher."""
    recorded = recorded_teacher(record)
    if recorded is not None and (problem := files.changed_since(recorded)):
        raise StudyError(
            f"study {record.study.study_name!r}: {problem}; put that file back, or search in a "
            "new study (--study NAME)"
        )


def recorded_teacher(record: Record) -> dict[str, Any] | None:
    """The teacher files the study records its trials learned from (`same_teacher`), if any."""
    from kdsearch.study.storage import storage_errors

    with storage_errors(record.storage):
        recorded: dict[str, Any] | None = record.study.user_attrs.get("teacher_files")
    return recorded


def not_retrained(record: Record, path: Path, *, heads: bool) -> None:
    """Refuse where the study records the teacher file (with `heads`: its heads' file) its
    trials learned from, and `path`, where this machine would find it cached, holds nothing."""
    recorded = recorded_teacher(record) or {}
    part = "heads_" if heads else ""
    if f"teacher_{part}file" not in recorded or path.is_file():
        return
    what, key = (
        ("teacher's heads", "teacher.heads.checkpoint")
        if heads
        else ("teacher", "teacher.checkpoint")
    )
    source = Path(str(recorded[f"teacher_{part}file"]))
    learned = (
        f"study {record.study.study_name!r}: its trials learned from the {what} in {source} "
        f"(weights hash {recorded[f'teacher_{part}digest']}), "
    )
    retrain = (
        "trained again here it need not hash the same, and would be refused after its training"
    )
    way_out = f"or name it with --set {key}=FILE, or search in a new study (--study NAME)"
    if source == path.absolute():  # this machine's own cache, emptied since
        raise StudyError(
            f"{learned}which is gone from this machine; {retrain}: put a copy of it back at "
            f"{path}, {way_out}"
        )
    raise StudyError(
        f"{learned}and this machine has no copy at {path}; {retrain}: copy that file to {path}, "
        f"{way_out}"
    )


def password_hidden(url: str) -> str:
    """' (its password hidden)' to follow a printed command whose storage URL `redact` has
    shortened, else ''."""
    from kdsearch.study.storage import redact

    return " (its password hidden)" if redact(url) != url else ""


def run_resumed(
    space: str,
    study: str | None,
    storage: str | None,
    trials: int | None,
    address: str | None,
    sets: Sequence[str],
) -> str:
    """`kdsearch run SPACE` with the options given (those that are not None), and --resume."""
    parts = ["kdsearch", "run", space]
    for option, value in (
        ("--study", study),
        ("--storage", storage),
        ("--trials", trials and str(trials)),
        ("--address", address),
    ):
        if value:
            parts += [option, value]
    for item in sets:
        parts += ["--set", item]
    return shlex.join([*parts, "--resume"])


def storage_url(given: str) -> str:
    """A --storage value as a URL: an SQLAlchemy URL as it is, a file's path as
    sqlite:///ABSOLUTE_PATH."""
    return given if "://" in given else f"sqlite:///{Path(given).expanduser().resolve()}"


def study_file(study: str) -> Path:
    """./studies/<study>.db; for a promoted study without a file of its own, the search's,
    where `promote` records it."""
    own = Path("studies") / f"{study}.db"
    search = Path("studies") / f"{study.removesuffix(PROMOTED)}.db"
    return search if not own.is_file() and search.is_file() else own


def refuse_unnamed(
    study: str, then: str = "a study database elsewhere: pass --storage FILE"
) -> None:
    """Refuse a `study` no search takes as its name where it would name a file of studies/
    (`trials ../x` would read ./x.db), saying `then`: one line, and no OSError for a name too
    long (a promoted study's is its search's file)."""
    if problem := study_name_problem(study.removesuffix(PROMOTED)):
        raise KdsearchError(f"{problem}; {then}")


def storage_option(study: str, url: str) -> str:
    """` --storage URL` (its password hidden) for a command on `study` in the storage at `url`,
    or nothing where that is the storage the command finds by itself (`study_file`)."""
    from kdsearch.study.storage import redact, storage_place

    found = storage_place(f"sqlite:///{study_file(study)}")
    return "" if storage_place(url) == found else f" --storage {shlex.quote(redact(url))}"


def recorded_resume(attrs: Mapping[str, Any], name: str, url: str) -> str:
    """The command that resumes the search of study `name`, from the options its latest driver
    recorded (`Record.record_options`; a study searched before they were: SPACE for its file,
    and no other options)."""
    from kdsearch.study.storage import redact

    options = attrs.get("run_options", {})
    space = options.get("space")
    if space is not None and Path(space).is_relative_to(Path.cwd()):
        space = str(Path(space).relative_to(Path.cwd()))
    storage = redact(url) if storage_option(name, url) else None
    return run_resumed(
        space or "SPACE",
        options.get("study", name),  # None: the run named none (the space's)
        storage,
        options.get("trials"),
        options.get("address"),
        options.get("set", []),
    )


def study_storage(study: str, given: str | None) -> tuple[BaseStorage, str]:
    """The storage of an existing study and its URL: `given` (a URL or an SQLite file), else
    `study_file`."""
    if given is None:
        refuse_unnamed(study)
        path = study_file(study)
        if not path.is_file():
            raise KdsearchError(
                f"no study database at {path} ({studies_here()}); check the name, or pass "
                "--storage with the study's file or URL"
            )
        given = f"sqlite:///{path}"
    url = storage_url(given)
    return existing_storage(url), url


def studies_here(shown: int = 8) -> str:
    """What ./studies holds, for a study name that names no file there (a typo, or a command
    run from another folder than the search's)."""
    folder = Path("studies")
    if not folder.is_dir():
        return "no studies/ folder here: a search keeps its study in studies/ where it ran"
    names = sorted(f.stem for f in folder.glob("*.db"))
    if not names:
        return "studies/ holds no study database"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"studies/ holds {', '.join(names[:shown])}{more}"


def existing_storage(url: str) -> BaseStorage:
    """The storage at `url`, which holds studies already: a missing SQLite file, or one that is
    not Optuna's, is an error, where opening it would silently make it a study database."""
    from kdsearch.study.storage import open_storage, refuse_foreign, sqlite_file

    file = sqlite_file(url)
    if file is not None and file.is_dir():
        raise KdsearchError(f"{file} is a folder, not a study database")
    if file is not None and not file.is_file():
        raise KdsearchError(f"no study database at {file}")
    if file is not None:
        refuse_foreign(file, empty_ok=False)
    return open_storage(url)


def note_unfinished_search(storage: BaseStorage, url: str, name: str, does: str) -> None:
    """Say so where the search of study `name` (in `storage`, at `url`) is not over: another
    process searches it now, or one that stopped (Ctrl-C, a kill) left trials to run. What
    `does` (promotes, exports, reports on) is then the best trials so far, which need not be
    the search's."""
    from kdsearch.study.contents import load_study, space_config
    from kdsearch.study.drivers import left_running, searching_now

    if drivers := searching_now(storage, name):
        more = f" and {len(drivers) - 1} more" if len(drivers) > 1 else ""
        console.print(
            f"note: {name!r} is still being searched (by {drivers[0]}{more}); this {does} its "
            "best trials so far, and once the search ends they may be others"
        )
        return
    study = load_study(storage, name)
    if "space" not in study.user_attrs:  # not a kdsearch search: no target to hold it to
        return
    trials = study.get_trials(deepcopy=False)
    # the trials its last driver was to run: its --trials, else its space's; unknown for a
    # study searched before kdsearch recorded run_options, or whose space it now refuses
    options = study.user_attrs.get("run_options")
    target = None if options is None else options.get("trials")
    if options is not None and target is None:
        with suppress(StudyError):
            target = space_config(study).search.trials
    finished = sum(t.state.is_finished() for t in trials)
    short = target is not None and finished < target
    left = left_running(storage, name, trials)
    if not short and not left:
        return
    of = f" of its {target}" if short else ""
    counted = f"{finished}{of} trial{'s' * ((target if short else finished) != 1)}"
    running = f", {numbered('trial', left, '#')} left RUNNING" if left else ""
    console.print(
        f"note: the search of {name!r} stopped with {counted} finished{running}; this "
        f"{does} its best trials so far, and "
        f"`{recorded_resume(study.user_attrs, name, url)}`{password_hidden(url)} finishes the "
        "search",
        soft_wrap=True,
    )


def numbered(word: str, items: Sequence[int], mark: str = "") -> str:
    """`word`, in the plural for more than one, and the `items` marked: "seed 2", "trials #1,
    #4"."""
    return f"{word}{'s' * (len(items) > 1)} " + ", ".join(f"{mark}{i}" for i in items)


def device_type(name: str) -> str | None:
    """The type of device a recipe's `device` is here; None where it names one not here."""
    from kdsearch.train import resolve_device

    try:
        return resolve_device(name).type
    except RecipeError:
        return None


def refuse_other_kdsearch(cwd: Path) -> None:
    """Ray's workers import from the driver's working directory first: refuse a kdsearch there
    other than the one running (a checkout of another version), whose code every trial would
    run instead, failing on recipes this one writes."""
    theirs, ours = cwd / "kdsearch", Path(__file__).resolve().parents[1]
    if not (theirs / "__init__.py").is_file() or theirs.resolve() == ours:
        return
    if _sources(theirs) != _sources(ours):
        raise KdsearchError(
            f"{theirs} is another kdsearch than the one running ({ours}), and Ray's workers "
            "would import it from the working directory; run kdsearch from another directory"
        )


def _sources(package: Path) -> dict[Path, bytes]:
    return {f.relative_to(package): f.read_bytes() for f in sorted(package.rglob("*.py"))}


def use_ray_token(env: MutableMapping[str, str]) -> None:
    """Clusters started with `ray start` check a token that Ray loads by itself only for
    `--address auto`; for an explicit address, turn token mode on when a token is at hand. Ray
    reads this setting when it is first imported, so this runs before kdsearch.search is."""
    if "RAY_AUTH_MODE" in env:
        return
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_TOKEN" in env or token_file.is_file():
        env["RAY_AUTH_MODE"] = "token"
