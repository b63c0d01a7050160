"""LyCORIS's preset tables and files (``preset=...`` in its network_args) select the same modules in lorakit as in
LyCORIS itself, and what they cannot mean here is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import build_tiny_text_encoder, build_tiny_unet

from lorakit.errors import InvalidValueError
from lorakit.lycoris_preset import NAMED, preset_from_table, read_preset
from lorakit.network import UniformRanks, create_network, get_preset

CUSTOM = {
    # regular expressions at the path's start, as LyCORIS matches names by default; an excluded block
    "names-and-exclusions": {"enable_conv": True, "unet_target_module": ["ResnetBlock2D"],
                             "unet_target_name": [r"down_blocks\.0\.attentions\.\d+\.proj_", "conv_in",
                                                  "mid_block.attentions"],
                             "exclude_name": ["up_blocks.1", r"down_blocks\.1\.resnets\.0"],
                             "text_encoder_target_module": ["CLIPMLP"]},
    # globs instead, and no k×k convolutions
    "fnmatch-no-conv": {"enable_conv": False, "use_fnmatch": True, "unet_target_module": ["ResnetBlock2D"],
                        "unet_target_name": ["*attn2.to_[kv]", "time_embedding.*"],
                        "exclude_name": ["*.resnets.1*"]},
    # per-module algorithms, ranks, alphas and options, by class (the innermost) and by name (first)
    "algo-maps": {"unet_target_module": ["Transformer2DModel", "ResnetBlock2D"], "unet_target_name": ["conv_in"],
                  "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
                  "module_algo_map": {"Attention": {"algo": "lokr", "factor": 4},
                                      "ResnetBlock2D": {"algo": "loha", "dim": 2, "alpha": 1},
                                      "FeedForward": {"dim": 8}, "CLIPMLP": {"algo": "lokr", "dim": 100000}},
                  "name_algo_map": {"conv_in": {"algo": "lora", "dim": 3, "use_tucker": True}}},
}
TABLES = {**{f"lycoris-{name}": table for name, table in NAMED.items()}, **CUSTOM}


def _lycoris_modules(monkeypatch, table, algo: str = "locon") -> dict[str, dict[str, tuple[int, ...]]]:
    """The modules LyCORIS's kohya network creates for a preset table on the tiny models: name -> the shape of
    each tensor it would write (which tells the algorithm, rank and options apart)."""
    from lycoris.kohya import LycorisNetworkKohya as Lycoris

    # LyCORIS reads its preset from these class attributes (by the class's own name): set, and put back after
    for attr, key, default in (("ENABLE_CONV", "enable_conv", True), ("USE_FNMATCH", "use_fnmatch", False),
                               ("UNET_TARGET_REPLACE_MODULE", "unet_target_module", []),
                               ("UNET_TARGET_REPLACE_NAME", "unet_target_name", []),
                               ("TEXT_ENCODER_TARGET_REPLACE_MODULE", "text_encoder_target_module", []),
                               ("TEXT_ENCODER_TARGET_REPLACE_NAME", "text_encoder_target_name", []),
                               ("TARGET_EXCLUDE_NAME", "exclude_name", []),
                               ("MODULE_ALGO_MAP", "module_algo_map", {}), ("NAME_ALGO_MAP", "name_algo_map", {})):
        monkeypatch.setattr(Lycoris, attr, table.get(key, default), raising=False)
    network = Lycoris(build_tiny_text_encoder(), build_tiny_unet(), lora_dim=2, conv_lora_dim=2, alpha=1,
                      conv_alpha=1, network_module=algo, warn_on_unmatched=False)
    return {m.lora_name.replace("text_model_", ""): {k: tuple(v.shape) for k, v in m.state_dict().items()
                                                     if not k.startswith("org_")}
            for m in network.unet_loras + network.text_encoder_loras}


@pytest.mark.parametrize("label", TABLES)
def test_a_preset_table_selects_what_lycoris_selects(label, monkeypatch):
    pytest.importorskip("lycoris.kohya")
    table = TABLES[label]
    ours = create_network(build_tiny_unet(), build_tiny_text_encoder(), preset=preset_from_table(table, label),
                          ranks=UniformRanks(2, 1.0))
    modules = {n.replace("text_model_", ""): {k: tuple(v.shape) for k, v in a.file_tensors().items()}
               for n, a in ours.adapters.items()}
    assert modules and modules == _lycoris_modules(monkeypatch, table)
    if label == "algo-maps":  # each map reached its layers; the network's own options are still its record
        assert {a.algorithm for a in ours.adapters.values()} == {"lora", "loha", "lokr"}
        again = create_network(build_tiny_unet(), preset=preset_from_table(table, label), options={"dropout": 0.1})
        assert again.args["dropout"] == "0.1" and again.args["algo"] == "lora"


def test_the_ia3_preset_makes_lycoris_ia3_presets_modules_where_its_names_reach_the_layers(monkeypatch):
    """LyCORIS's ``ia3`` preset names to_k, to_v, ff.net.2 (its input scaled) and CLIP's k/v_proj, fc2, matched at
    the path's start, which reaches no layer of a diffusers or transformers model; with the same names as globs
    over the whole path, LyCORIS makes the modules lorakit's ``ia3`` preset makes (the same vectors, the same
    inputs scaled).  With another algorithm the preset's on_input goes unread, as LyCORIS ignores it."""
    pytest.importorskip("lycoris.kohya")
    from lycoris.config import PRESET

    from lorakit.commands.kohya_config import LYCORIS_PRESETS

    table = {**PRESET["ia3"], "use_fnmatch": True}
    for key in ("unet_target_name", "text_encoder_target_name"):
        table[key] = [f"*{name}" for name in table[key]]
    table["name_algo_map"] = {f"*{name}": conf for name, conf in table["name_algo_map"].items()}
    theirs = _lycoris_modules(monkeypatch, table, algo="ia3")
    ours = create_network(build_tiny_unet(), build_tiny_text_encoder(), preset="ia3", algorithm="ia3")
    modules = {n.replace("text_model_", ""): {k: tuple(v.shape) for k, v in a.file_tensors().items()}
               for n, a in ours.adapters.items()}
    assert modules == theirs and len(modules) == 86
    assert sum(a.scales_input for a in ours.adapters.values()) == 18  # every ff.net.2 and fc2
    assert len(create_network(build_tiny_unet(), preset="ia3", algorithm="lora")) == 80
    assert LYCORIS_PRESETS["ia3"] == "ia3"  # a kohya config's preset=ia3


