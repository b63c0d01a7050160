"""SDXL, on a tiny model of SDXL's kinds built here (model_helpers.build_tiny_sdxl_components): two text encoders,
the conditioning kohya trains with and diffusers samples with, kohya's SDXL module names, files that diffusers' SDXL
pipeline loads as lorakit applies them, single files in SDXL's layout, and every method trained on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import make_config, write_dataset

from lorakit import blocks, ldm
from lorakit.conditioning import encode_conditioning
from lorakit.config import ConfigError
from lorakit.embeddings import EmbeddingError, add_embedding
from lorakit.errors import InvalidValueError
from lorakit.formats import load_network, save_network
from lorakit.methods import make_method
from lorakit.models import check_clip_skip, describe_base_model, load_base_model
from lorakit.network import UniformRanks, create_network

ROOT = Path(__file__).resolve().parents[1]
TWO = ["a zkz star", "a red circle at the top left"]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_base_model(tiny_sdxl_dir)


def _pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)


def _unet_out(unet, text, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 20])
    with torch.no_grad():
        return unet(x, t, text.states, **text.unet_kwargs(64, 64, torch.float32)).sample


def test_an_sdxl_folder_loads_with_both_encoders(sdxl, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    assert sdxl.is_sdxl and sdxl.version == "sdxl" and len(sdxl.text_encoders) == 2
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.tokenizer.pad_token != "!"
    assert describe_base_model(tiny_sdxl_dir).family == "SDXL"
    assert isinstance(sdxl.pipeline(), StableDiffusionXLPipeline)
    assert all(m.device.type == "cpu" for m in sdxl.networks) and len(sdxl.networks) == 4


def test_conditioning_is_what_diffusers_sdxl_pipeline_encodes(sdxl, tiny_sdxl_dir):
    prompts = ["a zkz star at the top left", "a red circle"]
    ours = encode_conditioning(sdxl, prompts)
    states, _, pooled, _ = _pipeline(tiny_sdxl_dir).encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=False)
    width = sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert ours.states.shape == (2, 77, width) and ours.pooled.shape == (2, 48)
    torch.testing.assert_close(ours.states, states, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    # the size conditioning diffusers gives a 64x64 image without crop: (h, w, 0, 0, h, w)
    ids = ours.unet_kwargs(64, 48, torch.float32)["added_cond_kwargs"]["time_ids"]
    assert ids.tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    # a training batch's own, per image
    sizes = [(100, 150, 0, 3, 64, 48), (48, 64, 2, 0, 64, 48)]
    assert ours.unet_kwargs(64, 48, torch.float32, sizes)["added_cond_kwargs"]["time_ids"].tolist() == \
        [list(s) for s in sizes]


def test_long_and_weighted_prompts_on_sdxl(sdxl):
    short = encode_conditioning(sdxl, ["a zkz star"])
    long = encode_conditioning(sdxl, ["a zkz star"], max_token_length=150)
    assert long.states.shape[1] == 152
    torch.testing.assert_close(long.pooled, short.pooled)  # pooled from the first chunk, as kohya does
    plain = encode_conditioning(sdxl, ["a (zkz:1.5) star"])
    weighted = encode_conditioning(sdxl, ["a (zkz:1.5) star"], weighted=True)
    assert not torch.allclose(plain.states, weighted.states)
    torch.testing.assert_close(weighted.pooled, short.pooled)  # the words are the same; the weights scale states


def test_cached_text_encoder_outputs_are_the_batchs_own_on_sdxl(sdxl):
    """kohya's --cache_text_encoder_outputs, as SDXL users run it: states and pooled output of each caption, cached
    alone and stacked, are the batch's own; a weighted caption keeps its weights beside a plain one."""
    from lorakit.conditioning import ConditioningCache
    from lorakit.config import TrainConfig
    from lorakit.step_loss import encode_captions

    cfg = TrainConfig()
    cfg.data.weighted_captions = True
    captions = ["a zkz star", "a (zkz:1.5) star", "a zkz star"]
    cache = ConditioningCache()
    cached = encode_captions(cfg, sdxl, None, captions, torch.device("cpu"), cache)
    assert len(cache) == 2 and cached.pooled.shape == (3, 48)
    for row, caption in enumerate(captions):
        alone = encode_captions(cfg, sdxl, None, [caption], torch.device("cpu"))
        torch.testing.assert_close(cached.states[row:row + 1], alone.states, rtol=0, atol=0)
        torch.testing.assert_close(cached.pooled[row:row + 1], alone.pooled, rtol=0, atol=0)
    together = encode_captions(cfg, sdxl, None, captions, torch.device("cpu"))
    torch.testing.assert_close(cached.states, together.states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.pooled, together.pooled, rtol=1e-5, atol=1e-5)


