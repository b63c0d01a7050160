"""The command layer: one pattern for every command (``lorakit/commands/<name>.py``), ``lorakit world <task>``."""

from __future__ import annotations

import argparse
import importlib

import pytest

from lorakit.cli import COMMANDS, main
from lorakit.config import ConfigError


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_follows_the_pattern(name):
    module_name, help_ = COMMANDS[name]
    assert module_name == f"lorakit.commands.{name}" and help_
    module = importlib.import_module(module_name)
    assert isinstance(module.HELP, str) and module.HELP
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # builds without errors
    assert callable(module.run)
    # every option and argument says what it is in --help (world's tasks too)
    silent, parsers = [], [(name, parser)]
    while parsers:
        where, current = parsers.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{where} {task}", sub) for task, sub in action.choices.items()]
            elif not action.help and action.dest != "help":
                silent.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
    assert silent == [], f"options without help: {silent}"


def test_world_tasks_are_subcommands(tmp_path, capsys):
    from lorakit.commands.world import TASKS

    assert set(TASKS) == {"pretrain", "quality", "dataset", "train-reader", "experiment", "curve-report", "grid",
                          "blockwise"}
    assert main(["world", "dataset", str(tmp_path / "zkz")]) == 0
    assert "wrote 15 images" in capsys.readouterr().out
    assert (tmp_path / "zkz" / "sample_prompts.txt").is_file()
    # written again over a caption the user edited: refused unless asked; the folder's other files are left alone
    caption = next((tmp_path / "zkz").rglob("003.txt"))
    caption.write_text("my own caption")
    (tmp_path / "zkz" / "notes.txt").write_text("mine")
    assert main(["world", "dataset", str(tmp_path / "zkz")]) == 2
    assert "1 file of the dataset differs from what it writes (10_zkz shape/003.txt)" in capsys.readouterr().err
    assert caption.read_text() == "my own caption"
    assert main(["world", "dataset", str(tmp_path / "zkz"), "--overwrite"]) == 0
    assert "(1 changed file replaced)" in capsys.readouterr().out and caption.read_text() != "my own caption"
    assert (tmp_path / "zkz" / "notes.txt").read_text() == "mine"
    assert main(["world", "dataset", str(tmp_path / "zkz")]) == 0  # unchanged: nothing to ask
    with pytest.raises(SystemExit) as exit_:  # argparse checks each task's own arguments
        main(["world", "pretrain", "--out", str(tmp_path / "p"), "--high-noise-fraction", "2"])
    assert exit_.value.code == 2 and "must be a share from 0 to 1, got '2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["world", "no-such-task"])


class _Command:
    """A stand-in command module that raises what it is given."""

    HELP = "raise"

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise self.error


@pytest.mark.parametrize("error, message", [
    (ConfigError("network.rank must be positive"), "network.rank must be positive"),
    (FileNotFoundError("x.safetensors: no such file"), "no such file"),
    (PermissionError("out/: permission denied"), "permission denied"),
    (OSError(28, "No space left on device"), "No space left"),
    (OSError(27, "File too large", "out.safetensors"), "out.safetensors: File too large (a full disk, a file-size"),
    # as the OS raises them: the path first, without "[Errno 13]" and quotes
    (PermissionError(13, "Permission denied", "/srv/models/out"), "error: /srv/models/out: Permission denied\n"),
    (FileNotFoundError(2, "No such file or directory", "cfg.toml"), "error: cfg.toml: No such file or directory\n"),
])
def test_user_errors_are_one_line(monkeypatch, capsys, error, message):
    monkeypatch.setitem(COMMANDS, "boom", ("boom", "raise"))
    monkeypatch.setattr(importlib, "import_module", lambda name: _Command(error))
    assert main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit boom: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("error", [ValueError("a bug inside torch"), RuntimeError("bug"), OSError(5, "I/O")])
def test_bugs_keep_their_traceback(monkeypatch, error):
    monkeypatch.setitem(COMMANDS, "boom", ("boom", "raise"))
    monkeypatch.setattr(importlib, "import_module", lambda name: _Command(error))
    with pytest.raises(type(error)):
        main(["boom"])


