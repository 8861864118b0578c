from __future__ import annotations

import json
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from kdsearch import teacher as teacher_module
from kdsearch.data import ImageData, load_data
from kdsearch.errors import KdsearchError, KdsearchWarning, NonFiniteLoss, TeacherError
from kdsearch.losses import LOSSES
from kdsearch.models import build_model
from kdsearch.recipe import DataConfig, Recipe
from kdsearch.teacher import (
    Teacher,
    cached_teacher_path,
    get_teacher,
    get_teacher_heads,
    load_checkpoint,
    teacher_key,
    teacher_recipe,
    weights_digest,
)

from .conftest import Recorder, tiny_recipe


@pytest.fixture(scope="module")
def synthetic() -> ImageData:
    return load_data(DataConfig(dataset="synthetic", val_fraction=0.2))


def test_teacher_is_trained_once_then_reused_from_the_cache(
    synthetic, isolated_cache: Path
) -> None:
    recipe = tiny_recipe()
    epochs: list[int] = []
    first = get_teacher(recipe, synthetic, lambda s: epochs.append(s.epoch))
    assert first.source == "trained" and epochs == [1, 2]
    assert first.path.is_file() and first.path.is_relative_to(isolated_cache)
    second = get_teacher(recipe, synthetic, lambda s: epochs.append(s.epoch))
    assert second.source == "cache" and epochs == [1, 2], "no epoch may run the second time"
    assert second.val_acc == first.val_acc
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert not second.model.training


def test_a_teacher_another_process_is_training_is_waited_for_and_loaded(
    synthetic: ImageData, isolated_cache: Path
) -> None:
    """Two searches with one teacher, started together on an empty cache, both trained it and
    each replaced the other's file, under a search that had recorded (and trained heads on)
    the teacher it replaced. (Two threads stand for the two processes: each lock is its own
    open file, so they exclude each other as processes do.)"""
    recipe = tiny_recipe()
    assert not isolated_cache.exists(), "an empty cache: no teachers/ folder for a lock yet"
    held, release = threading.Event(), threading.Event()

    def training(*args: object) -> None:  # the first, after its first epoch: holds on here
        held.set()
        assert release.wait(timeout=60)

    first: list[Teacher] = []
    second: list[Teacher] = []
    epochs: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: first.append(get_teacher(recipe, synthetic, training)), daemon=True
        ),
        threading.Thread(
            target=lambda: second.append(
                get_teacher(recipe, synthetic, lambda s: epochs.append(s.epoch))
            ),
            daemon=True,
        ),
    ]
    try:
        threads[0].start()
        assert held.wait(timeout=60)
        with pytest.warns(KdsearchWarning, match="another process is training this teacher"):
            threads[1].start()
            time.sleep(1.0)
        assert threads[1].is_alive() and not second, "it waits"
    finally:
        release.set()
    for t in threads:
        t.join(timeout=60)
    assert first[0].source == "trained"
    assert second[0].source == "cache" and epochs == [], "loaded, not trained a second time"
    assert weights_digest(second[0].path) == weights_digest(first[0].path)


def test_a_teacher_cache_that_cannot_be_written_is_refused_before_training(
    synthetic: ImageData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "file" / "cache"))
    epochs: list[int] = []
    with pytest.raises(KdsearchError, match=r"the teacher cache .*file is a file, not a folder"):
        get_teacher(tiny_recipe(), synthetic, lambda s: epochs.append(s.epoch))
    assert epochs == [], "no training thrown away"


def test_cache_key_covers_what_determines_the_teacher(synthetic: ImageData) -> None:
    base = tiny_recipe()
    key = teacher_key(base, synthetic)
    # the student side of the recipe does not change the teacher
    assert (
        teacher_key(
            base.override(
                {
                    "student.arch": "wrn_16_1",
                    "distill.kd.temperature": 2.0,
                    "seed": 5,
                    "device": "auto",
                    "compile": True,  # a machine's setting, which a resume may change
                }
            ),
            synthetic,
        )
        == key
    )
    for change in (
        {"teacher.train.epochs": 3},
        {"teacher.train.lr": 0.1},
        {"teacher.arch": "resnet14"},
        {"batch_size": 32},
        {"optim.weight_decay": 0.0},
    ):
        assert teacher_key(base.override(change), synthetic) != key, change
    other_data = load_data(DataConfig(dataset="synthetic", val_fraction=0.2, seed=1))
    assert teacher_key(base, other_data) != key


def test_a_term_setting_added_later_keeps_every_cached_teachers_key(synthetic: ImageData) -> None:
    # keys as kdsearch computed them before STKD's kl_weight existed (at f7ca3a1): a new
    # setting of a term, which cannot change a teacher, must not send every cached teacher
    # to be trained again
    assert teacher_key(tiny_recipe(), synthetic) == "5a999e90772ab1a8"
    digits = Recipe.load(Path(__file__).parents[1] / "search_spaces/recipes/digits.yaml")
    assert teacher_key(digits, synthetic) == "2bdd960a77b9703f"


