"""`lorakit inspect FILE` through `main`, on lorakit, LyCORIS and broken files."""

from __future__ import annotations

import re

import pytest
import torch
from model_helpers import build_tiny_text_encoder, build_tiny_unet, randomize
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.formats import read_adapter, save_network, training_metadata
from lorakit.models import builtin_model_path, load_base_model
from lorakit.network import UniformRanks, create_network


def _inspect(capsys, path) -> tuple[int, str, str]:
    code = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_lorakit_locon(tmp_path, capsys):
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    network = create_network(unet, te, preset="full", ranks=UniformRanks(4, 2.0, conv_rank=2, conv_alpha=1.0))
    randomize(network)
    n_conv = sum(1 for a in network.adapters.values() if a.kind == "conv" and a.kernel_size != (1, 1))
    path = save_network(network, tmp_path / "style.safetensors",
                        {**training_metadata(learning_rate=1e-4), "lorakit_turning_point_epoch": 7},
                        dtype=torch.float16)
    code, out, err = _inspect(capsys, path)
    assert code == 0 and err == ""
    n_unet = len(network.names("unet"))
    assert "algorithm:   lora ×" in out
    assert f"modules:     text encoder 12, U-Net {n_unet} ({n_unet + 12} in all)" in out
    assert f"ranks:       4 ×{n_unet + 12 - n_conv}, 2 ×{n_conv}" in out
    assert f"alphas:      2 ×{n_unet + 12 - n_conv}, 1 ×{n_conv}" in out
    assert "dtype:       float16 ×" in out
    assert "base model:  sd_v1 (metadata)" in out
    assert "blocks:      IN01 15, IN02 15, IN03 1, IN04 16," in out and "OUT11 16" in out
    for line in ("  ss_network_module: networks.lora", "  ss_network_dim: 4", "  ss_learning_rate: 0.0001",
                 '  ss_network_args: {"conv_dim": "2", "conv_alpha": "1"}', "  lorakit_preset: full",
                 "  lorakit_turning_point_epoch: 7"):
        assert line in out
    assert "sshs_model_hash" not in out  # only ss_* and lorakit_* are listed
    last = out.strip().splitlines()[-1]
    assert last.startswith("summary: style.safetensors: LoRA adapter for sd_v1, ")
    assert "ranks 2-4" in last and "It touches U-Net blocks IN01-OUT11." in last


def test_inspect_unet_only_blocks(tmp_path, capsys):
    from lorakit.blocks import paper_block_ranks

    network = create_network(build_tiny_unet(), preset="kohya", ranks=paper_block_ranks("upper", 8, 8.0))
    path = save_network(network, tmp_path / "upper.safetensors")
    code, out, _ = _inspect(capsys, path)
    assert code == 0
    assert "blocks:      IN01 12, IN02 12, OUT09 12, OUT10 12, OUT11 12\n" in out
    assert "ranks:       8 ×60" in out and "alphas:      8 ×60" in out
    assert "U-Net blocks IN01-IN02, OUT09-OUT11. It leaves the text encoder alone." in out


def test_inspect_lycoris_loha_without_metadata(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    prefix = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{prefix}.hada_w1_a": torch.randn(32, 4, generator=g), f"{prefix}.hada_w1_b": torch.randn(4, 32),
               f"{prefix}.hada_w2_a": torch.randn(32, 4), f"{prefix}.hada_w2_b": torch.randn(4, 32),
               f"{prefix}.alpha": torch.tensor(1.0)}
    path = tmp_path / "loha.safetensors"
    save_file(tensors, path)
    code, out, _ = _inspect(capsys, path)
    assert code == 0
    assert "algorithm:   loha ×1" in out and "ranks:       4 ×1" in out and "alphas:      1 ×1" in out
    assert "blocks:      IN01 1" in out and "metadata:    0 ss_*/lorakit_*/modelspec.* entries" in out
    assert "base model:  unknown" in out


