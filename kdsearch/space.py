"""Search spaces: a base recipe, distributions over dotted recipe paths, and how to search them
(DESIGN section 4).

A space is checked completely when it is loaded, before anything runs: every path exists in the
recipe and is not one the search prepares once (the data set, the teacher), every bound is valid,
every value a parameter can take fits the recipe's type there, and every `when` refers to an
earlier parameter and to values it can take, and can hold with the conditions it depends on.
Nothing searched is lost: a `$decision` is named by some `when`, and a section is not searched
together with a key inside it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import Field, ValidationError, field_validator, model_validator

from kdsearch.errors import RecipeError
from kdsearch.recipe import (
    Count,
    Recipe,
    Section,
    Seed,
    describe,
    empty_section,
    followed,
    leaf_changes,
    load_yaml,
    not_a_mapping,
    placement_problem,
    read_text,
    yaml_text,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
PROMOTED = "-promoted"  # the promotion runs of search S are study S-promoted, beside it


NAME_MAX = 200  # characters: with ".db-journal" or "-promoted" added, under a file name's 255


def parse_url(url: str) -> URL | None:
    """`url` as SQLAlchemy reads it; None where it cannot (not a URL, or a port that is not a
    number)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def study_name_problem(text: str) -> str | None:
    """Why `text` cannot name a study (it names files and folders), or None."""
    if len(text) > NAME_MAX:
        return f"{text[:20]}...: a study name is at most {NAME_MAX} characters, not {len(text)}"
    if re.fullmatch(NAME_PATTERN, text):
        return None
    return (
        f"{text!r}: a study name is letters, digits, '_', '.' and '-', not starting with '.', "
        "'_' or '-'"
    )


def search_name_problem(text: str) -> str | None:
    """Why a new search may not take the name `text`, or None. Checked where a search starts,
    not in the space file's schema: a study an earlier kdsearch recorded under such a name must
    still load."""
    if text.endswith(PROMOTED):
        return (
            f"{text!r}: a name ending in {PROMOTED} is kept for the promotion runs of the search "
            f"{text.removesuffix(PROMOTED)!r}; choose another"
        )
    return None


Scalar = bool | int | float | str | None
# Recipe sections the search prepares once, from the base recipe, before any trial: the data set
# (loaded once, shared through Ray's object store) and the teacher with its heads.
PREPARED_ONCE = ("data", "teacher")


class _Param(Section):
    when: dict[str, Any] | None = None


class FloatParam(_Param):
    """A float in [low, high], on a log scale or in steps if asked."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        _check_bounds(self.low, self.high, self.log, self.step)
        return self


class IntParam(_Param):
    """An integer in [low, high], on a log scale or in steps if asked."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        _check_bounds(self.low, self.high, self.log, self.step if self.step != 1 else None)
        return self


class CategoricalParam(_Param):
    """One of a list of values; a value may itself be a list (an HSAKD placement, say)."""

    type: Literal["categorical"]
    choices: Annotated[list[Any], Field(min_length=1)]

    @model_validator(mode="after")
    def _plain(self) -> CategoricalParam:
        # A study stores choices as JSON text (`choice_labels`): YAML's dates and timestamps
        # are not JSON, and failed at the first trial, after the study had started.
        for choice in self.choices:
            for odd in _not_plain(choice):
                where = "is" if odd is choice else f"holds {odd!r},"
                raise ValueError(
                    f"choice {choice!r} {where} a {type(odd).__name__}, which a study cannot "
                    "store; quote it to make it text"
                )
        return self

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalParam:
        # A repeated choice is sampled as its first copy (labels are matched by equality).
        for i, choice in enumerate(self.choices):
            same = [c for c in self.choices[:i] if c == choice]
            if same and repr(same[0]) == repr(choice):
                raise ValueError(f"choices list {choice!r} twice")
            if same and isinstance(same[0], bool) != isinstance(choice, bool):
                raise ValueError(
                    f"choices list {same[0]!r} and {choice!r}, which differ in YAML but a study "
                    "stores as one value (Python counts True as 1 and False as 0); quote one "
                    "to make it text"
                )
            if same:
                raise ValueError(f"choices list {same[0]!r} and {choice!r}, which are equal")
        return self


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _not_plain(value: Any) -> list[Any]:
    """The first part of `value` that is not YAML's plain data (null, a boolean, a number, text,
    and lists and mappings of them), as a list of one, or [] where all of it is."""
    if value is None or isinstance(value, bool | int | float | str):
        return []
    if isinstance(value, list | dict):
        parts = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        return next((odd for p in parts if (odd := _not_plain(p))), [])
    return [value]


