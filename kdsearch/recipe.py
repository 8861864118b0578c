"""The recipe: everything one training run needs, typed and strict (DESIGN section 3).

A recipe is immutable. `Recipe.override({"distill.kd.temperature": 6})` is the one way to change one
(CLI `--set`, the search and promotion all use it); it returns a new, fully re-validated recipe.
This module imports no torch, so reading and checking a recipe is cheap.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from kdsearch.errors import RecipeError

ModelName = Literal[
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "resnet50",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "mobilenetv2",
    "shufflenetv1",
    "shufflenetv2",
]
DatasetName = Literal["digits", "cifar10", "cifar100", "fashion_mnist", "imagefolder", "synthetic"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
# Stages after the stem, each of which can carry an HSAKD auxiliary head (numbered 1..n); the
# models package builds networks with exactly these (a test holds the two together).
HEAD_STAGES: dict[str, int] = {
    name: 4 if name.startswith("vgg") or name in ("mobilenetv2", "resnet50") else 3
    for name in MODEL_NAMES
}
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
# the channels of each data set's images, where known before they are read (an image folder's:
# colour if any image is); the data package reads them so (a test holds the two together)
DATASET_CHANNELS = {"digits": 1, "fashion_mnist": 1, "cifar10": 3, "cifar100": 3, "synthetic": 3}

Weight = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]
# The most a study can record of a count: Optuna keeps trial numbers and epochs (its steps) in
# SQL `integer` columns, 32-bit in PostgreSQL.
MOST = 2**31 - 1
Count = Annotated[int, Field(ge=1, le=MOST)]
Epochs = Count
# Bounded so that a typo is an error, not a traceback from torch.manual_seed (past 2**64 - 1).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


# The recipe keys that name weights files: relative paths in a file are relative to the file.
INPUT_PATHS = ("data.root", "teacher.checkpoint", "teacher.heads.checkpoint")


class Section(BaseModel):
    """A strict, immutable part of a recipe: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    """Which data set, where it lives, and how the validation split and subset are cut."""

    dataset: DatasetName
    root: str = "~/.cache/kdsearch/data"
    download: bool = True
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    subset: Annotated[int, Field(ge=1)] | None = None
    seed: Seed = 0
    image_size: Annotated[int, Field(ge=8)] | None = None
    hflip: bool | None = None  # flip training images left-right; None: as the data set allows
    # per channel, in [0, 1] units, what inputs are normalised with; None: the training split's
    # (a teacher from elsewhere was trained with its code's constants)
    mean: Annotated[list[float], Field(min_length=1)] | None = None
    std: Annotated[list[float], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _mean_with_std(self) -> DataConfig:
        if (self.mean is None) != (self.std is None):
            given, lacking = ("mean", "std") if self.std is None else ("std", "mean")
            raise ValueError(
                f"data.{given} needs data.{lacking}: inputs are normalised with both, or with "
                "the training split's own when neither is given"
            )
        if self.mean is not None and self.std is not None:
            if not (all(0 <= m <= 1 for m in self.mean) and all(1e-3 <= d <= 1 for d in self.std)):
                raise ValueError(
                    f"data.mean {self.mean} and data.std {self.std} are in [0, 1] units, as "
                    "images scaled to [0, 1] (0-255 values divided by 255): each mean from 0 to "
                    "1, each deviation from 0.001 to 1 (1 with mean 0: inputs as read)"
                )
            channels = DATASET_CHANNELS.get(self.dataset)
            if len(self.mean) != len(self.std):
                raise ValueError(
                    f"data.mean has {len(self.mean)} values and data.std {len(self.std)}; "
                    "give one of each per channel"
                )
            if channels is not None and len(self.mean) != channels:
                raise ValueError(
                    f"data.mean and data.std have {len(self.mean)} values each, but the "
                    f"images of {self.dataset} have {channels} channel(s); give one of each per "
                    "channel"
                )
        return self


class TeacherTrainConfig(Section):
    """How a teacher is trained when no checkpoint is given (cosine schedule, recipe optim)."""

    epochs: Epochs = 240
    lr: Positive = 0.05
    seed: Seed = 0


class TeacherHeadsConfig(Section):
    """How the teacher's own heads (HSAKD auxiliary classifiers, SSKD projection) are trained on
    the frozen teacher, once, before any student needs them (cosine schedule, recipe optim)."""

    epochs: Epochs = 60
    lr: Positive = 0.05
    checkpoint: str | None = None  # trained heads of `teacher.checkpoint` (as an export holds)


class TeacherConfig(Section):
    """The frozen network the student learns from. A relative checkpoint path in a recipe or
    space file is relative to that file's folder (on the command line: to the working folder)."""

    arch: ModelName
    checkpoint: str | None = None
    train: TeacherTrainConfig = TeacherTrainConfig()
    heads: TeacherHeadsConfig = TeacherHeadsConfig()

    @model_validator(mode="after")
    def _heads_of_this_teacher(self) -> TeacherConfig:
        if self.heads.checkpoint is not None and self.checkpoint is None:
            raise ValueError(
                "teacher.heads.checkpoint needs teacher.checkpoint: heads fit the weights of "
                "the one teacher they were trained on; set teacher.checkpoint to that teacher, "
                "or remove teacher.heads.checkpoint"
            )
        return self


class StudentConfig(Section):
    """The network being trained."""

    arch: ModelName


class CEConfig(Section):
    """Cross-entropy against the labels."""

    weight: Weight = 1.0


class KDConfig(Section):
    """Hinton KD on the final logits."""

    weight: Weight = 0.9
    temperature: Positive = 4.0


class PKTConfig(Section):
    """Probabilistic knowledge transfer on the pooled features (see losses/pkt.py for the scale)."""

    weight: Weight = 0.0


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
FeatDim = Annotated[int, Field(ge=2)]
Negatives = Annotated[int, Field(ge=1)]


class CRDConfig(Section):
    """Contrastive representation distillation on the pooled features."""

    weight: Weight = 0.0
    feat_dim: FeatDim = 128
    temperature: Positive = 0.07
    negatives: Negatives = 16384
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5


class CKTFConfig(Section):
    """CRD at the stem, every stage and the pooled features, with final and intermediate weights."""

    weight: Weight = 0.0
    final: Weight = 0.8
    intermediate: Weight = 0.1
    feat_dim: FeatDim = 128
    temperature: Positive = 0.1
    negatives: Negatives = 16384
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5


class SSKDConfig(Section):
    """Self-supervision by rotations: KD on rotated images and similarity-matrix transfer."""

    weight: Weight = 0.0
    tf_weight: Weight = 2.7
    ss_weight: Weight = 10.0
    tf_temperature: Positive = 4.0
    ss_temperature: Positive = 0.5
    tf_keep: Fraction = 1.0
    ss_keep: Fraction = 0.75


class HSAKDConfig(Section):
    """Auxiliary classifiers on intermediate stages over rotation-augmented joint labels."""

    weight: Weight = 0.0
    temperature: Positive = 3.0
    placement: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 2, 3]

    @model_validator(mode="after")
    def _distinct_stages(self) -> HSAKDConfig:
        if len(set(self.placement)) != len(self.placement):
            raise ValueError(f"placement lists a stage twice: {self.placement}")
        return self