def test_teacher_recipe_trains_with_cross_entropy_alone() -> None:
    recipe = teacher_recipe(tiny_recipe({"teacher.arch": "resnet14"}))
    assert recipe.student.arch == "resnet14"
    assert recipe.distill.ce.weight == 1.0 and recipe.distill.kd.weight == 0.0
    assert recipe.schedule.kind == "cosine" and recipe.schedule.epochs == 2


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "none": lambda model: model,
    "DataParallel": nn.DataParallel,  # (Distributed)DataParallel: "module." before every name
    "AveragedModel": torch.optim.swa_utils.AveragedModel,  # SWA, EMA: that and "n_averaged"
    "compile": torch.compile,  # "_orig_mod."
    "compile in DataParallel": lambda model: nn.DataParallel(torch.compile(model)),
    "AveragedModel compiled": lambda model: torch.compile(
        torch.optim.swa_utils.AveragedModel(model)
    ),
    "AveragedModel in DataParallel": lambda model: nn.DataParallel(
        torch.optim.swa_utils.AveragedModel(model)
    ),
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_checkpoint_is_loaded(synthetic: ImageData, tmp_path: Path, wrapper: str) -> None:
    """A checkpoint saved from a wrapped model loads as the model it wraps (a model saved from
    `AveragedModel` or `torch.compile` was refused as missing and unexpected weights)."""
    model = build_model("resnet8", synthetic.num_classes, synthetic.channels)
    state = WRAPPERS[wrapper](model).state_dict()
    torch.save({"model": state, "epoch": 240}, tmp_path / "t.pth")
    recipe = tiny_recipe({"teacher.checkpoint": str(tmp_path / "t.pth")})
    teacher = get_teacher(recipe, synthetic)
    assert teacher.source == "checkpoint"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(teacher.model.state_dict()[name], value)
    assert not cached_teacher_path(recipe, synthetic).exists(), "a checkpoint needs no training"


def cifar_resnet_names(blocks: int) -> list[str]:
    """The names another code base gives a CIFAR ResNet's weights, in its order: that of the
    official RepDistiller code (a stem conv1 and bn1, layer1-3 of blocks with conv1, bn1, conv2,
    bn2 and a downsample where the shape changes, fc)."""

    def bn(name: str) -> list[str]:
        return [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")] + [
            f"{name}.num_batches_tracked"
        ]

    names = ["conv1.weight", *bn("bn1")]
    for stage in (1, 2, 3):
        for b in range(blocks):
            block = f"layer{stage}.{b}"
            names += [f"{block}.conv1.weight", *bn(f"{block}.bn1")]
            names += [f"{block}.conv2.weight", *bn(f"{block}.bn2")]
            if stage > 1 and b == 0:
                names += [f"{block}.downsample.0.weight", *bn(f"{block}.downsample.1")]
    return [*names, "fc.weight", "fc.bias"]


def test_checkpoint_named_otherwise_in_the_same_order_loads_by_position(
    synthetic: ImageData, tmp_path: Path
) -> None:
    """A teacher from another code base (RepDistiller's and HSAKD's CIFAR-100 teachers) names
    the same layers otherwise, and was refused as missing and unexpected weights. Where every
    tensor has the shape and kind of kdsearch's in its place, it loads by position, saying so;
    where one does not, it is refused as before."""
    model = build_model("resnet8", synthetic.num_classes, synthetic.channels)
    with torch.no_grad():  # every tensor its own values, so that no two could be swapped unseen
        for value in model.state_dict().values():
            value.copy_(torch.rand_like(value.float()).to(value.dtype) + 0.5)
    values = list(model.state_dict().values())
    names = cifar_resnet_names(blocks=1)
    torch.save({"model": dict(zip(names, values, strict=True))}, tmp_path / "t.pth")
    recipe = tiny_recipe({"teacher.checkpoint": str(tmp_path / "t.pth")})
    with pytest.warns(KdsearchWarning) as warned:
        teacher = get_teacher(recipe, synthetic)
    assert str(warned[0].message).startswith(
        f"teacher.checkpoint: {tmp_path}/t.pth names its weights otherwise than kdsearch's "
        "resnet8 (its conv1.weight is kdsearch's stem.0.0.weight); loaded by their order, as "
        "each of its 56 tensors has the shape and kind"
    )
    x = synthetic.val.x[:8].float() / 255
    model.eval()
    torch.testing.assert_close(teacher.model(x), model(x), rtol=1e-4, atol=1e-4)
    # as an HSAKD teacher is saved: under "net", the backbone beside auxiliary classifiers
    hsakd = {f"backbone.{name}": value for name, value in zip(names, values, strict=True)}
    hsakd |= {"auxiliary_classifier.fc1.weight": torch.zeros(40, 64)}
    torch.save({"net": hsakd, "acc": 70.0}, tmp_path / "hsakd.pth.tar")
    with pytest.warns(KdsearchWarning) as warned:
        loaded = load_checkpoint(tmp_path / "hsakd.pth.tar", "resnet8", synthetic)
    assert str(warned[0].message).endswith(
        "(its backbone.conv1.weight is kdsearch's stem.0.0.weight); loaded by their order, as "
        "each of its 56 backbone tensors has the shape and kind of kdsearch's in that place (the "
        "teacher's validation accuracy, printed when it is ready, tells whether its layers are in "
        "kdsearch's order)"
    )
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=1e-4, atol=1e-4)
    backbone = {k: v for k, v in hsakd.items() if k.startswith("backbone.")}
    torch.save({"net": backbone}, tmp_path / "backbone.pth.tar")  # without its classifiers
    with pytest.warns(KdsearchWarning) as warned:
        load_checkpoint(tmp_path / "backbone.pth.tar", "resnet8", synthetic)
    assert "auxiliary" not in str(warned[0].message)
    # a model of its own whose layers are "backbone." and "head.", not an HSAKD teacher's: whole
    own = [f"backbone.{name}" for name in names[:-2]] + ["head.weight", "head.bias"]
    torch.save(dict(zip(own, values, strict=True)), tmp_path / "own.pt")
    with pytest.warns(KdsearchWarning, match="its backbone.conv1.weight is kdsearch's stem"):
        load_checkpoint(tmp_path / "own.pt", "resnet8", synthetic)
    # a weight and a bias of one shape swapped: the kinds differ, so nothing is loaded
    i = names.index("bn1.weight")
    swapped = [*names[:i], names[i + 1], names[i], *names[i + 2 :]]
    torch.save(dict(zip(swapped, values, strict=True)), tmp_path / "swapped.pth")
    with pytest.raises(TeacherError, match=r"54 weights missing \(first: stem.0.0.weight\)"):
        load_checkpoint(tmp_path / "swapped.pth", "resnet8", synthetic)
    # no tensors at all, where the file's batch norms would have their counts: said so
    torch.save({"model": None}, tmp_path / "none.pt")
    with pytest.raises(TeacherError) as nothing:
        load_checkpoint(tmp_path / "none.pt", "resnet8", synthetic)
    assert str(nothing.value).endswith(
        "1 unexpected weight (first: model); by position, it holds 1 entry where kdsearch's "
        "model holds 47 tensors besides batch norm's num_batches_tracked, which the file lacks"
    )
    # one tensor more, past those that fit: refused
    torch.save({**dict(zip(names, values, strict=True)), "aux.weight": values[-1]}, tmp_path / "a")
    with pytest.raises(TeacherError, match="does not fit resnet8 with 10 classes"):
        load_checkpoint(tmp_path / "a", "resnet8", synthetic)
    # another architecture or class count, named as that code base names it: refused, saying
    # why it does not fit by position either
    for arch, classes, blocks, classifier, why in (
        (
            "resnet14",
            10,
            2,
            "fc",
            "; by position, it holds 92 entries where kdsearch's model holds 56 tensors",
        ),
        (
            "resnet8",
            100,
            1,
            "fc",
            "; fc.weight is (100, 64), expected (10, 64); fc.bias is (100,), expected (10,)",
        ),  # as by name: said once
        (
            "resnet8",
            100,
            1,
            "linear",
            "; by position, its linear.weight is (100, 64) where kdsearch's fc.weight is (10, 64)",
        ),
    ):
        other = build_model(arch, classes, synthetic.channels).state_dict().values()
        named = [n.replace("fc.", f"{classifier}.") for n in cifar_resnet_names(blocks)]
        torch.save(dict(zip(named, other, strict=True)), tmp_path / "o.pt")
        with pytest.raises(TeacherError) as refused:
            load_checkpoint(tmp_path / "o.pt", "resnet8", synthetic)
        assert re.search(r"\(first: conv1.weight\)(.*)$", str(refused.value))[1] == why
    # saved by a torch before 0.4.1: no batch norm counts; named otherwise or as kdsearch does
    for file_names in (names, list(model.state_dict())):
        old = {n: v for n, v in zip(file_names, values, strict=True) if "num_batches" not in n}
        torch.save(old, tmp_path / "old.pt")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loaded = load_checkpoint(tmp_path / "old.pt", "resnet8", synthetic).eval()
        assert len(seen) == (file_names is names)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_checkpoint_with_a_value_that_is_not_a_tensor_is_refused(
    synthetic: ImageData, tmp_path: Path
) -> None:
    """A number where a weight should be got past the check and failed in torch's loading."""
    state: dict[str, object] = dict(build_model("resnet8", 10, 3).state_dict())
    state["stem.0.0.weight"] = 1.0
    torch.save(state, tmp_path / "t.pt")
    with pytest.raises(TeacherError, match=r"input channels: stem.0.0.weight is a float, not a"):
        load_checkpoint(tmp_path / "t.pt", "resnet8", synthetic)


