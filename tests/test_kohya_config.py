"""``lorakit train --from-kohya FILE``: a kohya sd-scripts training config (its --config_file TOML) translated
option by option, what lorakit lacks listed, and the run it describes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_train import write_dataset

from lorakit.cli import main
from lorakit.commands.kohya_config import config_from_kohya
from lorakit.config import ConfigError, load_config

KOHYA = """\
pretrained_model_name_or_path = "/models/sd15.safetensors"
train_data_dir = "/data/my_char"
output_dir = "/runs/my_char"
output_name = "my_char"
save_model_as = "safetensors"
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["algo=loha", "conv_dim=4", "conv_alpha=2", "use_tucker=True", "loraplus_lr_ratio=16"]
learning_rate = 1e-4
text_encoder_lr = 5e-5
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.1", "betas=(0.9,0.99)"]
lr_scheduler = "cosine"
lr_scheduler_num_cycles = 3
lr_scheduler_power = 2.0
train_batch_size = 2
max_train_epochs = 10
mixed_precision = "bf16"
seed = 42
clip_skip = 2
resolution = "512,512"
shuffle_caption = true
keep_tokens = 1
weighted_captions = true
xformers = true
gradient_checkpointing = true
noise_offset = 0.05
min_snr_gamma = 5
max_token_length = 150
full_bf16 = false
log_with = "tensorboard"
sample_sampler = "euler_a"
save_every_n_steps = 500
save_last_n_steps = 2000
fp8_base = true
no_token_padding = true
my_own_key = 3
"""


def test_every_option_is_translated_or_listed(tmp_path):
    path = tmp_path / "kohya.toml"
    path.write_text(KOHYA)
    cfg, translation = config_from_kohya(path)
    assert (cfg.model.base, cfg.data.train_data, cfg.output.dir, cfg.output.name) == (
        "/models/sd15.safetensors", "/data/my_char", "/runs/my_char", "my_char")
    net, opt = cfg.network, cfg.optimizer
    assert (net.algorithm, net.preset, net.rank, net.alpha, net.conv_rank, net.conv_alpha) == (
        "loha", "lycoris-full", 16, 8, 4, 2)  # LyCORIS's default preset, full, reaches conv_in/out too
    assert net.args == {"use_tucker": True} and net.train_text_encoder and net.train_unet  # kohya trains both
    assert net.loraplus_lr_ratio == 16  # LoRA+ is a setting of lorakit's own
    assert (opt.optimizer, opt.learning_rate, opt.text_encoder_lr, opt.lr_scheduler) == ("adamw8bit", 1e-4, 5e-5,
                                                                                         "cosine")
    assert opt.args == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert (opt.lr_scheduler_num_cycles, opt.lr_scheduler_power) == (3, 2.0)
    data = cfg.data
    assert (data.batch_size, data.resolution, data.shuffle_caption, data.keep_tokens) == (2, 512, True, 1)
    assert data.weighted_captions
    assert (cfg.training.max_epochs, cfg.training.seed, cfg.training.noise_offset, cfg.training.min_snr_gamma) == (
        10, 42, 0.05, 5)
    assert (cfg.model.mixed_precision, cfg.model.clip_skip, cfg.model.max_token_length) == ("bf16", 2, 150)
    assert cfg.model.gradient_checkpointing and cfg.output.log_with == "tensorboard"
    assert cfg.sample.sampler == "euler_a"
    assert (cfg.training.save_every_n_steps, cfg.training.save_last_n_steps) == (500, 2000)
    assert cfg.model.fp8_base  # kohya's fp8_base: the base weights stored in fp8
    assert [line.split(" = ")[0] for line in translation.untranslated] == ["no_token_padding", "my_own_key"]
    assert "full_bf16" in translation.skipped and "xformers" in translation.skipped  # off, or lorakit's way anyway


def test_an_sd2_config_is_taken_over_with_its_prediction_type(tmp_path):
    """kohya's v2 switch needs nothing (lorakit reads the family from the model); v_parameterization is the
    prediction type, which also picks SD2.x's 768 config for a single file."""
    path = tmp_path / "sd2.toml"
    path.write_text('pretrained_model_name_or_path = "/models/v2-1_768-ema-pruned.safetensors"\nv2 = true\n'
                    'v_parameterization = true\nresolution = "768,768"\n')
    cfg, translation = config_from_kohya(path)
    assert cfg.model.prediction_type == "v_prediction" and cfg.data.resolution == 768
    assert "v2" in translation.skipped and not translation.untranslated


