"""What `kdsearch run` records in a study and how the other commands read it back: the space
file and base recipe, each trial's recipe, the settings a resume may not change, the promotion's
study, the ranking."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from kdsearch.errors import RecipeError, StudyError
from kdsearch.recipe import Recipe, describe, flatten, load_yaml, yaml_text
from kdsearch.space import PROMOTED, SearchSpace, SpaceFile

METRIC = "val_acc"


def already_held(name: str, trials: int) -> StudyError:
    """The refusal of a search without --resume in study `name`, which holds `trials`."""
    return StudyError(
        f"study {name!r} already holds {trials} trials; add --resume to finish it, or choose "
        "another --study name"
    )


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


def ranked(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials, best first (all of them reached the same budget)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(done, key=lambda t: (-float(t.value or 0.0), t.number))