def test_inspect_gives_no_alpha_to_modules_without_a_rank(tmp_path, capsys):
    """(IA)³ and full modules have no rank for an alpha to scale: not "none (= rank)"."""
    g = torch.Generator().manual_seed(0)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    tensors = {f"{prefix}_to_k.weight": torch.randn(32, generator=g), f"{prefix}_to_v.weight": torch.randn(32),
               f"{prefix}_to_k.on_input": torch.tensor(0), f"{prefix}_to_v.on_input": torch.tensor(0),
               f"{prefix}_to_q.lora_down.weight": torch.randn(4, 32),
               f"{prefix}_to_q.lora_up.weight": torch.randn(32, 4)}
    save_file(tensors, tmp_path / "mixed.safetensors")
    code, out, _ = _inspect(capsys, tmp_path / "mixed.safetensors")
    assert code == 0 and "alphas:      none (no rank) ×2, none (= rank) ×1" in out
    ia3 = {k: v for k, v in tensors.items() if "_to_q." not in k}
    save_file(ia3, tmp_path / "ia3.safetensors")
    code, out, _ = _inspect(capsys, tmp_path / "ia3.safetensors")
    assert code == 0 and "(IA)³ adapter" in out and "2 modules (U-Net 2), no rank, int64/float32," in out


def test_inspect_bad_files(tmp_path, capsys):
    pt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, pt)
    code, out, err = _inspect(capsys, pt)
    assert code == 2 and out == ""
    assert err.startswith(f"lorakit inspect: error: {pt}: a PyTorch zip checkpoint")
    code, _, err = _inspect(capsys, tmp_path / "missing.safetensors")
    assert code == 2 and "missing.safetensors: no such file" in err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_inspect_says_what_a_non_adapter_is(tmp_path, capsys):
    """One model component or a folder is named as such, and the exit is 2; a whole model checkpoint is described,
    even one lorakit does not load (its family from its key names)."""
    g = torch.Generator().manual_seed(0)
    files = {
        "model.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
                               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(8),
                               "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g)},
                              "a full SD1.x model checkpoint (U-Net, text encoder, VAE), not an adapter"),
        "sd2.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
                             "cond_stage_model.model.ln_final.weight": torch.ones(8)},
                            "a full SD2.x model checkpoint (U-Net, text encoder), not an adapter; use it as --model"),
        "sdxl.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
                              "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(8)},
                             "a full SDXL model checkpoint (U-Net, text encoders), not an adapter; use it as "
                             "--model"),
        "unet.safetensors": ({k: v.contiguous() for k, v in build_tiny_unet().state_dict().items()},
                             "the weights of a diffusers U-Net (one model component), not an adapter"),
    }
    for name, (tensors, what) in files.items():
        save_file(tensors, tmp_path / name)
        code, out, err = _inspect(capsys, tmp_path / name)
        if name != "unet.safetensors":
            family = what.split()[2]  # "a full SD2.x model ..."
            assert code == 0 and f"a whole {family} model lorakit does not load: " in out
            continue
        assert code == 2 and out == "" and err == f"lorakit inspect: error: {tmp_path / name}: {what}\n", err
    code, _, err = _inspect(capsys, tmp_path)
    assert code == 2 and f"{tmp_path}: is a folder, not a file" in err


