"""Block maps: SD1.x 25 blocks, the paper's coarse scheme, kohya block_dims, LoRA Block Weight strings."""

from __future__ import annotations

import pytest
from torch import nn

from lorakit import blocks
from lorakit.blocks import SD1, BlockRanks, coarse_block_dims, paper_block_ranks, parse_block_weights
from lorakit.network import PRESETS, ModuleSpec, UniformRanks, components, select_targets


def _names(sd15_meta, preset: str) -> list[str]:
    unet, _ = sd15_meta
    comp = components(unet)[0]
    return [comp.kohya_name(p) for p, _ in select_targets(comp, PRESETS[preset].unet)]


@pytest.mark.parametrize("name, block", [
    ("conv_in", "IN00"),
    ("down_blocks.0.resnets.0.conv1", "IN01"),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k", "IN02"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "IN03"),
    ("down_blocks.1.attentions.0.proj_in", "IN04"),
    ("down_blocks.2.downsamplers.0.conv", "IN09"),
    ("lora_unet_down_blocks_3_resnets_1_conv2", "IN11"),
    ("lora_unet_mid_block_attentions_0_proj_out", "MID"),
    ("mid_block.resnets.1.time_emb_proj", "MID"),
    ("lora_unet_up_blocks_0_resnets_0_conv1", "OUT00"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "OUT02"),  # the sampler sits in the level's last block
    ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "OUT03"),
    ("lycoris_up_blocks_2_attentions_2_proj_in", "OUT08"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0", "OUT11"),
    ("conv_out", None),
    ("time_embedding.linear_1", None),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", None),
])
def test_block_of_module(name, block):
    assert blocks.block_name(name) == block


def test_block_counts_kohya_and_full(sd15_meta):
    kohya = blocks.count_by_block(_names(sd15_meta, "kohya"))
    # 12 modules per Transformer2DModel: 2 per attention block in, 1 mid, 3 per level out
    assert kohya == {b: 12 for b in ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04",
                                     "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")}
    full = blocks.count_by_block(_names(sd15_meta, "full"))
    assert sum(full.values()) == 278
    assert full["IN01"] == 15  # 12 + conv1, conv2, time_emb_proj
    assert full["IN04"] == 16  # + conv_shortcut (320 -> 640)
    assert full["IN03"] == full["IN06"] == full["IN09"] == 1  # downsamplers
    assert full["IN10"] == full["IN11"] == 3
    assert full["MID"] == 12 + 6
    assert full["OUT00"] == full["OUT01"] == 4 and full["OUT02"] == 5  # + upsampler
    assert "IN00" not in full and "other" not in full
    lycoris = blocks.count_by_block(_names(sd15_meta, "lycoris-full"))
    assert lycoris["IN00"] == 1 and lycoris["other"] == 3  # conv_in; conv_out + time_embedding


def test_coarse_blocks_and_paper_presets():
    assert blocks.coarse_block("down_blocks.0.attentions.0.proj_in") == "IN0"
    assert blocks.coarse_block("lora_unet_down_blocks_3_resnets_0_conv1") == "IN3"
    assert blocks.coarse_block("mid_block.attentions.0.proj_in") == "MID"
    assert blocks.coarse_block("up_blocks.3.attentions.2.proj_out") == "OUT3"
    assert blocks.coarse_block("conv_in") is None
    upper = coarse_block_dims("upper", 8)
    assert len(upper) == 25
    assert [SD1.names[i] for i, d in enumerate(upper) if d] == ["IN01", "IN02", "IN03", "OUT09", "OUT10", "OUT11"]
    middle = coarse_block_dims("middle", 4)
    assert [SD1.names[i] for i, d in enumerate(middle) if d] == ["IN04", "IN05", "IN06", "OUT06", "OUT07", "OUT08"]
    bottom = coarse_block_dims(["IN2", "OUT1"], 4)
    assert [SD1.names[i] for i, d in enumerate(bottom) if d] == ["IN07", "IN08", "IN09", "OUT03", "OUT04", "OUT05"]
    with pytest.raises(ValueError, match="unknown block preset"):
        coarse_block_dims("top", 4)


