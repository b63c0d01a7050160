"""Issue 17: a failed load leaves the model untouched; every layout of a file loads with the same ΔW."""

from __future__ import annotations

import re

import pytest
import torch
from model_helpers import build_tiny_text_encoder, build_tiny_unet, randomize, unet_inputs

from lorakit.errors import LorakitError
from lorakit.formats import AdapterFile, load_network, read_adapter, save_network, write_adapter
from lorakit.network import UniformRanks, create_network


def _out(unet, seed=1):
    with torch.no_grad():
        return unet(*unet_inputs(seed)).sample


def _te_out(te):
    ids = torch.tensor([[0, 5, 17, 42, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def _network(algorithm="lora", preset="full", te=True, seed=0, **options):
    unet, encoder = build_tiny_unet(), build_tiny_text_encoder() if te else None
    network = create_network(unet, encoder, preset=preset, algorithm=algorithm,
                             ranks=UniformRanks(4, 2.0, conv_rank=2, conv_alpha=1.0), options=options)
    randomize(network, seed=seed)
    return unet, encoder, network


def _grad_names(*models) -> set[str]:
    return {f"{i}.{n}" for i, m in enumerate(models) for n, p in m.named_parameters() if p.requires_grad}


# ---- 1. a failed load leaves the model untouched ----------------------------------------------------------

Q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _bad_files(tmp_path):
    """(label, path) of files that each fail in one way, each also holding modules that would load."""
    _, _, network = _network()
    good = network.file_tensors()
    q = {k.split(".", 1)[1]: v for k, v in good.items() if k.startswith(f"lora_unet_{Q}.")}
    ff = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
    cases = {
        "unmatched": {**good, "lora_unet_no_such_module.lora_down.weight": torch.zeros(4, 4),
                      "lora_unet_no_such_module.lora_up.weight": torch.zeros(4, 4)},
        "shape": {**good, f"{ff}.lora_up.weight": torch.zeros(good[f"{ff}.lora_up.weight"].shape[0] + 1, 4)},
        "missing_key": {k: v for k, v in good.items() if k != f"{ff}.lora_up.weight"},
        "unsupported": {**good, "lora_unet_down_blocks_0_resnets_0_conv1.oft_diag": torch.ones(32)},
        "loose_key": {**good, "emb_params": torch.zeros(2, 32)},
        # the same layer twice: a kohya name and LyCORIS's wrapper name (two files joined)
        "duplicate": {**good, **{f"lycoris_{Q}.{k}": v for k, v in q.items()}},
    }
    paths = {}
    for label, tensors in cases.items():
        paths[label] = write_adapter(tmp_path / f"{label}.safetensors", tensors)
    data = save_network(network, tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    paths["truncated"] = tmp_path / "cut.safetensors"
    paths["no_file"] = tmp_path / "absent.safetensors"
    return paths


@pytest.mark.parametrize("case", ["unmatched", "shape", "missing_key", "unsupported", "loose_key", "duplicate",
                                  "truncated", "no_file"])
def test_failed_load_leaves_the_model_untouched(tmp_path, case):
    path = _bad_files(tmp_path)[case]
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    te.encoder.layers[0].mlp.fc1.weight.requires_grad_(False)  # a flag that is not the default survives too
    before, te_before, grads = _out(unet), _te_out(te), _grad_names(unet, te)
    modules = [type(m) for m in unet.modules()] + [type(m) for m in te.modules()]
    with pytest.raises(LorakitError) as err:
        load_network(path, unet, te)
    assert str(path) in str(err.value)
    assert torch.equal(_out(unet), before) and torch.equal(_te_out(te), te_before)
    assert _grad_names(unet, te) == grads
    assert [type(m) for m in unet.modules()] + [type(m) for m in te.modules()] == modules


def test_duplicate_names_the_layer_and_not_strict_keeps_the_first(tmp_path):
    path = _bad_files(tmp_path)["duplicate"]
    with pytest.raises(LorakitError, match=rf"'lycoris_{Q}' names the same layer as 'lora_unet_{Q}'"):
        load_network(path, build_tiny_unet(), build_tiny_text_encoder())
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    grads = _grad_names(unet, te)
    network, report = load_network(path, unet, te, strict=False)
    assert report.duplicates == {f"lycoris_{Q}": f"lora_unet_{Q}"} and f"lora_unet_{Q}" in network
    network.remove()
    assert _grad_names(unet, te) == grads


def test_second_load_onto_an_adapted_model_changes_nothing(tmp_path):
    _, _, network = _network()
    path = save_network(network, tmp_path / "a.safetensors")
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    first, _ = load_network(path, unet, te)
    before, grads = _out(unet), _grad_names(unet, te)
    with pytest.raises(LorakitError, match="already carries an adapter"):
        load_network(path, unet, te)
    assert torch.equal(_out(unet), before) and _grad_names(unet, te) == grads
    first.remove()


def test_not_strict_restores_flags_of_modules_that_failed(tmp_path):
    path = _bad_files(tmp_path)["shape"]
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    grads = _grad_names(unet, te)
    network, report = load_network(path, unet, te, strict=False)
    assert len(report.mismatched) == 1
    layer = unet.mid_block.attentions[0].transformer_blocks[0].ff.net[2]
    assert layer.weight.requires_grad  # built, refused, and not left frozen
    network.remove()
    assert _grad_names(unet, te) == grads


@pytest.mark.parametrize("where", ["planning", "attaching"])
def test_unforeseen_failures_are_named_and_undone(tmp_path, monkeypatch, where):
    """A bug or an odd model midway (after some adapters were built, or attached) still leaves the model as it was."""
    from lorakit.adapters.lora import LoRA
    from lorakit.network import AdapterNetwork

    _, _, network = _network()
    path = save_network(network, tmp_path / "a.safetensors")
    calls = {"n": 0}

    def fail_on_fifth(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("something unforeseen")
            return original(*args, **kwargs)
        return wrapper

    if where == "planning":
        monkeypatch.setattr(LoRA, "from_file_tensors", classmethod(fail_on_fifth(LoRA.from_file_tensors.__func__)))
    else:
        monkeypatch.setattr(AdapterNetwork, "attach", fail_on_fifth(AdapterNetwork.attach))
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    before, grads = _out(unet), _grad_names(unet, te)
    with pytest.raises(LorakitError, match=rf"{path}: .*something unforeseen"):
        load_network(path, unet, te)
    assert calls["n"] == 5
    assert torch.equal(_out(unet), before) and _grad_names(unet, te) == grads
    assert not any(type(m).__name__ == "LoRA" for m in unet.modules())


def test_in_memory_file_errors_name_it():
    file = AdapterFile({"lora_unet_nothing.lora_down.weight": torch.zeros(2, 2),
                        "lora_unet_nothing.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(LorakitError, match="<in memory>"):
        load_network(file, build_tiny_unet())


# ---- 2. LyCORIS wrapper names for the text encoder, transformers 4 and 5 layouts ----------------------------

@pytest.mark.parametrize("layout", ["lycoris_text_model_encoder_", "lycoris_encoder_", "lora_te_text_model_encoder_"])
def test_lycoris_text_encoder_names_in_both_layouts(tmp_path, layout):
    unet, te, network = _network(preset="attn-mlp")
    tensors = {k.replace("lora_te_text_model_encoder_", layout): v for k, v in network.file_tensors().items()}
    assert sum(k.startswith(layout) for k in tensors) == 12 * 3
    path = write_adapter(tmp_path / "te.safetensors", tensors)
    unet2, te2 = build_tiny_unet(), build_tiny_text_encoder()
    loaded, report = load_network(path, unet2, te2)
    assert report.ok and len(loaded.names("text_encoder")) == 12
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in loaded  # kept under kohya's canonical name
    assert torch.equal(_te_out(te2), _te_out(te)) and torch.equal(_out(unet2), _out(unet))


# ---- 4. half-precision files run in float32 -----------------------------------------------------------------

# fp8 files too (an isfinite traceback, then "Promotion for Float8 Types is not supported", before)
HALF_CASES = [("lora", torch.float16), ("lora", torch.bfloat16), ("loha", torch.bfloat16), ("lokr", torch.float16),
              ("ia3", torch.bfloat16), ("full", torch.float16), ("lora", torch.float8_e4m3fn),
              ("loha", torch.float8_e5m2)]


@pytest.mark.parametrize("algorithm, dtype", HALF_CASES)
def test_half_precision_file_runs_like_its_upcast_values(tmp_path, algorithm, dtype):
    _, _, network = _network(algorithm=algorithm, preset="attn-mlp", te=False)
    half = save_network(network, tmp_path / "half.safetensors", dtype=dtype)
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in read_adapter(half).tensors.items()}
    single = write_adapter(tmp_path / "single.safetensors", upcast)
    outs, networks = [], []
    for path in (half, single):
        unet = build_tiny_unet()
        networks.append(load_network(path, unet)[0])
        outs.append(_out(unet))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    assert all(p.dtype == torch.float32 for a in networks[0].adapters.values()
               for k, p in a.named_parameters() if not k.startswith("base."))


# ---- 3. DoRA: strength 0 is the base model; per-input columns by default, as A1111 and ComfyUI read it -------

def _a1111_comfy_dora(w0, down, up, magnitude, scale, strength):
    """DoRA as A1111 (network.py: finalize_updown, apply_weight_decompose) and ComfyUI (weight_adapter/base.py:
    weight_decompose, input axis) apply a per-input-column file, written from their description: the scaled
    update is added first, columns of W0 + ΔW are normalised, and the strength scales W' − W0."""
    merged = w0 + scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w0.shape)
    norms = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    norms = norms.reshape(1, -1, *([1] * (w0.dim() - 2)))
    return strength * (merged * magnitude / norms - w0)


@pytest.mark.parametrize("on_out", [False, True])
def test_dora_strength_zero_is_the_base_model(tmp_path, on_out):
    unet0 = build_tiny_unet()
    base = _out(unet0)
    _, _, network = _network(preset="full", te=False, dora=True, wd_on_out=on_out)
    path = save_network(network, tmp_path / "dora.safetensors")
    unet = build_tiny_unet()
    loaded, _ = load_network(path, unet, multiplier=0.0)
    assert torch.equal(_out(unet), base)
    loaded.set_multiplier(1.0)
    assert not torch.allclose(_out(unet), base)
    loaded.set_multiplier(0.0)
    assert torch.equal(_out(unet), base)


def test_dora_default_layout_is_per_input_and_matches_a1111_comfyui(tmp_path):
    _, _, network = _network(preset="full", te=False, dora=True)
    name = "lora_unet_down_blocks_1_resnets_0_conv1"  # a 3x3 conv, in 32 -> out 64
    tensors = network[name].file_tensors()
    assert tuple(tensors["dora_scale"].shape) == (1, 32, 1, 1)
    path = save_network(network, tmp_path / "dora.safetensors")
    assert read_adapter(path).metadata["ss_network_args"].count('"wd_on_output": "False"') == 1
    loaded, _ = load_network(path, build_tiny_unet(), multiplier=0.6)
    for key in (name, f"lora_unet_{Q}"):
        adapter, t = loaded[key], read_adapter(path).modules()[key]
        scale = float(t["alpha"]) / t["lora_down.weight"].shape[0]
        expected = _a1111_comfy_dora(adapter.base.weight, t["lora_down.weight"], t["lora_up.weight"],
                                     t["dora_scale"], scale, 0.6)
        torch.testing.assert_close(adapter.delta_weight(), expected, rtol=1e-5, atol=1e-6)


# ---- 5. the diffusers / PEFT layout, both ways ------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]


class _Pipe:
    """The least a diffusers LoRA loader mixin needs of a pipeline: the two models."""

    hf_device_map = None

    def __init__(self, unet, te):
        self.unet, self.text_encoder = unet, te

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def _diffusers_pipe(unet, te):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    cls = type("TinyPipe", (_Pipe, StableDiffusionLoraLoaderMixin), {})
    return cls(unet, te)


def _peft_models(alpha: float, seed: int = 3):
    """A tiny U-Net and text encoder with PEFT LoRA adapters (random A and B), as diffusers' scripts train them."""
    from peft import LoraConfig

    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False,
                                rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 1.0}))
    te.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=TE_TARGETS, init_lora_weights=False))
    return unet, te