def kohya_file(tmp_path, model_dir, name: str, options: str):
    """A kohya config training 4 images of the built-in architecture into tmp_path/run, with ``options``."""
    data = write_dataset(tmp_path / "data", n=4)
    path = tmp_path / name
    path.write_text(f'pretrained_model_name_or_path = "{model_dir}"\ntrain_data_dir = "{data}"\n'
                    f'output_dir = "{tmp_path / "run"}"\n{options}')
    return path


def test_a_kohya_config_trains_as_kohya_would_and_prints_a_lorakit_config(tiny_model_dir, tmp_path, capsys):
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml", 'output_name = "zkz"\nnetwork_module = "networks.lora"\n'
                      'network_dim = 4\nnetwork_alpha = 2\ntrain_batch_size = 2\nmax_train_epochs = 1\nseed = 1\n'
                      'no_token_padding = true\n')
    assert main(["train", "--from-kohya", str(path), "--no-progress"]) == 2  # refused: not every option taken over
    err = capsys.readouterr().err
    assert "no_token_padding" in err and "--print-config" in err and not (tmp_path / "run").exists()
    assert main(["train", "--from-kohya", str(path), "--print-config"]) == 0
    printed = capsys.readouterr()
    assert "not taken over" in printed.err and "no_token_padding" in printed.err
    (tmp_path / "lorakit.toml").write_text(printed.out)
    assert load_config(tmp_path / "lorakit.toml").network.rank == 4  # the printed config is a lorakit config

    path.write_text(path.read_text().replace("no_token_padding = true\n", ""))
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off"]) == 0
    with safe_open(str(tmp_path / "run" / "zkz.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert any(k.startswith("lora_te_") for k in keys)  # kohya trains the text encoder unless told not to


def test_json_configs_and_bad_values_name_the_file(tmp_path):
    path = tmp_path / "kohya.json"
    path.write_text(json.dumps({"network_module": "networks.lora", "network_train_unet_only": True,
                                "network_dim": 8, "optimizer_type": "Prodigy"}))
    cfg, _ = config_from_kohya(path)
    assert (cfg.network.rank, cfg.network.train_text_encoder, cfg.optimizer.optimizer) == (8, False, "prodigy")
    path.write_text(json.dumps({"network_module": "networks.lora", "optimizer_type": "AdamWScheduleFree",
                                "lr_scheduler": "cosine", "lr_warmup_steps": 100}))
    cfg, translation = config_from_kohya(path)  # kohya runs it without a schedule: the one named is not used
    assert (cfg.optimizer.optimizer, cfg.optimizer.lr_scheduler, cfg.optimizer.lr_warmup_steps) == (
        "adamwschedulefree", "constant", 0)
    assert any("lr_scheduler = 'cosine', lr_warmup_steps = 100: not used with AdamWScheduleFree" in n
               for n in translation.notes)
    cfg.validate()
    for kohya_name, ours in (("PagedAdamW8bit", "pagedadamw8bit"), ("torch.optim.RAdam", "torch.optim.RAdam")):
        path.write_text(json.dumps({"network_module": "networks.lora", "optimizer_type": kohya_name}))
        cfg, _ = config_from_kohya(path)  # a class by its full name keeps its case: Python's names have one
        assert cfg.optimizer.optimizer == ours
        cfg.validate()
    path.write_text(json.dumps({"network_args": ["conv_dim"]}))
    with pytest.raises(ConfigError, match="kohya.json: network_args: expected key=value items"):
        config_from_kohya(path)
    path.write_text(json.dumps({"resolution": "512x512"}))
    with pytest.raises(ConfigError, match="kohya.json: resolution = '512x512'"):
        config_from_kohya(path)
    path.write_text(json.dumps({"network_dim": "sixteen"}))
    with pytest.raises(ConfigError, match="kohya.json"):
        config_from_kohya(path)
    with pytest.raises(ConfigError, match="no such kohya config file"):
        config_from_kohya(tmp_path / "missing.toml")


def test_the_kohya_page_shows_the_table_lorakit_uses():
    from pathlib import Path

    from lorakit.commands.kohya_config import DOC_MARKERS, options_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "kohya.md").read_text(encoding="utf-8")
    begin, end = DOC_MARKERS
    assert page.split(begin, 1)[1].split(end, 1)[0].strip() == options_table().strip(), \
        "docs/kohya.md is out of date: python -m lorakit.commands.kohya_config --update-doc docs/kohya.md"
    assert "| `--unet_lr` | `--set optimizer.unet_lr=X` |" in page


def test_every_sd_scripts_option_is_translated_or_named_with_its_reason(tmp_path):
    """A kohya config holds whatever sd-scripts' parsers accept: each of its options (listed from sd-scripts'
    source in tests/kohya_sd_scripts_options.txt) is a lorakit flag of the same name or has a row in the table, so
    none is refused as unknown; and a config that sets those that change nothing trained still runs."""
    from pathlib import Path

    from lorakit.commands.train import FLAGS, KOHYA_OPTIONS

    listed = (Path(__file__).parent / "kohya_sd_scripts_options.txt").read_text().split("\n")
    options = [line for line in listed if line.startswith("--")]
    assert len(options) > 200
    unknown = [o for o in options if (dashed := o.replace("_", "-")) not in KOHYA_OPTIONS and dashed not in FLAGS]
    assert unknown == []
    path = tmp_path / "kohya.toml"
    path.write_text('network_module = "networks.lora"\ndim_from_weights = true\nnetwork_weights = "a.safetensors"\n'
                    'torch_compile = true\nuse_8bit_adam = true\nhuber_scale = 2.0\nlog_config = true\n')
    cfg, translation = config_from_kohya(path)
    assert translation.untranslated == [] and "log_config" in translation.skipped
    assert cfg.network.dim_from_weights and cfg.model.compile and cfg.optimizer.optimizer == "adamw8bit"
    assert cfg.training.huber_scale == 2.0


def test_a_kohya_textual_inversion_config_trains_an_embedding(tiny_model_dir, tmp_path):
    """train_textual_inversion.py's config: token_string makes it textual inversion, its learning rate the
    embedding's; use_object_template trains on templates instead of the captions, and still trains."""
    path = kohya_file(tmp_path, tiny_model_dir, "ti.toml", 'output_name = "zkz_ti"\ntoken_string = "zkz"\n'
                      'init_word = "shape"\nnum_vectors_per_token = 2\nlearning_rate = 5e-3\ntrain_batch_size = 2\n'
                      'max_train_epochs = 1\nuse_object_template = false\n')
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.kind, cfg.method.ti_token, cfg.method.ti_init_word, cfg.method.ti_vectors) == (
        "ti", "zkz", "shape", 2)
    assert cfg.optimizer.ti_lr == 5e-3 and translation.untranslated == []
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off"]) == 0
    written = sorted(p.name for p in (tmp_path / "run").glob("*.safetensors"))
    assert written == ["zkz_ti-zkz.safetensors"], written
    with safe_open(str(tmp_path / "run" / written[0]), "pt") as f:
        assert [f.get_tensor(k).shape[0] for k in f.keys()] == [2]  # two vectors for the one token
    path.write_text(path.read_text().replace("use_object_template = false", "use_object_template = true"))
    cfg, translation = config_from_kohya(path)
    assert cfg.data.caption_templates == "object" and translation.untranslated == []
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off", "--out",
                 str(tmp_path / "templates")]) == 0
    assert (tmp_path / "templates" / "zkz_ti-zkz.safetensors").is_file()


