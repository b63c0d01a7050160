"""Schedule-free optimizers (kohya's AdamWScheduleFree, ...): training runs on the interpolation y, while samples,
validation, checkpoints and the result hold the average x; showing x and going back changes nothing in training,
and a resumed run is a straight one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_config, run_train, write_dataset

from lorakit.config import ConfigError, OptimizerConfig
from lorakit.optimizers import optimizer_builder
from lorakit.schedule_free import evaluation_weights


def test_the_average_is_shown_for_the_while_and_the_training_point_comes_back_bit_for_bit():
    opt_cfg = OptimizerConfig()
    opt_cfg.learning_rate, opt_cfg.weight_decay = 0.05, 0.0
    params = [torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))]
    optimizer = optimizer_builder("AdamWScheduleFree")([{"params": params, "lr": 0.05}], opt_cfg)
    for _ in range(5):  # built in training mode: step() would refuse otherwise
        optimizer.zero_grad()
        ((params[0] - 1) ** 2).sum().backward()
        optimizer.step()
    y = params[0].detach().clone()
    with evaluation_weights(optimizer):
        x = params[0].detach().clone()
        assert not optimizer.param_groups[0]["train_mode"]
    assert torch.equal(params[0], y) and optimizer.param_groups[0]["train_mode"]
    assert not torch.equal(x, y)
    optimizer.eval()  # what the optimizer itself calls the average
    assert torch.equal(params[0], x)
    by_full_name = optimizer_builder("schedulefree.SGDScheduleFree")([{"params": params, "lr": 0.05}], opt_cfg)
    params[0].grad = torch.ones_like(params[0])
    by_full_name.step()  # built in training mode too, as kohya's names are


def test_a_run_hands_back_the_average_trains_as_if_unobserved_and_resumes_exactly(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --s 2 --d 1\n")

    def config(out, epochs=2, **sections):
        return make_config(tiny_model_dir, data, tmp_path / out, training={"max_epochs": epochs},
                           optimizer={"optimizer": "adamwschedulefree", "learning_rate": 1e-2,
                                      "args": {"warmup_steps": 2}}, **sections)

    plain = run_train(config("plain"))
    observed = run_train(config("observed", sample={"prompts": str(prompts)}))  # x shown at every epoch end
    assert observed.losses == plain.losses
    last = tmp_path / "plain" / "checkpoints" / "epoch-0002"
    held = load_file(str(last / "trained.safetensors"))
    live = torch.load(last / "state.pt", weights_only=True)["live_tensors"]  # y, that training goes on from
    moved = [k for k in held if not torch.equal(held[k], live[k].to(held[k].dtype))]
    assert moved  # the checkpoint holds the average, not the training point
    result = load_file(str(tmp_path / "plain" / "lorakit.safetensors"))
    assert all(torch.equal(result[k], held[k]) for k in held)  # the result is the last checkpoint's average
    # stopped after its first epoch and resumed: the same steps, the same average
    run_train(config("resumed", epochs=1))
    resumed = run_train(config("resumed", output={"if_exists": "resume"}))
    assert resumed.losses == plain.losses
    again = load_file(str(tmp_path / "resumed" / "lorakit.safetensors"))
    assert all(torch.equal(again[k], result[k]) for k in result)


@pytest.mark.parametrize(("sections", "said"), [
    ({"optimizer": {"lr_scheduler": "cosine"}}, "replaces the learning-rate schedule"),
    ({"optimizer": {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10}}, "replaces the learning-rate"),
    ({"training": {"ema_decay": 0.99}}, "averages the weights itself: leave training.ema_decay unset"),
])
def test_settings_that_cannot_go_with_it_are_refused_by_name(tiny_model_dir, tmp_path, sections, said):
    optimizer = {"optimizer": "AdamWScheduleFree", **sections.pop("optimizer", {})}
    cfg = make_config(tiny_model_dir, tmp_path, tmp_path / "run", optimizer=optimizer, **sections)
    with pytest.raises(ConfigError, match=f"optimizer.optimizer: AdamWScheduleFree .*{said}") as info:
        cfg.validate()
    assert "optimizer.args = {warmup_steps = N}" in str(info.value) or "ema_decay" in said


@pytest.mark.parametrize("held", [True, False])
def test_textual_inversions_frozen_rows_stay_in_the_average(tiny_model_dir, tmp_path, held):
    """Every embedding row gets a gradient (the captions' words too); the trainer restores the frozen rows after
    each step, but a schedule-free optimizer keeps its own copy z of them, which the average shows: their gradients
    are held at zero before its step, so the words keep their meaning in samples and validation."""
    from lorakit.methods import make_method
    from lorakit.models import load_base_model

    model = load_base_model(tiny_model_dir)
    cfg = make_config(tiny_model_dir, tmp_path, tmp_path / "run", method={"kind": "ti", "ti_token": "qzx"},
                      optimizer={"optimizer": "adamwschedulefree", "ti_lr": 0.05})
    method = make_method(cfg, model)
    embedding = method.embeddings[0]
    before = embedding.detach().clone()
    optimizer = optimizer_builder(cfg.optimizer.optimizer)(method.param_groups(), cfg.optimizer)
    for _ in range(4):
        (embedding ** 2).sum().backward()
        if held:
            method.hold_untrained_gradients()
        optimizer.step()
        optimizer.zero_grad()
        method.after_optimizer_step()
    with evaluation_weights(optimizer):
        frozen = ~method._trained_rows
        assert torch.equal(embedding[frozen], before[frozen]) == held
        assert not torch.equal(embedding[method.ids], before[method.ids])  # the new token trained
