from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import FixedTrial
from pydantic import ValidationError

from kdsearch.errors import RecipeError
from kdsearch.recipe import Recipe
from kdsearch.search.tuner import active_terms
from kdsearch.space import AshaConfig, SearchSpace, choice_labels, cluster_address, on_grid

from .conftest import REPO, tiny_recipe

BASE = """
study: {name: t}
base:
  data: {dataset: digits}
  teacher: {arch: resnet8}
  student: {arch: resnet8}
  schedule: {epochs: 240, kind: multistep, milestones: [150, 180, 210]}
asha: {max_epochs: 24, grace_epochs: 2, reduction_factor: 3}
"""


def space_of(params: str, extra: str = "") -> SearchSpace:
    return SearchSpace.from_yaml(BASE + "space:\n" + params + extra, source="s.yaml")


@pytest.mark.parametrize("name", ["digits", "cifar10", "cifar100"])
def test_shipped_spaces_are_valid(name: str) -> None:
    space = SearchSpace.load(REPO / "search_spaces" / f"{name}.yaml")
    assert space.params and space.config.search.trials >= 16
    assert space.trial_recipe.schedule.epochs == space.config.asha.max_epochs


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_shipped_spaces_name_their_asha_rungs_as_configured(name: str) -> None:
    path = REPO / "search_spaces" / f"{name}.yaml"
    asha = SearchSpace.load(path).config.asha
    rungs = [asha.grace_epochs * asha.reduction_factor**k for k in range(asha.max_epochs)]
    named = re.search(r"at epochs (\d+(?:, \d+)*(?:,? and \d+)?)", path.read_text())
    assert named is not None
    assert re.findall(r"\d+", named.group(1)) == [str(int(r)) for r in rungs if r < asha.max_epochs]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            "  distill.kd.temprature: {type: float, low: 1, high: 2}",
            "space.distill.kd.temprature: not a recipe path",
        ),
        (
            "  distill.kd.temperature: {type: float, low: 3, high: 2}",
            "space.distill.kd.temperature: low (3.0) is above high (2.0)",
        ),
        ("  optim.lr: {type: float, low: 0.0, high: 0.1, log: true}", "log: true needs low > 0"),
        (
            "  optim.lr: {type: float, low: 0.01, high: 0.1, log: true, step: 0.01}",
            "log and step cannot be combined",
        ),
        (
            "  distill.kd.temperature: {type: float, low: -1, high: 2}",
            "space.distill.kd.temperature: -1.0 does not fit the recipe",
        ),
        (
            "  distill.kd.temperature: {type: categorical, choices: [2.0, hot]}",
            "'hot' does not fit the recipe",
        ),
        (
            "  batch_size: {type: int, low: 1, high: 64}",
            "space.batch_size: 1 does not fit the recipe: batch_size: Input should be greater",
        ),
        (
            "  distill.kd.temperature: {type: normal, low: 1, high: 2}",
            "space.distill.kd.temperature.type: got 'normal'; allowed: float, int, categorical",
        ),
        (
            "  distill.kd.temperature: {tpye: float, low: 1, high: 2}",
            "space.distill.kd.temperature.type: required key is missing; "
            "allowed: float, int, categorical; unknown key tpye",
        ),
        (
            "  distill.kd.temperature: {type: float, low: 1, high: 2, when: {$x: a}}\n  $x: {type: categorical, choices: [a, b]}",
            "when refers to '$x', which is listed after this one; move this one below it",
        ),
        (
            "  distill.kd.temperature: {type: float, low: 1, high: 2, when: {optim.nesterov: false}}",
            "when refers to 'optim.nesterov', which the space does not search; a when names a "
            "parameter above it",
        ),
        (
            "  $x: {type: categorical, choices: [a, b], when: {$x: a}}",
            "space.$x: when refers to '$x', which is this parameter itself",
        ),
        (
            "  $x: {type: categorical, choices: [a, b]}\n  distill.kd.temperature: {type: float, low: 1, high: 2, when: {$x: c}}",
            "when $x = 'c', but $x never takes that value",
        ),
        ("  $x: {type: float, low: 1, high: 2}", "a $decision must be categorical"),
        (  # a YAML date: not JSON, which failed at the first trial, with the study started
            "  $x: {type: categorical, choices: [a, 2024-01-01]}\n"
            "  distill.kd.temperature: {type: float, low: 1, high: 2, when: {$x: a}}",
            "space.$x: choice datetime.date(2024, 1, 1) is a date, which a study cannot store; "
            "quote it to make it text",
        ),
        (
            "  distill: {type: categorical, choices: [{kd: {weight: 1.0}}, "
            "{kd: {temperature: 2024-01-01T12:30:00Z}}]}",
            "tzinfo=datetime.timezone.utc), a datetime, which a study cannot store",
        ),
        (
            "  distill.kd.temperature: {type: float, low: 1, high: 8}\n"
            "  distill.kd: {type: categorical, choices: [{weight: 1.0}, {weight: 0.5}]}",
            "space.distill.kd.temperature: distill.kd is searched too, so one would overwrite "
            "the other; search the section or the keys in it, not both",
        ),
        (
            "  distill: {type: categorical, choices: [{kd: {weight: 1.0}}]}\n"
            "  distill.kd.weight: {type: float, low: 0.1, high: 1}",
            "space.distill: distill.kd.weight is searched too",
        ),
        ("  schedule.epochs: {type: int, low: 1, high: 9}", "the trial budget is asha.max_epochs"),
        (
            "  distill.hsakd.placement: {type: categorical, choices: [[1, 2], [2, 2]]}",
            "placement lists a stage twice",
        ),
        (
            "  distill.kd.temperature: {type: float, low: 1, high: 2, hgih: 3}",
            "space.distill.kd.temperature.hgih: unknown key",
        ),
        (
            "  distill.hsakd.weight: {type: float, low: 0.0, high: 1.0}\n"
            "  distill.hsakd.placement: {type: categorical, choices: [[1], [2, 4]]}",
            "space.distill.hsakd.placement: [2, 4]: resnet8 has no stage 4 to carry a head",
        ),
        (
            "  distill.kd.temperature: {type: float, low: 1, high: 2}\npromote: {epochs: 12}",
            "s.yaml: promote.epochs: 12 is below asha.max_epochs (24), so the promotion would "
            "train the best trials for fewer epochs than the search did; raise it",
        ),
    ],
)
def test_bad_spaces_name_the_key(params: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        space_of(params)
    assert expected in str(info.value), str(info.value)
    assert str(info.value).startswith("s.yaml")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("search: {trials: 0}\n", "search.trials: Input should be greater than or equal to 1"),
        ("search: {sampler: grid}\n", "search.sampler: Input should be 'tpe' or 'random'"),
        ("search: {seed: 4294967296}\n", "search.seed: Input should be less than or equal to"),
        (  # a typo's extra digits: no study records a trial number or an epoch past 2**31 - 1
            "search: {trials: 2147483648}\n",
            "search.trials: Input should be less than or equal to 2147483647",
        ),
        ("promote: {epochs: 2147483648}\n", "promote.epochs: Input should be less than or"),
        (
            "bogus: 1\n",
            "bogus: unknown key; allowed here: study, base, space, search, asha, promote, export",
        ),
        (
            "promote: {top_k: 3, bogus: 1}\n",
            "promote.bogus: unknown key; allowed here: top_k, seeds, epochs",
        ),
        (
            "search: {per_trial: {gpu: -1}}\n",
            "search.per_trial.gpu: Input should be greater than or equal to 0, or should be "
            "'auto' (got -1)",
        ),
        (
            "search: {per_trial: {gpu: half}}\n",
            "search.per_trial.gpu: Input should be a valid number, or should be 'auto' "
            "(got 'half')",
        ),
    ],
)
def test_bad_sections_name_the_key(extra: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=None) as info:
        space_of("  optim.lr: {type: float, low: 0.01, high: 0.1}\n", extra)
    assert expected in str(info.value)