def _check_bounds(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low ({low}) is above high ({high})")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0, got {low}")
    if log and step is not None:
        raise ValueError("log and step cannot be combined")
    if step is not None:
        _check_step(low, high, step)


def _check_step(low: float, high: float, step: float) -> None:
    """`step` divides high - low, counted in decimals as Optuna does (which otherwise lowers
    `high` to the last step below it, with a warning, and may leave a single value)."""
    d_low, d_step = Decimal(str(low)), Decimal(str(step))
    span = Decimal(str(high)) - d_low
    if span % d_step == 0:
        return
    below = d_low + span // d_step * d_step
    fits = [below, below + d_step] if below > d_low else [below + d_step]
    as_number = int if isinstance(low, int) else float
    highs = " or ".join(str(as_number(h)) for h in fits)
    raise ValueError(
        f"step {step} does not divide high - low ({as_number(span)}); high {highs} would fit"
    )


class StudyConfig(Section):
    """Where the record of the search lives."""

    name: str
    storage: str | None = None  # default: sqlite:///studies/<name>.db; a path is an SQLite file

    @field_validator("name")
    @classmethod
    def _usable(cls, value: str) -> str:
        if problem := study_name_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("storage")
    @classmethod
    def _parsable(cls, value: str | None) -> str | None:
        """An SQLAlchemy URL that parses, or a path (no `://`), as `--storage` takes."""
        if value is not None and "://" in value and parse_url(value) is None:
            raise ValueError(
                f"{value!r} is not an SQLAlchemy URL "
                "(dialect://user:password@host:port/database, the port a number)"
            )
        return value


class PerTrialConfig(Section):
    """Resources of one trial. `gpu: auto` is 1/concurrent of a GPU where the cluster has GPUs."""

    cpu: Annotated[float, Field(gt=0)] = 1.0
    gpu: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"


class TeacherStoreConfig(Section):
    """The teacher-output store: the teacher's outputs for each epoch computed once and read by
    every trial on the machine (see `kdsearch.store`). `budget_mb` caps the store's size on the
    disk, epochs being computed included (trials run the teacher live for an epoch that does not
    fit); an epoch of at most `device_mb` is copied to a trial's GPU."""

    enabled: bool = True
    budget_mb: Annotated[float, Field(ge=0)] = 4096.0
    device_mb: Annotated[float, Field(ge=0)] = 1024.0


class SearchConfig(Section):
    """How many trials, how many at once, and how they are proposed."""

    trials: Count = 16
    concurrent: Count = 2
    per_trial: PerTrialConfig = PerTrialConfig()
    sampler: Literal["tpe", "random"] = "tpe"
    seed: Seed = 0
    teacher_store: TeacherStoreConfig = TeacherStoreConfig()


class AshaConfig(Section):
    """Successive halving over epochs: a trial runs at most `max_epochs`; at `grace_epochs`
    and every `reduction_factor` times more, only the best 1/reduction_factor continue."""

    max_epochs: Count
    grace_epochs: Count = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0

    @model_validator(mode="after")
    def _grace_within_budget(self) -> AshaConfig:
        if self.grace_epochs > self.max_epochs:
            raise ValueError(
                f"grace_epochs ({self.grace_epochs}) is above max_epochs ({self.max_epochs})"
            )
        return self


class PromoteConfig(Section):
    """Re-training of the best trials at full budget (`epochs`: the base recipe's if null)."""

    top_k: Count = 3
    seeds: Count = 3
    epochs: Count | None = None


class ExportConfig(Section):
    """Where the winner is written."""

    dir: str

    @field_validator("dir")
    @classmethod
    def _home(cls, value: str) -> str:
        if not value.strip():  # read as `.`, the working folder, it was refused for its files
            raise ValueError("is empty; name the folder to export the winner to")
        return os.path.expanduser(value)  # as a recipe's paths: `~/x` was a folder named ~


class SpaceFile(Section):
    """The YAML file as written."""

    study: StudyConfig
    base: dict[Any, Any] | str  # a recipe's own keys are checked by the recipe
    space: dict[str, Param]
    search: SearchConfig = SearchConfig()
    asha: AshaConfig
    promote: PromoteConfig | None = None
    export: ExportConfig | None = None

    @field_validator("base", mode="before")
    @classmethod
    def _recipe_or_file(cls, value: Any) -> Any:
        if not isinstance(value, dict | str):
            got = yaml_text(value)
            raise ValueError(f"a recipe (a mapping) or the path of a recipe file, got {got}")
        return value


