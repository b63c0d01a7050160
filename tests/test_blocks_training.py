"""Block-wise training options: --blocks (the paper's coarse scheme), kohya's block_dims and per-block learning
rates (ramps, zero threshold); rank 0 = no module and no key; `lorakit inspect` shows ranks per block."""

from __future__ import annotations

import math
import types

import pytest
from conftest import build_tiny_unet

from lorakit.blocks import SD1, blocks_block_dims, coarse_groups, lr_weight_list, parse_block_lr_weights
from lorakit.config import TrainConfig, set_option
from lorakit.formats import read_adapter
from lorakit.inspection import format_report, inspect_file
from lorakit.methods import AdapterMethod, rank_rule

UPPER = {1, 2, 3, 22, 23, 24}  # IN0 = down_blocks.0 (IN01-IN03), OUT3 = up_blocks.3 (OUT09-OUT11)
MIDDLE = {4, 5, 6, 19, 20, 21}


def test_coarse_blocks_of_the_paper():
    assert coarse_groups("upper") == ("IN0", "OUT3")
    assert {i for i, d in enumerate(blocks_block_dims("upper", 8)) if d} == UPPER
    assert {i for i, d in enumerate(blocks_block_dims("upper,middle", 8)) if d} == UPPER | MIDDLE
    assert {i for i, d in enumerate(blocks_block_dims("bottom", 8)) if d} == {7, 8, 9, 16, 17, 18}
    assert {i for i, d in enumerate(blocks_block_dims("all", 8)) if d} == set(range(1, 25))  # never IN00
    assert {i for i, d in enumerate(blocks_block_dims("IN0, mid", 8)) if d} == {1, 2, 3, 12}
    with pytest.raises(ValueError, match="unknown blocks 'top'"):
        coarse_groups("upper,top")


def test_kohya_lr_weight_ramps():
    sine = lr_weight_list("sine")
    assert sine[0] == 0 and sine[-1] == pytest.approx(1) and sine[6] == pytest.approx(math.sin(math.pi * 6 / 22))
    assert lr_weight_list("cosine") == list(reversed(sine))
    assert lr_weight_list("linear")[11] == 1 and lr_weight_list("reverse_linear")[0] == 1
    assert lr_weight_list("zeros+0.5") == [0.5] * 12
    assert lr_weight_list("sine+.5")[0] == 0.5
    assert lr_weight_list("0.5,0") == [0.5, 0.0] + [1.0] * 10  # short lists filled with 1, as kohya
    with pytest.raises(ValueError, match="at most 12"):
        lr_weight_list(",".join(["1"] * 13))
    with pytest.raises(ValueError, match="'triangle': expected up to 12 numbers, one per block of that side"):
        lr_weight_list("triangle")
    weights = parse_block_lr_weights(down="sine", mid=0.05, up="linear", zero_threshold=0.1)
    # sine: IN00 0, IN01 sin(pi/22) = 0.14; mid 0.05; linear: OUT00 0, OUT01 1/11 = 0.09, OUT02 0.18
    assert weights.blocks[0] == 0 and weights.blocks[1] == pytest.approx(math.sin(math.pi / 22))
    assert weights.blocks[12] == 0 and weights.blocks[13] == 0 and weights.blocks[14] == 0
    assert weights.blocks[15] == pytest.approx(2 / 11)
    assert parse_block_lr_weights() is None


def _cfg(**network) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in network.items():
        set_option(cfg, f"network.{key}", value)
    return cfg


def test_blocks_option_trains_only_those_blocks_and_writes_no_other_key(tmp_path):
    cfg = _cfg(blocks="upper", preset="full", rank="4", alpha="2", conv_rank="2")
    model = types.SimpleNamespace(unet=build_tiny_unet(), text_encoder=None)
    method = AdapterMethod(cfg, model)
    blocks = {SD1.block_index(n) for n in method.network.names()}
    assert blocks == UPPER
    path = method.save(tmp_path, "upper", {})[0]
    file = read_adapter(path)
    assert all(SD1.block_index(n) in UPPER for n in file.modules())  # rank 0: no key at all
    ranks = {t["lora_down.weight"].shape[0] for n, t in file.modules().items() if n.endswith("conv1")}
    assert ranks == {2}
    text = format_report(inspect_file(path))
    line = next(x for x in text.splitlines() if x.startswith("block ranks:"))
    assert line == "block ranks: IN01 2-4, IN02 2-4, IN03 2, OUT09 2-4, OUT10 2-4, OUT11 2-4"
    with pytest.raises(ValueError, match="blocks and block_dims"):
        rank_rule(_cfg(blocks="upper", block_dims="[" + ",".join(["1"] * 25) + "]"))


def test_block_lr_weights_group_parameters_and_drop_zero_blocks():
    cfg = _cfg(preset="attn-mlp", down_lr_weight="zeros+0.5", mid_lr_weight="0",
               up_lr_weight='"0,0,0,0,0,0,1,1,1,2,2,2"')
    cfg.optimizer.learning_rate = 1e-3
    model = types.SimpleNamespace(unet=build_tiny_unet(), text_encoder=None)
    method = AdapterMethod(cfg, model)
    blocks = {SD1.block_index(n) for n in method.network.names()}
    assert 12 not in blocks and not blocks & set(range(13, 19))  # weight 0: no module
    groups = {g["name"]: g for g in method.param_groups()}
    assert set(groups) == {"unet x0.5", "unet x1", "unet x2"}
    assert groups["unet x0.5"]["lr"] == pytest.approx(5e-4) and groups["unet x2"]["lr"] == pytest.approx(2e-3)
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for ps in method.network.trainable_parameters().values() for p in ps)
    args = method.network.args
    assert args["mid_lr_weight"] == "0" and args["down_lr_weight"].startswith("0.5,")


def test_cli_train_with_blocks_and_block_lr(tiny_model_dir, tmp_path, capsys):
    from test_train import write_dataset

    from lorakit.cli import main

    data = write_dataset(tmp_path / "data", n=2)
    config = tmp_path / "job.toml"
    config.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[data]\ntrain_data = "{data}"\nbatch_size = 2\n'
                      '[training]\nmax_epochs = 1\n[early_stop]\nmode = "off"\n')
    out = tmp_path / "run"
    assert main(["train", str(config), "--rank", "2", "--blocks", "upper,middle", "--out", str(out), "--no-progress",
                 "--set", "network.preset=full", "--set", "network.up_lr_weight=sine"]) == 0
    file = read_adapter(out / "lorakit.safetensors")
    blocks = {SD1.block_index(n) for n in file.modules()}
    assert blocks == UPPER | MIDDLE
    assert '"up_lr_weight"' in file.metadata["ss_network_args"]
    capsys.readouterr()
    assert main(["train", str(config), "--blocks", "uper", "--out", str(tmp_path / "x")]) == 2
    assert "unknown blocks 'uper'" in capsys.readouterr().err
