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
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.zeros(2, width)
    vectors[1, 3] = float("inf")  # fp16 overflow on save
    save_file({"clip_l": vectors}, str(tmp_path / "inf.safetensors"))
    vocabulary = len(model.tokenizer)
    with pytest.raises(EmbeddingError, match="inf.safetensors: tensor 'clip_l' holds NaN or infinite values"):
        load_embedding(model, tmp_path / "inf.safetensors", token="x")
    assert len(model.tokenizer) == vocabulary  # refused before any token was added


def test_a_file_that_is_no_embedding_is_named_for_what_it_is(model, tmp_path):
    """An adapter given as --embedding listed all of its hundreds of key names in the error."""
    adapter = tmp_path / "lora.safetensors"
    save_file({f"lora_unet_layer{i}.{part}": torch.zeros(2, 2) for i in range(200)
               for part in ("lora_down.weight", "lora_up.weight")}, str(adapter))
    with pytest.raises(EmbeddingError) as info:
        load_embedding(model, adapter, token="x")
    said = str(info.value)
    assert "lora.safetensors: not an embedding" in said and "an adapter file (400 tensors such as" in said
    assert "give it as an adapter" in said and len(said) < 300
    odd = tmp_path / "odd.safetensors"
    save_file({name: torch.zeros(1) for name in "abcde"}, str(odd))
    with pytest.raises(EmbeddingError, match=r"odd.safetensors: not an embedding .*: 5 tensors named 'a', 'b', 'c', "):
        load_embedding(model, odd, token="x")


def test_an_embedding_given_to_sample_as_an_adapter_is_pointed_to_embedding(tiny_model_dir, tmp_path, capsys):
    from lorakit.cli import main

    path = tmp_path / "zkz.safetensors"
    save_file({"clip_l": torch.zeros(1, 32)}, str(path))
    assert main(["sample", str(path), "--model", str(tiny_model_dir), "--prompt", "a zkz", "--out",
                 str(tmp_path / "s")]) == 2
    assert f"{path}: a textual-inversion embedding, not an adapter: give it with --embedding {path}" \
        in capsys.readouterr().err


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


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_the_diffusers_code_the_trainer_prints_loads_the_embedding_into_a_pipeline(tmp_path, tiny_model_dir,
                                                                                     tiny_sdxl_dir, sdxl):
    """`lorakit train`'s closing lines give diffusers code for a run's embedding. Run as printed, it puts the file's
    vectors in the token's rows (diffusers would take the file's one key, 'clip_l', for the token, and refuses
    SDXL's pair in one call) and diffusers' prompt expansion reaches all of them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lorakit.config import TrainConfig
    from lorakit.run_messages import next_steps

    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = pipeline.from_pretrained(tiny_sdxl_dir if sdxl else tiny_model_dir, local_files_only=True)
    pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else [])
    vectors = {key: torch.randn(2, encoder.get_input_embeddings().weight.shape[1])
               for key, (_, encoder) in zip(("clip_l", "clip_g"), pairs, strict=False)}
    cfg = TrainConfig()
    cfg.method.kind, cfg.output.name = "ti", "my-lora"  # a dash in the run's name: the token is still 'zkz'
    path = tmp_path / "my-lora-zkz.safetensors"
    save_file(vectors, str(path), metadata={"lorakit_ti_token": "zkz"})
    code = next(line for line in next_steps(tmp_path, [path], cfg) if line.startswith("  diffusers: "))
    exec(code.removeprefix("  diffusers: "), {"pipe": pipe})  # noqa: S102 - the printed line, as a user pastes it
    for (tokenizer, encoder), expected in zip(pairs, vectors.values(), strict=True):
        assert tokenizer.tokenize("a zkz star")[1] == "zkz"
        rows = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(["zkz", "zkz_1"])]
        assert torch.equal(rows, expected)
        assert pipe.maybe_convert_prompt("a zkz star", tokenizer) == "a zkz zkz_1 star"
    from lorakit.embedding_inspection import format_embedding_report, inspect_embedding

    # `lorakit inspect` of the file gives the same code
    assert f"diffusers:   {code.removeprefix('  diffusers: ')}" in format_embedding_report(inspect_embedding(path))
    cfg.method.kind = "pivotal"  # the adapter's line carries the same code for its embedding
    lines = "\n".join(next_steps(tmp_path, [path, tmp_path / "my-lora.safetensors"], cfg))
    assert code.removeprefix("  diffusers: ") in lines and "load_lora_weights" in lines
