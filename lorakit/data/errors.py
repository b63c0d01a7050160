"""Errors and warnings about the user's data, collected so that every problem is reported at once."""

from __future__ import annotations

import warnings

from lorakit.errors import LorakitError


class DatasetError(LorakitError, ValueError):
    """The data cannot be trained on; the message names the file or folder and what is wrong."""


class DatasetWarning(UserWarning):
    """The data can be trained on, but probably not as the user meant (upscaled images, lost captions...)."""


class Problems:
    """Collects errors and warnings while a dataset is read, so the user sees all of them in one go.

    A user with five broken files should not have to fix them one run at a time.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warn(self, message: str) -> None:
        # a Python warning (filterable, and pytest.warns sees it); TrainingData.warnings keeps the list too
        self.warnings.append(message)
        warnings.warn(message, DatasetWarning, stacklevel=3)

    def raise_if_any(self, what: str = "the training data") -> None:
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise DatasetError(self.errors[0])
        listed = "\n".join(f"  - {e}" for e in self.errors)
        raise DatasetError(f"{len(self.errors)} problems in {what}:\n{listed}")