def test_asha_epochs_past_what_a_study_records_are_refused() -> None:
    """`max_epochs: 99999999999999999999` was checked and searched, every trial pruned."""
    for epochs in ({"max_epochs": 2**64}, {"max_epochs": 2**31, "grace_epochs": 2**31}):
        with pytest.raises(ValidationError, match="less than or equal to 2147483647"):
            AshaConfig(**epochs)
    assert AshaConfig(max_epochs=2**31 - 1).max_epochs == 2**31 - 1


@pytest.mark.parametrize(
    ("study", "expected"),
    [
        ("study: t", "study: should be a mapping of name, storage (got 't')"),
        (
            "study: {name: -t}",
            "study.name: '-t': a study name is letters, digits, '_', '.' and '-', not starting "
            "with '.', '_' or '-'",
        ),
        (  # a file name's 255 bytes were passed with the suffixes added: a traceback
            f"study: {{name: {'a' * 201}}}",
            "study.name: aaaaaaaaaaaaaaaaaaaa...: a study name is at most 200 characters, not 201",
        ),
        (  # SQLAlchemy's own words were int()'s: "invalid literal for int() with base 10"
            "study: {name: t, storage: 'postgresql://u@h:abc/db'}",
            "study.storage: 'postgresql://u@h:abc/db' is not an SQLAlchemy URL "
            "(dialect://user:password@host:port/database, the port a number)",
        ),
    ],
)
def test_a_bad_study_section_is_told_in_the_words_of_the_file(study: str, expected: str) -> None:
    text = (
        BASE.replace("study: {name: t}", study)
        + "space:\n  optim.lr: {type: float, low: 0.01, high: 0.1}\n"
    )
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(text, source="s.yaml")
    assert str(info.value) == f"s.yaml: {expected}"


def test_a_space_that_is_not_a_mapping_is_told_so() -> None:
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(BASE + "space: 5\n", source="s.yaml")
    assert str(info.value) == "s.yaml: space: should be a mapping (got 5)"


@pytest.mark.parametrize(
    "param",
    [
        "teacher.arch: {type: categorical, choices: [resnet8, resnet20]}",
        "teacher.train.epochs: {type: int, low: 2, high: 4}",
        "data.subset: {type: int, low: 100, high: 200}",
        "data: {type: categorical, choices: [{dataset: digits}]}",
    ],
)
def test_data_and_teacher_are_not_searchable(param: str) -> None:
    # The search loads the data and prepares the teacher once, from the base recipe: a trial's
    # value there would be recorded and never used.
    with pytest.raises(RecipeError) as info:
        space_of(f"  distill.kd.temperature: {{type: float, low: 1, high: 2}}\n  {param}\n")
    path = param.split(":")[0]
    assert str(info.value) == (
        f"s.yaml: space.{path}: not searchable: the data set and the teacher are prepared once "
        f"per search from the base recipe; set {path} in base or with --set"
    )


def test_the_seed_is_not_searchable() -> None:
    """It fixes the data stream every trial of a search shares (and the store is keyed by)."""
    with pytest.raises(RecipeError, match=r"space.seed: not searchable: the seed fixes the data"):
        space_of("  seed: {type: int, low: 0, high: 3}\n")