class SuggestTrial(Protocol):
    """The part of `optuna.Trial` a space samples with (kept as a protocol: no optuna import)."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = ..., log: bool = ...
    ) -> float: ...

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = ..., log: bool = ...
    ) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


# the space's settings that `kdsearch run` also takes as options of its own
COMMAND_LINE = {
    "search.trials": "`kdsearch run SPACE --trials N`",
    "study.name": "`kdsearch run SPACE --study NAME`",
    "study.storage": "`kdsearch run SPACE --storage URL`",
}


@dataclass(frozen=True)
class SearchSpace:
    """A validated space: the base recipe, the parameters in order, and the search settings."""

    source: str
    text: str
    base: Recipe
    params: dict[str, FloatParam | IntParam | CategoricalParam]
    config: SpaceFile
    # the base recipe before --set changed it, and the keys --set gave (None: no --set)
    before_set: tuple[Recipe, tuple[str, ...]] | None = None
    # a categorical parameter's labels where a study holds them written otherwise
    labels: dict[str, list[Scalar]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, base_changes: Mapping[str, Any] | None = None) -> SearchSpace:
        """Read and check a space file; every problem names its key. `base_changes` (the CLI's
        --set) change the base recipe before the space is checked against it."""
        text = read_text(path)
        return cls.from_yaml(
            text, source=str(path), folder=followed(path).parent, base_changes=base_changes
        )

    @classmethod
    def from_yaml(
        cls,
        text: str,
        *,
        source: str,
        folder: Path = Path("."),
        base_changes: Mapping[str, Any] | None = None,
    ) -> SearchSpace:
        """Parse and check a space's YAML text; `folder` is where a `base` file is looked for."""
        raw = load_yaml(text, source=source)
        if not isinstance(raw, Mapping):
            raise not_a_mapping(raw, "a search space", SpaceFile.model_fields, source=source)
        if raw and raw.keys() <= Recipe.model_fields.keys():  # one line, not one per key
            raise RecipeError(
                f"{source}: a recipe, not a search space (which names a recipe in base: and "
                "what to search in space:); `kdsearch train` takes a recipe, `kdsearch run` a "
                "search space"
            )
        try:
            config = SpaceFile.model_validate(dict(raw))
        except ValidationError as err:
            raise RecipeError(f"{source}: {describe(err, SpaceFile)}") from None
        if isinstance(config.base, str):
            try:
                base = Recipe.load(folder / Path(config.base).expanduser())
            except RecipeError as err:
                raise RecipeError(f"{source}: base: {err}") from None
        else:
            base = Recipe.from_dict(config.base, source=f"{source}: base").resolve_paths(folder)
        before_set = (base, tuple(base_changes)) if base_changes else None
        if base_changes:  # paths given on the command line: relative to the working folder
            for key in base_changes:
                section = key.split(".")[0]
                if section in SpaceFile.model_fields and section not in Recipe.model_fields:
                    option = COMMAND_LINE.get(key)
                    raise RecipeError(
                        f"--set {key}: --set changes the base recipe; the space's own settings "
                        f"({', '.join(SpaceFile.model_fields)}) are set in {source}"
                        + (f", or this one with {option}" if option else "")
                    )
            base = base.override(base_changes, source="--set").resolve_paths(Path.cwd())
        space = cls(source, text, base, dict(config.space), config, before_set)
        space._check()
        return space

    def reachable(self, path: str) -> list[Any]:
        """Every value a recipe path can take in some trial: the base value, and the bounds or
        choices of the parameter that sets it, itself or as a key of a section it chooses
        (`distill.hsakd: {choices: [{weight: 1.0}, ...]}` reaches distill.hsakd.weight 1.0)."""
        values = [self.base.get(path)]
        for name, p in self.params.items():
            if name == path or path.startswith(f"{name}."):
                for value in _extremes(p):
                    changes = leaf_changes({name: value})
                    if path in changes:
                        values.append(changes[path])
        return values

    def labelled_as(self, recorded: Mapping[str, Sequence[Scalar]]) -> None:
        """Label categorical parameters' choices as a study's trials hold them (`recorded`),
        where those labels name the same choices in the same order, written otherwise: a
        section's choices are labelled with their JSON text, which changes with the writing."""
        for name, labels in recorded.items():
            p = self.params.get(name)
            if not isinstance(p, CategoricalParam) or choice_labels(p.choices) == p.choices:
                continue  # scalar choices are their own labels
            try:
                if [json.loads(str(x)) for x in labels] == p.choices:
                    self.labels[name] = list(labels)
            except ValueError:  # not labels of this kdsearch's writing
                continue

    @property
    def trial_recipe(self) -> Recipe:
        """The base recipe at the trial budget (`asha.max_epochs`)."""
        return self.base.with_epochs(self.config.asha.max_epochs)

    def suggest(self, trial: SuggestTrial) -> dict[str, Any]:
        """Sample every parameter whose `when` holds, in order: {name: value}."""
        chosen: dict[str, Any] = {}
        for name, p in self.params.items():
            if not self._active(p, chosen):
                continue
            if isinstance(p, FloatParam):
                value = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
                chosen[name] = value if p.step is None else on_grid(value, p.low, p.step)
            elif isinstance(p, IntParam):
                chosen[name] = trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)
            else:
                labels = self.labels.get(name) or choice_labels(p.choices)
                chosen[name] = p.choices[labels.index(trial.suggest_categorical(name, labels))]
        return chosen

    def overrides(self, chosen: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe changes of a sample: every chosen recipe path ($-decisions left out), a
        section's choice as the keys it names (the rest of the section stays the base's)."""
        return leaf_changes(
            {name: value for name, value in chosen.items() if not name.startswith("$")}
        )

    def recipe_for(self, chosen: Mapping[str, Any]) -> Recipe:
        """The trial recipe of a sample."""
        return self.trial_recipe.override(self.overrides(chosen), source=self.source)

    def _active(self, p: _Param, chosen: Mapping[str, Any]) -> bool:
        for ref, wanted in (p.when or {}).items():
            if ref not in chosen or chosen[ref] not in _allowed(self.params[ref], wanted):
                return False
        return True

    def _check(self) -> None:
        seen: list[str] = []
        for name, p in self.params.items():
            where = f"{self.source}: space.{name}"
            if name.startswith("$") and not isinstance(p, CategoricalParam):
                raise RecipeError(f"{where}: a $decision must be categorical")
            self._check_when(name, p, seen, where)
            self._check_jointly(name, where)
            if not name.startswith("$"):
                self._check_path(name, p, where)
            seen.append(name)
        if all(name.startswith("$") for name in self.params):
            raise RecipeError(
                f"{self.source}: space: searches no recipe path, so every trial would train the "
                "same recipe; name at least one (for example distill.kd.temperature)"
            )
        used = {ref for p in self.params.values() for ref in p.when or {}}
        for name in self.params:
            if name.startswith("$") and name not in used:
                raise RecipeError(
                    f"{self.source}: space.{name}: no when refers to it, so it changes nothing; "
                    f"name it in a when (when: {{{name}: VALUE}}) or leave it out"
                )
        self._check_placements()
        self._check_promotion_budget()

    def _check_path(
        self, name: str, p: FloatParam | IntParam | CategoricalParam, where: str
    ) -> None:
        """`name` is a recipe path that a trial can change, and every value of `p` fits there."""
        for other in self.params:
            if other.startswith(f"{name}.") or name.startswith(f"{other}."):
                raise RecipeError(
                    f"{where}: {other} is searched too, so one would overwrite the other; "
                    "search the section or the keys in it, not both"
                )
        budget = {"schedule.epochs", "schedule.milestones"}
        if name in budget or any(budget & leaf_changes({name: v}).keys() for v in _extremes(p)):
            raise RecipeError(f"{where}: the trial budget is asha.max_epochs; not searchable")
        if name == "seed":
            raise RecipeError(
                f"{where}: not searchable: the seed fixes the data order and augmentation as "
                "well as the student's initialisation, and every trial of a search trains on the "
                "same stream, so that trials differ only in what they search; the promotion "
                "trains the best recipes over several seeds (promote.seeds)"
            )
        if name.split(".")[0] in PREPARED_ONCE:
            raise RecipeError(
                f"{where}: not searchable: the data set and the teacher are prepared once per "
                f"search from the base recipe; set {name} in base or with --set"
            )
        base = self.trial_recipe
        try:
            base.get(name)
        except RecipeError as err:
            raise RecipeError(f"{where}: not a recipe path ({err})") from None
        # scaled to a trial's budget, milestones past the base's epochs were dropped, so
        # `schedule.kind: multistep` over a cosine base with such milestones (the defaults'
        # 150, 180, 210 under 20 epochs) trained every trial at a constant rate
        s = self.base.schedule
        late = [m for m in s.milestones if m >= s.epochs]
        if late and any(
            leaf_changes({name: v}).get("schedule.kind") == "multistep" for v in _extremes(p)
        ):
            raise RecipeError(
                f"{where}: multistep needs the base's schedule.milestones below its epochs "
                f"({s.epochs}), and {late} are not: a trial's budget would drop them and train "
                "at a constant rate; set schedule.milestones in base"
            )
        # at the trial budget, and at the base's own, which a promotion trains
        budgets = [(base, self._base_before_set(), "the recipe")]
        full = f"the base recipe at its own {self.base.schedule.epochs} epochs"
        before = self.before_set[0] if self.before_set else None
        budgets.append((self.base, before, full))
        for recipe, unset, what in budgets:
            for value in _extremes(p):
                problem = self._misfit(recipe, name, value)
                if problem is not None:
                    fitted = unset is not None and self._misfit(unset, name, value) is None
                    raise RecipeError(
                        f"{where}: {value!r} does not fit {what}{problem}" + self._set_blame(fitted)
                    )

    def _misfit(self, base: Recipe, name: str, value: Any) -> str | None:
        """Why `value` of `name` fits `base` under none of the settings its `when`s sample it
        under (the first one's problem), or None where it fits under one."""
        problems = []
        for fixed in self._conditions(name):
            try:
                base.override(leaf_changes({**fixed, name: value}), source="the recipe")
                return None
            except RecipeError as err:
                under = "".join(f" with {k} {v!r}" for k, v in fixed.items())
                problems.append(f"{under}: {str(err).removeprefix('the recipe: ')}")
        return problems[0]

    def _base_before_set(self) -> Recipe | None:
        """The file's own base recipe at the trial budget, where --set changed it."""
        if self.before_set is None:
            return None
        return self.before_set[0].with_epochs(self.config.asha.max_epochs)

    def _set_blame(self, fitted_before: bool) -> str:
        """What to add to an error about the base recipe where --set caused it: what failed
        fitted the file's own base recipe."""
        if self.before_set is None or not fitted_before:
            return ""
        return f" (the base recipe as --set {', '.join(self.before_set[1])} changed it)"

    def _conditions(self, name: str) -> list[dict[str, Any]]:
        """The settings of recipe paths that `name` is sampled under, as its `when`s (and theirs)
        allow them: each combination of their values, at most 16 ([{}] when no `when` names a
        recipe path)."""
        allowed = {}
        for ref, asks in self._needs(name).items():
            if not ref.startswith("$"):  # `_check_jointly`: some value is common to all
                allowed[ref] = [v for v in asks[0][1] if all(v in vs for _, vs in asks)]
        combos = itertools.islice(itertools.product(*allowed.values()), 16)
        return [dict(zip(allowed, values, strict=True)) for values in combos]

    def _check_when(self, name: str, p: _Param, seen: list[str], where: str) -> None:
        """Each condition names an earlier parameter and values it can take exactly."""
        for ref, wanted in (p.when or {}).items():
            if ref not in seen:
                if ref == name:
                    why = "which is this parameter itself"
                elif ref in self.params:
                    why = "which is listed after this one; move this one below it"
                else:
                    why = "which the space does not search; a when names a parameter above it"
                raise RecipeError(f"{where}: when refers to {ref!r}, {why}")
            target = self.params[ref]
            if isinstance(target, FloatParam):  # even with a step: 0.1 + 2 * 0.1 != 0.3
                raise RecipeError(
                    f"{where}: when {ref}: a float parameter never takes one given value "
                    f"exactly; make {ref} categorical or int"
                )
            values = _allowed(target, wanted)
            if not values:
                raise RecipeError(f"{where}: when {ref}: [] names no value; list at least one")
            for value in values:
                if not _can_take(target, value):
                    raise RecipeError(
                        f"{where}: when {ref} = {value!r}, but {ref} never takes that value"
                    )

    def _check_jointly(self, name: str, where: str) -> None:
        """Some trial samples `name`: each parameter it needs (through its `when`, and theirs in
        turn) has a value that all those conditions allow. A condition is on one parameter only,
        so looking at each parameter's values on their own is exact."""
        for ref, asks in self._needs(name).items():
            common = asks[0][1]
            for i, (asker, values) in enumerate(asks[1:], start=1):
                before, common = common, [v for v in common if v in values]
                if not common:
                    askers = ", ".join(a for a, _ in asks[:i])
                    raise RecipeError(
                        f"{where}: when can never hold: {ref} must be {_one_of(before)} to "
                        f"sample {askers} but {_one_of(values)} to sample {asker}"
                    )

    def _needs(self, name: str) -> dict[str, list[tuple[str, list[Any]]]]:
        """For each parameter that must be sampled for `name` to be: which parameters ask for
        which of its values."""
        needs: dict[str, list[tuple[str, list[Any]]]] = {}
        askers = [name]
        for asker in askers:  # grows as the conditions' own conditions are found
            for ref, wanted in (self.params[asker].when or {}).items():
                needs.setdefault(ref, []).append((asker, _allowed(self.params[ref], wanted)))
                if ref not in askers:
                    askers.append(ref)
        return needs

    def _check_promotion_budget(self) -> None:
        """A promotion trains the best trials to the end: not for fewer epochs than a trial."""
        promote = self.config.promote
        if promote is None:
            return
        if promote.epochs is not None:
            short = short_promotion("promote.epochs:", promote.epochs, self.config, "raise it")
        else:
            fix = "set promote.epochs, or raise schedule.epochs in base"
            short = short_promotion(
                "promote: the base recipe's schedule.epochs",
                self.base.schedule.epochs,
                self.config,
                fix,
            )
        if short:
            raise RecipeError(f"{self.source}: {short}")

    def idle_settings(self) -> list[str]:
        """Searched settings of a term no trial can switch on (its weight 0 in the base and
        never searched above 0), and section choices that change nothing or one thing twice:
        each named with what to do. Told, not refused, so that a study searched with one can
        still be resumed."""
        idle = []
        for name, p in self.params.items():
            if name.startswith("$"):
                continue
            sets = sorted({path for v in _extremes(p) for path in leaf_changes({name: v})})
            settings: dict[str, list[str]] = {}  # a term's settings besides its weight
            for path in sets:
                parts = path.split(".")
                if len(parts) >= 3 and parts[0] == "distill" and parts[2] != "weight":
                    settings.setdefault(f"distill.{parts[1]}", []).append(path)
            for term, paths in settings.items():
                if not any(w > 0 for w in self.reachable(f"{term}.weight")):
                    if paths == [name]:
                        what = "this changes"
                    else:
                        what = f"its {', '.join(paths)} change{'s' if len(paths) == 1 else ''}"
                    idle.append(
                        f"space.{name}: {term} is never on (its weight is 0 in base and no "
                        f"trial changes it), so {what} nothing; search {term}.weight "
                        "too, or give it a weight in base"
                    )
            if "schedule.gamma" in sets and "multistep" not in self.reachable("schedule.kind"):
                idle.append(
                    f"space.{name}: schedule.gamma is the multistep schedule's and no trial "
                    f"trains one (schedule.kind is {self.base.schedule.kind} in base and no "
                    "trial changes it), so it changes nothing; search schedule.kind too, or "
                    "set kind: multistep in base"
                )
        for name, p in self.params.items():
            if isinstance(p, CategoricalParam) and not name.startswith("$"):
                idle += _alike_changes(name, p)
        for name, p in self.params.items():  # (with a `when`, it sets the value where that holds)
            values = p.choices if isinstance(p, CategoricalParam) else [p.low, p.high]
            if not p.when and all(v == values[0] for v in values):
                idle.append(
                    f"space.{name}: every trial takes {yaml_text(values[0])}, so it searches "
                    "nothing; set it in base, or widen it"
                )
        return idle

    def distinct_samples(self, most: int) -> int | None:
        """How many different samples the space can draw, where that is `most` or fewer; None
        where it is more (a float without a step: without end), or where its conditions branch
        too often to count within COUNTING calls. Each sample counts once, also where two
        section choices make one change (`idle_settings` tells those)."""
        named: dict[str, list[Any]] = {}  # each parameter a `when` names: the values it names
        for p in self.params.values():
            for ref, wanted in (p.when or {}).items():
                for value in _allowed(self.params[ref], wanted):
                    if not _among(value, named.setdefault(ref, [])):
                        named[ref].append(value)
        names = list(self.params)
        calls = 0

        def count(i: int, chosen: dict[str, Any]) -> float:
            """Samples of the parameters from the i-th on, given those before it (`chosen`);
            past `most` it stops counting."""
            nonlocal calls
            calls += 1
            if calls > COUNTING:
                return math.inf
            if i == len(names):
                return 1
            name, p = names[i], self.params[names[i]]
            if not self._active(p, chosen):
                return count(i + 1, chosen)
            if name not in named:  # its value decides nothing below: a factor
                return _value_count(p) * count(i + 1, chosen)
            total = 0.0
            for value in named[name]:
                total += count(i + 1, {**chosen, name: value})
                if total > most:
                    return total
            others = _value_count(p) - len(named[name])  # alike: no `when` names them
            if others:
                total += others * count(i + 1, {**chosen, name: UNNAMED})
            return total

        total = count(0, {})
        return int(total) if total <= most else None

    def searched_changes(self, keys: Iterable[str]) -> list[str]:
        """Of the base recipe's changed `keys` (`--set`), those the space draws in every trial:
        no trial trains with the value given, each named with what to do. Told, not refused,
        as `idle_settings`. (A key searched only under a condition keeps its base value where
        the condition does not hold, so that is a change that counts.)"""
        told = [
            f"--set {key}: the space searches {key} in every trial, so no trial trains with this "
            "value (the promotion's baselines, which take the base recipe, may); to fix it for "
            f"every trial, remove space.{key} from {self.source}"
            for key in keys
            if key in self.params and not self.params[key].when
        ]
        told += [  # a key inside a section that every choice of an unconditional one sets
            f"--set {key}: every choice of space.{name} in {self.source} sets {key}, so no trial "
            "trains with this value (the promotion's baselines, which take the base recipe, "
            "may); to change it, change it in those choices"
            for key in keys
            for name, p in self.params.items()
            if key.startswith(f"{name}.")
            and not p.when
            and all(key in leaf_changes({name: v}) for v in _extremes(p))
        ]
        if "schedule.epochs" in keys:  # a way to shorten the search that shortens nothing
            budget = self.config.asha.max_epochs
            told.append(
                f"--set schedule.epochs: every trial trains for asha.max_epochs ({budget}) of "
                f"{self.source}, whatever the base recipe says; schedule.epochs is what a "
                f"promotion trains for where promote.epochs is unset, and under {budget} it is "
                "refused there"
            )
        return told

    def _check_placements(self) -> None:
        """Every searched placement fits the student, when some trial can switch HSAKD on: a
        recipe checks its placement only while HSAKD is on, and the loop above tries each choice
        on the base recipe, where it may be off (the base's own placement it checks at a
        searched weight)."""
        p = self.params.get("distill.hsakd.placement")
        if p is None or not any(w > 0 for w in self.reachable("distill.hsakd.weight")):
            return
        conditions = self._conditions("distill.hsakd.placement")

        def misfit(base: Recipe, placement: list[int]) -> str | None:
            problems = [  # where its `when` draws the student, with those it is drawn with
                placement_problem(leaf_changes(c).get("student.arch", base.student.arch), placement)
                for c in conditions
            ]
            return problems[0] if all(problems) else None

        before = self._base_before_set()
        for placement in _extremes(p):
            if problem := misfit(self.base, placement):
                fitted = before is not None and misfit(before, placement) is None
                raise RecipeError(
                    f"{self.source}: space.distill.hsakd.placement: {problem}"
                    + self._set_blame(fitted)
                )


def cluster_address(text: str) -> tuple[str, int] | None:
    """The host and port of a Ray cluster's address, HOST:PORT or [IPv6]:PORT; None for `auto`
    (Ray finds the cluster itself). ValueError otherwise, and for ray://: through Ray Client,
    Tune would run its searcher on the cluster, away from the process that writes the study."""
    if text == "auto":
        return None
    if text.startswith("ray://"):
        raise ValueError(
            f"{text!r}: Ray Client (ray://) is not supported, as Tune would then run away from "
            "the process that writes the study; run kdsearch on a node of the cluster with "
            "auto or HEAD:6379"
        )
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not sep or not host or "/" in host or (":" in host and not bracketed):
        raise ValueError(f"{text!r} is not auto or HOST:PORT")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r} is not auto or HOST:PORT")
    return host.strip("[]") if bracketed else host, int(port)