def test_block_dims_rule_removes_blocks(sd15_meta):
    unet, _ = sd15_meta
    comp = components(unet)[0]
    targets = select_targets(comp, PRESETS["full"].unet)
    dims = [0] + [4] * 24
    dims[SD1.parse_block_id("IN04")] = 0
    dims[SD1.parse_block_id("MID")] = 0
    dims[SD1.parse_block_id("OUT11")] = 16
    conv_dims = [2] * 25
    conv_dims[SD1.parse_block_id("IN04")] = 0
    rule = BlockRanks(dims, alpha=2.0, conv_block_dims=",".join(map(str, conv_dims)), conv_block_alphas=[1.0] * 25)
    specs = {comp.kohya_name(p): rule(comp.kohya_name(p), m) for p, m in targets}
    kept = {n: s for n, s in specs.items() if s is not None}
    counts = blocks.count_by_block(kept)
    assert "IN04" not in counts
    assert counts["MID"] == 4  # the k x k convs keep their conv_block_dims
    assert len(kept) == 278 - 16 - 14
    assert specs["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q"] == ModuleSpec(16, 2.0)
    assert specs["lora_unet_up_blocks_3_resnets_2_conv1"] == ModuleSpec(2, 1.0)
    assert specs["lora_unet_up_blocks_3_resnets_2_conv_shortcut"] == ModuleSpec(16, 2.0)  # 1x1: linear dims
    # without conv_block_dims, k x k convs are left out (kohya)
    linear_only = BlockRanks([4] * 25)
    assert linear_only("lora_unet_up_blocks_3_resnets_2_conv1", unet.up_blocks[3].resnets[2].conv1) is None
    assert BlockRanks([4] * 25).network_args()["block_dims"] == ",".join(["4"] * 25)


def test_block_dims_validation():
    with pytest.raises(ValueError, match="block_dims needs 25 values"):
        BlockRanks([4] * 17)
    with pytest.raises(ValueError, match="block_alphas"):
        BlockRanks([4] * 25, block_alphas="1,2,x" + ",1" * 22)


def test_paper_block_ranks_text_encoder(sd15_meta):
    rule = paper_block_ranks("upper", 8, 4.0, text_encoder=True)
    lin = nn.Linear(4, 4)
    assert rule("lora_te_text_model_encoder_layers_0_mlp_fc1", lin) == ModuleSpec(8, 4.0)
    assert rule("lora_unet_down_blocks_0_attentions_0_proj_in", lin) == ModuleSpec(8, 4.0)
    assert rule("lora_unet_down_blocks_1_attentions_0_proj_in", lin) is None
    assert paper_block_ranks("upper", 8, 4.0)("lora_te_text_model_encoder_layers_0_mlp_fc1", lin) is None
    assert UniformRanks(8, 4.0)("x", lin) == ModuleSpec(8, 4.0)


def test_lbw_17_values():
    w = parse_block_weights("0.5, 1,0.9, 0.8,0.7, 0.6,0.5, 0.4, 0.3,0.2,0.1, 1,1,1, 1,1,2")
    assert w("lora_te_text_model_encoder_layers_3_mlp_fc2") == 0.5
    assert w("lora_unet_down_blocks_0_attentions_0_proj_in") == 1.0  # IN01
    assert w("lora_unet_down_blocks_0_attentions_1_proj_in") == 0.9  # IN02
    assert w("lora_unet_down_blocks_1_attentions_0_proj_in") == 0.8  # IN04
    assert w("lora_unet_down_blocks_2_attentions_1_proj_in") == 0.5  # IN08
    assert w("lora_unet_mid_block_attentions_0_proj_in") == 0.4
    assert w("lora_unet_up_blocks_1_attentions_0_proj_in") == 0.3  # OUT03
    assert w("lora_unet_up_blocks_3_attentions_2_proj_in") == 2.0  # OUT11
    # blocks a 17-value string does not list get 0, as in the extension
    assert w("lora_unet_down_blocks_0_downsamplers_0_conv") == 0.0  # IN03
    assert w("lora_unet_up_blocks_0_resnets_1_conv1") == 0.0  # OUT01
    assert w("conv_out") == 1.0  # outside every block
    assert w.by_block()["IN04"] == 0.8


def test_lbw_26_values_and_presets():
    values = [float(i) for i in range(26)]
    w = parse_block_weights(",".join(f"{v:g}" for v in values))
    assert w("lora_te_text_model_encoder_layers_0_mlp_fc1") == 0
    assert w("lora_unet_down_blocks_0_downsamplers_0_conv") == 4  # IN03 -> 1 + 3
    assert w("lora_unet_mid_block_resnets_0_conv1") == 13
    assert w("lora_unet_up_blocks_0_upsamplers_0_conv") == 16  # OUT02
    assert w("lora_unet_up_blocks_3_resnets_2_conv2") == 25
    midd = parse_block_weights("MIDD")
    assert midd.base == 1
    assert midd("lora_unet_down_blocks_0_attentions_0_proj_in") == 0
    assert midd("lora_unet_down_blocks_1_attentions_0_proj_in") == 0  # IN04
    assert midd("lora_unet_down_blocks_1_attentions_1_proj_in") == 1  # IN05
    assert midd("lora_unet_up_blocks_2_attentions_0_proj_in") == 1  # OUT06
    assert midd("lora_unet_up_blocks_2_attentions_1_proj_in") == 0  # OUT07
    assert parse_block_weights("outall")("lora_unet_up_blocks_3_attentions_0_proj_in") == 1
    assert parse_block_weights("ALL0.5")("lora_unet_mid_block_attentions_0_proj_in") == 0.5
    with pytest.raises(ValueError, match="17 or 26 values"):
        parse_block_weights("1,1,1")
    with pytest.raises(ValueError, match="numbers"):
        parse_block_weights(",".join(["a"] * 17))


