"""One suite over every term: what each must do whatever its math."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence

import pytest
import torch

from kdsearch.data import ImageData
from kdsearch.errors import RecipeError
from kdsearch.losses import LOSSES
from kdsearch.losses.base import Step
from kdsearch.models import TapModel, Taps
from kdsearch.recipe import DistillConfig

from .conftest import build, first_batch, recipe_with, snapshot, step_for

DISTILLATION_TERMS = sorted(set(LOSSES) - {"ce"})
FAMILIES = [
    "resnet8",
    "resnet50",
    "wrn_16_1",
    "vgg8",
    "mobilenetv2",
    "shufflenetv1",
    "shufflenetv2",
]
SMALL_CONTRAST = {"negatives": 64}  # the defaults' 16384 would only slow the tests


def _on(name: str) -> dict[str, dict[str, object]]:
    settings: dict[str, object] = {"weight": 1.0}
    if name in ("crd", "cktf"):
        settings.update(SMALL_CONTRAST)
    return {name: settings}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_term_signature_is_the_recipe_schema(name: str) -> None:
    """Keyword-only constructor arguments and their defaults are exactly the recipe's fields."""
    params = inspect.signature(LOSSES[name].__init__).parameters.values()
    kwonly = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    kwonly = {
        k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in kwonly.items()
    }
    section = DistillConfig.model_fields[name].annotation
    assert section is not None
    fields = {k: f.default for k, f in section.model_fields.items() if k != "weight"}
    assert kwonly == fields


def test_every_recipe_term_has_a_loss() -> None:
    assert set(DistillConfig.model_fields) == set(LOSSES)


# Each setting as the method's paper and official code give it (see the reference's method notes);
# STKD's are left out: only its abstract was read, so its defaults are a reading, not the paper's.
PAPERS = {
    "kd": {"temperature": 4.0},
    "crd": {"feat_dim": 128, "temperature": 0.07, "negatives": 16384, "momentum": 0.5},
    "cktf": {
        "final": 0.8,
        "intermediate": 0.1,
        "feat_dim": 128,
        "temperature": 0.1,
        "negatives": 16384,
        "momentum": 0.5,
    },
    "sskd": {
        "tf_weight": 2.7,
        "ss_weight": 10.0,
        "tf_temperature": 4.0,
        "ss_temperature": 0.5,
        "tf_keep": 1.0,
        "ss_keep": 0.75,
    },
    "hsakd": {"temperature": 3.0, "placement": [1, 2, 3]},
}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_a_terms_defaults_are_its_papers(name: str) -> None:
    section = DistillConfig.model_fields[name].annotation
    assert section is not None
    defaults = {k: f.default for k, f in section.model_fields.items() if k != "weight"}
    assert defaults == PAPERS[name]


@pytest.mark.parametrize("name", DISTILLATION_TERMS)
def test_term_gives_a_finite_scalar_and_gradients_reach_student_and_own_heads_only(
    name: str, tiny_data: ImageData
) -> None:
    distiller, ctx = build(recipe_with(_on(name)), tiny_data)
    assert ctx.teacher is not None
    teacher_before = snapshot(ctx.teacher)
    heads_before = {n: snapshot(h) for n, h in ctx.teacher_heads.items()}
    # as if a caller forgot to freeze them: the terms themselves keep autograd off the teacher
    ctx.teacher.requires_grad_(True)
    for heads in ctx.teacher_heads.values():
        heads.requires_grad_(True)
    step = step_for(distiller, ctx, first_batch(tiny_data))
    _total, parts = distiller.loss(step)
    value = parts[name]
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    student_grads = [p.grad for p in ctx.student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    own = [(n, p) for n, p in distiller.terms[name].named_parameters()]
    missing = [n for n, p in own if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"
    assert all(p.grad is None for p in ctx.teacher.parameters())
    for n, heads in ctx.teacher_heads.items():
        assert all(p.grad is None for p in heads.parameters())
        for k, v in heads.state_dict().items():
            assert torch.equal(v, heads_before[n][k])
    for k, v in ctx.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"the teacher's {k} changed"


def _count_taps(model: TapModel, seen: list[int]) -> None:
    """Record the batch size of every `taps` call of `model`."""
    original = model.taps

    def counted(x: torch.Tensor) -> Taps:
        seen.append(x.shape[0])
        return original(x)

    model.taps = counted  # type: ignore[method-assign]


def test_zero_weight_terms_are_not_built_and_the_teacher_is_not_run(tiny_data: ImageData) -> None:
    distiller, ctx = build(recipe_with({"ce": {"weight": 1.0}}), tiny_data)
    assert ctx.teacher is not None
    assert list(distiller.terms) == ["ce"] and not distiller.rotations
    student_params = sum(p.numel() for p in ctx.student.parameters())
    assert sum(p.numel() for p in distiller.parameters()) == student_params
    seen: dict[str, list[int]] = {"student": [], "teacher": []}
    _count_taps(ctx.student, seen["student"])
    _count_taps(ctx.teacher, seen["teacher"])
    distiller.loss(step_for(distiller, ctx, first_batch(tiny_data)))
    assert seen == {"student": [8], "teacher": []}


def test_views_are_computed_once_per_step_and_shared(tiny_data: ImageData) -> None:
    terms = {
        **_on("hsakd"),
        **_on("sskd"),
        **_on("crd"),
        **_on("stkd"),
        "kd": {"weight": 1.0},
        "ce": {"weight": 1.0},
    }
    distiller, ctx = build(recipe_with(terms), tiny_data)
    assert ctx.teacher is not None
    seen: dict[str, list[int]] = {"student": [], "teacher": []}
    _count_taps(ctx.student, seen["student"])
    _count_taps(ctx.teacher, seen["teacher"])
    distiller.loss(step_for(distiller, ctx, first_batch(tiny_data)))
    # one pass over the 4B rotated batch (shared by ce, kd, crd, sskd, hsakd), one over the mixed
    assert sorted(seen["student"]) == [8, 32]
    assert sorted(seen["teacher"]) == [8, 32]


@pytest.mark.parametrize(
    ("student", "teacher"), [(s, "resnet14") for s in FAMILIES] + [("resnet8", t) for t in FAMILIES]
)
def test_every_term_at_once_trains_on_every_family(
    student: str, teacher: str, tiny_data: ImageData
) -> None:
    terms = {n: _on(n)[n] for n in DISTILLATION_TERMS}
    distiller, ctx = build(recipe_with(terms, student=student, teacher=teacher), tiny_data)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01)
    for seed in range(2):
        total, parts = distiller.loss(step_for(distiller, ctx, first_batch(tiny_data), seed))
        assert set(parts) == set(terms) and torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()


SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations([1, 2, 3], r)]