class STKDConfig(Section):
    """Similarity transfer through mixed images: mixed CE and KL to the teacher on them."""

    weight: Weight = 0.0
    mix: Literal["mixup", "cutmix"] = "mixup"
    alpha: Positive = 0.2
    temperature: Positive = 4.0
    kl_weight: Weight = 1.0


class DistillConfig(Section):
    """Every distillation term with its weight; a weight of 0 switches the term off."""

    ce: CEConfig = CEConfig()
    kd: KDConfig = KDConfig()
    pkt: PKTConfig = PKTConfig()
    crd: CRDConfig = CRDConfig()
    cktf: CKTFConfig = CKTFConfig()
    sskd: SSKDConfig = SSKDConfig()
    hsakd: HSAKDConfig = HSAKDConfig()
    stkd: STKDConfig = STKDConfig()

    @model_validator(mode="after")
    def _some_term_on(self) -> DistillConfig:
        if all(term.weight == 0 for _, term in self):
            raise ValueError(
                "every term has weight 0, so nothing would be trained; "
                "give one a weight above 0 (ce, say)"
            )
        return self


class OptimConfig(Section):
    """Stochastic gradient descent, as every CIFAR distillation paper trains."""

    name: Literal["sgd"] = "sgd"
    lr: Positive = 0.05
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Weight = 5.0e-4
    nesterov: bool = True

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: true needs momentum > 0")
        return self


class ScheduleConfig(Section):
    """Training length and learning-rate schedule (the rate is set once per epoch)."""

    epochs: Epochs = 240
    kind: Literal["multistep", "cosine"] = "multistep"
    milestones: list[Annotated[int, Field(ge=1)]] = [150, 180, 210]
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1

    @model_validator(mode="after")
    def _milestones_fit(self) -> ScheduleConfig:
        if self.kind != "multistep":
            return self
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"milestones must increase strictly, got {self.milestones}")
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ValueError(
                f"milestones {late} are not below epochs ({self.epochs}); "
                "set schedule.milestones together with schedule.epochs, or schedule.kind: cosine"
            )
        return self


