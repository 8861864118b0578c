"""The interface every distillation term implements, and what a term sees of a training step."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor, nn

from kdsearch.data import Batch
from kdsearch.models import TapModel, Taps


@dataclass(frozen=True)
class BuildContext:
    """What a term may need to size its own heads and state when it is built."""

    student: TapModel
    teacher: TapModel | None
    num_classes: int
    num_train: int


class Step:
    """One training batch as the terms see it.

    Forward passes are computed on first use and shared by every term: a step whose active terms
    never read the teacher never runs it. The teacher runs under inference mode.
    """

    def __init__(self, batch: Batch, student: TapModel, teacher: TapModel | None) -> None:
        self.batch = batch
        self.student = student
        self.teacher = teacher

    @property
    def x(self) -> Tensor:
        return self.batch.x

    @property
    def y(self) -> Tensor:
        return self.batch.y

    @cached_property
    def s(self) -> Taps:
        """The student's taps on the batch."""
        return self.student.taps(self.batch.x)

    @cached_property
    def t(self) -> Taps:
        """The teacher's taps on the batch (no gradient, ever)."""
        if self.teacher is None:
            raise RuntimeError("a term read the teacher, but this run has none")
        return teacher_taps(self.teacher, self.batch.x)


def teacher_taps(teacher: TapModel, x: Tensor) -> Taps:
    """Teacher taps computed under inference mode, returned as ordinary tensors.

    Inference-mode tensors cannot be saved for backward, and the terms combine teacher outputs
    with student outputs; cloning them outside inference mode costs one copy of the activations.
    """
    with torch.inference_mode():
        taps = teacher.taps(x)
    return Taps(taps.logits.clone(), tuple(s.clone() for s in taps.stages), taps.pooled.clone())


class Term(nn.Module):
    """One distillation loss. `forward` returns its unweighted value for a step; the Distiller
    applies the weight. Keyword-only constructor arguments are the term's recipe schema."""

    needs_teacher: ClassVar[bool] = True

    @abstractmethod
    def forward(self, step: Step) -> Tensor:
        """The term's scalar loss on this step."""
