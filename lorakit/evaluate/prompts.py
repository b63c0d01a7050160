"""Evaluation prompt sets: the five prompt types of the LyCORIS paper (DESIGN.md section 6).

- ``train``: training captions (does the model reproduce its data?);
- ``trigger``: the concept's trigger alone;
- ``alter``: the concept with its content changed (a new color, place, pose);
- ``style``: the concept in a new style or background;
- ``agnostic``: prompts without the trigger (does the concept leak into them?).

A user writes them as a TOML file (templates with ``{trigger}``), a plain text file (``type: prompt`` lines) or,
for the shapes world, its ``prompts.json``; ``default_prompt_set`` derives a set from the dataset's own captions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError

PROMPT_TYPES = ("train", "trigger", "alter", "style", "agnostic")


class PromptSetError(LorakitError, ValueError):
    """A prompt file that cannot be read: names the file (and line) and what is wrong."""


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its text (trigger already filled in), type, optional seed and negative prompt, the
    attributes it asks for (``expected``, may be empty) and which of those the training set never shows
    (``changes``)."""

    text: str
    type: str
    seed: int | None = None
    negative: str = ""
    expected: Mapping[str, str] = field(default_factory=dict)
    changes: tuple[str, ...] = ()


@dataclass
class PromptSet:
    """The prompts one concept is judged on; ``source`` says where they came from (a path or "captions")."""

    concept: str
    trigger: str
    prompts: list[EvalPrompt]
    source: str

    def by_type(self) -> dict[str, list[EvalPrompt]]:
        """The prompts grouped by type, in PROMPT_TYPES order (types without prompts left out)."""
        raise NotImplementedError


def load_prompt_set(path: str | Path, trigger: str | None = None) -> PromptSet:
    """Read a prompt file: TOML (``.toml``), the world's ``prompts.json`` layout (``.json``) or plain text.

    ``trigger`` fills ``{trigger}`` in templates and overrides the file's own; a file with templates and no
    trigger anywhere is an error.  Raises PromptSetError naming the file (and line where there is one) for an
    unknown type, a missing trigger, an empty file or a malformed entry.
    """
    raise NotImplementedError


def default_prompt_set(captions: Sequence[str], trigger: str, concept: str | None = None) -> PromptSet:
    """A prompt set from the dataset's own captions when the user gives none: ``train`` a spread of captions,
    ``trigger`` the trigger alone, ``alter``/``style`` fixed templates around the trigger, ``agnostic`` the
    captions with the trigger removed.  ``concept`` defaults to the trigger."""
    raise NotImplementedError
