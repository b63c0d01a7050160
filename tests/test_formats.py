"""Adapter files: round trips, metadata, other clients (diffusers, LyCORIS) both ways, bad input."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from model_helpers import build_tiny_text_encoder, build_tiny_unet, randomize, unet_inputs
from safetensors.torch import save_file

from lorakit.formats import (
    AdapterFile,
    AdapterFileError,
    describe_modules,
    guess_base_model,
    load_network,
    module_rank,
    read_adapter,
    save_network,
    training_metadata,
    write_adapter,
)
from lorakit.network import UniformRanks, create_network


def _out(unet, seed=1):
    with torch.no_grad():
        return unet(*unet_inputs(seed)).sample


def _te_out(te):
    ids = torch.tensor([[0, 5, 17, 42, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def _saved(tmp_path, algorithm="lora", preset="kohya", rank=4, alpha=2.0, te=True, name="a.safetensors", **kw):
    unet, encoder = build_tiny_unet(), build_tiny_text_encoder() if te else None
    network = create_network(unet, encoder, preset=preset, algorithm=algorithm,
                             ranks=UniformRanks(rank, alpha, conv_rank=2, conv_alpha=1.0), options=kw)
    randomize(network)
    path = save_network(network, tmp_path / name, training_metadata(learning_rate=1e-4, tag_frequency={
        "5_cat": {"cat": 5, "red": 2}}))
    return path, unet, encoder, network


# ---- round trip -------------------------------------------------------------------------------------------

def test_round_trip_exact(tmp_path):
    path, unet, te, network = _saved(tmp_path, preset="full")
    expected = network.file_tensors()
    file = read_adapter(path)
    assert file.tensors.keys() == expected.keys()
    for key, tensor in expected.items():
        assert file.tensors[key].dtype == tensor.dtype and torch.equal(file.tensors[key], tensor), key
    meta = file.metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_learning_rate"] == "0.0001"
    assert json.loads(meta["ss_tag_frequency"]) == {"5_cat": {"cat": 5, "red": 2}}
    assert meta["lorakit_preset"] == "full" and len(meta["sshs_model_hash"]) == 64

    unet2, te2 = build_tiny_unet(), build_tiny_text_encoder()
    assert not torch.equal(_out(unet2), _out(unet))
    loaded, report = load_network(path, unet2, te2)
    assert report.ok and sorted(report.matched) == sorted(network.names())
    assert torch.equal(_out(unet2), _out(unet))
    assert torch.equal(_te_out(te2), _te_out(te))
    reloaded = loaded.file_tensors()
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[k], v) for k, v in expected.items())
    assert loaded.source == str(path)
    resaved = read_adapter(save_network(loaded, tmp_path / "c.safetensors"))
    assert all(torch.equal(resaved.tensors[k], v) for k, v in expected.items())
    assert resaved.metadata["ss_network_module"] == "networks.lora"

    # metadata survives a rewrite; fp16 for distribution
    copy = write_adapter(tmp_path / "b.safetensors", file.tensors, file.metadata, dtype=torch.float16)
    again = read_adapter(copy)
    assert again.metadata == meta
    assert all(t.dtype == torch.float16 for t in again.tensors.values())


def test_describe_and_guess(tmp_path):
    path, *_ = _saved(tmp_path, preset="full")
    infos = describe_modules(read_adapter(path))
    by_name = {i.name: i for i in infos}
    conv = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert (conv.algorithm, conv.rank, conv.alpha, conv.block, conv.component) == ("lora", 2, 1.0, "IN01", "unet")
    q = by_name["lora_te_text_model_encoder_layers_1_self_attn_q_proj"]
    assert (q.rank, q.alpha, q.block, q.component) == (4, 2.0, None, "text_encoder")
    # the tiny model's widths match no real base model; real widths do
    assert guess_base_model(read_adapter(path)) is None
    sd15 = AdapterFile({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                        torch.zeros(4, 768)})
    assert guess_base_model(sd15) == "sd1"
    assert guess_base_model(AdapterFile({"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.ones(())})) \
        == "sdxl"


def test_only_unet_given_skips_text_encoder(tmp_path):
    path, unet, *_ = _saved(tmp_path)
    unet2 = build_tiny_unet()
    network, report = load_network(path, unet2)
    assert report.ok and len(report.skipped) == 12 and all(n.startswith("lora_te_") for n in report.skipped)
    assert network.groups == ["unet"]
    assert torch.equal(_out(unet2), _out(unet))


def test_write_refuses_overwrite_and_is_atomic(tmp_path):
    target = tmp_path / "x.safetensors"
    write_adapter(target, {"a.alpha": torch.ones(())})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_adapter(target, {"a.alpha": torch.zeros(())})
    assert float(read_adapter(target).tensors["a.alpha"]) == 1.0
    write_adapter(target, {"a.alpha": torch.zeros(())}, overwrite=True)
    assert float(read_adapter(target).tensors["a.alpha"]) == 0.0
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]  # no temporary files left behind
    with pytest.raises(ValueError, match="must end in .safetensors"):
        write_adapter(tmp_path / "x.pt", {"a.alpha": torch.ones(())})
    with pytest.raises(ValueError, match="unknown training metadata"):
        training_metadata(learning_rte=1e-4)


# ---- bad input ----------------------------------------------------------------------------------------------

def test_truncated_file(tmp_path):
    path, *_ = _saved(tmp_path, te=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterFileError, match=r"cut\.safetensors: .*truncated or corrupt"):
        read_adapter(cut)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(data[:20])
    with pytest.raises(AdapterFileError, match=r"stub\.safetensors: .*truncated"):
        read_adapter(stub)


class _Boom:
    """Unpickling this would create a file: proves the reader never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_pickles_are_refused_unopened(tmp_path, kind):
    marker = tmp_path / "unpickled"
    for name in ("model.ckpt", "model.safetensors"):  # the content decides, not the name
        path = tmp_path / name
        if kind == "torch-zip":
            torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "boom": _Boom(str(marker))}, path)
        else:
            path.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=4))
        with pytest.raises(AdapterFileError, match=f"{name}: .*pickle.*never unpickles"):
            read_adapter(path)
        with pytest.raises(AdapterFileError, match=name):
            load_network(path, build_tiny_unet())
    assert not marker.exists()


