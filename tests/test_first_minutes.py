"""What a new user sees from ``lorakit train`` (issue 20): lorakit's own lines, no library noise."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.config import TrainConfig
from lorakit.run_messages import estimate_line, next_steps, opening_line, what_is_trained

# what the libraries print when left alone: transformers' torchvision notices and loading bars, diffusers'
# cast warnings, numpy/torch deprecations, any Python warning line pointing into site-packages
NOISE = re.compile(r"\[transformers\]|requires torchvision|Loading weights|should be kept in float32|"
                   r"(Deprecation|Future|User|Runtime)Warning|site-packages|warnings\.warn")


def _run_train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # what a fresh shell has
    return subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--max-steps", "2", "--no-progress",
                           "--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_main_command_has_no_third_party_noise_and_says_what_it_does(tmp_path):
    result = _run_train(tmp_path / "run")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    noisy = [line for line in output.splitlines() if NOISE.search(line)]
    assert noisy == []
    lines = result.stdout.splitlines()
    assert lines[0].startswith("The built-in job:") and "zkz" in result.stdout.split("lorakit train:")[0]
    opening = next(line for line in lines if line.startswith("lorakit train: a LoCon"))
    assert str(tmp_path / "run") in opening and "built-in shapes-world model" in opening
    after = result.stdout[result.stdout.index("next:"):]
    assert "<lora:lorakit:1>" in after and "load_lora_weights" in after and "lorakit sample" in after
    assert "cs_fluctuation.png" in after and "lorakit report" in after
    assert (tmp_path / "run" / "summary.txt").read_text().rstrip().endswith(after.rstrip().splitlines()[-1])


def test_a_warning_about_the_users_data_is_one_line_naming_the_command(tmp_path):
    """Images without captions, trigger or class: lorakit warns as it errs, without Python's file:line header and
    the echoed source line."""
    from PIL import Image

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(data / f"{i}.png")
    result = _run_train(tmp_path / "run", "--data", str(data))
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "no caption text" in line]
    assert len(warned) == 1 and warned[0].startswith("lorakit train: warning: ")
    assert "DatasetWarning" not in result.stderr and ".py:" not in result.stderr


def test_silencing_hides_the_libraries_notices(tmp_path):
    # transformers' notice about torchvision, printed when an image processor class is used without it
    use = "import transformers; transformers.CLIPImageProcessor"
    silenced = "from lorakit.quiet import silence_third_party; silence_third_party(); " + use
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "DIFFUSERS_", "HF_HUB_"))}
    loud = subprocess.run([sys.executable, "-c", use], capture_output=True, text=True, env=env, timeout=120)
    quiet = subprocess.run([sys.executable, "-c", silenced], capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0
    if "torchvision" not in loud.stderr:
        pytest.skip("this transformers build prints no torchvision notice (torchvision installed?)")
    assert "torchvision" not in quiet.stderr


def test_verbose_flag_is_taken_off_the_command_line(monkeypatch, capsys):
    from lorakit import cli

    seen = []
    monkeypatch.setattr(cli, "silence_third_party", lambda: seen.append("silenced"))
    with pytest.raises(SystemExit):
        cli.main(["--verbose", "train", "--help"])
    assert seen == [] and "--print-config" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert seen == ["silenced"]


def test_opening_line_names_method_data_model_and_output():
    cfg = TrainConfig()
    cfg.data.train_data, cfg.model.base, cfg.output.dir = "photos/", "/models/sd15.safetensors", "runs/dog"
    cfg.network.algorithm, cfg.network.preset = "loha", "attn-mlp"
    line = opening_line(cfg)
    assert "a LoHa (rank 8, preset attn-mlp)" in line and "photos/" in line
    assert "/models/sd15.safetensors" in line and line.endswith("runs/dog")
    # algorithms without a rank are not given one; OFT's rank is its block size
    for algorithm, said in (("ia3", "an (IA)³ (preset attn-mlp)"), ("full", "a full-ΔW adapter (preset attn-mlp)"),
                            ("oft", "an OFT (block size 8, preset attn-mlp)"), ("lokr", "a LoKr (rank 8, preset "),
                            ("diag-oft", "an OFT (block size 8"), ("glora", "a GLoRA (rank 8")):
        cfg.network.algorithm = algorithm
        assert said in what_is_trained(cfg), what_is_trained(cfg)
    cfg.method.kind = "native"
    assert what_is_trained(cfg).startswith("native fine-tuning")


def test_estimate_line_scales_to_minutes():
    assert "about 10 min" in estimate_line(2.0, 300, early_stop=True)
    assert "about 8 s" in estimate_line(2.0, 4, early_stop=False) and "sooner" not in estimate_line(2.0, 4, False)


def test_next_steps_fit_the_algorithm(tmp_path):
    cfg = TrainConfig()
    cfg.network.algorithm = "lokr"
    lines = "\n".join(next_steps(tmp_path, [tmp_path / "lorakit.safetensors"], cfg))
    assert "load_lora_weights" not in lines and "--to lora" in lines  # diffusers cannot read LoKr
    assert f"lorakit resize {tmp_path / 'lorakit.safetensors'} --to lora --out plain.safetensors" in lines
    cfg.model.base = "/models/sdxl.safetensors"  # on another model than the built-in one: that model, or it fails
    lines = "\n".join(next_steps(tmp_path, [tmp_path / "lorakit.safetensors"], cfg))
    assert "--to lora --model /models/sdxl.safetensors --out plain.safetensors" in lines
    cfg.model.base = None
    cfg.method.kind = "ti"
    save_file({"clip_l": torch.zeros(1, 8)}, str(tmp_path / "lorakit-zkz.safetensors"))  # its diffusers line reads it
    lines = "\n".join(next_steps(tmp_path, [tmp_path / "lorakit-zkz.safetensors"], cfg))
    assert "load_textual_inversion" in lines
    assert f"lorakit sample --embedding {tmp_path / 'lorakit-zkz.safetensors'} --prompt \"a zkz ...\"" in lines
    # A1111 names an embedding after its file: the word to write is the file's stem (or the token once renamed)
    assert "write 'lorakit-zkz' in a prompt (or rename the file zkz.safetensors and write 'zkz')" in lines
    cfg.method.kind = "pivotal"  # two files: the adapter and the embedding, both named, both loaded
    lines = "\n".join(next_steps(tmp_path, [tmp_path / "lorakit-zkz.safetensors", tmp_path / "lorakit.safetensors"],
                                 cfg))
    assert "copy lorakit.safetensors into models/Lora" in lines and "embedding lorakit-zkz.safetensors" in lines
    assert f"--embedding {tmp_path / 'lorakit-zkz.safetensors'}" in lines


def test_next_steps_promise_a_page_of_samples_only_when_there_are_some(tmp_path):
    cfg = TrainConfig()
    lines = "\n".join(next_steps(tmp_path, [tmp_path / "lorakit.safetensors"], cfg))
    assert f"lorakit eval {tmp_path} --out {tmp_path}-eval" in lines  # the built-in model: its reader is the default
    spaced = tmp_path / "my run"  # every path a command to paste, quoted whole
    assert f"lorakit eval '{spaced}' --out '{spaced}-eval'" in "\n".join(next_steps(spaced, [], cfg))
    from lorakit.models import builtin_model_path

    for base, hint in ((builtin_model_path(), False), ("/models/sd15.safetensors", True)):  # by path: the same
        cfg.model.base = str(base)
        assert ("--extractor clip=DIR" in "\n".join(next_steps(tmp_path, [], cfg))) == hint
    cfg.model.base = None
    assert "a page with the curve and the settings" in lines and "--sample-prompts FILE" in lines
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "e1-0.png").write_bytes(b"")
    lines = "\n".join(next_steps(tmp_path, [tmp_path / "lorakit.safetensors"], cfg))
    assert "a page with the samples, the curve and the settings" in lines and "--sample-prompts" not in lines
    assert f"and after the eval its ranking: lorakit report {tmp_path}" in lines  # report finds {tmp_path}-eval
    cfg.method.kind = "ti"  # eval reads a textual-inversion run epoch by epoch too
    lines = "\n".join(next_steps(tmp_path, [], cfg))
    assert f"lorakit eval {tmp_path} --out {tmp_path}-eval" in lines and "after the eval its ranking" in lines


def test_what_may_stop_the_run_is_said_as_it_is_for_every_method():
    """Textual inversion has no adapter weights for the CS rule: the plan and the built-in job's introduction say
    the run is not stopped on the weights (only on samples, when asked), instead of promising it."""
    from lorakit.commands.train import builtin_introduction
    from lorakit.run_messages import early_stop_text

    cfg = TrainConfig()
    assert early_stop_text(cfg, True) == cfg.early_stop.mode and "watching the adapter's weights" in \
        builtin_introduction(cfg)
    cfg.method.kind = "ti"
    assert early_stop_text(cfg, False).startswith("off (textual inversion has no adapter weights")
    assert "no adapter weights for the early stop to watch: every epoch runs" in builtin_introduction(cfg)
    cfg.early_stop.samples = "world"
    assert early_stop_text(cfg, False) == "on the samples (world)"
    assert early_stop_text(cfg, True) == f"on the samples (world); {cfg.early_stop.mode} recorded, not stopping"
    assert "by scoring the samples it draws (world)" in builtin_introduction(cfg)
    cfg.early_stop.mode = "off"
    assert early_stop_text(cfg, False) == "off" and "early stopping is off" in builtin_introduction(cfg)


def test_lorakit_alone_lists_the_commands_and_version_and_a_typo_are_answered():
    """`lorakit` alone said only "the following arguments are required: <command>"; `--version` was that error too;
    `lorakit trian` listed the choices without saying which was meant."""
    def lorakit(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lorakit.cli", *argv], capture_output=True, text=True,
                              timeout=120)

    alone = lorakit()
    assert alone.returncode == 2 and "train" in alone.stdout and "interrogate" in alone.stdout
    version = lorakit("--version")
    assert version.returncode == 0
    assert re.fullmatch(r"lorakit \S+ \(Python [\d.]+; torch \S+, diffusers \S+, transformers \S+, safetensors \S+\)\n",
                        version.stdout)
    typo = lorakit("trian", "--data", "x")
    assert typo.returncode == 2 and "lorakit: error: unknown command 'trian' (did you mean 'train'?)" in typo.stderr


def test_a_logged_warning_is_one_line_naming_the_command_too(tmp_path, capsys):
    """A sample size the model cannot take was said bare ("sample width 63 is not a multiple of 32; using 32"),
    unlike every other warning; said once per call, however many calls a process makes."""
    from lorakit.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 63 --s 2\n")
    for out in ("one", "two"):
        assert main(["sample", "--prompts", str(prompts), "--out", str(tmp_path / out), "--no-progress"]) == 0
        said = [line for line in capsys.readouterr().err.splitlines() if "width 63" in line]
        assert said == ["lorakit sample: warning: sample width 63 is not a multiple of 32; using 32"]
