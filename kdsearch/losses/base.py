"""The interface every distillation term implements, and what a term sees of a training step."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from kdsearch.data import Batch, from_host
from kdsearch.models import TapModel, Taps

ROTATIONS = 4  # 0, 90, 180 and 270 degrees
T = TypeVar("T")
TapsFn = Callable[[Tensor], Taps]
"""A model's `taps` (or its compiled twin): images in, Taps out."""


@dataclass(frozen=True)
class BuildContext:
    """What a term may need to size its own heads and state when it is built."""

    student: TapModel
    teacher: TapModel | None
    num_classes: int
    train_labels: Tensor  # labels of the training split, on the training device
    image_shape: tuple[int, int, int]  # (channels, height, width)
    teacher_heads: Mapping[str, nn.Module] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])


class Mixed(NamedTuple):
    """A batch of mixed images: `lam` of each image `y_a` and `1 - lam` of its partner `y_b`."""

    x: Tensor
    y_a: Tensor
    y_b: Tensor
    lam: float


class Step:
    """One training batch as the terms see it.

    `student` and `teacher` are the models' taps functions. Forward passes are computed on first
    use and shared by every term: a step whose active terms
    never read the teacher never runs it. When any active term works on rotations, the student
    and teacher run once on the 4B rotated batch (unrotated first, then 90, 180, 270 degrees) and
    `s` and `t` are its first B rows, as HSAKD and SSKD train. Random draws (mixing) come from
    `seed`, which the training loop derives from (recipe seed, epoch, batch).

    `stored` holds the teacher's outputs for this batch read from the teacher-output store (see
    `kdsearch.store`): `logits` and `pooled`, or `rot_logits`, `rot_pooled` and the `rot_*`
    outputs of teacher heads; then `t` or `t_rot` come from it (without stage maps: only terms
    that do not read them are run against a store) and the teacher does not run.
    """

    def __init__(
        self,
        batch: Batch,
        student: TapsFn,
        teacher: TapsFn | None,
        *,
        rotations: bool = False,
        seed: int = 0,
        stored: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.batch = batch
        self.student = student
        self.teacher = teacher
        self.rotations = rotations
        self.seed = seed
        self.stored = stored or {}
        self._mixed: dict[tuple[str, float], tuple[Mixed, Taps]] = {}
        self._memo: dict[Hashable, Any] = {}

    @property
    def x(self) -> Tensor:
        return self.batch.x

    @property
    def y(self) -> Tensor:
        return self.batch.y

    @property
    def size(self) -> int:
        return int(self.batch.y.shape[0])

    @cached_property
    def s(self) -> Taps:
        """The student's taps on the batch."""
        if self.rotations:
            return slice_taps(self.s_rot, 0, self.size)
        return self.student(self.batch.x)

    @cached_property
    def t(self) -> Taps:
        """The teacher's taps on the batch (no gradient, ever)."""
        if self.rotations:
            return slice_taps(self.t_rot, 0, self.size)
        if "logits" in self.stored:
            return Taps(self.stored["logits"], (), self.stored["pooled"])
        return frozen_taps(self._teacher(), self.batch.x)

    @cached_property
    def x_rot(self) -> Tensor:
        """The batch and its rotations by 90, 180 and 270 degrees, stacked (4B images)."""
        return rotate(self.batch.x)

    @cached_property
    def s_rot(self) -> Taps:
        """The student's taps on the rotated batch."""
        return self.student(self.x_rot)

    @cached_property
    def t_rot(self) -> Taps:
        """The teacher's taps on the rotated batch."""
        if "rot_logits" in self.stored:
            return Taps(self.stored["rot_logits"], (), self.stored["rot_pooled"])
        return frozen_taps(self._teacher(), self.x_rot)

    def teacher_extra(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        """A teacher-side output beyond the taps (a teacher head's): from the store when it holds
        `name`, else `compute()`, once per step."""
        if name in self.stored:
            return self.stored[name]
        return self.memo(("teacher", name), compute)

    def mixed(self, kind: str, alpha: float) -> tuple[Mixed, Taps]:
        """Mixed images (mixup or cutmix with Beta(alpha, alpha)) and the student's taps on them."""
        key = (kind, alpha)
        if key not in self._mixed:
            view = mix_batch(self.batch.x, self.batch.y, kind, alpha, self.seed)
            self._mixed[key] = (view, self.student(view.x))
        return self._mixed[key]

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """`compute()` once per step for `key`, shared by every term that asks."""
        if key not in self._memo:
            self._memo[key] = compute()
        result: T = self._memo[key]
        return result

    def teacher_on(self, x: Tensor) -> Taps:
        """The teacher's taps on other images (a mixed batch)."""
        return frozen_taps(self._teacher(), x)

    def _teacher(self) -> TapsFn:
        if self.teacher is None:
            raise RuntimeError("a term read the teacher, but this run has none")
        return self.teacher


def rotate(x: Tensor) -> Tensor:
    """A batch and its rotations by 90, 180 and 270 degrees, stacked in that order (4B images)."""
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])


