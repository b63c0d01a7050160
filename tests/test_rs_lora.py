"""rsLoRA (network.args rs_lora, LyCORIS's rs_lora, PEFT's use_rslora): the scale alpha / √rank, written as an alpha
of alpha · √rank so that every reader's alpha / rank gives it; the same numbers as LyCORIS's own modules, a run
that writes them, and the settings it cannot mean anything with refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lorakit.adapters import make_adapter
from lorakit.config import ConfigError
from lorakit.errors import InvalidValueError


@pytest.mark.parametrize(("algorithm", "lycoris_module", "alpha"), [
    ("lora", "locon.LoConModule", 2.0), ("loha", "loha.LohaModule", 2.0), ("lokr", "lokr.LokrModule", 3.0),
    ("lora", "locon.LoConModule", None)])
def test_the_alpha_and_scale_are_lycoris_rs_lora_ones(algorithm, lycoris_module, alpha):
    import importlib

    module, name = lycoris_module.split(".")
    theirs_cls = getattr(importlib.import_module(f"lycoris.modules.{module}"), name)
    torch.manual_seed(0)
    base = nn.Linear(1280, 1280) if algorithm == "lokr" else nn.Linear(32, 32)  # LoKr: its w2 decomposed at rank 16
    ours = make_adapter(algorithm, base, rank=16, alpha=alpha, rs_lora=True)
    plain = make_adapter(algorithm, base, rank=16, alpha=alpha)
    theirs = theirs_cls("x", base, lora_dim=16, alpha=alpha or 0, rs_lora=True)
    assert float(ours.alpha) == pytest.approx(float(theirs.alpha))
    assert ours.scale == pytest.approx(theirs.scale) == pytest.approx((alpha or 16) / math.sqrt(16))
    assert ours.scale == pytest.approx(4 * plain.scale)  # √16 times the plain scale


@pytest.mark.parametrize(("algorithm", "said"), [("ia3", "IA3 has no alpha / rank scale"),
                                                 ("dylora", "no one rank sets the scale")])
def test_an_algorithm_without_one_rank_refuses_it(algorithm, said):
    with pytest.raises(InvalidValueError, match=said):
        make_adapter(algorithm, nn.Linear(8, 8), rank=4, rs_lora=True)


def test_a_run_writes_the_scaled_alpha_and_says_rs_lora_in_its_network_args(tiny_model_dir, tmp_path):
    from test_train import make_config, run_train, write_dataset

    cfg = make_config(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "run",
                      training={"max_epochs": 1}, network={"rank": 4, "alpha": 2.0, "args": {"rs_lora": True}})
    run_train(cfg)
    with safe_open(str(tmp_path / "run" / "lorakit.safetensors"), "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        assert '"rs_lora": "True"' in f.metadata()["ss_network_args"]
    assert alphas == {4.0}  # 2 · √4: read as alpha / rank = 1 = 2 / √4


@pytest.mark.parametrize(("args", "extra", "said"), [
    ({"rs_lora": "yes"}, {}, "network.args rs_lora must be true or false, got 'yes'"),
    ({"rs_lora": True}, {"dim_from_weights": True, "weights": "a.safetensors"},
     "network.dim_from_weights takes the alphas from the file"),
])
def test_settings_it_cannot_mean_anything_with_are_refused(args, extra, said):
    from lorakit.config import TrainConfig

    cfg = TrainConfig()
    cfg.network.args = args
    for key, value in extra.items():
        setattr(cfg.network, key, value)
    with pytest.raises(ConfigError, match=said):
        cfg.validate()


def test_a_lycoris_kohya_config_with_rs_lora_is_taken_over(tmp_path, tiny_model_dir):
    from test_kohya_config import kohya_file

    from lorakit.commands.kohya_config import config_from_kohya

    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml", 'network_module = "lycoris.kohya"\nnetwork_dim = 4\n'
                      'network_args = ["algo=locon", "rs_lora=True"]\n')
    cfg, translation = config_from_kohya(path)
    assert cfg.network.args == {"rs_lora": True} and translation.untranslated == []
    cfg.validate()