def test_a_parameter_given_twice_is_refused_with_its_line() -> None:
    twice = (
        "  distill.kd.temperature: {type: float, low: 1, high: 2}\n"
        "  distill.kd.temperature: {type: float, low: 3, high: 4}\n"
    )
    with pytest.raises(RecipeError) as info:
        space_of(twice)
    assert str(info.value) == (
        "s.yaml: line 11: not valid YAML: key 'distill.kd.temperature' is given twice "
        "(also on line 10); keep one"
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            "  $x: {type: categorical, choices: [a, b]}\n  optim.lr: {type: float, low: 0.01, high: 0.1, when: {$x: []}}",
            "space.optim.lr: when $x: [] names no value; list at least one",
        ),
        (
            "  distill.kd.weight: {type: float, low: 0.1, high: 1.0}\n  optim.lr: {type: float, low: 0.01, high: 0.1, when: {distill.kd.weight: 0.5}}",
            "space.optim.lr: when distill.kd.weight: a float parameter never takes one given value exactly; make distill.kd.weight categorical or int",
        ),
        (
            "  distill.kd.weight: {type: float, low: 0.1, high: 0.5, step: 0.1}\n  optim.lr: {type: float, low: 0.01, high: 0.1, when: {distill.kd.weight: 0.3}}",
            "space.optim.lr: when distill.kd.weight: a float parameter never takes",
        ),
        (
            "  batch_size: {type: int, low: 32, high: 128, step: 32}\n  optim.lr: {type: float, low: 0.01, high: 0.1, when: {batch_size: 48}}",
            "space.optim.lr: when batch_size = 48, but batch_size never takes that value",
        ),
        (
            "  distill.stkd.mix: {type: categorical, choices: [mixup, mixup]}",
            "space.distill.stkd.mix: choices list 'mixup' twice",
        ),
        (
            "  distill.kd.temperature: {type: categorical, choices: [1, 2, 1.0]}",
            "space.distill.kd.temperature: choices list 1 and 1.0, which are equal",
        ),
        (
            "  $x: {type: categorical, choices: [1, true]}",
            "space.$x: choices list 1 and True, which differ in YAML but a study stores as one value",
        ),
        (
            "  distill.kd.temperature: {type: float, low: 1, high: 2, step: 5}",
            "space.distill.kd.temperature: step 5.0 does not divide high - low (1.0); high 6.0 would fit",
        ),
        (
            "  batch_size: {type: int, low: 32, high: 100, step: 32}",
            "space.batch_size: step 32 does not divide high - low (68); high 96 or 128 would fit",
        ),
        (
            "  optim.lr: {type: float, low: 0.01, high: 0.205, step: 0.01}",
            "space.optim.lr: step 0.01 does not divide high - low (0.195); high 0.2 or 0.21 would fit",
        ),
        (
            "  $x: {type: categorical, choices: [a, b]}\n  $y: {type: categorical, choices: [c, d], when: {$x: a}}\n  optim.lr: {type: float, low: 0.01, high: 0.1, when: {$x: b, $y: c}}",
            "space.optim.lr: when can never hold: $x must be 'b' to sample optim.lr but 'a' to sample $y",
        ),
        (
            "  $x: {type: categorical, choices: [a, b, c]}\n  $y: {type: categorical, choices: [c, d], when: {$x: [a, b]}}\n  $z: {type: categorical, choices: [e, f], when: {$y: d}}\n  optim.lr: {type: float, low: 0.01, high: 0.1, when: {$z: e, $x: c}}",
            "space.optim.lr: when can never hold: $x must be 'c' to sample optim.lr but one of 'a', 'b' to sample $y",
        ),
    ],
)
def test_parameters_that_can_never_be_sampled_are_refused(params: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        space_of(params + "\n")
    assert expected in str(info.value), str(info.value)
    assert str(info.value).startswith("s.yaml")


@pytest.mark.parametrize(
    "params",
    ["{}", "\n  $x: {type: categorical, choices: [a, b]}"],
)
def test_a_space_that_searches_no_recipe_path_is_refused(params: str) -> None:
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(BASE + f"space: {params}\n", source="s.yaml")
    assert str(info.value) == (
        "s.yaml: space: searches no recipe path, so every trial would train the same recipe; "
        "name at least one (for example distill.kd.temperature)"
    )


def test_a_decision_no_when_refers_to_is_refused() -> None:
    # Likely a forgotten `when`: every trial would sample it and it would change nothing.
    with pytest.raises(RecipeError) as info:
        space_of(
            "  $extra: {type: categorical, choices: [none, crd]}\n"
            "  distill.crd.weight: {type: float, low: 0.1, high: 2.0}\n"
        )
    assert str(info.value) == (
        "s.yaml: space.$extra: no when refers to it, so it changes nothing; "
        "name it in a when (when: {$extra: VALUE}) or leave it out"
    )


def test_a_when_chain_is_checked_through_the_parameters_it_needs() -> None:
    # distill.kd.weight needs $y, which needs $x in [a, b]: with its own $x in [b, c] the two
    # overlap in b and the space loads; with $x: c alone they never do.
    chain = (
        "  optim.lr: {type: float, low: 0.01, high: 0.2, step: 0.01}\n"
        "  batch_size: {type: int, low: 32, high: 128, step: 32}\n"
        "  $x: {type: categorical, choices: [a, b, c]}\n"
        "  $y: {type: categorical, choices: [c, d], when: {$x: [a, b]}}\n"
        "  distill.kd.weight: {type: float, low: 0.1, high: 1, when: {$x: [b, c], $y: d, batch_size: 64}}\n"
    )
    space = space_of(chain)
    trial = {"optim.lr": 0.05, "batch_size": 64, "$x": "b", "$y": "d", "distill.kd.weight": 0.5}
    assert space.suggest(FixedTrial(trial))["distill.kd.weight"] == 0.5
    with pytest.raises(RecipeError) as info:
        space_of(chain.replace("{$x: [b, c], $y: d", "{$x: c, $y: d"))
    assert str(info.value) == (
        "s.yaml: space.distill.kd.weight: when can never hold: $x must be 'c' to sample "
        "distill.kd.weight but one of 'a', 'b' to sample $y"
    )


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (
            "distill.kd.temperature: {type: float, low: 1, high: 2, lg: true}",
            "space.distill.kd.temperature.lg: unknown key; allowed here: when, type, low, high, log, step",
        ),
        (
            "batch_size: {type: int, low: 32, high: 64, stp: 2}",
            "space.batch_size.stp: unknown key; allowed here: when, type, low, high, log, step",
        ),
        (
            "distill.stkd.mix: {type: categorical, choice: [mixup]}",
            "space.distill.stkd.mix.choices: required key is missing; "
            "space.distill.stkd.mix.choice: unknown key; allowed here: when, type, choices",
        ),
        (
            "batch_size: {type: int, low: 64, high: 32}",
            "space.batch_size: low (64) is above high (32)",
        ),
        (
            "distill.kd.temperature: {type: float, low: 1, high: 2, step: -1}",
            "space.distill.kd.temperature.step: Input should be greater than 0 (got -1)",
        ),
    ],
)
def test_parameter_errors_name_the_key_as_written(param: str, expected: str) -> None:
    # A parameter is one of three types; the error names the user's key, not the type pydantic tried.
    with pytest.raises(RecipeError) as info:
        space_of(f"  {param}\n")
    assert str(info.value) == f"s.yaml: {expected}"


def test_the_base_placement_is_checked_only_where_hsakd_can_be_on() -> None:
    base = BASE.replace(
        "student: {arch: resnet8}",
        "student: {arch: resnet8}\n  distill: {hsakd: {placement: [1, 2, 4]}}",
    )
    kd_only = "space:\n  distill.kd.temperature: {type: float, low: 1, high: 2}\n"
    assert SearchSpace.from_yaml(base + kd_only, source="s.yaml").params  # HSAKD never on
    hsakd = (
        "space:\n  $extra: {type: categorical, choices: [none, hsakd]}\n"
        "  distill.hsakd.weight: {type: float, low: 0.5, high: 1.0, when: {$extra: hsakd}}\n"
    )
    with pytest.raises(RecipeError, match=r"placement \[1, 2, 4\]: resnet8 has no stage 4"):
        SearchSpace.from_yaml(base + hsakd, source="s.yaml")


def test_grace_above_budget_is_refused() -> None:
    text = BASE.replace("grace_epochs: 2", "grace_epochs: 30") + "space: {}\n"
    with pytest.raises(RecipeError, match=r"asha: grace_epochs \(30\) is above max_epochs \(24\)"):
        SearchSpace.from_yaml(text, source="s.yaml")


CONDITIONAL = """  distill.kd.temperature: {type: float, low: 1.0, high: 8.0}
  $extra: {type: categorical, choices: [none, crd, hsakd]}
  distill.crd.weight: {type: float, low: 0.1, high: 2.0, when: {$extra: crd}}
  distill.hsakd.weight: {type: float, low: 0.1, high: 2.0, when: {$extra: [hsakd]}}
  distill.hsakd.placement: {type: categorical, choices: [[1, 2, 3], [3]], when: {$extra: hsakd}}
"""


