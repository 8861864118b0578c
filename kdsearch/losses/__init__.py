"""Distillation terms, one file each. The LOSSES key is the term's name in `recipe.distill`."""

from __future__ import annotations

from kdsearch.losses.base import BuildContext, Step, Term
from kdsearch.losses.ce import CE
from kdsearch.losses.kd import KD

LOSSES: dict[str, type[Term]] = {
    "ce": CE,
    "kd": KD,
}

__all__ = ["LOSSES", "BuildContext", "Step", "Term"]