def test_domain_errors_are_lorakit_errors_and_value_errors():
    from lorakit.adapters import AdapterFormatError
    from lorakit.checkpoints import OutputFolderError
    from lorakit.data import DatasetError
    from lorakit.embeddings import EmbeddingError
    from lorakit.errors import InvalidValueError, LorakitError
    from lorakit.formats import AdapterFileError
    from lorakit.models import ModelLoadError
    from lorakit.sample import PromptSyntaxError
    from lorakit.train import TrainingError

    for cls in (AdapterFormatError, OutputFolderError, ConfigError, DatasetError, AdapterFileError,
                ModelLoadError, PromptSyntaxError, InvalidValueError):
        assert issubclass(cls, LorakitError) and issubclass(cls, ValueError), cls
    assert issubclass(EmbeddingError, LorakitError) and issubclass(TrainingError, LorakitError)


@pytest.mark.parametrize(("typed", "said"), [
    (["--network_dim", "16"], "--network_dim (did you mean --rank?)"),  # kohya's name
    (["--learning_rate=1e-4"], "--learning_rate=1e-4 (did you mean --lr?)"),
    (["--batch_size", "2"], "--batch_size (did you mean --batch-size?)"),  # underscores for dashes
    (["--epohcs", "3"], "--epohcs (did you mean --epochs?)"),  # a near miss
    (["--optimizer_type", "adamw"], "--optimizer_type (did you mean --set optimizer.optimizer=NAME?)"),
    (["--config", "my.toml"], "--config (the TOML is the first argument: lorakit train FILE.toml; a kohya config: "
                              "--from-kohya FILE)"),  # it said: did you mean --print-config?
    (["--config_file", "k.toml"], "--config_file (did you mean --from-kohya FILE?)"),
    (["--foo"], "unrecognized arguments: --foo\n"),  # nothing close: no guess
])
def test_an_unknown_option_says_what_was_probably_meant(capsys, typed, said):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--print-config", *typed])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lorakit train") and said in err