def test_when_samples_a_parameter_only_after_the_value_it_names() -> None:
    space = space_of(CONDITIONAL)
    chosen = space.suggest(FixedTrial({"distill.kd.temperature": 3.0, "$extra": "none"}))
    assert chosen == {"distill.kd.temperature": 3.0, "$extra": "none"}
    recipe = space.recipe_for(chosen)
    assert recipe.distill.crd.weight == 0.0  # the base value stands
    chosen = space.suggest(
        FixedTrial(
            {
                "distill.kd.temperature": 3.0,
                "$extra": "hsakd",
                "distill.hsakd.weight": 0.5,
                "distill.hsakd.placement": "[3]",
            }
        )
    )
    assert chosen["distill.hsakd.placement"] == [3]
    recipe = space.recipe_for(chosen)
    assert recipe.distill.hsakd.placement == [3] and recipe.distill.hsakd.weight == 0.5
    assert "distill.crd.weight" not in chosen


def test_when_on_a_list_choice_names_that_choice() -> None:
    # [3] is one of the placement's choices, so it means that placement, not "any of 3"; a list
    # of choices still means any of them.
    on_placement = """  distill.hsakd.temperature: {type: float, low: 1, high: 4, when: {distill.hsakd.placement: [3]}}
  distill.kd.weight: {type: float, low: 0.1, high: 1, when: {distill.hsakd.placement: [[3], [1, 2, 3]]}}
"""
    space = space_of(CONDITIONAL + on_placement)
    fixed = {"distill.kd.temperature": 3.0, "$extra": "hsakd", "distill.hsakd.weight": 0.5}
    for label, placement in (("[3]", [3]), ("[1, 2, 3]", [1, 2, 3])):
        trial = FixedTrial(
            {
                **fixed,
                "distill.hsakd.placement": label,
                "distill.hsakd.temperature": 2.0,
                "distill.kd.weight": 0.2,
            }
        )
        chosen = space.suggest(trial)
        assert ("distill.hsakd.temperature" in chosen) == (placement == [3])
        assert "distill.kd.weight" in chosen


def test_trial_recipes_run_at_the_asha_budget_with_scaled_milestones() -> None:
    recipe = space_of(CONDITIONAL).trial_recipe
    assert recipe.schedule.epochs == 24 and recipe.schedule.milestones == [15, 18, 21]


def test_list_choices_are_stored_as_json_text() -> None:
    assert choice_labels(["a", 1, None]) == ["a", 1, None]
    assert choice_labels([[1, 2], [3]]) == ["[1, 2]", "[3]"]


@pytest.mark.parametrize("base", ["r.yaml", "~/r.yaml"])  # ~ was not expanded there alone
def test_base_may_be_a_recipe_file_next_to_the_space_or_under_home(
    tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.yaml").write_text(
        "data: {dataset: digits}\nteacher: {arch: resnet8}\nstudent: {arch: resnet8}\n"
    )
    (tmp_path / "s.yaml").write_text(
        f"study: {{name: t}}\nbase: {base}\nasha: {{max_epochs: 3}}\n"
        "space: {distill.kd.temperature: {type: float, low: 1, high: 2}}\n"
    )
    assert SearchSpace.load(tmp_path / "s.yaml").base.student.arch == "resnet8"


def test_a_setting_of_a_term_no_trial_switches_on_is_named_as_idle() -> None:
    idle = space_of(
        "  distill.crd.temperature: {type: float, low: 0.05, high: 0.2}\n"
        "  distill.pkt.weight: {type: categorical, choices: [0.0]}\n"
        "  distill.kd.temperature: {type: float, low: 1, high: 8}\n"  # KD is on in base
        "  distill.hsakd.weight: {type: float, low: 0.0, high: 1.0}\n"
        "  distill.hsakd.placement: {type: categorical, choices: [[1], [2, 3]]}\n"
        "  distill.cktf.weight: {type: categorical, choices: [0.0]}\n"
        "  distill.cktf.temperature: {type: float, low: 0.05, high: 0.2}\n"
    ).idle_settings()
    assert idle == [
        "space.distill.crd.temperature: distill.crd is never on (its weight is 0 in base and no "
        "trial changes it), so this changes nothing; search distill.crd.weight too, or give it "
        "a weight in base",
        "space.distill.cktf.temperature: distill.cktf is never on (its weight is 0 in base and "
        "no trial changes it), so this changes nothing; search distill.cktf.weight too, or give "
        "it a weight in base",
        "space.distill.pkt.weight: every trial takes 0.0, so it searches nothing; set it in "
        "base, or widen it",
        "space.distill.cktf.weight: every trial takes 0.0, so it searches nothing; set it in "
        "base, or widen it",
    ]


def test_a_parameter_of_one_value_is_named_as_searching_nothing() -> None:
    """A review's space of `low: 4, high: 4` ran 16 trials of one recipe without a word."""
    idle = space_of(
        "  distill.kd.temperature: {type: float, low: 4, high: 4}\n"
        "  optim.lr: {type: float, low: 0.01, high: 0.1, log: true}\n"
        "  batch_size: {type: int, low: 32, high: 32}\n"
        "  $extra: {type: categorical, choices: [none, pkt]}\n"
        "  distill.pkt.weight: {type: categorical, choices: [100.0], when: {$extra: pkt}}\n"
        "  optim.nesterov: {type: categorical, choices: [true]}\n"
    ).idle_settings()
    assert idle == [  # not pkt's: with its `when`, it sets 100 where that holds
        "space.distill.kd.temperature: every trial takes 4.0, so it searches nothing; set it in "
        "base, or widen it",
        "space.batch_size: every trial takes 32, so it searches nothing; set it in base, or "
        "widen it",
        "space.optim.nesterov: every trial takes true, so it searches nothing; set it in base, "
        "or widen it",
    ]


def test_a_change_of_the_base_the_space_draws_in_every_trial_is_named() -> None:
    space = space_of(
        "  optim.lr: {type: float, low: 0.01, high: 0.1, log: true}\n"
        "  $extra: {type: categorical, choices: [none, pkt]}\n"
        "  distill.pkt.weight: {type: float, low: 50.0, high: 2000.0, when: {$extra: pkt}}\n"
    )
    found = space.searched_changes(["optim.lr", "distill.pkt.weight", "optim.momentum"])
    assert found == [
        "--set optim.lr: the space searches optim.lr in every trial, so no trial trains with "
        "this value (the promotion's baselines, which take the base recipe, may); to fix it for "
        f"every trial, remove space.optim.lr from {space.source}"
    ], "a conditional key keeps the value where its condition fails; momentum is not searched"
    sections = space_of(  # a key every choice of a searched section sets, or not all
        "  distill.hsakd: {type: categorical, choices: [{weight: 0.0}, "
        "{weight: 1.0, placement: [2, 3]}]}\n"
    )
    assert sections.searched_changes(["distill.hsakd.placement"]) == []
    assert sections.searched_changes(["distill.hsakd.weight"]) == [
        "--set distill.hsakd.weight: every choice of space.distill.hsakd in s.yaml sets "
        "distill.hsakd.weight, so no trial trains with this value (the promotion's baselines, "
        "which take the base recipe, may); to change it, change it in those choices"
    ]
    # the trial budget: a way to shorten a search that shortened nothing, then failed promote
    (budget,) = space.searched_changes(["schedule.epochs"])
    assert budget == (
        "--set schedule.epochs: every trial trains for asha.max_epochs (24) of s.yaml, whatever "
        "the base recipe says; schedule.epochs is what a promotion trains for where "
        "promote.epochs is unset, and under 24 it is refused there"
    )