def test_hsakds_mobilenetv2_is_refused_though_its_weights_fit(
    synthetic: ImageData, tmp_path: Path
) -> None:
    """HSAKD's MobileNetV2 has the shapes of kdsearch's (and RepDistiller's) in the same order,
    but a first convolution of stride 1: loaded by position, it would compute another network.
    Its files are told by the classifier's name (RepDistiller's: classifier.0.weight)."""
    ours = build_model("mobilenetv2", synthetic.num_classes, synthetic.channels).state_dict()
    for classifier, loads in (("classifier.0", True), ("classifier", False)):
        names = [re.sub(r"^fc\.", f"{classifier}.", re.sub(r"^stem\.", "conv1.", n)) for n in ours]
        torch.save({"state_dict": dict(zip(names, ours.values(), strict=True))}, tmp_path / "m")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KdsearchWarning)
            if loads:
                load_checkpoint(tmp_path / "m", "mobilenetv2", synthetic)
                continue
            with pytest.raises(TeacherError) as refused:
                load_checkpoint(tmp_path / "m", "mobilenetv2", synthetic)
        assert str(refused.value) == (
            f"teacher.checkpoint: {tmp_path}/m holds HSAKD's MobileNetV2, whose first "
            "convolution has stride 1 (kdsearch's, as RepDistiller's, 2): its weights have the "
            "shapes of kdsearch's mobilenetv2, but its network computes otherwise; kdsearch has "
            "no such model"
        )


@pytest.mark.parametrize(
    ("arch", "classes", "expected"),
    [
        ("resnet14", 10, "does not fit resnet8 with 10 classes.*unexpected weights"),
        ("resnet8", 100, r"fc.weight is \(100, 64\), expected \(10, 64\)"),
    ],
)
def test_checkpoint_of_another_architecture_or_class_count_is_refused(
    synthetic,
    tmp_path: Path,
    arch: str,
    classes: int,
    expected: str,
) -> None:
    torch.save(build_model(arch, classes, 3).state_dict(), tmp_path / "t.pt")
    recipe = tiny_recipe({"teacher.checkpoint": str(tmp_path / "t.pt")})
    with pytest.raises(TeacherError, match=expected):
        get_teacher(recipe, synthetic)


class Payload:
    """An arbitrary object: `weights_only=True` must refuse to unpickle it."""


