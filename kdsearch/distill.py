"""The Distiller: a student, a frozen teacher and the weighted terms of a recipe."""

from __future__ import annotations

from torch import Tensor, nn

from kdsearch.errors import RecipeError
from kdsearch.losses import LOSSES, BuildContext, Step, Term
from kdsearch.recipe import Recipe


class Distiller(nn.Module):
    """Combines the active terms of a recipe into one loss.

    Terms of weight 0 are not built at all, so they cost nothing. The teacher is held outside the
    module tree: it is never trained, never in train mode and never saved with the student.
    """

    def __init__(
        self, student: nn.Module, terms: dict[str, Term], weights: dict[str, float]
    ) -> None:
        super().__init__()
        self.student = student
        self.terms = nn.ModuleDict(terms)
        self.weights = weights
        self.rotations = any(term.needs_rotations for term in terms.values())

    @classmethod
    def build(cls, recipe: Recipe, ctx: BuildContext) -> Distiller:
        """The terms of `recipe.distill` with a non-zero weight, built for this student/teacher."""
        terms: dict[str, Term] = {}
        weights: dict[str, float] = {}
        for name, cfg in recipe.distill:
            if cfg.weight == 0:
                continue
            kind = LOSSES[name]
            if kind.needs_teacher and ctx.teacher is None:
                raise RecipeError(f"distill.{name} needs a teacher, but this run has none")
            if kind.has_teacher_heads and name not in ctx.teacher_heads:
                raise RecipeError(
                    f"distill.{name} needs the teacher's {name} heads; get_teacher() prepares them"
                )
            try:
                terms[name] = kind(ctx, **cfg.model_dump(exclude={"weight"}))
            except ValueError as err:
                raise RecipeError(f"distill.{name}: {err}") from None
            weights[name] = cfg.weight
        return cls(ctx.student, terms, weights)

    def loss(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total and each term's unweighted value."""
        parts = {name: term(step) for name, term in self.terms.items()}
        weighted = [self.weights[name] * value for name, value in parts.items()]
        total = weighted[0]
        for value in weighted[1:]:
            total = total + value
        return total, parts


def needs_teacher(recipe: Recipe) -> bool:
    """Whether any term the recipe switches on reads the teacher."""
    return any(cfg.weight > 0 and LOSSES[name].needs_teacher for name, cfg in recipe.distill)


def needs_teacher_heads(recipe: Recipe) -> bool:
    """Whether any term the recipe switches on reads heads trained on the teacher."""
    return any(cfg.weight > 0 and LOSSES[name].has_teacher_heads for name, cfg in recipe.distill)


HEAD_TERMS: tuple[str, ...] = tuple(name for name, kind in LOSSES.items() if kind.has_teacher_heads)
"""Terms whose teacher side has trained heads; a teacher's heads are prepared for all of them."""