def test_a_promotion_at_the_base_budget_below_the_trial_budget_is_refused() -> None:
    text = BASE.replace(
        "epochs: 240, kind: multistep, milestones: [150, 180, 210]", "epochs: 20, kind: cosine"
    )
    params = "space: {distill.kd.temperature: {type: float, low: 1, high: 2}}\n"
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(text + params + "promote: {top_k: 2}", source="s.yaml")
    assert str(info.value) == (
        "s.yaml: promote: the base recipe's schedule.epochs 20 is below asha.max_epochs (24), so "
        "the promotion would train the best trials for fewer epochs than the search did; set "
        "promote.epochs, or raise schedule.epochs in base"
    )
    with_epochs = SearchSpace.from_yaml(text + params + "promote: {epochs: 24}", source="s.yaml")
    assert with_epochs.config.promote is not None and with_epochs.config.promote.epochs == 24
    assert SearchSpace.from_yaml(text + params, source="s.yaml").config.promote is None


def test_a_teacher_checkpoint_in_the_base_is_relative_to_its_file(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    recipe = "data: {dataset: digits}\nteacher: {arch: resnet8, checkpoint: t.pt}\n"
    (tmp_path / "recipes" / "r.yaml").write_text(recipe + "student: {arch: resnet8}\n")
    rest = (
        "asha: {max_epochs: 3}\nspace: {distill.kd.temperature: {type: float, low: 1, high: 2}}\n"
    )
    (tmp_path / "s.yaml").write_text("study: {name: t}\nbase: recipes/r.yaml\n" + rest)
    checkpoint = SearchSpace.load(tmp_path / "s.yaml").base.teacher.checkpoint
    assert checkpoint == str(tmp_path / "recipes" / "t.pt")
    inline = "{data: {dataset: digits}, teacher: {arch: resnet8, checkpoint: t.pt}, student: {arch: resnet8}}"
    (tmp_path / "s.yaml").write_text(f"study: {{name: t}}\nbase: {inline}\n" + rest)
    assert SearchSpace.load(tmp_path / "s.yaml").base.teacher.checkpoint == str(tmp_path / "t.pt")
    # a link to the space: relative to the folder of the file it leads to
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "s.yaml").symlink_to(tmp_path / "s.yaml")
    linked = SearchSpace.load(tmp_path / "elsewhere" / "s.yaml").base.teacher.checkpoint
    assert linked == str(tmp_path.resolve() / "t.pt")


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("r.yaml", "s.yaml: base: {folder}/r.yaml: no such file"),
        ("", "s.yaml: base: a recipe (a mapping) or the path of a recipe file, got null"),
        (
            "[r.yaml]",
            "s.yaml: base: a recipe (a mapping) or the path of a recipe file, got ['r.yaml']",
        ),
        (
            "[{teacher: null}, yes]",
            "s.yaml: base: a recipe (a mapping) or the path of a recipe file, got "
            "[{{teacher: null}}, true]",
        ),
        (
            "{data: {dataset: digits}, teacher: {arch: resnet8}, student: {arch: resnet8}, 3: x}",
            "s.yaml: base: 3: Keys should be strings",
        ),
    ],
)
def test_a_bad_base_names_the_space_file_and_base(tmp_path: Path, base: str, expected: str) -> None:
    text = (
        f"study: {{name: t}}\nbase: {base}\nasha: {{max_epochs: 3}}\n"
        "space: {distill.kd.temperature: {type: float, low: 1, high: 2}}\n"
    )
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(text, source="s.yaml", folder=tmp_path)
    assert str(info.value).startswith(expected.format(folder=tmp_path)), str(info.value)


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("", "it is empty"),
        ("- study\n", "it holds a list (['study'])"),
        ("study\n", "it holds text ('study')"),
        ("true\n", "it holds true or false (true)"),
    ],
)
def test_a_space_that_is_no_mapping_says_what_it_is_and_what_goes_in_one(
    text: str, got: str
) -> None:
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(text, source="s.yaml")
    assert str(info.value).startswith(f"s.yaml: {got}; a search space is a mapping of study, base,")


def test_a_recipe_given_for_a_space_is_named_so_in_one_line() -> None:
    recipe = (REPO / "search_spaces" / "recipes" / "digits.yaml").read_text()
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(recipe, source="r.yaml")
    assert str(info.value) == (
        "r.yaml: a recipe, not a search space (which names a recipe in base: and what to "
        "search in space:); `kdsearch train` takes a recipe, `kdsearch run` a search space"
    )
    with pytest.raises(RecipeError, match="unknown key"):  # a space's key mistyped stays so
        SearchSpace.from_yaml(recipe.replace("student:", "studnet:"), source="r.yaml")
    # and a recipe with one stray key of a space is a recipe with an unknown key
    with pytest.raises(RecipeError, match=r"^r\.yaml: space: unknown key; allowed here: data,"):
        Recipe.from_yaml(recipe + "space: 1\n", source="r.yaml")


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("auto", None),
        ("localhost:6379", ("localhost", 6379)),
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("[::1]:6379", ("::1", 6379)),
    ],
)
def test_cluster_addresses_are_split_into_host_and_port(
    address: str, parts: tuple[str, int] | None
) -> None:
    assert cluster_address(address) == parts


def test_ray_client_addresses_are_refused_with_why() -> None:
    # through Ray Client, Tune would run the searcher (which writes the study) on the cluster
    with pytest.raises(ValueError, match=r"^'ray://head:10001': Ray Client \(ray://\) is not"):
        cluster_address("ray://head:10001")


def space_with_sets(params: str, changes: dict[str, object]) -> SearchSpace:
    return SearchSpace.from_yaml(BASE + "space:\n" + params, source="s.yaml", base_changes=changes)


def test_set_changes_the_base_and_is_checked() -> None:
    assert space_with_sets(CONDITIONAL, {"distill.kd.weight": 0.5}).base.distill.kd.weight == 0.5
    with pytest.raises(RecipeError, match="unknown key"):
        space_with_sets(CONDITIONAL, {"distill.kd.wieght": 0.5})
    with pytest.raises(RecipeError) as info:  # not "unknown key 'search'": which file it is in
        space_with_sets(CONDITIONAL, {"search.concurrent": 4})
    assert str(info.value) == (
        "--set search.concurrent: --set changes the base recipe; the space's own settings "
        "(study, base, space, search, asha, promote, export) are set in s.yaml"
    )
    with pytest.raises(RecipeError) as info:  # it said nothing of --trials, made for this
        space_with_sets(CONDITIONAL, {"search.trials": 8})
    assert str(info.value).endswith(
        "are set in s.yaml, or this one with `kdsearch run SPACE --trials N`"
    )


