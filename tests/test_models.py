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


def test_sdxl_checkpoint_is_refused(tmp_path):
    path = _write(tmp_path / "sdxl_base.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 16),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8),
    })
    with pytest.raises(ModelLoadError, match=r"sdxl_base\.safetensors: .*SDXL is not supported yet"):
        load_base_model(path)


def test_sd2_checkpoint_is_refused(tmp_path):
    path = _write(tmp_path / "sd21.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "cond_stage_model.model.positional_embedding": torch.zeros(77, 16),
    })
    with pytest.raises(ModelLoadError, match=r"sd21\.safetensors: .*SD2\.x.*unsupported"):
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


def test_sd15_checkpoint_shapes_are_detected():
    with torch.device("meta"):  # shapes only: detection never reads values
        fake = {
            "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, 768),
            "first_stage_model.encoder.conv_in.weight": torch.empty(128, 3, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.empty(77, 768),
        }
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
