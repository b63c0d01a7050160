"""output.no_metadata (kohya's --no_metadata): the run's files keep only what loading and drawing them needs."""

from __future__ import annotations

from safetensors import safe_open
from test_kohya_config import kohya_file
from test_train import dataset  # noqa: F401

from lorakit.cli import main
from lorakit.commands.kohya_config import config_from_kohya
from lorakit.train import MINIMUM_METADATA

# what the adapter writer adds to every file: the network's own description and kohya's content hashes
WRITER_KEYS = {"lorakit_algorithm", "lorakit_preset", "lorakit_version", "sshs_model_hash", "sshs_legacy_hash"}


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_a_run_without_metadata_keeps_what_loading_and_drawing_need(tiny_model_dir, dataset, tmp_path, capsys):  # noqa: F811
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(dataset), "--epochs", "1", "--early-stop",
            "off", "--no-progress", "--set", "network.rank=2", "--set", "model.clip_skip=2",
            "--set", "output.comment=private note"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    assert main([*argv, "--out", str(tmp_path / "bare"), "--set", "output.no_metadata=true"]) == 0
    full, bare = (_metadata(tmp_path / run / "lorakit.safetensors") for run in ("full", "bare"))
    assert {"ss_dataset_dirs", "ss_tag_frequency", "ss_training_comment", "ss_sd_model_name"} <= set(full)
    assert set(bare) <= set(MINIMUM_METADATA) | WRITER_KEYS | {k for k in bare if k.startswith("modelspec.")}
    assert not any("private note" in v or str(dataset) in v for v in bare.values())
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_clip_skip",
                "modelspec.architecture"):
        assert bare[key] == full[key], key
    checkpoint = _metadata(tmp_path / "bare" / "checkpoints" / "epoch-0001" / "trained.safetensors")
    assert "ss_tag_frequency" not in checkpoint and checkpoint["lorakit_method"] == "adapter"
    capsys.readouterr()
    # drawn as trained: lorakit sample still reads its clip skip from the bare file
    assert main(["sample", str(tmp_path / "bare" / "lorakit.safetensors"), "--model", str(tiny_model_dir),
                 "--prompt", "zkz shape", "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    assert "clip skip 2" in capsys.readouterr().out


def test_kohya_no_metadata_is_taken_over(tmp_path, tiny_model_dir):
    path = kohya_file(tmp_path, tiny_model_dir, "kohya.toml", 'network_module = "networks.lora"\n'
                      'network_train_unet_only = true\nno_metadata = true\n')
    cfg, translation = config_from_kohya(path)
    assert cfg.output.no_metadata is True and translation.untranslated == []