def test_the_space_is_checked_against_the_base_as_set_changes_it() -> None:
    momentum = "  optim.momentum: {type: categorical, choices: [0.0, 0.9]}\n"
    with pytest.raises(RecipeError, match="nesterov: true needs momentum > 0"):
        space_of(momentum)  # the base recipe is nesterov by default
    space = space_with_sets(momentum, {"optim.nesterov": False})
    assert space.recipe_for({"optim.momentum": 0.0}).optim.momentum == 0.0


def test_a_conditional_value_is_checked_where_its_when_holds() -> None:
    """Checked against the base recipe alone, momentum 0 was refused under the base's nesterov:
    true, though no trial samples it but with nesterov false."""
    space = space_of(
        "  optim.nesterov: {type: categorical, choices: [true, false]}\n"
        "  optim.momentum: {type: categorical, choices: [0.0, 0.9], "
        "when: {optim.nesterov: false}}\n"
    )
    assert space.recipe_for({"optim.nesterov": False, "optim.momentum": 0.0}).optim.momentum == 0
    with pytest.raises(RecipeError) as refused:  # where it holds, a misfit is still refused
        space_of(
            "  optim.nesterov: {type: categorical, choices: [true, false]}\n"
            "  optim.momentum: {type: categorical, choices: [0.0, 0.9], "
            "when: {optim.nesterov: true}}\n"
        )
    assert str(refused.value) == (
        "s.yaml: space.optim.momentum: 0.0 does not fit the recipe with optim.nesterov True: "
        "optim: nesterov: true needs momentum > 0"
    )
    placements = space_of(  # a placement only the student it is drawn with has
        "  student.arch: {type: categorical, choices: [resnet8, vgg8]}\n"
        "  distill.hsakd.weight: {type: float, low: 0.5, high: 1.0}\n"
        "  distill.hsakd.placement: {type: categorical, choices: [[1, 2, 4], [4]], "
        "when: {student.arch: vgg8}}\n"
    )
    chosen = {"student.arch": "vgg8", "distill.hsakd.weight": 0.5}
    vgg = placements.recipe_for(chosen | {"distill.hsakd.placement": [1, 2, 4]})
    assert vgg.distill.hsakd.placement == [1, 2, 4]


def test_a_misfit_that_set_made_says_so() -> None:
    """It was blamed on the space's parameter alone, whose line in the file is right."""
    with pytest.raises(RecipeError) as refused:
        space_with_sets(
            "  distill.hsakd.weight: {type: float, low: 0.2, high: 1.0}\n",
            {"distill.hsakd.placement": [1, 2, 3, 4]},
        )
    assert str(refused.value).endswith(
        "(the base recipe as --set distill.hsakd.placement changed it)"
    )
    with pytest.raises(RecipeError) as refused:  # the placement the file searches, on the
        # student --set chose (HSAKD off in the base: the recipe does not check it there)
        SearchSpace.from_yaml(
            BASE.replace("student: {arch: resnet8}", "student: {arch: vgg8}")
            + "space:\n  distill.hsakd.weight: {type: float, low: 0.2, high: 1.0}\n"
            "  distill.hsakd.placement: {type: categorical, choices: [[1, 2, 4], [4]]}\n",
            source="s.yaml",
            base_changes={"student.arch": "resnet8"},
        )
    assert str(refused.value) == (
        "s.yaml: space.distill.hsakd.placement: [1, 2, 4]: resnet8 has no stage 4 to carry a "
        "head (its stages are 1-3) (the base recipe as --set student.arch changed it)"
    )
    with pytest.raises(RecipeError) as refused:  # a misfit of the file's own, --set or not
        space_with_sets(
            "  optim.momentum: {type: categorical, choices: [0.0, 0.9]}\n",
            {"distill.kd.weight": 0.5},
        )
    assert str(refused.value).endswith("nesterov: true needs momentum > 0")


def test_reachable_values_cover_base_and_parameter() -> None:
    space = space_of(CONDITIONAL)
    assert space.reachable("distill.crd.weight") == [0.0, 0.1, 2.0]
    assert space.reachable("distill.pkt.weight") == [0.0]


def test_a_term_a_section_choice_switches_on_is_reachable_and_its_settings_not_idle() -> None:
    """Else the search prepares no teacher heads for it (`active_terms` reads `reachable`),
    and every trial that draws it fails."""
    space = space_of(
        "  distill.hsakd: {type: categorical, choices: [{weight: 0.0}, "
        "{weight: 1.0, placement: [3]}]}\n"
        "  distill.crd: {type: categorical, choices: [{temperature: 0.1}, {temperature: 0.2}]}\n"
        "  distill.sskd.tf_temperature: {type: float, low: 2.0, high: 4.0}\n"
    )
    assert space.reachable("distill.hsakd.weight") == [0.0, 0.0, 1.0]
    assert space.reachable("distill.hsakd.placement") == [[1, 2, 3], [3]]
    assert space.reachable("distill.crd.weight") == [0.0]  # its choices do not name it
    assert "hsakd" in active_terms(space)
    assert space.idle_settings() == [  # CRD's temperature, chosen as a section, was not told
        "space.distill.crd: distill.crd is never on (its weight is 0 in base and no trial "
        "changes it), so its distill.crd.temperature changes nothing; search "
        "distill.crd.weight too, or give it a weight in base",
        "space.distill.sskd.tf_temperature: distill.sskd is never on (its weight is 0 in base "
        "and no trial changes it), so this changes nothing; search distill.sskd.weight too, "
        "or give it a weight in base",
    ]
    whole = space_of("  distill: {type: categorical, choices: [{pkt: {weight: 2.0}}, {}]}\n")
    assert whole.reachable("distill.pkt.weight") == [0.0, 2.0]
    assert whole.reachable("distill.kd.weight") == [0.9]  # the default, no choice names it


def test_cli_rejects_a_bad_space_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        BASE + "space:\n  optim.lr: {type: float, low: 1, high: 0.1}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kdsearch.cli", "run", "s.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kdsearch: error: s.yaml: space.optim.lr: low (1.0) is above high (0.1)"
    ]
    assert not (tmp_path / "studies").exists() or not any((tmp_path / "studies").iterdir())


