"""optimizer.fused_backward_pass (kohya's --fused_backward_pass): each weight stepped during the backward pass, its
gradient freed at once; the same update as the whole-model optimizer, a run that trains and resumes with it, and
the settings it cannot work with refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.config import ConfigError, OptimizerConfig
from lorakit.fused_backward import FusedBackwardOptimizer
from lorakit.optimizers import OPTIMIZERS


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def _groups(model: nn.Sequential) -> list[dict]:  # two groups at their own rates, as block-wise rates make
    return [{"params": list(model[0].parameters()), "lr": 1e-2, "name": "first"},
            {"params": [*model[2].parameters(), *model[4].parameters()], "lr": 3e-3, "name": "rest"}]


def _gradients_held(model: nn.Module) -> list[int]:
    """After each weight's gradient is complete (and, fused, used): how many weights hold a gradient."""
    held: list[int] = []
    for p in model.parameters():  # registered after the optimizer's own hooks, so they run after them
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in model.parameters())))
    return held


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "lion"])
def test_each_weight_steps_during_backward_as_the_whole_model_optimizer_steps_it(name):
    settings = OptimizerConfig()
    plain_model, fused_model = _model(), _model()
    plain = OPTIMIZERS[name](_groups(plain_model), settings)
    fused = FusedBackwardOptimizer(_groups(fused_model), lambda groups: OPTIMIZERS[name](groups, settings))
    held_plain, held_fused = _gradients_held(plain_model), _gradients_held(fused_model)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step) for opt in (plain, fused)]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for model, opt, schedule in zip((plain_model, fused_model), (plain, fused), schedules, strict=True):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
    # the plain optimizer holds every gradient until its step; fused, none outlives its own weight's update
    assert max(held_plain) == len(list(plain_model.parameters())) and max(held_fused) == 0
    assert fused.parts[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 4)  # the schedule reached them
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)
    for a, b in zip(plain_model.parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_its_state_resumes_and_a_whole_model_state_is_refused():
    settings = OptimizerConfig()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))

    def build(model):
        return FusedBackwardOptimizer(_groups(model), lambda groups: OPTIMIZERS["adamw"](groups, settings),
                                      max_grad_norm=0.1)

    straight_model, resumed_model = _model(), _model()
    build(straight_model)  # its hooks step it
    for _ in range(3):
        straight_model(x).square().mean().backward()
    resumed = build(resumed_model)
    resumed_model(x).square().mean().backward()
    saved = {k: v.clone() for k, v in resumed_model.state_dict().items()}, resumed.state_dict()
    resumed.remove_hooks()
    again_model = _model()
    again_model.load_state_dict(saved[0])
    again = build(again_model)
    again.load_state_dict(saved[1])
    for _ in range(2):
        again_model(x).square().mean().backward()
    for a, b in zip(straight_model.parameters(), again_model.parameters(), strict=True):
        assert torch.equal(a, b)
    plain_state = OPTIMIZERS["adamw"](_groups(_model()), settings).state_dict()
    with pytest.raises(ValueError, match="the fused backward pass has 6 parameters' optimizers, and the saved state "
                                         "is a whole-model optimizer's state"):
        again.load_state_dict(plain_state)


def test_each_weights_gradient_is_clipped_alone():
    settings = OptimizerConfig()
    model = _model()
    fused = FusedBackwardOptimizer(_groups(model), lambda groups: OPTIMIZERS["sgd"](groups, settings),
                                   max_grad_norm=1e-3)
    norms: list[float] = []
    for part in fused.parts:  # the gradient each optimizer steps with
        part.register_step_pre_hook(lambda opt, *_: norms.append(float(opt.param_groups[0]["params"][0].grad.norm())))
    (model(torch.randn(5, 6)) * 1e3).square().mean().backward()
    assert len(norms) == 6 and max(norms) == pytest.approx(1e-3, rel=1e-4)


def test_a_native_run_trains_as_without_it_and_resumes(tiny_model_dir, tmp_path, capsys):
    from test_train import make_config, run_train, write_dataset

    data = write_dataset(tmp_path / "data", n=6)

    def config(out, fused, epochs=2, **output):
        # no clipping: fused clips each weight's gradient alone, the whole-model step their joint norm; gradient
        # checkpointing recomputes the forward pass inside the backward one, where the weights step
        return make_config(tiny_model_dir, data, tmp_path / out, training={"max_epochs": epochs},
                           method={"kind": "native"}, output=output, model={"gradient_checkpointing": True},
                           optimizer={"learning_rate": 1e-4, "max_grad_norm": 0.0, "fused_backward_pass": fused})

    plain = run_train(config("plain", False))
    fused = run_train(config("fused", True))
    assert "fused backward pass: each weight steps as soon as its gradient is ready" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-6)
    from safetensors.torch import load_file
    ours, theirs = (load_file(str(tmp_path / out / "checkpoints" / "epoch-0002" / "trained.safetensors"))
                    for out in ("fused", "plain"))
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6)
    run_train(config("halves", True, epochs=1))
    resumed = run_train(config("halves", True, if_exists="resume"))
    assert resumed.losses == fused.losses  # bit-identical on the CPU
    with pytest.raises(ConfigError, match=r"--resume: these settings differ.*optimizer.fused_backward_pass"):
        run_train(config("halves", False, epochs=3, if_exists="resume"))


@pytest.mark.parametrize(("change", "match"), [
    ({"method": {"kind": "adapter"}}, "it saves the memory of native fine-tuning's gradients"),
    ({"optimizer": {"optimizer": "prodigy"}}, "'prodigy' estimates its step size over all parameters together"),
    ({"optimizer": {"gradient_accumulation_steps": 2}}, "gradient_accumulation_steps = 2 has nothing to accumulate"),
    ({"model": {"mixed_precision": "fp16"}}, "fp16 mixed precision scales the loss"),
])
def test_settings_it_cannot_work_with_are_refused_by_name(tiny_model_dir, tmp_path, change, match):
    from test_train import make_config

    cfg = make_config(tiny_model_dir, tmp_path, tmp_path / "run", method={"kind": "native"},
                      optimizer={"fused_backward_pass": True})
    for section, values in change.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=f"optimizer.fused_backward_pass: .*{match}"):
        cfg.validate()


def test_a_dry_run_says_it_and_an_adapter_run_is_refused_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    from test_train import write_dataset

    from lorakit.cli import main

    flags = ["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir), "--out",
             str(tmp_path / "run"), "--dry-run", "--set", "optimizer.fused_backward_pass=true"]
    assert main([*flags, "--method", "native", "--set", "optimizer.max_grad_norm=0.5"]) == 0
    assert ("fused backward pass: each weight steps as soon as its gradient is ready, and the gradient is freed; each "
            "weight's gradient clipped to 0.5 alone") in capsys.readouterr().out
    assert main(flags) == 2
    assert "optimizer.fused_backward_pass: it saves the memory of native fine-tuning's gradients" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()