def _save_with_diffusers(folder, unet, te, metadata: bool):
    from peft.utils import get_peft_model_state_dict

    pipe = _diffusers_pipe(unet, te)
    kwargs = {}
    if metadata:  # what diffusers' current training scripts pass
        kwargs = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
                  "text_encoder_lora_adapter_metadata": te.peft_config["default"].to_dict()}
    type(pipe).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                 text_encoder_lora_layers=get_peft_model_state_dict(te), **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("metadata", [True, False])
def test_lorakit_loads_a_diffusers_made_lora(tmp_path, metadata):
    unet, te = _peft_models(alpha=8.0)
    path = _save_with_diffusers(tmp_path, unet, te, metadata)
    file = read_adapter(path)
    assert file.layout == "diffusers" and any(k.startswith("unet.") and k.endswith("lora_A.weight")
                                              for k in file.tensors)
    ours_unet, ours_te = build_tiny_unet(), build_tiny_text_encoder()
    loaded, report = load_network(path, ours_unet, ours_te)
    n_unet = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    assert report.ok and len(loaded.names("unet")) == n_unet and len(loaded.names("text_encoder")) == 6
    if metadata:  # the file says every scale (conv1: alpha 1, rank 2): the trained model itself is the reference
        reference = _diffusers_pipe(unet, te)
    else:  # the file has no alphas (the per-module ones are lost): diffusers' own reading is the reference
        reference = _diffusers_pipe(build_tiny_unet(), build_tiny_text_encoder())
        reference.load_lora_weights(str(path))
    torch.testing.assert_close(_out(ours_unet), _out(reference.unet), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_te_out(ours_te), _te_out(reference.text_encoder), rtol=1e-5, atol=1e-6)