def test_adapter_names_are_kohyas_sdxl_names(sdxl):
    network = create_network(sdxl.unet, sdxl.text_encoders, preset="lycoris-full", algorithm="locon",
                             ranks=UniformRanks(2, 1, 2, 1))
    try:
        unet = [n.removeprefix("lora_unet_") for n in network.names("unet")]
        original = {k.removeprefix(ldm.UNET_PREFIX).rsplit(".", 1)[0].replace(".", "_")
                    for k in ldm.unet_to_ldm(sdxl.unet.state_dict(), sdxl.unet.config)}
        # every module named after a module of the original U-Net, as A1111 and ComfyUI map SDXL LoRAs
        assert unet and set(unet) <= original
        assert {"input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks_1_0_in_layers_2",
                "input_blocks_3_0_op", "middle_block_1_proj_in", "output_blocks_2_2_conv",
                "input_blocks_4_0_skip_connection", "time_embed_0"} <= set(unet)
        # ... and each lies in one of SDXL's 19 blocks (what block weights and inspect count)
        assert all(blocks.SDXL.block_name(f"lora_unet_{n}") for n in unet if not n.startswith(("time_embed", "out_")))
        assert {n.split("_text_model_")[0] for n in network.names() if "text_model" in n} == {"lora_te1", "lora_te2"}
    finally:
        network.remove()