def test_checkpoint_holding_code_objects_is_refused(synthetic: ImageData, tmp_path: Path) -> None:
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(TeacherError) as refused:
        get_teacher(tiny_recipe({"teacher.checkpoint": str(tmp_path / "evil.pt")}), synthetic)
    # what the file holds, and how to save weights alone; not torch's advice to load it with
    # weights_only=False, which would run its code
    assert "not a file of weights alone (Unsupported global: GLOBAL" in str(refused.value)
    assert "Payload was not an allowed global by default)" in str(refused.value)
    assert str(refused.value).endswith("torch.save(model.state_dict(), PATH)")
    assert "weights_only" not in str(refused.value)


@pytest.mark.parametrize("text", ["study: {name: s}\n", "", "\x00" * 100, "hi\n"])
def test_a_checkpoint_that_is_not_torch_weights_is_refused(
    synthetic: ImageData, tmp_path: Path, text: str
) -> None:
    (tmp_path / "notes.pt").write_text(text)
    refused = r"teacher\.checkpoint: .*notes\.pt: not a loadable weights file \([^;]*\)$"
    with pytest.raises(TeacherError, match=refused) as told:
        get_teacher(tiny_recipe({"teacher.checkpoint": str(tmp_path / "notes.pt")}), synthetic)
    # in words: "hi" stopped pickle's reader at a KeyError whose text is the byte, "(105)"
    assert re.search(r"\(.*[A-Za-z]{2}.*\)$", str(told.value)), str(told.value)