def test_header_length_that_looks_like_a_pickle(tmp_path):
    # a header of 0x380 bytes starts the file with b"\x80\x03", as a protocol-3 pickle does
    body = json.dumps({"m.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes((0x380).to_bytes(8, "little") + body.ljust(0x380) + b"\x00\x00\x80\x3f")
    assert path.read_bytes()[:2] == b"\x80\x03"
    assert float(read_adapter(path).tensors["m.alpha"]) == 1.0
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(AdapterFileError, match=r"short\.safetensors: .*truncated"):
        read_adapter(tmp_path / "short.safetensors")


def test_not_safetensors_at_all(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"\x0f\x00\x00\x00\x00\x00\x00\x00this is no json")
    with pytest.raises(AdapterFileError, match=r"notes\.safetensors: not a safetensors file"):
        read_adapter(path)


def test_other_architecture_is_refused(tmp_path):
    # kohya SDXL names: two text encoders, LDM block names
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4),
    }
    path = tmp_path / "xl.safetensors"
    save_file(sdxl, path)
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    before = dict(unet.named_modules())
    with pytest.raises(AdapterFileError,
                       match=r"xl\.safetensors: does not fit the model \(the file looks like sdxl.*"
                             r"'lora_te1_text_model_encoder_layers_0_self_attn_q_proj'"):
        load_network(path, unet, te)
    assert dict(unet.named_modules()) == before  # untouched
    # not strict: the report says what did not fit
    network, report = load_network(path, unet, te, strict=False)
    assert len(network) == 0 and len(report.unmatched) == 2 and report.file_base_model == "sdxl"