def short_promotion(what: str, epochs: int, config: SpaceFile, fix: str) -> str | None:
    """Why promoting at `epochs` (`what` says whence) would train the best trials for fewer
    epochs than the search `config` trained them, if it would; `fix` says what to do."""
    trial = config.asha.max_epochs
    if epochs >= trial:
        return None
    return (
        f"{what} {epochs} is below asha.max_epochs ({trial}), so the promotion would train the "
        f"best trials for fewer epochs than the search did; {fix}"
    )


def _alike_changes(name: str, p: CategoricalParam) -> list[str]:
    """What is amiss with the choices of `name` as changes to the recipe: one holding an empty
    mapping below its top (`{temperature: {}}` sets nothing; `{}` itself is the choice to
    change nothing), two making the same change (`{kd.weight: 0.5}` and `{kd: {weight: 0.5}}`,
    which the sampler weighs twice)."""
    told: list[str] = []
    made: list[tuple[Any, dict[str, Any]]] = []
    for choice in p.choices:
        if choice != {} and (empty := empty_section(name, choice)):
            told.append(
                f"space.{name}: choice {choice!r}: {empty} is an empty mapping, which changes "
                "nothing there; name the keys to change"
            )
        if twice := _set_twice(name, choice):
            told.append(
                f"space.{name}: choice {choice!r} sets {', '.join(twice)} twice, and a trial "
                "takes the last value given; keep one"
            )
        changes = leaf_changes({name: choice})
        told += [
            f"space.{name}: choices {other!r} and {choice!r} make the same change, which the "
            "sampler so draws twice as often; keep one"
            for other, earlier in made
            if earlier == changes
        ]
        made.append((choice, changes))
    return told