def test_why_a_file_is_not_torch_weights_is_said_in_words(
    synthetic: ImageData, tmp_path: Path
) -> None:
    """A text file was refused as "(174812789)", "(Unsupported operand 110)", "(105)"; a cut
    one with torch's several sentences on its zip reader."""
    torch.save(build_model("resnet8", 10, 3).state_dict(), tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    for content, why in (
        (b"hi\n", "not a torch.save file, or a damaged one: its reader stopped at KeyError 105"),
        (
            b"notes",
            "not a torch.save file, or a damaged one: its reader stopped at "
            "UnpicklingError Unsupported operand 110",
        ),
        (b"", "not a torch.save file, or a damaged one: its reader stopped at EOFError"),
        (  # /etc/passwd's first line: it was "(list index out of range)" alone
            b"root:x:0:0:root:/root:/bin/bash\n",
            "not a torch.save file, or a damaged one: its reader stopped at IndexError list "
            "index out of range",
        ),
        (  # read as pickle's GLOBAL op, naming no Python object: it advised saving a state_dict
            b"cifar text",
            "not a torch.save file, or a damaged one: its reader stopped at UnpicklingError "
            "GLOBAL ifar tex.",
        ),
        (
            bytes(4096),
            "in torch's legacy .tar format, which weights alone cannot be read from, or damaged",
        ),  # zeros, as a crash can leave a file: torch advised weights_only=False
        (
            whole[: len(whole) // 2],
            "PytorchStreamReader failed reading zip archive: failed finding central directory",
        ),
    ):
        (tmp_path / "t.pt").write_bytes(content)
        with pytest.raises(TeacherError) as refused:
            load_checkpoint(tmp_path / "t.pt", "resnet8", synthetic)
        assert str(refused.value) == (
            f"teacher.checkpoint: {tmp_path}/t.pt: not a loadable weights file ({why})"
        )


def hsakd_teacher_file(path: Path, model: nn.Module, heads: nn.ModuleDict, drop: int = 0) -> None:
    """`model` and HSAKD `heads` (stage -> classifier) saved as HSAKD's training script saves a
    teacher: under "net", the backbone under "backbone.", then the classifiers' feature layers
    (`block_extractorN`), then a WRN's batch norms after them (`bnN`: a batch norm in the head's
    trunk itself, after its blocks), then their linear layers (`fcN`), numbered from 1; the last `drop` classifiers left
    out."""
    net = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    kept = list(heads.values())[: len(heads) - drop]

    def part(head: nn.Module, name: str) -> tuple[str, str]:
        trunk = head.get_submodule("trunk")
        bns = [i for i, layer in enumerate(trunk.children()) if isinstance(layer, nn.BatchNorm2d)]
        if bns and name.startswith(bn := f"trunk.{bns[-1]}."):
            return "bn", name.removeprefix(bn)
        if name.startswith("trunk."):
            return "block_extractor", name.removeprefix("trunk.")
        return "fc", name.removeprefix("fc.")

    for official in ("block_extractor", "bn", "fc"):
        for number, head in enumerate(kept, 1):
            for name, value in head.state_dict().items():
                of, rest = part(head, name)
                if of == official:
                    net[f"auxiliary_classifier.{official}{number}.{rest}"] = value
    torch.save({"net": net, "acc": 71.0}, path)


def test_an_hsakd_teachers_auxiliary_classifiers_are_its_hsakd_heads(
    synthetic: ImageData, tmp_path: Path
) -> None:
    """They were dropped and kdsearch trained heads of its own on the frozen teacher, where
    HSAKD's method reads the classifiers trained with that teacher (100 epochs in its
    scripts). Where every one fits kdsearch's head on its stage they are those heads, and only
    SSKD's are trained; where they do not, kdsearch trains its own, saying why."""
    model = build_model("resnet8", synthetic.num_classes, synthetic.channels)
    heads = LOSSES["hsakd"].teacher_heads(model, synthetic.num_classes)
    assert isinstance(heads, nn.ModuleDict) and list(heads) == ["1", "2", "3"]
    with torch.no_grad():  # every tensor its own values, so that no two could be swapped unseen
        for value in heads.state_dict().values():
            value.copy_(torch.rand_like(value.float()).to(value.dtype) + 0.5)
    hsakd_teacher_file(tmp_path / "t.pth.tar", model, heads)
    recipe = tiny_recipe(
        {
            "teacher.checkpoint": str(tmp_path / "t.pth.tar"),
            "distill.hsakd.weight": 1.0,
            "teacher.heads.epochs": 1,
        }
    )
    parts: list[set[str]] = []
    reads: list[Path] = []
    state_in = teacher_module._state_in
    with pytest.MonkeyPatch.context() as patch, pytest.warns(KdsearchWarning) as warned:
        patch.setattr(teacher_module, "_state_in", lambda p, w: reads.append(p) or state_in(p, w))
        teacher = get_teacher(recipe, synthetic, heads_report=lambda s: parts.append(set(s.parts)))
    # once for the teacher, once for its classifiers (the heads' key and their loading share it)
    assert [p.name for p in reads] == ["t.pth.tar"] * 2
    assert [str(w.message) for w in warned] == [
        f"teacher.checkpoint: {tmp_path}/t.pth.tar: its 3 auxiliary classifiers are HSAKD's "
        "teacher heads (on stages 1, 2, 3, loaded by their order); kdsearch trains SSKD's heads "
        "alone"
    ]
    assert parts == [{"sskd"}], "SSKD's heads alone trained"
    for stage, head in heads.items():
        loaded = teacher.heads["hsakd"][stage].state_dict()  # type: ignore[index]
        for name, value in head.state_dict().items():
            assert torch.equal(loaded[name], value), (stage, name)
    assert teacher.heads_path is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: loaded as they are, nothing to say
        again = get_teacher(recipe, synthetic, heads_report=lambda s: parts.append(set(s.parts)))
    assert again.heads_path == teacher.heads_path and len(parts) == 1
    # heads an earlier kdsearch trained for that file, cached under the key without the
    # classifiers (as studies and promotions recorded them): used as they are, saying so
    teacher.heads_path.unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teacher_module, "_aux_classifiers", lambda path: [])
        earlier = get_teacher(recipe, synthetic, heads_report=lambda s: parts.append(set(s.parts)))
    assert earlier.heads_path != teacher.heads_path and parts[1:] == [{"hsakd", "sskd"}]
    with pytest.warns(KdsearchWarning) as warned:
        old = get_teacher(recipe, synthetic, heads_report=lambda s: parts.append(set(s.parts)))
    assert [str(w.message) for w in warned] == [
        f"teacher.checkpoint: {tmp_path}/t.pth.tar: using the teacher heads an earlier kdsearch "
        f"trained for it ({earlier.heads_path}), not its own auxiliary classifiers; to use "
        "those, move that file out of the cache (a study that learned from it names it with "
        "--set teacher.heads.checkpoint=FILE)"
    ]
    assert old.heads_path == earlier.heads_path and len(parts) == 2, "not trained again"
    # classifiers that do not fit kdsearch's heads: left out, saying why, and trained here
    hsakd_teacher_file(tmp_path / "two.pth.tar", model, heads, drop=1)
    wide = LOSSES["hsakd"].teacher_heads(model, 2 * synthetic.num_classes)
    assert isinstance(wide, nn.ModuleDict)
    hsakd_teacher_file(tmp_path / "wide.pth.tar", model, wide)
    net = torch.load(tmp_path / "t.pth.tar", weights_only=True)["net"]
    torch.save(
        {"net": {**net, "auxiliary_classifier.scale": torch.ones(())}}, tmp_path / "u.pth.tar"
    )
    short = {k: v for k, v in net.items() if k != "auxiliary_classifier.fc1.bias"}
    torch.save({"net": short}, tmp_path / "short.pth.tar")
    for name, why in (
        (
            "two",
            "it holds 2 auxiliary classifiers where kdsearch's resnet8 carries 3 heads (on "
            "stages 1, 2, 3)",
        ),
        (
            "wide",
            "its classifier 1 does not fit kdsearch's head on stage 1: its "
            "auxiliary_classifier.fc1.weight is (80, 64) where the head's fc.weight is (40, 64)",
        ),
        ("u", "its auxiliary_classifier.scale belongs to no numbered classifier"),
        (
            "short",
            "its classifier 1 does not fit kdsearch's head on stage 1: it holds "
            f"{len(heads['1'].state_dict()) - 1} entries where the head holds "
            f"{len(heads['1'].state_dict())} tensors",
        ),
    ):
        parts.clear()
        path = tmp_path / f"{name}.pth.tar"
        with pytest.warns(KdsearchWarning) as warned:
            get_teacher(
                recipe.override({"teacher.checkpoint": str(path)}),
                synthetic,
                heads_report=lambda s: parts.append(set(s.parts)),
            )
        assert [str(w.message) for w in warned] == [
            f"teacher.checkpoint: {path}: its auxiliary classifiers are left out, as {why}; "
            "kdsearch trains HSAKD's teacher heads itself"
        ]
        assert parts == [{"hsakd", "sskd"}]


def test_a_wrn_hsakd_teachers_batch_norms_after_its_classifiers_go_to_their_heads(
    synthetic: ImageData, tmp_path: Path
) -> None:
    """HSAKD's WRN classifiers keep their last batch norm apart (`bnN`), saved after every
    classifier's feature layers and before any linear layer: each goes back to its own head,
    between that head's feature layers and its linear layer."""
    model = build_model("wrn_16_2", synthetic.num_classes, synthetic.channels)
    heads = LOSSES["hsakd"].teacher_heads(model, synthetic.num_classes)
    assert isinstance(heads, nn.ModuleDict)
    with torch.no_grad():
        for value in heads.state_dict().values():
            value.copy_(torch.rand_like(value.float()).to(value.dtype) + 0.5)
    path = tmp_path / "wrn.pth.tar"
    hsakd_teacher_file(path, model, heads)
    names = list(torch.load(path, weights_only=True)["net"])
    firsts = [names.index(f"auxiliary_classifier.{p}1.weight") for p in ("bn", "fc")]
    assert names.index("auxiliary_classifier.block_extractor3.0.0.conv1.weight") < firsts[0]
    assert firsts[0] < firsts[1], "every bnN after the feature layers and before any fcN"
    recipe = tiny_recipe(
        {
            "teacher.arch": "wrn_16_2",
            "teacher.checkpoint": str(path),
            "distill.hsakd.weight": 1.0,
            "teacher.heads.epochs": 1,
        }
    )
    with pytest.warns(KdsearchWarning, match="its 3 auxiliary classifiers are HSAKD's"):
        teacher = get_teacher(recipe, synthetic)
    for stage, head in heads.items():
        loaded = teacher.heads["hsakd"][stage].state_dict()  # type: ignore[index]
        for name, value in head.state_dict().items():
            assert torch.equal(loaded[name], value), (stage, name)


@pytest.mark.parametrize(
    "damage", ["truncated weights", "truncated heads", "truncated weights, heads naming no teacher"]
)
def test_a_damaged_cache_entry_is_trained_again_and_replaced(
    synthetic: ImageData, damage: str
) -> None:
    """A teacher trained again deleted the heads cached beside it, though heads name the
    teacher they were trained on: a resume whose teacher file was cut short trained the same
    teacher again (on a CPU) and then refused the study, its heads gone."""
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    first = get_teacher(recipe, synthetic)
    heads = next(first.path.parent.glob(f"{first.path.stem}-heads-*.pt"))
    if "heads naming no teacher" in damage:  # as an earlier kdsearch cached them
        torch.save(torch.load(heads, weights_only=True)["state_dict"], heads)
    kept, digest = heads.read_bytes(), weights_digest(first.path)
    if damage.startswith("truncated weights"):
        first.path.write_bytes(first.path.read_bytes()[:100])
    else:
        heads.write_bytes(heads.read_bytes()[:100])
    heads_epochs: list[int] = []
    with pytest.warns(UserWarning, match=r"cannot use the cached .*; training it again"):
        again = get_teacher(recipe, synthetic, heads_report=lambda s: heads_epochs.append(s.epoch))
    assert again.source == ("cache" if damage == "truncated heads" else "trained")
    assert again.val_acc == first.val_acc, "the same recipe trains the same teacher"
    assert weights_digest(again.path) == digest
    if damage == "truncated weights":  # heads of that very teacher: used as they are
        assert heads_epochs == [] and heads.read_bytes() == kept
    else:
        assert heads_epochs == [1], "heads trained on the teacher as it is now"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache is whole again
        assert get_teacher(recipe, synthetic).source == "cache"


@pytest.mark.parametrize("meta", ["missing", "unreadable"])
def test_a_cached_teacher_copied_without_its_metadata_is_used_and_measured_again(
    synthetic: ImageData, meta: str
) -> None:
    """The README says to copy the teacher's file to a machine whose cache lacks it: the
    weights alone, which took the training, are enough; the metadata is written again."""
    recipe = tiny_recipe()
    first = get_teacher(recipe, synthetic)
    digest = weights_digest(first.path)
    beside = first.path.with_suffix(".json")
    if meta == "missing":
        beside.unlink()
    else:
        beside.write_text("{")
    epochs: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = get_teacher(recipe, synthetic, lambda s: epochs.append(s.epoch))
    assert again.source == "cache" and epochs == []
    assert again.val_acc == first.val_acc
    assert weights_digest(again.path) == digest
    assert json.loads(beside.read_text())["val_acc"] == first.val_acc


def test_a_teacher_is_not_trained_where_its_cache_has_no_room_for_it(
    synthetic: ImageData, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = 200_000  # bytes: resnet8's weights need about 0.3 MB
    monkeypatch.setattr(
        teacher_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 0, free)
    )
    epochs: list[int] = []
    with pytest.raises(TeacherError) as refused:
        get_teacher(tiny_recipe(), synthetic, lambda s: epochs.append(s.epoch))
    assert epochs == [], "refused before the training, not after"
    assert str(refused.value) == (
        f"the teacher cache {isolated_cache / 'teachers'} has 0.2 MB free, and the teacher needs "
        "1.3 MB there; make room, or set KDSEARCH_CACHE_DIR to a folder with room"
    )


def test_a_teacher_the_full_disk_cannot_take_is_one_line_naming_it(
    synthetic: ImageData, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_: object, **__: object) -> None:  # as torch.save reports ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 47936")

    monkeypatch.setattr(teacher_module.torch, "save", full)
    with pytest.raises(TeacherError) as refused:
        get_teacher(tiny_recipe(), synthetic)
    path = cached_teacher_path(tiny_recipe(), synthetic)
    assert str(refused.value) == (
        f"the teacher cache {path}: cannot write there (write failed); the trained teacher is "
        "lost; make room, or set KDSEARCH_CACHE_DIR to a folder with room"
    )
    assert [p.name for p in (isolated_cache / "teachers").iterdir() if p.suffix != ".lock"] == []


def test_heads_a_damaged_file_half_loaded_into_are_trained_from_their_first_state(
    synthetic: ImageData,
) -> None:
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    teacher = get_teacher(recipe, synthetic, heads=False)
    torch.manual_seed(1)
    clean = get_teacher_heads(recipe, synthetic, teacher)
    path = next(teacher.path.parent.glob(f"{teacher.path.stem}-heads-*.pt"))
    state = torch.load(path, weights_only=True)["state_dict"]
    first = next(iter(state))
    damaged = {k: torch.zeros_like(v) for k, v in state.items()}  # loads, but is no head
    damaged[first] = torch.zeros(1)  # a shape that refuses the whole file, after the rest
    torch.save(damaged, path)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="cannot use the cached"):
        again = get_teacher_heads(recipe, synthetic, teacher)
    for name in clean:
        for a, b in zip(
            clean[name].state_dict().values(), again[name].state_dict().values(), strict=True
        ):
            assert torch.equal(a, b)