def _peft_state(unet, te):
    from peft.utils import get_peft_model_state_dict

    return ({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()} |
            {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(te).items()})


def _variant(state, kind):
    """Other layouts of the same alpha = rank LoRA that circulate: made with diffusers' own converters."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    if kind == "kohya-converted":  # diffusers' PEFT -> kohya converter (lora_te1_ even for one encoder)
        return convert_state_dict_to_kohya(state)
    if kind == "diffusers-old":  # lora.down / lora_linear_layer.down
        return convert_state_dict_to_diffusers(state)
    if kind == "attn-processors":  # the U-Net's attention processors before PEFT
        out = {}
        for k, v in state.items():
            for proj, new in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"),
                              ("to_out.0", "to_out_lora")):
                for ab, role in (("lora_A", "down"), ("lora_B", "up")):
                    if k.startswith("unet.") and k.endswith(f".{proj}.{ab}.weight"):
                        k = k.replace(f".{proj}.{ab}.weight", f".processor.{new}.{role}.weight")
            out[k] = v
        return out
    if kind == "bare-peft":  # get_peft_model_state_dict of the U-Net alone, as PeftModel names it
        return {f"base_model.model.{k.removeprefix('unet.')}": v for k, v in state.items() if k.startswith("unet.")}
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["kohya-converted", "diffusers-old", "attn-processors", "bare-peft"])
def test_lorakit_loads_converted_variants(tmp_path, kind):
    unet, te = _peft_models(alpha=4.0)
    for name, module in unet.named_modules():  # the converters know no per-module alpha: keep every scale 1
        if name.endswith(".conv1") and hasattr(module, "scaling"):
            module.scaling["default"] = 1.0
    tensors = _variant(_peft_state(unet, te), kind)
    path = write_adapter(tmp_path / f"{kind}.safetensors", tensors)
    ours_unet, ours_te = build_tiny_unet(), build_tiny_text_encoder()
    loaded, report = load_network(path, ours_unet, ours_te)
    assert report.ok, report.summary()
    torch.testing.assert_close(_out(ours_unet), _out(unet), rtol=1e-5, atol=1e-6)
    if kind != "bare-peft":
        assert len(loaded.names("text_encoder")) == 6
        torch.testing.assert_close(_te_out(ours_te), _te_out(te), rtol=1e-5, atol=1e-6)


def test_a_peft_folder_is_read_with_the_scale_its_config_gives(tmp_path):
    """PEFT's save_pretrained keeps lora_alpha in adapter_config.json, not in adapter_model.safetensors: read alone,
    a LoRA trained at lora_alpha = 2r was applied at half its ΔW (and conv1, alpha 1 at rank 2, at twice)."""
    from peft import LoraConfig, get_peft_model

    unet = build_tiny_unet()
    torch.manual_seed(5)
    peft_model = get_peft_model(unet, LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                                                 init_lora_weights=False, rank_pattern={"conv1": 2},
                                                 alpha_pattern={"conv1": 1.0}))
    peft_model.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    ours = build_tiny_unet()
    loaded, report = load_network(weights, ours)
    assert report.ok and read_adapter(weights).metadata["lorakit_scale_from"] == "adapter_config.json"
    torch.testing.assert_close(_out(ours), _out(unet), rtol=1e-5, atol=1e-6)
    from lorakit.inspection import format_report, inspect_file

    said = format_report(inspect_file(weights))
    assert "alphas:      8 ×" in said and "(from the adapter_config.json beside the file)" in said
    assert "lorakit_scale_from" not in said  # not in the file's own metadata
    with pytest.raises(LorakitError, match=r"a PEFT adapter folder \(save_pretrained's\); give its file, .*"
                                           r"adapter_model.safetensors \(the adapter_config.json beside it is read"):
        read_adapter(tmp_path / "peft")
    # the same tensors under another name are a file of their own (alpha = rank), as any reader takes them
    (tmp_path / "renamed.safetensors").write_bytes(weights.read_bytes())
    assert "lorakit_scale_from" not in read_adapter(tmp_path / "renamed.safetensors").metadata
    unscaled = build_tiny_unet()
    load_network(tmp_path / "renamed.safetensors", unscaled)
    assert not torch.allclose(_out(unscaled), _out(unet), rtol=1e-3, atol=1e-4)  # what reading it alone cost
    # a config that cannot be read, or is not a LoRA's, is said (the scale would be guessed)
    config = tmp_path / "peft" / "adapter_config.json"
    config.write_text("{not json")
    with pytest.raises(LorakitError, match="adapter_config.json: not readable JSON"):
        read_adapter(weights)
    config.write_text('{"peft_type": "VERA", "r": 4}')
    with pytest.raises(LorakitError, match="a PEFT config of type 'VERA'; lorakit reads PEFT's LoRA, LoHa and LoKr"):
        read_adapter(weights)


def _peft_lycoris_config(kind: str):
    from peft import LoHaConfig, LoKrConfig

    targets = ["to_q", "to_k", "ff.net.2", "conv1", "proj_in"]
    if kind == "loha":  # Tucker convs (use_effective_conv2d), a rank and alpha of its own for conv1
        return LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False, use_effective_conv2d=True,
                          rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 1.0})
    if kind == "loha-flat":  # convs as flattened matrices
        return LoHaConfig(r=4, alpha=2, target_modules=targets, init_weights=False)
    if kind == "lokr":  # at r = 4 the tiny U-Net's small layers keep both halves full (scale alpha/r all the same)
        return LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False, use_effective_conv2d=True)
    if kind == "lokr-both":  # both halves decomposed where they can be
        return LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False, decompose_both=True,
                          decompose_factor=4)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["loha", "loha-flat", "lokr", "lokr-both"])
def test_a_peft_loha_or_lokr_folder_applies_the_delta_peft_applies(tmp_path, kind):
    """PEFT's LoHa and LoKr keep LyCORIS's tensor names and shapes under base_model.model. paths, with alpha in the
    adapter_config.json; a LoKr module with both halves full is scaled by PEFT (alpha/r) where LyCORIS does not."""
    from peft import get_peft_model

    unet = build_tiny_unet()
    torch.manual_seed(7)
    peft_model = get_peft_model(unet, _peft_lycoris_config(kind))
    peft_model.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    ours = build_tiny_unet()
    loaded, report = load_network(weights, ours)
    wanted = sum(1 for n, m in unet.named_modules() if hasattr(m, "hada_w1_a") or hasattr(m, "lokr_w1"))
    assert report.ok and len(loaded.adapters) == wanted
    assert {a.algorithm for a in loaded.adapters.values()} == {kind.split("-")[0]}
    torch.testing.assert_close(_out(ours), _out(unet), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key, kind", [("to_q.ia3_l", "(IA)³"), ("to_q.oft_R.weight", "OFT"), ("to_q.boft_R", "BOFT")])
def test_a_peft_file_of_another_adapter_than_lora_is_named(tmp_path, key, kind):
    """PEFT's own names for LoHa, LoKr, ... (what get_peft_model_state_dict gives, as in peft 0.21) were read as kohya
    names: "algorithm 'unknown' (keys model.down_blocks...)" on a module called base_model."""
    path = write_adapter(tmp_path / "adapter_model.safetensors",
                         {f"base_model.model.down_blocks.0.attentions.0.attn1.{key}": torch.ones(2)})
    with pytest.raises(LorakitError, match=rf"a PEFT {re.escape(kind)} file \(base_model.model.… keys\); lorakit reads "
                                           "PEFT's LoRA, LoHa and LoKr files"):
        read_adapter(path)


def test_diffusers_loads_lorakit_diffusers_format(tmp_path):
    from model_helpers import build_tiny_text_encoder as te_builder

    unet, te = build_tiny_unet(), te_builder()
    network = create_network(unet, te, preset="full", ranks=UniformRanks(4, 2.0, conv_rank=2, conv_alpha=3.0))
    randomize(network)
    path = save_network(network, tmp_path / "d.safetensors", format="diffusers")
    file = read_adapter(path)
    assert file.layout == "diffusers" and file.metadata["lorakit_format"] == "diffusers"
    assert "unet.down_blocks.1.resnets.0.conv1.lora_A.weight" in file.tensors
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in file.tensors
    theirs = _diffusers_pipe(build_tiny_unet(), build_tiny_text_encoder())
    theirs.load_lora_weights(str(path))
    torch.testing.assert_close(_out(theirs.unet), _out(unet), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_te_out(theirs.text_encoder), _te_out(te), rtol=1e-5, atol=1e-6)
    # and lorakit reads its own diffusers file back to the same model
    again_unet, again_te = build_tiny_unet(), build_tiny_text_encoder()
    loaded, report = load_network(path, again_unet, again_te)
    assert report.ok and sorted(loaded.names()) == sorted(network.names())
    torch.testing.assert_close(_out(again_unet), _out(unet), rtol=1e-5, atol=1e-6)


def test_diffusers_format_refuses_what_it_cannot_hold(tmp_path):
    _, _, network = _network(algorithm="loha", preset="attn-only", te=False)
    with pytest.raises(LorakitError, match=r"x\.safetensors: the diffusers/PEFT layout holds plain LoRA/LoCon .*"
                                           r"\(loha\).*lorakit resize --to lora"):
        save_network(network, tmp_path / "x.safetensors", format="diffusers")
    assert not (tmp_path / "x.safetensors").exists()


# ---- 7. inspect says what a diffusers-layout file holds -----------------------------------------------------

def test_inspect_a_diffusers_made_file(tmp_path, capsys):
    from lorakit.cli import main

    unet, te = _peft_models(alpha=8.0)
    path = _save_with_diffusers(tmp_path, unet, te, metadata=True)
    n_unet = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    n_conv = sum(1 for n, _ in unet.named_modules() if n.endswith("conv1.lora_A"))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout:      diffusers/PEFT" in out
    assert f"algorithm:   lora ×{n_unet + 6}\n" in out
    assert f"modules:     text encoder 6, U-Net {n_unet} ({n_unet + 6} in all)" in out
    assert f"ranks:       4 ×{n_unet + 6 - n_conv}, 2 ×{n_conv}" in out
    assert f"alphas:      8 ×{n_unet + 6 - n_conv}, 1 ×{n_conv}" in out
    assert "blocks:      IN01 " in out
    assert out.strip().splitlines()[-1].startswith("summary: pytorch_lora_weights.safetensors: LoRA adapter")


def test_dora_in_the_diffusers_layout_both_ways(tmp_path):
    from peft import LoraConfig

    # PEFT-made DoRA (output-row magnitudes) -> lorakit
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "proj_in", "conv1"], use_dora=True,
                                init_lora_weights=False))
    te.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():  # magnitudes away from ‖W0 + ΔW‖, as after training
        for name, p in unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.3)
    path = _save_with_diffusers(tmp_path, unet, te, metadata=True)
    ours = build_tiny_unet()
    loaded, report = load_network(path, ours)
    assert report.ok and all(a.dora_scale is not None and a.wd_on_out for a in loaded.adapters.values())
    torch.testing.assert_close(_out(ours), _out(unet), rtol=1e-5, atol=1e-6)
    # lorakit's output-row DoRA -> diffusers; input-column DoRA cannot be written there
    mine, _, network = _network(preset="full", te=False, dora=True, wd_on_out=True)
    written = save_network(network, tmp_path / "rows.safetensors", format="diffusers")
    theirs = _diffusers_pipe(build_tiny_unet(), build_tiny_text_encoder())
    theirs.load_lora_weights(str(written))
    torch.testing.assert_close(_out(theirs.unet), _out(mine), rtol=1e-5, atol=1e-6)
    _, _, columns = _network(preset="attn-only", te=False, dora=True)
    with pytest.raises(LorakitError, match="input-column norms"):
        save_network(columns, tmp_path / "columns.safetensors", format="diffusers")