def on_grid(value: float, low: float, step: float) -> float:
    """A stepped float as its grid writes it: Optuna's low + k * step gave 0.060000000000000005
    for 0.01 + 5 * 0.01, which the trial trained and an export wrote."""
    decimals = max(-min(int(Decimal(repr(x)).as_tuple().exponent), 0) for x in (low, step))
    return round(value, decimals)


def _set_twice(name: str, choice: Any) -> list[str]:
    """The recipe paths a section's choice names more than once (`{kd.weight: 0.5, kd:
    {weight: 0.7}}`), each key being dotted or nested."""
    if not isinstance(choice, dict):
        return []
    seen: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):  # an empty one sets nothing (`_alike_changes` says so)
                walk(value, f"{prefix}{key}.")
            else:
                seen.append(f"{prefix}{key}")

    walk(choice, f"{name}.")
    return sorted({path for path in seen if seen.count(path) > 1})


def choice_labels(choices: list[Any]) -> list[Scalar]:
    """How a study stores categorical choices: as they are when all are scalars, else as JSON
    text (Optuna takes scalars only), so a placement [1, 2] is stored as "[1, 2]"."""
    if all(c is None or isinstance(c, bool | int | float | str) for c in choices):
        return list(choices)
    return [json.dumps(c) for c in choices]