def test_other_width_names_the_key(tmp_path):
    path, *_ = _saved(tmp_path, te=False)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    wider = UNet2DConditionModel(  # same names, cross-attention width 64 instead of 32
        sample_size=8, layers_per_block=2, block_out_channels=(32, 64, 64, 64), norm_num_groups=16,
        cross_attention_dim=64, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with pytest.raises(AdapterFileError) as err:
        load_network(path, wider)
    msg = str(err.value)
    assert msg.startswith(f"{path}: does not fit the model")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight: shape (4, 32)" \
        in msg
    assert not any(type(m).__name__ == "LoRA" for m in wider.modules())


def test_shape_mismatch_in_file(tmp_path):
    path, *_ = _saved(tmp_path)
    tensors = dict(read_adapter(path).tensors)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2.lora_up.weight"
    rows = tensors[key].shape[0]
    tensors[key] = torch.zeros(rows + 1, 4)
    tensors["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(4, 4)
    tensors["lora_unet_down_blocks_0_resnets_0_conv1.oft_diag"] = torch.ones(32)  # LyCORIS 1.x's OFT
    bad = write_adapter(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(AdapterFileError, match=rf"bad\.safetensors: .*{key}: shape \({rows + 1}, 4\)"):
        load_network(bad, build_tiny_unet(), build_tiny_text_encoder())
    network_models = (build_tiny_unet(), build_tiny_text_encoder())
    network, report = load_network(bad, *network_models, strict=False)
    assert list(report.mismatched) == ["lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"]
    assert report.unmatched == ["lora_unet_no_such_module"]
    assert "'oft-legacy'" in report.unsupported["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert len(network) == len(read_adapter(path).modules()) - 1
    with pytest.raises(AdapterFileError, match="already carries an adapter"):
        load_network(path, *network_models)


# ---- other clients -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [4.0, 2.0])
def test_diffusers_loads_lorakit_lora(tmp_path, alpha):
    # StableDiffusionPipeline's loader, without importing the whole pipeline
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    path, unet, *_ = _saved(tmp_path, preset="kohya", rank=4, alpha=alpha, te=False)
    theirs = build_tiny_unet()
    state_dict, alphas = Loader.lora_state_dict(str(path))
    Loader.load_lora_into_unet(state_dict, alphas, theirs)
    assert type(theirs.down_blocks[0].attentions[0].proj_in).__module__.startswith("peft")
    torch.testing.assert_close(_out(theirs), _out(unet), atol=1e-5, rtol=1e-4)


@pytest.fixture
def lycoris_state():
    """LyCORIS keeps presets in class attributes; restore them after each test."""
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.wrapper import LycorisNetwork

    saved = {cls: dict(vars(cls)) for cls in (LycorisNetwork, LycorisNetworkKohya)}
    # LyCORIS 4.1.3's default `full` preset names time_embedding twice on a diffusers U-Net (as the
    # TimestepEmbedding class and by name), which fails an assertion while it builds its loader network
    LycorisNetworkKohya.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    yield
    for cls, attrs in saved.items():
        for key in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "UNET_TARGET_REPLACE_MODULE",
                    "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE", "MODULE_ALGO_MAP",
                    "NAME_ALGO_MAP", "LORA_PREFIX", "TARGET_EXCLUDE_NAME"):
            if key in attrs:
                setattr(cls, key, attrs[key])


def _lycoris_randomize(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "org_" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


ALGOS = ["lora", "loha", "lokr"]


@pytest.mark.parametrize("alpha", [4.0, 2.0])
@pytest.mark.parametrize("algorithm", ALGOS)
def test_lycoris_loads_lorakit_file(tmp_path, lycoris_state, algorithm, alpha):
    from lycoris.kohya import create_network_from_weights

    preset = "full" if algorithm == "lora" else "kohya"
    path, unet, *_ = _saved(tmp_path, algorithm=algorithm, preset=preset, rank=4, alpha=alpha, te=False)
    theirs = build_tiny_unet()
    network, _ = create_network_from_weights(1.0, str(path), None, None, theirs)
    network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    file = read_adapter(path)
    assert len(network.unet_loras) == len(file.modules())
    if algorithm != "lora":  # how kohya + LyCORIS record other algorithms
        assert file.metadata["ss_network_module"] == "lycoris.kohya"
        assert json.loads(file.metadata["ss_network_args"])["algo"] == algorithm
    torch.testing.assert_close(_out(theirs), _out(unet), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("alpha", [4.0, 2.0])
@pytest.mark.parametrize("algorithm", ALGOS)
def test_lorakit_loads_lycoris_wrapper_file(tmp_path, lycoris_state, algorithm, alpha):
    from lycoris import create_lycoris

    theirs = build_tiny_unet()
    network = create_lycoris(theirs, 1.0, linear_dim=4, linear_alpha=alpha, algo=algorithm, preset="attn-mlp",
                             factor=4)
    network.apply_to()
    _lycoris_randomize(network)
    expected = _out(theirs)  # LyCORIS's training forward is the reference
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    file = read_adapter(path)
    assert all(k.startswith("lycoris_") for k in file.tensors)
    ours = build_tiny_unet()
    loaded, report = load_network(file, ours)
    assert report.ok and len(loaded) == len(file.modules())
    assert {i.algorithm for i in describe_modules(file)} == {algorithm}
    torch.testing.assert_close(_out(ours), expected, atol=1e-5, rtol=1e-4)


def test_lorakit_loads_kohya_style_file_with_text_encoder(tmp_path, lycoris_state):
    """A `lora_unet_`/`lora_te_` file written by a kohya network module (LyCORIS's kohya network)."""
    from lycoris.kohya import create_network

    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    network = create_network(1.0, 4, 2.0, None, te, unet, algo="lora", preset="attn-mlp")
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    _lycoris_randomize(network)
    path = tmp_path / "kohya.safetensors"
    network.save_weights(str(path), torch.float32, None)
    file = read_adapter(path)
    assert any(k.startswith("lora_te_") for k in file.tensors)
    unet2, te2 = build_tiny_unet(), build_tiny_text_encoder()
    loaded, report = load_network(file, unet2, te2)
    assert report.ok and len(loaded) == len(file.modules())
    assert len(loaded.names("text_encoder")) == 12
    # read under the transformers-5 path LyCORIS wrote, kept under kohya's canonical name
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in loaded
    torch.testing.assert_close(_out(unet2), _out(unet), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_te_out(te2), _te_out(te), atol=1e-5, rtol=1e-4)
    for name, adapter in loaded.adapters.items():
        lyco = next(lora for lora in network.loras if lora.lora_name.replace("text_model_", "") ==
                    name.replace("text_model_", ""))
        torch.testing.assert_close(adapter.delta_weight(), lyco.get_diff_weight(multiplier=1.0)[0].reshape(
            adapter.delta_weight().shape), atol=1e-6, rtol=1e-5)


def test_network_dim_is_the_adapters_rank_even_without_a_rank_key(tmp_path):
    """A LoKr whose halves are both full stores no rank-shaped tensor; ss_network_dim is still its rank (as
    kohya/LyCORIS record the dim they were given)."""
    path, _, _, network = _saved(tmp_path, algorithm="lokr", preset="attn-only", rank=4, alpha=2.0,
                                 full_matrix=True)
    assert all(module_rank(t) is None for t in read_adapter(path).modules().values())
    assert read_adapter(path).metadata["ss_network_dim"] == "4"
