"""Target selection, kohya names, applying and removing adapter networks."""

from __future__ import annotations

import pytest
import torch
from model_helpers import SD15_TE, build_tiny_unet, randomize, unet_inputs

from lorakit.adapters import Adapter
from lorakit.blocks import parse_block_weights
from lorakit.network import PRESETS, UniformRanks, components, create_network, select_targets

EXPECTED_COUNTS = {  # SD1.5 shape: (U-Net, text encoder)
    "kohya": (192, 72),
    "attn-only": (160, 48),
    "attn-mlp": (192, 72),
    "full": (278, 72),
    "lycoris-full": (282, 72),
    "ia3": (80, 36),  # keys and values of 32 attentions, 16 feed-forwards; CLIP's k, v and fc2 of 12 layers
}


def _target_names(sd15_meta, preset):
    unet_comp, te_comp = components(*sd15_meta)
    p = PRESETS[preset]
    return ([unet_comp.kohya_name(path) for path, _ in select_targets(unet_comp, p.unet)],
            [te_comp.kohya_name(path) for path, _ in select_targets(te_comp, p.text_encoder)])


def test_every_preset_is_counted():
    assert set(PRESETS) == set(EXPECTED_COUNTS)


@pytest.mark.parametrize("preset", sorted(EXPECTED_COUNTS))
def test_preset_counts_on_sd15(sd15_meta, preset):
    unet_names, te_names = _target_names(sd15_meta, preset)
    assert (len(unet_names), len(te_names)) == EXPECTED_COUNTS[preset]
    assert len(set(unet_names)) == len(unet_names)


def test_kohya_names_on_sd15(sd15_meta):
    unet_names, te_names = _target_names(sd15_meta, "kohya")
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_proj_in",
                 "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
                 "lora_unet_up_blocks_3_attentions_2_proj_out"):
        assert name in unet_names
    assert not any("resnets" in n or "samplers" in n for n in unet_names)
    # transformers 5 has no `text_model.` level; kohya's names keep it
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_names
    assert "lora_te_text_model_encoder_layers_5_self_attn_out_proj" in te_names
    # on SD1.5 kohya's class-based selection and the attn-mlp name table agree
    assert set(unet_names) == set(_target_names(sd15_meta, "attn-mlp")[0])
    full_names, _ = _target_names(sd15_meta, "full")
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in full_names
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in full_names
    assert "lora_unet_mid_block_resnets_1_time_emb_proj" in full_names
    assert "lora_unet_conv_in" not in full_names


def test_create_network_on_sd15_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TE))
    network = create_network(unet, te, preset="kohya", ranks=UniformRanks(8, 4))
    assert len(network.names("unet")) == 192 and len(network.names("text_encoder")) == 72
    tensors = network.file_tensors()
    assert len(tensors) == 264 * 3
    down = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert tuple(down.shape) == (8, 320, 1, 1)
    assert tuple(tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape) == (3072, 8)
    assert tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"].shape == ()
    assert isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, Adapter)
    assert network.args["preset"] == "kohya" and "conv_dim" not in network.args


@pytest.fixture
def full_network(tiny_unet, tiny_text_encoder):
    originals = {name: m for name, m in tiny_unet.named_modules()}
    state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    network = create_network(tiny_unet, tiny_text_encoder, preset="full",
                             ranks=UniformRanks(4, 2.0, conv_rank=2, conv_alpha=1.0))
    randomize(network)
    return tiny_unet, tiny_text_encoder, network, originals, state


def _out(unet):
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def test_apply_changes_outputs_and_merge_unmerge_restore(full_network):
    unet, te, network, _, state = full_network
    assert len(network.names("unet")) > 100 and len(network.names("text_encoder")) == 12
    assert network.args["conv_dim"] == "2" and network.args["conv_alpha"] == "1"
    adapted = _out(unet)
    network.set_multiplier(0.0)
    base = _out(unet)
    network.set_multiplier(1.0)
    assert not torch.allclose(adapted, base, atol=1e-4)
    network.merge()
    assert network.merged
    torch.testing.assert_close(_out(unet), adapted, atol=1e-5, rtol=1e-4)
    network.unmerge()
    for name, adapter in network.adapters.items():
        path = name.removeprefix("lora_unet_")
        if name.startswith("lora_unet_"):
            key = next(k for k in state if k.replace(".", "_") == f"{path}_weight")
            assert torch.equal(adapter.base.weight, state[key]), name