def test_a_kohya_dreambooth_config_fine_tunes_the_unet_and_the_text_encoder(tiny_model_dir, tmp_path, capsys):
    """train_db.py's config (no network_module, no token_string): native fine-tuning of both networks, at
    learning_rate and learning_rate_te, the text encoder for stop_text_encoder_training steps (-1 or 0: never)."""
    path = kohya_file(tmp_path, tiny_model_dir, "db.toml", 'output_name = "zkz_db"\nlearning_rate = 1e-4\n'
                      'learning_rate_te = 5e-5\ntrain_batch_size = 2\nmax_train_epochs = 1\nprior_loss_weight = 1.0\n')
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.kind, cfg.method.native_text_encoder, cfg.method.native_targets) == ("native", True, "all")
    assert translation.notes == []
    assert (cfg.optimizer.learning_rate, cfg.optimizer.text_encoder_lr) == (1e-4, 5e-5)
    assert translation.untranslated == []
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off"]) == 0
    with safe_open(str(tmp_path / "run" / "zkz_db.safetensors"), "pt") as f:
        assert any(k.startswith("cond_stage_model.") for k in f.keys())  # a whole model, the text encoder in it
    db = path.read_text()
    path.write_text(f"{db}save_model_as = 'diffusers'\n")  # the model as a diffusers folder, as kohya writes it
    cfg, translation = config_from_kohya(path)
    assert cfg.output.format == "diffusers" and translation.notes == []
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off", "--out",
                 str(tmp_path / "folder")]) == 0
    from lorakit.models import load_base_model

    trained = load_base_model(tmp_path / "folder" / "zkz_db")  # loads as any diffusers folder
    single = load_base_model(tmp_path / "run" / "zkz_db.safetensors")  # the same run written as one file
    for a, b in ((trained.unet, single.unet), (trained.text_encoder, single.text_encoder)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert "a diffusers folder; diffusers: DiffusionPipeline.from_pretrained(" in capsys.readouterr().out
    # the run owns the folder it wrote: --overwrite replaces the run, the folder with it
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off", "--out",
                 str(tmp_path / "folder"), "--overwrite"]) == 0
    assert (tmp_path / "folder" / "zkz_db" / "model_index.json").is_file()
    for stop, trains in ((-1, False), (0, False)):
        path.write_text(f"{db}stop_text_encoder_training = {stop}\n")
        cfg, translation = config_from_kohya(path)
        assert cfg.method.native_text_encoder is trains and translation.untranslated == []
    path.write_text(f"{db}stop_text_encoder_training = 300\n")
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.native_text_encoder, cfg.method.native_text_encoder_steps) == (True, 300)
    assert translation.untranslated == []
    path.write_text(f"{db}network_module = 'networks.lora'\nstop_text_encoder_training = 300\n")
    _, translation = config_from_kohya(path)  # train_network.py has no such option: said, not made native
    assert [line.split(":")[0] for line in translation.untranslated] == ["stop_text_encoder_training = 300"]