@pytest.mark.parametrize(("typed", "said"), [
    (["resize", "a.safetensors", "--out", "b.safetensors", "--new_rank", "4", "--dynamic_param", "0.9"],
     "--new_rank (did you mean --rank?) 4 --dynamic_param (did you mean --param?) 0.9"),
    (["extract", "tuned", "--out", "a.safetensors", "--model_org", "base", "--dim", "8"],
     "--model_org (did you mean --base?) base --dim (did you mean --rank?) 8\n"),  # an option's value: no hint
    (["merge", "a.safetensors", "--out", "m.safetensors", "--ratios", "0.7", "--sd_model", "x"],
     "--ratios (each file's ratio follows it after a colon: A.safetensors:0.7)"),
    # LyCORIS's extract_locon.py takes BASE TUNED OUTPUT as arguments
    (["extract", "base", "tuned", "--out", "a.safetensors"],
     "unrecognized arguments: tuned (one model is the argument, the fine-tuned one; its base is --base: lorakit "
     "extract TUNED --base BASE)\n"),
])
def test_a_kohya_tool_option_says_lorakits_spelling(capsys, typed, said):
    """kohya's networks/resize_lora.py, extract_lora_from_models.py and merge_lora.py options, given to lorakit's
    tools, are answered with lorakit's spelling (``--dynamic_param`` was answered "did you mean --dynamic?")."""
    with pytest.raises(SystemExit) as exit_:
        main(typed)
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(("typed", "said"), [
    (["sample", "--prompt", "x", "--steps", "0"], "argument --steps: must be a whole number of 1 or more, got '0'"),
    (["sample", "--prompt", "x", "--batch-size", "0"], "argument --batch-size: must be a whole number of 1 or more"),
    (["sample", "--prompt", "x", "--cfg", "nan"], "argument --cfg: must be a finite number, got 'nan'"),
    (["sample", "a.safetensors", "--prompt", "x", "--sweep", "0,nan"], "argument --sweep: '0,nan': finite numbers"),
    (["eval", "run", "--seeds", "0"], "argument --seeds: must be a whole number of 1 or more, got '0'"),
    (["eval", "run", "--batch-size", "-4"], "argument --batch-size: must be a whole number of 1 or more, got '-4'"),
    (["eval", "run", "--size", "0"], "argument --size: must be a whole number of 1 or more, got '0'"),
    (["eval", "run", "--every", "0"], "argument --every: must be a whole number of 1 or more, got '0'"),
    (["eval", "run", "--cfg", "inf"], "argument --cfg: must be a finite number, got 'inf'"),
    (["interrogate", "a.safetensors", "--top", "0"], "argument --top: must be a whole number of 1 or more"),
    (["resize", "a.safetensors", "--dynamic", "sv_ratio", "--param", "nan"], "argument --param: must be a finite"),
    (["resize", "a.safetensors", "--rank", "2", "--conv-rank", "-1"], "argument --conv-rank: must be a whole number "
                                                                        "of 0 or more, got '-1'"),
    (["resize", "a.safetensors", "--rank", "two"], "argument --rank: must be a whole number of 1 or more, got 'two'"),
    (["extract", "tuned", "--min-diff", "-1"], "argument --min-diff: must be 0 or more, got '-1'"),
    # the shapes world's tasks: --score-every 0 and quality's --count 0 divided by zero, grid --jobs 0 started a run
    (["world", "experiment", "--score-every", "0"], "argument --score-every: must be a whole number of 1 or more"),
    (["world", "grid", "--jobs", "0"], "argument --jobs: must be a whole number of 1 or more, got '0'"),
    (["world", "pretrain", "--unet-lr", "nan"], "argument --unet-lr: must be a finite number, got 'nan'"),
    (["world", "blockwise", "--sample-seeds", "0"], "argument --sample-seeds: must be a whole number of 1 or more"),
    # their lists: a ValueError traceback (--lrs abc, --algorithms foo, --concepts xyz, --seeds a), or runs that each
    # failed (--lrs -1) or measured nothing (--changes size, --types nope)
    (["world", "grid", "--lrs", "2e-3,abc"], "argument --lrs: must be a number, got 'abc'"),
    (["world", "grid", "--lrs", "-1"], "argument --lrs: must be more than 0, got '-1'"),
    (["world", "grid", "--algorithms", "lora,foo"], "argument --algorithms: 'foo' is not one of lora, locon"),
    (["world", "grid", "--concepts", "xyz"], "argument --concepts: 'xyz' is not one of zkz, vlx"),
    (["world", "grid", "--seeds", "0,,1"], "argument --seeds: want a comma-separated list with no empty item"),
    (["world", "grid", "--changes", "size"], "argument --changes: 'size' is not one of color, position, background"),
    (["world", "experiment", "--types", "alter,nope"], "argument --types: 'nope' is not one of train, trigger, alter"),
    (["world", "experiment", "--lr", "0"], "argument --lr: must be more than 0, got '0'"),
    (["world", "blockwise", "--blocks", "upper,top"], "argument --blocks: 'top' is not one of upper, middle, bottom"),
    (["world", "blockwise", "--style-seeds", "-1"], "argument --style-seeds: must be a whole number of 0 or more"),
])
def test_a_number_that_cannot_work_is_refused_naming_the_option(capsys, tmp_path, monkeypatch, typed, said):
    """Before: --steps 0 divided by zero in the scheduler, --batch-size 0 failed on a cache file, --cfg nan drew
    NaN images, --param nan kept rank 1 everywhere; --eval's --size 0 drew the native size."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*typed, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_world_quality_refuses_a_count_of_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["world", "quality", "--count", "0"])
    assert exit_.value.code == 2 and "argument --count: must be a whole number of 1 or more" in capsys.readouterr().err


def test_an_unknown_option_of_a_subcommand_shows_that_subcommands_usage(capsys, tmp_path):
    """``lorakit world dataset --force DIR`` showed ``lorakit world``'s usage."""
    with pytest.raises(SystemExit) as exit_:
        main(["world", "dataset", "--force", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: lorakit world dataset [-h] [--out OUT] [--overwrite] [folder]")
    assert "lorakit world dataset: error: unrecognized arguments: --force" in err and not (tmp_path / "d").exists()


def test_world_dataset_takes_its_folder_as_out_too_as_the_other_tasks_do(tmp_path, capsys):
    assert main(["world", "dataset", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "eval_prompts.toml").is_file()
    assert "prompts.json, eval_prompts.toml, eval_prompts.txt and sample_prompts.txt to " in capsys.readouterr().out
    assert main(["world", "dataset", str(tmp_path / "d"), "--out", str(tmp_path / "e")]) == 2
    assert f"two folders given, {tmp_path / 'd'} and --out {tmp_path / 'e'}: give one" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("command", ["resize", "extract", "merge"])
def test_every_kohya_tool_hint_names_an_option_of_that_tool(command):
    import importlib

    module = importlib.import_module(f"lorakit.commands.{command}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    flags = {s for action in parser._actions for s in action.option_strings}
    for kohya, hint in module.KOHYA_OPTIONS.items():
        assert kohya not in flags, kohya  # an option the tool has needs no hint
        assert hint.startswith("(") or hint.split()[0] in flags, (kohya, hint)


def test_every_kohya_translation_is_an_option_or_a_setting_that_exists():
    """The hints name real flags and real --set keys (a renamed option would otherwise leave a wrong hint)."""
    from lorakit.commands.train import KOHYA_OPTIONS, add_arguments
    from lorakit.config import TrainConfig, set_option

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {s for action in parser._actions for s in action.option_strings}
    for kohya, lorakit_says in KOHYA_OPTIONS.items():
        several = lorakit_says.startswith("--set ") and lorakit_says.count("--set ") > 1
        for setting in lorakit_says.removeprefix("--set ").split(" --set ") if several else ():
            cfg = TrainConfig()  # a translation in several settings: each is a real one
            set_option(cfg, *setting.partition("=")[::2])
            cfg.validate()
        if lorakit_says.startswith("--set") and lorakit_says.count("--set ") == 1:
            dotted, _, value = lorakit_says.split(" ", 1)[1].strip("'").partition("=")
            names = {"optimizer.optimizer": "adamw", "optimizer.lr_scheduler": "cosine",
                     "output.save_precision": "fp16", "training.loss_type": "huber", "training.huber_schedule": "snr",
                     "data.resize_interpolation": "bicubic", "output.log_tracker_name": "my-project",
                     "output.wandb_run_name": "first try", "sample.sampler": "euler_a",
                     "output.log_with": "tensorboard", "data.caption_prefix": "masterpiece",
                     "data.caption_suffix": "best quality",
                     "output.metadata_title": "My style",
                     "output.metadata_author": "me", "output.metadata_description": "a style",
                     "method.ti_init_word": "dog", "model.compile_backend": "inductor",
                     "optimizer.lr_scheduler_type": "CosineAnnealingWarmRestarts",
                     "output.metadata_license": "CreativeML Open RAIL-M", "output.metadata_tags": "style, paint"}
            example = {"NAME": names.get(dotted), "N": "2", "X": "0.1", "true": "true", ".EXT": ".caption",
                       "{KEY = VALUE}": "{factor = 8}",
                       "MARK": "|||", "MINUTES": "60", "FILE": "trackers.toml", "[LR, LR, ...]": "[1e-6, 0.0]"}
            cfg = TrainConfig()
            needs = {"training.noise_offset_random_strength": [("training.noise_offset", "0.1")],
                     "training.adaptive_noise_scale": [("training.noise_offset", "0.1")],
                     "training.ip_noise_gamma_random_strength": [("training.ip_noise_gamma", "0.1")],
                     "training.save_last_n_steps": [("training.save_every_n_steps", "2")],  # what they change
                     "method.ti_weights": [("method.kind", "ti"), ("method.ti_token", "zkz")],  # what they start
                     "network.dim_from_weights": [("network.weights", "start.safetensors")],
                     "network.args": [("network.algorithm", "lokr")],  # factor: LoKr's option
                     # the schedule settings' own schedules (a warm-up is refused with the default, constant)
                     "optimizer.lr_warmup_steps": [("optimizer.lr_scheduler", "cosine")],
                     "optimizer.lr_decay_steps": [("optimizer.lr_scheduler", "warmup_stable_decay")],
                     "optimizer.lr_scheduler_min_lr_ratio": [("optimizer.lr_scheduler", "cosine_with_min_lr")],
                     "optimizer.lr_scheduler_timescale": [("optimizer.lr_scheduler", "inverse_sqrt")],
                     "optimizer.lr_scheduler_type": [("optimizer.lr_scheduler_args", "{T_0 = 10}")],
                     "optimizer.lr_scheduler_args": [("optimizer.lr_scheduler_type", "StepLR")],
                     "model.base_weights_multiplier": [("model.base_weights", '["style.safetensors"]')],
                     # fp8 and bf16 weights compute in mixed precision's dtype; block rates and bf16 weights are
                     # native fine-tuning's
                     "model.fp8_base": [("model.mixed_precision", "bf16")],
                     "model.fp8_base_unet": [("model.mixed_precision", "bf16")],
                     "model.full_bf16": [("model.mixed_precision", "bf16"), ("method.kind", "native")],
                     "optimizer.fused_backward_pass": [("method.kind", "native")],
                     "optimizer.text_encoder_2_lr": [("method.kind", "native"), ("method.native_text_encoder", "true")],
                     "method.native_block_lr": [("method.kind", "native")]}
            own = {"optimizer.lr_scheduler_args": "{step_size = 10}"}  # StepLR's
            for needed in needs.get(dotted, []):
                set_option(cfg, *needed)
            set_option(cfg, dotted, own.get(dotted, example.get(value, value)))
            cfg.validate()
        elif several:
            assert len(lorakit_says.split(" --set ")) > 1  # each checked above
        elif lorakit_says.startswith("--"):
            assert lorakit_says.split()[0] in flags, kohya
        else:
            assert lorakit_says.startswith(("(the default", "(not in lorakit")), kohya


def test_a_printed_config_without_out_gives_every_run_its_own_folder(tmp_path, capsys):
    """`lorakit train --data X --print-config > config.toml`: the file says ``output`` (each run of it gets its
    own time-stamped folder), not the time stamp of the moment it was printed."""
    assert main(["train", "--data", str(tmp_path), "--print-config"]) == 0
    assert '\ndir = "output"\n' in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--print-config"]) == 0
    assert f'\ndir = "{tmp_path / "run"}"\n' in capsys.readouterr().out


@pytest.mark.parametrize(("command", "dest"), [("merge", "model"), ("extract", "base")])
def test_merge_and_extract_take_the_base_model_as_model_or_base(command, dest):
    """extract names it --base, the other commands --model: both spellings work in both (a user switching
    between them should not meet an 'unrecognized arguments')."""
    module = importlib.import_module(f"lorakit.commands.{command}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    for flag in ("--model", "--base"):
        args = parser.parse_args(["x.safetensors", "--out", "y.safetensors", flag, "/models/sd15"])
        assert getattr(args, dest) == "/models/sd15"


def test_ctrl_c_while_a_command_imports_its_libraries_is_not_a_crash(monkeypatch, capsys):
    """Importing a command's libraries takes seconds (torch, diffusers): a Ctrl-C then ended in a traceback from
    deep inside transformers and the signal's own exit status; it is now 'interrupted', exit 130."""
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "boom", ("boom", "raise"))
    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert main(["boom"]) == 130
    assert capsys.readouterr().err == "lorakit boom: interrupted\n"


def test_train_takes_a_resolution_as_kohya_writes_it(tmp_path, capsys):
    """kohya's --resolution 512,768 (width,height) was "invalid int value: '48,64'"."""
    import tomllib

    for given, wanted in (("48,64", [48, 64]), ("64,64", 64), ("64", 64)):
        assert main(["train", "--out", str(tmp_path / "out"), "--resolution", given, "--print-config"]) == 0
        assert tomllib.loads(capsys.readouterr().out)["data"]["resolution"] == wanted
    with pytest.raises(SystemExit):
        main(["train", "--resolution", "64,abc", "--print-config"])
    assert "argument --resolution: want a size or width,height (512 or 512,768), got '64,abc'" in \
        capsys.readouterr().err
