"""Captions: reading caption files, trigger words, dropped tags, kohya's shuffle/keep/dropout, tag counts.

Two stages. ``base_caption`` runs once per image at discovery (prefix/suffix, dropped tags, trigger); it is
what tag counts and summaries see. ``sample_caption`` runs per sample and epoch with a random generator the
caller seeds from (seed, epoch, sample), so a resumed run draws exactly the same captions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

from lorakit.data.config import SubsetConfig


def read_caption_file(path: Path) -> tuple[str, int]:
    """The first non-empty line of a caption file (kohya uses the first line), and how many lines had text.

    Raises UnicodeDecodeError for files that are not UTF-8 (a BOM is accepted).
    """
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    lines = [line for line in lines if line]
    return (lines[0] if lines else ""), len(lines)


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """Comma-separated tags, stripped, empty ones removed."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


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


def base_caption(raw: str | None, subset: SubsetConfig) -> str:
    """The caption of one image before per-step randomness.

    ``raw`` is the caption file's text, or None when the image has none (then the folder's class tokens are
    used, as kohya does). Prefix/suffix are joined with a space as in kohya; ``drop_tags`` are removed; the
    trigger is put in front when missing (as the class tokens if they contain it: "zkz shape, <caption>").
    """
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


def sample_caption(base: str, subset: SubsetConfig, rng: random.Random, epoch: int) -> str:
    """One draw of kohya's caption randomness: whole-caption dropout, then shuffle and tag dropout.

    ``epoch`` counts from 0; ``caption_dropout_every_n_epochs`` counts epochs from 1 as kohya does (n = 2
    drops captions in the 2nd, 4th... epoch). The first ``keep_tokens`` tags never move and are never dropped.
    Shuffled/tag-dropped captions are re-joined with ", " (kohya does the same).
    """
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and (epoch + 1) % every == 0):
        return ""
    if not (subset.shuffle_caption or subset.caption_tag_dropout_rate > 0):
        return base
    tags = split_tags(base, subset.caption_separator)
    fixed, flexible = tags[: subset.keep_tokens], tags[subset.keep_tokens:]
    if subset.shuffle_caption:
        shuffle(flexible, rng)
    if subset.caption_tag_dropout_rate > 0:
        flexible = [t for t in flexible if rng.random() >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible)


def count_tags(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """Tag counts over captions, lower-cased, one count per image (kohya's ``ss_tag_frequency`` per folder)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in split_tags(caption, separator):
            tag = tag.lower()
            counts[tag] = counts.get(tag, 0) + 1
    return counts
