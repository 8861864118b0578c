"""Errors a user can cause. The CLI prints their message as one line and exits with status 2."""

from __future__ import annotations

from functools import partial
from typing import Any


class KdsearchError(Exception):
    """Base of every error caused by the user's input or environment, not by a bug."""


class RecipeError(KdsearchError):
    """A recipe (or an override of one) is not valid."""


class DataError(KdsearchError):
    """A data set cannot be found, read or split as asked."""


class TeacherError(KdsearchError):
    """A teacher checkpoint cannot be loaded into the architecture the recipe names."""


class KdsearchWarning(UserWarning):
    """Something a user should know that does not stop the work (a damaged cache rebuilt, a
    split missing classes); the CLI prints it as one line."""


class NonFiniteLoss(Exception):
    """The training (or validation) loss became NaN or infinite; the run cannot go on. `run`
    names the training where that is not the student's, `hint` the setting to lower."""

    def __init__(
        self,
        epoch: int,
        value: float,
        which: str = "training",
        *,
        run: str = "",
        hint: str = "lower optim.lr or the distillation weights",
    ) -> None:
        super().__init__(
            f"{run + ': ' if run else ''}the {which} loss became {value} in epoch {epoch}; {hint}"
        )
        self.epoch = epoch
        self.value = value
        self.which = which
        self.run = run
        self.hint = hint

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole (Ray carries a worker's exceptions so): an exception is unpickled from
        its `args`, here the message alone, which is not this constructor's."""
        return (
            partial(NonFiniteLoss, run=self.run, hint=self.hint),
            (self.epoch, self.value, self.which),
        )

    def of(self, run: str, hint: str) -> NonFiniteLoss:
        """The same divergence, said of another training than the student's."""
        return NonFiniteLoss(self.epoch, self.value, self.which, run=run, hint=hint)


class StudyError(KdsearchError):
    """A study storage cannot be opened, or a study is not in the state an action needs."""


class StorageError(StudyError):
    """The study storage stopped taking reads or writes (a full disk, a read-only file, a lost
    server)."""
