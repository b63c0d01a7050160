"""Pretrain the tiny base model of the shapes world from scratch: first the VAE, then U-Net + text encoder.

Run it as ``lorakit world pretrain --out DIR`` (or ``python -m lorakit.world.pretrain``).  Each stage is
step-budgeted (``--vae-steps``, ``--unet-steps``), writes an atomic checkpoint every few minutes and
resumes from it when run again with the same ``--out``; every step draws its randomness from (seed, step), so
an interrupted and resumed run gives the same weights as one that never stopped.  The result is a diffusers folder
(``StableDiffusionPipeline.from_pretrained(DIR / "model")`` works offline) holding the EMA weights.
The exact command and seed that made the shipped model are in ``lorakit/world/base_model/MADE_BY.txt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from lorakit.atomic import atomic_write
from lorakit.commands.arg_types import finite_float, non_negative_float, non_negative_int, positive_int, share
from lorakit.loss import min_snr_weight
from lorakit.models import ModelLoadError, check_replaceable_model_folder, load_base_model
from lorakit.world.captions import named_background, named_position, random_caption
from lorakit.world.model import build_components, write_clip_vocab_files
from lorakit.world.render import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    PRETRAINING_SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    render_array,
)
from lorakit.world.splits import all_objects
from lorakit.world.vae_data import random_vae_image


# ---------------------------------------------------------------------------------------------- helpers
def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float tensor (B, 3, H, W) in [-1, 1], as SD's VAE expects."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def atomic_torch_save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_world_image(rng: np.random.Generator, shapes: tuple[str, ...] = PRETRAINING_SHAPES) -> np.ndarray:
    obj = ObjectSpec(str(rng.choice(shapes)), str(rng.choice(list(COLORS))), str(rng.choice(list(SIZES))),
                     str(rng.choice(list(POSITIONS))))
    scene = Scene((obj,), str(rng.choice(BACKGROUNDS)), seed=int(rng.integers(0, 2**31)))
    return render_array(scene)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Image gradients: an edge term in the VAE loss keeps shapes' corners sharp."""
    kx = torch.tensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=x.dtype, device=x.device) / 4
    k = torch.stack([kx, kx.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, k, padding=1, groups=x.shape[1])


# ------------------------------------------------------------------------------------------------ VAE
def train_vae(vae, out: Path, total_steps: int, batch: int, lr: float, seed: int, log) -> None:
    ckpt_path = out / "vae_checkpoint.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    state = load_checkpoint(ckpt_path)
    step = 0
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    vae.train()
    bar = tqdm(desc="vae", total=total_steps, initial=step, unit="step")
    last_save = time.time()
    while step < total_steps:
        # every step draws from its own seed, so a resumed run is identical to an uninterrupted one
        rng = np.random.default_rng([seed, step])
        torch.manual_seed(seed * 1_000_003 + step)
        images = [random_world_image(rng) if i % 2 == 0 else random_vae_image(rng) for i in range(batch)]
        x = to_tensor(images)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total_steps, lr, 200)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        rec_loss = (rec - x).abs().mean() + 0.5 * (sobel(rec) - sobel(x)).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.3f}")
        if step % 50 == 0:
            log({"stage": "vae", "step": step, "rec": rec_loss.item(), "kl": kl.item()})
        if time.time() - last_save > 300 or step == total_steps:
            atomic_torch_save({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step}, ckpt_path)
            last_save = time.time()
    bar.close()


@torch.no_grad()
def encode_dataset(vae, count: int, seed: int, batch: int = 128) -> dict:
    """Render ``count`` pretraining scenes (held-out triples and the concept's shape excluded) and keep the
    VAE posterior (mean, std) of each, with its scene attributes for captioning."""
    vae.eval()
    rng = np.random.default_rng(seed)
    objects = all_objects(held_out=False)
    obj_idx = rng.integers(0, len(objects), size=count)
    bg_idx = rng.integers(0, len(BACKGROUNDS), size=count)
    means, stds = [], []
    for s in tqdm(range(0, count, batch), desc="encode"):
        scenes = [Scene((objects[obj_idx[i]],), BACKGROUNDS[bg_idx[i]], seed=seed * 1_000_003 + i)
                  for i in range(s, min(count, s + batch))]
        posterior = vae.encode(to_tensor([render_array(sc) for sc in scenes])).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
    return {"mean": torch.cat(means), "std": torch.cat(stds), "object": torch.from_numpy(obj_idx),
            "background": torch.from_numpy(bg_idx)}


