"""Training-step cost of every lorakit adapter against the frozen U-Net's own step, beside PEFT and LyCORIS.

    python benchmarks/train_step.py                       # CPU: SD1.5 layout at half width, 16x16 latents
    python benchmarks/train_step.py --quick               # smoke test: a tiny U-Net, 2 rounds
    python benchmarks/train_step.py --width full --resolution 256   # CPU: SD1.5's own width, 32x32 latents
    python benchmarks/train_step.py --keep-freed-memory   # malloc as `lorakit train` sets it (lorakit.host_memory)
    python benchmarks/train_step.py --device cuda --resolution 512 --dtype bf16 --compile   # full width on a GPU
    python benchmarks/train_step.py --family sdxl         # SDXL 1.0 base's U-Net layout (its size conditioning too)

Variants (``--variants`` picks a subset by name):

- ``floor``: the frozen U-Net, forward + backward to the input latents (no parameter gradients): the cost
  no adapter can go under;
- lorakit: LoRA (attention preset), DoRA (LoRA + DoRA, attention), LoCon, LoHa, LoKr (factor 4), (IA)^3
  (full preset), native fine-tuning (every U-Net weight, AdamW);
- PEFT: LoRA and DoRA on the same attention layers, LoHa/LoKr/(IA)^3 on the same full-preset layers;
- LyCORIS: the same algorithms on exactly the same layers (its ``target_name`` preset), same rank/alpha.

Every adapter variant is a real step: forward, MSE loss, backward, AdamW step, ``zero_grad``.  The variants
are interleaved over ``--rounds`` (each round visits every variant once, in a rotated order), so that
machine noise hits all alike; a variant's time is the median over its timed steps.  With ``--compile`` every
variant is compiled anew in every round (its modules differ), which takes minutes per variant: on a GPU with
little time use ``--rounds 1`` and a few ``--variants``.  On the CPU the clock is
the process's CPU time (other jobs on a shared machine do not count; run with one thread), on CUDA the wall
time between synchronisations.  Peak memory: the extra memory one step needs above the resting state
(CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, reset through ``/proc/self/clear_refs``, in
one extra step during which glibc's malloc hands big blocks straight back), plus the bytes of the trained
tensors and the optimiser's state.  Only ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.optimizers import can_fuse

RANK = 8
ALPHA = 8.0
LOKR_FACTOR = 4


@dataclass(frozen=True)
class Variant:
    name: str
    library: str  # "torch" (floor, native), "lorakit", "peft", "lycoris"
    algorithm: str  # what peers are matched on: lora, dora, locon, loha, lokr, ia3, ...
    preset: str  # lorakit preset whose layers every library adapts ("" for floor/native)
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


VARIANTS: tuple[Variant, ...] = (
    Variant("floor", "torch", "floor", ""),
    Variant("lorakit-lora", "lorakit", "lora", "attn-only"),
    Variant("peft-lora", "peft", "lora", "attn-only"),
    Variant("lycoris-lora", "lycoris", "lora", "attn-only"),
    Variant("lorakit-dora", "lorakit", "dora", "attn-only", {"dora": True}),
    Variant("peft-dora", "peft", "dora", "attn-only"),
    Variant("lycoris-dora", "lycoris", "dora", "attn-only"),
    Variant("lorakit-locon", "lorakit", "locon", "full"),
    Variant("lycoris-locon", "lycoris", "locon", "full"),
    Variant("lorakit-loha", "lorakit", "loha", "full"),
    Variant("peft-loha", "peft", "loha", "full"),
    Variant("lycoris-loha", "lycoris", "loha", "full"),
    Variant("lorakit-lokr", "lorakit", "lokr", "full", {"factor": LOKR_FACTOR}),
    Variant("peft-lokr", "peft", "lokr", "full"),
    Variant("lycoris-lokr", "lycoris", "lokr", "full"),
    Variant("lorakit-ia3", "lorakit", "ia3", "full"),
    Variant("peft-ia3", "peft", "ia3", "full"),
    Variant("lycoris-ia3", "lycoris", "ia3", "full"),
    Variant("lorakit-native", "torch", "native", ""),
)
_LORAKIT_ALGORITHM = {"lora": "lora", "dora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr", "ia3": "ia3"}


# ---- the model and the batch ---------------------------------------------------------------------------------

#: block channels of SD1.5's U-Net layout (4 levels, 2 layers per block, cross-attention at the first three)
WIDTHS = {"half": (160, 320, 640, 640), "full": (320, 640, 1280, 1280)}
#: block channels of SDXL 1.0 base's U-Net (3 levels; 1, 2 and 10 transformer layers per block at the last two)
SDXL_WIDTHS = {"half": (160, 320, 640), "full": (320, 640, 1280)}
SDXL_UNET_CONFIG = Path(__file__).resolve().parents[1] / "lorakit" / "configs" / "sdxl" / "unet" / "config.json"
#: the U-Net families the benchmark builds (--family)
FAMILIES = ("sd15", "sdxl")


def unet_config(quick: bool, width: str = "half", family: str = "sd15") -> dict[str, Any]:
    """SD1.5's U-Net layout at ``width`` ("full" is SD1.5's own U-Net, 860M parameters; "half" a quarter of
    its arithmetic, what the CPU tables use), or SDXL 1.0 base's (``family`` "sdxl": its config as lorakit ships
    it, 2.6B parameters at full width); ``quick``: the same layout, tiny."""
    if family == "sdxl":
        if quick:  # SDXL's levels, linear projections and size conditioning, tiny
            return {"block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
                    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (2, 2, 4),
                    "cross_attention_dim": 64, "use_linear_projection": True, "addition_embed_type": "text_time",
                    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 16}
        config = {k: v for k, v in json.loads(SDXL_UNET_CONFIG.read_text()).items() if not k.startswith("_")}
        return {**config, "block_out_channels": SDXL_WIDTHS[width]}
    if quick:
        return {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
                "cross_attention_dim": 32, "attention_head_dim": 2}
    return {"block_out_channels": WIDTHS[width], "layers_per_block": 2, "norm_num_groups": 32,
            "cross_attention_dim": 768, "attention_head_dim": 8}


def pooled_width(config: dict[str, Any]) -> int | None:
    """SDXL's pooled text embedding width (the second encoder's projection, 1280) that the U-Net's size
    conditioning takes beside six size numbers; None for a U-Net without it (SD1.x/2.x)."""
    if config.get("addition_embed_type") != "text_time":
        return None
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def build_unet(config: dict[str, Any], device: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype)
    unet.requires_grad_(False)
    return unet.train()


@dataclass
class Batch:
    latents: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    target: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)  # SDXL's added_cond_kwargs (pooled text, size numbers)


def make_batch(batch: int, side: int, cross_dim: int, device: str, dtype: torch.dtype,
               pooled: int | None = None) -> Batch:
    """Random latents, text states and targets; with ``pooled`` (SDXL), the size conditioning too."""
    g = torch.Generator().manual_seed(batch)
    latents = torch.randn(batch, 4, side, side, generator=g).to(device, dtype)
    extra = {}
    if pooled is not None:
        pixels = side * 8
        extra = {"added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device, dtype=dtype)}}
    return Batch(latents, torch.full((batch,), 500, device=device),
                 torch.randn(batch, 77, cross_dim, generator=g).to(device, dtype),
                 torch.randn(batch, 4, side, side, generator=g).to(device, dtype), extra)


# ---- setting up one variant ----------------------------------------------------------------------------------

def target_paths(unet: nn.Module, preset: str) -> list[str]:
    """The U-Net module paths lorakit's ``preset`` adapts: every library gets exactly these layers."""
    from lorakit.network import components, get_preset, select_targets

    comp = components(unet, None)[0]
    return [path for path, _ in select_targets(comp, get_preset(preset).unet)]