def test_a_kohya_fine_tuning_config_trains_on_its_metadata_captions(tiny_model_dir, tmp_path):
    """fine_tune.py's config (in_json, no network_module or token_string): native fine-tuning on the images its
    metadata JSON lists, with their captions; the text encoder only with train_text_encoder."""
    from lorakit.data import TrainingData

    data = write_dataset(tmp_path / "data", n=4)
    images = tmp_path / "images"
    images.mkdir()
    for png in sorted(data.rglob("*.png")):
        png.rename(images / png.name)
    (tmp_path / "meta.json").write_text(json.dumps({p.stem: {"caption": f"zkz shape number {i}"}
                                                    for i, p in enumerate(sorted(images.glob("*.png")))}))
    path = tmp_path / "ft.toml"
    path.write_text(f'pretrained_model_name_or_path = "{tiny_model_dir}"\ntrain_data_dir = "{images}"\n'
                    f'in_json = "{tmp_path / "meta.json"}"\noutput_dir = "{tmp_path / "run"}"\noutput_name = "ft"\n'
                    'learning_rate = 1e-5\ntrain_batch_size = 2\nmax_train_epochs = 1\n')
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.kind, cfg.method.native_text_encoder) == ("native", False) and translation.untranslated == []
    assert cfg.data.metadata_file == str(tmp_path / "meta.json")
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off"]) == 0
    assert (tmp_path / "run" / "ft.safetensors").is_file()
    trained = TrainingData(cfg.data, default_resolution=64)  # what the run read: the JSON's captions
    assert sorted(r.caption for r in trained.records) == [f"zkz shape number {i}" for i in range(4)]
    path.write_text(path.read_text() + "train_text_encoder = true\nlearning_rate_te = 5e-6\n")
    cfg, _ = config_from_kohya(path)
    assert cfg.method.native_text_encoder and cfg.optimizer.text_encoder_lr == 5e-6


