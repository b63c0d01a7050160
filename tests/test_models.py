"""Base-model loading: diffusers folders, single-file checkpoints (both directions), refusals, SD1.5 configs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from lorakit import ldm, models
from lorakit.models import (
    SD15_CONFIG,
    ModelLoadError,
    builtin_model_path,
    detect_architecture,
    dtype_name,
    load_base_model,
    load_clip_tokenizer,
    read_checkpoint,
    resolve_dtype,
    save_single_file_checkpoint,
)


@pytest.fixture(scope="module")
def originals():
    """The components the tiny_model_dir fixture was written from (same seed)."""
    from lorakit.world.model import build_components

    return build_components(0)


@pytest.fixture
def tiny(tiny_model_dir):
    return load_base_model(tiny_model_dir)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def unet_out(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 128, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), cond).sample


# ------------------------------------------------------------------------------------------ diffusers folder
def test_load_diffusers_folder(tiny, tiny_model_dir, originals):
    assert tiny.version == "sd1" and tiny.prediction_type == "epsilon"
    assert tiny.resolution == 64 and tiny.vae_scale_factor == 4 and tiny.size_multiple == 32
    assert tiny.source == str(tiny_model_dir)
    assert isinstance(tiny.noise_scheduler, DDPMScheduler)
    assert tiny.noise_scheduler.config.num_train_timesteps == 1000
    assert tiny.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert not tiny.noise_scheduler.config.clip_sample
    assert tiny.dtype == torch.float32 and tiny.device.type == "cpu"
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(tiny, name), originals[name])
    caption = "a red circle at the top left"
    assert tiny.tokenizer(caption).input_ids == originals["tokenizer"](caption).input_ids


def test_pipeline_shares_modules(tiny):
    pipe = tiny.pipeline()
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet is tiny.unet and pipe.text_encoder is tiny.text_encoder and pipe.vae is tiny.vae
    assert pipe.tokenizer is tiny.tokenizer and pipe.safety_checker is None


def test_load_with_dtype(tiny_model_dir):
    model = load_base_model(tiny_model_dir, dtype="bf16")
    assert {model.unet.dtype, model.vae.dtype, model.text_encoder.dtype} == {torch.bfloat16}


def test_builtin_model_loads():
    assert (builtin_model_path() / "model_index.json").is_file(), "the built-in model ships with lorakit"
    model = load_base_model(None)
    assert model.resolution == 64 and model.source == str(builtin_model_path())
    assert load_base_model("builtin").unet.config == model.unet.config


def test_builtin_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "builtin_model_path", lambda: tmp_path / "base_model")
    with pytest.raises(ModelLoadError, match="built-in model's weights are not in this installation"):
        load_base_model(None)


def test_missing_and_incomplete_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_base_model("runwayml/stable-diffusion-v1-5")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="missing vae, text_encoder, scheduler, tokenizer"):
        load_base_model(tmp_path)


# ------------------------------------------------------------------------------------------- single file
def test_single_file_round_trip_is_exact(tiny, tmp_path):
    tiny.vae.register_to_config(scaling_factor=0.7)  # a pretrained value travels in the file's metadata
    path = save_single_file_checkpoint(tiny, tmp_path / "tiny.safetensors")
    tensors, metadata = read_checkpoint(path)
    prefixes = {ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.TEXT_ENCODER_PREFIX}
    assert all(any(k.startswith(p) for p in prefixes) for k in tensors)
    assert tensors[ldm.VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4  # 1×1 conv in the original
    assert tensors[ldm.TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    assert metadata["lorakit_prediction_type"] == "epsilon"

    loaded = load_base_model(path)  # architecture detected from the shapes, config found locally
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(loaded, name), getattr(tiny, name))
    assert torch.equal(unet_out(loaded), unet_out(tiny))
    assert loaded.vae.config.scaling_factor == 0.7
    assert loaded.resolution == 64 and loaded.source == str(path)
    assert loaded.tokenizer("a blue star").input_ids == tiny.tokenizer("a blue star").input_ids
    assert not list(tmp_path.glob(".*tmp"))


def test_single_file_with_explicit_config_and_fp16(tiny, tiny_model_dir, tmp_path):
    path = save_single_file_checkpoint(tiny, tmp_path / "half.safetensors", dtype="fp16")
    tensors, _ = read_checkpoint(path)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    loaded = load_base_model(path, config=tiny_model_dir, prediction_type="v_prediction")
    assert loaded.unet.dtype == torch.float32 and loaded.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    w = "conv_in.weight"
    assert torch.equal(loaded.unet.state_dict()[w], tiny.unet.state_dict()[w].half().float())


def test_a_v_prediction_zero_terminal_snr_checkpoint_says_so_in_the_markers_other_tools_read(tiny_model_dir,
                                                                                              tmp_path):
    """An original-layout file has no scheduler config: v-prediction and zero-terminal-SNR releases carry empty
    ``v_pred`` / ``ztsnr`` tensors (ComfyUI, A1111/Forge read them); lorakit writes and reads the same."""
    from safetensors.torch import save_file

    model = load_base_model(tiny_model_dir)
    model.set_schedule("v_prediction", zero_terminal_snr=True)
    path = save_single_file_checkpoint(model, tmp_path / "vpred.safetensors")
    tensors, _ = read_checkpoint(path)
    assert tensors["v_pred"].numel() == tensors["ztsnr"].numel() == 0
    bare = tmp_path / "community.safetensors"  # the markers alone, no lorakit metadata
    save_file(tensors, str(bare))
    for file in (path, bare):
        loaded = load_base_model(file)
        assert loaded.prediction_type == "v_prediction" and float(loaded.noise_scheduler.alphas_cumprod[-1]) == 0
        assert loaded.scheduler_config["timestep_spacing"] == "trailing"
        assert torch.equal(unet_out(loaded), unet_out(model))
    del tensors["v_pred"]
    save_file(tensors, str(bare))
    with pytest.raises(ModelLoadError, match=r"community\.safetensors: zero terminal SNR needs a v-prediction"):
        load_base_model(bare)


def test_a_diffusers_folder_written_at_half_precision_leaves_the_model_exactly_as_it_was(tiny, tmp_path):
    """The write casts for the file only: the model goes on with its own float32 tensors (a native run draws its
    final samples after writing its result), and the folder holds the fp16 values."""
    before = {name: {k: t.clone() for k, t in getattr(tiny, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    models.save_diffusers_folder(tiny, tmp_path / "half", "fp16")
    for name, state in before.items():
        now = getattr(tiny, name).state_dict()
        assert all(now[k].dtype == t.dtype and torch.equal(now[k], t) for k, t in state.items()), name
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors"))
    w = "conv_in.weight"
    assert {t.dtype for t in written.values() if t.is_floating_point()} == {torch.float16}
    assert torch.equal(written[w], before["unet"][w].half())


def test_overwrite_protection(tiny, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file_checkpoint(tiny, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_single_file_checkpoint(tiny, path, dtype="fp16")
    assert path.read_bytes() == before
    save_single_file_checkpoint(tiny, path, dtype="fp16", overwrite=True)
    assert path.stat().st_size < len(before)
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        save_single_file_checkpoint(tiny, tmp_path / "model.ckpt")


def test_save_refuses_modules_with_extra_tensors(tiny, tmp_path):
    layer = tiny.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.register_parameter("lora_down", torch.nn.Parameter(torch.zeros(2, 32)))
    with pytest.raises(ValueError, match="merge or remove adapters"):
        save_single_file_checkpoint(tiny, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_weights_only_ckpt_is_read(tiny, tmp_path):
    ldm_tensors = ldm.unet_to_ldm(tiny.unet.state_dict(), tiny.unet.config)
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": ldm_tensors, "global_step": 10}, path)
    tensors, _ = read_checkpoint(path)
    assert tensors.keys() == ldm_tensors.keys()


_unpickled = []


def _record_unpickling():
    _unpickled.append(True)
    return {}


class Payload:
    """Stands for arbitrary code in a pickle: unpickling it would call _record_unpickling."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(ModelLoadError, match=r"evil\.ckpt: refusing to unpickle"):
        load_base_model(path)
    assert not _unpickled