def test_heads_checkpoint_is_loaded_as_it_is_never_trained(
    synthetic: ImageData, tmp_path: Path
) -> None:
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    trained = get_teacher(recipe, synthetic)
    assert trained.heads_path is not None and trained.heads_path.is_file()
    exported = recipe.override(
        {
            "teacher.checkpoint": str(trained.path),
            "teacher.heads.checkpoint": str(trained.heads_path),
        }
    )
    epochs: list[int] = []
    loaded = get_teacher(exported, synthetic, heads_report=lambda s: epochs.append(s.epoch))
    assert loaded.source == "checkpoint" and epochs == [], "no heads trained"
    assert loaded.heads_path == trained.heads_path
    for name in trained.heads:
        for a, b in zip(
            trained.heads[name].state_dict().values(),
            loaded.heads[name].state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b)
    # a file that is not these heads is an error, never a reason to train others in their place
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    for path, expected in [
        (tmp_path / "other.pt", r"does not hold the heads of this teacher and data .*missing"),
        (tmp_path / "none.pt", r"teacher.heads.checkpoint: .*none.pt: no such file"),
    ]:
        with pytest.raises(TeacherError, match=expected):
            get_teacher(exported.override({"teacher.heads.checkpoint": str(path)}), synthetic)


def test_heads_trained_on_another_teacher_of_the_same_architecture_are_refused(
    synthetic: ImageData, tmp_path: Path
) -> None:
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    mine = get_teacher(recipe, synthetic)
    other = get_teacher(recipe.override({"teacher.train.seed": 7}), synthetic)
    assert other.heads_path is not None and weights_digest(other.path) != weights_digest(mine.path)
    mixed = recipe.override(
        {"teacher.checkpoint": str(mine.path), "teacher.heads.checkpoint": str(other.heads_path)}
    )
    with pytest.raises(TeacherError, match=r"holds heads trained on another teacher"):
        get_teacher(mixed, synthetic)
    # heads saved elsewhere as a bare state dict name no teacher: only their shapes are checked
    bare = torch.load(other.heads_path, weights_only=True)["state_dict"]
    torch.save(bare, tmp_path / "bare.pt")
    loaded = get_teacher(
        mixed.override({"teacher.heads.checkpoint": str(tmp_path / "bare.pt")}), synthetic
    )
    assert loaded.heads_path == tmp_path / "bare.pt"


