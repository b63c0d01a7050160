"""``lorakit train --from-kohya GUI.json``: a config saved by the kohya_ss GUI (bmaltais/kohya_ss's LoRA tab), whose
fields the GUI turns into sd-scripts options when it starts a run, translated as the GUI would launch it."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from test_train import write_dataset

from lorakit.cli import main
from lorakit.commands.kohya_config import config_from_kohya
from lorakit.config import ConfigError, TrainConfig, warmup_steps


def gui_config(**fields) -> dict:
    """A GUI config as the GUI saves it: every field present, numbers it reads from text boxes as strings, fields
    that are off as "" / 0 / false."""
    return {
        "LoRA_type": "LyCORIS/LoKr", "LyCORIS_preset": "attn-mlp", "model_list": "custom",
        "pretrained_model_name_or_path": "/models/sd15.safetensors", "train_data_dir": "/data/zkz",
        "reg_data_dir": "", "output_dir": "/runs/zkz", "output_name": "2024", "logging_dir": "",
        "epoch": 12, "max_train_epochs": "", "max_train_steps": "", "max_resolution": "512,512",
        "train_batch_size": 2, "learning_rate": 0.0001, "unet_lr": 0.0001, "text_encoder_lr": 0,
        "lr_scheduler": "cosine", "lr_warmup": 10, "lr_scheduler_args": "", "optimizer": "AdamW8bit",
        "optimizer_args": '"weight_decay=0.1" "betas=0.9,0.99"', "network_dim": 16, "network_alpha": 8,
        "conv_dim": 4, "conv_alpha": 2, "factor": 8, "use_tucker": False, "use_cp": False, "unit": 1,
        "rank_dropout": 0, "module_dropout": 0, "network_dropout": 0, "block_dims": "", "down_lr_weight": "",
        "clip_skip": "2", "seed": "42", "max_token_length": "75", "keep_tokens": "1", "shuffle_caption": True,
        "noise_offset_type": "Multires", "noise_offset": 0.05, "multires_noise_iterations": 6,
        "multires_noise_discount": 0.3, "min_snr_gamma": 5, "mixed_precision": "bf16", "save_precision": "fp16",
        "xformers": "xformers", "num_cpu_threads_per_process": 2, "num_processes": 1, "sample_prompts": "",
        "sample_every_n_epochs": 0, "sample_sampler": "euler_a", "sdxl": False, "v2": False,
        "training_comment": "zkz, 12 epochs", "additional_parameters": "--max_token_length 150 --no_half_vae",
        "loraplus_lr_ratio": 0, "loraplus_unet_lr_ratio": 8, "loraplus_text_encoder_lr_ratio": 0,
        **fields,
    }


def test_a_gui_config_is_translated_as_the_gui_launches_it(tmp_path):
    path = tmp_path / "zkz.json"
    path.write_text(json.dumps(gui_config()))
    cfg, translation = config_from_kohya(path)
    net, opt, data, training = cfg.network, cfg.optimizer, cfg.data, cfg.training
    assert (net.algorithm, net.preset, net.rank, net.alpha, net.conv_rank, net.conv_alpha) == (
        "lokr", "attn-mlp", 16, 8, 4, 2)
    assert net.args == {"factor": 8}  # options that are off are not passed, as the GUI does not pass them
    assert (net.loraplus_lr_ratio, net.loraplus_unet_lr_ratio) == (None, 8)
    assert net.train_unet and not net.train_text_encoder  # the text encoder's learning rate is 0: U-Net only
    assert (opt.optimizer, opt.unet_lr, opt.lr_scheduler, opt.lr_warmup_steps) == ("adamw8bit", 1e-4, "cosine", 0.1)
    assert opt.args == {"weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert (training.max_epochs, training.seed, training.multires_noise_iterations) == (12, 42, 6)
    assert training.noise_offset == 0  # the GUI passes only the chosen kind of offset noise (Multires)
    assert (data.resolution, data.batch_size, data.keep_tokens) == (512, 2, 1)
    assert (cfg.model.clip_skip, cfg.model.max_token_length, cfg.model.no_half_vae) == (2, 150, True)  # extra options
    assert (cfg.output.name, cfg.output.comment) == ("2024", "zkz, 12 epochs")  # text that looks like a number
    assert translation.untranslated == []
    assert {"model_list", "num_cpu_threads_per_process", "xformers"} <= set(translation.skipped)


@pytest.mark.parametrize(("fields", "said"), [
    ({"LoRA_type": "Flux1"}, "network_module = 'networks.lora_flux': not a network lorakit trains"),
    ({"LoRA_type": "Something new"}, "LoRA_type = 'Something new': not a LoRA type of the kohya_ss GUI"),
    ({"LyCORIS_preset": "attn-and-mlp"}, "preset=attn-and-mlp: a LyCORIS preset lorakit lacks"),
    ({"sample_prompts": "zkz shape --n blurry"}, "sample_prompts: the GUI keeps the prompts in its config"),
    ({"num_processes": 2}, "num_processes = 2: launch with `accelerate launch --num_processes 2"),
    ({"lr_warmup": 100}, "lr_warmup = 100: warming up for the whole run"),
])
def test_what_lorakit_cannot_take_over_from_a_gui_config_is_listed(tmp_path, fields, said):
    path = tmp_path / "gui.json"
    path.write_text(json.dumps(gui_config(**fields)))
    _, translation = config_from_kohya(path)
    assert any(said in line for line in translation.untranslated), translation.untranslated


def test_the_gui_s_learning_rates_of_zero_choose_the_networks_and_its_types_their_modules(tmp_path):
    path = tmp_path / "gui.json"
    for (unet_lr, te_lr), (unet, te) in {(1e-4, 5e-5): (True, True), (0, 5e-5): (False, True),
                                         (0, 0): (True, True)}.items():
        path.write_text(json.dumps(gui_config(unet_lr=unet_lr, text_encoder_lr=te_lr)))
        cfg, _ = config_from_kohya(path)
        assert (cfg.network.train_unet, cfg.network.train_text_encoder) == (unet, te)
        default = TrainConfig().optimizer.learning_rate
        assert cfg.optimizer.learning_rate == (1e-4 if (unet_lr, te_lr) == (0, 0) else default)
    path.write_text(json.dumps(gui_config(LoRA_type="Kohya LoCon", noise_offset_type="Original")))
    cfg, _ = config_from_kohya(path)
    assert (cfg.network.algorithm, cfg.network.preset, cfg.network.conv_rank) == ("lora", "full", 4)
    assert (cfg.training.noise_offset, cfg.training.multires_noise_iterations) == (0.05, 0)
    path.write_text(json.dumps(gui_config(LoRA_type="LoRA-FA")))
    cfg, _ = config_from_kohya(path)
    assert (cfg.network.algorithm, cfg.network.preset, cfg.network.args) == ("lora", "kohya", {"frozen_down": True})
    path.write_text(json.dumps(gui_config(LoRA_type="Standard")))
    cfg, _ = config_from_kohya(path)
    assert (cfg.network.algorithm, cfg.network.preset, cfg.network.conv_rank) == ("lora", "kohya", None)
    path.write_text(json.dumps(gui_config(LoRA_type="LyCORIS/LoHa", LyCORIS_preset="full", use_tucker=True)))
    cfg, _ = config_from_kohya(path)
    assert (cfg.network.algorithm, cfg.network.preset, cfg.network.args) == ("loha", "lycoris-full",
                                                                              {"use_tucker": True})
    # the GUI's (IA)^3 with LyCORIS's ia3 preset, and LoKr with "Use Scalar" ticked
    path.write_text(json.dumps(gui_config(LoRA_type="LyCORIS/iA3", LyCORIS_preset="ia3")))
    cfg, translation = config_from_kohya(path)
    assert (cfg.network.algorithm, cfg.network.preset, translation.untranslated) == ("ia3", "ia3", [])
    path.write_text(json.dumps(gui_config(LoRA_type="LyCORIS/LoKr", use_scalar=True)))
    cfg, translation = config_from_kohya(path)
    assert (cfg.network.algorithm, cfg.network.args.get("use_scalar"), translation.untranslated) == ("lokr", True, [])
    path.write_text(json.dumps(gui_config(additional_parameters="--network_dim sixteen")))
    with pytest.raises(ConfigError, match="gui.json"):  # a value missing: the type check names the file
        config_from_kohya(path)
    path.write_text(json.dumps(gui_config(additional_parameters="150 --no_half_vae")))
    with pytest.raises(ConfigError, match="gui.json: additional_parameters = .*'150' follows no --option"):
        config_from_kohya(path)


def test_a_warmup_share_is_a_share_of_the_run_s_steps(tmp_path):
    assert (warmup_steps(0.1, 250), warmup_steps(25, 250), warmup_steps(25.0, 250)) == (25, 25, 25)
    for bad in (1.5, -1, True):
        cfg = TrainConfig()
        cfg.optimizer.lr_warmup_steps = bad
        with pytest.raises(ConfigError, match="optimizer.lr_warmup_steps must be a whole number of steps, or a share"):
            cfg.validate()


def test_a_gui_config_trains(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n=4)
    path = tmp_path / "gui.json"
    path.write_text(json.dumps(gui_config(
        pretrained_model_name_or_path=str(tiny_model_dir), train_data_dir=str(data), output_dir=str(tmp_path / "run"),
        output_name="zkz", epoch=1, max_resolution="64,64", network_dim=4, network_alpha=2, conv_dim=0, conv_alpha=0,
        factor=2, mixed_precision="no", save_precision="float", optimizer="AdamW", additional_parameters="",
        loraplus_unet_lr_ratio=0)))  # LoKr has no up matrix for LoRA+
    assert main(["train", "--from-kohya", str(path), "--no-progress", "--early-stop", "off"]) == 0
    with safe_open(str(tmp_path / "run" / "zkz.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.endswith("lokr_w1") for k in keys) and not any(k.startswith("lora_te_") for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "lokr"


def test_a_textual_inversion_tab_config_is_textual_inversion(tmp_path):
    ti = {key: value for key, value in gui_config().items()
          if key not in ("LoRA_type", "LyCORIS_preset", "unet_lr", "text_encoder_lr", "network_dim", "network_alpha",
                         "conv_dim", "conv_alpha", "factor", "use_tucker", "use_cp", "unit", "rank_dropout",
                         "module_dropout", "network_dropout", "block_dims", "down_lr_weight", "loraplus_lr_ratio",
                         "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")}
    ti.update(token_string="zkz", init_word="shape", num_vectors_per_token=2, template="caption", weights="",
              learning_rate="0.005")
    path = tmp_path / "ti.json"
    path.write_text(json.dumps(ti))
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.kind, cfg.method.ti_token, cfg.method.ti_vectors, cfg.optimizer.ti_lr) == ("ti", "zkz", 2, 5e-3)
    assert (cfg.training.max_epochs, cfg.data.resolution) == (12, 512) and translation.untranslated == []
    for template, kind in (("object template", "object"), ("style template", "style")):  # kohya's templates
        path.write_text(json.dumps({**ti, "template": template, "weights": "/embeddings/zkz-start.safetensors"}))
        cfg, translation = config_from_kohya(path)
        assert (cfg.data.caption_templates, translation.untranslated) == (kind, [])
        assert cfg.method.ti_weights == "/embeddings/zkz-start.safetensors"  # the tab's "Resume TI training"


def dreambooth_tab(**fields) -> dict:
    """A DreamBooth tab config: the LoRA tab's without the network fields, with the DreamBooth tab's own."""
    db = {key: value for key, value in gui_config().items()
          if key not in ("LoRA_type", "LyCORIS_preset", "unet_lr", "text_encoder_lr", "network_dim", "network_alpha",
                         "conv_dim", "conv_alpha", "factor", "use_tucker", "use_cp", "unit", "rank_dropout",
                         "module_dropout", "network_dropout", "block_dims", "down_lr_weight", "loraplus_lr_ratio",
                         "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")}
    return {**db, "learning_rate": "1e-6", "learning_rate_te": "5e-7", "learning_rate_te1": "",
            "learning_rate_te2": "", "stop_text_encoder_training": 0, "no_token_padding": False,
            "prior_loss_weight": 1.0, **fields}


def test_a_dreambooth_tab_config_is_native_fine_tuning_of_both_networks(tmp_path):
    """The DreamBooth tab launches train_db.py: native fine-tuning, the text encoder too at learning_rate_te; its
    "Stop TE" field of 0 means no stop, -1 no text-encoder training, any other value a stop after that many steps
    (the GUI labels it a percentage but hands it to sd-scripts as a step).  The LoRA tab's own stop field is
    ignored, as the GUI ignores it."""
    path = tmp_path / "db.json"
    path.write_text(json.dumps(dreambooth_tab()))
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.kind, cfg.method.native_text_encoder) == ("native", True)
    assert (cfg.optimizer.learning_rate, cfg.optimizer.text_encoder_lr, cfg.training.max_epochs) == (1e-6, 5e-7, 12)
    assert translation.untranslated == []
    path.write_text(json.dumps(dreambooth_tab(stop_text_encoder_training=-1)))
    cfg, translation = config_from_kohya(path)
    assert not cfg.method.native_text_encoder and translation.untranslated == []
    path.write_text(json.dumps(dreambooth_tab(stop_text_encoder_training=30)))
    cfg, translation = config_from_kohya(path)
    assert cfg.method.native_text_encoder_steps == 30 and translation.untranslated == []

    path.write_text(json.dumps(gui_config(stop_text_encoder_training=30)))
    cfg, translation = config_from_kohya(path)
    assert cfg.method.kind == "adapter" and translation.untranslated == []


def test_a_fine_tuning_tab_config_trains_the_image_folder_with_its_captions(tmp_path):
    """The fine-tuning tab launches fine_tune.py on image_folder: with "create caption" the captions are its caption
    files (the GUI merges them into train_dir's metadata first), else the metadata JSON in train_dir (the latents'
    one with use_latent_files); the text encoder only when ticked; dataset_repeats the repeats."""
    tab = {key: value for key, value in dreambooth_tab().items()
           if key not in ("train_data_dir", "reg_data_dir", "stop_text_encoder_training", "no_token_padding",
                          "prior_loss_weight")}
    tab.update(image_folder="/data/zkz", train_dir="/runs/ft", caption_metadata_filename="meta_cap.json",
               latent_metadata_filename="meta_lat.json", full_path=True, create_caption=True, create_buckets=True,
               use_latent_files="Yes", dataset_repeats="40", train_text_encoder=False, caption_extension="",
               batch_size="1")
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(tab))
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.kind, cfg.method.native_text_encoder, cfg.data.train_data, cfg.data.caption_extension,
            cfg.data.metadata_file, cfg.data.repeats) == ("native", False, "/data/zkz", ".caption", None, 40)
    assert translation.untranslated == []
    path.write_text(json.dumps({**tab, "create_caption": False, "train_text_encoder": True}))
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.native_text_encoder, cfg.data.metadata_file) == (True, "/runs/ft/meta_lat.json")
    path.write_text(json.dumps({**tab, "create_caption": False, "use_latent_files": "No"}))
    assert config_from_kohya(path)[0].data.metadata_file == "/runs/ft/meta_cap.json"


@pytest.mark.parametrize(("sdxl", "ticked"), [(True, True), (True, False), (False, True)])
def test_the_sdxl_boxes_keep_only_their_vae_and_cache_settings(tmp_path, sdxl, ticked):
    # lorakit tells SDXL by the model; the GUI passes --no_half_vae and --cache_text_encoder_outputs for an SDXL
    # run with their boxes ticked
    path = tmp_path / "gui.json"
    path.write_text(json.dumps(gui_config(sdxl=sdxl, sdxl_no_half_vae=ticked, sdxl_cache_text_encoder_outputs=ticked,
                                          additional_parameters="")))
    cfg, translation = config_from_kohya(path)
    assert cfg.model.no_half_vae is (sdxl and ticked)
    assert cfg.data.cache_text_encoder_outputs is (sdxl and ticked)
    assert not any("sdxl" in line for line in translation.untranslated), translation.untranslated


#: the fields a recent GUI saves for its SD3 and FLUX.1 boxes (bmaltais/kohya_ss test/config/SDXL-Standard-AdamW.json)
SD3_AND_FLUX_DEFAULTS = {
    "flux1_checkbox": False, "sd3_checkbox": False, "ae": "", "clip_g": "", "clip_l": "", "t5xxl": "",
    "apply_t5_attn_mask": False, "blocks_to_swap": 0, "cpu_offload_checkpointing": False, "discrete_flow_shift": 3,
    "double_blocks_to_swap": 0, "single_blocks_to_swap": 0, "guidance_scale": 3.5, "logit_mean": 0, "logit_std": 1,
    "mode_scale": 1.29, "model_prediction_type": "sigma_scaled", "timestep_sampling": "sigma", "split_mode": False,
    "t5xxl_dtype": "bf16", "t5xxl_device": "", "t5xxl_max_token_length": 512, "sd3_text_encoder_batch_size": 1,
    "weighting_scheme": "logit_normal", "train_blocks": "all", "mem_eff_save": False, "save_clip": False,
    "save_t5xxl": False, "flux1_cache_text_encoder_outputs": False, "sd3_cache_text_encoder_outputs": False,
}


def test_an_sdxl_dreambooth_config_of_a_recent_gui_is_taken_over_whole(tmp_path):
    """A recent GUI saves its SD3 and FLUX.1 fields in every config and passes them to sd-scripts only with their
    box ticked; its SDXL DreamBooth tab passes one learning rate per text encoder (learning_rate_te1/te2), not
    learning_rate_te, and lorakit trains each at its own.  Ticked, the SD3/FLUX.1 boxes are refused by name."""
    path = tmp_path / "sdxl_db.json"
    path.write_text(json.dumps(dreambooth_tab(sdxl=True, sdxl_no_half_vae=True, learning_rate_te="5e-7",
                                              learning_rate_te1="1e-5", learning_rate_te2="1e-5",
                                              huber_scale=1, **SD3_AND_FLUX_DEFAULTS)))
    cfg, translation = config_from_kohya(path)
    assert translation.untranslated == [], translation.untranslated
    assert (cfg.method.kind, cfg.optimizer.text_encoder_lr, cfg.model.no_half_vae) == ("native", 1e-5, True)
    path.write_text(json.dumps(dreambooth_tab(sdxl=True, learning_rate_te1="1e-5", learning_rate_te2="2e-5")))
    cfg, translation = config_from_kohya(path)  # each encoder at its own rate, as sdxl_train.py trains them
    assert (cfg.optimizer.text_encoder_lr, cfg.optimizer.text_encoder_2_lr) == (1e-5, 2e-5)
    assert translation.untranslated == []
    path.write_text(json.dumps(dreambooth_tab(learning_rate_te1="1e-5", learning_rate_te2="2e-5")))  # SD1.x: unused
    assert config_from_kohya(path)[0].optimizer.text_encoder_lr == 5e-7
    for box, family in (("flux1_checkbox", "FLUX.1"), ("sd3_checkbox", "SD3")):
        path.write_text(json.dumps(gui_config(**{**SD3_AND_FLUX_DEFAULTS, box: True})))
        with pytest.raises(ConfigError, match=f"a {family} config"):
            config_from_kohya(path)


def test_an_sdxl_textual_inversion_config_keeps_what_kohyas_sdxl_script_uses(tmp_path):
    """bmaltais/kohya_ss test/config/TI-AdamW8bit-SDXL.json's quirks: a clip skip of 2, which kohya's SDXL scripts
    ignore (lorakit would refuse it on SDXL), is left out and said; text boxes the GUI saved as "False"
    (huggingface_repo_id, metadata_author) are empty, not an upload to a repository named False."""
    path = tmp_path / "ti_sdxl.json"
    tab = {key: value for key, value in gui_config().items() if key not in ("LoRA_type", "LyCORIS_preset")}
    path.write_text(json.dumps({**tab, "token_string": "zxc", "init_word": "*", "num_vectors_per_token": 8,
                                "template": "style template", "sdxl": True, "clip_skip": 2,
                                "huggingface_repo_id": "False", "resume_from_huggingface": "False",
                                "metadata_author": "False"}))
    cfg, translation = config_from_kohya(path)
    assert (cfg.method.kind, cfg.method.ti_vectors, cfg.model.clip_skip) == ("ti", 8, 1)
    assert cfg.output.metadata_author is None
    assert not any("huggingface" in line for line in translation.untranslated), translation.untranslated
    assert translation.notes == ["clip_skip = 2: left out, as kohya's SDXL scripts ignore it"]
    path.write_text(json.dumps({**tab, "token_string": "zxc", "clip_skip": 2}))  # SD1.x: kept
    assert config_from_kohya(path)[0].model.clip_skip == 2


def test_a_warm_up_with_the_constant_schedule_is_left_out_as_the_gui_leaves_it_out(tmp_path):
    """The GUI drops the warm-up with the constant schedule ("Can't use LR warmup with LR Scheduler constant...
    ignoring"); lorakit refuses that pair from a lorakit or sd-scripts config, so from a GUI config it is left out
    and said."""
    path = tmp_path / "constant.json"
    path.write_text(json.dumps(gui_config(lr_scheduler="constant", lr_warmup=10)))
    cfg, translation = config_from_kohya(path)
    assert (cfg.optimizer.lr_scheduler, cfg.optimizer.lr_warmup_steps) == ("constant", 0)
    assert translation.notes == ["lr_warmup = 10: left out, as the GUI leaves a warm-up out with the constant "
                                 "schedule (constant_with_warmup warms up)"]
    cfg.validate()
    path.write_text(json.dumps(gui_config(lr_scheduler="constant_with_warmup", lr_warmup=10)))
    assert config_from_kohya(path)[0].optimizer.lr_warmup_steps == 0.1
