"""Learning-rate schedules as kohya chooses them (lorakit.schedules): every name of its --lr_scheduler, the
torch schedules of --lr_scheduler_type with --lr_scheduler_args, their refusals, and runs that follow them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from test_kohya_config import kohya_file
from test_train import Interrupt, dataset, die_after_saving, make_config, run_train  # noqa: F401

from lorakit.checkpoints import RunFolder
from lorakit.cli import main
from lorakit.commands.kohya_config import config_from_kohya
from lorakit.config import ConfigError, OptimizerConfig
from lorakit.schedules import SCHEDULES, build_lr_schedule, check_schedule


def rates(opt: OptimizerConfig, steps: int = 10, read: int | None = None) -> list[float]:
    """The rate of each of the first ``read`` (default: all) optimizer steps of a run of ``steps`` (base rate 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_lr_schedule(opt, optimizer, steps)
    out = []
    for _ in range(read or steps):
        out.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return out


def test_every_schedule_name_makes_a_schedule_that_starts_at_the_rate_or_warms_up_to_it():
    for name in SCHEDULES:
        opt = OptimizerConfig(lr_scheduler=name, lr_warmup_steps=0 if name in ("constant", "piecewise_constant")
                              else 2, lr_scheduler_min_lr_ratio=0.1, lr_decay_steps=3,
                              lr_scheduler_args={"step_rules": "1:5,0.5"} if name == "piecewise_constant" else {})
        got = rates(opt)
        assert max(got) == pytest.approx(1.0), (name, got)
        assert all(0 <= r <= 1 + 1e-9 for r in got), (name, got)


def test_cosine_with_min_lr_ends_at_its_floor_and_never_goes_below_it():
    got = rates(OptimizerConfig(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.2), 20)
    assert got[0] == 1.0 and all(a >= b for a, b in zip(got, got[1:], strict=False))
    assert min(got) >= 0.2 and got[-1] == pytest.approx(0.2, abs=0.01)
    plain = rates(OptimizerConfig(lr_scheduler="cosine"), 20)
    assert plain[-1] < 0.01  # the plain cosine goes to 0: the floor is what the ratio adds


def test_warmup_stable_decay_warms_up_holds_then_decays_over_its_share_of_the_run():
    got = rates(OptimizerConfig(lr_scheduler="warmup_stable_decay", lr_warmup_steps=2, lr_decay_steps=0.3,
                                lr_scheduler_min_lr_ratio=0.1), 10)
    assert got[0] < got[1] < got[2] == 1.0  # 2 warm-up steps
    assert got[2:8] == [1.0] * 6  # stable for 10 - 2 - 3 steps (to the decay's start)
    assert 0.1 < got[9] < got[8] < 1.0  # 3 steps (0.3 of 10) of decay toward the floor, reached after the last


def test_inverse_sqrt_falls_as_one_over_the_square_root_after_its_warm_up():
    got = rates(OptimizerConfig(lr_scheduler="inverse_sqrt", lr_warmup_steps=4), 16)
    assert got[4] == 1.0 and got[16 - 1] == pytest.approx(1 / math.sqrt(15 / 4))
    scaled = rates(OptimizerConfig(lr_scheduler="inverse_sqrt", lr_warmup_steps=4, lr_scheduler_timescale=8), 16)
    assert scaled[15] == pytest.approx(1 / math.sqrt((15 - 4) / 8 + 1))  # kohya's --lr_scheduler_timescale


def test_piecewise_constant_takes_its_step_rules_from_the_schedule_arguments():
    got = rates(OptimizerConfig(lr_scheduler="piecewise_constant", lr_scheduler_args={"step_rules": "1:3,0.5:6,0.1"}))
    assert got == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1])


def test_a_torch_schedule_by_class_name_with_its_arguments():
    got = rates(OptimizerConfig(lr_scheduler_type="CosineAnnealingWarmRestarts", lr_scheduler_args={"T_0": 4}), 9)
    assert got[0] == got[4] == got[8] == 1.0 and got[2] == pytest.approx(0.5)  # restarts every 4 steps
    dotted = rates(OptimizerConfig(lr_scheduler_type="torch.optim.lr_scheduler.StepLR",
                                   lr_scheduler_args={"step_size": 2, "gamma": 0.5}), 6)
    assert dotted == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])


@pytest.mark.parametrize(("settings", "said"), [
    ({"lr_scheduler": "cosine_with_min_lr"}, "optimizer.lr_scheduler_min_lr_ratio: cosine_with_min_lr needs"),
    ({"lr_scheduler": "constant", "lr_warmup_steps": 10}, "the constant schedule has no warm-up "
                                                          "(constant_with_warmup warms up)"),
    ({"lr_scheduler": "piecewise_constant"}, "missing 1 required positional argument: 'step_rules'"),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": {"T_0": 4}}, "lr_scheduler_args {T_0 = 4}: the schedule could "
                                                                   "not be made"),
    ({"lr_scheduler_type": "os.system"}, "does not import other modules named in a config"),
    ({"lr_scheduler_type": "Cosine"}, "not a schedule of torch.optim.lr_scheduler; one of ConstantLR, "
                                      "CosineAnnealingLR"),
    ({"lr_scheduler_type": "ReduceLROnPlateau"}, "it steps on a measured metric"),
    ({"lr_scheduler_type": "LambdaLR"}, "built from Python functions or other schedules"),
    ({"lr_scheduler_type": "StepLR"}, "missing 1 required positional argument: 'step_size'"),
    ({"lr_scheduler_type": "StepLR", "lr_scheduler_args": {"step_size": 2}, "lr_warmup_steps": 3},
     "a torch schedule (lr_scheduler_type = 'StepLR') has no warm-up"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 0.2, "lr_decay_steps": 0.9},
     "optimizer.lr_warmup_steps = 0.2 and lr_decay_steps = 0.9: shares of the run that add up to more than all"),
])
def test_a_schedule_that_cannot_be_made_is_refused_naming_the_setting(settings, said):
    with pytest.raises(ConfigError, match="optimizer.") as err:
        check_schedule(OptimizerConfig(**settings))
    assert said in str(err.value), str(err.value)