def test_a_searched_section_sets_the_keys_a_choice_names_and_keeps_the_rest() -> None:
    """A choice replaced the section: every key it did not name went back to its default (the
    base's KD temperature, a --set, lost), and a searched `schedule` trained 240 epochs' worth
    of schedule within the 24-epoch trial budget."""
    space = SearchSpace.from_yaml(
        BASE.replace(
            "  student: {arch: resnet8}",
            "  student: {arch: resnet8}\n  distill: {kd: {temperature: 6.0}}",
        )
        + "space:\n  distill.kd: {type: categorical, choices: [{weight: 0.5}, {weight: 1.0}]}\n"
        + "  schedule: {type: categorical, choices: [{kind: cosine}, {gamma: 0.2}]}\n",
        source="s.yaml",
        base_changes={"distill.kd.temperature": 2.0},
    )
    recipe = space.recipe_for({"distill.kd": {"weight": 0.5}, "schedule": {"gamma": 0.2}})
    assert (recipe.distill.kd.weight, recipe.distill.kd.temperature) == (0.5, 2.0)
    assert recipe.schedule.epochs == 24 and recipe.schedule.milestones == [15, 18, 21]
    assert (recipe.schedule.kind, recipe.schedule.gamma) == ("multistep", 0.2)
    with pytest.raises(RecipeError, match=r"the trial budget is asha\.max_epochs"):
        space_of("  schedule: {type: categorical, choices: [{kind: cosine}, {epochs: 12}]}")


def test_a_set_of_a_section_sets_the_keys_it_names() -> None:
    from kdsearch.commands.common import parse_sets

    changes = parse_sets(["optim={lr: 0.2}", "distill.kd={weight: 0.5}", "optim.nesterov=true"])
    assert changes == {"optim.lr": 0.2, "distill.kd.weight": 0.5, "optim.nesterov": True}
    recipe = tiny_recipe({"optim.momentum": 0.5}).override(changes)
    assert (recipe.optim.lr, recipe.optim.momentum) == (0.2, 0.5), "momentum kept"


def readme_yaml(heading: str) -> str:
    """The first YAML block of the README after `heading`."""
    text = (REPO / "README.md").read_text()
    return text[text.index(heading) :].split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readmes_example_space_loads_as_it_says() -> None:
    """The README: "This file, saved in `search_spaces/`, runs as it is" (its base is there)."""
    space = SearchSpace.from_yaml(
        readme_yaml("### Search spaces"), source="README", folder=REPO / "search_spaces"
    )
    assert space.config.export is not None and space.config.study.name == "digits-example"
    assert space.config.export.dir == "studies/digits-example-winner"  # not the walkthrough's


def test_the_readmes_recipe_block_shows_the_defaults() -> None:
    """The README: "Only data.dataset, teacher.arch and student.arch are required; everything
    else has the default shown"."""
    shown = Recipe.from_yaml(readme_yaml("## Recipes"))
    required = {
        "data": {"dataset": shown.data.dataset},
        "teacher": {"arch": shown.teacher.arch},
        "student": {"arch": shown.student.arch},
    }
    assert shown == Recipe.from_dict(required)


def test_a_home_folder_in_export_dir_is_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """`export: {dir: ~/w}` exported into a folder named ~ in the working directory."""
    monkeypatch.setenv("HOME", "/home/u")
    space = space_of("  optim.lr: {type: float, low: 0.01, high: 0.1}\n", "export: {dir: ~/w}\n")
    assert space.config.export is not None and space.config.export.dir == "/home/u/w"
    # an empty one was read as the working folder, and refused for the files it holds there
    with pytest.raises(RecipeError) as empty:
        space_of("  optim.lr: {type: float, low: 0.01, high: 0.1}\n", "export: {dir: ''}\n")
    assert str(empty.value) == (
        "s.yaml: export.dir: is empty; name the folder to export the winner to"
    )


def test_section_choices_that_change_nothing_or_one_thing_twice_are_told() -> None:
    """Accepted silently before; told, not refused, so that a study started with them can
    still be resumed (a space file changed to drop one is another search)."""
    told = space_of(
        "  distill: {type: categorical, choices: [{kd.weight: 0.5}, {kd: {weight: 0.5}}]}\n"
        "  optim: {type: categorical, choices: [{}, {lr: 0.1}, {nesterov: {}}]}\n"
    ).idle_settings()
    assert told == [
        "space.distill: choices {'kd.weight': 0.5} and {'kd': {'weight': 0.5}} make the same "
        "change, which the sampler so draws twice as often; keep one",
        # `{}` itself is the choice to change nothing
        "space.optim: choice {'nesterov': {}}: optim.nesterov is an empty mapping, which "
        "changes nothing there; name the keys to change",
        "space.optim: choices {} and {'nesterov': {}} make the same change, which the sampler "
        "so draws twice as often; keep one",
    ]


def test_settings_a_whole_distill_choice_names_of_a_term_never_on_are_told() -> None:
    told = space_of(
        "  distill: {type: categorical, choices: [{crd: {temperature: 0.05}}, "
        "{kd: {weight: 0.5}}, {pkt: {weight: 1.0}}]}\n"
    ).idle_settings()
    assert told == [
        "space.distill: distill.crd is never on (its weight is 0 in base and no trial changes "
        "it), so its distill.crd.temperature changes nothing; search distill.crd.weight too, "
        "or give it a weight in base"
    ]
    told = space_of(
        "  distill.cktf: {type: categorical, choices: [{temperature: 0.05, feat_dim: 64}, {}]}\n"
    ).idle_settings()
    assert told == [
        "space.distill.cktf: distill.cktf is never on (its weight is 0 in base and no trial "
        "changes it), so its distill.cktf.feat_dim, distill.cktf.temperature change nothing; search "
        "distill.cktf.weight too, or give it a weight in base",
    ]


def test_a_searched_gamma_no_trial_trains_a_multistep_schedule_with_is_told() -> None:
    cosine = BASE.replace("kind: multistep", "kind: cosine")
    gamma = "  schedule.gamma: {type: float, low: 0.1, high: 0.5}\n"
    told = SearchSpace.from_yaml(cosine + "space:\n" + gamma, source="s.yaml").idle_settings()
    assert told == [
        "space.schedule.gamma: schedule.gamma is the multistep schedule's and no trial trains "
        "one (schedule.kind is cosine in base and no trial changes it), so it changes nothing; "
        "search schedule.kind too, or set kind: multistep in base"
    ]
    assert space_of(gamma).idle_settings() == []  # the base is multistep
    both = "  schedule.kind: {type: categorical, choices: [cosine, multistep]}\n" + gamma
    assert SearchSpace.from_yaml(cosine + "space:\n" + both, source="s.yaml").idle_settings() == []