def test_cached_heads_of_a_teacher_replaced_since_are_trained_again(synthetic: ImageData) -> None:
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    mine = get_teacher(recipe, synthetic)
    other = get_teacher(recipe.override({"teacher.train.seed": 7}), synthetic, heads=False)
    mine.path.write_bytes(other.path.read_bytes())  # another machine's teacher copied in
    heads_epochs: list[int] = []
    with pytest.warns(UserWarning, match=r"cannot use the cached .*trained on another teacher"):
        again = get_teacher(recipe, synthetic, heads_report=lambda s: heads_epochs.append(s.epoch))
    assert again.source == "cache" and heads_epochs == [1], "heads trained for this teacher"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and cached for it
        assert get_teacher(recipe, synthetic).heads_path == again.heads_path


def test_weights_digest_names_the_weights_not_the_file(tmp_path: Path) -> None:
    state = build_model("resnet8", 10, 1).state_dict()
    torch.save(state, tmp_path / "a.pt")  # torch.save writes the file name into the archive
    torch.save({"state_dict": state, "epoch": 240}, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "b.pt").read_bytes()
    assert weights_digest(tmp_path / "a.pt") == weights_digest(tmp_path / "b.pt")
    changed = dict(state)
    changed["fc.bias"] = changed["fc.bias"] + 1e-6
    torch.save(changed, tmp_path / "c.pt")
    assert weights_digest(tmp_path / "c.pt") != weights_digest(tmp_path / "a.pt")


def test_missing_checkpoint_is_a_clear_error(synthetic: ImageData, tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="no such file"):
        get_teacher(tiny_recipe({"teacher.checkpoint": str(tmp_path / "none.pt")}), synthetic)


def test_teacher_heads_are_trained_once_cached_beside_the_teacher_and_reused(
    synthetic: ImageData,
) -> None:
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 2})
    epochs: list[int] = []
    first = get_teacher(recipe, synthetic, heads_report=lambda s: epochs.append(s.epoch))
    assert set(first.heads) == {"hsakd", "sskd"} and epochs == [1, 2]
    cached = list(first.path.parent.glob(f"{first.path.stem}-heads-*.pt"))
    assert len(cached) == 1
    # a head on every stage that can carry one, whatever placement this recipe asks for
    assert sorted(first.heads["hsakd"].keys()) == ["1", "2", "3"]  # type: ignore[operator]
    second = get_teacher(
        recipe.override({"distill.hsakd.placement": [2]}),
        synthetic,
        heads_report=lambda s: epochs.append(s.epoch),
    )
    assert epochs == [1, 2], "the heads must come from the cache"
    for a, b in zip(
        first.heads["hsakd"].state_dict().values(),
        second.heads["hsakd"].state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for h in second.heads.values() for p in h.parameters())


