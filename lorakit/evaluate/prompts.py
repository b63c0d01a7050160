"""Evaluation prompt sets: the five prompt types of the LyCORIS paper (DESIGN.md section 6).

- ``train``: training captions (does the model reproduce its data?);
- ``trigger``: the concept's trigger alone;
- ``alter``: the concept with its content changed (a new color, place, pose);
- ``style``: the concept in a new style or background;
- ``agnostic``: prompts without the trigger (does the concept leak into them?).

A user writes them in one of three formats, chosen by the file's suffix:

TOML (``.toml``)::

    concept = "zkz"                 # optional, defaults to the trigger
    trigger = "zkz shape"           # fills "{trigger}"; ``lorakit eval --trigger`` overrides it
    negative = ""                   # optional default negative prompt
    train = ["a red {trigger} on the left", "{trigger}, large, center"]   # a list of templates per type,
    [style]                                                               # or a table per type
    prompts = ["{trigger}, watercolor", "{trigger}, pencil sketch"]
    negative = "blurry"
    [[prompts]]                     # or one entry per prompt, with everything a prompt can carry
    type = "alter"
    text = "a blue {trigger}"
    seed = 1017
    expected = { color = "blue" }   # the attributes it asks for (an exact reader can check them)
    changes = ["color"]             # which of those the training set never shows

plain text (any other suffix): ``type: prompt`` lines, ``#`` comments, blank lines ignored, settings as
``trigger = …`` / ``concept = …`` / ``negative = …`` lines, and kohya's ``--n negative`` / ``--d seed`` after a
prompt;

JSON (``.json``): the shapes world's ``prompts.json`` (``{"concept": {"trigger": …}, "prompts": [{"type",
"prompt", "expected", "seed", "negative", "changes"}]}``).

``default_prompt_set`` derives a set from the dataset's own captions when the user writes none.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.prompt_tags import network_tag_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's dependency on Python 3.10
    import tomli as tomllib

PROMPT_TYPES = ("train", "trigger", "alter", "style", "agnostic")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class PromptSetError(LorakitError, ValueError):
    """A prompt file that cannot be read: names the file (and line) and what is wrong."""


class Attributes(dict):
    """A read-only dict of ``attribute -> value`` (JSON-serialisable like any dict, hashable, never changed)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple:  # copy and pickle rebuild from a plain dict, not item by item
        return (Attributes, (dict(self),))

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a prompt's expected attributes are read-only")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its text (trigger already filled in), type, optional seed and negative prompt, the
    attributes it asks for (``expected``, may be empty) and which of those the training set never shows
    (``changes``).  Hashable, so it can key a cache."""

    text: str
    type: str
    seed: int | None = None
    negative: str = ""
    expected: Mapping[str, str] = field(default_factory=Attributes)
    changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in PROMPT_TYPES:
            raise PromptSetError(f"unknown prompt type {self.type!r}; known: {', '.join(PROMPT_TYPES)}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise PromptSetError(f"a {self.type} prompt has no text")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise PromptSetError(f"prompt {self.text!r}: seed must be an integer, got {self.seed!r}")
        if not isinstance(self.negative, str):
            raise PromptSetError(f"prompt {self.text!r}: negative must be text, got {self.negative!r}")
        if not isinstance(self.expected, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.expected.items()):
            raise PromptSetError(f"prompt {self.text!r}: expected must map attribute names to text values")
        if isinstance(self.changes, str) or not all(isinstance(c, str) for c in self.changes):
            raise PromptSetError(f"prompt {self.text!r}: changes must be a list of attribute names")
        object.__setattr__(self, "expected", Attributes(self.expected))
        object.__setattr__(self, "changes", tuple(self.changes))  # TOML and JSON give lists
        if not set(self.changes) <= set(self.expected):
            # a change is judged by reading that attribute back: it must say which value it asks for
            raise PromptSetError(f"prompt {self.text!r} changes {list(self.changes)} but its expected "
                                 f"attributes do not name them all")


@dataclass
class PromptSet:
    """The prompts one concept is judged on; ``source`` says where they came from (a path or "captions")."""

    concept: str
    trigger: str
    prompts: list[EvalPrompt]
    source: str

    def by_type(self) -> dict[str, list[EvalPrompt]]:
        """The prompts grouped by type, in PROMPT_TYPES order (types without prompts left out)."""
        groups = {t: [p for p in self.prompts if p.type == t] for t in PROMPT_TYPES}
        return {t: ps for t, ps in groups.items() if ps}


# ------------------------------------------------------------------------------------------------ loading
def load_prompt_set(path: str | Path, trigger: str | None = None) -> PromptSet:
    """Read a prompt file: TOML (``.toml``), the world's ``prompts.json`` layout (``.json``) or plain text.

    ``trigger`` fills ``{trigger}`` in templates and overrides the file's own; a file with templates and no
    trigger anywhere is an error.  Raises PromptSetError naming the file (and line where there is one) for an
    unknown type, a missing trigger, an empty file or a malformed entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptSetError(f"{path}: no such prompt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptSetError(f"{path}: cannot read the prompt file ({e})") from None
    suffix = path.suffix.lower()
    reader = _read_toml if suffix == ".toml" else _read_json if suffix == ".json" else _read_text
    settings, entries = reader(path, text)

    trigger = trigger if trigger is not None else settings.get("trigger")
    if trigger is not None and (not isinstance(trigger, str) or not trigger.strip()):
        raise PromptSetError(f"{path}: the trigger must be non-empty text, got {trigger!r}")
    prompts = []
    for entry in entries:
        prompts.append(_build(path, text, entry, trigger, settings.get("negative", "")))
    if not prompts:
        raise PromptSetError(f"{path}: no prompts (expected prompts of the types {', '.join(PROMPT_TYPES)})")
    concept = settings.get("concept") or trigger
    if not concept:
        raise PromptSetError(f"{path}: no trigger or concept name; add 'trigger = ...' or pass --trigger")
    return PromptSet(concept=str(concept), trigger=trigger or "", prompts=prompts, source=str(path))


@dataclass
class _Entry:
    """One prompt as a file gives it, before the trigger is filled in; ``where`` locates it for errors."""

    where: str
    type: Any
    text: Any
    fields: dict[str, Any] = field(default_factory=dict)
    line: int | None = None


def _build(path: Path, text: str, e: _Entry, trigger: str | None, negative: Any) -> EvalPrompt:
    line = e.line if e.line is not None else _line_of(text, e.text)
    at = f"{path}:{line}" if line else str(path)
    if not isinstance(e.text, str):
        raise PromptSetError(f"{at}: {e.where}: the prompt must be text, got {e.text!r}")
    if e.type not in PROMPT_TYPES:
        raise PromptSetError(f"{at}: {e.where}: unknown prompt type {e.type!r}; known: {', '.join(PROMPT_TYPES)}")
    for said in (e.text, negative, e.fields.get("negative")):
        if isinstance(said, str) and (problem := network_tag_problem(said, evaluating=True)):
            raise PromptSetError(f"{at}: {e.where}: {problem}")
    try:
        filled = _fill(e.text, trigger)
    except PromptSetError as err:
        raise PromptSetError(f"{at}: {e.where}: {err}") from None
    fields = {"negative": negative, **e.fields}
    unknown = set(fields) - {"seed", "negative", "expected", "changes"}
    if unknown:
        raise PromptSetError(f"{at}: {e.where}: unknown keys {sorted(unknown)} (known: seed, negative, expected, "
                             f"changes)")
    try:
        return EvalPrompt(text=filled, type=e.type, **fields)
    except PromptSetError as err:
        raise PromptSetError(f"{at}: {e.where}: {err}") from None


def _fill(template: str, trigger: str | None) -> str:
    """Replace ``{trigger}``; any other ``{name}`` is a typo worth reporting rather than generating."""
    others = [m for m in _PLACEHOLDER.findall(template) if m != "trigger"]
    if others:
        raise PromptSetError(f"unknown placeholder {{{others[0]}}} in {template!r} (only {{trigger}} is filled)")
    if "{trigger}" in template:
        if not trigger:
            raise PromptSetError(f"{template!r} uses {{trigger}} but no trigger is given "
                                 "(add 'trigger = ...' to the file or pass --trigger)")
        template = template.replace("{trigger}", trigger)
    return template


def _line_of(text: str, needle: Any) -> int | None:
    """The first line of ``text`` holding ``needle`` (TOML and JSON parsers give no positions for values)."""
    if not isinstance(needle, str) or not needle:
        return None
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    return None


def _read_toml(path: Path, text: str) -> tuple[dict[str, Any], list[_Entry]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PromptSetError(f"{path}: not valid TOML: {e}") from None
    settings = {k: data.pop(k) for k in ("concept", "trigger", "negative") if k in data}
    entries: list[_Entry] = []
    listed = data.pop("prompts", [])
    if not isinstance(listed, list):
        raise PromptSetError(f"{path}: 'prompts' must be [[prompts]] entries (a table per type uses the type's "
                             f"name: [train], [alter], ...)")
    for key, value in data.items():  # a list or a table per type
        if key not in PROMPT_TYPES:
            raise PromptSetError(f"{path}:{_line_of(text, key) or '?'}: unknown prompt type or setting {key!r}; "
                                 f"types: {', '.join(PROMPT_TYPES)}; settings: concept, trigger, negative")
        table = {"prompts": value} if isinstance(value, list) else value
        if not isinstance(table, dict) or not isinstance(table.get("prompts"), list):
            raise PromptSetError(f"{path}: [{key}] must be a list of prompts or a table with 'prompts = [...]'")
        shared = {k: v for k, v in table.items() if k != "prompts"}
        for i, t in enumerate(table["prompts"]):
            entries.append(_Entry(f"[{key}] prompt {i + 1}", key, t, dict(shared)))
    for i, item in enumerate(listed):
        if not isinstance(item, dict):
            raise PromptSetError(f"{path}: [[prompts]] entry {i + 1} must be a table")
        item = dict(item)
        entries.append(_Entry(f"[[prompts]] entry {i + 1}", item.pop("type", None), item.pop("text", None), item))
    return settings, entries


def _read_json(path: Path, text: str) -> tuple[dict[str, Any], list[_Entry]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise PromptSetError(f"{path}: expected the shapes world's layout "
                             '{"concept": {"trigger": ...}, "prompts": [...]}')
    spec = data.get("concept") or {}
    if not isinstance(spec, dict):
        raise PromptSetError(f"{path}: 'concept' must be an object with the trigger")
    settings = {k: spec[k] for k in ("trigger",) if k in spec}
    if "name" in spec:
        settings["concept"] = spec["name"]
    entries = []
    for i, item in enumerate(data["prompts"]):
        if not isinstance(item, dict):
            raise PromptSetError(f"{path}: prompt {i + 1} must be an object")
        item = dict(item)
        entries.append(_Entry(f"prompt {i + 1}", item.pop("type", None), item.pop("prompt", None), item))
    return settings, entries


_SETTING = re.compile(r"^(concept|trigger|negative)\s*=\s*(.*)$")
_PROMPT_LINE = re.compile(r"^([A-Za-z_]+)\s*:\s*(.*)$")


def _read_text(path: Path, text: str) -> tuple[dict[str, Any], list[_Entry]]:
    settings: dict[str, Any] = {}
    entries = []
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := _SETTING.match(line):
            settings[m.group(1)] = m.group(2).strip()
            continue
        m = _PROMPT_LINE.match(line)
        if not m:
            raise PromptSetError(f"{path}:{no}: expected 'type: prompt' (types: {', '.join(PROMPT_TYPES)}) or "
                                 f"'trigger = ...', got {line!r}")
        kind, body = m.group(1), m.group(2)
        prompt, fields = _kohya_options(path, no, body)
        entries.append(_Entry(f"prompt {len(entries) + 1}", kind, prompt, fields, line=no))
    return settings, entries


def _kohya_options(path: Path, no: int, body: str) -> tuple[str, dict[str, Any]]:
    """Split kohya's ``--n negative`` and ``--d seed`` off a prompt line; sampler settings (``--w``, ``--s``,
    ...) belong to the evaluation run, not to a prompt, so they are refused rather than silently ignored."""
    parts = re.split(r"\s--(?=[a-z]\b)", " " + body)
    prompt, fields = parts[0].strip(), {}
    for part in parts[1:]:
        flag, _, value = part.partition(" ")
        value = value.strip()
        if flag == "n":
            fields["negative"] = value
        elif flag == "d":
            try:
                fields["seed"] = int(value)
            except ValueError:
                raise PromptSetError(f"{path}:{no}: --d wants an integer seed, got {value!r}") from None
        else:
            raise PromptSetError(f"{path}:{no}: option --{flag} is a sampler setting; give it to lorakit eval, "
                                 f"a prompt file only holds --n (negative) and --d (seed)")
    return prompt, fields


# ----------------------------------------------------------------------------------------------- defaults
# templates around the trigger for the two types a dataset's captions cannot supply
DEFAULT_ALTER = ("{trigger} in the snow", "{trigger} on a beach at sunset", "{trigger} in a busy city street",
                 "{trigger} next to a teacup")
DEFAULT_STYLE = ("a watercolor painting of {trigger}", "a pencil sketch of {trigger}", "{trigger}, pixel art",
                 "{trigger} in the style of an oil painting")
# when removing the trigger leaves nothing of the captions
DEFAULT_AGNOSTIC = ("a photo of a landscape", "a bowl of fruit on a table", "a portrait of a person")
DEFAULT_PER_TYPE = 8


def _spread(items: Sequence[str], k: int) -> list[str]:
    """Up to k items evenly spaced through ``items`` (first and last included), order kept."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else [items[0]]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _without(caption: str, trigger: str) -> str:
    """The caption with every occurrence of the trigger removed, and the commas and spaces left dangling."""
    text = re.sub(re.escape(trigger), " ", caption, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "a, , b" -> "a, b"
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return text.strip(" ,.;:")


def default_prompt_set(captions: Sequence[str], trigger: str, concept: str | None = None,
                       per_type: int = DEFAULT_PER_TYPE) -> PromptSet:
    """A prompt set from the dataset's own captions when the user gives none: ``train`` a spread of up to
    ``per_type`` distinct captions, ``trigger`` the trigger alone, ``alter``/``style`` fixed templates around the
    trigger (DEFAULT_ALTER, DEFAULT_STYLE), ``agnostic`` the captions with the trigger removed (or generic
    prompts when nothing is left).  ``concept`` defaults to the trigger.  No seeds: the evaluation picks them."""
    if not isinstance(trigger, str) or not trigger.strip():
        raise PromptSetError("default prompts: the trigger is empty; pass the concept's trigger word")
    trigger = trigger.strip()
    train = _unique(c.strip() for c in captions)
    if not train:
        raise PromptSetError("default prompts: the dataset has no captions to build prompts from; "
                             "write a prompt file and pass --prompts")
    agnostic = _unique(_without(c, trigger) for c in train)
    prompts = [EvalPrompt(c, "train") for c in _spread(train, per_type)]
    prompts.append(EvalPrompt(trigger, "trigger"))
    prompts += [EvalPrompt(t.replace("{trigger}", trigger), "alter") for t in DEFAULT_ALTER]
    prompts += [EvalPrompt(t.replace("{trigger}", trigger), "style") for t in DEFAULT_STYLE]
    prompts += [EvalPrompt(c, "agnostic") for c in (_spread(agnostic, per_type) or DEFAULT_AGNOSTIC)]
    return PromptSet(concept=concept or trigger, trigger=trigger, prompts=prompts, source="captions")
