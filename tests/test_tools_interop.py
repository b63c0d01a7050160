"""Files written by merge --to-adapter, extract and resize load in diffusers (``load_lora_weights`` on a pipeline
built from the built-in model folder) and in LyCORIS with the same ΔW; LoHa/LoKr converted with ``--to lora``
load in diffusers and give the original U-Net output within the reported error."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from test_formats import lycoris_state  # noqa: F401  (fixture: LyCORIS presets restored after each test)
from test_tools import _random_adapter, unet_out

from lorakit.formats import load_network, read_adapter
from lorakit.models import builtin_model_path
from lorakit.tools.deltas import file_deltas
from lorakit.tools.extract import extract_adapter
from lorakit.tools.lowrank import RankRule
from lorakit.tools.merge import bake, combine
from lorakit.tools.resize import resize_adapter

IDS = torch.tensor([[845, 5, 17, 42, 846]])


@pytest.fixture(scope="module")
def outputs(base, tmp_path_factory):
    """One file of each tool: extract (LoCon + text encoder), resize (dynamic), merge --to-adapter (exact)."""
    d = tmp_path_factory.mktemp("tools")
    a = _random_adapter(base, d / "a.safetensors", rank=4, alpha=2.0, seed=1)
    b = _random_adapter(base, d / "b.safetensors", rank=2, alpha=1.0, seed=2, preset="attn-mlp")
    tuned = copy.deepcopy(base)
    bake(tuned, [a])
    files = {"extract": extract_adapter(tuned, base, RankRule(3), RankRule(2)).write(d / "x.safetensors")}
    files["resize"] = resize_adapter(a, RankRule(dynamic="sv_cumulative", param=0.8)).write(d / "r.safetensors")
    files["combine"] = combine([f"{a}:0.6", f"{b}:0.9:OUTALL"], base).write(d / "c.safetensors")
    return files


def _te_out(te) -> torch.Tensor:
    with torch.no_grad():
        return te(IDS).last_hidden_state


def _ours(base, path):
    model = copy.deepcopy(base)
    load_network(path, model.unet, model.text_encoder)
    return model


def _diffusers_pipeline(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(builtin_model_path(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    return pipe


@pytest.mark.parametrize("tool", ["extract", "resize", "combine"])
def test_tool_files_load_in_diffusers(base, outputs, tool):
    path = outputs[tool]
    ours = _ours(base, path)
    pipe = _diffusers_pipeline(path)
    theirs = types.SimpleNamespace(unet=pipe.unet)
    assert (unet_out(ours) - unet_out(base)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(unet_out(theirs), unet_out(ours), rtol=1e-4, atol=1e-5)
    if any(k.startswith("lora_te_") for k in read_adapter(path).tensors):
        torch.testing.assert_close(_te_out(pipe.text_encoder), _te_out(ours.text_encoder), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tool", ["extract", "resize", "combine"])
def test_tool_files_load_in_lycoris_with_the_same_delta(base, outputs, tool, lycoris_state):  # noqa: F811
    from lycoris.kohya import create_network_from_weights

    path = outputs[tool]
    model = copy.deepcopy(base)
    # LyCORIS names text-encoder modules after named_modules(); transformers 5 dropped the `text_model` level that
    # kohya's names (lora_te_text_model_...) carry, so hand it the transformers-4 layout
    te = torch.nn.Module()
    te.text_model = model.text_encoder
    network, _ = create_network_from_weights(1.0, str(path), None, te, model.unet)
    loras = {lora.lora_name: lora for lora in network.unet_loras + network.text_encoder_loras}
    deltas = file_deltas(path)
    assert set(loras) == set(deltas)
    for name, delta in deltas.items():
        theirs = loras[name].get_diff_weight(multiplier=1.0)[0]
        torch.testing.assert_close(theirs.reshape(delta.shape).float(), delta.weight().float(), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("algorithm, options", [("loha", {}), ("lokr", {"factor": 4})])
def test_loha_lokr_to_lora_load_in_diffusers_within_the_reported_error(base, tmp_path, algorithm, options):
    source = _random_adapter(base, tmp_path / f"{algorithm}.safetensors", algorithm=algorithm, preset="full",
                             rank=4, alpha=2.0, text_encoder=False, scale=0.1, **options)
    original = unet_out(_ours(base, source))
    change = float((original - unet_out(base)).norm())
    assert change > 1e-3
    for rule, name in ((None, "lossless"), (RankRule(4), "rank4")):
        result = resize_adapter(source, rule, to_lora=True, model=base)
        path = result.write(tmp_path / f"{algorithm}-{name}.safetensors")
        assert {i for i in read_adapter(path).modules()} == set(read_adapter(source).modules())
        pipe = _diffusers_pipeline(path)
        converted = unet_out(types.SimpleNamespace(unet=pipe.unet))
        torch.testing.assert_close(converted, unet_out(_ours(base, path)), rtol=1e-4, atol=1e-5)
        error = max(r.fro_error for r in result.reports)
        # the output's error, relative to the adapter's effect, stays within the largest relative ΔW error; plus
        # float32 noise of the output itself (the effect is ~1e-3 of the output here)
        noise = 1e-6 * float(original.norm())
        assert float((converted - original).norm()) <= error * change + noise, (name, error)
        if rule is None:
            assert error < 1e-5
        else:
            assert error > 1e-3  # rank 4 really lost something for these algorithms


def test_merged_models_load_in_diffusers(base, tmp_path):
    """``lorakit merge`` output: the folder through ``from_pretrained``, the single file through
    ``from_single_file`` (with the built-in model's configs, offline), both giving the baked U-Net's output."""
    from diffusers import StableDiffusionPipeline

    path = _random_adapter(base, tmp_path / "a.safetensors", text_encoder=True)
    model = copy.deepcopy(base)
    bake(model, [f"{path}:0.7:MIDD"])
    expected, expected_te = unet_out(model), _te_out(model.text_encoder)
    from lorakit.tools.merge import save_model

    folder = save_model(model, tmp_path / "merged")
    single = save_model(model, tmp_path / "merged.safetensors")
    pipes = [StableDiffusionPipeline.from_pretrained(folder, local_files_only=True),
             StableDiffusionPipeline.from_single_file(str(single), config=str(builtin_model_path()),
                                                      local_files_only=True, safety_checker=None,
                                                      requires_safety_checker=False)]
    for pipe in pipes:
        torch.testing.assert_close(unet_out(types.SimpleNamespace(unet=pipe.unet)), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(_te_out(pipe.text_encoder), expected_te, rtol=0, atol=1e-6)