def test_heads_of_one_key_start_alike_whatever_ran_before(
    synthetic: ImageData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their first weights came from the global random state of the moment: a search on a cold
    cache and a promotion on another machine trained different heads under one key."""
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    teacher = get_teacher(recipe, synthetic)
    trained = []
    for seed in (1, 2):
        monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / f"cache{seed}"))
        torch.manual_seed(seed)
        trained.append(get_teacher_heads(recipe, synthetic, teacher)["hsakd"].state_dict())
    for a, b in zip(trained[0].values(), trained[1].values(), strict=True):
        assert torch.equal(a, b)


def test_training_the_heads_reports_every_batch_and_epoch(synthetic: ImageData) -> None:
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 2})
    recorder = Recorder()
    get_teacher(recipe, synthetic, heads_report=recorder)
    per_epoch = len(synthetic.train) // recipe.batch_size  # full batches only
    assert recorder.epochs == [1, 2]
    assert recorder.ticks == [(k, per_epoch) for k in range(1, per_epoch + 1)] * 2


def test_the_heads_validation_accuracy_counts_every_image_once(synthetic: ImageData) -> None:
    """The heads' validation accuracy (the mean of HSAKD's and SSKD's) was the mean of the
    batches' accuracies, so the images of the short last batch counted more than the others."""
    from kdsearch.data import Loader
    from kdsearch.losses import LOSSES
    from kdsearch.losses.base import frozen_taps, rotate
    from kdsearch.models import fold_batch_norm

    changes = {"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1, "batch_size": 48}
    recipe = tiny_recipe({**changes, "precision": "fp32"})  # as computed below
    sizes = [48, 48, 48, len(synthetic.val) - 144]
    assert 0 < sizes[-1] < 48, "the last validation batch is short"
    seen: list[float] = []
    teacher = get_teacher(recipe, synthetic, heads_report=lambda s: seen.append(s.val_acc))
    model = fold_batch_norm(teacher.model)
    loader = Loader(synthetic.val, synthetic, torch.device("cpu"), batch_size=48, train=False)
    correct = 0.0
    with torch.no_grad():
        for batch, size in zip(loader.epoch(0), sizes, strict=True):
            taps = frozen_taps(model.taps, rotate(batch.x))
            for name, heads in teacher.heads.items():  # SSKD's task is within the batch
                _, acc = LOSSES[name].teacher_head_objective(heads.eval(), taps, batch.y)
                correct += float(acc) * size / len(teacher.heads)
    assert seen[-1] == pytest.approx(correct / len(synthetic.val), abs=1e-6)


def test_heads_are_only_prepared_when_an_active_term_reads_them(synthetic: ImageData) -> None:
    assert get_teacher(tiny_recipe(), synthetic).heads == {}
    assert set(
        get_teacher(
            tiny_recipe({"distill.sskd.weight": 1.0, "teacher.heads.epochs": 1}), synthetic
        ).heads
    ) == {"hsakd", "sskd"}


def test_training_the_heads_improves_their_task(synthetic: ImageData) -> None:
    seen: list[float] = []
    recipe = tiny_recipe({"teacher.train.epochs": 4, "teacher.heads.epochs": 4})
    get_teacher(recipe, synthetic, heads=True, heads_report=lambda s: seen.append(s.train_loss))
    assert seen[-1] < seen[0]


def test_a_student_trained_with_heads_leaves_them_untouched(synthetic: ImageData) -> None:
    from kdsearch.train import train

    recipe = tiny_recipe(
        {
            "distill.hsakd.weight": 1.0,
            "distill.sskd.weight": 1.0,
            "teacher.heads.epochs": 1,
            "schedule.epochs": 1,
        }
    )
    teacher = get_teacher(recipe, synthetic)
    before = {
        n: {k: v.clone() for k, v in h.state_dict().items()} for n, h in teacher.heads.items()
    }
    result = train(recipe, synthetic, teacher=teacher.model, teacher_heads=teacher.heads)
    for n, h in teacher.heads.items():
        for k, v in h.state_dict().items():
            assert torch.equal(v, before[n][k]), f"{n}.{k} changed"
    bare = build_model("resnet8", synthetic.num_classes, synthetic.channels)
    bare.load_state_dict(result.student.state_dict())  # strict: no head in the student's state


def test_a_diverging_teacher_or_heads_training_names_its_own_setting(
    synthetic: ImageData, isolated_cache: Path
) -> None:
    """Both said "lower optim.lr or the distillation weights", settings neither training uses:
    a user following the advice trained the teacher again to the same NaN."""
    with pytest.raises(NonFiniteLoss) as info:
        get_teacher(tiny_recipe({"teacher.train.lr": 1.0e12}), synthetic)
    said = str(info.value)
    assert said.startswith("training the teacher: the training loss became nan in epoch 1")
    assert said.endswith("; lower teacher.train.lr") and "optim.lr or" not in said
    assert not list(isolated_cache.rglob("*.pt")), "nothing cached of a teacher that diverged"
    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.lr": 1.0e12})
    with pytest.raises(NonFiniteLoss) as info:
        get_teacher(recipe, synthetic)
    said = str(info.value)
    assert said.startswith("training the teacher's heads: the training loss became nan")
    assert said.endswith("; lower teacher.heads.lr")
    assert not list(isolated_cache.rglob("*-heads-*.pt")), "nor of heads that diverged"


def test_the_heads_speed_counts_the_images_an_epoch_trains(synthetic: ImageData) -> None:
    """A training split smaller than the batch is one short batch an epoch; the heads' speed
    counted a whole batch of images for it."""
    recipe = tiny_recipe(
        {"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1, "batch_size": 1024}
    )
    seen: list[float] = []
    get_teacher(recipe, synthetic, heads_report=lambda s: seen.append(s.images_per_sec * s.seconds))
    assert seen == [pytest.approx(len(synthetic.train))]