def test_remove_restores_original_modules(full_network):
    unet, te, network, originals, state = full_network
    network.merge()
    network.remove()
    assert len(network) == 0
    now = dict(unet.named_modules())
    assert now.keys() == originals.keys()
    assert all(now[k] is originals[k] for k in originals)
    after = unet.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad for p in unet.parameters())  # as built; adapters had frozen them
    assert not any(isinstance(m, Adapter) for m in te.modules())


def test_set_multiplier_is_linear_per_layer(full_network):
    unet, _, network, _, _ = full_network
    x_lin = torch.randn(3, 32)
    x_conv = torch.randn(1, 32, 8, 8)
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_resnets_0_conv1"):
        layer = network[name]
        x = x_conv if layer.kind == "conv" else x_lin
        outs = {}
        for m in (0.0, 1.0, 2.5):
            network.set_multiplier(m)
            with torch.no_grad():
                outs[m] = layer(x)
        torch.testing.assert_close(outs[2.5] - outs[0.0], 2.5 * (outs[1.0] - outs[0.0]), atol=1e-5, rtol=1e-4)
    # block weights scale per module; merged networks re-merge
    network.merge()
    network.set_multiplier(0.5, parse_block_weights("OUTALL"))
    assert network.merged
    assert network["lora_unet_down_blocks_0_attentions_0_proj_in"].multiplier == 0.0
    assert network["lora_unet_up_blocks_3_attentions_0_proj_in"].multiplier == 0.5
    assert network["lora_te_text_model_encoder_layers_0_mlp_fc1"].multiplier == 0.5  # BASE = 1


def test_trainable_parameters_by_group(full_network):
    _, _, network, _, _ = full_network
    groups = network.trainable_parameters()
    assert set(groups) == {"unet", "text_encoder"}
    assert len(groups["text_encoder"]) == 2 * 12
    assert len(groups["unet"]) == 2 * len(network.names("unet"))
    base_ids = {id(a.base.weight) for a in network.adapters.values()}
    assert not any(id(p) in base_ids for ps in groups.values() for p in ps)
    assert all(p.requires_grad for ps in groups.values() for p in ps)


def test_no_double_application_and_atomic_creation(tiny_unet):
    create_network(tiny_unet, preset="attn-only")
    with pytest.raises(ValueError, match="already carries an adapter"):
        create_network(tiny_unet, preset="attn-only")


    unet = build_tiny_unet()
    before = dict(unet.named_modules())
    calls = []

    def failing(algorithm, base, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        from lorakit.adapters import make_adapter
        return make_adapter(algorithm, base, **kw)

    with pytest.raises(RuntimeError, match="boom"):
        create_network(unet, preset="kohya", factory=failing)
    assert all(dict(unet.named_modules())[k] is v for k, v in before.items())


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'everything'"):
        create_network(None, preset="everything")


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "ia3", "full", "glora", "boft", "oft", "dylora"])
def test_every_algorithm_adapts_lycoris_full_s_extra_layers(algorithm):
    """LyCORIS's own `full` preset (what a LyCORIS kohya config names, or names by default) also adapts conv_in,
    conv_out and the time embedding: every algorithm builds there, and the gradient reaches those adapters."""
    unet = build_tiny_unet()
    network = create_network(unet, preset="lycoris-full", ranks=UniformRanks(4, 4.0, 4, 4.0), algorithm=algorithm)
    extra = [n for n in network.names() if n.endswith(("conv_in", "conv_out", "time_embedding_linear_1"))]
    assert len(extra) == 3
    randomize(network)
    unet(*unet_inputs()).sample.square().mean().backward()
    for name in extra:
        grads = [p.grad for k, p in network[name].named_parameters() if not k.startswith("base.") and p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), name
        if algorithm == "oft" and name.endswith("conv_out"):
            continue  # 4 output channels in blocks of 1 (LyCORIS's factorization(4, 4)): a 1×1 rotation is fixed
        assert any(float(g.abs().max()) > 0 for g in grads), name
