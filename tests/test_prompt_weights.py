"""A1111's prompt weighting, ``(word:1.2)``, in sample prompts: the grammar as A1111 reads it, the token layout of
unweighted prompts unchanged, the states scaled and brought back to their mean; sampling with weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from lorakit.models import encode_prompt_ids, load_base_model, tokenize_prompts
from lorakit.prompt_weights import apply_weights, parse_weights, plain_text, uses_bracket_syntax, weighted_token_ids
from lorakit.sample import SamplePrompt, generate

TOKENIZER = "lorakit/world/base_model/tokenizer"


@pytest.mark.parametrize(("text", "runs"), [
    ("a (red) star", [("a ", 1.0), ("red", 1.1), (" star", 1.0)]),
    ("((a)) b", [("a", 1.1 * 1.1), (" b", 1.0)]),
    ("[x] y", [("x", 1 / 1.1), (" y", 1.0)]),
    ("(zkz shape:1.5), white", [("zkz shape", 1.5), (", white", 1.0)]),
    ("(a [b] c:0.5) d", [("a ", 0.5), ("b", 0.5 / 1.1), (" c", 0.5), (" d", 1.0)]),
    (r"a \(literal\) x", [("a (literal) x", 1.0)]),
    ("open (end", [("open ", 1.0), ("end", 1.1)]),  # left open: weighs the rest
    ("stray ) here", [("stray ) here", 1.0)]),  # closes nothing: text
    ("time: 5pm", [("time: 5pm", 1.0)]),
])
def test_the_grammar_is_a1111_s(text, runs):
    parsed = parse_weights(text)
    assert [p for p, _ in parsed] == [p for p, _ in runs]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in runs])


def test_a_prompt_with_brackets_is_parsed_even_when_they_weigh_1():
    """Escaped brackets too: A1111 reads ``\\(`` as a literal bracket, so the backslash must go."""
    assert uses_bracket_syntax("a (red:1.0) circle") and uses_bracket_syntax("stray ) here")
    assert uses_bracket_syntax(r"a \(literal\) x") and parse_weights(r"a \(literal\) x") == [("a (literal) x", 1.0)]
    assert not uses_bracket_syntax("plain, time: 5pm")
    assert plain_text("a ((red:1.3)) [star], \\(sic\\)") == "a red star, (sic)" and plain_text("a: b") == "a: b"


@pytest.mark.parametrize("max_token_length", [75, 150])
def test_an_unweighted_prompt_is_laid_out_as_before(max_token_length):
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    texts = ["a red zkz shape on the left", "word " * 100]  # the second is cut at max_token_length
    ids, weights = weighted_token_ids(tokenizer, texts, max_token_length)
    assert torch.equal(ids, tokenize_prompts(tokenizer, texts, max_token_length))
    assert weights.shape == (2, 77 if max_token_length == 75 else 2 + max_token_length) and bool((weights == 1).all())
    ids, weights = weighted_token_ids(tokenizer, ["a (red:1.5) star"], max_token_length)
    red = tokenizer("red", add_special_tokens=False).input_ids
    assert ids[0].flatten().tolist()[1:4] == tokenizer("a", add_special_tokens=False).input_ids + red + \
        tokenizer(" star", add_special_tokens=False).input_ids
    assert weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.0])  # BOS, a, red, star, EOS


def test_weights_scale_the_states_and_keep_their_mean():
    torch.manual_seed(0)
    states = torch.randn(2, 77, 8) + 0.5
    centred = states - states.mean(dim=(1, 2), keepdim=True)  # a mean of 0: nothing to scale back to
    assert torch.isfinite(apply_weights(centred, torch.full((2, 77), 1.5))).all()
    assert torch.equal(apply_weights(states, torch.ones(2, 77)), states)
    weights = torch.ones(2, 77)
    weights[:, 3] = 1.5
    out = apply_weights(states, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), states.mean(dim=(1, 2)), atol=1e-6)
    ratio = (out / states)
    assert torch.allclose(ratio[:, 3], 1.5 * ratio[:, 0], rtol=1e-4)  # token 3: 1.5× its neighbours


def test_sampling_reads_the_weights(tiny_model_dir):
    """A weight of 1 draws the very image of the plain prompt (the same conditioning, through the weighted path);
    a weight of 1.5 another one.  Also with a clip skip, where the embeddings always come from lorakit."""
    model = load_base_model(tiny_model_dir)
    for clip_skip in (1, 2):
        # one call each: the plain prompt alone goes the pipeline's own way (clip skip 1)
        plain, one, more = (np.asarray(generate(model, [SamplePrompt(text, seed=1, steps=2)], clip_skip=clip_skip,
                                                progress=False)[0], dtype=np.int16)
                            for text in ("a red circle", "a (red:1.0) circle", "a (red:1.5) circle"))
        assert np.abs(plain - one).max() <= 1
        assert np.abs(plain - more).mean() > 0.1  # random weights: the text moves a gray image a little
    ids = tokenize_prompts(model.tokenizer, ["a red circle"])
    wids, weights = weighted_token_ids(model.tokenizer, ["a (red:1.0) circle"])
    assert torch.equal(ids, wids)
    with torch.no_grad():
        assert torch.equal(encode_prompt_ids(model.text_encoder, ids),
                           apply_weights(encode_prompt_ids(model.text_encoder, wids), weights))
