from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from kdsearch.errors import RecipeError
from kdsearch.recipe import DATASET_NAMES, MODEL_NAMES, Recipe, flatten, followed

from .conftest import REPO, tiny_recipe

MINIMAL = """
data: {dataset: digits}
teacher: {arch: resnet20}
student: {arch: resnet8}
"""


def test_minimal_recipe_takes_the_defaults_of_the_design() -> None:
    recipe = Recipe.from_yaml(MINIMAL)
    assert recipe.distill.kd.temperature == 4.0
    assert recipe.distill.kd.weight == 0.9
    assert recipe.schedule.milestones == [150, 180, 210]
    assert recipe.optim.nesterov is True
    assert recipe.data.val_fraction == 0.1
    assert recipe.precision == "auto" and recipe.device == "auto"


def test_yaml_round_trip_gives_an_equal_recipe() -> None:
    recipe = tiny_recipe({"distill.kd.temperature": 6.5, "data.subset": 300, "seed": 3})
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()


def test_shipped_recipes_load() -> None:
    paths = sorted((REPO / "search_spaces" / "recipes").glob("*.yaml"))
    assert paths, "the shipped recipes are there"
    for path in paths:
        assert Recipe.load(path).student.arch in MODEL_NAMES


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (MINIMAL + "distill: {kd: {temprature: 3}}", "distill.kd.temprature: unknown key"),
        (
            MINIMAL + "distill: {kd: {temperature: 0}}",
            "distill.kd.temperature: Input should be greater than 0",
        ),
        (MINIMAL + "batch_size: 6.5", "batch_size: Input should be a valid integer"),
        (MINIMAL + "batch_size: '64'", "batch_size: Input should be a valid integer"),
        (MINIMAL + "optim: {nesterov: 1}", "optim.nesterov: Input should be a valid boolean"),
        (
            MINIMAL + "precision: half",
            "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'",
        ),
        (MINIMAL + "device: gpu", "device: String should match pattern"),
        (
            MINIMAL + "schedule: {epochs: 100}",
            "schedule: milestones [150, 180, 210] are not below epochs (100); set "
            "schedule.milestones together with schedule.epochs, or schedule.kind: cosine",
        ),
        (MINIMAL + "schedule: {epochs: 10, milestones: [5, 3]}", "milestones must increase"),
        (MINIMAL + "optim: {momentum: 0.0}", "nesterov: true needs momentum > 0"),
        (
            MINIMAL.replace("digits}", "digits, val_fraction: 1.5}"),
            "data.val_fraction: Input should be less than 1",
        ),
        (
            "data: {dataset: mnist}\nteacher: {arch: resnet20}\nstudent: {arch: resnet8}",
            "data.dataset: Input should be 'digits'",
        ),
        (
            "data: {dataset: digits}\nteacher: {arch: resnet18}\nstudent: {arch: resnet8}",
            "teacher.arch: Input should be 'resnet8'",
        ),
        ("data: {dataset: digits}\nteacher: {arch: resnet20}", "student: required key is missing"),
        (MINIMAL + "seed: 18446744073709551616", "seed: Input should be less than or equal to"),
        (
            MINIMAL.replace("resnet20}", "resnet20, train: {seed: 18446744073709551616}}"),
            "teacher.train.seed: Input should be less than or equal to 4294967295",
        ),
        (
            "- just a list",
            "r.yaml: it holds a list (['just a list']); a recipe is a mapping of data, teacher,",
        ),
        ("", "r.yaml: it is empty; a recipe is a mapping of data, teacher, student,"),
        (
            MINIMAL + "distill: {ce: {weight: 0}, kd: {weight: 0.0}}",
            "r.yaml: distill: every term has weight 0, so nothing would be trained; "
            "give one a weight above 0 (ce, say)",
        ),
        (
            MINIMAL + "precision: fp16\ndevice: cpu",
            "r.yaml: precision: fp16 needs CUDA; use bf16 or fp32 with device: cpu",
        ),
        (
            MINIMAL.replace("resnet20}", "resnet20, heads: {checkpoint: h.pt}}"),
            "r.yaml: teacher: teacher.heads.checkpoint needs teacher.checkpoint",
        ),
        ("data: [1, 2", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_key_and_what_is_allowed(yaml_text: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=None) as info:
        Recipe.from_yaml(yaml_text, source="r.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("r.yaml")
    assert "\n" not in str(info.value)


def test_unknown_key_lists_the_allowed_keys() -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(MINIMAL + "distill: {kd: {temprature: 3}}")
    assert "allowed here: weight, temperature" in str(info.value)


def test_every_model_and_dataset_name_is_accepted() -> None:
    base = Recipe.from_yaml(MINIMAL)
    for arch in MODEL_NAMES:
        assert base.override({"student.arch": arch}).student.arch == arch
    for name in DATASET_NAMES:
        assert base.override({"data.dataset": name}).data.dataset == name


def test_exponent_floats_without_a_dot_are_floats() -> None:
    recipe = Recipe.from_yaml(MINIMAL + "optim: {weight_decay: 5e-4, lr: 1E-2}")
    assert recipe.optim.weight_decay == pytest.approx(5e-4)
    assert recipe.optim.lr == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            MINIMAL + "distill: {kd: {weight: 1.0}}\ndistill: {ce: {weight: 0.5}}\n",
            "r.yaml: line 6: not valid YAML: key 'distill' is given twice (also on line 5); keep one",
        ),
        (
            MINIMAL + "distill:\n  kd: {weight: 1.0, temperature: 2.0, weight: 0.5}\n",
            "r.yaml: line 6: not valid YAML: key 'weight' is given twice (also on line 6); keep one",
        ),
        (
            MINIMAL + "seed: 1\n'seed': 2\n",
            "r.yaml: line 6: not valid YAML: key 'seed' is given twice (also on line 5); keep one",
        ),
    ],
)
def test_a_key_given_twice_is_refused_with_its_line(yaml_text: str, expected: str) -> None:
    # PyYAML keeps the last of two equal keys without a word, so half a recipe could vanish.
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(yaml_text, source="r.yaml")
    assert str(info.value) == expected


