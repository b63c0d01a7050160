"""training.ema_decay: a moving average of the trained weights, warmed up as diffusers does; a run's checkpoints,
result and validation hold the average while training follows the live weights; a resumed run goes on with it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorakit.config import ConfigError
from lorakit.ema import WeightAverage, ema_decay_at


class _Method:
    """The two calls the average uses, on a plain dict of tensors (a copy comes back, as TI's does)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.tensors.items()}

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.tensors[k].copy_(v)


def test_the_decay_warms_up_as_diffusers_does_and_stops_at_the_setting():
    assert ema_decay_at(0.999, 0) == 0.0  # the first update takes the weights
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11) and ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.5, 100) == 0.5


def test_the_average_follows_the_formula_in_float32_and_is_applied_only_for_the_while():
    weights = {"w": torch.zeros(3, dtype=torch.bfloat16), "steps": torch.tensor([7])}
    average = WeightAverage(weights, decay=0.5)
    assert set(average.average) == {"w"} and average.average["w"].dtype == torch.float32  # integers not averaged
    expected = torch.zeros(3)
    for update, value in enumerate((1.0, 2.0, 4.0, 8.0)):
        weights["w"].fill_(value)
        average.update(weights)
        d = ema_decay_at(0.5, update)
        expected = d * expected + (1 - d) * value
    torch.testing.assert_close(average.average["w"], expected)
    method = _Method(weights)
    with average.applied(method):
        torch.testing.assert_close(weights["w"], expected.to(torch.bfloat16))
    assert torch.equal(weights["w"], torch.full((3,), 8.0, dtype=torch.bfloat16))  # its own values again
    assert torch.equal(average.tensors_like(weights)["steps"], torch.tensor([7]))


def test_a_run_hands_back_the_average_of_its_live_weights_and_resumes_it(tiny_model_dir, tmp_path, capsys):
    """The average of the weights after each step, computed here from a run without it that saved every step,
    is what the run with it holds in its last checkpoint and result; its training losses are the same."""
    from test_train import make_config, run_train, write_dataset

    data = write_dataset(tmp_path / "data", n=4)

    def config(out, **training):
        return make_config(tiny_model_dir, data, tmp_path / out, training={"max_epochs": 2, **training})

    live = run_train(config("live", save_every_n_steps=1))
    averaged = run_train(config("averaged", ema_decay=0.2))
    assert "weights averaged (EMA, decay 0.2)" in capsys.readouterr().out
    assert averaged.losses == live.losses  # training follows the live weights, untouched by the average
    assert "handed back: the moving average of the trained weights (EMA, decay 0.2)" in averaged.summary
    # the live weights after steps 1-4: step checkpoints between epoch ends, the epochs' own at their ends
    folders = ("step-00000001", "epoch-0001", "step-00000003", "epoch-0002")
    after = [load_file(str(tmp_path / "live" / "checkpoints" / f / "trained.safetensors")) for f in folders]
    expected = {k: torch.zeros_like(v) for k, v in after[0].items()}
    for update, weights in enumerate(after):
        d = ema_decay_at(0.2, update)
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    last = load_file(str(tmp_path / "averaged" / "checkpoints" / "epoch-0002" / "trained.safetensors"))
    moved = [k for k in expected if not torch.equal(after[3][k], after[2][k])]
    assert moved  # the last step changed weights, so the average differs from them
    for key, value in expected.items():
        torch.testing.assert_close(last[key], value, rtol=1e-5, atol=1e-7)
    assert not all(torch.equal(last[k], after[3][k]) for k in moved)
    with safe_open(str(tmp_path / "averaged" / "lorakit.safetensors"), "pt") as f:
        assert f.metadata()["lorakit_ema_decay"] == "0.2"
    # interrupted after its first epoch and resumed: the same average
    run_train(config("resumed", ema_decay=0.2, max_epochs=1))
    cfg = config("resumed", ema_decay=0.2)
    cfg.output.if_exists = "resume"
    assert run_train(cfg).losses == live.losses
    again = load_file(str(tmp_path / "resumed" / "checkpoints" / "epoch-0002" / "trained.safetensors"))
    assert all(torch.equal(again[k], last[k]) for k in last)


def test_validation_measures_the_average_and_training_goes_on_from_the_live_weights(tiny_model_dir, tmp_path):
    from test_train import make_config, run_train, write_dataset

    data = write_dataset(tmp_path / "data", n=6)
    results = {}
    for name, decay in (("live", None), ("averaged", 0.5)):
        cfg = make_config(tiny_model_dir, data, tmp_path / name, training={"max_epochs": 2, "ema_decay": decay})
        cfg.data.validation_split = 0.34
        results[name] = run_train(cfg)
        results[name + "_log"] = [r for r in (tmp_path / name / "log.jsonl").read_text().splitlines()
                                  if "val_loss" in r]
    assert results["averaged"].losses == results["live"].losses
    assert len(results["live_log"]) == len(results["averaged_log"]) == 3  # the base model's and two epochs'
    assert results["live_log"][0] == results["averaged_log"][0]  # before training: one set of weights
    assert results["live_log"][-1] != results["averaged_log"][-1]


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), "0.9"])
def test_a_decay_outside_0_to_1_is_refused_by_name(decay):
    from lorakit.config import TrainConfig

    cfg = TrainConfig()
    cfg.training.ema_decay = decay
    with pytest.raises(ConfigError, match=r"training.ema_decay must be a number in \[0, 1\)"):
        cfg.validate()