@dataclass
class Setup:
    params: list[nn.Parameter]
    teardown: Callable[[], None]
    modules: int


def setup_lorakit(unet: nn.Module, variant: Variant) -> Setup:
    from lorakit.network import UniformRanks, create_network

    network = create_network(unet, preset=variant.preset, ranks=UniformRanks(RANK, ALPHA),
                             algorithm=_LORAKIT_ALGORITHM[variant.algorithm], options=variant.options)
    params = [p for group in network.trainable_parameters().values() for p in group]
    return Setup(params, network.remove, len(network))


def setup_peft(unet: nn.Module, variant: Variant) -> Setup:
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = target_paths(unet, variant.preset)
    if variant.algorithm in ("lora", "dora"):
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names,
                                 use_dora=variant.algorithm == "dora")
    elif variant.algorithm == "loha":
        config = peft.LoHaConfig(r=RANK, alpha=ALPHA, target_modules=names)
    elif variant.algorithm == "lokr":
        config = peft.LoKrConfig(r=RANK, alpha=ALPHA, target_modules=names, decompose_factor=LOKR_FACTOR)
    elif variant.algorithm == "ia3":
        config = peft.IA3Config(target_modules=names, feedforward_modules=[])
    else:
        raise ValueError(variant.name)
    peft.inject_adapter_in_model(config, unet)
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    params = [p for _, m in layers for p in m.parameters() if p.requires_grad]

    def teardown() -> None:
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, layer.get_base_layer())

    return Setup(params, teardown, len(layers))