def test_a_merged_key_may_be_overridden_but_not_written_twice() -> None:
    # `<<: *anchor` then one of the anchor's keys is YAML's override, not a key given twice.
    merged = Recipe.from_yaml(
        MINIMAL + "distill:\n  ce: &w {weight: 0.5}\n  kd: {<<: *w, weight: 0.7}\n"
    )
    assert (merged.distill.ce.weight, merged.distill.kd.weight) == (0.5, 0.7)
    with pytest.raises(RecipeError, match="key 'weight' is given twice"):
        Recipe.from_yaml(
            MINIMAL + "distill:\n  ce: {weight: 0.5}\n  kd: {weight: 0.5, weight: 0.7}\n"
        )


def test_unsafe_yaml_tags_are_refused() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(MINIMAL + "seed: !!python/object/apply:os.getcwd []")


def test_override_returns_a_new_checked_recipe() -> None:
    recipe = Recipe.from_yaml(MINIMAL)
    changed = recipe.override(
        {"distill.kd.temperature": 6, "schedule.epochs": 20, "schedule.milestones": [10, 15]}
    )
    assert changed.distill.kd.temperature == 6.0
    assert isinstance(changed.distill.kd.temperature, float)
    assert recipe.distill.kd.temperature == 4.0  # the original is untouched
    assert changed.schedule.milestones == [10, 15]


def test_milestones_scale_with_the_epochs_and_stay_within_them() -> None:
    """A milestone in the last epochs of the base (239 of 240) rounded to the trial budget
    itself (12 of 12) and was dropped: the trial never decayed its learning rate there."""
    recipe = Recipe.from_yaml(MINIMAL).override({"schedule.milestones": [150, 180, 239]})
    assert recipe.schedule.epochs == 240
    assert recipe.with_epochs(12).schedule.milestones == [8, 9, 11]  # 7.5, 9, 11.95
    assert recipe.with_epochs(2).schedule.milestones == [1]
    assert recipe.with_epochs(1).schedule.milestones == []
    assert recipe.with_epochs(480).schedule.milestones == [300, 360, 478]
    cosine = Recipe.from_yaml(MINIMAL).override({"schedule.kind": "cosine", "schedule.epochs": 20})
    assert cosine.schedule.milestones == [150, 180, 210]  # the defaults, past its epochs
    assert cosine.with_epochs(10).schedule.milestones == []


@pytest.mark.parametrize(
    ("epochs", "milestones"),
    [(5, [2, 3, 4]), (6, [3, 4, 5]), (8, [5, 6, 7]), (4, [1, 2, 3]), (3, [1, 2]), (2, [1])],
)
def test_milestones_that_round_to_one_epoch_keep_every_decay_they_can(
    epochs: int, milestones: list[int]
) -> None:
    """Milestones went into a set, so [150, 180, 210] of 240 epochs became [3, 4] at 5 epochs
    (4 and 4 merged) and trials ended at 10 times the learning rate the schedule decays to."""
    from kdsearch.train import lr_at

    recipe = Recipe.from_yaml(MINIMAL)
    assert recipe.schedule.milestones == [150, 180, 210]
    short = recipe.with_epochs(epochs)
    assert short.schedule.milestones == milestones
    decays = min(3, epochs - 1)
    assert lr_at(short, epochs - 1) == pytest.approx(recipe.optim.lr * 0.1**decays)


