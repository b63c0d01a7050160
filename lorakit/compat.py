"""``python -m lorakit.compat``: which clients load lorakit's files, measured, as the table of docs/compatibility.md.

For every algorithm lorakit writes, a file is made on a tiny SD1.x-shaped U-Net (random weights, rank 4,
alpha 2, conv rank 2, alpha 1: alpha ≠ rank on purpose) and loaded into a fresh copy of that U-Net by each
client installed from PyPI: diffusers (``load_lora_weights``), PEFT (``set_peft_model_state_dict``, for the
diffusers layout it reads) and LyCORIS (``create_network_from_weights``).  A client's U-Net output is compared
with lorakit's own (whose forward equals ``W0 + ΔW``, checked by the unit tests): the error is
``max |out_client − out_lorakit| / max |out_lorakit − out_base|``, the part of the adapter's effect a client
gets wrong.  The A1111 and ComfyUI columns are not measured here (neither is a PyPI package): they come from
reading their published adapter code (``READ``, with what was read in docs/compatibility.md).

``python -m lorakit.compat`` prints the table; ``--write docs/compatibility.md`` replaces the table between the
``<!-- compat-table -->`` markers of that file.  Nothing is downloaded; it takes about a minute on one CPU core.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import logging
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import atomic_write_text

SAME = 1e-3  # relative error below which a client applies the same ΔW (round-off: 1e-6..1e-4; a wrong scale: ~1)
START, END = "<!-- compat-table -->", "<!-- /compat-table -->"


@dataclass(frozen=True)
class Row:
    label: str
    algorithm: str
    preset: str = "full"
    options: dict[str, Any] = field(default_factory=dict)
    layout: str = "kohya"


ROWS = (
    Row("LoRA", "lora", "attn-mlp"),
    Row("LoCon", "lora", "full"),
    Row("LoCon-Tucker", "lora", "full", {"use_tucker": True}),
    Row("LoHa", "loha", "full"),
    Row("LoKr", "lokr", "full", {"factor": 4}),
    Row("(IA)³", "ia3", "attn-mlp"),
    Row("(IA)³, ia3 preset", "ia3", "ia3"),
    Row("full (ΔW)", "full", "attn-mlp"),
    Row("OFT", "oft", "full"),
    Row("BOFT", "boft", "full"),
    Row("GLoRA", "glora", "full"),
    Row("DyLoRA", "dylora", "full", {"block_size": 2}),
    Row("LoRA + norm layers (train_norm)", "lora", "attn-mlp", {"train_norm": True}),
    Row("DoRA, input columns (default)", "lora", "attn-mlp", {"dora": True}),
    Row("DoRA, output rows", "lora", "attn-mlp", {"dora": True, "wd_on_out": True}),
    Row("LoRA, diffusers layout", "lora", "attn-mlp", layout="diffusers"),
    Row("LoCon, diffusers layout", "lora", "full", layout="diffusers"),
    Row("DoRA, output rows, diffusers layout", "lora", "attn-mlp", {"dora": True, "wd_on_out": True},
        layout="diffusers"),
)
MEASURED = ("diffusers", "peft", "lycoris-lora")

#: what reading A1111's and ComfyUI's adapter code says (see docs/compatibility.md for files and versions)
READ: dict[str, dict[str, str]] = {
    "A1111": {
        "LoRA": "✓", "LoCon": "✓", "LoCon-Tucker": "✓", "LoHa": "✓", "LoKr": "✓",
        "(IA)³": "✗ fails on conv layers", "(IA)³, ia3 preset": "✓ (linear layers only)", "full (ΔW)": "✓",
        "OFT": "? not checked (network_oft.py reads oft_blocks)", "BOFT": "? not checked",
        "GLoRA": "? not checked (network_glora.py)", "DyLoRA": "✓ (a plain LoRA file)",
        "LoRA + norm layers (train_norm)": "✓ (network_norm.py)",
        "DoRA, input columns (default)": "✓", "DoRA, output rows": "✗ differs (normalises input columns)",
        "LoRA, diffusers layout": "? not checked", "LoCon, diffusers layout": "? not checked",
        "DoRA, output rows, diffusers layout": "? not checked",
    },
    "ComfyUI": {
        "LoRA": "✓", "LoCon": "✓", "LoCon-Tucker": "✓", "LoHa": "✓", "LoKr": "✓",
        "(IA)³": "✗ no (IA)³ adapter", "(IA)³, ia3 preset": "✗ no (IA)³ adapter", "full (ΔW)": "✓",
        "OFT": "? same at strength 1 without rescale/constraint (see notes)",
        "BOFT": "? same at strength 1 without constraint (see notes)", "GLoRA": "✓ (no bm core)",
        "DyLoRA": "✓ (a plain LoRA file)", "LoRA + norm layers (train_norm)": "✓ (w_norm/b_norm as diffs)",
        "DoRA, input columns (default)": "✓", "DoRA, output rows": "✗ differs (divides by ‖W0‖)",
        "LoRA, diffusers layout": "? partial (see notes)", "LoCon, diffusers layout": "? partial (see notes)",
        "DoRA, output rows, diffusers layout": "? partial (see notes)",
    },
}


# ---- the model and the files ------------------------------------------------------------------------------

def tiny_unet(seed: int = 0, linear_projection: bool = False):
    """A UNet2DConditionModel with SD1.x's block structure (4 levels, 2 layers per block), random weights;
    ``linear_projection``: its transformers project in and out with Linear layers, as SD2.x's do (1×1 convs in
    SD1.x)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        norm_num_groups=16, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        use_linear_projection=linear_projection).eval()


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def _out(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(*_inputs()).sample


def make_file(row: Row, folder: Path, unet) -> Path:
    from lorakit.formats import save_network
    from lorakit.network import UniformRanks, create_network

    network = create_network(unet, preset=row.preset, algorithm=row.algorithm, options=row.options,
                             ranks=UniformRanks(4, 2.0, conv_rank=2, conv_alpha=1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for key, p in adapter.named_parameters():
                if key == "dora_scale":  # magnitudes near ‖W0‖, as after training
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif not key.startswith("base."):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    name = re.sub(r"\W+", "_", row.label).strip("_").lower()
    path = save_network(network, folder / f"{name}.safetensors", format=row.layout)
    network.remove()
    return path


# ---- the clients ------------------------------------------------------------------------------------------

def _load_diffusers(path: Path, unet) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    class Pipe(StableDiffusionLoraLoaderMixin):  # the least of a pipeline the loader needs
        hf_device_map = None

        def __init__(self, unet):
            self.unet, self.text_encoder = unet, None

        @property
        def components(self):
            return {"unet": self.unet}

    Pipe(unet).load_lora_weights(str(path))


def _load_peft(path: Path, unet) -> None:
    import json

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from lorakit.diffusers_format import METADATA_KEY
    from lorakit.formats import read_adapter

    file = read_adapter(path)
    if file.layout != "diffusers":
        raise LookupError("no reader for the kohya layout")
    meta = json.loads(file.metadata[METADATA_KEY])
    config = {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")}
    keep = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_dora", "use_rslora"}
    inject_adapter_in_model(LoraConfig(**{k: v for k, v in config.items() if k in keep}), unet)
    state = {k.removeprefix("unet."): v for k, v in file.tensors.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, state)
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"unexpected keys {result.unexpected_keys[:2]}")


@contextlib.contextmanager
def _lycoris_presets() -> Iterator[None]:
    """LyCORIS keeps presets in class attributes; its default `full` preset names time_embedding twice on a
    diffusers U-Net (4.1.3), so load with a Transformer2DModel preset and put the class attributes back."""
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.wrapper import LycorisNetwork

    saved = {cls: dict(vars(cls)) for cls in (LycorisNetwork, LycorisNetworkKohya)}
    LycorisNetworkKohya.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    try:
        yield
    finally:
        for cls, attrs in saved.items():
            for key, value in attrs.items():
                if key.isupper():
                    setattr(cls, key, value)


def _load_lycoris(path: Path, unet) -> None:
    from lycoris.kohya import create_network_from_weights

    with _lycoris_presets():
        network, _ = create_network_from_weights(1.0, str(path), None, None, unet)
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)


CLIENTS: dict[str, Callable[[Path, Any], None]] = {
    "diffusers": _load_diffusers, "peft": _load_peft, "lycoris-lora": _load_lycoris}
_DISTRIBUTIONS = {"diffusers": "diffusers", "peft": "peft", "lycoris-lora": "lycoris_lora"}


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0].strip().rstrip(":") if str(err).strip() else type(err).__name__
    text = text.replace("|", "/")  # a Markdown table cell
    return text if len(text) <= 70 else text[:67] + "..."


def measure(row: Row, folder: Path, clients=MEASURED, *, linear_projection: bool = False) -> dict[str, str]:
    """One table row: the cell of each measured client (on an SD2.x-kind U-Net with ``linear_projection``)."""
    from lorakit.formats import load_network

    base_unet = tiny_unet(linear_projection=linear_projection)
    base = _out(base_unet)
    path = make_file(row, folder, base_unet)
    ours = tiny_unet(linear_projection=linear_projection)
    load_network(path, ours)
    reference = _out(ours)
    effect = (reference - base).abs().max().item()
    cells = {}
    for client in clients:
        unet = tiny_unet(linear_projection=linear_projection)
        quiet = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
                warnings.simplefilter("ignore")
                logging.disable(logging.CRITICAL)
                CLIENTS[client](path, unet)
        except LookupError as err:
            cells[client] = f"– {_short(err)}"
            continue
        except Exception as err:  # a client refusing a file is a result, not a failure of this tool
            cells[client] = f"✗ refuses: {_short(err)}"
            continue
        finally:
            logging.disable(logging.NOTSET)
        out = _out(unet)
        if torch.equal(out, base):
            cells[client] = "✗ loads, applies nothing"
            continue
        error = (out - reference).abs().max().item() / effect
        cells[client] = f"✓ same ΔW ({error:.0e})" if error < SAME else f"✗ loads, ΔW differs ({error:.2g})"
    return cells


def versions() -> dict[str, str]:
    found = {}
    for client, dist in _DISTRIBUTIONS.items():
        try:
            found[client] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[client] = "not installed"
    return found


def table(folder: Path | None = None) -> str:
    """The Markdown table: one row per file kind, measured clients then the ones read."""
    import lorakit

    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        v = versions()
        head = (["file", *[f"{c} {v[c]} (measured)" for c in MEASURED], "A1111 1.10 (read)", "ComfyUI 0.3 (read)",
                 f"lorakit {lorakit.__version__}"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in ROWS:
            cells = measure(row, folder)
            lines.append("| " + " | ".join([row.label, *[cells[c] for c in MEASURED], READ["A1111"][row.label],
                                            READ["ComfyUI"][row.label], "✓ (reference)"]) + " |")
    return "\n".join(lines)


def table_rows(document: str) -> dict[str, list[str]]:
    """The rows of the table in a document: file label -> cells (for checking that the document is current)."""
    _, rest = document.split(START, 1)
    body = rest.split(END, 1)[0].strip().splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in body)}


def replace_table(document: str, new_table: str) -> str:
    if START not in document or END not in document:
        raise ValueError(f"the document has no {START} ... {END} markers")
    before, rest = document.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{new_table}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.compat", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the table in this Markdown file (between markers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the machine to others
    new = table()
    if args.write:
        atomic_write_text(args.write, replace_table(args.write.read_text(encoding="utf-8"), new))
        print(f"wrote the table into {args.write}")
    else:
        print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
