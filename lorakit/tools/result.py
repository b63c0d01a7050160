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
from lorakit.formats import AdapterFile, describe_modules, model_hashes, write_adapter
from lorakit.tools import check_output
from lorakit.tools.lowrank import Factors, ModuleReport, lora_tensors, report_table, totals, totals_line

# ss_* entries a derived file keeps from its source: how it was trained still describes it
_KEEP_FROM_SOURCE = ("ss_base_model_version", "ss_v2", "ss_sd_model_name", "ss_tag_frequency", "ss_dataset_dirs",
                     "ss_output_name", "ss_training_comment", "ss_resolution", "ss_clip_skip")


@dataclass
class ToolResult:
    """A plain LoRA/LoCon adapter in memory (kohya names), with a report per module."""

    tool: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    reports: list[ModuleReport] = field(default_factory=list)
    #: things the report should say besides the table (skipped modules, bias updates left out, ...)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, factors: Factors, alpha: float | None = None,
            dtype: torch.dtype = torch.float32) -> None:
        """Add one module (a rank-0 factorisation, i.e. ``ΔW = 0``, writes no key)."""
        factors.report.name = name
        self.reports.append(factors.report)
        if factors.rank == 0:
            return
        for key, tensor in lora_tensors(factors, alpha, dtype).items():
            self.tensors[f"{name}.{key}"] = tensor

    def add_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], report: ModuleReport) -> None:
        self.reports.append(report)
        for key, tensor in tensors.items():
            self.tensors[f"{name}.{key}"] = tensor

    def as_file(self) -> AdapterFile:
        return AdapterFile(dict(self.tensors), dict(self.metadata))

    def finish_metadata(self, source: Mapping[str, str] | None = None, **extra: str) -> None:
        """kohya's ``ss_*`` network entries for the tensors (as ``networks.lora`` writes them) and ``lorakit_*``."""
        meta = {k: v for k, v in (source or {}).items() if k in _KEEP_FROM_SOURCE}
        infos = describe_modules(self.as_file())
        linear = [i for i in infos if len(self.tensors[f"{i.name}.lora_down.weight"].shape) != 4
                  or self.tensors[f"{i.name}.lora_down.weight"].shape[-1] == 1]
        conv = [i for i in infos if i not in linear]
        args: dict[str, str] = {}
        if conv:
            args["conv_dim"] = str(max(i.rank or 0 for i in conv))
            args["conv_alpha"] = f"{_most_common(i.alpha for i in conv):g}"
        t = totals(self.reports)
        meta.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(max((i.rank or 0 for i in linear), default=0)),
            "ss_network_alpha": f"{_most_common(i.alpha for i in linear) or 1.0:g}",
            "ss_network_args": json.dumps(args),
            "lorakit_version": lorakit.__version__,
            "lorakit_tool": self.tool,
            "lorakit_retained_energy": f"{t.energy:.6f}",
            "lorakit_max_fro_error": f"{t.max_fro_error:.3e}",
        })
        meta.setdefault("ss_base_model_version", "sd_v1")
        meta.update(extra)
        self.metadata = meta

    def write(self, out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *,
              overwrite: bool = False) -> Path:
        """Write atomically, never over an input, and over an existing file only with ``overwrite``."""
        check_output(out, inputs, overwrite=overwrite)
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


def _most_common(values: Iterable[float | None]) -> float | None:
    counts: dict[float, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.get) if counts else None
