"""lorakit.data captions: trigger injection, dropped tags, keep_tokens + shuffle, dropout rates, tag counts."""

from __future__ import annotations

import random

import pytest

from lorakit.data import SubsetConfig, base_caption, count_tags, sample_caption
from lorakit.data.captions import contains_word, drop_tags

CAPTION = "zkz, red, circle, on white, small, centered, plain background"


def subset(**options) -> SubsetConfig:
    return SubsetConfig(image_dir="x", **options)


def test_keep_tokens_stay_fixed_while_the_rest_is_shuffled():
    tags = CAPTION.split(", ")
    s = subset(shuffle_caption=True, keep_tokens=2)
    orders = set()
    for seed in range(300):
        out = sample_caption(CAPTION, s, random.Random(seed), epoch=0).split(", ")
        assert out[:2] == tags[:2]
        assert sorted(out[2:]) == sorted(tags[2:])
        orders.add(tuple(out))
    assert len(orders) > 100  # really shuffled
    first_flexible = {sample_caption(CAPTION, s, random.Random(seed), 0).split(", ")[2] for seed in range(300)}
    assert first_flexible == set(tags[2:])  # every other tag reaches the front of the flexible part


def test_no_shuffle_no_dropout_returns_the_caption_untouched():
    assert sample_caption("zkz,red ,  circle", subset(), random.Random(0), 0) == "zkz,red ,  circle"


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_caption_dropout_rate_within_tolerance(rate):
    s = subset(caption_dropout_rate=rate)
    n = 4000
    dropped = sum(sample_caption(CAPTION, s, random.Random(i), 0) == "" for i in range(n))
    assert abs(dropped / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5 + 1e-9


def test_caption_dropout_zero_and_one_are_exact():
    assert all(sample_caption(CAPTION, subset(caption_dropout_rate=0.0), random.Random(i), 0) == CAPTION
               for i in range(500))
    assert all(sample_caption(CAPTION, subset(caption_dropout_rate=1.0), random.Random(i), 0) == ""
               for i in range(500))


def test_caption_dropout_every_n_epochs_counts_epochs_from_one_like_kohya():
    s = subset(caption_dropout_every_n_epochs=2)
    dropped = [sample_caption(CAPTION, s, random.Random(0), epoch) == "" for epoch in range(6)]
    assert dropped == [False, True, False, True, False, True]


def test_tag_dropout_spares_kept_tokens():
    tags = CAPTION.split(", ")
    s = subset(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert sample_caption(CAPTION, s, random.Random(0), 0) == "zkz"
    s = subset(caption_tag_dropout_rate=0.5, keep_tokens=1)
    lengths = []
    for i in range(2000):
        out = sample_caption(CAPTION, s, random.Random(i), 0).split(", ")
        assert out[0] == "zkz"
        assert out[1:] == [t for t in tags[1:] if t in out[1:]]  # order kept without shuffle
        lengths.append(len(out) - 1)
    assert abs(sum(lengths) / len(lengths) - 3.0) < 0.15  # 6 flexible tags × 0.5


def test_trigger_is_injected_only_when_missing():
    s = subset(class_tokens="zkz shape")
    assert s.effective_trigger == "zkz"
    assert base_caption("a red circle", s) == "zkz shape, a red circle"
    assert base_caption("ZKZ, a red circle", s) == "ZKZ, a red circle"  # case-insensitive
    assert base_caption("a zkzlike circle", s) == "zkz shape, a zkzlike circle"  # whole words only
    assert base_caption(None, s) == "zkz shape"
    assert base_caption("a red circle", subset(class_tokens="zkz shape", inject_trigger=False)) == "a red circle"
    assert base_caption("a red circle", subset(trigger="qqw", class_tokens="zkz shape")) == "qqw, a red circle"
    assert base_caption("a red circle", subset(trigger="", class_tokens="zkz shape")) == "a red circle"
    assert base_caption("a circle", subset(class_tokens="shape", is_reg=True)) == "a circle"


def test_prefix_suffix_join_like_kohya():
    s = subset(caption_prefix="masterpiece,", caption_suffix=", from side", trigger="")
    assert base_caption("a star", s) == "masterpiece, a star , from side"
    assert sample_caption(base_caption("a star", s), subset(shuffle_caption=True, keep_tokens=3),
                          random.Random(0), 0) == "masterpiece, a star, from side"


def test_drop_tags_removes_concept_tags_but_never_the_trigger():
    s = subset(class_tokens="zkz shape", drop_tags=["Five Points", "star", "zkz shape"])
    assert base_caption("zkz shape, star, five points, blue, on grass", s) == "zkz shape, blue, on grass"
    assert drop_tags("a, b, star", ["star"]) == "a, b"
    assert drop_tags("stars, star-like", ["star"]) == "stars, star-like"  # whole tags only
    assert drop_tags("a;b;c", ["b"], separator=";") == "a; c"


def test_contains_word():
    assert contains_word("a zkz. shape", "zkz")
    assert not contains_word("zkzz", "zkz")
    assert contains_word("sks-dog", "sks")


def test_count_tags_lowercases_and_counts_once_per_caption():
    assert count_tags(["zkz, Red, circle", "zkz, red", ""]) == {"zkz": 2, "red": 2, "circle": 1}
