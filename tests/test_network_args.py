"""``network.args`` (kohya's ``--network_args``): checked against the algorithm's options before anything loads,
and taken over from kohya configs as kohya and LyCORIS read them."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("algorithm", "args", "extra", "said"), [
    ("lora", {"factor": 4}, {}, r"network.args factor: not an option of lora; its options: dora, "),
    ("lokr", {"facter": 4}, {}, r"network.args facter: not an option of lokr \(did you mean factor\?\)"),
    ("lora", {"train_norm": "yes"}, {}, "network.args train_norm must be true or false, got 'yes'"),
    ("lokr", {"factor": "8"}, {}, "network.args factor must be a whole number, got '8'"),
    ("lokr", {"factor": True}, {}, "network.args factor must be a whole number, got True"),
    ("oft", {"constraint": "small"}, {}, "network.args constraint must be a number, got 'small'"),
    ("lora", {"use_tucker": 1}, {}, "network.args use_tucker must be true or false, got 1"),
    ("ia3", {"train_norm": True}, {}, r"every algorithm but \(IA\)³"),
    ("lora", {"train_norm": True}, {"train_unet": False, "train_text_encoder": True},
     "updates the norm layers of the U-Net's blocks, and network.train_unet is false"),
])
def test_network_args_are_checked_before_anything_loads(algorithm, args, extra, said):
    from lorakit.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.network.algorithm, cfg.network.args = algorithm, args
    for key, value in extra.items():
        setattr(cfg.network, key, value)
    with pytest.raises(ConfigError, match=said):
        cfg.validate()


def test_kohya_network_args_become_settings_options_or_a_said_refusal(tmp_path, tiny_model_dir):
    from test_kohya_config import kohya_file

    from lorakit.commands.kohya_config import config_from_kohya

    dims = ",".join(["2"] * 25)
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml",
                      'network_module = "networks.lora"\nnetwork_dim = 4\n'
                      f'network_args = ["block_dims={dims}", "down_lr_weight=sine", '
                      '"up_lr_weight=1,1,1,1,1,1,1,1,1,1,1,0.5", "rank_dropout=0.1", "verbose=False"]\n')
    cfg, translation = config_from_kohya(path)
    assert translation.untranslated == [] and "network_args verbose" in translation.skipped
    assert cfg.network.block_dims == [2] * 25 and cfg.network.down_lr_weight == "sine"
    assert cfg.network.up_lr_weight == "1,1,1,1,1,1,1,1,1,1,1,0.5" and cfg.network.rank_dropout == 0.1
    assert cfg.network.args == {}
    cfg.validate()

    path = kohya_file(tmp_path / "lycoris", tiny_model_dir, "lycoris.toml",
                      'network_module = "lycoris.kohya"\nnetwork_dim = 4\n'
                      'network_args = ["algo=loha", "train_norm=True", "factor=4", "disable_conv_cp=False", '
                      '"use_scalar=True", "scalar_start=1"]\n')
    cfg, translation = config_from_kohya(path)
    assert cfg.network.args == {"train_norm": True, "use_tucker": True, "use_scalar": True}
    assert any("factor=4: not an option of loha, which LyCORIS ignores too" in n for n in translation.notes)
    assert translation.untranslated == ["network_args scalar_start=1: not an option lorakit's adapters have"]


def test_a_mistyped_option_stops_the_command_before_anything_loads(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "--algorithm", "lokr", "--set",
                           "network.args={factr = 4}", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "network.args factr: not an option of lokr (did you mean factor?)" in done.stderr
    assert not (tmp_path / "run").exists()


def test_an_sdxl_kohya_configs_block_lists_are_taken_over_as_kohya_writes_them(tmp_path, tiny_model_dir):
    from test_kohya_config import kohya_file

    from lorakit.commands.kohya_config import config_from_kohya

    dims = ",".join(["4"] * 23)
    path = kohya_file(tmp_path, tiny_model_dir, "sdxl.toml",
                      'network_module = "networks.lora"\nnetwork_dim = 4\n'
                      f'network_args = ["block_dims={dims}", "mid_lr_weight=1,0.5,1", "down_lr_weight=sine"]\n')
    cfg, translation = config_from_kohya(path)
    assert translation.untranslated == []
    assert cfg.network.block_dims == [4] * 23 and cfg.network.mid_lr_weight == "1,0.5,1"
    cfg.validate()  # the family is not known before the model: SDXL's three middle values pass