def test_truncated_safetensors_is_refused(tiny, tmp_path):
    path = save_single_file_checkpoint(tiny, tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_base_model(path)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors"):
        load_base_model(path)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.ckpt"])
def test_an_empty_or_cut_checkpoint_says_what_is_wrong(tmp_path, name):
    """An interrupted copy leaves 0 bytes: said as such, not as an empty error message; a cut .ckpt names the
    error's kind."""
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=rf"{name.replace('.', '[.]')}: an empty file \(0 bytes\), not a "):
        load_base_model(path)
    if name.endswith(".ckpt"):
        torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(64)}}, path)
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(ModelLoadError, match=r"empty\.ckpt: not a readable checkpoint \(truncated or corrupt\?\): "
                                                 r"[A-Za-z]+(Error|Exception)"):
            load_base_model(path)


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


def test_an_sdxl_refiner_checkpoint_is_refused(tmp_path):
    # the refiner conditions on one OpenCLIP encoder, under conditioner.embedders.0.model
    path = _write(tmp_path / "sdxl_refiner.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 16),
        "conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 8),
    })
    with pytest.raises(ModelLoadError, match=r"sdxl_refiner\.safetensors: its text conditioning .* not SDXL base's "
                                             r"two encoders .* an SDXL refiner"):
        load_base_model(path)