def test_ia3_on_another_preset_gets_a_note_naming_its_own():
    from lorakit.config import TrainConfig
    from lorakit.run_messages import ia3_preset_note

    cfg = TrainConfig()
    cfg.network.algorithm = "ia3"
    assert "--preset ia3" in ia3_preset_note(cfg) and "preset attn-mlp" in ia3_preset_note(cfg)
    cfg.network.preset = "ia3"
    assert ia3_preset_note(cfg) is None
    cfg.network.algorithm, cfg.network.preset = "lora", "attn-mlp"
    assert ia3_preset_note(cfg) is None


def test_exclusions_and_names_do_what_the_file_says(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel"]\nexclude_name = ["up_blocks"]\n'
                      'unet_target_name = ["conv_in"]\n')
    network = create_network(build_tiny_unet(), preset=str(preset))
    names = network.names()
    assert "lora_unet_conv_in" in names and any("_down_blocks_" in n for n in names)
    assert not any("_up_blocks_" in n for n in names) and not any("_resnets_" in n for n in names)
    assert network.args["preset"] == str(preset)


@pytest.mark.parametrize(("text", "said"), [
    ("", None),
    ('[module_algo_map.Attention]\nalgo = "lokr"\nfactr = 4\n',
     r"\[module_algo_map.Attention\] factr: not an option of lokr \(did you mean factor\?\)"),
    ('[name_algo_map.conv_in]\nalgo = "lokr"\ndim = 0\n', r"\[name_algo_map.conv_in\] dim must be a positive"),
    ('[name_algo_map.conv_in]\nalgo = "nope"\n', r"\[name_algo_map.conv_in\] unknown adapter algorithm 'nope'"),
    ('[module_algo_map.Attention]\nalgo = "norm"\n', r"\[module_algo_map.Attention\] algo 'norm' updates norm layers"),
    ('[module_algo_map.Attention]\nwhatever = 1\n', r"whatever: not an option of any algorithm"),
    ('module_algo_map = ["Attention"]\n', r"module_algo_map must be a table of tables"),
    ('unet_target_modules = ["Transformer2DModel"]\n', r"unet_target_modules: not keys of a LyCORIS preset"),
    ('unet_target_name = "conv_in"\n', r"unet_target_name must be a list of strings, got 'conv_in'"),
    ('enable_conv = "yes"\n', "enable_conv must be true or false"),
    ("unet_target_module = [\n", "not a readable LyCORIS preset file"),
])
def test_a_preset_file_lorakit_cannot_read_as_meant_is_refused_naming_it(tmp_path, text, said):
    path = tmp_path / "preset.toml"
    path.write_text(text)
    if said is None:  # an empty preset selects nothing: that is the run's error to give (no module selected)
        assert read_preset(path).unet == ()
        return
    with pytest.raises(InvalidValueError, match=rf"preset\.toml: .*{said}"):
        read_preset(path)