def test_sdxl_scripts_cache_of_text_encoder_outputs_is_taken_over_with_a_frozen_text_encoder(tmp_path):
    """sdxl_train_network.py's --cache_text_encoder_outputs, which kohya allows only with network_train_unet_only:
    lorakit keeps the cache, and refuses it as kohya does, naming both keys, where the text encoder would train."""
    path = tmp_path / "sdxl.toml"
    base = 'network_module = "networks.lora"\ncache_text_encoder_outputs = true\n'
    path.write_text(base + "network_train_unet_only = true\n")
    cfg, translation = config_from_kohya(path)
    assert cfg.data.cache_text_encoder_outputs and not cfg.network.train_text_encoder
    assert not any("cache_text_encoder_outputs" in line for line in translation.untranslated)
    path.write_text(base)
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs needs network_train_unet_only = true"):
        config_from_kohya(path)


@pytest.mark.parametrize(("value", "lr", "noted"), [([2e-5, 1e-5], 2e-5, True), ([3e-5], 3e-5, False),
                                                    ([], None, False)])
def test_a_list_of_text_encoder_learning_rates_is_read_as_kohyas_sd_networks_read_it(tmp_path, value, lr, noted):
    """sd-scripts takes --text_encoder_lr as a list (nargs="*"); its SD1.x/SDXL networks use the first value for
    every text encoder, and lorakit does the same, saying so when the others differ."""
    path = tmp_path / "kohya.toml"
    path.write_text(f'network_module = "networks.lora"\ntext_encoder_lr = {json.dumps(value)}\n')
    cfg, translation = config_from_kohya(path)
    assert cfg.validate().optimizer.text_encoder_lr == lr
    assert any("for every text encoder" in note for note in translation.notes) is noted


def test_save_n_epoch_ratio_and_full_bf16_are_taken_over_as_kohya_runs_them(tmp_path, tiny_model_dir):
    """save_n_epoch_ratio: kohya saves every floor(epochs / ratio) epochs (at least 1), whatever
    save_every_n_epochs says; full_bf16 with an adapter: the model in bf16 and the adapter's small weights in fp32,
    said; with native fine-tuning it trains the model's weights in bf16 (full_fp16 stays refused)."""
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml",
                      'network_module = "networks.lora"\nnetwork_train_unet_only = true\nmax_train_epochs = 10\n'
                      'save_every_n_epochs = 1\nsave_n_epoch_ratio = 3\nmixed_precision = "bf16"\nfull_bf16 = true\n')
    cfg, translation = config_from_kohya(path)
    assert cfg.training.save_every_n_epochs == 3 and cfg.model.mixed_precision == "bf16"
    assert translation.untranslated == []
    assert any(n.startswith("full_bf16 = true: the model runs in bf16") for n in translation.notes), translation.notes
    path.write_text(path.read_text().replace("save_n_epoch_ratio = 3", "save_n_epoch_ratio = 20"))
    assert config_from_kohya(path)[0].training.save_every_n_epochs == 1  # floor(10 / 20) or 1
    path.write_text(path.read_text().replace("max_train_epochs = 10\n", ""))
    assert any(u.startswith("save_n_epoch_ratio = 20: it divides max_train_epochs, which this config does not set")
               for u in config_from_kohya(path)[1].untranslated)
    native = kohya_file(tmp_path / "db", tiny_model_dir, "db.toml", 'full_bf16 = true\nmixed_precision = "bf16"\n')
    assert config_from_kohya(native)[0].model.full_bf16  # native fine-tuning's weights in bf16, as kohya trains them
    native.write_text(native.read_text().replace("full_bf16", "full_fp16"))
    assert any(u.startswith("full_fp16 = True: not in lorakit for native fine-tuning")
               for u in config_from_kohya(native)[1].untranslated)


def test_sdxl_trains_fused_backward_pass_and_optimizer_groups_become_lorakits_fused_pass(tmp_path, tiny_model_dir):
    """sdxl_train.py's fused_backward_pass is lorakit's; its fused_optimizer_groups N (N optimizers, each stepped
    when its weights' gradients are in) too, said: lorakit steps each weight alone."""
    native = kohya_file(tmp_path, tiny_model_dir, "db.toml",
                        'optimizer_type = "Adafactor"\nfused_backward_pass = true\n')
    cfg, translation = config_from_kohya(native)
    assert cfg.optimizer.fused_backward_pass and cfg.optimizer.optimizer == "adafactor" and cfg.method.kind == "native"
    assert translation.untranslated == [] and not any("fused" in n for n in translation.notes)
    cfg.validate()
    native.write_text(native.read_text().replace("fused_backward_pass = true", "fused_optimizer_groups = 10"))
    cfg, translation = config_from_kohya(native)
    assert cfg.optimizer.fused_backward_pass and translation.untranslated == []
    assert any(n.startswith("fused_optimizer_groups = 10: lorakit's fused backward pass steps each weight alone")
               for n in translation.notes), translation.notes


