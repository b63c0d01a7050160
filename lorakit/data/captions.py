"""Captions: reading caption files, trigger words, dropped tags, kohya's shuffle/keep/dropout and wildcards,
tag counts.

Two stages. ``base_caption`` runs once per image at discovery (prefix/suffix, dropped tags, trigger); it is
what tag counts and summaries see. ``sample_caption`` runs per sample and epoch with a random generator the
caller seeds from (seed, epoch, sample), so a resumed run draws exactly the same captions.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable
from pathlib import Path

from lorakit.data.config import SubsetConfig


def read_caption_file(path: Path) -> list[str]:
    """The non-empty lines of a caption file, stripped (kohya trains on the first, or with ``enable_wildcard``
    on one drawn per step).

    Raises UnicodeDecodeError for files that are not UTF-8 (a BOM is accepted).
    """
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    return [line for line in lines if line]


def split_tags(caption: str, separator: str = ",", brackets: bool = False) -> list[str]:
    """Comma-separated tags, stripped, empty ones removed.  ``brackets`` (weighted captions): a separator inside
    round or square brackets does not split, so ``(red, round:1.2)`` stays one tag (``\\(`` is no bracket)."""
    if not brackets:
        return [t.strip() for t in caption.split(separator) if t.strip()]
    tags, start, depth, i = [], 0, 0, 0
    while i < len(caption):
        if caption[i] == "\\":
            i += 2  # an escaped character is text
            continue
        if caption[i] in "([":
            depth += 1
        elif caption[i] in ")]":
            depth = max(depth - 1, 0)  # a stray closing bracket is text (as the prompt parser reads it)
        elif depth == 0 and caption.startswith(separator, i):
            tags.append(caption[start:i])
            start = i = i + len(separator)
            continue
        i += 1
    tags.append(caption[start:])
    return [t.strip() for t in tags if t.strip()]


def contains_word(caption: str, word: str) -> bool:
    """Whether ``word`` appears as a whole word, case-insensitively (CLIP's tokenizer lowercases anyway)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", caption, flags=re.IGNORECASE) is not None


def drop_tags(caption: str, tags: Iterable[str], separator: str = ",", keep: str | None = None) -> str:
    """Remove tags (case-insensitive, whole tags) from a caption; the tag equal to ``keep`` is never removed."""
    unwanted = {t.strip().lower() for t in tags if t.strip()}
    if keep:
        unwanted.discard(keep.strip().lower())
    if not unwanted:
        return caption
    kept = [t for t in split_tags(caption, separator) if t.lower() not in unwanted]
    return f"{separator} ".join(kept)


#: data.caption_templates (kohya's use_object_template / use_style_template): lorakit's own wording, "{}" the
#: trigger; one line is drawn per step
CAPTION_TEMPLATES = {
    "object": ("a photo of a {}", "a picture of the {}", "a close-up photo of a {}", "a bright photo of a {}",
               "a dark photo of the {}", "a cropped photo of the {}", "a photo of one {}", "a good photo of a {}",
               "a rendering of a {}", "a photo of a small {}", "a photo of a large {}", "a clear picture of the {}",
               "a blurry photo of a {}", "an image of the {}", "a snapshot of a {}", "a photo of my {}"),
    "style": ("a painting in the style of {}", "a picture in the style of {}", "an artwork in the style of {}",
              "a drawing in the style of {}", "a rendering in the style of {}", "a sketch in the style of {}",
              "an illustration in the style of {}", "a close-up painting in the style of {}",
              "a small picture in the style of {}", "a large painting in the style of {}",
              "a bright picture in the style of {}", "a dark painting in the style of {}",
              "a still life in the style of {}", "a landscape in the style of {}", "a portrait in the style of {}",
              "a scene in the style of {}"),
}


def template_caption(subset: SubsetConfig) -> str | None:
    """Every template of ``subset.caption_templates`` filled with its trigger, one per line (a line is drawn per
    step); None when the subset trains on its captions (regularization folders always do)."""
    templates = CAPTION_TEMPLATES.get(subset.caption_templates or "")
    trigger = subset.effective_trigger
    if not templates or not subset.templated or not trigger:
        return None
    return "\n".join(t.format(trigger) for t in templates)


def base_caption(raw: str | None, subset: SubsetConfig) -> str:
    """The caption of one image before per-step randomness.

    ``raw`` is the caption file's text, or None when the image has none (then the folder's class tokens are
    used, as kohya does). Prefix/suffix are joined with a space as in kohya; ``drop_tags`` are removed; the
    trigger is put in front when missing (as the class tokens if they contain it: "zkz shape, <caption>").
    A caption of several lines (``enable_wildcard``: one is drawn per step) is treated line by line, so every
    line gets the prefix, the suffix and the trigger (kohya puts the prefix on the first line only and the
    suffix on the last, which a drawn line then lacks).
    """
    if raw is not None and "\n" in raw:
        return "\n".join(base_caption(line, subset) for line in raw.split("\n"))
    caption = raw if raw is not None else (subset.class_tokens or "")
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}".strip()
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}".strip()
    trigger = subset.effective_trigger
    caption = drop_tags(caption, subset.drop_tags, subset.caption_separator, keep=trigger)
    if trigger and subset.inject_trigger and not contains_word(caption, trigger):
        tokens = subset.class_tokens or ""
        prefix = tokens if contains_word(tokens, trigger) else trigger
        caption = f"{prefix}{subset.caption_separator} {caption}" if caption else prefix
    return caption


