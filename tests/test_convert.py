"""``lorakit convert``: an adapter rewritten in the kohya or diffusers/PEFT layout gives the model the same outputs,
keeps its metadata and dtype, and what a layout cannot hold is refused before anything is written."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_tools import _random_adapter, unet_out

from lorakit.cli import main
from lorakit.formats import load_network, read_adapter

TOKENS = torch.tensor([[845, 5, 17, 42, 846]])


def outputs_with(model, path) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's and the text encoder's outputs with the adapter file loaded (the model left as it was)."""
    network, _ = load_network(path, model.unet, model.text_encoder)
    try:
        with torch.no_grad():
            return unet_out(model), model.text_encoder(TOKENS).last_hidden_state
    finally:
        network.remove()


def assert_same_outputs(model, a, b) -> None:
    for got, expected in zip(outputs_with(model, a), outputs_with(model, b), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_kohya_to_diffusers_and_back_gives_the_model_the_same_outputs(base, tmp_path, capsys):
    source = _random_adapter(base, tmp_path / "locon.safetensors", preset="full", rank=4, alpha=2.0)
    tensors = read_adapter(source).tensors
    save_file(dict(tensors), str(source), metadata={**read_adapter(source).metadata,
                                                    "ss_training_comment": "my character, 12 images"})
    peft = tmp_path / "peft.safetensors"
    assert main(["convert", str(source), "--to", "diffusers", "--out", str(peft)]) == 0
    said = capsys.readouterr().out
    assert f"{source} (kohya layout) -> {peft} (diffusers layout)" in said and "the same ΔW" in said
    converted = read_adapter(peft)
    assert converted.layout == "diffusers" and any(k.endswith("lora_A.weight") for k in converted.tensors)
    assert converted.metadata["ss_training_comment"] == "my character, 12 images"
    for key in ("ss_network_args", "lorakit_preset"):  # LoCon's conv_dim, the preset: settings, kept
        assert converted.metadata[key] == read_adapter(source).metadata[key] and converted.metadata[key]
    assert_same_outputs(base, source, peft)
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(peft), "--to", "kohya", "--out", str(back)]) == 0
    again = read_adapter(back)
    assert again.layout == "kohya" and set(again.modules()) == set(read_adapter(source).modules())
    assert again.metadata["ss_network_module"] == "networks.lora"
    assert_same_outputs(base, source, back)


def test_dora_with_output_row_norms_converts_and_loha_is_refused_naming_the_way(base, tmp_path, capsys):
    dora = _random_adapter(base, tmp_path / "dora.safetensors", preset="attn-mlp", dora=True, wd_on_out=True)
    assert main(["convert", str(dora), "--to", "diffusers", "--out", str(tmp_path / "dora-peft.safetensors")]) == 0
    assert_same_outputs(base, dora, tmp_path / "dora-peft.safetensors")
    loha = _random_adapter(base, tmp_path / "loha.safetensors", algorithm="loha", preset="attn-mlp")
    out = tmp_path / "loha-peft.safetensors"
    assert main(["convert", str(loha), "--to", "diffusers", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "plain LoRA/LoCon modules only" in err and "lorakit resize --to lora" in err
    assert f"error: {loha}: the diffusers/PEFT layout" in err  # the file that holds them, not the one not written
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_a_lycoris_prefixed_fp16_file_comes_out_with_canonical_names_still_fp16(base, tmp_path, capsys):
    source = _random_adapter(base, tmp_path / "a.safetensors", preset="attn-mlp")
    wrapped = {k.replace("lora_unet_", "lycoris_", 1): v.half() for k, v in read_adapter(source).tensors.items()}
    save_file(wrapped, str(tmp_path / "wrapped.safetensors"))
    out = tmp_path / "canonical.safetensors"
    assert main(["convert", str(tmp_path / "wrapped.safetensors"), "--to", "kohya", "--out", str(out)]) == 0
    assert "names made canonical" in capsys.readouterr().out
    converted = read_adapter(out)
    assert set(converted.modules()) == set(read_adapter(source).modules())
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert_same_outputs(base, tmp_path / "wrapped.safetensors", out)


def test_a_file_for_another_model_or_an_existing_output_is_refused(base, tmp_path, capsys):
    from conftest import build_tiny_unet

    from lorakit.formats import save_network
    from lorakit.network import UniformRanks, create_network

    network = create_network(build_tiny_unet(), preset="kohya", ranks=UniformRanks(2, 1.0))  # width 32, not 128
    other = save_network(network, tmp_path / "other.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(other), "--to", "diffusers", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other.safetensors: does not fit the model" in err and "no --model was given" in err
    assert not out.exists()
    source = _random_adapter(base, tmp_path / "mine.safetensors", preset="attn-mlp")
    out.write_bytes(b"mine")
    assert main(["convert", str(source), "--to", "kohya", "--out", str(out)]) == 2
    assert "exists; choose another path or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert main(["convert", str(source), "--to", "kohya", "--out", str(source)]) == 2
    assert "this is an input" in capsys.readouterr().err
    assert main(["convert", str(source), "--to", "kohya", "--out", str(out), "--overwrite"]) == 0
    assert_same_outputs(base, source, out)


def test_a_file_already_in_the_asked_layout_is_said_to_be_a_copy_or_its_dtype_change(base, tmp_path, capsys):
    source = _random_adapter(base, tmp_path / "a.safetensors", preset="attn-mlp")
    copy = tmp_path / "copy.safetensors"
    assert main(["convert", str(source), "--to", "kohya", "--out", str(copy)]) == 0
    said = capsys.readouterr().out
    assert f"{source} is already in the kohya layout with canonical names" in said and "nothing to convert" in said
    assert read_adapter(copy).tensors.keys() == read_adapter(source).tensors.keys()
    half = tmp_path / "half.safetensors"
    assert main(["convert", str(source), "--to", "kohya", "--out", str(half), "--dtype", "fp16"]) == 0
    said = capsys.readouterr().out
    assert "tensors fp32 -> fp16" in said and "nothing to convert" not in said
    peft = tmp_path / "peft.safetensors"
    assert main(["convert", str(source), "--to", "diffusers", "--out", str(peft), "--dtype", "bf16"]) == 0
    assert "(diffusers layout)" in (said := capsys.readouterr().out) and "; tensors fp32 -> bf16" in said