@pytest.mark.parametrize("placement", SUBSETS)
def test_hsakd_places_heads_exactly_on_the_chosen_stages(
    placement: list[int], tiny_data: ImageData
) -> None:
    distiller, ctx = build(
        recipe_with({"hsakd": {"weight": 1.0, "placement": placement}}), tiny_data
    )
    term = distiller.terms["hsakd"]
    assert sorted(int(k) for k in term.heads) == sorted(placement)  # type: ignore[union-attr]
    _, parts = distiller.loss(step_for(distiller, ctx, first_batch(tiny_data)))
    parts["hsakd"].backward()
    for key, head in term.heads.items():  # type: ignore[union-attr]
        assert all(p.grad is not None for p in head.parameters()), key


def test_hsakd_placement_on_a_stage_the_student_lacks_is_refused(tiny_data: ImageData) -> None:
    with pytest.raises(RecipeError, match=r"placement \[1, 4\]: resnet8 has no stage 4"):
        recipe_with({"hsakd": {"weight": 1.0, "placement": [1, 4]}})  # by the recipe
    _, ctx = build(recipe_with({"hsakd": {"weight": 1.0}}), tiny_data)
    with pytest.raises(ValueError, match=r"placement \[1, 4\]: the student has no stage 4"):
        LOSSES["hsakd"](ctx, placement=[1, 4])  # and by the term built on its own
    # mobilenetv2 has four stages that can carry a head
    distiller, _ = build(
        recipe_with({"hsakd": {"weight": 1.0, "placement": [4]}}, student="mobilenetv2"), tiny_data
    )
    assert list(distiller.terms["hsakd"].heads) == ["4"]  # type: ignore[union-attr]


def test_terms_read_the_teacher_heads_they_need(tiny_data: ImageData) -> None:
    from kdsearch.distill import Distiller

    _, ctx = build(recipe_with({"ce": {"weight": 1.0}}), tiny_data)
    bare = type(ctx)(ctx.student, ctx.teacher, ctx.num_classes, ctx.train_labels, ctx.image_shape)
    with pytest.raises(RecipeError, match=r"distill\.sskd needs the teacher's sskd heads"):
        Distiller.build(recipe_with(_on("sskd")), bare)


def test_ce_and_kd_read_the_unrotated_quarter_when_rotations_are_on(tiny_data: ImageData) -> None:
    # in eval mode (batch norm as a fixed map) the rotated stack's first quarter is the batch itself
    plain, ctx = build(recipe_with({"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}), tiny_data)
    rotated, _ = build(
        recipe_with({**_on("hsakd"), "ce": {"weight": 1.0}, "kd": {"weight": 1.0}}), tiny_data
    )
    assert rotated.rotations and not plain.rotations
    ctx.student.eval()
    batch = first_batch(tiny_data)
    teacher = ctx.teacher.taps if ctx.teacher is not None else None
    on = Step(batch, ctx.student.taps, teacher, rotations=True)
    off = Step(batch, ctx.student.taps, teacher, rotations=False)
    torch.testing.assert_close(on.s.logits, off.s.logits)
    torch.testing.assert_close(on.t.logits, off.t.logits)
    quarter = ctx.student.taps(torch.rot90(batch.x, 1, dims=(2, 3))).logits
    torch.testing.assert_close(on.s_rot.logits[len(batch.y) : 2 * len(batch.y)], quarter)
    for name in ("ce", "kd"):
        torch.testing.assert_close(rotated.terms[name](on), plain.terms[name](off))