# --------------------------------------------------------------------------------- U-Net + text encoder
@dataclass(frozen=True)
class DiffusionRecipe:
    """How U-Net + text encoder train (the scheduler in the components says epsilon or v-prediction).

    ``init_ema``: start from these weights (an EMA snapshot) instead of the random initialisation.
    ``high_noise_fraction``: that share of each batch draws its timestep from the noisiest tenth of the
    schedule, where the layout of the image is decided (a plain uniform draw gives it 10%).
    ``position_loss_weight``: weight of an auxiliary loss on the text encoder (a linear probe on its mean
    output token must tell which of the 9 positions the caption names, or that it names none).  Without it the
    text encoder carries "top left" vs "bottom right" so faintly that the U-Net does not learn to place objects.
    Measured on continuations of the step-8000 model (100 held-out prompts, docs/position_fix.md): as a
    v-prediction model, position 13% after 868 steps without the probe, 100% after 821 with weight 1; kept an
    epsilon model, 100% after 888 steps with weight 1 (the shipped model's stage 2).  The probe is thrown away
    after training; the text encoder stays a plain CLIP text encoder.
    ``background_loss_weight``: the same kind of probe for the background the caption names (or none).  The
    position probe alone made the text encoder's summary carry position and, measured on an epsilon
    continuation of the step-8000 model (docs/position_fix.md), the model then lost the background words
    (96% -> 19-31%); this probe asks the same summary to carry both.
    ``v_snr_cap``: v-prediction only; weigh the clean image by min(SNR, cap) + 1 (``capped_v_weights``)
    instead of the plain v loss's SNR + 1.
    """

    lr: float = 3e-4
    warmup_steps: int = 500
    init_ema: list[torch.Tensor] | None = None
    high_noise_fraction: float = 0.0
    position_loss_weight: float = 0.0
    background_loss_weight: float = 0.0
    v_snr_cap: float = 0.0


