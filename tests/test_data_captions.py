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
    assert count_tags(["zkz, red\nzkz, blue"]) == {"zkz": 1, "red": 1, "blue": 1}  # lines of one caption


# ------------------------------------------------------------------ kohya's separators and wildcards

SEPARATED = "zkz, red ||| circle, small, centered, plain ||| best quality, detailed"


def test_keep_tokens_separator_fixes_the_front_and_the_end_and_is_never_trained_as_text():
    s = subset(shuffle_caption=True, caption_tag_dropout_rate=0.3, keep_tokens_separator="|||")
    middles = set()
    for seed in range(200):
        tags = sample_caption(SEPARATED, s, random.Random(seed), 0).split(", ")
        assert tags[:2] == ["zkz", "red"] and tags[-2:] == ["best quality", "detailed"]
        assert set(tags[2:-2]) <= {"circle", "small", "centered", "plain"}
        middles.add(tuple(tags[2:-2]))
    assert len(middles) > 30  # the middle is shuffled and dropped
    # nothing shuffled or dropped: the separator is still taken out (kohya would leave "|||" in the caption)
    plain = subset(keep_tokens_separator="|||")
    assert sample_caption(SEPARATED, plain, random.Random(0), 0) == SEPARATED.replace(" |||", ",")
    # a caption without the separator falls back to keep_tokens
    s = subset(shuffle_caption=True, keep_tokens=1, keep_tokens_separator="|||")
    assert all(sample_caption(CAPTION, s, random.Random(i), 0).startswith("zkz, ") for i in range(50))


def test_secondary_separator_moves_joined_tags_as_one():
    s = subset(shuffle_caption=True, caption_tag_dropout_rate=0.4, secondary_separator=";;;")
    caption = "zkz, red;;;circle, small, on white;;;plain background"
    seen = set()
    for seed in range(200):
        out = sample_caption(caption, s, random.Random(seed), 0)
        assert ";;;" not in out
        tags = out.split(", ")
        # a joined pair is kept or dropped whole, and its parts stay side by side
        assert all(t in {"zkz", "red,circle", "small", "on white,plain background"} for t in tags if t), out
        seen.update(tags)
    assert {"red,circle", "on white,plain background"} <= seen
    assert sample_caption(caption, subset(secondary_separator=";;;"), random.Random(0), 0) == \
        "zkz, red,circle, small, on white,plain background"


def test_wildcards_draw_one_option_and_one_line_and_keep_escaped_braces():
    s = subset(enable_wildcard=True)
    caption = "zkz, {red|green|blue} circle, {{literal}}\nzkz, {tiny|huge} star"
    outs = {sample_caption(caption, s, random.Random(seed), 0) for seed in range(300)}
    assert outs == {"zkz, red circle, {literal}", "zkz, green circle, {literal}", "zkz, blue circle, {literal}",
                    "zkz, tiny star", "zkz, huge star"}
    # off (the default), braces are plain text and the caller's draws are untouched
    rng, reference = random.Random(5), random.Random(5)
    assert sample_caption(caption, subset(), rng, 0) == caption
    assert rng.random() == reference.random()


def test_wildcards_come_before_the_shuffle():
    """A drawn option with commas becomes tags that are shuffled like the others (kohya's order)."""
    s = subset(enable_wildcard=True, shuffle_caption=True, keep_tokens=1)
    outs = [sample_caption("zkz, {red, round|blue, square}, small", s, random.Random(i), 0) for i in range(100)]
    assert all(o.startswith("zkz, ") and "{" not in o for o in outs)
    assert {frozenset(o.split(", ")) for o in outs} == {frozenset({"zkz", "red", "round", "small"}),
                                                        frozenset({"zkz", "blue", "square", "small"})}


def test_every_line_of_a_multi_line_caption_gets_the_trigger_prefix_and_suffix():
    s = subset(class_tokens="zkz shape", caption_suffix=", simple")
    assert base_caption("a red circle\nzkz, a star", s) == "zkz shape, a red circle , simple\nzkz, a star , simple"


def test_token_warmup_grows_the_free_tags_as_kohya_counts_them():
    s = subset(keep_tokens=1, token_warmup_min=1, token_warmup_step=10)
    caption = "zkz, a, b, c, d, e, f, g, h, i"  # 9 free tags after the kept one
    rng = random.Random(0)
    # kohya: floor(step × (9 - 1) / 10) + 1 of them while step < 10, then all (nothing else changes)
    lengths = [len(sample_caption(caption, s, rng, 0, step, 10).split(", ")) - 1 for step in range(12)]
    assert lengths == [1, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9]
    assert sample_caption(caption, s, rng, 0, 3, 10) == "zkz, a, b, c"  # the first ones, in order
    assert sample_caption(caption, s, rng, 0, 3, 0) == caption  # off
    shuffled = subset(keep_tokens=1, token_warmup_min=2, token_warmup_step=4, shuffle_caption=True)
    drawn = {sample_caption(caption, shuffled, random.Random(k), 0, 0, 4) for k in range(20)}
    assert drawn == {"zkz, a, b", "zkz, b, a"}  # cut first, then shuffled, as kohya does


def test_token_warmup_counts_the_runs_steps_in_batches(tmp_path):
    from data_helpers import data, make_folder

    make_folder(tmp_path / "1_zkz", 4, captions={i: "zkz, a, b, c, d, e" for i in range(4)})
    d = data(tmp_path, keep_tokens=1, token_warmup_step=0.5, batch_size=1)  # half of the run's steps
    d.count_steps(total_steps=8, batches_per_step=1)  # 2 epochs of 4 steps: warm-up over steps 0-3
    sizes = [len(b.captions[0].split(", ")) - 1 for e in range(2) for b in d.epoch_batches(e)]
    assert sizes == [1, 2, 3, 4, 5, 5, 5, 5]  # floor(step × 4 / 4) + 1
    d.count_steps(total_steps=8, batches_per_step=2)  # accumulation: two batches a step
    sizes = [len(b.captions[0].split(", ")) - 1 for e in range(2) for b in d.epoch_batches(e)]
    assert sizes == [1, 1, 2, 2, 3, 3, 4, 4]


def test_weighted_captions_move_and_drop_a_brackets_tags_together():
    """kohya's weighted_captions: a separator inside brackets does not split, so shuffling and tag dropout never
    cut ``(red, round:1.2)`` apart (kohya's own split does, and warns users off commas in brackets)."""
    from lorakit.data.captions import split_tags

    caption = r"zkz, (red, round:1.2), [small, faint], on white, a \(literal, comma\)"
    assert split_tags(caption, brackets=True) == ["zkz", "(red, round:1.2)", "[small, faint]", "on white",
                                                  r"a \(literal", r"comma\)"]
    assert len(split_tags(caption)) == 8  # plain text: every comma splits, as kohya splits
    s = subset(shuffle_caption=True, caption_tag_dropout_rate=0.3, keep_tokens=1)
    seen = set()
    for seed in range(100):
        tags = split_tags(sample_caption(caption, s, random.Random(seed), 0, weighted=True), brackets=True)
        assert tags[0] == "zkz" and set(tags) <= {"zkz", "(red, round:1.2)", "[small, faint]", "on white",
                                                  r"a \(literal", r"comma\)"}
        seen.update(tags)
    assert {"(red, round:1.2)", "[small, faint]"} <= seen
    unweighted = {t for seed in range(100)
                  for t in sample_caption(caption, s, random.Random(seed), 0).split(", ")}
    assert "(red" in unweighted  # without weighted captions the bracket is split like any text