def test_settings_and_kohya_configs_name_presets_and_files(tmp_path, tiny_model_dir):
    from test_kohya_config import kohya_file

    from lorakit.commands.kohya_config import config_from_kohya
    from lorakit.config import ConfigError, TrainConfig

    cfg = TrainConfig()
    cfg.network.preset = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=r"network.preset: .*absent\.toml: no such LyCORIS preset file"):
        cfg.validate()
    cfg.network.preset = "lycoris-nope"
    with pytest.raises(ConfigError, match="unknown preset 'lycoris-nope'; presets are .*lycoris-full-lin"):
        cfg.validate()
    assert get_preset("lycoris-unet-transformer-only").text_encoder == ()

    (tmp_path / "mine.toml").write_text('unet_target_module = ["Transformer2DModel"]\n')
    for preset, expected, untranslated in (("full-lin", "lycoris-full-lin", False),
                                           ("mine.toml", str(tmp_path / "mine.toml"), False),
                                           ("ia3", "ia3", False), ("lora-only", None, True)):
        folder = tmp_path / preset.replace(".", "_")
        path = kohya_file(folder, tiny_model_dir, "kohya.toml", 'network_module = "lycoris.kohya"\nnetwork_dim = 4\n'
                          f'network_args = ["algo=locon", "preset={preset}"]\n')
        if preset == "mine.toml":  # beside the kohya config, not in the current folder
            (folder / "mine.toml").write_text((tmp_path / "mine.toml").read_text())
            expected = str(folder / "mine.toml")
        cfg, translation = config_from_kohya(path)
        if untranslated:
            assert "network_args preset=lora-only: a LyCORIS preset lorakit lacks" in translation.untranslated[0]
            continue
        assert cfg.network.preset == expected and translation.untranslated == []
        cfg.validate()


@pytest.mark.slow
def test_a_run_with_a_preset_file_trains_the_modules_it_names(tiny_model_dir, tmp_path, capsys):
    from test_train import make_config, run_train, write_dataset

    from lorakit.formats import read_adapter

    preset = tmp_path / "attention-down.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel"]\nexclude_name = ["up_blocks", "mid_block"]\n'
                      '[module_algo_map.FeedForward]\nalgo = "loha"\ndim = 2\n')
    cfg = make_config(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "run",
                      training={"max_epochs": 1}, network={"preset": str(preset), "exclude": ["*.attentions.1"]})
    run_train(cfg)
    file = read_adapter(tmp_path / "run" / "lorakit.safetensors")
    modules = file.modules()
    assert modules and all(n.startswith("lora_unet_down_blocks_") and "_attentions_0_" in n for n in modules)
    assert file.metadata["lorakit_preset"] == str(preset)
    assert json.loads(file.metadata["ss_network_args"])["exclude"] == "*.attentions.1"
    # the feed-forward layers are LoHa, the rest the run's LoRA; the file reads back as it was trained
    assert file.metadata["lorakit_algorithm"] == "loha,lora"
    assert {n for n, t in modules.items() if "hada_w1_a" in t} == {n for n in modules if "_ff_net_" in n}
    from lorakit.formats import load_network
    from lorakit.models import load_base_model

    model = load_base_model(str(tiny_model_dir))
    loaded, report = load_network(file, model.unet, model.text_encoders)
    assert report.ok and len(loaded) == len(modules)
    # kohya's --dim_from_weights on the mixed file: its algorithms, ranks and layers, whatever --algorithm says
    from lorakit.cli import main

    again = tmp_path / "again"
    assert main(["train", "--data", str(tmp_path / "data"), "--model", str(tiny_model_dir), "--out", str(again),
                 "--network-weights", str(tmp_path / "run" / "lorakit.safetensors"), "--dim-from-weights",
                 "--algorithm", "lokr", "--epochs", "1", "--no-progress", "--set", "early_stop.mode=off"]) == 0
    said = capsys.readouterr().out
    assert "lora/loha ranks 2 and layers from the file (not network.algorithm lokr: the file decides)" in said
    result = read_adapter(again / "lorakit.safetensors")
    assert {n: {k: v.shape for k, v in t.items()} for n, t in result.modules().items()} == \
        {n: {k: v.shape for k, v in t.items()} for n, t in modules.items()}
    assert result.metadata["lorakit_algorithm"] == "loha,lora"
    assert json.loads(result.metadata["ss_network_args"])["algo"] == "lora"  # most of its modules


