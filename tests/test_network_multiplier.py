"""kohya's per-dataset network_multiplier: the adapter's strength while training on one dataset's batches."""

from __future__ import annotations

import pytest
import torch
from test_train import make_config, run_train, write_dataset

from lorakit.config import ConfigError
from lorakit.formats import read_adapter


def test_a_datasets_network_multiplier_scales_the_adapter_while_training_on_it(tiny_model_dir, tmp_path):
    """At 0 the adapter adds nothing, so nothing moves it; at -1 it learns the opposite of what it learns at 1
    (the same first step, mirrored); between batches it is at 1 for the meter, checkpoints and samples."""
    folder = write_dataset(tmp_path / "data", n=2)
    ups = {}
    for multiplier in (0.0, -1.0, 1.0):
        out = tmp_path / f"m{multiplier}"
        cfg = make_config(tiny_model_dir, folder, out, data={"network_multiplier": multiplier},
                          training={"max_steps": 1}, optimizer={"weight_decay": 0.0, "optimizer": "sgd"})
        result = run_train(cfg)
        tensors = read_adapter(out / "lorakit.safetensors").tensors
        ups[multiplier] = {k: v for k, v in tensors.items() if k.endswith("lora_up.weight")}
        if multiplier == -1.0:
            assert "network multiplier -1" in result.summary
    assert all(bool((t == 0).all()) for t in ups[0.0].values())  # zero update: the loss never saw the adapter
    # one SGD step from zero up-weights: the gradient flips with the multiplier
    for key, up in ups[1.0].items():
        assert bool((up != 0).any()) and torch.allclose(ups[-1.0][key], -up, atol=1e-7), key


def test_a_network_multiplier_without_an_adapter_is_refused(tiny_model_dir, tmp_path):
    folder = write_dataset(tmp_path / "data", n=2)
    cfg = make_config(tiny_model_dir, folder, tmp_path / "run", method={"kind": "ti", "ti_token": "zkz"},
                      data={"network_multiplier": 0.5})
    with pytest.raises(ConfigError, match="network_multiplier 0.5: only an adapter has a multiplier"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()