def test_inspect_describes_an_embedding(tmp_path, capsys):
    """An embedding is no adapter, but inspect says what it holds: vectors, their lengths, the base model their
    width belongs to, and how each client's prompt calls it."""
    vectors = torch.zeros(2, 768)
    vectors[0, 0], vectors[1, :2] = 0.5, torch.tensor([3.0, 4.0])
    save_file({"clip_l": vectors}, tmp_path / "my_style.safetensors", metadata={"modelspec.title": "My style"})
    code, out, err = _inspect(capsys, tmp_path / "my_style.safetensors")
    assert code == 0 and err == ""
    assert "tensors:     clip_l 2×768 float32" in out and "vectors:     2 per prompt token" in out
    assert "base model:  SD1.x" in out and "lengths:     clip_l 0.5, 5" in out
    assert "A1111: my_style; ComfyUI: embedding:my_style; lorakit: my_style" in out
    assert "  modelspec.title: My style" in out and out.rstrip().endswith("or my_style (lorakit).")
    save_file({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, tmp_path / "xl.safetensors",
              metadata={"lorakit_ti_token": "zkz"})
    code, out, _ = _inspect(capsys, tmp_path / "xl.safetensors")
    assert code == 0 and "base model:  SDXL" in out and "lorakit: zkz" in out
    save_file({"clip_l": torch.ones(1, 32)}, tmp_path / "small.safetensors",
              metadata={"ss_base_model_version": "sd_v2"})  # a tiny model's width: the metadata says what it is for
    code, out, _ = _inspect(capsys, tmp_path / "small.safetensors")
    assert code == 0 and "base model:  sd_v2 (metadata)" in out
    save_file({"clip_l": torch.ones(1, 32)}, tmp_path / "bare.safetensors")
    code, out, _ = _inspect(capsys, tmp_path / "bare.safetensors")
    assert code == 0 and "base model:  unknown (the width is no known encoder's" in out


@pytest.mark.parametrize("command", [["sample", "--prompt", "x", "--out", "{out}"], ["merge", "--out", "{out}.st"],
                                     ["resize", "--rank", "2", "--out", "{out}.safetensors"]])
def test_every_command_says_a_model_checkpoint_given_as_an_adapter_is_one(tmp_path, capsys, command):
    """sample, merge and resize, given a model checkpoint where an adapter belongs, say what it is in one line,
    read from the header (they listed every key of the checkpoint, tens of kilobytes, as 'unsupported modules').
    (eval judges a whole model as a checkpoint of its own: tests/test_cli_eval.py.)"""
    g = torch.Generator().manual_seed(0)
    model = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
               "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g)}, model)
    name, *options = command
    argv = [name, str(model), *(o.format(out=tmp_path / "out") for o in options)]
    assert main(argv) == 2
    err = capsys.readouterr().err  # its last line: in this process the libraries' own output is not silenced
    said = f"{model}: a whole model, not an adapter; use it as --model, or blend it into the base with a share: " \
        f"{model}:0.5" if name == "merge" else \
        f"{model}: a full Stable Diffusion model checkpoint (U-Net, VAE), not an adapter; use it as --model"
    assert err.splitlines()[-1] == f"lorakit {name}: error: {said}", err


@pytest.mark.parametrize("command", [["sample", "--prompt", "x", "--out", "{out}"], ["interrogate"],
                                     ["merge", "--out", "{out}.safetensors"],
                                     ["resize", "--rank", "2", "--out", "{out}.safetensors"],
                                     ["convert", "--to", "kohya", "--out", "{out}.safetensors"]])
def test_an_adapter_holding_nan_is_refused_by_every_command_and_shown_by_inspect(tmp_path, capsys, command):
    """A LoRA whose training diverged (or that overflowed fp16 on save) drew black images and merged its NaN into a
    model without a word; every command refuses it now, and inspect says which tensors are broken."""
    model = load_base_model(builtin_model_path())
    network = create_network(model.unet, preset="attn-mlp", ranks=UniformRanks(2, 1.0))
    good = save_network(network, tmp_path / "good.safetensors")
    tensors = read_adapter(good).tensors
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[3]
    tensors[key][0, 0] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken)
    name, *options = command
    assert main([name, str(broken), *(o.format(out=tmp_path / "out") for o in options)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"lorakit {name}: error: {broken}: 1 of {len(tensors)} tensors hold NaN or infinite values "
                          f"(e.g. {key}): the file is broken"), err
    assert not list(tmp_path.glob("out*"))
    if name == "sample":  # once is enough: inspect reads it, and says so first
        assert main(["inspect", str(broken)]) == 0
        said = capsys.readouterr().out
        assert f"BROKEN:      1 tensor(s) hold NaN or infinite values: {key}; the other commands refuse" in said
        assert said.rstrip().endswith("It is broken: 1 tensor(s) hold NaN or infinite values.")
        assert main(["inspect", str(good)]) == 0 and "BROKEN" not in capsys.readouterr().out


@pytest.mark.parametrize("command", [["inspect"], ["sample", "--prompt", "x", "--out", "{out}"],
                                     ["merge", "--out", "{out}.safetensors"], ["interrogate"],
                                     ["resize", "--rank", "2", "--out", "{out}.safetensors"],
                                     ["convert", "--to", "kohya", "--out", "{out}.safetensors"]])
def test_a_pickle_or_a_cut_file_given_as_an_adapter_is_named_by_every_command(tmp_path, capsys, command):
    """`lorakit sample model.pt` was a SafetensorError traceback; every command names the file and what it is."""
    import zipfile

    pickle = tmp_path / "model.pt"
    with zipfile.ZipFile(pickle, "w") as z:  # what torch.save writes: a zip with a pickle inside (never unpickled)
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    cut = tmp_path / "cut.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, cut)
    cut.write_bytes(cut.read_bytes()[:20])  # a download cut short
    name, *options = command
    for given, said in ((pickle, "a PyTorch zip checkpoint (pickle inside) (.pt/.ckpt/.bin), not safetensors"),
                        (cut, "not a safetensors file, or a truncated or corrupt one")):
        assert main([name, str(given), *(o.format(out=tmp_path / "out") for o in options)]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"lorakit {name}: error: {given}: {said}"), err
        assert "Traceback" not in err and not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("command", [["inspect"], ["sample", "--prompt", "x", "--out", "{out}"],
                                     ["merge", "--out", "{out}.st"],
                                     ["resize", "--rank", "2", "--out", "{out}.safetensors"]])
def test_a_run_folder_given_as_an_adapter_names_the_file_to_give(tmp_path, capsys, command):
    """`lorakit sample runs/mychar ...`: the run folder is not an adapter; the error names its result file (resize
    said "no such file" for it)."""
    run = tmp_path / "mychar"
    run.mkdir()
    (run / "config.toml").write_text("[network]\n")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, run / "lorakit.safetensors")
    name, *options = command
    assert main([name, str(run), *(o.format(out=tmp_path / "out") for o in options)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"lorakit {name}: error: {run}: is a folder, not a file; give one adapter "
                                    f".safetensors file (a lorakit run: its result is {run / 'lorakit.safetensors'})")
    # a folder of adapters, not a run: the files in it
    (run / "config.toml").unlink()
    for n in range(5):
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, run / f"style{n}.safetensors")
    assert main([name, str(run), *(o.format(out=tmp_path / "out") for o in options)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "give one adapter .safetensors file (it holds lorakit.safetensors, style0.safetensors, style1.safetensors, "
        "style2.safetensors and 2 more)")


@pytest.mark.parametrize("command", [["sample", "--prompt", "x", "--out", "{out}"], ["merge", "--out", "{out}"],
                                     ["resize", "--rank", "2", "--out", "{out}.safetensors"]])
def test_a_diffusers_model_folder_given_as_an_adapter_is_said_to_go_to_model(tmp_path, capsys, command):
    """`lorakit merge MODEL lora.safetensors --out merged` (kohya's merge script takes the model first): the
    folder is named as a model, and the flag it belongs to with it."""
    model = tmp_path / "sd15"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    name, *options = command
    assert main([name, str(model), *(o.format(out=tmp_path / "out") for o in options)]) == 2
    err = capsys.readouterr().err
    said = f"{model}: a whole model, not an adapter; use it as --model, or blend it into the base with a share: " \
        f"{model}:0.5" if name == "merge" else f"{model}: a diffusers model folder, not an adapter; use it as --model"
    assert err.splitlines()[-1] == f"lorakit {name}: error: {said}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.st").exists()


