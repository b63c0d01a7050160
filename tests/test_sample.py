"""Sampling: kohya prompt files, deterministic generation over the live modules, image grids."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.models import load_base_model
from lorakit.sample import (
    SAMPLERS,
    PromptSyntaxError,
    SamplePrompt,
    generate,
    image_grid,
    load_prompts,
    make_scheduler,
    parse_prompt_dict,
    parse_prompt_line,
    parse_prompt_text,
    resolve_prompts,
    sampler_name,
    save_sample_grid,
)

# two steps (t = 501, 1): the first one is where the text conditioning shows; the images are noise (random weights)
STEPS = 2


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_base_model(tiny_model_dir)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------------------------- parsing
def test_every_option_is_parsed():
    p = parse_prompt_line("a zkz star, blue background --n blurry, red --w 96 --h 128 --d 42 --l 5.5 --s 30 "
                          "--ss euler_a")
    assert p == SamplePrompt("a zkz star, blue background", negative_prompt="blurry, red", width=96, height=128,
                             seed=42, cfg_scale=5.5, steps=30, sampler="euler_a")


def test_options_any_order_case_and_aliases():
    p = parse_prompt_line("  a cat  --SS DPM++ 2M --D 7 --L 3 ")
    assert (p.prompt, p.seed, p.cfg_scale, p.sampler) == ("a cat", 7, 3.0, "dpmsolver++")
    assert parse_prompt_line("--n text").prompt == ""  # an empty prompt: the unconditional sample


def test_defaults_come_from_the_caller():
    defaults = SamplePrompt("", negative_prompt="lowres", width=64, height=64, cfg_scale=4.0, steps=8,
                            sampler="euler")
    p = parse_prompt_line("a dog --s 12", defaults)
    assert p == SamplePrompt("a dog", negative_prompt="lowres", width=64, height=64, cfg_scale=4.0, steps=12,
                             sampler="euler")
    plain = parse_prompt_line("a dog")
    assert (plain.width, plain.height, plain.seed, plain.steps, plain.cfg_scale, plain.sampler) == \
        (None, None, None, 20, 7.0, "ddim")


def test_comments_and_blank_lines_are_skipped():
    text = "# samples for epoch checks\n\na red circle --d 1\n   # indented comment\n\t\nblue star #2 --d 2\n"
    prompts = parse_prompt_text(text)
    assert [(p.prompt, p.seed) for p in prompts] == [("a red circle", 1), ("blue star #2", 2)]


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", r"line 2: unknown option --x"),
    ("a cat --w wide", r"line 2: --w expects an integer, got 'wide'"),
    ("a cat --w 64.5", r"line 2: --w expects an integer"),
    ("a cat --s 0", r"line 2: --s must be between 1 and 1000"),
    ("a cat --l -1", r"line 2: --l must be a number >= 0"),
    ("a cat --d", r"line 2: --d needs a value"),
    ("a cat --ss warp_drive", r"line 2: --ss unknown sampler 'warp_drive'"),
    ("a cat --5 dogs", r"line 2: cannot read option .--5 dogs."),
    ("a cat -- dog", r"line 2: unknown option --dog"),
    # A1111's extra-network tags would reach the text encoder as words; lorakit takes adapters as arguments
    ("a cat <lora:mychar:0.7>", r"line 2: <lora:mychar:0.7> is A1111's prompt syntax .*\(mychar.safetensors:0.7\)"),
    ("a cat --n <LyCO: style one >", r"line 2: <LyCO: style one > is A1111's .*\(style one.safetensors:1\)"),
    ("a cat <lora:x:0.5:MIDD>", r"\(x.safetensors:0.5:MIDD\)"),  # a block-weight suffix, as lorakit writes it
])
def test_bad_syntax_names_the_line(line, message):
    with pytest.raises(PromptSyntaxError, match=message):
        parse_prompt_text(f"# header\n{line}\n", source="prompts.txt")


def test_a1111_tags_in_a_prompt_dict_are_refused_and_angle_brackets_otherwise_are_words():
    with pytest.raises(PromptSyntaxError, match=r"p.toml prompt 1: <hypernet:h> is A1111's"):
        parse_prompt_dict({"prompt": "a cat", "negative_prompt": "<hypernet:h>"}, where="p.toml prompt 1")
    assert parse_prompt_line("a sign reading <hello> and <lora>").prompt == "a sign reading <hello> and <lora>"


def test_kohya_options_for_other_models_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit.sample"):
        p = parse_prompt_line("a cat --g 3.5 --d 4", where="p.txt line 1")
    assert p.seed == 4 and "--g" in caplog.text


def test_prompt_files_txt_toml_json(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("# c\na red circle --d 3\n", encoding="utf-8")
    assert load_prompts(txt) == [SamplePrompt("a red circle", seed=3)]

    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 64\nscale = 5.0\nsample_steps = 10\n'
                    '[[prompt.subset]]\nprompt = "a red circle"\nseed = 1\n'
                    '[[prompt.subset]]\nprompt = "a blue star"\nnegative_prompt = "red"\nsample_sampler = "k_euler"\n',
                    encoding="utf-8")
    a, b = load_prompts(toml)
    assert a == SamplePrompt("a red circle", width=64, height=64, seed=1, cfg_scale=5.0, steps=10)
    assert (b.prompt, b.negative_prompt, b.sampler, b.steps) == ("a blue star", "red", "euler", 10)

    js = tmp_path / "prompts.json"
    js.write_text(json.dumps(["a cat --d 5", {"prompt": "a dog", "steps": 3, "cfg_scale": 2}]), encoding="utf-8")
    assert load_prompts(js) == [SamplePrompt("a cat", seed=5), SamplePrompt("a dog", steps=3, cfg_scale=2.0)]
    js.write_text(json.dumps([{"prompt": "a dog", "colour": "red"}]), encoding="utf-8")
    with pytest.raises(PromptSyntaxError, match=r"prompts\.json entry 1: unknown key 'colour'"):
        load_prompts(js)
    # a file without a prompt (`lorakit sample` failed after loading the model: "no images to put in a grid")
    for path, text in ((txt, "# only a comment\n\n"), (js, "[]"), (toml, "[prompt]\nsubset = []\n")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(PromptSyntaxError, match="no prompt in this file"):
            load_prompts(path)


def test_sampler_names():
    assert sampler_name("Euler-a") == "euler_a" and sampler_name("k_dpm_2_a") == "dpm_2_a"
    assert sampler_name("dpmpp_2m_karras") == "dpm++_2m_karras"
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_name("plms2")


def test_every_sampler_builds_from_the_model_config(model):
    try:
        import scipy  # noqa: F401  (only LMS needs it)
    except ImportError:
        with pytest.raises(ValueError, match="needs scipy"):
            make_scheduler("lms", model)
        names = [name for name in SAMPLERS if name != "lms"]
    else:
        names = list(SAMPLERS)
    for name in names:
        scheduler = make_scheduler(name, model)
        assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.prediction_type == "epsilon"


@pytest.fixture(scope="module")
def zero_snr_model(tmp_path_factory):
    """The built-in architecture (random weights) with the zero-terminal-SNR v schedule (world.model)."""
    from lorakit.world.model import build_components
    from lorakit.world.pretrain import export_pipeline

    folder = tmp_path_factory.mktemp("zero_snr") / "model"
    export_pipeline(build_components(0, "v_prediction"), folder)
    return load_base_model(folder)


def test_every_sampler_runs_a_zero_terminal_snr_model(zero_snr_model):
    model = zero_snr_model
    assert model.prediction_type == "v_prediction" and float(model.noise_scheduler.alphas_cumprod[-1]) == 0.0
    names = [name for name in SAMPLERS if name != "lms"]
    for name in names:
        scheduler = make_scheduler(name, model)
        assert scheduler.config.prediction_type == "v_prediction"
        scheduler.set_timesteps(4)
        # trailing spacing: sampling starts at the last (pure-noise) step, from a finite starting noise scale
        assert int(scheduler.timesteps[0]) == 999, (name, scheduler.timesteps)
        assert np.isfinite(float(scheduler.init_noise_sigma)), name
        if hasattr(scheduler, "alphas_cumprod"):  # the model's schedule, whether rescaled here or by diffusers
            np.testing.assert_allclose(scheduler.alphas_cumprod[:-1].numpy(),
                                       model.noise_scheduler.alphas_cumprod[:-1].numpy(), rtol=1e-4, err_msg=name)
        image = generate(model, [SamplePrompt("a red circle", seed=1, steps=STEPS, sampler=name)], progress=False)[0]
        assert pixels(image).std() > 1, name  # an image, not the black frame a NaN would give


def test_sizes_follow_the_model(model):
    a, b = resolve_prompts(model, ["a cat", SamplePrompt("b", width=100, height=20, seed=9)], base_seed=10)
    assert (a.width, a.height, a.seed) == (64, 64, 10)  # native size; seed = base_seed + index
    assert (b.width, b.height, b.seed) == (96, 32, 9)  # rounded down to multiples of 32, at least 32


# ------------------------------------------------------------------------------------------- generation
def test_generate_is_deterministic_per_seed(model):
    prompts = [SamplePrompt("a red circle", seed=1, steps=STEPS, sampler="euler_a"),
               SamplePrompt("a red circle", seed=2, steps=STEPS, sampler="euler_a")]
    first = generate(model, prompts, progress=False)
    again = generate(model, prompts, progress=False)
    assert [im.size for im in first] == [(64, 64), (64, 64)]
    assert np.array_equal(pixels(first[0]), pixels(again[0])) and np.array_equal(pixels(first[1]), pixels(again[1]))
    assert np.abs(pixels(first[0]) - pixels(first[1])).mean() > 1  # another seed, another image
    # the noise is per image, so batching does not change the result (beyond float rounding)
    alone = generate(model, prompts[1:], batch_size=1, progress=False)
    assert np.abs(pixels(alone[0]) - pixels(first[1])).max() <= 2


def test_negative_prompt_and_cfg_change_the_image(model):
    base = SamplePrompt("a red circle", seed=3, steps=STEPS)
    plain, negative, low_cfg = generate(model, [base, SamplePrompt(**{**base.__dict__, "negative_prompt": "blue"}),
                                                SamplePrompt(**{**base.__dict__, "cfg_scale": 1.0})], progress=False)
    assert np.abs(pixels(plain) - pixels(negative)).mean() > 0.5
    assert np.abs(pixels(plain) - pixels(low_cfg)).mean() > 0.5


def test_generate_restores_modes_and_rng(model):
    model.unet.train()
    model.unet.conv_in.eval()  # mixed modes, as a trainer with frozen parts may leave them
    model.text_encoder.train()
    before = {m: m.training for net in (model.unet, model.text_encoder, model.vae) for m in net.modules()}
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    try:
        generate(model, [SamplePrompt("a blue star", seed=4, steps=1, cfg_scale=1.0)], progress=False)
    finally:
        hook.remove()
    assert seen and not any(seen)  # sampled in eval mode
    assert torch.equal(torch.rand(3), expected)  # the training run's random stream is untouched
    after = {m: m.training for net in (model.unet, model.text_encoder, model.vae) for m in net.modules()}
    assert after == before
    for net in (model.unet, model.text_encoder):
        net.eval()


def test_textual_inversion_tokens_are_used(tiny_model_dir):
    model = load_base_model(tiny_model_dir)
    model.tokenizer.add_tokens(["<zkz>"])
    model.text_encoder.resize_token_embeddings(len(model.tokenizer))
    token = model.tokenizer.convert_tokens_to_ids("<zkz>")
    assert model.tokenizer("a <zkz>").input_ids[2] == token
    prompt = SamplePrompt("a <zkz> on a blue background", seed=5, steps=STEPS)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, model.text_encoder.config.hidden_size, generator=g)  # not constant: LayerNorm erases that
    images = []
    for row in rows:  # what a textual-inversion trainer does between two samplings
        with torch.no_grad():
            model.text_encoder.get_input_embeddings().weight[token] = row
        images.append(generate(model, [prompt], progress=False)[0])
    assert np.abs(pixels(images[0]) - pixels(images[1])).mean() > 0.5


# ------------------------------------------------------------------------------------------------- grids
def _solid(color: str, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_grid_size_layout_and_labels():
    images = [_solid(c) for c in ("red", "green", "blue", "yellow", "black")]
    grid = image_grid(images, cols=3, pad=2)
    assert grid.size == (3 * 66 + 2, 2 * 66 + 2)
    assert grid.getpixel((2 + 66 + 10, 2 + 10)) == (0, 128, 0)  # second image, first row
    assert grid.getpixel((2 + 10, 2 + 66 + 10)) == (255, 255, 0)  # fourth image, second row
    labelled = image_grid(images, cols=3, labels=["red", "a much longer label that will need wrapping", "", "", ""])
    assert labelled.width == grid.width and labelled.height > grid.height
    label_area = np.asarray(labelled.crop((2, 2 + 64, 2 + 64, 2 + 64 + 12)).convert("L"))
    assert label_area.min() < 100  # some dark text under the first image
    assert image_grid(images).size == (3 * 66 + 2, 2 * 66 + 2)  # about square by default
    with pytest.raises(ValueError, match="2 labels for 5 images"):
        image_grid(images, labels=["a", "b"])


def test_save_sample_grid_writes_png_atomically(tmp_path):
    images = [_solid("red"), _solid("blue")]
    path = save_sample_grid(images, [SamplePrompt("red one", seed=1), "blue one"], tmp_path / "samples" / "e1.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width == 2 * 66 + 2
    assert [p.name for p in path.parent.iterdir()] == ["e1.png"]


def test_an_sdxl_vae_in_fp16_decodes_in_fp32_and_stays_fp16(tiny_sdxl_dir):
    """Latents are decoded by lorakit in half precision (the pipeline would hand the VAE the U-Net's dtype); an SDXL
    VAE whose config says it overflows in fp16 (force_upcast) decodes in fp32 for the while, as the SDXL pipeline
    decodes it, and is fp16 again afterwards."""
    from lorakit.sample import SamplePrompt, generate

    model = load_base_model(tiny_sdxl_dir)
    model.to(dtype=torch.float16)
    assert model.vae.config.force_upcast
    seen = []
    model.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    image = generate(model, [SamplePrompt("a shape", width=64, height=64, steps=2)], progress=False)[0]
    assert seen == [torch.float32] and model.vae.dtype == torch.float16
    assert np.asarray(image).std() > 1


def test_images_that_come_out_nan_are_said(tiny_model_dir, caplog):
    """A model (or adapter) holding NaN drew black images without a word: the pipeline casts NaN to black."""
    broken = load_base_model(tiny_model_dir)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    prompts = [SamplePrompt("a red circle", seed=1, steps=2), SamplePrompt("a blue square", seed=2, steps=2)]
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        images = generate(broken, prompts, batch_size=1)
    assert len(images) == 2
    assert "2 of 2 images came out NaN and are drawn black" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        generate(load_base_model(tiny_model_dir), prompts[:1])
    assert "came out NaN" not in caplog.text