def capped_v_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-sample weights for the v loss that weigh the clean image by min(SNR, cap) + 1 instead of SNR + 1.

    The plain v loss weighs the clean image by SNR + 1, which at the least noisy steps is in the hundreds: those
    steps (fine texture) then dominate the gradient, and with gradient clipping they slow down what is decided
    at mid noise (which shape it is).  Min-SNR's own v form, min(SNR, cap) / (SNR + 1), would weigh the last
    step (SNR 0, where the layout comes from the text) by zero; the + 1 keeps it at 1.
    """
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return (torch.clamp(snr, max=cap) + 1) / (snr + 1)


def caption_position_labels(captions: list[str]) -> torch.Tensor:
    """Index in POSITIONS of the position each caption names, or len(POSITIONS) when it names none."""
    names = list(POSITIONS)
    return torch.tensor([names.index(p) if (p := named_position(c)) is not None else len(names) for c in captions])


def caption_background_labels(captions: list[str]) -> torch.Tensor:
    """Index in BACKGROUNDS of the background each caption names, or len(BACKGROUNDS) when it names none."""
    return torch.tensor([BACKGROUNDS.index(b) if (b := named_background(c)) is not None else len(BACKGROUNDS)
                         for c in captions])


def train_diffusion(c: dict, latents: dict, scaling: float, out: Path, total_steps: int, batch: int,
                    recipe: DiffusionRecipe, seed: int, log) -> None:
    """Train U-Net + text encoder on the encoded scenes (see DiffusionRecipe); checkpoints resume exactly."""
    unet, text_encoder, tokenizer, scheduler = c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # the text encoder's auxiliary probes: name -> (classes, the caption's label, loss weight); see DiffusionRecipe
    probe_specs = {"position": (len(POSITIONS) + 1, caption_position_labels, recipe.position_loss_weight),
                   "background": (len(BACKGROUNDS) + 1, caption_background_labels, recipe.background_loss_weight)}
    probes = {name: torch.nn.Linear(text_encoder.config.hidden_size, classes)
              for name, (classes, _, _) in probe_specs.items()}
    trained = params + [p for name, (_, _, weight) in probe_specs.items() if weight for p in probes[name].parameters()]
    opt = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=1e-2)
    if recipe.init_ema is not None:
        with torch.no_grad():
            for p, e in zip(params, recipe.init_ema, strict=True):
                p.copy_(e)
    ema = [p.detach().clone() for p in params]
    ckpt_path = out / "unet_checkpoint.pt"
    state = load_checkpoint(ckpt_path)
    step = 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        for name, probe in probes.items():
            if f"{name}_probe" in state:
                probe.load_state_dict(state[f"{name}_probe"])
        ema = [t.clone() for t in state["ema"]]
        step = state["step"]
    objects = all_objects(held_out=False)
    alphas_cumprod = scheduler.alphas_cumprod
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    num_t = scheduler.config.num_train_timesteps
    n = latents["mean"].shape[0]
    unet.train()
    text_encoder.train()

    def save() -> None:
        atomic_torch_save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                           "optimizer": opt.state_dict(), "ema": ema, "step": step,
                           **{f"{name}_probe": probe.state_dict() for name, probe in probes.items()}}, ckpt_path)

    bar = tqdm(desc="unet+te", total=total_steps, initial=step, unit="step")
    last_save = time.time()
    while step < total_steps:
        # per-step seeds: resuming gives exactly the run that was never interrupted
        rng = np.random.default_rng([seed, step])
        torch.manual_seed(seed * 1_000_003 + step)
        idx = torch.from_numpy(rng.integers(0, n, size=batch))
        z = (latents["mean"][idx].float() + latents["std"][idx].float() * torch.randn(batch, 4, 16, 16)) * scaling
        captions = []
        for i in idx.tolist():
            scene = Scene((objects[int(latents["object"][i])],), BACKGROUNDS[int(latents["background"][i])])
            # 10% empty captions: the unconditional branch that classifier-free guidance needs
            captions.append("" if rng.random() < 0.1 else random_caption(scene, rng))
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(z)
        t = torch.randint(0, num_t, (batch,))
        n_high = int(round(batch * recipe.high_noise_fraction))
        if n_high:
            t[:n_high] = torch.randint(num_t - num_t // 10, num_t, (n_high,))
        noisy = scheduler.add_noise(z, noise, t)
        for g in opt.param_groups:
            # warmup, then constant: EMA does the averaging
            g["lr"] = recipe.lr * min(1.0, (step + 1) / max(1, recipe.warmup_steps))
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        # each probe reads the mean output token; taken once per probe on purpose: one shared mean changes the
        # gradients' summation order, and so the last bits of the run that made the shipped model (MADE_BY.txt)
        probe_losses = {name: F.cross_entropy(probes[name](cond.mean(dim=1)), labels(captions)) if weight
                        else torch.zeros(()) for name, (_, labels, weight) in probe_specs.items()}
        if v_prediction:
            # v loss: its weight on the clean image is SNR + 1 (or min(SNR, cap) + 1), never below 1.  Min-SNR
            # would weigh the last step (SNR 0), the one that must learn the layout from the text, by zero.
            per_sample = F.mse_loss(pred, scheduler.get_velocity(z, noise, t), reduction="none").mean(dim=(1, 2, 3))
            if recipe.v_snr_cap:
                per_sample = per_sample * capped_v_weights(t, alphas_cumprod, recipe.v_snr_cap)
            loss = per_sample.mean()
        else:
            per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weight(scheduler, t, 5.0, "epsilon")).mean()  # Min-SNR-5
        for name, (_, _, weight) in probe_specs.items():
            loss = loss + weight * probe_losses[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - decay)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            log({"stage": "unet", "step": step, "loss": loss.item(),
                 **{f"{name}_probe": value.item() for name, value in probe_losses.items()},
                 "lr": opt.param_groups[0]["lr"]})
        if time.time() - last_save > 600 or step == total_steps:
            save()
            last_save = time.time()
        if step % 2000 == 0:  # keep a few snapshots to compare quality along the way
            torch.save({"ema": ema, "step": step}, out / f"ema_{step:06d}.pt")
    bar.close()
    with torch.no_grad():  # the shipped weights are the EMA ones
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)


def export_pipeline(c: dict, folder: Path) -> None:
    """Write the diffusers folder (safetensors weights, configs, tokenizer incl. vocab.json/merges.txt)."""
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    check_replaceable_model_folder(folder)  # an earlier export is replaced; a folder of other files never is
    tmp = folder.with_name(folder.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_clip_vocab_files(c["tokenizer"], tmp / "tokenizer")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def export_snapshot(out: Path, snapshot: Path, folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> None:
    """Write a diffusers folder from a work folder's VAE checkpoint and an EMA snapshot (``ema_NNNNNN.pt`` or
    ``unet_checkpoint.pt``): to look at a model while pretraining goes on."""
    c = build_components(seed, prediction_type)
    c["vae"].load_state_dict(load_checkpoint(out / "vae_checkpoint.pt")["model"])
    scaling = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
               if '"vae_done"' in line][-1]["scaling_factor"]
    c["vae"].register_to_config(scaling_factor=scaling)
    ema = load_checkpoint(snapshot)["ema"]
    params = list(c["unet"].parameters()) + list(c["text_encoder"].parameters())
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    export_pipeline(c, folder)


def _reuse_model_folder(folder: Path, out: Path, c: dict, vae_steps: int) -> list[torch.Tensor]:
    """Start a continuation run in ``out`` from a finished diffusers folder (the shipped model, or a run's
    ``model/``): its weights are loaded into the run's components ``c``, its VAE becomes the run's finished VAE
    stage (the latents are encoded again from it, which gives the same data as the run that made it when
    --images and --seed are the same) and its U-Net + text encoder weights are returned as the EMA to start
    from."""
    missing = [name for name in ("unet", "text_encoder", "vae") if not (folder / name).is_dir()]
    if missing:
        raise SystemExit(f"--init-from {folder}: not a diffusers model folder (no {', '.join(missing)}/ in it)")
    try:
        model = load_base_model(folder)
        for name in ("unet", "text_encoder", "vae"):  # strict: another architecture fails here
            c[name].load_state_dict(getattr(model, name).state_dict())
    except (ModelLoadError, OSError, RuntimeError) as err:  # wrong architecture or a broken file
        raise SystemExit(f"--init-from {folder}: cannot load it as the shapes-world model: {err}") from err
    if not (out / "vae_checkpoint.pt").exists():
        # a finished VAE stage: train_vae sees step == vae_steps and skips training
        opt = torch.optim.AdamW(c["vae"].parameters())
        atomic_torch_save({"model": c["vae"].state_dict(), "optimizer": opt.state_dict(), "step": vae_steps},
                          out / "vae_checkpoint.pt")
    params = list(c["unet"].parameters()) + list(c["text_encoder"].parameters())
    return [p.detach().clone() for p in params]


def _reuse_earlier_run(snapshot: Path, out: Path) -> list[torch.Tensor]:
    """Start a continuation run in ``out`` from an earlier run's EMA snapshot: copy that run's VAE checkpoint
    and encoded latents (so the VAE stage is skipped and the data are the same) and return the snapshot."""
    if not snapshot.is_file():
        raise SystemExit(f"--init-from {snapshot}: no such snapshot file")
    for name in ("vae_checkpoint.pt", "latents.pt"):
        source = snapshot.parent / name
        if not (out / name).exists():
            if not source.is_file():
                raise SystemExit(f"--init-from {snapshot}: the run's {name} is missing next to it")
            atomic_write(out / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
    return load_checkpoint(snapshot)["ema"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, required=True, help="work folder (checkpoints, logs, final model/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rendered images and the weights")
    ap.add_argument("--vae-steps", type=positive_int, default=3000, help="VAE training steps")
    ap.add_argument("--vae-batch", type=positive_int, default=32, help="VAE batch size")
    ap.add_argument("--vae-lr", type=finite_float, default=1e-3, help="VAE learning rate")
    ap.add_argument("--images", type=positive_int, default=40000, help="pretraining images to render and encode")
    ap.add_argument("--unet-steps", type=positive_int, default=10000, help="U-Net + text encoder steps")
    ap.add_argument("--unet-batch", type=positive_int, default=64, help="U-Net batch size")
    ap.add_argument("--unet-lr", type=finite_float, default=3e-4, help="U-Net + text encoder learning rate")
    ap.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                    help="epsilon: SD1.x's schedule; v_prediction: zero-terminal-SNR v schedule (see model.py)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="EMA snapshot (ema_NNNNNN.pt, or a run's unet_checkpoint.pt, which holds its EMA) of an "
                         "earlier run to start U-Net + text encoder from (its folder's VAE checkpoint and encoded "
                         "latents are reused), or a diffusers model folder such as lorakit/world/base_model "
                         "(its VAE is kept and the latents encoded again)")
    ap.add_argument("--high-noise-fraction", type=share, default=0.0,
                    help="share of each batch trained at the noisiest tenth of the timesteps")
    ap.add_argument("--unet-warmup", type=non_negative_int, default=500, help="learning-rate warm-up steps")
    ap.add_argument("--position-loss-weight", type=non_negative_float, default=0.0,
                    help="weight of the text encoder's auxiliary position probe (see DiffusionRecipe)")
    ap.add_argument("--background-loss-weight", type=non_negative_float, default=0.0,
                    help="weight of the text encoder's auxiliary background probe (see DiffusionRecipe)")
    ap.add_argument("--v-snr-cap", type=non_negative_float, default=0.0,
                    help="v-prediction only: weigh the clean image by min(SNR, cap) + 1 (0: plain v loss, SNR + 1)")
    ap.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--export-snapshot", type=Path, default=None,
                    help="only write --out/snapshot-model from this EMA snapshot file, then exit")


def run(args: argparse.Namespace) -> int:
    if args.export_snapshot is not None:
        export_snapshot(args.out, args.export_snapshot, args.out / "snapshot-model", args.seed, args.prediction_type)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "log.jsonl").open("a")

    def log(record: dict) -> None:
        log_file.write(json.dumps({"time": time.time(), **record}) + "\n")
        log_file.flush()

    log({"event": "start", "args": {k: str(v) for k, v in vars(args).items()}})
    c = build_components(args.seed, args.prediction_type)
    init_ema = None
    if args.init_from is not None and args.init_from.is_dir():
        init_ema = _reuse_model_folder(args.init_from, args.out, c, args.vae_steps)
    elif args.init_from is not None:
        init_ema = _reuse_earlier_run(args.init_from, args.out)
    train_vae(c["vae"], args.out, args.vae_steps, args.vae_batch, args.vae_lr, args.seed, log)
    c["vae"].requires_grad_(False)
    cache = args.out / "latents.pt"
    if cache.exists():
        latents = torch.load(cache, weights_only=True)
    else:
        latents = encode_dataset(c["vae"], args.images, args.seed + 1)
        atomic_torch_save(latents, cache)
    # SD's scaling factor: makes the latents' standard deviation about 1 for the diffusion model
    scaling = float(1.0 / latents["mean"].float().std())
    c["vae"].register_to_config(scaling_factor=scaling)
    log({"event": "vae_done", "scaling_factor": scaling})
    recipe = DiffusionRecipe(lr=args.unet_lr, warmup_steps=args.unet_warmup, init_ema=init_ema,
                             high_noise_fraction=args.high_noise_fraction,
                             position_loss_weight=args.position_loss_weight,
                             background_loss_weight=args.background_loss_weight, v_snr_cap=args.v_snr_cap)
    train_diffusion(c, latents, scaling, args.out, args.unet_steps, args.unet_batch, recipe, args.seed + 2, log)
    export_pipeline(c, args.out / "model")
    log({"event": "done"})
    print(f"pretrained model written to {args.out / 'model'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.world.pretrain``: ``lorakit world pretrain`` itself (its messages, exit code)."""
    from lorakit.commands.world import run_as_script

    return run_as_script("pretrain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