def test_a_warm_up_and_decay_longer_than_the_run_are_refused_when_the_run_starts(tiny_model_dir, dataset,  # noqa: F811
                                                                                   tmp_path, capsys):
    """In steps, whether they fit depends on the run's length: said with it when the run starts, and the run
    leaves nothing behind."""
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(dataset), "--out", str(out), "--no-progress",
            "--epochs", "2", "--set", "data.batch_size=2", "--set", "optimizer.lr_scheduler=warmup_stable_decay",
            "--set", "optimizer.lr_warmup_steps=3", "--set", "optimizer.lr_decay_steps=2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lorakit train: error: optimizer.lr_warmup_steps and lr_decay_steps: 3 + 2 steps are more than the run's 4")
    assert not out.exists()


def test_the_command_refuses_a_wrong_schedule_before_anything_is_written(tiny_model_dir, dataset, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(dataset), "--out", str(out), "--no-progress",
            "--set", "optimizer.lr_scheduler=warmup_stable_decay", "--set", "optimizer.lr_scheduler_args={foo = 1}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "lorakit train: error: optimizer.lr_scheduler = 'warmup_stable_decay' with lr_scheduler_args {foo = 1}: "
        "the schedule could not be made")
    assert not out.exists()


def test_a_run_logs_the_rates_of_its_schedule_and_a_resumed_run_continues_it(tiny_model_dir, dataset, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    """A torch schedule (its state saved with every checkpoint) and a transformers one, through a resume."""
    for schedule in ({"lr_scheduler_type": "CosineAnnealingWarmRestarts", "lr_scheduler_args": {"T_0": 3}},
                     {"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 1, "lr_decay_steps": 2,
                      "lr_scheduler_min_lr_ratio": 0.1}):
        name = schedule.get("lr_scheduler_type") or schedule["lr_scheduler"]
        straight = tmp_path / f"{name}-straight"
        run_train(make_config(tiny_model_dir, dataset, straight, training={"max_epochs": 3},
                              optimizer={"learning_rate": 1e-3, **schedule}))
        logged = [json.loads(line)["lr"] for line in (straight / "log.jsonl").read_text().splitlines()]
        expected = [1e-3 * r for r in rates(OptimizerConfig(**schedule), 6, read=7)[1:]]  # logged after each step
        assert len(set(expected)) > 2, expected  # the schedule moves within the run
        assert logged == pytest.approx(expected), name
        with safe_open(str(straight / "lorakit.safetensors"), "pt") as f:
            assert f.metadata()["ss_lr_scheduler"] == name  # the schedule that ran
        interrupted = tmp_path / f"{name}-resumed"
        original = die_after_saving(monkeypatch, 1)
        with pytest.raises(Interrupt):
            run_train(make_config(tiny_model_dir, dataset, interrupted, training={"max_epochs": 3},
                                  optimizer={"learning_rate": 1e-3, **schedule}))
        monkeypatch.setattr(RunFolder, "save_checkpoint", original)
        run_train(make_config(tiny_model_dir, dataset, interrupted, training={"max_epochs": 3},
                              optimizer={"learning_rate": 1e-3, **schedule}, output={"if_exists": "resume"}))
        resumed = [json.loads(line)["lr"] for line in (interrupted / "log.jsonl").read_text().splitlines()]
        assert resumed == pytest.approx(logged), name


def test_kohya_schedule_options_are_taken_over(tmp_path, tiny_model_dir):
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml",
                      'network_module = "networks.lora"\nlr_scheduler = "warmup_stable_decay"\nlr_warmup_steps = 0.1\n'
                      'lr_decay_steps = 0.25\nlr_scheduler_min_lr_ratio = 0.05\nnetwork_train_unet_only = true\n')
    cfg, translation = config_from_kohya(path)
    opt = cfg.optimizer
    assert (opt.lr_scheduler, opt.lr_warmup_steps, opt.lr_decay_steps, opt.lr_scheduler_min_lr_ratio) == (
        "warmup_stable_decay", 0.1, 0.25, 0.05) and translation.untranslated == []
    path.write_text(path.read_text() + 'lr_scheduler_type = "CosineAnnealingWarmRestarts"\n'
                                       'lr_scheduler_args = ["T_0=100", "T_mult=2", "eta_min=1e-6"]\n'
                                       'lr_scheduler_timescale = 50\n')
    path.write_text(path.read_text().replace("lr_warmup_steps = 0.1", "lr_warmup_steps = 0"))
    cfg, translation = config_from_kohya(path)
    opt = cfg.optimizer
    assert opt.lr_scheduler_type == "CosineAnnealingWarmRestarts" and opt.lr_scheduler_timescale == 50
    assert opt.lr_scheduler_args == {"T_0": 100, "T_mult": 2, "eta_min": 1e-6} and translation.untranslated == []
    cfg.validate()
