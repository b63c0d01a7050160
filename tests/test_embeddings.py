"""Textual-inversion files load into a model: lorakit's own layout and other tools' single-tensor files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorakit.embeddings import EmbeddingError, load_embedding
from lorakit.models import load_base_model


@pytest.fixture
def model(tiny_model_dir):
    return load_base_model(tiny_model_dir)


def test_lorakit_file_adds_tokens_with_their_vectors(model, tmp_path):
    dim = model.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, dim)
    path = tmp_path / "zkz.safetensors"
    save_file({"clip_l": vectors}, str(path), metadata={"lorakit_ti_token": "zkz"})
    loaded = load_embedding(model, path)
    assert loaded.tokens == ["zkz", "zkz_1"]
    assert loaded.expand_prompt("a zkz shape, zkzz") == "a zkz zkz_1 shape, zkzz"
    ids = model.tokenizer.convert_tokens_to_ids(loaded.tokens)
    assert torch.equal(model.text_encoder.get_input_embeddings().weight[ids], vectors)
    assert model.tokenizer("a zkz").input_ids[2] == ids[0]  # one token, not BPE pieces


def test_a1111_layout_needs_a_token_and_the_right_size(model, tmp_path):
    dim = model.text_encoder.get_input_embeddings().weight.shape[1]
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.randn(1, dim)}, str(path))
    with pytest.raises(EmbeddingError, match="names no token"):
        load_embedding(model, path)
    assert load_embedding(model, path, token="qwx").tokens == ["qwx"]
    wrong = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": torch.randn(1, dim + 1)}, str(wrong))
    with pytest.raises(EmbeddingError, match=f"size {dim + 1}.*another model"):
        load_embedding(model, wrong, token="other")


def test_comfyuis_sd2_layout_is_an_embedding_too(tiny_sd2_dir, tmp_path):
    """ComfyUI names an SD2.x embedding's tensor after the encoder ({"clip_h": ...}): read like lorakit's own, and
    told apart from an adapter by inspect and eval."""
    from lorakit.file_kinds import embedding_header

    sd2 = load_base_model(tiny_sd2_dir)
    vectors = torch.randn(1, sd2.text_encoder.get_input_embeddings().weight.shape[1])
    path = tmp_path / "qwx.safetensors"
    save_file({"clip_h": vectors}, str(path))
    assert embedding_header(path) is not None
    loaded = load_embedding(sd2, path, token="qwx")
    ids = sd2.tokenizer.convert_tokens_to_ids(loaded.tokens)
    assert torch.equal(sd2.text_encoder.get_input_embeddings().weight[ids], vectors)


def test_pickles_and_broken_files_are_refused(model, tmp_path):
    with pytest.raises(EmbeddingError, match="never unpickled"):
        load_embedding(model, tmp_path / "emb.pt", token="x")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(EmbeddingError, match="broken.safetensors: not a readable"):
        load_embedding(model, broken, token="x")


def test_an_embedding_named_like_a_word_of_the_vocabulary_stands_for_tokens_of_its_own(tmp_path):
    """A1111 and ComfyUI call an embedding by its name, whatever word it is ("style"): a name the vocabulary holds
    gets tokens of its own (``<check>``) and the word in prompts stands for them; the rest of the vocabulary is
    left alone. Here "check" holds the built-in model's vector of "square": the prompts encode the same."""
    model = load_base_model(None)
    assert "check" in model.tokenizer.get_vocab()
    table = model.text_encoder.get_input_embeddings().weight
    square = table[model.tokenizer.convert_tokens_to_ids("square</w>")][None].detach().clone()
    path = tmp_path / "check.safetensors"
    save_file({"emb_params": square}, str(path))
    size = len(model.tokenizer)
    loaded = load_embedding(model, path, default_token="check")
    assert (loaded.token, loaded.tokens, len(model.tokenizer)) == ("check", ["<check>"], size + 1)  # nothing else
    assert loaded.expand_prompt("a red check, checked") == "a red <check>, checked"

    def encoded(text):
        with torch.no_grad():
            return model.text_encoder(model.tokenizer(text, return_tensors="pt").input_ids).last_hidden_state

    assert torch.equal(encoded(loaded.expand_prompt("a red check")), encoded("a red square"))
