"""Norm-layer updates (LyCORIS's ``train_norm``): the adapter, where a network puts them, files with them in every
path that reads adapters (load, apply, sample, merge), and training with them."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import build_tiny_text_encoder, build_tiny_unet
from test_formats import lycoris_state  # noqa: F401  (fixture: LyCORIS presets restored after each test)
from torch import nn

from lorakit.adapters import make_adapter
from lorakit.adapters.norm import Norm
from lorakit.network import create_network

NORMS = {
    "layer": (lambda: nn.LayerNorm(16), (2, 5, 16)),
    "group": (lambda: nn.GroupNorm(4, 16), (2, 16, 3, 3)),
}


def _trained(norm: nn.Module, multiplier: float = 1.0) -> Norm:
    torch.manual_seed(1)
    with torch.no_grad():  # a base that is not the identity's (1, 0), and an update that is not zero
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    adapter = make_adapter("norm", norm)
    adapter.multiplier = multiplier
    with torch.no_grad():
        adapter.w_norm.normal_(std=0.3)
        adapter.b_norm.normal_(std=0.3)
    return adapter


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_the_update_is_the_layers_scale_and_shift_plus_the_multiplied_update(kind, multiplier):
    build, shape = NORMS[kind]
    adapter = _trained(build(), multiplier)
    reference = build()
    with torch.no_grad():
        reference.weight.copy_(adapter.base.weight + multiplier * adapter.w_norm)
        reference.bias.copy_(adapter.base.bias + multiplier * adapter.b_norm)
    x = torch.randn(shape)
    torch.testing.assert_close(adapter(x), reference(x))
    # merged: the same, and unmerging restores the layer bit for bit
    weight = adapter.base.weight.detach().clone()
    adapter.merge()
    torch.testing.assert_close(adapter(x), reference(x))
    adapter.unmerge()
    assert torch.equal(adapter.base.weight, weight)


@pytest.mark.parametrize("kind", NORMS)
def test_in_bf16_the_update_is_not_rounded_into_the_scale(kind):
    build, shape = NORMS[kind]
    adapter = _trained(build())
    with torch.no_grad():
        adapter.w_norm.fill_(1e-3)  # below bf16's resolution near 1: W0 + ΔW in bf16 would lose it
    x = torch.randn(shape)
    exact = adapter(x).double()
    adapter.base.to(torch.bfloat16)
    half = adapter(x.bfloat16()).double()
    without = adapter.base_forward(x.bfloat16(), adapter.base.weight, adapter.base.bias).double()
    # the update's own contribution survives: the output moved towards the exact one, not stayed at the base's
    assert (half - exact).abs().mean() < (without - exact).abs().mean() / 2


def test_it_trains_and_only_matrix_algorithms_wrap_matrices():
    adapter = make_adapter("norm", nn.LayerNorm(8))
    adapter.train()
    adapter(torch.randn(3, 8)).square().sum().backward()
    assert adapter.w_norm.grad is not None and adapter.b_norm.grad is not None
    assert adapter.base.weight.grad is None
    with pytest.raises(TypeError, match="wrap nn.Linear or nn.Conv2d layers, not LayerNorm"):
        make_adapter("lora", nn.LayerNorm(8))
    with pytest.raises(TypeError, match="wraps nn.LayerNorm or nn.GroupNorm, not Linear"):
        make_adapter("norm", nn.Linear(8, 8))
    with pytest.raises(TypeError, match="no learned scale"):
        make_adapter("norm", nn.LayerNorm(8, elementwise_affine=False))


def test_a_file_module_loads_with_its_shift_even_where_the_layer_has_none():
    norm = nn.LayerNorm(8, bias=False)
    tensors = {"w_norm": torch.full((8,), 0.5), "b_norm": torch.full((8,), 0.25)}
    adapter = Norm.from_file_tensors(norm, tensors, multiplier=2.0)
    x = torch.randn(2, 8)
    expected = torch.nn.functional.layer_norm(x, (8,), torch.full((8,), 2.0), torch.full((8,), 0.5))
    torch.testing.assert_close(adapter(x), expected)
    with pytest.raises(ValueError, match=r"w_norm: shape \(9,\) does not fit"):
        Norm.from_file_tensors(nn.LayerNorm(8), {"w_norm": torch.zeros(9)})


@pytest.mark.parametrize("kind", NORMS)
def test_lycoris_norm_module_gives_the_same_output(kind):
    norms = pytest.importorskip("lycoris.modules.norms")
    build, shape = NORMS[kind]
    ours = _trained(build(), 0.6)
    layer = build()
    layer.load_state_dict(ours.base.state_dict())
    theirs = norms.NormModule("lora_unet_x", layer, multiplier=0.6)
    theirs.load_state_dict({k: v for k, v in ours.file_tensors().items()}, strict=False)
    theirs.apply_to()
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), ours(x))


# ---- where a network puts them ------------------------------------------------------------------------------

def _norm_names(network) -> set[str]:
    return {name for name, adapter in network.adapters.items() if adapter.algorithm == "norm"}


def test_train_norm_updates_the_norms_lycoris_does_beside_a_full_network(monkeypatch):
    kohya = pytest.importorskip("lycoris.kohya")
    lycoris = kohya.LycorisNetworkKohya
    # LyCORIS's full preset without its by-name targets (which it names twice on this U-Net); its network reads
    # these class attributes by the class's own name, so they are set there, and put back after the test
    for attr, value in (("UNET_TARGET_REPLACE_MODULE", ["Transformer2DModel", "ResnetBlock2D", "Downsample2D",
                                                         "Upsample2D"]),
                        ("UNET_TARGET_REPLACE_NAME", []),
                        ("TEXT_ENCODER_TARGET_REPLACE_MODULE", ["CLIPAttention", "CLIPMLP"])):
        monkeypatch.setattr(lycoris, attr, value)
    theirs = lycoris(build_tiny_text_encoder(), build_tiny_unet(), lora_dim=2, network_module="locon",
                     train_norm=True, warn_on_unmatched=False)
    their_norms = {m.lora_name for m in theirs.unet_loras + theirs.text_encoder_loras
                   if type(m).__name__ == "NormModule"}
    ours = create_network(build_tiny_unet(), build_tiny_text_encoder(), preset="full", options={"train_norm": True})
    assert len(their_norms) > 50 and _norm_names(ours) == their_norms


def test_only_the_blocks_the_network_adapts_get_their_norms_updated():
    unet = build_tiny_unet()
    attention = create_network(unet, preset="attn-mlp", options={"train_norm": True})
    names = _norm_names(attention)
    assert names and all("_attentions_" in n for n in names)  # no ResNet norm: the preset leaves ResNets out
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1" in names
    assert "lora_unet_conv_norm_out" not in names  # outside every block
    attention.remove()
    without = create_network(unet, preset="attn-mlp")
    assert not _norm_names(without)
    without.remove()

    def down_only(name, layer):  # a block-wise rule: no module outside the down blocks
        from lorakit.network import ModuleSpec
        return ModuleSpec(2, 2.0) if "_down_blocks_" in name else None
    blockwise = create_network(unet, preset="full", ranks=down_only, options={"train_norm": True})
    assert _norm_names(blockwise) and all("_down_blocks_" in n for n in _norm_names(blockwise))


def test_sdxl_norms_are_named_as_kohya_names_sdxl_modules():
    from model_helpers import build_tiny_sdxl_components

    unet = build_tiny_sdxl_components()["unet"]
    names = _norm_names(create_network(unet, preset="full", options={"train_norm": True}))
    # diffusers' resnets.0.norm1 is in_layers.0 of the original U-Net, attentions.0.norm stays norm
    assert any(n.startswith("lora_unet_input_blocks_") and n.endswith("_0_in_layers_0") for n in names)
    assert any(n.endswith("_1_transformer_blocks_0_norm1") for n in names)


def test_cs_reads_the_weight_matrices_only():
    from lorakit.earlystop.cs import cs_value

    unet = build_tiny_unet()
    network = create_network(unet, preset="attn-mlp", options={"train_norm": True})
    with torch.no_grad():
        for adapter in network.adapters.values():
            for p in adapter.parameters():
                if p.requires_grad:
                    p.normal_(std=0.1)
    matrices = {n: a for n, a in network.adapters.items() if a.algorithm != "norm"}
    assert len(matrices) < len(network)
    assert cs_value(network) == pytest.approx(cs_value(matrices))


# ---- files --------------------------------------------------------------------------------------------------

def test_a_lycoris_train_norm_file_loads_here_and_ours_there_with_the_same_output(tmp_path, lycoris_state):  # noqa: F811
    from lycoris.kohya import create_network as lycoris_network
    from lycoris.kohya import create_network_from_weights
    from test_formats import _lycoris_randomize, _out

    from lorakit.formats import load_network, read_adapter, save_network

    unet = build_tiny_unet()
    # LyCORIS's full preset without its by-name targets (which it names twice on a diffusers U-Net)
    preset = tmp_path / "preset.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\nunet_target_name = []\n')
    theirs = lycoris_network(1.0, 4, 2.0, None, None, unet, algo="lora", train_norm=True, preset=str(preset))
    theirs.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    _lycoris_randomize(theirs)
    path = tmp_path / "lycoris.safetensors"
    theirs.save_weights(str(path), torch.float32, None)
    file = read_adapter(path)
    assert any(k.endswith(".w_norm") for k in file.tensors) and any(k.endswith(".b_norm") for k in file.tensors)
    ours_unet = build_tiny_unet()
    loaded, report = load_network(file, ours_unet)
    assert report.ok and _norm_names(loaded)
    torch.testing.assert_close(_out(ours_unet), _out(unet), atol=1e-5, rtol=1e-4)
    # and back: our file, read by LyCORIS's loader
    ours_path = save_network(loaded, tmp_path / "ours.safetensors")
    again = build_tiny_unet()
    network, _ = create_network_from_weights(1.0, str(ours_path), None, None, again)
    network.apply_to(None, again, apply_text_encoder=False, apply_unet=True)
    torch.testing.assert_close(_out(again), _out(unet), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def norm_file(base, tmp_path_factory):
    """A LoRA with train_norm, and native ΔW with bias updates (LyCORIS's full, diff_b), on the built-in model."""
    from test_tools import _random_adapter

    folder = tmp_path_factory.mktemp("norm")
    return {"lora": _random_adapter(base, folder / "norm.safetensors", preset="attn-mlp", train_norm=True,
                                    scale=0.2),
            "full": _random_adapter(base, folder / "full.safetensors", algorithm="full", preset="attn-only",
                                    scale=0.02)}


@pytest.mark.parametrize("algorithm", ["lora", "full"])
@pytest.mark.parametrize("merged", [False, True])
def test_applying_a_file_for_sampling_changes_the_norms_and_biases_as_loading_it_does(base, norm_file, algorithm,
                                                                                       merged):
    import copy

    from test_tools import unet_out

    from lorakit.formats import load_network
    from lorakit.tools.apply import applied

    path = norm_file[algorithm]
    before = unet_out(base)
    loaded = copy.deepcopy(base)
    load_network(path, loaded.unet, loaded.text_encoder)
    expected = unet_out(loaded)
    assert (expected - before).abs().max() > 1e-3
    with applied(base, [str(path)], merged=merged):
        torch.testing.assert_close(unet_out(base), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(unet_out(base), before)
    # a layer without a bias got one for the while (full's diff_b), and has none again
    assert base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.bias is None


def test_baking_a_norm_file_into_the_model_is_loading_it(base, norm_file):
    import copy

    from test_tools import unet_out

    from lorakit.formats import load_network
    from lorakit.tools.merge import bake

    loaded, baked = copy.deepcopy(base), copy.deepcopy(base)
    load_network(norm_file["lora"], loaded.unet, loaded.text_encoder)
    bake(baked, [str(norm_file["lora"])])
    torch.testing.assert_close(unet_out(baked), unet_out(loaded), atol=1e-5, rtol=1e-4)


def test_tools_that_write_a_lora_carry_the_norm_updates_over(base, norm_file, tmp_path):
    """merge --to-adapter sums them with their multipliers, resize keeps them: the result means what the source
    did (same U-Net output when loaded as when the source is applied)."""
    import copy

    from test_tools import unet_out

    from lorakit.formats import load_network, read_adapter
    from lorakit.tools.apply import applied
    from lorakit.tools.lowrank import RankRule
    from lorakit.tools.merge import combine
    from lorakit.tools.resize import resize_adapter

    source = read_adapter(norm_file["lora"])
    w_norms = {k: v for k, v in source.tensors.items() if k.endswith(".w_norm")}
    combined = combine([f"{norm_file['lora']}:0.3", f"{norm_file['lora']}:0.2"], base)
    out = combined.as_file()
    for key, value in w_norms.items():
        torch.testing.assert_close(out.tensors[key], value * 0.5)
    assert out.metadata["ss_network_module"] == "lycoris.kohya" and '"train_norm": "True"' in \
        out.metadata["ss_network_args"]
    assert any("norm-layer update(s) (train_norm) summed exactly" in n for n in combined.notes)
    with applied(base, [f"{norm_file['lora']}:0.5"]):
        expected = unet_out(base)
    model = copy.deepcopy(base)
    loaded, report = load_network(out, model.unet, model.text_encoder)
    assert report.ok and sum(a.kind == "norm" for a in loaded.adapters.values()) == len(w_norms)
    torch.testing.assert_close(unet_out(model), expected, atol=1e-5, rtol=1e-4)

    resized = resize_adapter(norm_file["lora"], RankRule(2)).as_file()
    assert all(torch.equal(resized.tensors[k], v) for k, v in w_norms.items())
    assert {t["lora_down.weight"].shape[0] for t in resized.modules().values() if "lora_down.weight" in t} == {2}


# ---- settings and training ----------------------------------------------------------------------------------

def test_the_diffusers_layout_refuses_norm_updates():
    from lorakit.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.network.args = {"train_norm": True}
    cfg.output.format = "diffusers"
    with pytest.raises(ConfigError, match=r"plain LoRA/LoCon only, not norm-layer updates \(train_norm\)"):
        cfg.validate()


@pytest.mark.slow
def test_a_run_with_train_norm_writes_a_file_lycoris_and_lorakit_read_as_trained(tiny_model_dir, tmp_path):
    import json

    from test_train import make_config, run_train, write_dataset

    from lorakit.formats import read_adapter

    cfg = make_config(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "run",
                      training={"max_epochs": 2}, network={"args": {"train_norm": True}},
                      early_stop={"mode": "report"})
    run_train(cfg)
    summary = (tmp_path / "run" / "summary.txt").read_text()
    file = read_adapter(tmp_path / "run" / "lorakit.safetensors")
    norms = {k: v for k, v in file.tensors.items() if k.endswith((".w_norm", ".b_norm"))}
    assert norms and any(bool(v.any()) for v in norms.values())  # trained: no longer zero
    assert file.metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(file.metadata["ss_network_args"])["train_norm"] == "True"
    n_norms = len({k.rsplit(".", 1)[0] for k in norms})
    assert f"({n_norms} of them norm layers: train_norm)" in summary
    # CS-Fluctuation read the weight matrices' updates: finite, every epoch
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    cs = [r["cs"] for r in log if "cs" in r]
    assert cs and all(math.isfinite(v) for v in cs)
    # --dim-from-weights on it, train_norm not set: the file's norm updates are modules of its network too (they
    # were refused as "not adapted in this run"), and the result holds the same modules
    again = make_config(tiny_model_dir, tmp_path / "data", tmp_path / "again", training={"max_epochs": 1},
                        network={"weights": str(tmp_path / "run" / "lorakit.safetensors"), "dim_from_weights": True},
                        early_stop={"mode": "off"})
    run_train(again)
    result = read_adapter(tmp_path / "again" / "lorakit.safetensors")
    assert result.tensors.keys() == file.tensors.keys()
    assert "trained: lora ranks 2 and layers from the file: " in (tmp_path / "again" / "summary.txt").read_text()
    assert json.loads(result.metadata["ss_network_args"])["algo"] == "lora"  # the norm updates go beside it


def test_max_norm_scales_the_weight_updates_and_leaves_the_norms_as_lycoris_does():
    from lorakit.max_norm import apply_max_norm, check_max_norm_supported, update_norm

    network = create_network(build_tiny_unet(), preset="attn-mlp", options={"train_norm": True})
    with torch.no_grad():
        for adapter in network.adapters.values():
            for key, p in adapter.named_parameters():
                if not key.startswith("base."):
                    p.normal_(std=1.0)
    check_max_norm_supported(network)  # no refusal for the norms
    norms_before = {n: a.w_norm.detach().clone() for n, a in network.adapters.items() if a.kind == "norm"}
    reading = apply_max_norm(network, 0.01)
    assert reading.keys_scaled == len(network) - len(norms_before)
    with torch.no_grad():
        assert all(float(update_norm(a)) <= 0.01 * 1.0001 for a in network.adapters.values() if a.kind != "norm")
    assert all(torch.equal(network[n].w_norm, w) for n, w in norms_before.items())


def test_extract_writes_the_norm_layers_differences_when_asked(base, norm_file):
    """A model with a LoRA and its norm updates baked in: extracted with --norms it is reproduced; without, the
    report says what is left out and how to keep it."""
    import copy

    from test_tools import unet_out

    from lorakit.formats import load_network
    from lorakit.tools.extract import extract_adapter
    from lorakit.tools.lowrank import RankRule
    from lorakit.tools.merge import bake

    tuned = copy.deepcopy(base)
    bake(tuned, [str(norm_file["lora"])])
    with_norms = extract_adapter(tuned, base, RankRule(8), preset="attn-mlp", norms=True)
    assert any("norm-layer update(s) (train_norm) written exactly" in n for n in with_norms.notes)
    model = copy.deepcopy(base)
    load_network(with_norms.as_file(), model.unet, model.text_encoder)
    torch.testing.assert_close(unet_out(model), unet_out(tuned), atol=1e-4, rtol=1e-3)

    without = extract_adapter(tuned, base, RankRule(8), preset="attn-mlp")
    assert not any(k.endswith(".w_norm") for k in without.as_file().tensors)
    assert any("--norms writes the norm layers' differences" in n for n in without.notes)


def test_the_norm_update_is_no_algorithm_to_train_a_network_with(tmp_path, capsys):
    """``--algorithm norm`` was offered by the help and crashed in the network preview (a norm update wraps norm
    layers only): it is refused before anything loads, saying where the norm update goes."""
    import subprocess
    import sys

    from lorakit.cli import main

    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--algorithm", "norm", "--dry-run", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    err = done.stderr
    assert done.returncode == 2 and "network.algorithm must be one of lora, loha" in err and "train_norm = true" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    listed = capsys.readouterr().out.split("  --algorithm ALGORITHM\n")[1].split("[network.algorithm]")[0]
    assert "dylora" in listed and "norm" not in listed