def _randomised_file(network, path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in network.names():
            network[name].lora_up.weight.copy_(torch.randn(network[name].lora_up.weight.shape, generator=g) * 0.05)
    save_network(network, path, base_model_version="sdxl_base_v1-0")
    return path


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_sdxl_pipeline_loads_the_file_as_lorakit_applies_it(tmp_path, tiny_sdxl_dir, layout):
    model = load_base_model(tiny_sdxl_dir)
    network = create_network(model.unet, model.text_encoders, preset="full", algorithm="lora",
                             ranks=UniformRanks(2, 1))
    path = _randomised_file(network, tmp_path / "a.safetensors")
    if layout == "diffusers":
        network_file = tmp_path / "d.safetensors"
        save_network(network, network_file, base_model_version="sdxl_base_v1-0", format="diffusers")
        path = network_file
    count = len(network)
    network.remove()
    base_text = encode_conditioning(model, TWO)
    base = _unet_out(model.unet, base_text)
    loaded, report = load_network(path, model.unet, model.text_encoders)
    assert not report.unmatched and len(loaded) == count
    ours_text = encode_conditioning(model, TWO)
    ours = _unet_out(model.unet, ours_text)
    assert (ours - base).abs().max() > 1e-3 and (ours_text.states - base_text.states).abs().max() > 1e-3

    pipe = _pipeline(tiny_sdxl_dir)
    pipe.load_lora_weights(str(path))
    states, _, pooled, _ = pipe.encode_prompt(TWO, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    torch.testing.assert_close(states, ours_text.states, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, ours_text.pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(_unet_out(pipe.unet, ours_text), ours, rtol=0, atol=1e-5)


def test_sdxl_refuses_what_it_does_not_train_yet(sdxl, tmp_path):
    for sections, words in (({"network": {"blocks": "upper,OUT3"}}, "network.blocks: unknown blocks 'OUT3'"),
                            ({"network": {"block_dims": [4] * 25}}, "network: block_dims needs 19 values"),
                            ({"network": {"down_lr_weight": ",".join(["1"] * 12)}},
                             r"network: down_lr_weight: 12 values, at most 9"),
                            ({"model": {"clip_skip": 2}}, "model.clip_skip: clip skip 2: SDXL")):
        cfg = make_config(Path("unused"), Path("unused"), tmp_path / "out", **sections)
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            make_method(cfg, sdxl)
    with pytest.raises(InvalidValueError, match="no clip skip"):
        check_clip_skip(sdxl, 2)
    # an SD1.x/2.x embedding (one encoder's vectors) is not SDXL's pair
    with pytest.raises(EmbeddingError, match=r"e\.safetensors: an embedding for one text encoder, .* has 2"):
        add_embedding(sdxl, torch.zeros(1, 128), "zkz", "e.safetensors")
    assert len(sdxl.tokenizer) == len(sdxl.tokenizer_2)  # nothing was added on the way


def test_train_an_sdxl_lora_as_a_user_does(tmp_path, tiny_sdxl_dir):
    """`lorakit train` in a subprocess: U-Net and both text encoders, samples drawn with the SDXL pipeline."""
    data = write_dataset(tmp_path / "data", n=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --s 2\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", str(tiny_sdxl_dir), "--data",
                           str(data), "--out", str(out), "--epochs", "2", "--rank", "2", "--resolution", "64",
                           "--sample-prompts", str(prompts), "--early-stop", "off", "--no-progress",
                           "--set", "network.train_text_encoder=true"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = out / "lorakit.safetensors"
    tensors = load_file(result)
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert {n.split("_text_model_")[0] for n in names if "text_model" in n} == {"lora_te1", "lora_te2"}
    metadata = safe_open(str(result), "pt").metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sorted(p.name for p in (out / "samples").rglob("*.png"))  # drawn at the epochs' ends
    # the trained file loads back into the model whole
    model = load_base_model(tiny_sdxl_dir)
    network, report = load_network(result, model.unet, model.text_encoders)
    assert len(network) == len(names) and not report.unmatched and not report.skipped


def test_extract_from_two_sdxl_models_names_both_encoders(tmp_path, tiny_sdxl_dir):
    from lorakit.tools.extract import extract_adapter
    from lorakit.tools.lowrank import RankRule

    base, tuned = load_base_model(tiny_sdxl_dir), load_base_model(tiny_sdxl_dir)
    g = torch.Generator().manual_seed(3)
    changed = (tuned.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k,
               tuned.text_encoder_2.text_model.encoder.layers[1].mlp.fc1)
    with torch.no_grad():
        for layer in changed:
            layer.weight += torch.randn(layer.weight.shape, generator=g) * 0.1
    result = extract_adapter(tuned, base, RankRule(2), preset="full")
    assert sorted(r.name for r in result.reports) == [
        "lora_te2_text_model_encoder_layers_1_mlp_fc1", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]



# ---- single files ---------------------------------------------------------------------------------------------
def test_an_sdxl_single_file_round_trips_exactly_and_diffusers_reads_it(tmp_path, sdxl, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    from lorakit.models import read_checkpoint, save_single_file_checkpoint

    path = save_single_file_checkpoint(sdxl, tmp_path / "xl.safetensors")
    tensors, _ = read_checkpoint(path)
    assert ldm.text_encoder_layout(tensors) == "sdxl"
    assert tensors[ldm.SDXL_OPEN_CLIP_PREFIX + "text_projection"].shape == (64, 48)  # OpenCLIP's (width, proj)
    # a logit scale the file brings is carried through and written back as it came
    tensors[ldm.SDXL_OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(3.25)
    save_file(tensors, str(path))
    again = load_base_model(path, config=tiny_sdxl_dir)
    assert again.is_sdxl
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_dir), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for other in (again, pipe):
            theirs = getattr(other, name).state_dict()
            for key, tensor in getattr(sdxl, name).state_dict().items():
                assert torch.equal(theirs[key], tensor), (name, key)
    written = save_single_file_checkpoint(again, tmp_path / "again.safetensors")
    assert float(load_file(written)[ldm.SDXL_OPEN_CLIP_PREFIX + "logit_scale"]) == 3.25


def test_full_size_sdxl_names_are_sdxl_base_files_names():
    """SDXL 1.0 base's configs on the meta device, written under original names: the tensor counts of
    sd_xl_base_1.0.safetensors (U-Net 1680, VAE 248, CLIP-L 197, OpenCLIP-bigG 390) and diffusers' detection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorakit.models import SDXL_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIG / "vae"))
        first = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder"))
        second = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_CONFIG / "text_encoder_2"))
    names = {**ldm.unet_to_ldm(unet.state_dict(), unet.config), **ldm.vae_to_ldm(vae.state_dict(), vae.config),
             **ldm.sdxl_text_encoders_to_ldm(first.state_dict(), second.state_dict())}
    counts = [sum(k.startswith(p) for k in names) for p in (ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.SDXL_CLIP_PREFIX,
                                                            ldm.SDXL_OPEN_CLIP_PREFIX)]
    assert counts == [1680, 248, 197, 390] and len(names) == 2515
    assert infer_diffusers_model_type(names) == "xl_base"


def test_an_sdxl_file_is_told_by_its_shapes(tmp_path):
    half = torch.float16
    path = tmp_path / "someones_xl_model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3, dtype=half),
               "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
                   torch.zeros(640, 2048, dtype=half),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3, dtype=half),
               ldm.SDXL_CLIP_PREFIX + "text_model.final_layer_norm.weight": torch.zeros(768, dtype=half),
               ldm.SDXL_OPEN_CLIP_PREFIX + "positional_embedding": torch.zeros(77, 1280, dtype=half)}, str(path))
    described = describe_base_model(path)
    assert (described.family, described.resolution) == ("SDXL", 1024)


def test_merge_an_sdxl_lora_into_a_single_file(tmp_path, tiny_sdxl_dir):
    from lorakit.tools.merge import bake, save_model

    model = load_base_model(tiny_sdxl_dir)
    network = create_network(model.unet, model.text_encoders, preset="full", algorithm="lora",
                             ranks=UniformRanks(2, 1))
    adapter = _randomised_file(network, tmp_path / "xl_lora.safetensors")
    expected_text = encode_conditioning(model, TWO)
    expected = _unet_out(model.unet, expected_text)
    network.remove()
    out = tmp_path / "merged.safetensors"
    bake(model, [f"{adapter}:1"])  # what `lorakit merge ADAPTER --model M --out X.safetensors` does
    save_model(model, out, [adapter])
    merged = load_base_model(out, config=tiny_sdxl_dir)
    text = encode_conditioning(merged, TWO)
    torch.testing.assert_close(text.states, expected_text.states, rtol=0, atol=1e-5)
    torch.testing.assert_close(_unet_out(merged.unet, text), expected, rtol=0, atol=1e-4)


def test_block_weights_merged_into_an_sdxl_model_are_read_on_sdxl_blocks(tmp_path, tiny_sdxl_dir):
    from lorakit.tools.merge import bake

    model = load_base_model(tiny_sdxl_dir)
    network = create_network(model.unet, None, preset="kohya", ranks=UniformRanks(2, 1))
    path = _randomised_file(network, tmp_path / "a.safetensors")
    network.remove()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    # the extension's 12-value SDXL shorthand: BASE, IN04, IN05, IN07, IN08, MID, OUT00-OUT05; IN04 and IN05 off
    lines = bake(model, [f"{path}:1:1,0,0,1,1,1,1,1,1,1,1,1"])
    after = model.unet.state_dict()
    in04 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # input_blocks.4
    in07 = "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # input_blocks.7
    assert torch.equal(after[in04], before[in04]) and not torch.equal(after[in07], before[in07])
    assert "left alone (weight 0)" in lines[0]


def test_native_fine_tuning_of_an_sdxl_unet_writes_an_sdxl_single_file(tmp_path, tiny_sdxl_dir):
    from lorakit.train import train

    cfg = make_config(tiny_sdxl_dir, write_dataset(tmp_path / "data", n=2), tmp_path / "run",
                      method={"kind": "native"}, training={"max_epochs": 1})
    result = train(cfg, progress=False)
    path = result.files[0]
    tensors = load_file(path)
    assert ldm.text_encoder_layout(tensors) == "sdxl"
    tuned, base = load_base_model(path, config=tiny_sdxl_dir), load_base_model(tiny_sdxl_dir)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(tuned.unet.state_dict()[key], base.unet.state_dict()[key])  # the U-Net trained
    for first, second in zip(tuned.text_encoders, base.text_encoders, strict=True):  # the encoders did not
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                      strict=True))


def test_block_lr_trains_each_sdxl_block_at_its_rate_and_leaves_blocks_at_0(tmp_path, tiny_sdxl_dir):
    """kohya's --block_lr (sdxl_train.py), 23 rates in kohya's order: only the blocks with a rate train, each in an
    optimizer group at its rate; a list of another length is refused naming the 23."""
    from lorakit.commands.kohya_config import config_from_kohya
    from lorakit.config import ConfigError
    from lorakit.methods import NativeMethod
    from lorakit.train import train

    rates = [0.0] * 23
    rates[5], rates[22] = 2e-3, 1e-3  # input block 4 (SDXL's first attention level), the output layers
    cfg = make_config(tiny_sdxl_dir, write_dataset(tmp_path / "data", n=2), tmp_path / "run",
                      method={"kind": "native", "native_block_lr": rates}, training={"max_epochs": 1})
    method = NativeMethod(cfg, load_base_model(tiny_sdxl_dir))
    groups = method.param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("unet_block_5", 2e-3), ("unet_block_22", 1e-3)]
    trained = {id(p) for g in groups for p in g["params"]}
    assert method._pairs and all(id(w) in trained for w, _ in method._pairs)  # CS follows the trained layers only
    tuned = load_base_model(train(cfg, progress=False).files[0], config=tiny_sdxl_dir).unet.state_dict()
    base = load_base_model(tiny_sdxl_dir).unet.state_dict()
    # input block 4 is the second level's first layer (resnet and attention); the output layers, its norm and conv
    trained = ("down_blocks.1.resnets.0.", "down_blocks.1.attentions.0.", "conv_norm_out.", "conv_out.")
    changed = [k for k in base if not torch.equal(tuned[k], base[k])]
    assert all(k.startswith(trained) for k in changed)
    assert any(k.startswith(trained[1]) for k in changed) and any(k.startswith("conv_out.") for k in changed)
    short = make_config(tiny_sdxl_dir, tmp_path / "data", tmp_path / "other",
                        method={"kind": "native", "native_block_lr": [1e-3] * 22})
    with pytest.raises(ConfigError, match="22 values, and this U-Net has 23 blocks in kohya's order"):
        NativeMethod(short, load_base_model(tiny_sdxl_dir))
    kohya = tmp_path / "sdxl_train.toml"
    kohya.write_text(f'pretrained_model_name_or_path = "{tiny_sdxl_dir}"\nblock_lr = "{",".join(map(str, rates))}"\n')
    assert config_from_kohya(kohya)[0].method.native_block_lr == rates


@pytest.mark.parametrize("kind", ["ti", "pivotal"])
def test_textual_inversion_on_sdxl_trains_an_embedding_per_encoder(tmp_path, tiny_sdxl_dir, tiny_model_dir, kind):
    """SDXL's embedding is a pair, clip_l and clip_g, as kohya's SDXL script writes it and A1111 and ComfyUI read
    it; it loads back into an SDXL model (both encoders' rows) and is refused by an SD1.x model."""
    from lorakit.embeddings import load_embedding, read_embedding
    from lorakit.train import train

    cfg = make_config(tiny_sdxl_dir, write_dataset(tmp_path / "data", n=2), tmp_path / "run",
                      method={"kind": kind, "ti_token": "zkz", "ti_vectors": 2}, training={"max_epochs": 1})
    result = train(cfg, progress=False)
    embedding = next(p for p in result.files if p.name.endswith("-zkz.safetensors"))
    tensors = load_file(embedding)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (2, 128), "clip_g": (2, 64)}
    model = load_base_model(tiny_sdxl_dir)
    before = encode_conditioning(model, ["a zkz_1 star"]).states
    loaded = load_embedding(model, embedding)
    ids = model.tokenizer.convert_tokens_to_ids(loaded.tokens)
    assert ids == model.tokenizer_2.convert_tokens_to_ids(loaded.tokens)
    for key, encoder in zip(("clip_l", "clip_g"), model.text_encoders, strict=True):
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], tensors[key])
    assert not torch.allclose(encode_conditioning(model, [loaded.expand_prompt("a zkz star")]).states, before)
    vectors, token = read_embedding(embedding)
    assert token == "zkz" and len(vectors) == 2
    with pytest.raises(EmbeddingError, match=r"an embedding for SDXL's two encoders \(clip_l, clip_g\)"):
        load_embedding(load_base_model(tiny_model_dir), embedding)


@pytest.mark.parametrize(("precision", "vae_dtype"), [("fp16", torch.float32), ("bf16", torch.bfloat16)])
def test_sdxl_vae_stays_fp32_under_fp16(tmp_path, tiny_sdxl_dir, precision, vae_dtype):
    """SDXL's VAE gives NaN latents in fp16; bf16 has fp32's range."""
    import types

    from lorakit.train import prepare_model

    cfg = make_config(tiny_sdxl_dir, Path("unused"), tmp_path / "run")
    cfg.model.mixed_precision = precision
    model = prepare_model(cfg, types.SimpleNamespace(device=torch.device("cpu")))
    assert model.vae.dtype == vae_dtype and model.unet.dtype != torch.float32


def test_native_training_of_sdxl_text_encoders_trains_what_the_conditioning_reads(tmp_path, tiny_sdxl_dir):
    """The first encoder up to its penultimate layer (no final norm), all of the second (its pooled output
    runs through everything); the epoch checkpoints name the second's parameters text_encoder_2.*, and eval's
    and merge's apply/restore put them in and back."""
    from lorakit.native_checkpoints import apply_native_checkpoint, restore
    from lorakit.train import train

    cfg = make_config(tiny_sdxl_dir, write_dataset(tmp_path / "data", n=2), tmp_path / "run",
                      method={"kind": "native", "native_text_encoder": True}, training={"max_epochs": 1})
    train(cfg, progress=False)
    checkpoint = next((tmp_path / "run" / "checkpoints").rglob("trained.safetensors"))
    names = set(load_file(checkpoint))
    base = load_base_model(tiny_sdxl_dir)
    last = base.text_encoder.config.num_hidden_layers - 1
    assert any(n.startswith("text_encoder.") and ".layers.0." in n for n in names)
    assert not any(n.startswith("text_encoder.") and (f".layers.{last}." in n or "final_layer_norm" in n)
                   for n in names)
    second = {f"text_encoder_2.{n}" for n, _ in base.text_encoder_2.named_parameters()}
    assert second <= names  # projection and final norm included
    before = {n: p.detach().clone() for n, p in base.text_encoder_2.named_parameters()}
    saved = apply_native_checkpoint(checkpoint, base.unet, base.text_encoders)
    changed = [n for n, p in base.text_encoder_2.named_parameters() if not torch.equal(p, before[n])]
    assert "text_projection.weight" in changed
    restore(saved, base.unet, base.text_encoders)
    assert all(torch.equal(p, before[n]) for n, p in base.text_encoder_2.named_parameters())


def test_each_sdxl_text_encoder_trains_at_its_own_rate_or_not_at_all(tmp_path, tiny_sdxl_dir, tiny_model_dir):
    """optimizer.text_encoder_2_lr (kohya's learning_rate_te2): the second encoder's rate; 0 leaves it as it is and
    the first trains; a model with one text encoder refuses it."""
    from lorakit.methods import NativeMethod
    from lorakit.train import train

    model = load_base_model(tiny_sdxl_dir)
    cfg = make_config(tiny_sdxl_dir, Path("unused"), tmp_path / "run", optimizer={"text_encoder_lr": 1e-5,
                      "text_encoder_2_lr": 3e-5}, method={"kind": "native", "native_text_encoder": True})
    rates = {g["name"]: g["lr"] for g in NativeMethod(cfg, model).param_groups()}
    assert rates == {"unet": cfg.optimizer.learning_rate, "text_encoder": 1e-5, "text_encoder_2": 3e-5}
    cfg = make_config(tiny_sdxl_dir, write_dataset(tmp_path / "data", n=2), tmp_path / "run",
                      optimizer={"text_encoder_2_lr": 0.0}, method={"kind": "native", "native_text_encoder": True},
                      training={"max_epochs": 1})
    train(cfg, progress=False)
    trained = load_file(next((tmp_path / "run" / "checkpoints").rglob("trained.safetensors")))
    assert not any(n.startswith("text_encoder_2.") for n in trained)  # the second stays as the base model has it
    first = {n.removeprefix("text_encoder."): t for n, t in trained.items() if n.startswith("text_encoder.")}
    base = model.text_encoder.state_dict()
    assert first and any(not torch.equal(t, base[n]) for n, t in first.items())  # the first trained
    one = make_config(tiny_model_dir, Path("unused"), tmp_path / "one", optimizer={"text_encoder_2_lr": 1e-5},
                      method={"kind": "native", "native_text_encoder": True})
    with pytest.raises(ConfigError, match="this model has one text encoder"):
        NativeMethod(one, load_base_model(tiny_model_dir))
    from lorakit.dry_run import dry_run

    one.data.train_data = str(write_dataset(tmp_path / "data1", n=1))
    with pytest.raises(ConfigError, match="this model has one text encoder"):  # said before loading anything
        dry_run(one)
    one.method.native_text_encoder = False
    with pytest.raises(ConfigError, match="optimizer.text_encoder_2_lr is the rate of SDXL's second text encoder in "
                                          "native fine-tuning"):
        one.validate()


def test_the_native_text_parameters_are_exactly_those_the_conditioning_reads(tiny_sdxl_dir, tmp_path):
    from lorakit.methods import NativeMethod

    model = load_base_model(tiny_sdxl_dir)
    cfg = make_config(tiny_sdxl_dir, Path("unused"), tmp_path / "run",
                      method={"kind": "native", "native_text_encoder": True})
    chosen = NativeMethod(cfg, model).text_params
    for encoder in model.text_encoders:
        encoder.requires_grad_(True)
    text = encode_conditioning(model, TWO)
    (text.states.square().sum() + text.pooled.square().sum()).backward()
    prefixes = ("text_encoder.", "text_encoder_2.")
    reached = {f"{prefix}{n}" for prefix, encoder in zip(prefixes, model.text_encoders, strict=True)
               for n, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(chosen) == reached


def test_size_conditioning_is_kohyas_per_image(tmp_path):
    """kohya's SDXL size ids: the image's own size, where the whole image would sit fitted inside its bucket
    (BucketManager.get_crop_ltrb; its left edge mirrored under a flip), the bucket's size."""
    from PIL import Image

    from lorakit.data import DataConfig, TrainingData
    from lorakit.data.buckets import size_condition

    assert size_condition((2000, 1000), (1024, 768)) == (1000, 2000, 128, 0, 768, 1024)
    assert size_condition((600, 1000), (768, 1024)) == (1000, 600, 0, 76, 1024, 768)
    assert size_condition((600, 1000), (768, 1024), flip=True) == (1000, 600, 0, 77, 1024, 768)
    folder = tmp_path / "1_zkz"
    folder.mkdir()
    Image.new("RGB", (150, 100), (200, 30, 30)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("zkz")
    data = TrainingData(DataConfig(train_data=str(tmp_path), resolution=64, enable_bucket=True,
                                   bucket_reso_steps=8))
    batch = data.epoch_batches(0)[0]
    bucket = data.buckets[0][0]
    assert batch.size_conditions == [size_condition((150, 100), bucket)] and batch.size_conditions[0][:2] == (100, 150)
    text = encode_conditioning(load_base_model(ROOT / "lorakit/world/base_model"), ["zkz"])
    assert text.unet_kwargs(64, 64, torch.float32, batch.size_conditions) == {}  # SD1.x has no size conditioning


def test_block_dims_on_sdxl_give_each_of_its_19_blocks_its_rank(tmp_path, tiny_sdxl_dir):
    model = load_base_model(tiny_sdxl_dir)
    dims = [0] * 19
    dims[4], dims[9], dims[10] = 2, 3, 4  # IN04, MID, OUT00
    cfg = make_config(tiny_sdxl_dir, Path("unused"), tmp_path / "run", network={"block_dims": dims})
    network = make_method(cfg, model).network
    ranks = {blocks.SDXL.block_name(n): network[n].rank for n in network.names("unet")}
    assert ranks == {"IN04": 2, "MID": 3, "OUT00": 4}


def test_the_dry_run_checks_block_dims_against_the_models_blocks(tmp_path, tiny_sdxl_dir, tiny_model_dir):
    from lorakit.dry_run import dry_run

    data = write_dataset(tmp_path / "data", n=2)
    for model, wrong, needed in ((tiny_sdxl_dir, 25, r"needs 19 values .*IN00\.\.OUT08 of sdxl"),
                                 (tiny_model_dir, 19, r"needs 25 values .*IN00\.\.OUT11 of sd1")):
        cfg = make_config(model, data, tmp_path / "run", network={"block_dims": [2] * wrong})
        with pytest.raises(ConfigError, match=needed):
            dry_run(cfg)
        assert not (tmp_path / "run").exists()
    cfg = make_config(tiny_sdxl_dir, data, tmp_path / "run", network={"block_dims": [2] * 19})
    assert "SDXL" in dry_run(cfg)


def test_an_sdxl_file_recording_a_clip_skip_samples_as_sdxl_reads_prompts(tmp_path, tiny_sdxl_dir):
    """kohya's SDXL scripts record --clip_skip 2 when given and ignore it; such a file is sampled as trained."""
    from lorakit.sample import trained_text_settings

    model = load_base_model(tiny_sdxl_dir)
    network = create_network(model.unet, None, preset="kohya", ranks=UniformRanks(2, 1))
    path = tmp_path / "kohya_xl.safetensors"
    save_network(network, path, {"ss_clip_skip": "2", "ss_max_token_length": "150"},
                 base_model_version="sdxl_base_v1-0")
    settings, said = trained_text_settings([path])
    assert settings == {"clip_skip": 1, "max_token_length": 150}
    check_clip_skip(model, settings["clip_skip"])  # no refusal


def test_what_sdxl_refuses_is_said_by_the_command_as_a_user_runs_it(tmp_path, tiny_sdxl_dir):
    """`lorakit train` in a subprocess: a clip skip on SDXL, and an SDXL refiner given as the model, are one line
    each, exit 2, before anything is written."""
    data = write_dataset(tmp_path / "data", n=2)
    refiner = tmp_path / "sd_xl_refiner.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 8),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(refiner))
    for model, extra, said in ((tiny_sdxl_dir, ["--clip-skip", "2"],
                                ("model.clip_skip: clip skip 2: SDXL (",
                                 "reads each text encoder's penultimate layer")),
                               (refiner, [], (f"{refiner}: its text conditioning (conditioner.embedders.*) is not "
                                              "SDXL base's two encoders", "an SDXL refiner"))):
        out = tmp_path / "run"
        done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--model", str(model), "--data",
                               str(data), "--out", str(out), *extra], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("lorakit train: error: ") and all(part in last for part in said), last
        assert "Traceback" not in done.stderr and not out.exists()


def test_kohyas_sdxl_block_layout_numbers_blocks_as_its_networks_do():
    """kohya's networks/lora.py on SDXL: 0 the embeddings, 1-9 the input blocks, 10-12 the middle block's parts,
    13-21 the output blocks, 22 the output layers; lorakit's diffusers names land in the same places."""
    layout = blocks.KOHYA_SDXL
    assert len(layout) == 23
    for name, index in (("time_embed_0", 0), ("label_emb_0_0", 0), ("input_blocks_0_0", 1),
                        ("input_blocks_4_1_proj_in", 5), ("input_blocks_8_0_emb_layers_1", 9),
                        ("middle_block_0_in_layers_2", 10), ("middle_block_1_proj_in", 11),
                        ("middle_block_2_out_layers_3", 12), ("output_blocks_0_1_proj_out", 13),
                        ("output_blocks_8_0_skip_connection", 21), ("out_2", 22),
                        ("down_blocks_1_attentions_0_proj_in", 5), ("mid_block_resnets_1_conv1", 12),
                        ("up_blocks_2_resnets_2_conv1", 21), ("conv_out", 22)):
        assert layout.block_index(f"lora_unet_{name}") == index, name
    assert layout.block_index("lora_te1_text_model_encoder_layers_0_mlp_fc1") is None


def test_kohyas_sdxl_block_dims_and_block_learning_rates_train_as_kohya_reads_them(sdxl, tmp_path):
    dims = [0, 0, 0, 0, 0, 4, 4, 0, 2, 2, 0, 8, 0] + [2] * 9 + [0]  # EMB, IN00-IN08, MID00-02, OUT00-08, OUT
    cfg = make_config(Path("unused"), Path("unused"), tmp_path / "out",
                      network={"preset": "attn-mlp", "block_dims": dims, "down_lr_weight": "1,1,1,1,0.5,0.5,1,1,1",
                               "mid_lr_weight": "1,0.25,1", "up_lr_weight": "zeros+2"})
    cfg.validate()
    method = make_method(cfg, sdxl)
    ranks = {name: method.network[name].rank for name in method.network.names("unet")}
    rates = {g["name"]: g["lr"] for g in method.param_groups()}
    args = dict(method.network.args)
    method.network.remove()  # the model is the module's: left as it was found
    assert ranks
    for name, rank in ranks.items():
        index = blocks.KOHYA_SDXL.block_index(name)
        assert dims[index] > 0 and rank == dims[index], name
    assert {blocks.KOHYA_SDXL.block_index(n) for n in ranks} >= {5, 11, 13}
    assert rates["unet x0.5"] == pytest.approx(cfg.optimizer.learning_rate * 0.5)
    assert rates["unet x0.25"] == pytest.approx(cfg.optimizer.learning_rate * 0.25)
    assert rates["unet x2"] == pytest.approx(cfg.optimizer.learning_rate * 2)
    assert args["mid_lr_weight"] == "1,0.25,1"
    assert args["block_dims"] == ",".join(map(str, dims))
    # a list of neither length is refused naming both layouts
    cfg.network.block_dims = [4] * 20
    with pytest.raises(ConfigError, match=r"block_dims needs 19 values .*; or 23, kohya's SDXL layout"):
        make_method(cfg, sdxl)


def test_the_block_wise_papers_groups_on_sdxl_are_its_resolution_levels(sdxl, tmp_path):
    """upper, middle, bottom: the in and out blocks of one resolution level, as on SD1.x (SDXL has three)."""
    assert blocks.SDXL.paper == {"upper": ("IN0", "OUT2"), "middle": ("IN1", "OUT1"), "bottom": ("IN2", "OUT0")}
    for group, expected in (("middle", {"IN04", "IN05", "OUT03", "OUT04", "OUT05"}),
                            ("bottom", {"IN07", "IN08", "OUT00", "OUT01", "OUT02"})):
        cfg = make_config(Path("unused"), Path("unused"), tmp_path / "out", network={"blocks": group})
        method = make_method(cfg, sdxl)
        trained = {blocks.SDXL.block_name(n) for n in method.network.names("unet")}
        method.network.remove()  # the model is the module's: left as it was found
        assert trained <= expected and trained & {e for e in expected if "IN" in e}
    # the top level has no attention layers: with an attention preset there is nothing to train, and it is said
    cfg = make_config(Path("unused"), Path("unused"), tmp_path / "out", network={"blocks": "upper"})
    with pytest.raises(ConfigError, match="selects no module"):
        make_method(cfg, sdxl)
    cfg = make_config(Path("unused"), Path("unused"), tmp_path / "out", network={"blocks": "upper", "preset": "full"})
    method = make_method(cfg, sdxl)
    names = {blocks.SDXL.block_name(n) for n in method.network.names("unet")}
    method.network.remove()
    assert names and names <= {"IN01", "IN02", "IN03", "OUT06", "OUT07", "OUT08"}


def test_native_fine_tuning_can_train_the_second_text_encoder_alone(sdxl, tmp_path):
    """kohya's learning_rate_te1 = 0 with learning_rate_te2: the first encoder stays, the second trains."""
    import copy

    from lorakit.checkpoint_names import TEXT_ENCODER_PREFIXES

    cfg = make_config(Path("unused"), Path("unused"), tmp_path / "out", method={"kind": "native",
                      "native_text_encoder": True}, optimizer={"text_encoder_lr": 0.0, "text_encoder_2_lr": 1e-5})
    cfg.validate()
    model = copy.deepcopy(sdxl)  # native fine-tuning marks the model's weights trainable
    method = make_method(cfg, model)
    assert method.text_params and all(n.startswith(TEXT_ENCODER_PREFIXES[1]) for n in method.text_params)
    param_groups = method.param_groups()
    groups = {g["name"]: g["lr"] for g in param_groups}
    assert groups["text_encoder_2"] == 1e-5 and "text_encoder" not in groups
    first = {id(p) for p in model.text_encoders[0].parameters()}
    assert not any(id(p) in first for g in param_groups for p in g["params"])  # the optimizer never sees it
    from lorakit.run_messages import what_is_trained

    assert "and the second text encoder (at 1e-05)" in what_is_trained(cfg)
    cfg.method.kind, cfg.method.native_text_encoder = "adapter", False  # an adapter's 0 means no text encoder
    with pytest.raises(ConfigError, match="optimizer.text_encoder_lr"):
        cfg.validate()


def test_interrogate_reads_an_sdxl_adapter_through_both_encoders(sdxl, tmp_path):
    from lorakit.network import Preset, TargetRule
    from lorakit.tools.interrogate import interrogate, token_states, vocabulary

    network = create_network(sdxl.unet, sdxl.text_encoders, preset=Preset("x", (TargetRule("*.attn2.to_k"),),
                                                                           (TargetRule("*.mlp.fc1"),)),
                             ranks=UniformRanks(1, 1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g))
    path = save_network(network, tmp_path / "xl.safetensors")
    count = len(network)
    network.remove()
    states = token_states(sdxl, [vocabulary(sdxl)[0][0]])
    assert states.shape[-1] == sdxl.unet.config.cross_attention_dim  # both encoders' widths, joined
    result = interrogate(sdxl, path)
    assert result.unet_modules + result.text_encoder_modules == count
    assert result.unet_modules and result.text_encoder_modules
    assert len(result.scores) == len(vocabulary(sdxl)) and result.top("unet", 1) and result.top("text_encoder", 1)