def test_a_schedule_kind_whose_milestones_miss_the_base_budget_is_refused() -> None:
    """Scaled to the trial budget, the milestones past the base's epochs were dropped: every
    trial that drew multistep trained at a constant rate, and the promotion would refuse it."""
    short = BASE.replace(
        "schedule: {epochs: 240, kind: multistep, milestones: [150, 180, 210]}",
        "schedule: {epochs: 20, kind: cosine}",
    )
    kind = "  schedule.kind: {type: categorical, choices: [cosine, multistep]}\n"
    with pytest.raises(RecipeError) as info:
        SearchSpace.from_yaml(short + "space:\n" + kind, source="s.yaml")
    assert str(info.value) == (
        "s.yaml: space.schedule.kind: multistep needs the base's schedule.milestones below its "
        "epochs (20), and [150, 180, 210] are not: a trial's budget would drop them and train "
        "at a constant rate; set schedule.milestones in base"
    )
    section = "  schedule: {type: categorical, choices: [{kind: multistep}, {gamma: 0.2}]}\n"
    with pytest.raises(RecipeError, match=r"space\.schedule: multistep needs the base's"):
        SearchSpace.from_yaml(short + "space:\n" + section, source="s.yaml")
    fitting = short.replace("kind: cosine}", "kind: cosine, milestones: [10, 15]}")
    space = SearchSpace.from_yaml(fitting + "space:\n" + kind, source="s.yaml")
    assert space.recipe_for({"schedule.kind": "multistep"}).schedule.milestones == [12, 18]


def test_a_when_on_true_does_not_hold_for_a_choice_1() -> None:
    """Python's True == 1 let `when: {$x: true}` pass for choices [1, 2] and sample under 1."""
    with pytest.raises(RecipeError, match=r"when \$x = True, but \$x never takes that value"):
        space_of(
            "  $x: {type: categorical, choices: [1, 2]}\n"
            "  optim.lr: {type: float, low: 0.01, high: 0.1, when: {$x: true}}\n"
        )
    with pytest.raises(RecipeError, match=r"when distill\.crd\.negatives = True, but"):
        space_of(
            "  distill.crd.negatives: {type: int, low: 1, high: 8}\n"
            "  optim.lr: {type: float, low: 0.01, high: 0.1, when: {distill.crd.negatives: true}}\n"
        )
    space = space_of(
        "  $x: {type: categorical, choices: [0, 2, true]}\n"
        "  optim.lr: {type: float, low: 0.01, high: 0.1, when: {$x: true}}\n"
    )
    for x, sampled in ((2, False), (True, True)):
        chosen = space.suggest(FixedTrial({"$x": x, "optim.lr": 0.05}))
        assert ("optim.lr" in chosen) is sampled


def test_a_section_choice_that_sets_a_key_twice_is_told() -> None:
    told = space_of(
        "  distill: {type: categorical, choices: [{kd.weight: 0.5, kd: {weight: 0.7}}, {}]}\n"
    ).idle_settings()
    assert told == [
        "space.distill: choice {'kd.weight': 0.5, 'kd': {'weight': 0.7}} sets "
        "distill.kd.weight twice, and a trial takes the last value given; keep one"
    ]
    told = space_of(  # an empty mapping sets nothing: told as such, not as a second value
        "  distill: {type: categorical, choices: [{kd.temperature: 2.0, kd: {temperature: {}}}, "
        "{}]}\n"
    ).idle_settings()
    assert len(told) == 1 and "distill.kd.temperature is an empty mapping" in told[0]


def test_a_stepped_float_is_drawn_as_its_grid_writes_it() -> None:
    space = space_of("  optim.lr: {type: float, low: 0.01, high: 0.2, step: 0.01}\n")
    assert space.suggest(FixedTrial({"optim.lr": 0.01 + 5 * 0.01}))["optim.lr"] == 0.06
    assert on_grid(0.15000000000000002, 0.01, 0.01) == 0.15
    assert on_grid(3.0000000000000004, 1.0, 0.5) == 3.0
    assert on_grid(2.5e-05 + 1e-21, 1e-05, 5e-06) == 2.5e-05


@pytest.mark.parametrize(
    ("params", "count"),
    [
        ("  distill.kd.temperature: {type: categorical, choices: [2.0, 4.0]}", 2),
        ("  batch_size: {type: int, low: 32, high: 128, step: 32}", 4),
        ("  distill.kd.weight: {type: float, low: 0.5, high: 0.5}", 1),
        ("  distill.kd.weight: {type: float, low: 0.1, high: 0.9, step: 0.2}", 5),
        (  # 2 x (1 + 3): pkt.weight is drawn only with $extra pkt
            "  distill.kd.temperature: {type: categorical, choices: [2.0, 4.0]}\n"
            "  $extra: {type: categorical, choices: [none, pkt]}\n"
            "  distill.pkt.weight: {type: float, low: 50, high: 100, step: 25, when: {$extra: pkt}}",
            8,
        ),
        (  # a chain: $b only with $a on, stkd.mix only with $b on
            "  batch_size: {type: int, low: 32, high: 64, step: 32}\n"
            "  $a: {type: categorical, choices: [off, on]}\n"
            "  $b: {type: categorical, choices: [off, on], when: {$a: on}}\n"
            "  distill.stkd.mix: {type: categorical, choices: [mixup, cutmix], when: {$b: on}}\n"
            "  distill.stkd.weight: {type: categorical, choices: [0.5], when: {batch_size: 64}}",
            8,  # batch 32: 1 + (1 + 2) = 4; batch 64: the same, its weight one value
        ),
        ("  distill.kd.weight: {type: float, low: 0.1, high: 0.9}", None),  # without end
    ],
)
def test_the_distinct_samples_of_a_space_are_counted_through_its_conditions(
    params: str, count: int | None
) -> None:
    space = space_of(params)
    assert space.distinct_samples(most=100) == count
    if count is not None:  # past `most`: not counted
        assert space.distinct_samples(most=count - 1) is None
        assert space.distinct_samples(most=count) == count


def test_counting_a_space_takes_the_values_no_when_names_together_and_gives_up_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An int of a billion values that one `when` names one of is counted without a billion
    steps; eighteen two-way decisions, all named, branch past what is counted, and the count
    gives up (the note it feeds is advice)."""
    wide = space_of(
        "  batch_size: {type: int, low: 2, high: 1000000001}\n"
        "  distill.kd.weight: {type: categorical, choices: [0.5, 0.9], when: {batch_size: 64}}"
    )
    with monkeypatch.context() as patched:  # a few calls do: each value a step would fail fast
        patched.setattr("kdsearch.space.COUNTING", 100)
        assert wide.distinct_samples(most=2**31 - 1) == 10**9 - 1 + 2
    decisions = "".join(f"  $d{i}: {{type: categorical, choices: [a, b]}}\n" for i in range(18))
    every = ", ".join(f"$d{i}: a" for i in range(18))
    branching = space_of(
        decisions
        + f"  distill.kd.temperature: {{type: categorical, choices: [1.0, 2.0], when: {{{every}}}}}"
    )
    assert branching.distinct_samples(most=2**31 - 1) is None  # 2^18 + 1, past COUNTING calls
    assert branching.distinct_samples(most=10) is None  # past `most`, found early