def setup_lycoris(unet: nn.Module, variant: Variant) -> Setup:
    from lycoris.wrapper import LycorisNetwork

    names = target_paths(unet, variant.preset)
    # exactly these module paths (regular expressions anchored at both ends), nothing chosen by class
    LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [], "module_algo_map": {},
                                 "name_algo_map": {}, "use_fnmatch": False, "exclude_name": [],
                                 "target_name": [re.escape(n) + "$" for n in names]})
    algo = {"dora": "lora", "locon": "lora"}.get(variant.algorithm, variant.algorithm)
    network = LycorisNetwork(unet, multiplier=1.0, lora_dim=RANK, conv_lora_dim=RANK, alpha=ALPHA,
                             conv_alpha=ALPHA, network_module=algo, factor=LOKR_FACTOR,
                             weight_decompose=variant.algorithm == "dora", warn_on_unmatched=False)
    device, dtype = next(unet.parameters()).device, torch.float32
    network.apply_to()
    network.to(device=device, dtype=dtype)
    params = [p for p in network.parameters() if p.requires_grad]
    return Setup(params, network.restore, len(network.loras))


def setup_native(unet: nn.Module, variant: Variant) -> Setup:
    params = list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    return Setup(params, lambda: unet.requires_grad_(False), 0)


def setup(unet: nn.Module, variant: Variant, device: str) -> Setup:
    if variant.name == "floor":
        return Setup([], lambda: None, 0)
    if variant.algorithm == "native":
        return setup_native(unet, variant)
    made = {"lorakit": setup_lorakit, "peft": setup_peft, "lycoris": setup_lycoris}[variant.library](unet, variant)
    for p in made.params:  # trained tensors in float32 for every library, as in mixed-precision training
        if p.device.type != torch.device(device).type or p.dtype != torch.float32:
            p.data = p.data.to(device=device, dtype=torch.float32)
    return made


# ---- measuring -----------------------------------------------------------------------------------------------

class Clock:
    """CPU time of this process on the CPU, synchronised wall time on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


class PeakMemory:
    """Extra bytes one step needs above what was allocated before it."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.linux = Path("/proc/self/clear_refs").exists()
        self.libc = None
        if not self.cuda and self.linux:
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self._malloc(32 << 20)  # timed steps: glibc's own ceiling, heap blocks reused (few page faults)
            except (OSError, AttributeError):
                self.libc = None

    def _malloc(self, threshold: int) -> None:
        if self.libc is not None:
            self.libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD: blocks above it come from mmap
            self.libc.mallopt(-1, 2 * threshold)  # M_TRIM_THRESHOLD

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def measure(self, fn: Callable[[], None]) -> int | None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        if not self.linux:
            return None
        # big blocks by mmap and back to the system when freed, free heap handed back: RSS follows tensors
        self._malloc(1 << 16)
        if self.libc is not None:
            self.libc.malloc_trim(0)
        before = self._status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        try:
            fn()
        finally:
            self._malloc(32 << 20)
        return self._status("VmHWM:") - before