# ---- SDXL --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ldm", "diffusers", "block"), [
    ("input_blocks_1_0_in_layers_2", "down_blocks_0_resnets_0_conv1", "IN01"),
    ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv", "IN03"),
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "IN04"),
    ("input_blocks_8_1_proj_in", "down_blocks_2_attentions_1_proj_in", "IN08"),
    ("middle_block_1_proj_out", "mid_block_attentions_0_proj_out", "MID"),
    ("output_blocks_0_1_proj_in", "up_blocks_0_attentions_0_proj_in", "OUT00"),
    ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv", "OUT02"),
    ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv", "OUT05"),
    ("output_blocks_8_0_out_layers_3", "up_blocks_2_resnets_2_conv2", "OUT08"),
])
def test_sdxl_blocks_are_the_same_for_kohya_ldm_names_and_diffusers_names(ldm, diffusers, block):
    assert blocks.SDXL.block_name(f"lora_unet_{ldm}") == block
    assert blocks.SDXL.block_name(f"lora_unet_{diffusers}") == block
    assert blocks.SDXL.block_name("lora_te2_text_model_encoder_layers_0_mlp_fc1") is None  # BASE
    assert len(blocks.SDXL) == 19 and blocks.BLOCK_MAPS["sdxl"] is blocks.SDXL


def test_sdxl_block_weights_take_the_extensions_20_values_or_sd1s_26_without_the_blocks_sdxl_lacks():
    w = parse_block_weights("0.5," + ",".join(str(i) for i in range(19)), blocks.SDXL)
    assert w.base == 0.5 and w("lora_unet_input_blocks_4_1_proj_in") == 4 and w("lora_unet_middle_block_1_proj_in") == 9
    assert w("lora_unet_output_blocks_8_1_proj_in") == 18 and w("lora_te1_text_model_encoder_layers_0_mlp_fc1") == 0.5
    w26 = parse_block_weights(",".join(str(i) for i in range(26)), blocks.SDXL)  # BASE, IN00-IN11, M00, OUT00-OUT11
    assert w26("lora_unet_input_blocks_8_1_proj_in") == 9 and w26("lora_unet_middle_block_1_proj_in") == 13
    assert w26("lora_unet_output_blocks_0_1_proj_in") == 14 and w26("lora_unet_output_blocks_8_1_proj_in") == 22
    with pytest.raises(ValueError, match="sdxl block-weight string has 12, 20 or 26 values"):
        parse_block_weights("MIDD", blocks.SDXL)  # the presets are SD1.x's 17-value strings
    # the extension's 12-value shorthand: BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05; the other blocks 0
    w12 = parse_block_weights("0.5,1,2,3,4,5,6,7,8,9,10,11", blocks.SDXL)
    assert w12.base == 0.5 and [w12.blocks[blocks.SDXL.names.index(b)] for b in ("IN04", "IN05", "IN07", "IN08")] \
        == [1, 2, 3, 4]
    assert w12("lora_unet_middle_block_1_proj_in") == 5 and w12("lora_unet_output_blocks_5_1_proj_in") == 11
    assert w12("lora_unet_output_blocks_6_0_in_layers_2") == 0 and w12("lora_unet_input_blocks_1_0_in_layers_2") == 0
    with pytest.raises(ValueError, match="sd1 block-weight string has 17 or 26 values"):
        parse_block_weights("0.5,1,2,3,4,5,6,7,8,9,10,11", blocks.SD1)


def test_kohya_block_lr_order_on_sdxls_unet():
    """sdxl_train.py's get_block_params_to_optimize reads the block off the LDM name: 0 time and label embeddings,
    1-9 input blocks 0-8, 10-12 the middle block's resnet, attention, resnet, 13-21 output blocks 0-8, 22 out."""
    import json
    from pathlib import Path

    from lorakit.blocks import fine_tune_block_count, fine_tune_blocks_of

    config = json.loads((Path(__file__).parents[1] / "lorakit/configs/sdxl/unet/config.json").read_text())
    assert fine_tune_block_count(config) == 23
    expected = {"time_embedding.linear_1.weight": 0, "add_embedding.linear_2.bias": 0, "conv_in.weight": 1,
                "down_blocks.0.resnets.1.conv1.weight": 3, "down_blocks.0.downsamplers.0.conv.weight": 4,
                "down_blocks.1.attentions.0.proj_in.weight": 5, "down_blocks.2.resnets.1.norm1.weight": 9,
                "mid_block.resnets.0.conv1.weight": 10, "mid_block.attentions.0.proj_out.weight": 11,
                "mid_block.resnets.1.conv2.weight": 12, "up_blocks.0.resnets.0.conv1.weight": 13,
                "up_blocks.0.upsamplers.0.conv.weight": 15, "up_blocks.2.resnets.2.conv2.bias": 21,
                "conv_norm_out.weight": 22, "conv_out.bias": 22}
    assert fine_tune_blocks_of(expected, config) == expected