def test_a_module_of_an_unknown_algorithm_lists_a_few_of_its_keys(tmp_path):
    from lorakit.formats import AdapterFile, AdapterFileError, load_network

    unet = build_tiny_unet()
    name = "lora_unet_" + next(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)).replace(".", "_")
    tensors = {f"{name}.mystery_{i}": torch.zeros(2) for i in range(40)}
    with pytest.raises(AdapterFileError) as info:
        load_network(AdapterFile(tensors), unet)
    message = str(info.value)
    assert "algorithm 'unknown' (keys mystery_0, mystery_1, mystery_10, mystery_11 and 36 more)" in message
    assert len(message) < 600


def test_inspect_describes_a_whole_model_and_says_where_it_goes(tmp_path, capsys):
    """A diffusers folder and its single file: the same parts and parameters, what it is, and where it goes
    instead of 'not an adapter'; a model lorakit does not load is still described, with why."""
    from lorakit.models import builtin_model_path, load_base_model, save_single_file_checkpoint

    folder = builtin_model_path()
    assert main(["inspect", str(folder)]) == 0
    from_folder = capsys.readouterr().out
    assert "a whole SD1.x model (64×64, predicts epsilon), not an adapter: give it as --model" in from_folder
    single = save_single_file_checkpoint(load_base_model(None), tmp_path / "model.safetensors")
    assert main(["inspect", str(single)]) == 0
    from_file = capsys.readouterr().out
    parameters = [line for line in from_folder.splitlines() if line.startswith("parameters:")][0]
    totals = [re.search(r"\(([\d,]+) in all\)", text).group(1) for text in (from_folder, from_file)]
    assert totals[0] == totals[1] and "U-Net" in parameters and "VAE" in parameters
    odd = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, odd)
    assert main(["inspect", str(odd)]) == 0
    assert "a whole Stable Diffusion model lorakit does not load: the checkpoint has no VAE" in \
        capsys.readouterr().out