class Recipe(Section):
    """Everything one training run needs."""

    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig = DistillConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    batch_size: Annotated[int, Field(ge=2)] = 64
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    compile: bool = False
    seed: Seed = 0

    @model_validator(mode="after")
    def _placement_fits_student(self) -> Recipe:
        if self.distill.hsakd.weight > 0:  # HSAKD off: its placement is not used
            problem = placement_problem(self.student.arch, self.distill.hsakd.placement)
            if problem:
                raise ValueError(f"distill.hsakd.placement {problem}")
        return self

    @model_validator(mode="after")
    def _fp16_on_cuda(self) -> Recipe:
        if self.precision == "fp16" and self.device == "cpu":  # device auto: known at run time
            raise ValueError("precision: fp16 needs CUDA; use bf16 or fp32 with device: cpu")
        return self

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "recipe") -> Recipe:
        """Validate a plain mapping; every problem is reported with its dotted key."""
        if not isinstance(raw, Mapping):
            raise not_a_mapping(raw, "a recipe", cls.model_fields, source=source)
        if "space" in raw and "base" in raw:  # one line, not one per key of the space file
            raise RecipeError(
                f"{source}: a search space (it has space: and base:), not a recipe; "
                "`kdsearch run` takes a search space, `kdsearch train` a recipe"
            )
        if raw and not raw.keys() & cls.model_fields.keys():  # one line, not one per key
            raise RecipeError(
                f"{source}: not a recipe: none of its keys ({', '.join(map(str, raw))}) is one "
                f"of a recipe's ({', '.join(cls.model_fields)})"
            )
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as err:
            raise RecipeError(f"{source}: {describe(err, cls)}") from None

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe") -> Recipe:
        """Parse YAML text (safe loader only) into a recipe."""
        return cls.from_dict(load_yaml(text, source=source), source=source)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe YAML file; its relative input paths (`INPUT_PATHS`) are relative to
        its folder."""
        # An export's folder, or a training run's; one that cannot be searched, `read_text`
        # refuses (is_file would raise PermissionError)
        inside = Path(path) / "recipe.yaml"
        if os.access(path, os.X_OK) and inside.is_file():
            raise RecipeError(f"{path} is a folder; the recipe in it is {inside}")
        return cls.from_yaml(read_text(path), source=str(path)).resolve_paths(followed(path).parent)

    def resolve_paths(self, folder: Path) -> Recipe:
        """The same recipe with each relative input path (the data folder, the checkpoints)
        joined to `folder` (the folder of the file that wrote it, or the working folder for the
        command line's --set), made absolute, so that the recipe reads the same files from
        anywhere and writes them so."""
        changes = {
            key: str((folder.expanduser() / Path(value).expanduser()).absolute())
            for key in INPUT_PATHS
            if (value := self.get(key)) is not None and not Path(value).expanduser().is_absolute()
        }
        return self.override(changes, source="recipe") if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, scalars) that `from_dict` turns back into an equal recipe."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """YAML text that `from_yaml` turns back into an equal recipe."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    def get(self, path: str) -> Any:
        """The value at a dotted path (plain data for a section); an unknown path is an error."""
        node: Any = self.to_dict()
        for part in check_path(path, source="recipe"):
            node = node[part]
        return node

    def with_epochs(self, epochs: int) -> Recipe:
        """The same recipe trained for `epochs`, multistep milestones scaled in proportion (the
        budget of a search trial or of a promotion run): each within the epochs, as it was, so a
        late one still decays the last epoch (none fits in one epoch). Milestones that round to
        one epoch move apart to the nearest free ones, so every decay still happens; a budget
        with fewer epochs after its first than milestones decays once an epoch after the first."""
        s = self.schedule
        last = epochs - 1  # milestones lie in 1..epochs-1
        places = [
            min(last, max(1, round(m * epochs / s.epochs)))
            for m in s.milestones
            if m < s.epochs  # (a cosine recipe's are not checked, and none is past its end)
        ]
        if len(places) >= last:
            milestones = list(range(1, last + 1))
        else:
            for i in range(1, len(places)):  # apart, later ones moving later ...
                places[i] = max(places[i], places[i - 1] + 1)
            for i in reversed(range(len(places))):  # ... and back below the end
                places[i] = min(places[i], last - (len(places) - 1 - i))
            milestones = places
        return self.override({"schedule.epochs": epochs, "schedule.milestones": milestones})

    def override(self, changes: Mapping[str, Any], *, source: str = "override") -> Recipe:
        """A new recipe with each dotted path set to its value, checked like a loaded recipe."""
        raw = self.to_dict()
        for path, value in changes.items():
            _set_path(raw, path, value, source=source)
        return Recipe.from_dict(raw, source=source)


def describe(err: ValidationError, model: type[BaseModel]) -> str:
    """One line naming each bad key, as the user wrote it, and what is allowed there."""
    lines: list[str] = []
    alternatives: dict[str, tuple[int, list[str], Any]] = {}  # a union's members, tried in turn
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(_user_keys(model, loc)[0]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(model, loc[:-1]))
            lines.append(f"{key}: unknown key; allowed here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif e["type"] in ("union_tag_not_found", "union_tag_invalid"):
            lines.append(_tag_problem(e, model, loc, key))
        elif e["type"] == "value_error":
            message = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{key}: {message}" if loc else message)  # a check across keys names them
        elif e["type"] in ("model_type", "dict_type"):
            fields = ", ".join(_fields_at(model, loc))
            of = f" of {fields}" if fields else ""
            lines.append(f"{key}: should be a mapping{of} (got {_short(e.get('input'))})")
        elif key in alternatives:
            alternative = str(e["msg"]).removeprefix("Input ")
            alternatives[key][1].append(alternative[:1].lower() + alternative[1:])
        else:
            alternatives[key] = (len(lines), [str(e["msg"])], e.get("input"))
            lines.append(key)
    for key, (at, messages, got) in alternatives.items():
        lines[at] = f"{key}: {', or '.join(messages)} (got {_short(got)})"
    return "; ".join(lines)


def _tag_problem(e: ErrorDetails, model: type[BaseModel], loc: tuple[str, ...], key: str) -> str:
    """A union told apart by one key (a search-space parameter's `type`) missing that key, or
    naming no member: the key and the values allowed there."""
    name = str(e["ctx"]["discriminator"]).strip("'")
    members = _union_members(_user_keys(model, loc)[1])
    allowed = ", ".join(str(v) for m in members for v in get_args(m.model_fields[name].annotation))
    if e["type"] == "union_tag_not_found":
        known = {k for m in members for k in m.model_fields}
        given = e["input"] if isinstance(e["input"], dict) else {}
        unknown = [str(k) for k in given if k not in known]  # `tpye: float`, say
        also = f"; unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}" if unknown else ""
        return f"{key}.{name}: required key is missing; allowed: {allowed}{also}"
    return f"{key}.{name}: got {_short(e['input'][name])}; allowed: {allowed}"


def not_a_mapping(raw: Any, what: str, keys: Iterable[str], *, source: str) -> RecipeError:
    """The error for a file that holds no mapping: what it holds, and the keys that go in one."""
    kinds = {str: "text", list: "a list", int: "a number", float: "a number", bool: "true or false"}
    held = kinds.get(type(raw), f"a {type(raw).__name__}")
    got = "it is empty" if raw is None else f"it holds {held} ({_short(raw)})"
    return RecipeError(f"{source}: {got}; {what} is a mapping of {', '.join(keys)}")


def placement_problem(arch: str, placement: list[int]) -> str | None:
    """Why HSAKD heads cannot go on `placement` of model `arch`, if they cannot."""
    stages = HEAD_STAGES[arch]
    bad = [p for p in placement if p > stages]
    if not bad:
        return None
    return f"{placement}: {arch} has no stage {bad[0]} to carry a head (its stages are 1-{stages})"


def empty_section(path: str, value: Any) -> str | None:
    """The path of an empty mapping in a --set value (which would set nothing), or None."""
    if not isinstance(value, dict):
        return None
    if not value:
        return path
    for key, inner in value.items():
        if found := empty_section(f"{path}.{key}", inner):
            return found
    return None


def leaf_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """`changes` with each mapping spread over the keys it names (`{"optim": {"lr": 0.1}}` ->
    `{"optim.lr": 0.1}`), so that a section given in part (a searched choice, a --set) keeps
    the rest of its keys as they were; `Recipe.override` sets a section whole, its other keys
    back to their defaults."""
    out: dict[str, Any] = {}
    for path, value in changes.items():
        if isinstance(value, Mapping):
            out.update(flatten(dict(value), f"{path}."))
        else:
            out[path] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _short(value: Any) -> str:
    text = yaml_text(value)
    return text if len(text) <= 60 else text[:57] + "..."


def yaml_text(value: Any) -> str:
    """A value read from YAML as YAML would write it in flow style: `true`, `null`, `[1, 2]`,
    `{kind: cosine}` (Python's repr would show True, None and quoted keys); text quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _fields_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The keys allowed in the section at `loc` (empty if `loc` does not name a section)."""
    section = _plain(_user_keys(model, loc)[1])
    return list(section.model_fields) if _is_section(section) else []


def _user_keys(model: type[BaseModel], loc: tuple[str, ...]) -> tuple[list[str], Any]:
    """The keys of a pydantic location as the user wrote them, and the type found there (None
    where unknown). Past a union pydantic adds the member it tried (`float` for a search-space
    parameter of `type: float`, `constrained-float`), a key the user never wrote: it is left out."""
    keys: list[str] = []
    current: Any = model
    for part in loc:
        members = _union_members(current)
        if members:
            current = next((m for m in members if part in _member_tags(m)), None)
            continue
        keys.append(part)
        current = _child(current, part)
    return keys, current


def _plain(tp: Any) -> Any:
    """`tp` without `Annotated` and without `| None` (pydantic adds no location for either)."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif _is_union(tp) and type(None) in get_args(tp) and len(get_args(tp)) == 2:
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp


def _union_members(tp: Any) -> list[Any]:
    """The members of a union other than None (empty if `tp` is no union of two or more)."""
    tp = _plain(tp)
    return [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else []


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, UnionType)


def _member_tags(member: Any) -> set[str]:
    """How pydantic names a section in a union: its tag (a Literal field's value) or class name."""
    if not _is_section(member):
        return set()
    tags = {member.__name__}
    for field in member.model_fields.values():
        if get_origin(field.annotation) is Literal:
            tags.update(str(v) for v in get_args(field.annotation))
    return tags


def _child(tp: Any, part: str) -> Any:
    """The type of key `part` inside `tp`: a section's field, a dict's value, a list's item."""
    tp = _plain(tp)
    if _is_section(tp):
        field = tp.model_fields.get(part)
        return field.annotation if field is not None else None
    if get_origin(tp) is dict:
        return get_args(tp)[1]
    if get_origin(tp) is list:
        return get_args(tp)[0]
    return None


def _is_section(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def check_path(path: str, *, source: str) -> list[str]:
    """The parts of a dotted recipe path; a part that names no key is an error listing the keys."""
    parts = path.split(".")
    for depth, part in enumerate(parts):
        allowed = _fields_at(Recipe, tuple(parts[:depth]))
        if part not in allowed:
            if not allowed:  # (the top level always has keys)
                where = ".".join(parts[:depth])
                raise RecipeError(f"{source}: {path}: {where} is a value, not a section")
            raise RecipeError(  # worded as a recipe file's unknown key is (`describe`)
                f"{source}: {'.'.join(parts[: depth + 1])}: unknown key; allowed here: "
                f"{', '.join(allowed)}"
            )
    return parts


def _set_path(raw: dict[str, Any], path: str, value: Any, *, source: str) -> None:
    *sections, leaf = check_path(path, source=source)
    node = raw
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


# `<<` (a merge) and `=` are no keys of their own: the loader turns them into keys later.
_SPECIAL_KEY_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads `5e-4` as a float (YAML 1.1 wants `5.0e-4`) and
    refuses a key given twice in one mapping (PyYAML keeps the last one without a word)."""

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        _refuse_repeated_keys(self, node)
        return node


def _refuse_repeated_keys(loader: _Loader, node: yaml.MappingNode) -> None:
    """Checked as the mapping is read, before a merge (`<<: *anchor`) adds keys that may repeat."""
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag in _SPECIAL_KEY_TAGS:
            continue  # a list or mapping key is refused by the loader itself
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice (also on line {first_line[key]}); keep one",
                key_node.start_mark,
            )
        first_line[key] = line


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes a string `_Loader` would read as a float (a folder
    named `1e5`), so that what is written reads back as it was."""


for _resolving in (_Loader, _Dumper):
    _resolving.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def load_yaml(text: str, *, source: str) -> Any:
    """Parse YAML with the safe loader; a syntax error names the file and line."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{source}:{where}: not valid YAML: {problem}") from None


def followed(path: str | Path) -> Path:
    """`path`, or where it is a link, the file it leads to: a file's relative paths are
    relative to the folder it is in (an export's recipe, linked from elsewhere, still names the
    teacher beside it)."""
    file = Path(path)
    return file.resolve() if file.is_symlink() else file


def read_text(path: str | Path) -> str:
    """Read a UTF-8 file; a missing file is a RecipeError, not a traceback."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such file") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise RecipeError(f"{p}: cannot read: {err}") from None
