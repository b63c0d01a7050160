"""What a textual-inversion embedding file holds, in plain text (``lorakit inspect`` on an embedding).

The vectors per text encoder, the base model their width belongs to, each vector's length (an embedding trained
too long or too hard grows vectors far longer than the encoder's own words), the token a prompt uses in lorakit,
A1111 and ComfyUI, the code that loads it in diffusers, and the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from lorakit.file_kinds import TI_TOKEN_KEY

#: text-encoder width -> the base model family whose encoder it is (clip_l: SD1.x 768, SD2.x 1024; clip_g: SDXL)
_WIDTHS = {("clip_l", 768): "SD1.x (or SDXL's first encoder)", ("clip_l", 1024): "SD2.x",
           ("clip_g", 1280): "SDXL", ("emb_params", 768): "SD1.x", ("emb_params", 1024): "SD2.x",
           ("clip_h", 1024): "SD2.x"}


@dataclass(frozen=True)
class EmbeddingReport:
    path: Path
    size: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    norms: dict[str, list[float]]  # per tensor, each vector's L2 length
    metadata: dict[str, str]

    @property
    def vectors(self) -> int:
        return max((shape[0] if len(shape) == 2 else 1 for shape in self.shapes.values()), default=0)

    @property
    def base_model(self) -> str | None:
        if set(self.shapes) == {"clip_l", "clip_g"}:
            return "SDXL"
        for key, shape in self.shapes.items():
            if (key, shape[-1]) in _WIDTHS:
                return _WIDTHS[(key, shape[-1])]
        return None


def inspect_embedding(path: str | Path) -> EmbeddingReport:
    """Read an embedding file (safetensors only; never unpickled)."""
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    norms = {k: [round(float(v), 4) for v in (t.float().reshape(-1, t.shape[-1]).norm(dim=-1))]
             for k, t in tensors.items()}
    return EmbeddingReport(path, path.stat().st_size, {k: tuple(t.shape) for k, t in tensors.items()},
                           {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}, norms, metadata)


def diffusers_loading_code(path: str | Path, token: str, pipe: str = "pipe") -> str:
    """Python that loads the embedding file at ``path`` into a diffusers pipeline named ``pipe`` under ``token``.

    diffusers' ``load_textual_inversion`` takes a file's only key for the token (lorakit's ``clip_l``, so the token
    must be given) and refuses a file with two keys: SDXL's pair goes in one encoder at a time, as diffusers'
    documentation does it."""
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    if "clip_g" not in keys:
        return f"{pipe}.load_textual_inversion({str(path)!r}, token={token!r})"
    return (f"from safetensors.torch import load_file; emb = load_file({str(path)!r}); "
            + "; ".join(f"{pipe}.load_textual_inversion(emb[{key!r}], token={token!r}, text_encoder={pipe}.{encoder}, "
                        f"tokenizer={pipe}.{tokenizer})"
                        for key, encoder, tokenizer in (("clip_l", "text_encoder", "tokenizer"),
                                                        ("clip_g", "text_encoder_2", "tokenizer_2"))))


def _base_model_text(report: EmbeddingReport) -> str:
    """The base model as the width tells it, and as kohya's metadata states it where the file has it."""
    stated = report.metadata.get("ss_base_model_version")
    guessed = f"{report.base_model} (from the width)" if report.base_model else None
    if stated:
        return f"{stated} (metadata)" + (f"; {guessed}" if guessed else "")
    return guessed or "unknown (the width is no known encoder's, and the metadata does not say)"


def format_embedding_report(report: EmbeddingReport) -> str:
    name = report.path.stem
    token = report.metadata.get(TI_TOKEN_KEY) or name  # lorakit sample's: the file's token, else its name
    lines = [f"file:        {report.path}",
             "kind:        textual-inversion embedding",
             f"size:        {report.size} bytes",
             "tensors:     " + ", ".join(f"{k} {'×'.join(map(str, s))} {report.dtypes[k]}"
                                         for k, s in sorted(report.shapes.items())),
             f"vectors:     {report.vectors} per prompt token",
             f"base model:  {_base_model_text(report)}"]
    for key, values in sorted(report.norms.items()):
        lines.append(f"lengths:     {key} " + ", ".join(f"{v:.3g}" for v in values))
    lines.append(f"prompt:      A1111: {name}; ComfyUI: embedding:{name}; lorakit: {token} (lorakit sample "
                 "--embedding)")
    lines.append(f"diffusers:   {diffusers_loading_code(report.path, token)}")
    shown = {k: v for k, v in sorted(report.metadata.items())}
    lines.append(f"metadata:    {len(shown)} entries")
    lines += [f"  {k}: {v if len(v) <= 120 else v[:120] + f'... ({len(v)} chars)'}" for k, v in shown.items()]
    longest = max((v for values in report.norms.values() for v in values), default=0.0)
    lines += ["", f"summary: {report.path.name}: a textual-inversion embedding of {report.vectors} vector(s)"
              + (f" for {report.base_model}" if report.base_model else "")
              + f", longest vector {longest:.3g}; in a prompt write {name} (A1111), embedding:{name} (ComfyUI) or "
              f"{token} (lorakit)."]
    return "\n".join(lines)