def test_an_sd2_checkpoint_without_a_vae_is_named_as_incomplete(tmp_path):
    path = _write(tmp_path / "sd21.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "cond_stage_model.model.positional_embedding": torch.zeros(77, 16),
    })
    with pytest.raises(ModelLoadError, match=r"sd21\.safetensors: the checkpoint has no VAE"):
        load_base_model(path)


def test_unknown_shapes_are_refused_with_the_shape(tmp_path):
    path = _write(tmp_path / "odd.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(48, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(48, 96),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(16, 3, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 96),
    })
    with pytest.raises(ModelLoadError, match=r"odd\.safetensors: unsupported architecture") as info:
        load_base_model(path)
    message = str(info.value)
    assert "(48, 4, 3, 3)" in message and "sd15 (320, 4, 3, 3)" in message and "SDXL" in message
    assert "sd2 (320, 1024)" in message  # SD2.x's cross-attention width, beside SD1.5's


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    lora = _write(tmp_path / "style.safetensors", {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)})
    with pytest.raises(ModelLoadError, match=r"style\.safetensors: .*adapter"):
        load_base_model(lora)
    unet_only = _write(tmp_path / "unet_only.safetensors",
                       {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    with pytest.raises(ModelLoadError, match=r"unet_only\.safetensors: the checkpoint has no VAE"):
        load_base_model(unet_only)
    with pytest.raises(ModelLoadError, match="unknown checkpoint format"):
        load_base_model(_write(tmp_path / "weights.gguf", {"a": torch.zeros(1)}))


# ------------------------------------------------------------------------------------------ SD1.5 shapes
def test_sd15_layout_matches_diffusers_reader(sd15_meta):
    """At full SD1.5 size (meta tensors): our names are what diffusers' single-file reader maps back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, te = sd15_meta
    written = ldm.unet_to_ldm(unet.state_dict(), unet.config)
    assert len(written) == 686  # the SD1.5 U-Net's tensor count in every single-file checkpoint
    for key in ("input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.8.2.conv.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.4.0.skip_connection.weight",
                "output_blocks.11.1.proj_out.weight", "time_embed.2.bias", "out.2.weight"):
        assert ldm.UNET_PREFIX + key in written
    back = convert_ldm_unet_checkpoint(written, dict(unet.config))
    assert back.keys() == unet.state_dict().keys()

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae"))
        sd15_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet"))
    assert sd15_unet.state_dict().keys() == unet.state_dict().keys()
    vae_written = ldm.vae_to_ldm(vae.state_dict(), vae.config)
    assert len(vae_written) == 248
    assert ldm.VAE_PREFIX + "decoder.up.3.upsample.conv.weight" in vae_written
    assert ldm.VAE_PREFIX + "decoder.up.0.block.0.nin_shortcut.weight" in vae_written
    assert vae_written[ldm.VAE_PREFIX + "encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert convert_ldm_vae_checkpoint(vae_written, dict(vae.config)).keys() == vae.state_dict().keys()

    te_written = ldm.text_encoder_to_ldm(te.state_dict())
    assert len(te_written) == 197  # 196 tensors + position_ids, as SD1.5 files carry them
    assert ldm.TEXT_ENCODER_PREFIX + "text_model.encoder.layers.11.mlp.fc2.weight" in te_written
    assert ldm.text_encoder_from_ldm(te_written, set(te.state_dict())).keys() == te.state_dict().keys()


def _detected_shapes(text_key: str, width: int) -> dict[str, torch.Tensor]:
    """The tensors detection reads, at SD1.x/SD2.x size, on the meta device (detection never reads values)."""
    with torch.device("meta"):
        return {
            "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, width),
            "first_stage_model.encoder.conv_in.weight": torch.empty(128, 3, 3, 3),
            text_key: torch.empty(77, width),
        }


def test_sd15_checkpoint_shapes_are_detected():
    with torch.device("meta"):
        fake = _detected_shapes("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", 768)
        assert detect_architecture(fake) == "sd15"
        old_layout = {k.replace("transformer.text_model.", "transformer."): v for k, v in fake.items()}
        assert detect_architecture(old_layout) == "sd15"
        inpainting = {**fake, "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 9, 3, 3)}
        with pytest.raises(ModelLoadError, match="inpainting"):
            detect_architecture(inpainting, "inpaint.safetensors")


def test_sd15_tokenizer_is_clips():
    tok = load_clip_tokenizer(SD15_CONFIG)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_dtype_names():
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype(None) is torch.float32 and resolve_dtype(torch.float16) is torch.float16
    assert dtype_name(torch.bfloat16) == "bf16"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")


# ------------------------------------------------------------------------------------------------------ SD2.x
def _te_out(text_encoder, tokenizer) -> torch.Tensor:
    ids = tokenizer(["a red circle at the top left"], padding="max_length", max_length=16,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_an_sd2_single_file_round_trips_exactly_and_diffusers_reads_it_as_written(tiny_sd2_dir, tmp_path):
    """An SD2.x-kind model (OpenCLIP-style encoder) is written in SD2.x's layout: OpenCLIP's names, q/k/v in one
    in_proj, a last layer diffusers does not keep (a stand-in here; the file's own when it was read from one).
    lorakit reads it back, and so does diffusers' own single-file pipeline reader, both exactly as written."""
    from diffusers import StableDiffusionPipeline

    model = load_base_model(tiny_sd2_dir)
    assert model.version == "sd2" and model.tokenizer.pad_token == "!"
    path = save_single_file_checkpoint(model, tmp_path / "sd2.safetensors")
    tensors, metadata = read_checkpoint(path)
    assert metadata["lorakit_architecture"] == "sd2"
    layers = model.text_encoder.config.num_hidden_layers
    block = f"cond_stage_model.model.transformer.resblocks.{layers}."  # the layer SD2 never uses, written as SD2 has it
    width = model.text_encoder.config.hidden_size
    assert tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert torch.equal(tensors[block + "mlp.c_fc.weight"],
                       tensors[f"cond_stage_model.model.transformer.resblocks.{layers - 1}.mlp.c_fc.weight"])
    assert not any(k.startswith(ldm.TEXT_ENCODER_PREFIX) for k in tensors)

    loaded = load_base_model(path, config=tiny_sd2_dir)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(loaded, name), getattr(model, name))
    assert loaded.version == "sd2" and loaded.tokenizer.pad_token == "!"
    assert sorted(loaded.carried_tensors) == sorted([k for k in tensors if k.startswith(block)] + [
        "cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection"])
    again, _ = read_checkpoint(save_single_file_checkpoint(loaded, tmp_path / "again.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd2_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    assert torch.equal(_te_out(pipe.text_encoder, model.tokenizer), _te_out(model.text_encoder, model.tokenizer))
    assert_same_state(pipe.unet, model.unet)


def test_a_file_whose_text_encoder_is_not_its_configs_kind_is_refused(tiny_sd2_dir, tiny_model_dir, tmp_path):
    path = save_single_file_checkpoint(load_base_model(tiny_sd2_dir), tmp_path / "sd2.safetensors")
    with pytest.raises(ModelLoadError, match=r"sd2\.safetensors: its text encoder is SD2\.x's OpenCLIP .*config in "
                                             r".* is for SD1\.x's CLIP"):
        load_base_model(path, config=tiny_model_dir)


def _sd2_meta():
    """SD2.1's U-Net and text encoder built from lorakit's configs on the meta device: names and shapes."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(models.SD2_CONFIG / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(models.SD2_CONFIG / "text_encoder"))
    return unet, te


def test_sd2_layout_at_full_size_has_sd2_files_names_and_counts():
    """At full SD2.1 size (meta tensors): the U-Net's 686 tensors (its transformers' proj_in/proj_out are Linear:
    2-D), the text encoder's 24 OpenCLIP layers of 12 tensors plus 6 others, as every SD2.x file holds them; and
    diffusers' converters map both back to the modules' names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet, te = _sd2_meta()
    written = ldm.unet_to_ldm(unet.state_dict(), unet.config)
    assert len(written) == 686
    assert written[ldm.UNET_PREFIX + "input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert written[ldm.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert convert_ldm_unet_checkpoint(written, dict(unet.config)).keys() == unet.state_dict().keys()

    text = ldm.text_encoder_to_open_clip(te.state_dict())
    assert len(text) == 24 * 12 + 6
    for key, shape in (("transformer.resblocks.23.attn.in_proj_weight", (3072, 1024)),
                       ("transformer.resblocks.0.mlp.c_fc.weight", (4096, 1024)),
                       ("positional_embedding", (77, 1024)), ("token_embedding.weight", (49408, 1024)),
                       ("text_projection", (1024, 1024)), ("ln_final.bias", (1024,))):
        assert text[ldm.OPEN_CLIP_PREFIX + key].shape == shape, key
    assert ldm.text_encoder_from_open_clip(text, te)[0].keys() == te.state_dict().keys() - {
        k for k in te.state_dict() if k.endswith("position_ids")}
    # diffusers' own detection (what from_single_file does without a config) takes the whole file for SD2.x
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, is_open_clip_model

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(models.SD2_CONFIG / "vae"))
    whole = {**written, **ldm.vae_to_ldm(vae.state_dict(), vae.config), **text}
    assert infer_diffusers_model_type(whole) == "v2" and is_open_clip_model(whole)
    assert sorted(ldm.open_clip_extras(text, 23)) == sorted(
        [k for k in text if ".resblocks.23." in k] + [ldm.OPEN_CLIP_PREFIX + "text_projection",
                                                      ldm.OPEN_CLIP_PREFIX + "logit_scale"])


def test_sd2_checkpoint_shapes_are_detected_and_a_v_file_is_the_768_model(tmp_path):
    """Shapes say SD2.x; only a v marker (or the user) tells SD2.1-768-v from 2.1-base, whose shapes are the same."""
    fake = _detected_shapes("cond_stage_model.model.positional_embedding", 1024)
    assert detect_architecture(fake) == "sd2"
    path = _write(tmp_path / "sd21.safetensors", {k: torch.zeros(t.shape) for k, t in fake.items()})
    assert models.native_resolution(path) == 512
    assert models.native_resolution(path, "v_prediction") == 768
    marked = tmp_path / "sd21-v.safetensors"
    save_file({**read_checkpoint(path)[0], "v_pred": torch.zeros(0)}, str(marked))
    assert models.native_resolution(marked) == 768
    pickled = tmp_path / "v2-1_512-ema-pruned.ckpt"  # the .ckpt most SD2.x releases came as: mapped, not read
    torch.save({"state_dict": {k: torch.zeros(t.shape) for k, t in fake.items()}}, pickled)
    assert models.native_resolution(pickled) == 512 and models.describe_base_model(pickled).family == "SD2.x"
    assert models.describe_base_model(path, "v_prediction").family == "SD2.x"
    assert models.describe_base_model(None).family == "SD1.x"


def test_sd2_tokenizer_is_clips_padded_with_exclamation_marks():
    sd1, sd2 = load_clip_tokenizer(SD15_CONFIG), load_clip_tokenizer(models.SD2_CONFIG)
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0 and len(sd2) == 49408
    assert sd2("a photo of a cat").input_ids == sd1("a photo of a cat").input_ids
    padded = sd2("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0, 0, 0]
    assert sd1("a cat", padding="max_length", max_length=8).input_ids[4:] == [49407] * 4


def test_an_sd2_file_that_does_not_say_what_it_predicts_loads_as_the_512_model_and_says_so(
        tiny_sd2_dir, tmp_path, monkeypatch, caplog):
    """The real load path, with lorakit's SD2.x configs swapped for tiny ones of the same kinds (real SD2.x files
    are gigabytes): no word on the prediction type → the 512 ε config, with a warning that names the setting; a v
    marker or the user's prediction type → the 768 v config."""
    import json
    import logging
    import shutil

    v_folder = tmp_path / "tiny_sd2_v"
    shutil.copytree(tiny_sd2_dir, v_folder)
    for part, changes in (("unet/config.json", {"sample_size": 24}),
                          ("scheduler/scheduler_config.json", {"prediction_type": "v_prediction"})):
        file = v_folder / part
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    monkeypatch.setattr(models, "_known_configs", lambda: {"sd15": SD15_CONFIG, "sd2": tiny_sd2_dir})
    monkeypatch.setattr(models, "SD2_V_CONFIG", v_folder)
    written = save_single_file_checkpoint(load_base_model(tiny_sd2_dir), tmp_path / "lorakit.safetensors")
    assert load_base_model(written).prediction_type == "epsilon"  # lorakit's own files say it in their metadata
    path = _write(tmp_path / "sd21.safetensors", read_checkpoint(written)[0])  # as other tools write SD2.x files
    with caplog.at_level(logging.WARNING, logger="lorakit.models"):
        plain = load_base_model(path)
    assert (plain.version, plain.prediction_type, plain.resolution) == ("sd2", "epsilon", 64)
    assert "sd21.safetensors: an SD2.x file does not say whether it predicts" in caplog.text
    assert 'model.prediction_type = "v_prediction"' in caplog.text
    told = load_base_model(path, prediction_type="v_prediction")
    assert (told.prediction_type, told.resolution) == ("v_prediction", 96)
    marked = tmp_path / "sd21-v.safetensors"
    save_file({**read_checkpoint(path)[0], "v_pred": torch.zeros(0)}, str(marked))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorakit.models"):
        assert load_base_model(marked).resolution == 96
    assert "does not say" not in caplog.text
    # ModelSpec entries, as kohya writes them in the models it saves, say it too
    tensors = read_checkpoint(path)[0]
    for metadata, predicts in (({"modelspec.prediction_type": "v"}, "v_prediction"),
                               ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v_prediction"),
                               ({"modelspec.prediction_type": "epsilon"}, "epsilon")):
        spec_file = tmp_path / "sd21-spec.safetensors"
        save_file(tensors, str(spec_file), metadata=metadata)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lorakit.models"):
            assert load_base_model(spec_file).prediction_type == predicts
        assert "does not say" not in caplog.text
        assert not models.describe_base_model(spec_file).unsaid_sd2_prediction
    # said before the run too: the dry run reads the same header
    def unsaid(spec, prediction_type=None) -> bool:
        return models.describe_base_model(spec, prediction_type).unsaid_sd2_prediction

    assert unsaid(path) and not unsaid(path, "epsilon")
    assert not unsaid(marked) and not unsaid(written)
    assert not unsaid(tiny_sd2_dir) and not unsaid(None)
    from test_train import write_dataset

    from lorakit.config import TrainConfig
    from lorakit.dry_run import dry_run

    cfg = TrainConfig()
    cfg.model.base, cfg.data.train_data = str(path), str(write_dataset(tmp_path / "data", n=2))
    cfg.output.dir = str(tmp_path / "run")
    assert "SD2.x (the file does not say whether it predicts noise or v" in dry_run(cfg)
