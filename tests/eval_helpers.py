"""Small evaluation fixtures on the built-in model: a run folder with two LoRA checkpoints, prompts, data."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorakit.config import TrainConfig, to_toml
from lorakit.evaluate.prompts import EvalPrompt
from lorakit.run_manifest import RunManifest

TRIGGER = "zkz shape"
PROMPTS = [
    EvalPrompt("a large red zkz shape in the center on a white background", "train", seed=1,
               expected={"shape": "star", "color": "red", "position": "center", "background": "white"}),
    EvalPrompt("a large blue zkz shape in the center on a white background", "alter", seed=2,
               expected={"shape": "star", "color": "blue", "position": "center", "background": "white"},
               changes=("color",)),
    EvalPrompt("a large green circle at the top on a black background", "agnostic", seed=3,
               expected={"shape": "circle", "color": "green", "position": "top", "background": "black"}),
]


@functools.cache
def base_model():
    """The built-in model, loaded once per test process (``applied`` always puts it back as it was)."""
    from lorakit.models import load_base_model

    torch.set_num_threads(1)
    return load_base_model(None)


def lora_tensors(scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA (attention layers, rank 2) for the built-in model with non-zero up weights: it changes images."""
    from lorakit.network import UniformRanks, create_network

    model = base_model()
    torch.manual_seed(seed)
    net = create_network(model.unet, None, preset="attn-only", ranks=UniformRanks(2, 2.0))
    try:
        with torch.no_grad():
            for adapter in net.adapters.values():
                for name, p in adapter.named_parameters():
                    if "lora_up" in name:
                        p.normal_(0, scale)
        return {k: v.detach().clone() for k, v in net.file_tensors().items()}
    finally:
        net.remove()


def write_run(folder: Path, epochs: int = 2, turning_epoch: int | None = 1, data: Path | None = None,
              step_checkpoints: tuple[int, ...] = ()) -> Path:
    """A run folder as the trainer leaves it (config.toml, checkpoints/epoch-NNNN, summary.json, log.jsonl: 4 steps
    an epoch), with step checkpoints (checkpoints/step-NNNNNNNN) at ``step_checkpoints``."""
    folder.mkdir(parents=True)
    cfg = TrainConfig()
    cfg.network.algorithm = "lora"
    cfg.network.preset = "attn-only"
    cfg.network.rank = 2
    cfg.optimizer.learning_rate = 1e-3
    cfg.data.train_data = str(data) if data else None
    (folder / "config.toml").write_text(to_toml(cfg))
    for e in range(1, epochs + 1):
        ckpt = folder / "checkpoints" / f"epoch-{e:04d}"
        ckpt.mkdir(parents=True)
        save_file(lora_tensors(0.3 * e, seed=e), str(ckpt / "trained.safetensors"), metadata={"ss_epoch": str(e)})
    for step in step_checkpoints:
        ckpt = folder / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        save_file(lora_tensors(0.3 * step / 4, seed=100 + step), str(ckpt / "trained.safetensors"),
                  metadata={"ss_epoch": str((step - 1) // 4 + 1), "ss_steps": str(step)})
    tp = {"step": 4, "epoch": turning_epoch} if turning_epoch else None
    (folder / "summary.json").write_text(json.dumps({
        "method": "adapter", "epochs_run": epochs, "steps": 4 * epochs, "final_epoch": epochs, "stopped_early": False,
        "turning_point": None, "turning_point_found": tp, "seconds": 1.0}))
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": s, "epoch": (s - 1) // 4 + 1, "loss": 0.5 / s,
                                                          "lr": 1e-3, "cs": 0.1 * s}) + "\n"
                                              for s in range(1, 4 * epochs + 1)))
    manifest = RunManifest(folder)  # what the trainer records of the files it wrote
    manifest.add_files(p for p in folder.rglob("*") if p.is_file())
    return folder