def shuffle(items: list, rng: random.Random) -> None:
    """Fisher-Yates on ``rng.random()``, whose sequence Python guarantees across versions (``random.shuffle``
    is not guaranteed), so resumed runs match even after an upgrade."""
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]


def _pick(options: list[str], rng: random.Random) -> str:
    # rng.random() rather than rng.choice: its sequence is guaranteed across Python versions (see shuffle)
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


_WILDCARD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


def resolve_wildcards(caption: str, rng: random.Random) -> str:
    """kohya's ``enable_wildcard``: one line of a multi-line caption, and in it one option of each
    ``{a|b|c}``, drawn from ``rng``; ``{{`` and ``}}`` stand for literal braces."""
    lines = caption.split("\n")
    line = _pick(lines, rng) if len(lines) > 1 else caption

    def replace(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group(0)[0]  # an escaped brace
        return _pick(match.group(1).split("|"), rng)

    return _WILDCARD.sub(replace, line)


def _kept_parts(caption: str, subset: SubsetConfig, brackets: bool) -> tuple[list[str], list[str], list[str]]:
    """The caption's tags as (fixed in front, free to move or drop, fixed at the end).

    With ``keep_tokens_separator`` in the caption ("zkz, red ||| tags... ||| suffix"), what stands before it is
    fixed, and what follows a second one stays at the end (kohya's rule); otherwise the first ``keep_tokens``
    tags are fixed."""
    sep, tag_sep = subset.keep_tokens_separator, subset.caption_separator
    if sep and sep in caption:
        front, rest = caption.split(sep, 1)
        middle, _, end = rest.partition(sep)
        return (split_tags(front, tag_sep, brackets), split_tags(middle, tag_sep, brackets),
                split_tags(end.replace(sep, tag_sep), tag_sep, brackets))
    tags = split_tags(caption, tag_sep, brackets)
    return tags[: subset.keep_tokens], tags[subset.keep_tokens:], []


def warmup_length(flexible: int, subset: SubsetConfig, step: int, warmup_steps: int) -> int:
    """How many of the ``flexible`` tags kohya's token warm-up keeps at ``step`` (counted from 0): from
    ``token_warmup_min`` growing linearly over ``warmup_steps`` steps, then all of them."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return flexible
    return math.floor(step * ((flexible - subset.token_warmup_min) / warmup_steps)) + subset.token_warmup_min


def sample_caption(base: str, subset: SubsetConfig, rng: random.Random, epoch: int, step: int = 0,
                   warmup_steps: int = 0, weighted: bool = False) -> str:
    """One draw of kohya's caption randomness: whole-caption dropout, wildcards, then shuffle and tag dropout.

    ``epoch`` counts from 0; ``caption_dropout_every_n_epochs`` counts epochs from 1 as kohya does (n = 2
    drops captions in the 2nd, 4th... epoch). The fixed tags (the first ``keep_tokens``, or those around
    ``keep_tokens_separator``) never move and are never dropped. Shuffled/tag-dropped captions are re-joined
    with ", " (kohya does the same), and so is a caption with the separator, which is never trained as text
    (kohya leaves it in when nothing is shuffled or dropped). Last, ``secondary_separator`` becomes the caption
    separator: tags joined by it moved and dropped as one.  Options that are off draw nothing from ``rng``.
    ``step`` and ``warmup_steps``: kohya's token warm-up (the free tags cut to ``warmup_length`` before they
    are shuffled or dropped).  ``weighted`` (``data.weighted_captions``): tags inside one bracket move and drop
    together.
    """
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and (epoch + 1) % every == 0):
        return ""
    caption = resolve_wildcards(base, rng) if subset.enable_wildcard or subset.templated else base
    has_separator = bool(subset.keep_tokens_separator) and subset.keep_tokens_separator in caption
    warming = 0 <= step < warmup_steps
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or has_separator or warming:
        fixed, flexible, end = _kept_parts(caption, subset, weighted)
        if warming:
            flexible = flexible[:warmup_length(len(flexible), subset, step, warmup_steps)]
        if subset.shuffle_caption:
            shuffle(flexible, rng)
        if subset.caption_tag_dropout_rate > 0:
            flexible = [t for t in flexible if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flexible + end)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def count_tags(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """Tag counts over captions, lower-cased, one count per image (kohya's ``ss_tag_frequency`` per folder; a
    tag in several lines of one caption counts once)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in dict.fromkeys(t.lower() for line in caption.split("\n") for t in split_tags(line, separator)):
            counts[tag] = counts.get(tag, 0) + 1
    return counts
