"""`sample` and `eval` sample an adapter on the schedule it was trained on (kohya's ss_v_parameterization and
ss_zero_terminal_snr) where the base model does not say it: a single-file SD2 768-v checkpoint carries no marker,
and its LoRA sampled as ε gives noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import lora_tensors, write_run
from PIL import Image
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.errors import InvalidValueError
from lorakit.models import load_base_model
from lorakit.sample import adopt_trained_schedule


def adapter(path, **said: str):
    """A LoRA file for the built-in model whose metadata says ``said`` (ss_<name>: value)."""
    save_file(lora_tensors(0.3, seed=1), str(path), metadata={f"ss_{k}": v for k, v in said.items()})
    return path


def schedule(model) -> tuple[str, bool, float]:
    rescaled = bool(model.scheduler_config.get("rescale_betas_zero_snr", False))
    return model.prediction_type, rescaled, float(model.noise_scheduler.alphas_cumprod[-1])


@pytest.fixture
def model():
    return load_base_model(None)


def test_an_adapter_trained_as_v_prediction_turns_an_epsilon_model_into_one(model, tmp_path):
    assert schedule(model)[:2] == ("epsilon", False)
    lines = adopt_trained_schedule(model, [adapter(tmp_path / "v.safetensors", v_parameterization="True")])
    assert lines == ["v-prediction, as the adapters were trained (ss_v_parameterization)"]
    assert schedule(model)[:2] == ("v_prediction", False)
    assert model.pipeline().scheduler.config.prediction_type == "v_prediction"


def test_an_sd2_model_turned_into_v_prediction_samples_at_768(tiny_sd2_dir, model, tmp_path):
    """An SD2.x file that did not say it predicts v was read as the 512 model; its v adapter says it is the 768
    one (2.1), so sampling's default size follows.  An SD1.x model keeps its size."""
    sd2 = load_base_model(tiny_sd2_dir)
    lines = adopt_trained_schedule(sd2, [adapter(tmp_path / "v.safetensors", v_parameterization="True")])
    assert sd2.resolution == 768 and "768×768 by default: SD2.x's v-prediction model's size" in lines[1]
    size = model.resolution
    adopt_trained_schedule(model, [tmp_path / "v.safetensors"])
    assert model.resolution == size and model.prediction_type == "v_prediction"


def test_zero_terminal_snr_comes_with_v_prediction(model, tmp_path):
    file = adapter(tmp_path / "z.safetensors", v_parameterization="True", zero_terminal_snr="True")
    lines = adopt_trained_schedule(model, [file])
    assert len(lines) == 2 and "zero terminal SNR, as the adapters were trained" in lines[1]
    prediction, rescaled, last = schedule(model)
    assert (prediction, rescaled, last) == ("v_prediction", True, 0.0)  # the last step is pure noise


def test_files_that_say_epsilon_or_nothing_change_nothing(model, tmp_path):
    files = [adapter(tmp_path / "e.safetensors", v_parameterization="False", zero_terminal_snr="False"),
             adapter(tmp_path / "none.safetensors"), tmp_path / "not-there.safetensors"]
    before = schedule(model)
    assert adopt_trained_schedule(model, files) == []
    assert schedule(model) == before


def test_zero_terminal_snr_on_an_epsilon_model_is_said_and_not_applied(model, tmp_path):
    """kohya lets a user train an ε model with --zero_terminal_snr; sampling pure noise as ε divides by zero."""
    lines = adopt_trained_schedule(model, [adapter(tmp_path / "z.safetensors", zero_terminal_snr="True")])
    assert lines and "zero terminal SNR on an ε-prediction model" in lines[0]
    assert schedule(model)[:2] == ("epsilon", False)


def test_adapters_that_disagree_are_refused(model, tmp_path):
    files = [adapter(tmp_path / "v.safetensors", v_parameterization="True"),
             adapter(tmp_path / "e.safetensors", v_parameterization="False")]
    with pytest.raises(InvalidValueError, match=r"with and without v-prediction \(.*v.safetensors: with, "
                                                r".*e.safetensors: without\)"):
        adopt_trained_schedule(model, files)
    assert schedule(model)[:2] == ("epsilon", False)


def test_sample_uses_the_schedule_the_adapter_says(tmp_path, capsys):
    plain = adapter(tmp_path / "plain.safetensors")
    v = adapter(tmp_path / "v.safetensors", v_parameterization="True")  # the same weights
    flags = ["--prompt", "a zkz shape --d 1", "--steps", "3", "--device", "cpu"]
    assert main(["sample", str(plain), *flags, "--out", str(tmp_path / "plain")]) == 0
    assert "v-prediction" not in capsys.readouterr().out
    assert main(["sample", str(v), *flags, "--out", str(tmp_path / "v")]) == 0
    assert "v-prediction, as the adapters were trained" in capsys.readouterr().out

    def pixels(folder):
        return np.asarray(Image.open(next(folder.glob("000-*.png"))), dtype=np.int16)

    assert np.abs(pixels(tmp_path / "plain") - pixels(tmp_path / "v")).mean() > 1


def test_eval_samples_base_and_checkpoints_on_the_trained_schedule(tmp_path, capsys):
    from test_cli_eval import PROMPTS_TOML

    run = write_run(tmp_path / "run", epochs=1)
    (tmp_path / "prompts.toml").write_text(PROMPTS_TOML)
    flags = ["--prompts", str(tmp_path / "prompts.toml"), "--steps", "2", "--quiet", "--cache", str(tmp_path / "c")]
    assert main(["eval", str(run), "--out", str(tmp_path / "eps"), *flags]) == 0
    assert "v-prediction" not in capsys.readouterr().out
    for file in run.glob("checkpoints/*/trained.safetensors"):
        save_file(load_file(str(file)), str(file), metadata={"ss_epoch": "1", "ss_v_parameterization": "True"})
    assert main(["eval", str(run), "--out", str(tmp_path / "v"), *flags]) == 0
    assert "lorakit eval: v-prediction, as the adapters were trained" in capsys.readouterr().out
    setups = [json.loads((tmp_path / name / "metrics.json").read_text())["setup"] for name in ("eps", "v")]
    # the checkpoint changed, and so did the base model's schedule: none of the first call's images is reused
    assert setups[1]["cached"] == 0 and setups[1]["generated"] == setups[0]["generated"] > 0