def test_dim_from_weights_builds_a_lycoris_file_of_mixed_algorithms_module_for_module(monkeypatch, tmp_path):
    """A file LyCORIS wrote from its algorithm maps (LoKr with factor 4 on attention, LoHa on the resnets, a Tucker
    LoRA on conv_in) builds the same network in lorakit from its weights alone, and starts it exactly."""
    pytest.importorskip("lycoris.kohya")
    from lycoris.kohya import LycorisNetworkKohya as Lycoris

    from lorakit.formats import ranks_from_file, read_adapter, start_network_from_file

    table = CUSTOM["algo-maps"]
    _lycoris_modules(monkeypatch, table)  # the class attributes set from the table
    encoder, unet = build_tiny_text_encoder(), build_tiny_unet()
    theirs = Lycoris(encoder, unet, lora_dim=2, conv_lora_dim=2, alpha=1, conv_alpha=1, network_module="locon",
                     warn_on_unmatched=False)
    theirs.apply_to(encoder, unet, apply_text_encoder=True, apply_unet=True)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / "lycoris.safetensors"
    theirs.save_weights(str(path), torch.float32, None)
    unet, encoder = build_tiny_unet(), build_tiny_text_encoder()
    rule = ranks_from_file(path, UniformRanks(8, 8.0), unet, encoder, algorithm="lora")
    ours = create_network(unet, encoder, preset="lycoris-full", ranks=rule)
    assert {a.algorithm for a in ours.adapters.values()} == {"lora", "loha", "lokr"}
    report = start_network_from_file(ours, path, unet, encoder)
    assert report.fresh == [] and len(report.loaded) == len(ours) == len(read_adapter(path).modules())


def test_include_and_exclude_change_a_presets_layers_and_a_pattern_naming_nothing_is_refused(tiny_model_dir):
    from lorakit.config import ConfigError, TrainConfig
    from lorakit.methods import adapted_preset
    from lorakit.models import load_base_model
    from lorakit.network import with_filters

    preset = with_filters(get_preset("attn-mlp"), include=["conv_in", "*.resnets.0.conv1"],
                          exclude=["*.attn1.*", "up_blocks.3"])
    network = create_network(build_tiny_unet(), preset=preset)
    names = network.names()
    assert "lora_unet_conv_in" in names and "lora_unet_down_blocks_0_resnets_0_conv1" in names
    assert not any("_attn1_" in n for n in names) and not any(n.startswith("lora_unet_up_blocks_3_") for n in names)
    assert any("_attn2_" in n for n in names)

    cfg = TrainConfig()
    cfg.network.exclude = ["*.atn1.*"]
    cfg.validate()  # globs are checked against the model, once it is loaded
    with pytest.raises(ConfigError, match=r"network.exclude: '\*.atn1.\*' names no module of the model"):
        adapted_preset(cfg, load_base_model(str(tiny_model_dir)))
    cfg.network.exclude = "*.attn1.*"
    with pytest.raises(ConfigError, match="network.exclude must be a list of module-path globs"):
        cfg.validate()
