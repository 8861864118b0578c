"""Distillation terms, one file each. The LOSSES key is the term's name in `recipe.distill`."""

from __future__ import annotations

from kdsearch.losses.base import BuildContext, Step, Term
from kdsearch.losses.ce import CE
from kdsearch.losses.cktf import CKTF
from kdsearch.losses.crd import CRD
from kdsearch.losses.hsakd import HSAKD
from kdsearch.losses.kd import KD
from kdsearch.losses.pkt import PKT
from kdsearch.losses.sskd import SSKD
from kdsearch.losses.stkd import STKD

LOSSES: dict[str, type[Term]] = {
    "ce": CE,
    "kd": KD,
    "pkt": PKT,
    "crd": CRD,
    "cktf": CKTF,
    "sskd": SSKD,
    "hsakd": HSAKD,
    "stkd": STKD,
}

__all__ = ["LOSSES", "BuildContext", "Step", "Term"]
