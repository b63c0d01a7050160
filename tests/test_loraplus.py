"""LoRA+ (kohya's network_args loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio): the up
matrices in parameter groups of their own at the ratio's learning rate, with kohya's block learning rates too; one
real step shows the up matrices moving ratio times as far; algorithms without an up matrix refuse it."""

from __future__ import annotations

import json
import types

import pytest
from conftest import build_tiny_text_encoder, build_tiny_unet
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import make_config, run_train, write_dataset

from lorakit.config import ConfigError, TrainConfig, set_option
from lorakit.methods import AdapterMethod


def _method(**network) -> AdapterMethod:
    cfg = TrainConfig()
    cfg.optimizer.learning_rate = 1e-3
    for key, value in network.items():
        set_option(cfg, f"network.{key}", value)
    model = types.SimpleNamespace(unet=build_tiny_unet(), text_encoders=(build_tiny_text_encoder(),))
    return AdapterMethod(cfg, model)


def _names(params, method: AdapterMethod) -> set[str]:
    ids = {id(p) for p in params}
    return {f"{n}.{k}" for n in method.network.names() for k, p in method.network[n].named_parameters()
            if id(p) in ids}


def test_the_up_matrices_get_groups_of_their_own_at_each_network_s_ratio():
    method = _method(loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio="4", train_text_encoder="true")
    groups = {g["name"]: g for g in method.param_groups()}
    assert set(groups) == {"unet", "unet plus", "text_encoder", "text_encoder plus"}
    assert groups["unet plus"]["lr"] == pytest.approx(16e-3) and groups["unet"]["lr"] == pytest.approx(1e-3)
    assert groups["text_encoder plus"]["lr"] == pytest.approx(4e-3)  # its own ratio before the shared one
    assert all(".lora_up." in n for n in _names(groups["unet plus"]["params"], method))
    assert not any(".lora_up." in n for n in _names(groups["unet"]["params"], method))
    every = [p for ps in method.network.trainable_parameters().values() for p in ps]
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(every) and {id(p) for p in grouped} == {id(p) for p in every}
    assert method.network.args["loraplus_lr_ratio"] == "16"  # ss_network_args, where kohya keeps it
    assert {g["name"] for g in _method().param_groups()} == {"unet"}  # off: the groups as before


def test_loraplus_with_kohya_block_learning_rates():
    method = _method(loraplus_lr_ratio="8", down_lr_weight="zeros+0.5", mid_lr_weight="1",
                     up_lr_weight='"1,1,1,1,1,1,1,1,1,2,2,2"')
    groups = {g["name"]: g["lr"] for g in method.param_groups()}
    assert groups == pytest.approx({"unet x0.5": 5e-4, "unet x0.5 plus": 4e-3, "unet x1": 1e-3,
                                    "unet x1 plus": 8e-3, "unet x2": 2e-3, "unet x2 plus": 16e-3})


def test_algorithms_without_an_up_matrix_and_bad_ratios_are_refused():
    with pytest.raises(ConfigError, match="LoRA\\+ speeds up the up matrices .* loha has none"):
        _method(algorithm='"loha"', loraplus_lr_ratio="16")
    cfg = TrainConfig()
    cfg.network.loraplus_unet_lr_ratio = 0.0
    with pytest.raises(ConfigError, match="network.loraplus_unet_lr_ratio must be positive"):
        cfg.validate()


def test_one_step_moves_the_up_matrices_ratio_times_as_far(tiny_model_dir, tmp_path):
    """LoRA's up matrices start at zero and the down ones get no gradient in the first step; AdamW's first step
    moves every element by about its learning rate, so the up matrices end ratio times as far from zero."""
    data = write_dataset(tmp_path / "data")
    ups = {}
    for ratio in (None, 16.0):
        out = tmp_path / f"run-{ratio}"
        network = {} if ratio is None else {"loraplus_lr_ratio": ratio}
        run_train(make_config(tiny_model_dir, data, out, training={"max_steps": 1}, network=network))
        tensors = load_file(str(out / "lorakit.safetensors"))
        ups[ratio] = max(float(t.abs().max()) for k, t in tensors.items() if k.endswith("lora_up.weight"))
        with safe_open(str(out / "lorakit.safetensors"), "pt") as f:
            args = json.loads(f.metadata()["ss_network_args"])
        assert ("loraplus_lr_ratio" in args) == (ratio is not None)
    assert ups[16.0] / ups[None] == pytest.approx(16, rel=1e-3)


def test_each_groups_rate_is_logged_when_a_run_has_several(tiny_model_dir, tmp_path):
    """log.jsonl (and the trackers) get lr/<group> beside lr when the groups' rates differ, as kohya's lr/unet and
    lr/textencoder; a run of one group logs lr alone."""
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 1},
                          network={"loraplus_lr_ratio": 4.0, "train_text_encoder": True},
                          optimizer={"text_encoder_lr": 5e-4, "lr_scheduler": "linear"}))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    first, last = records[0], records[-1]
    assert {k for k in first if k.startswith("lr/")} == {"lr/unet", "lr/unet plus", "lr/text_encoder",
                                                           "lr/text_encoder plus"}
    for record in (first, last):  # every group follows the schedule
        assert record["lr/unet"] == pytest.approx(record["lr"])
        assert record["lr/unet plus"] == pytest.approx(4 * record["lr"])
        assert record["lr/text_encoder"] == pytest.approx(0.5 * record["lr"])
    assert last["lr"] < first["lr"]
    run_train(make_config(tiny_model_dir, data, tmp_path / "one", training={"max_epochs": 1}))
    one = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])
    assert "lr" in one and not any(k.startswith("lr/") for k in one)
