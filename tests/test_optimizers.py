"""The trainer's optimizers: AdamW takes torch's fused kernel where it can, and it is the same AdamW; Prodigy, Lion,
Adafactor and D-Adaptation train, take their options (kohya's --optimizer_args) and a run can use them."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lorakit.config import OptimizerConfig
from lorakit.optimizers import OPTIMIZERS, OptimizerNameError, adaptive_lr_note, can_fuse, optimizer_builder


def _params(seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((8, 40), (40, 8), (16,))]


def test_adamw_is_fused_on_the_cpu_and_matches_the_loop_version():
    opt_cfg = OptimizerConfig()
    opt_cfg.weight_decay = 0.01
    fused_params, loop_params = _params(0), _params(0)
    fused = OPTIMIZERS["adamw"]([{"params": fused_params, "lr": 1e-2}], opt_cfg)
    loop = torch.optim.AdamW([{"params": loop_params, "lr": 1e-2}], betas=tuple(opt_cfg.betas), weight_decay=0.01)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_params, loop_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    assert not torch.equal(fused_params[0], _params(0)[0])  # the steps moved the weights
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_not_fused_where_the_kernel_cannot_run():
    cpu = nn.Parameter(torch.zeros(3))
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    assert can_fuse([{"params": [cpu]}])
    assert not can_fuse([{"params": [cpu]}, {"params": [meta]}])  # two devices
    assert not can_fuse([{"params": [meta]}])  # no kernel for the meta device


@pytest.mark.parametrize(("name", "lr", "args", "option"), [("prodigy", 1.0, {"d_coef": 0.5}, ("d_coef", 0.5)),
                                                            ("lion", 1e-2, {"betas": (0.95, 0.98)},
                                                             ("betas", (0.95, 0.98))),
                                                            ("adafactor", 1e-2, {"clip_threshold": 2.0},
                                                             ("clip_threshold", 2.0)),
                                                            ("dadaptadam", 1.0, {"decouple": True},
                                                             ("decouple", True)),
                                                            ("dadaptlion", 1.0, {"betas": (0.9, 0.95)},
                                                             ("betas", (0.9, 0.95))),
                                                            ("dadaptsgd", 1.0, {"momentum": 0.5},
                                                             ("momentum", 0.5)),
                                                            # bitsandbytes' 8-bit ones, on the CPU (0.50)
                                                            ("adamw8bit", 5e-2, {}, ("betas", (0.9, 0.999))),
                                                            ("pagedadamw8bit", 5e-2, {"eps": 1e-6}, ("eps", 1e-6)),
                                                            ("lion8bit", 1e-2, {}, ("betas", (0.9, 0.99))),
                                                            ("sgdnesterov8bit", 1e-2, {}, ("betas", (0.9, 0))),
                                                            ("sgdnesterov", 1e-2, {"momentum": 0.8},
                                                             ("momentum", 0.8)),
                                                            # schedule-free, built in training mode
                                                            ("adamwschedulefree", 5e-2, {"warmup_steps": 3},
                                                             ("warmup_steps", 3)),
                                                            ("SGDScheduleFree", 5e-2, {}, ("momentum", 0.9)),
                                                            # kohya's CamelCase, and a class by its full name
                                                            ("PagedLion8bit", 1e-2, {}, ("betas", (0.9, 0.99))),
                                                            ("torch.optim.RAdam", 5e-2,
                                                             {"decoupled_weight_decay": True},
                                                             ("decoupled_weight_decay", True))])
def test_each_optimizer_takes_its_options_and_descends_a_quadratic(name, lr, args, option):
    opt_cfg = OptimizerConfig()
    opt_cfg.learning_rate, opt_cfg.weight_decay, opt_cfg.args = lr, 0.0, args
    params = _params(0)
    target = [torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) for p in params]
    optimizer = optimizer_builder(name)([{"params": params, "lr": lr}], opt_cfg)
    assert optimizer.param_groups[0][option[0]] == option[1]

    def loss() -> torch.Tensor:
        return sum(((p - t) ** 2).sum() for p, t in zip(params, target, strict=True))

    start = float(loss())
    for _ in range(60):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert float(loss()) < 0.7 * start


def test_an_adaptive_optimizer_left_at_adamws_learning_rate_is_pointed_out():
    assert "--lr 1" in adaptive_lr_note("prodigy", [1e-4, 5e-5])
    assert "0.0001 makes it learn almost nothing" in adaptive_lr_note("dadaptadam", [1e-4])
    assert adaptive_lr_note("prodigy", [1.0, 0.05]) is None  # a block scaled down on purpose
    assert adaptive_lr_note("adamw", [1e-4]) is None


@pytest.mark.parametrize(("name", "lr", "args"), [("prodigy", "1", "{d_coef = 0.5}"),
                                                  ("dadaptadam", "1", "{decouple = true}"),
                                                  ("adamw8bit", "1e-3", "{}"),  # its 8-bit state, saved and read
                                                  ("torch.optim.RAdam", "1e-3", "{decoupled_weight_decay = true}")])
def test_a_run_trains_and_resumes_with_an_adaptive_8_bit_or_named_optimizer(tiny_model_dir, tmp_path, name, lr, args):
    from safetensors.torch import load_file
    from test_train import write_dataset

    from lorakit.cli import main

    out = tmp_path / "run"
    flags = ["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir), "--out",
             str(out), "--lr", lr, "--set", f"optimizer.optimizer={name}", "--set", f"optimizer.args={args}",
             "--no-progress"]
    assert main([*flags, "--epochs", "1"]) == 0
    trained = load_file(str(out / "lorakit.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if k.endswith("lora_up.weight"))
    # its state (the step size it estimated) is saved and read back safely (weights_only) on resume
    assert main([*flags, "--epochs", "2", "--resume"]) == 0
    assert [c.name for c in sorted((out / "checkpoints").iterdir())] == ["epoch-0001", "epoch-0002"]


def test_an_option_the_optimizer_does_not_have_is_refused_by_name(tiny_model_dir, tmp_path, capsys):
    from test_train import write_dataset

    from lorakit.cli import main

    assert main(["train", "--data", str(write_dataset(tmp_path / "data")), "--model", str(tiny_model_dir), "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--set", "optimizer.optimizer=lion", "--set",
                 "optimizer.args={d_coef = 0.5}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.args = {'d_coef': 0.5} for lion:" in err and "d_coef" in err
    assert not (tmp_path / "run").exists()


def test_a_name_lorakit_does_not_know_says_what_it_knows_or_what_does_not_import():
    assert optimizer_builder("AdamW8bit") is OPTIMIZERS["adamw8bit"]  # kohya's spelling
    for name, said in (("adam", "'adam' is no optimizer lorakit knows (adamw, adamw8bit, "),
                       ("torch.optim.Adamm", "the module torch.optim has no Adamm"),
                       ("no_such_package.Opt", "its module no_such_package cannot be imported"),
                       ("torch.nn.Linear", "'torch.nn.Linear' is no torch optimizer class")):
        with pytest.raises(OptimizerNameError, match=re.escape(said)):
            optimizer_builder(name)