def make_step(model: Callable[..., Any], batch: Batch, params: list[nn.Parameter], autocast) -> Callable[[], None]:
    """One training step; without parameters, the floor: forward and backward to the input latents."""
    # the trainer's AdamW (fused where torch has the kernel), for every variant alike, peers included
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=can_fuse([{"params": params}]) or None) if params else None
    latents = batch.latents.detach().clone().requires_grad_(optimizer is None)

    def step() -> None:
        with autocast():
            out = model(latents, batch.timesteps, batch.text, **batch.extra).sample
        F.mse_loss(out.float(), batch.target.float()).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            latents.grad = None

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> int:
    total = sum(p.numel() * p.element_size() for p in params)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def run_variant(unet: nn.Module, variant: Variant, batch: Batch, args: argparse.Namespace, clock: Clock,
                memory: PeakMemory, measure_memory: bool) -> dict[str, Any]:
    made = setup(unet, variant, args.device)
    try:
        model: Callable[..., Any] = unet
        if args.channels_last:  # after setup, so that the adapters' conv weights are channels-last too
            unet.to(memory_format=torch.channels_last)
        if args.compile:
            torch._dynamo.reset()
            model = torch.compile(unet)
        autocast = nullcontext
        if args.dtype != "fp32":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

            def autocast():
                return torch.autocast(torch.device(args.device).type, dtype=dtype)
        step = make_step(model, batch, made.params, autocast)
        for _ in range(args.warmup):
            step()
        times, walls = [], []
        for _ in range(args.steps):
            wall, start = time.perf_counter(), clock()
            step()
            times.append(clock() - start)
            walls.append(time.perf_counter() - wall)
        peak = memory.measure(step) if measure_memory else None
        return {"times": times, "walls": walls, "peak_bytes": peak, "modules": made.modules,
                "trained_params": sum(p.numel() for p in made.params),
                "state_bytes": state_bytes(made.params, step.optimizer)}
    finally:
        made.teardown()
        for p in unet.parameters():
            p.grad = None


def available(variant: Variant) -> bool:
    if variant.library in ("peft", "lycoris"):
        try:
            __import__(variant.library)
        except ImportError:
            return False
    return True


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    for name in ("diffusers", "peft", "lycoris"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    if info.get("lycoris") == "?":
        from importlib.metadata import version
        info["lycoris"] = version("lycoris-lora")
    return info


def summarise(raw: dict[tuple[str, int], list[dict[str, Any]]], variants: list[Variant],
              batches: list[int]) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        per = {}
        for v in variants:
            runs = raw[(v.name, b)]
            times = [t for r in runs for t in r["times"]]
            peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
            per[v.name] = {"variant": v.name, "library": v.library, "algorithm": v.algorithm,
                           "preset": v.preset, "batch": b, "modules": runs[0]["modules"],
                           "trained_params": runs[0]["trained_params"],
                           "s_per_step": statistics.median(times), "times": times,
                           "wall_times": [t for r in runs for t in r["walls"]],
                           "peak_step_mib": round(max(peaks) / 2**20, 1) if peaks else None,
                           "trained_state_mib": round(runs[0]["state_bytes"] / 2**20, 2)}
        floor = per["floor"]["s_per_step"] if "floor" in per else None
        for v in variants:
            row = per[v.name]
            row["x_floor"] = round(row["s_per_step"] / floor, 3) if floor else None
            row["x_peers"] = {p.name: round(row["s_per_step"] / per[p.name]["s_per_step"], 3)
                              for p in variants if p.algorithm == v.algorithm and p.library != v.library
                              and v.library == "lorakit"}
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | batch | modules | s/step | × floor | × peers | step peak MiB | trained+optim MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peers = ", ".join(f"{k.split('-')[0]} {v:.2f}" for k, v in r["x_peers"].items()) or "—"
        floor = f"{r['x_floor']:.2f}" if r["x_floor"] is not None else "—"
        peak = "—" if r["peak_step_mib"] is None else f"{r['peak_step_mib']:.0f}"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['modules']} | {r['s_per_step']:.4f} | {floor} | "
                     f"{peers} | {peak} | {r['trained_state_mib']:.1f} |")
    return "\n".join(lines)


def add_unet_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time one U-Net's training step in mixed precision (fp8_base.py,
    fused_backward.py): device, autocast dtype, layout, width, resolution, batch, threads, quick, json."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="mixed precision's dtype")
    parser.add_argument("--family", choices=FAMILIES, default="sd15")
    parser.add_argument("--width", choices=sorted(WIDTHS), default=None, help="default: half on the CPU, else full")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 128; quick 64)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a tiny U-Net: a smoke test")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def settle_unet_step_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on other options (half width on the CPU, 64² when quick)."""
    args.width = args.width or ("half" if args.device == "cpu" else "full")
    args.resolution = args.resolution or (64 if args.quick else 128)
    return args