def test_an_adapter_config_with_two_text_encoder_rates_says_both_native_options_it_cannot_take(tmp_path,
                                                                                                tiny_model_dir):
    """learning_rate_te1/te2 and stop_text_encoder_training are native scripts' options: an adapter config with
    different rates and a text-encoder stop is told about each (one rate for an adapter's encoders)."""
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml", 'network_module = "networks.lora"\n'
                      "learning_rate_te1 = 1e-5\nlearning_rate_te2 = 2e-5\nstop_text_encoder_training = 5\n")
    untranslated = config_from_kohya(path)[1].untranslated
    assert any(u.startswith("learning_rate_te2 = 2e-05: an adapter trains both SDXL text encoders at one rate")
               for u in untranslated), untranslated
    assert any(u.startswith("stop_text_encoder_training = 5: train_db.py's") for u in untranslated), untranslated
    path.write_text(path.read_text().replace("learning_rate_te1 = 1e-5\n", ""))  # te2 alone: the adapters' rate
    assert config_from_kohya(path)[0].optimizer.text_encoder_lr == 2e-5


@pytest.mark.parametrize(("options", "expected", "noted"), [
    ('network_module = "networks.lora"\ntext_encoder_lr = 0\nunet_lr = 1e-4\n',
     {"network.train_text_encoder": False, "network.train_unet": True}, "text_encoder_lr = 0: kohya leaves"),
    ('network_module = "networks.lora"\nunet_lr = 0\ntext_encoder_lr = 1e-5\n',
     {"network.train_text_encoder": True, "network.train_unet": False}, "unet_lr = 0: kohya leaves"),
    ("learning_rate_te = 0\n", {"method.native_text_encoder": False}, "learning_rate_te = 0: kohya does not change"),
    ("train_text_encoder = true\nin_json = 'm.json'\nlearning_rate_te1 = 0\nlearning_rate_te2 = 0\n",
     {"method.native_text_encoder": False}, "learning_rate_te1 = 0: kohya does not change the text encoders"),
], ids=["adapter-te", "adapter-unet", "dreambooth", "sdxl-both"])
def test_a_rate_of_0_leaves_that_part_untrained_as_kohya_does(tmp_path, tiny_model_dir, options, expected, noted):
    """kohya leaves what has a rate of 0 out of the optimizer (an adapter's modules stay zero; a native script's
    text encoder is not changed): lorakit does not train it, and says so (a 0 was read as "not given" and that part
    trained at the learning rate)."""
    cfg, translation = config_from_kohya(kohya_file(tmp_path, tiny_model_dir, "kohya.toml", options))
    for dotted, value in expected.items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value, dotted
    assert any(n.startswith(noted) for n in translation.notes), translation.notes
    assert translation.untranslated == []


def test_a_0_that_kohya_reads_as_a_value_is_taken_as_one(tmp_path, tiny_model_dir):
    """max_grad_norm = 0 (no clipping), network_alpha = 0 (alpha = rank) and prior_loss_weight = 0 are settings, not
    "not given" (lorakit's defaults would clip at 1, scale by 8/rank and weigh the prior at 1)."""
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml", 'network_module = "networks.lora"\nnetwork_dim = 16\n'
                      "network_alpha = 0\nmax_grad_norm = 0\nprior_loss_weight = 0\n")
    cfg, translation = config_from_kohya(path)
    cfg.validate()
    assert (cfg.network.rank, cfg.network.alpha, cfg.optimizer.max_grad_norm) == (16, 0.0, 0.0)
    assert cfg.training.prior_loss_weight == 0.0
    assert not set(translation.skipped) & {"network_alpha", "max_grad_norm", "prior_loss_weight"}


