"""The output folder of a training run, and its per-epoch checkpoints.

Layout::

    OUT/config.toml                      the configuration used (written first)
    OUT/checkpoints/epoch-0003/          one folder per saved epoch, complete or absent:
        trained.safetensors              the trained tensors (adapter / embeddings / native weights)
        state.pt                         optimizer, lr schedule, step counters, monitor (torch.load weights_only)
    OUT/samples/epoch-0003.png           sample grids
    OUT/<name>.safetensors               the final result (+ <name>-<token>.safetensors for textual inversion)
    OUT/summary.json, OUT/summary.txt    what happened
    OUT/log.jsonl                        loss, lr and CS per step

A checkpoint folder is written under a temporary name and renamed when complete, so an interrupted save
leaves the previous checkpoint intact and a half-written one is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorakit.atomic import atomic_write_text
from lorakit.errors import LorakitError

_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


class OutputFolderError(LorakitError, ValueError):
    """The output folder holds another run and the configuration does not say what to do with it."""


@dataclass
class Checkpoint:
    epoch: int  # epochs completed (1-based: epoch-0001 is the state after the first epoch)
    path: Path

    @property
    def tensors_path(self) -> Path:
        return self.path / "trained.safetensors"

    def load_tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.tensors_path))

    def load_state(self) -> dict[str, Any]:
        return torch.load(self.path / "state.pt", map_location="cpu", weights_only=True)


class RunFolder:
    """Creates or reopens the output folder according to ``if_exists`` ("error", "resume", "overwrite")."""

    def __init__(self, directory: str | Path, if_exists: str = "error") -> None:
        self.path = Path(directory)
        self.resuming = False
        if self.path.exists() and any(self.path.iterdir()):
            if if_exists == "error":
                raise OutputFolderError(
                    f"{self.path} already holds files (a previous run?). Choose another output folder, "
                    f"or set output.if_exists = \"resume\" to continue that run, or \"overwrite\" to replace it")
            if if_exists == "overwrite":
                if not (self.path / "config.toml").exists():
                    # only ever delete what is recognisably a lorakit run
                    raise OutputFolderError(f"{self.path} is not a lorakit run folder (no config.toml): "
                                            "refusing to overwrite it")
                shutil.rmtree(self.path)
            elif if_exists == "resume":
                self.resuming = True
        for sub in ("", "checkpoints", "samples"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[Checkpoint]:
        found = []
        for child in (self.path / "checkpoints").iterdir():
            m = _EPOCH_DIR.match(child.name)
            if m and (child / "state.pt").exists() and (child / "trained.safetensors").exists():
                found.append(Checkpoint(int(m.group(1)), child))
        return sorted(found, key=lambda c: c.epoch)

    def latest_checkpoint(self) -> Checkpoint | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint(self, epoch: int) -> Checkpoint | None:
        for c in self.checkpoints():
            if c.epoch == epoch:
                return c
        return None

    def save_checkpoint(self, epoch: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                        metadata: dict[str, str] | None = None) -> Checkpoint:
        final = self.path / "checkpoints" / f"epoch-{epoch:04d}"
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  str(tmp / "trained.safetensors"), metadata=metadata)
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return Checkpoint(epoch, final)

    def prune_checkpoints(self, keep: set[int]) -> None:
        """Delete checkpoints of epochs not in ``keep`` (native fine-tuning checkpoints are large)."""
        for c in self.checkpoints():
            if c.epoch not in keep:
                shutil.rmtree(c.path)

    # --------------------------------------------------------------------------------------------- files
    def sample_path(self, label: str) -> Path:
        return self.path / "samples" / f"{label}.png"

    def log(self, record: dict[str, Any]) -> None:
        with (self.path / "log.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_log(self, max_step: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (they will be run again)."""
        records = [r for r in self.read_log() if r.get("step", 0) <= max_step]
        atomic_write_text(self.path / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