def write_result(args: argparse.Namespace, rows: dict[str, Any], started: float, **settings: Any) -> dict[str, Any]:
    """The run's record (machine, settings, elapsed time, rows, command line), written to ``--json`` if given."""
    result = {"machine": machine(args.device), "settings": {**vars(args), "json": str(args.json), **settings},
              "elapsed_s": round(time.perf_counter() - started, 1), "results": rows, "command": " ".join(sys.argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the U-Net's weights (adapters train in float32 under autocast)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels; latents are 1/8 (default: 128, i.e. 16x16 latents; quick: 64)")
    parser.add_argument("--family", choices=FAMILIES, default="sd15",
                        help="the U-Net's layout: SD1.5's (default) or SDXL 1.0 base's")
    parser.add_argument("--width", choices=sorted(WIDTHS), default=None,
                        help="U-Net width (default: half on the CPU, full, i.e. SD1.5's own U-Net, elsewhere)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant per round "
                        "(default: 1 on the CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after each setup (default 1; "
                        "compile 3)")
    parser.add_argument("--variants", default="", help="comma-separated names (default: all available): "
                        + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net (every variant)")
    parser.add_argument("--channels-last", action="store_true",
                        help="the U-Net, its adapters and the latents in channels-last layout (every variant)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a tiny U-Net and 2 rounds: a smoke test")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="as `lorakit train` runs: glibc keeps freed memory for reuse (lorakit.host_memory); "
                             "the CPU's step-peak column is then not measured (the resident size never shrinks)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.quick else 128)
    args.width = args.width or ("half" if args.device == "cpu" else "full")
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.compile else 1)
    args.steps = args.steps or (10 if args.device.startswith("cuda") else 1)
    if args.keep_freed_memory and args.device == "cpu":
        args.no_memory = True  # peak RSS above the resting state means nothing once freed memory is kept
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every network it builds
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from lorakit.host_memory import keep_freed_memory

        args.keep_freed_memory = keep_freed_memory()
    wanted = [n for n in args.variants.split(",") if n]
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(known)}")
    variants = [known[n] for n in wanted] if wanted else [v for v in VARIANTS if available(v)]
    batches = [int(b) for b in args.batches.split(",") if b]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = unet_config(args.quick, args.width, args.family)
    unet = build_unet(config, args.device, dtype)
    side = args.resolution // 8
    clock, memory = Clock(args.device), PeakMemory(args.device)
    raw: dict[tuple[str, int], list[dict[str, Any]]] = {(v.name, b): [] for v in variants for b in batches}
    started = time.perf_counter()
    for b in batches:
        batch = make_batch(b, side, config["cross_attention_dim"], args.device, dtype, pooled_width(config))
        if args.channels_last:
            batch = Batch(*(t.to(memory_format=torch.channels_last) if t.dim() == 4 else t
                            for t in (batch.latents, batch.timesteps, batch.text, batch.target)), batch.extra)
        for r in range(args.rounds):
            k = r % len(variants)  # rotate the order: no variant always runs first or after the same one
            for v in variants[k:] + variants[:k]:
                raw[(v.name, b)].append(run_variant(unet, v, batch, args, clock, memory,
                                                    measure_memory=r == 0 and not args.no_memory))
                print(f"batch {b} round {r + 1}/{args.rounds} {v.name}: "
                      f"{statistics.median(raw[(v.name, b)][-1]['times']):.4f} s", file=sys.stderr, flush=True)
    rows = summarise(raw, variants, batches)
    result = {"machine": machine(args.device),
              "settings": {"device": args.device, "dtype": args.dtype, "resolution": args.resolution,
                           "latent_side": side, "batches": batches, "rounds": args.rounds, "steps": args.steps,
                           "warmup": args.warmup, "compile": args.compile,
                           "channels_last": args.channels_last, "threads": args.threads,
                           "quick": args.quick, "width": args.width, "family": args.family,
                           "keep_freed_memory": args.keep_freed_memory, "rank": RANK, "alpha": ALPHA,
                           "lokr_factor": LOKR_FACTOR,
                           "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                           "clock": "wall" if args.device.startswith("cuda") else "process CPU time",
                           "command": " ".join(sys.argv)},
              "elapsed_s": round(time.perf_counter() - started, 1),
              "results": rows}
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