def slice_taps(taps: Taps, start: int, stop: int) -> Taps:
    """Rows `start:stop` of every tensor of `taps`."""
    return Taps(
        taps.logits[start:stop],
        tuple(s[start:stop] for s in taps.stages),
        taps.pooled[start:stop],
    )


def frozen_taps(taps_of: TapsFn, x: Tensor) -> Taps:
    """Taps computed under inference mode, returned as ordinary tensors.

    Inference-mode tensors cannot be saved for backward, and the terms combine teacher outputs
    with student outputs; cloning them outside inference mode costs one copy of the activations.
    """
    with torch.inference_mode():
        taps = taps_of(x)
    return Taps(taps.logits.clone(), tuple(s.clone() for s in taps.stages), taps.pooled.clone())


def frozen_call(module: nn.Module, x: Tensor) -> Tensor:
    """A frozen module's output, under inference mode, as an ordinary tensor."""
    with torch.inference_mode():
        out: Tensor = module(x)
    return out.clone()


class FrozenHead:
    """A trained teacher-side head held by a term but kept out of its module tree, so that
    neither the optimizer, nor `train()`, nor the saved state ever touches it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().requires_grad_(False)

    def __call__(self, x: Tensor) -> Tensor:
        return frozen_call(self.module, x)


def mix_batch(x: Tensor, y: Tensor, kind: str, alpha: float, seed: int) -> Mixed:
    """Mix each image with a random partner: `mixup` blends whole images, `cutmix` pastes a box
    covering 1 - lam of the image (lam is then the exact share left)."""
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(alpha, alpha))
    perm = from_host(torch.as_tensor(rng.permutation(x.shape[0])), x.device)
    if kind == "mixup":
        return Mixed(lam * x + (1.0 - lam) * x[perm], y, y[perm], lam)
    h, w = x.shape[-2:]
    cut = float(np.sqrt(1.0 - lam))
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return Mixed(mixed, y, y[perm], lam)


def match_stage(stage: int, student_stages: int, teacher_stages: int) -> int:
    """The teacher stage that student stage `stage` learns from: the same relative depth, so the
    stem matches the stem and the last stage the last stage (identity for equal depths)."""
    if student_stages == 1:
        return teacher_stages - 1
    return round(stage * (teacher_stages - 1) / (student_stages - 1))


class Term(nn.Module):
    """One distillation loss. `forward` returns its unweighted value for a step; the Distiller
    applies the weight. Keyword-only constructor arguments are the term's recipe schema.

    A term whose teacher side has trainable heads (HSAKD's auxiliary classifiers, SSKD's
    projection) implements `teacher_heads` and `teacher_head_objective`; those heads are trained
    once on the frozen teacher and handed to the term, frozen, through `BuildContext.teacher_heads`.
    """

    needs_teacher: ClassVar[bool] = True
    needs_rotations: ClassVar[bool] = False
    has_teacher_heads: ClassVar[bool] = False
    teacher_reads: ClassVar[Literal["outputs", "stages", "mixed", "none"]] = "outputs"
    """What the term reads of the teacher: `outputs` (logits, pooled features, head outputs: the
    teacher-output store can serve them), `stages` (stage maps: run live), `mixed` (outputs on
    images the term mixes itself: run live), `none`."""

    @abstractmethod
    def forward(self, step: Step) -> Tensor:
        """The term's scalar loss on this step."""

    @classmethod
    def teacher_heads(cls, teacher: TapModel, num_classes: int) -> nn.Module:
        """Fresh teacher-side heads (terms with `has_teacher_heads` only)."""
        raise TypeError(f"{cls.__name__} has no teacher heads")

    @classmethod
    def stored_extras(cls, heads: nn.Module, t_rot: Taps) -> dict[str, Tensor]:
        """Outputs of the term's teacher heads on the rotated batch that the teacher-output store
        keeps (names start with `rot_`), read back through `Step.teacher_extra`. Called under
        inference mode with the frozen heads."""
        return {}

    @classmethod
    def teacher_head_objective(
        cls, heads: nn.Module, t_rot: Taps, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Loss and accuracy of the teacher-side heads on a rotated batch of the frozen teacher;
        the loss trains them."""
        raise TypeError(f"{cls.__name__} has no teacher heads")
