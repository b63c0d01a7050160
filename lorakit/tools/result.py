"""What extract/resize/combine produce: a LoRA/LoCon file's tensors and metadata, and the per-module report."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lorakit
from lorakit.atomic import atomic_write_text
from lorakit.formats import AdapterFile, guess_base_model, model_hashes, write_adapter
from lorakit.metadata import base_model_fields, ss_metadata
from lorakit.modelspec import modelspec_date
from lorakit.tools import ToolError, check_output
from lorakit.tools.lowrank import Factors, ModuleReport, lora_tensors, report_table, totals, totals_line

# ss_* entries a derived file keeps from its source: how it was trained still describes it
_KEEP_FROM_SOURCE = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_tag_frequency", "ss_dataset_dirs",
                     "ss_output_name", "ss_training_comment", "ss_resolution", "ss_clip_skip")


@dataclass
class ToolResult:
    """A plain LoRA/LoCon adapter in memory (kohya names), with a report per module (and norm-layer updates kept
    as they are, ``kept``).

    Modules are collected with ``add`` and turned into tensors by ``finish``, which gives every module the same
    ``alpha`` (the scale of each module is folded into its factors).  One alpha per file is what every client
    reads right: diffusers 0.42 drops per-module alphas of kohya attention keys (its ``alpha_pattern`` names
    them wrongly), so a file whose alphas vary loads there with wrong scales.
    """

    tool: str
    dtype: torch.dtype = torch.float32
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    reports: list[ModuleReport] = field(default_factory=list)
    #: things the report should say besides the table (skipped modules, bias updates left out, ...)
    notes: list[str] = field(default_factory=list)
    factors: dict[str, Factors] = field(default_factory=dict)
    #: modules written as they are beside the LoRA's: norm-layer updates (LyCORIS's ``train_norm``, ``w_norm`` /
    #: ``b_norm``), which the clients that read them (A1111, ComfyUI, LyCORIS) add to the norm layers
    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def keep(self, modules: dict[str, dict[str, torch.Tensor]], how: str) -> None:
        """Write ``modules`` as they are (``how`` says what was done to them, for the report)."""
        if modules:
            self.kept.update(modules)
            self.notes.append(f"{len(modules)} norm-layer update(s) (train_norm) {how}")

    def add(self, name: str, factors: Factors) -> None:
        """Add one module (a rank-0 factorisation, i.e. ``ΔW = 0``, is reported but writes no key)."""
        factors.report.name = name
        self.reports.append(factors.report)
        if factors.rank > 0:
            self.factors[name] = factors

    def as_file(self) -> AdapterFile:
        return AdapterFile(dict(self.tensors), dict(self.metadata))

    def finish(self, source: Mapping[str, str] | None = None, *, alpha_per_rank: float = 1.0,
               **extra: str) -> None:
        """Write the tensors (``alpha = alpha_per_rank · largest rank`` for every module) and the metadata:
        kohya's ``ss_*`` network entries as ``networks.lora`` writes them, the source's training entries, and
        ``lorakit_*`` (tool, retained energy)."""
        top = max((f.rank for f in self.factors.values()), default=1)
        alpha = float(alpha_per_rank * top)
        self.tensors = {}
        for name, factors in self.factors.items():
            for key, tensor in lora_tensors(factors, alpha, self.dtype).items():
                self.tensors[f"{name}.{key}"] = tensor
        for name, tensors in self.kept.items():
            for key, tensor in tensors.items():
                self.tensors[f"{name}.{key}"] = tensor.detach().to(self.dtype).contiguous()
        meta = {k: v for k, v in (source or {}).items() if k in _KEEP_FROM_SOURCE or k.startswith("modelspec.")}
        if "modelspec.date" in meta:  # the same model described (title, trigger, license), made now
            meta["modelspec.date"] = modelspec_date()
        kxk = {n: len(f.shape) == 4 and f.shape[2] * f.shape[3] > 1 for n, f in self.factors.items()}
        linear = [f for n, f in self.factors.items() if not kxk[n]]
        conv = [f for n, f in self.factors.items() if kxk[n]]
        args: dict[str, str] = {}
        if conv:
            args["conv_dim"] = str(max(f.rank for f in conv))
            args["conv_alpha"] = f"{alpha:g}"
        t = totals(self.reports)
        if self.kept:  # kohya's networks.lora reads no norm updates; LyCORIS's network does
            args.update({"algo": "lora", "train_norm": "True"})
        meta.update({
            "ss_network_module": "lycoris.kohya" if self.kept else "networks.lora",
            "ss_network_dim": str(max((f.rank for f in linear), default=0)),
            "ss_network_alpha": f"{alpha:g}",
            "ss_network_args": json.dumps(args),
            "lorakit_version": lorakit.__version__,
            "lorakit_tool": self.tool,
            "lorakit_retained_energy": f"{t.energy:.6f}",
            "lorakit_max_fro_error": f"{t.max_fro_error:.3e}",
        })
        if "ss_base_model_version" not in meta:  # a source that does not say: the widths tell SD2.x from SD1.x
            family = "sd2" if guess_base_model(AdapterFile(self.tensors, {})) == "sd2" else "sd1"
            meta.update(ss_metadata(**base_model_fields(family, "epsilon")))
        meta.update(extra)
        self.metadata = meta

    def write(self, out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *,
              overwrite: bool = False) -> Path:
        """Write atomically, never over an input, and over an existing file only with ``overwrite``."""
        check_output(out, inputs, overwrite=overwrite)
        if not self.tensors:  # a file with no module loads as nothing everywhere, and lorakit refuses to read it
            raise ToolError(f"{self.tool}: no module is left to write, so {out} is not written: every module came "
                            "out at rank 0 (its ΔW is zero, or the rank asked for its kind of layer is 0)")
        meta = dict(self.metadata)
        meta.update(model_hashes(self.tensors, meta))
        return write_adapter(out, self.tensors, meta, overwrite=overwrite)

    def table(self) -> str:
        return report_table(self.reports)

    def summary(self, top: int = 10) -> str:
        """The ``top`` modules with the largest error, then totals and notes (the whole table: ``table()``)."""
        worst = sorted(self.reports, key=lambda r: r.fro_error, reverse=True)[:top]
        lines = []
        if worst:
            lines.append(f"{min(top, len(self.reports))} of {len(self.reports)} modules, largest error first:")
            lines.append(report_table(worst))
        lines.append(f"{self.tool}: " + totals_line(self.reports))
        lines.extend(self.notes)
        return "\n".join(lines)


def write_report(result: ToolResult, path: str | os.PathLike) -> Path:
    """The whole per-module table and the totals as a text file (atomic)."""
    text = result.table() + "\n\n" + totals_line(result.reports) + "\n" + "".join(n + "\n" for n in result.notes)
    return atomic_write_text(path, text)