def _extremes(p: FloatParam | IntParam | CategoricalParam) -> list[Any]:
    """The values whose fit to the recipe proves every value fits."""
    if isinstance(p, CategoricalParam):
        return list(p.choices)
    return [p.low, p.high]


def _allowed(p: FloatParam | IntParam | CategoricalParam, wanted: Any) -> list[Any]:
    """The values a `when` names: a list is any of its items, unless the list is itself one of
    the parameter's choices (`when: {distill.hsakd.placement: [2, 3]}` names the placement)."""
    if not isinstance(wanted, list):
        return [wanted]
    if isinstance(p, CategoricalParam) and wanted in p.choices:
        return [wanted]
    return wanted


COUNTING = 100_000  # calls `distinct_samples` makes at most: a space's count is advice, not a wait
UNNAMED = object()  # a parameter's value that no `when` names (equal to none)


def _value_count(p: FloatParam | IntParam | CategoricalParam) -> float:
    """How many values `p` takes (a float without a step: without end)."""
    if isinstance(p, CategoricalParam):
        return len(p.choices)
    if isinstance(p, IntParam):
        return (p.high - p.low) // p.step + 1
    if p.low == p.high:
        return 1
    return math.inf if p.step is None else round((p.high - p.low) / p.step) + 1


def _can_take(p: IntParam | CategoricalParam, value: Any) -> bool:
    if isinstance(p, CategoricalParam):
        return _among(value, p.choices)
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and p.low <= value <= p.high
        and (value - p.low) % p.step == 0
    )


def _same(a: Any, b: Any) -> bool:
    """Equal as YAML values: Python's `True == 1` made `when: {$x: true}` hold for a choice 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _among(value: Any, values: Sequence[Any]) -> bool:
    return any(_same(value, v) for v in values)


def _one_of(values: list[Any]) -> str:
    return repr(values[0]) if len(values) == 1 else "one of " + ", ".join(map(repr, values))