def test_override_sets_a_whole_section() -> None:
    recipe = Recipe.from_yaml(MINIMAL).override({"distill.kd": {"weight": 0.0}})
    assert recipe.distill.kd.weight == 0.0 and recipe.distill.kd.temperature == 4.0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"distill.kd.temprature": 3},
            "distill.kd.temprature: unknown key; allowed here: weight, temperature",
        ),
        ({"optimizer.lr": 0.1}, "optimizer: unknown key; allowed here: data, teacher, student,"),
        ({"seed.value": 1}, "seed.value: seed is a value, not a section"),
        (
            {"distill.kd.temperature": "hot"},
            "distill.kd.temperature: Input should be a valid number",
        ),
        ({"student.arch": "resnet9"}, "student.arch: Input should be"),
        ({"distill.kd.temperature": float("inf")}, "Input should be a finite number"),
        ({"optim.lr": float("nan")}, "optim.lr: Input should be a finite number"),
        ({"distill.kd.temperature.x": 1}, "distill.kd.temperature is a value, not a section"),
        (
            {"distill.hsakd.weight": 1.0, "distill.hsakd.placement": [1, 4]},
            "distill.hsakd.placement [1, 4]: resnet8 has no stage 4 to carry a head "
            "(its stages are 1-3)",
        ),
    ],
)
def test_override_rejects_bad_paths_and_values(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(MINIMAL).override(changes)
    assert expected in str(info.value)


def test_recipe_is_immutable() -> None:
    recipe = Recipe.from_yaml(MINIMAL)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        recipe.seed = 3  # type: ignore[misc]


def test_missing_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        Recipe.load(tmp_path / "absent.yaml")


def test_input_paths_in_a_file_are_relative_to_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    text = MINIMAL.replace(
        "resnet20}", "resnet20, checkpoint: teacher.pt, heads: {checkpoint: ../h/heads.pt}}"
    )
    (folder / "recipe.yaml").write_text(text)
    recipe = Recipe.load(folder / "recipe.yaml")
    assert recipe.teacher.checkpoint == str(folder / "teacher.pt")
    assert recipe.teacher.heads.checkpoint == str(folder / "../h/heads.pt")
    assert recipe.data.root == "~/.cache/kdsearch/data", "the default, from home, stays"
    # the data folder too (a recipe.yaml that `train` wrote read another folder from elsewhere)
    (folder / "recipe.yaml").write_text(text.replace("data: {", "data: {root: images, "))
    assert Recipe.load(folder / "recipe.yaml").data.root == str(folder / "images")
    absolute = text.replace("checkpoint: teacher.pt", f"checkpoint: {tmp_path}/t.pt")
    (folder / "recipe.yaml").write_text(absolute.replace("../h/heads.pt", "~/heads.pt"))
    recipe = Recipe.load(folder / "recipe.yaml")
    assert recipe.teacher.checkpoint == f"{tmp_path}/t.pt", "an absolute path stays"
    assert recipe.teacher.heads.checkpoint == "~/heads.pt", "so does one from home"
    assert Recipe.from_yaml(text).teacher.checkpoint == "teacher.pt", "text without a file"
    monkeypatch.chdir(tmp_path)  # a file named relative to the working folder: still absolute
    (folder / "recipe.yaml").write_text(text)
    assert Recipe.load("export/recipe.yaml").teacher.checkpoint == str(folder / "teacher.pt")
    # a link to the file: relative to the folder of the file it leads to (an export's recipe
    # linked from elsewhere could not find the teacher beside it)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.yaml").symlink_to(folder / "recipe.yaml")
    linked = Recipe.load(tmp_path / "elsewhere" / "link.yaml")
    assert linked.teacher.checkpoint == str(folder / "teacher.pt")
    assert followed(tmp_path / "elsewhere" / "link.yaml") == (folder / "recipe.yaml").resolve()
    assert followed("export/recipe.yaml") == Path("export/recipe.yaml"), "no link: as given"


def test_recipe_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, kdsearch.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_flatten_makes_dotted_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }


@pytest.mark.parametrize("name", ["1e5", "5e-4", "2E10", "1_0e3"])
def test_a_string_that_reads_as_a_number_is_written_so_that_it_reads_back(name: str) -> None:
    """`5e-4` is read as a float (YAML 1.1 would read a string); a folder of that name was
    written bare, and the recipe then failed to load: `data.root` is no number."""
    recipe = Recipe.from_yaml(MINIMAL).override({"data.root": name})
    assert Recipe.from_yaml(recipe.to_yaml()).data.root == name


def test_a_file_or_folder_that_is_not_a_recipe_is_one_short_line(tmp_path: Path) -> None:
    """An export's meta.json gave one line of some 1,500 characters, "allowed here: ..." for
    each of its keys; the export's folder, "cannot read: [Errno 21] Is a directory"."""
    (tmp_path / "meta.json").write_text('{"study": "s", "trial": 3, "inputs": {}}')
    with pytest.raises(RecipeError) as refused:
        Recipe.load(tmp_path / "meta.json")
    assert str(refused.value) == (
        f"{tmp_path / 'meta.json'}: not a recipe: none of its keys (study, trial, inputs) is one "
        "of a recipe's (data, teacher, student, distill, optim, schedule, batch_size, precision, "
        "device, compile, seed)"
    )
    (tmp_path / "recipe.yaml").write_text(tiny_recipe().to_yaml())
    with pytest.raises(RecipeError) as refused:
        Recipe.load(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path} is a folder; the recipe in it is {tmp_path / 'recipe.yaml'}"
    )
    with pytest.raises(RecipeError, match=r"cannot read: .*Not a directory"):  # not a traceback
        Recipe.load(tmp_path / "recipe.yaml" / "r.yaml")
