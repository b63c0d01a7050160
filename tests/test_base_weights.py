"""model.base_weights (kohya's --base_weights): adapter files merged into the base model before training, so that
the new adapter learns on top of them."""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file
from test_train import dataset  # noqa: F401

from lorakit.cli import main
from lorakit.config import load_config


def _train(model, data, out, *extra) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--early-stop", "off", "--no-progress", "--set", "network.rank=2", *extra])


def test_a_run_trains_on_the_model_with_its_base_weights_merged(tiny_model_dir, dataset, tmp_path, capsys,  # noqa: F811
                                                                 monkeypatch):
    from accelerate import Accelerator

    from lorakit.formats import load_network
    from lorakit.models import load_base_model
    from lorakit.train import prepare_model

    assert _train(tiny_model_dir, dataset, tmp_path / "style", "--set", "optimizer.learning_rate=1e-2") == 0
    style = tmp_path / "style" / "lorakit.safetensors"
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # a relative path, as a user writes it
    assert _train(tiny_model_dir, dataset, tmp_path / "on-style", "--set",
                  'model.base_weights=["style/lorakit.safetensors"]', "--set", "model.base_weights_multiplier=[0.5]"
                  ) == 0
    said = capsys.readouterr().out
    assert re.search(r"base weights: style/lorakit.safetensors at 0.5: (\d+) of \1 modules merged", said), said
    # what to do with the result: sample it beside the base weights, as it learned on top of them
    assert f"lorakit sample style/lorakit.safetensors:0.5 {tmp_path / 'on-style' / 'lorakit.safetensors'} --model" \
        in said, said
    assert _train(tiny_model_dir, dataset, tmp_path / "dry", "--dry-run", "--set",
                  'model.base_weights=["style/lorakit.safetensors"]') == 0
    assert "base weights: style/lorakit.safetensors:1, merged into the model before training" in \
        capsys.readouterr().out
    # sampled alone, the result is said to need its base weights; given beside them, it is not
    result = tmp_path / "on-style" / "lorakit.safetensors"
    sample = ["sample", "--model", str(tiny_model_dir), "--prompt", "zkz shape", "--steps", "2", "--out"]
    assert main([*sample, str(tmp_path / "alone"), str(result)]) == 0
    assert f"{result} was trained on top of lorakit.safetensors:0.5 (model.base_weights): give them too" in \
        capsys.readouterr().out
    assert main([*sample, str(tmp_path / "beside"), f"{style}:0.5", str(result)]) == 0
    assert "model.base_weights" not in capsys.readouterr().out
    # the run's config.toml names the file absolutely: a resume or an eval from elsewhere finds it
    cfg = load_config(tmp_path / "on-style" / "config.toml")
    assert cfg.model.base_weights == [str(style)] and cfg.model.base_weights_multiplier == [0.5]
    # the same command resumed: the relative name is the same file, not a changed setting
    assert _train(tiny_model_dir, dataset, tmp_path / "on-style", "--resume", "--set",
                  'model.base_weights=["style/lorakit.safetensors"]', "--set", "model.base_weights_multiplier=[0.5]"
                  ) == 2
    assert "there is nothing to continue" in capsys.readouterr().err

    # what the run trained on: each adapted layer's W0 + 0.5 ΔW of the style file
    merged = prepare_model(cfg, Accelerator(cpu=True)).unet
    plain = load_base_model(str(tiny_model_dir))
    network, _ = load_network(style, plain.unet, plain.text_encoders)
    network.set_multiplier(0.5)
    assert len(network) > 0 and network.groups == ["unet"]
    with torch.no_grad():
        for name, adapter in network.adapters.items():
            layer = merged.get_submodule(network.module_path(name))
            expected = adapter.base.weight + adapter.delta_weight()
            assert torch.allclose(layer.weight, expected, atol=1e-6), name
            assert not torch.allclose(layer.weight, adapter.base.weight), name  # the style file changed it


def test_base_weights_that_are_missing_or_do_not_fit_are_refused_before_anything_is_written(tiny_model_dir,
                                                                                              dataset,  # noqa: F811
                                                                                              tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, dataset, out, "--set", f'model.base_weights=["{tmp_path / "gone.safetensors"}"]'
                  ) == 2
    assert f"model.base_weights: {tmp_path / 'gone.safetensors'}: no such file or folder" in capsys.readouterr().err
    assert not out.exists()
    wrong = tmp_path / "sdxl_style.safetensors"  # a module of the right name with another width
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 1280),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(1280, 2)}, wrong)
    assert _train(tiny_model_dir, dataset, out, "--set", f'model.base_weights=["{wrong}"]') == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lorakit train: error: model.base_weights: {wrong}"), err
    assert not out.exists()
    assert _train(tiny_model_dir, dataset, out, "--set", f'model.base_weights=["{wrong}"]', "--set",
                  "model.base_weights_multiplier=[1, 0.5]") == 2
    assert "model.base_weights_multiplier must be a list of numbers, one per file of model.base_weights (1)" in \
        capsys.readouterr().err