def test_a_config_without_epochs_trains_kohyas_steps(tmp_path, tiny_model_dir):
    """kohya trains max_train_steps (1600 unless given) when max_train_epochs is not given, however many epochs that
    takes; max_train_epochs, when given, overrides max_train_steps.  lorakit's own default (10 epochs) was used."""
    def translated(options: str):
        cfg, translation = config_from_kohya(kohya_file(tmp_path / str(len(options)), tiny_model_dir, "k.toml",
                                                        'network_module = "networks.lora"\n' + options))
        return cfg.training.max_epochs, cfg.training.max_steps, translation.notes

    epochs, steps, notes = translated("")
    assert (epochs, steps) == (1600, 1600)
    assert any(n.startswith("max_train_epochs is not given: kohya trains 1600 steps (max_train_steps, its default)")
               for n in notes), notes
    assert translated("max_train_steps = 300\n")[:2] == (300, 300)
    epochs, steps, notes = translated("max_train_steps = 300\nmax_train_epochs = 4\n")
    assert (epochs, steps) == (4, None)
    assert "max_train_steps = 300: max_train_epochs = 4 overrides it, as in kohya" in notes
    from lorakit.dry_run import dry_run  # the epochs said are those the steps take, not the bound

    cfg, _ = config_from_kohya(kohya_file(tmp_path / "dry", tiny_model_dir, "k.toml",
                                          'network_module = "networks.lora"\nmax_train_steps = 10\n'))
    assert "training: 4 steps per epoch × 3 epochs = 10 steps (training.max_steps 10)" in dry_run(cfg)


def test_sdxls_second_text_encoder_alone_is_taken_over(tmp_path, tiny_model_dir):
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml",
                      "train_text_encoder = true\nin_json = 'm.json'\nlearning_rate_te1 = 0\n"
                      "learning_rate_te2 = 1e-5\n")
    cfg, translation = config_from_kohya(path)
    assert translation.untranslated == []
    assert cfg.method.native_text_encoder and cfg.optimizer.text_encoder_lr == 0
    assert cfg.optimizer.text_encoder_2_lr == 1e-5 and cfg.trains_second_text_encoder_only()
    assert any(n.startswith("learning_rate_te1 = 0 with learning_rate_te2 = 1e-05: kohya trains SDXL's second")
               for n in translation.notes), translation.notes
    cfg.validate()


def test_base_weights_are_taken_over_one_file_or_several(tmp_path, tiny_model_dir):
    """kohya's --base_weights and --base_weights_multiplier (nargs="*": a config may give one value or a list)."""
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml", 'network_module = "networks.lora"\n'
                      'network_train_unet_only = true\nbase_weights = "style.safetensors"\n'
                      'base_weights_multiplier = 0.7\n')
    cfg, translation = config_from_kohya(path)
    assert (cfg.model.base_weights, cfg.model.base_weights_multiplier) == (["style.safetensors"], [0.7])
    assert translation.untranslated == []
    path.write_text(path.read_text().replace('base_weights = "style.safetensors"\nbase_weights_multiplier = 0.7\n',
                                             'base_weights = ["a.safetensors", "b.safetensors"]\n'
                                             'base_weights_multiplier = [1.0]\n'))
    cfg, _ = config_from_kohya(path)
    assert (cfg.model.base_weights, cfg.model.base_weights_multiplier) == (["a.safetensors", "b.safetensors"], [1.0])


def test_options_that_change_nothing_trained_are_taken_over(tmp_path, tiny_model_dir):
    """Memory modes, cache bookkeeping and a log prefix (found in users' configs: lowram = true) no longer stop a
    config from running; the text-encoder cache's disk copy turns the cache on, as kohya turns it on."""
    options = ('network_module = "networks.lora"\nlowram = true\nhighvram = true\ncache_info = true\n'
               'skip_cache_check = true\nlog_prefix = "run1"\ncache_text_encoder_outputs_to_disk = true\n')
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml", options + "network_train_unet_only = true\n")
    cfg, translation = config_from_kohya(path)
    assert translation.untranslated == [] and cfg.data.cache_text_encoder_outputs
    assert {"lowram", "highvram", "cache_info", "skip_cache_check", "log_prefix"} <= set(translation.skipped)
    path.write_text(path.read_text().replace("network_train_unet_only = true\n", ""))
    with pytest.raises(ConfigError, match="needs network_train_unet_only = true"):
        config_from_kohya(path)
