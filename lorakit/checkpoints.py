"""The output folder of a training run, and its per-epoch checkpoints.

Layout::

    OUT/config.toml                      the configuration used (written first)
    OUT/checkpoints/epoch-0003/          one folder per saved epoch, complete or absent:
        trained.safetensors              the trained tensors (adapter / embeddings / native weights)
        state.pt                         optimizer, lr schedule, step counters, monitor (torch.load weights_only)
    OUT/checkpoints/step-00000500/       the same, saved every N steps (training.save_every_n_steps)
    OUT/samples/epoch-0003.png           sample grids
    OUT/<name>.safetensors               the final result (+ <name>-<token>.safetensors for textual inversion)
    OUT/summary.json, OUT/summary.txt    what happened
    OUT/log.jsonl                        loss, lr and CS per step
    OUT/logs/                            the same as TensorBoard scalars (output.log_with = "tensorboard")

A checkpoint folder is written under a temporary name and renamed when complete, so an interrupted save
leaves the previous checkpoint intact and a half-written one is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorakit.atomic import atomic_write_text, file_in_the_way
from lorakit.checkpoint_names import EPOCH_DIR, RUN_CLASS_FOLDER, STEP_DIR, epoch_dir_name, step_dir_name
from lorakit.errors import LorakitError
from lorakit.run_manifest import MANIFEST_NAME, RunManifest, enclosing_run


class OutputFolderError(LorakitError, ValueError):
    """The output folder holds another run and the configuration does not say what to do with it."""


class RunWriteError(LorakitError, OSError):
    """A file of the run could not be written (a full disk, a file-size limit, permissions)."""


def _write_error(path: Path, err: OSError) -> RunWriteError:
    return RunWriteError(f"cannot write {path} ({err.strerror or err}); is the disk full? The run's last checkpoint "
                         "is intact: free some space and continue with --resume")


class CheckpointSaveError(LorakitError, OSError):
    """A checkpoint could not be written (a full disk, a file-size limit); the earlier ones are intact."""


@dataclass
class Checkpoint:
    """A saved state of the run: of an epoch (``epoch-NNNN/``) or of a step (``step-NNNNNNNN/``)."""

    #: epochs completed (1-based: epoch-0001 is the state after the first epoch); None for a step checkpoint
    epoch: int | None
    path: Path
    #: a step checkpoint's step (from its name); None for an epoch checkpoint
    saved_step: int | None = None

    def step(self) -> int:
        """The optimizer steps trained when it was saved: a step checkpoint's name, an epoch checkpoint's metadata
        (``ss_steps``, a header read), else its state (checkpoints of runs older than the metadata)."""
        if self.saved_step is not None:
            return self.saved_step
        with safe_open(str(self.tensors_path), "pt") as f:
            steps = (f.metadata() or {}).get("ss_steps")
        return int(steps) if steps is not None and steps.isdigit() else int(self.load_state()["step"])

    @property
    def tensors_path(self) -> Path:
        return self.path / "trained.safetensors"

    def load_tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.tensors_path))

    def load_state(self) -> dict[str, Any]:
        return torch.load(self.path / "state.pt", map_location="cpu", weights_only=True)


# what a run writes at the top of its folder (besides <name>.safetensors and <name>-<token>.safetensors)
RUN_NAMES = ("config.toml", "log.jsonl", "summary.json", "summary.txt", "cs_history.json", "cs_fluctuation.png",
             "checkpoints", "samples", RUN_CLASS_FOLDER, "latent_cache", "logs")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


class FolderLock:
    """An exclusive lock on a run folder (``flock`` on the folder itself: no file is left behind, and the kernel
    lets it go when the process ends, also on ``kill -9``).  Two runs writing one folder would interleave their
    checkpoints and log lines, and an ``--overwrite`` would delete a running run's files."""

    #: what a refusal says after the folder's name
    IN_USE = ("is in use by another lorakit run (still training, or resuming in another terminal): wait for it to "
              "end, or choose another output folder")

    def __init__(self, folder: Path, in_use: str = IN_USE) -> None:
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the folder is not locked there
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputFolderError(f"{folder} {in_use}") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


@contextmanager
def folder_for_call(folder: Path, option: str = "--out") -> Iterator[Path]:
    """``folder`` made (with its parents) for one command's output before the work, so a place that cannot hold it
    is said before images are made for nothing; removed again when the call wrote nothing into it (an error or
    Ctrl-C before its first file)."""
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"{option} {folder}: cannot be made there ({err.strerror or err}); choose another "
                                "folder") from None
    try:
        yield folder
    finally:
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def check_run_folder(directory: str | Path, if_exists: str = "error", protect: Iterable[str | Path] = (),
                     name: str = "lorakit") -> str:
    """What ``RunFolder`` will do with ``directory``, decided without touching it: "new" (absent or empty),
    "resume" or "overwrite"; raises ``OutputFolderError`` with the refusals it would give (``--dry-run`` says them
    before a run is started)."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{path} is a file, not a folder: choose another output folder")
    if (blocking := file_in_the_way(path)) is not None:
        raise OutputFolderError(f"{path}: {blocking} is a file, not a folder, so the run cannot be written inside it: "
                                "choose another output folder")
    for item in protect if if_exists != "resume" else ():  # among the images, the next run reads a run as data
        data = Path(item).expanduser() if item else None
        if data is not None and data.is_dir() and _inside(path, data):
            where = "is the folder" if path.resolve() == data.resolve() else f"is inside {item}, the folder"
            raise OutputFolderError(f"{path} {where} this run reads its images from: choose an output folder outside "
                                    "your data (e.g. --out output/run1)")
    if not (path.exists() and any(path.iterdir())):
        return "new"
    if if_exists == "error":
        raise OutputFolderError(
            f"{path} already holds files (a previous run?). Choose another output folder, "
            "or continue that run (--resume; in a config, output.if_exists = \"resume\"), or replace it "
            "(--overwrite; \"overwrite\")")
    if if_exists == "resume":
        if not ((path / "config.toml").exists() or RunManifest.exists_in(path)):
            holder = enclosing_run(path)
            raise OutputFolderError(f"{path} is not a lorakit run folder (no config.toml): nothing to resume there; "
                                    + (f"it is inside the run {holder}: --out {holder}" if holder else "check --out"))
        return "resume"
    for item in protect:
        if item and _inside(Path(item).expanduser(), path):
            raise OutputFolderError(
                f"{path} holds {item}, which this run reads: refusing to overwrite the folder. "
                "Choose an output folder outside your data and config (e.g. --out output/run1)")
    if not RunManifest.exists_in(path):
        if (path / "config.toml").exists():
            raise OutputFolderError(
                f"{path} has no {MANIFEST_NAME} (a run of an older lorakit, or not a run folder), so "
                "lorakit cannot tell its own files from yours: refusing to overwrite it. Delete the old run's "
                "files yourself, or choose another output folder")
        raise OutputFolderError(f"{path} is not a lorakit run folder (no config.toml, no {MANIFEST_NAME}): "
                                "refusing to overwrite it")
    clash = foreign_run_names(path, name)  # before deleting anything: a refusal must leave the folder as it was
    if clash:
        raise OutputFolderError(
            f"{path}: {', '.join(str(p) for p in clash)} were not written by lorakit and have names this run "
            "writes: move them, or choose another output folder (nothing was deleted)")
    return "overwrite"


def foreign_run_names(path: Path, name: str) -> list[Path]:
    """Paths at names a run writes that the manifest does not list (the user's files; never replaced)."""
    manifest = RunManifest(path) if RunManifest.exists_in(path) else None
    found = [path / n for n in RUN_NAMES if (path / n).exists() or (path / n).is_symlink()]
    found += [p for p in path.glob(f"{name}*.safetensors")
              if p.name == f"{name}.safetensors" or p.name.startswith(f"{name}-")]
    if (path / name).is_dir():  # a native run's diffusers folder (output.format = "diffusers")
        found.append(path / name)
    return sorted(p for p in found if manifest is None or not manifest.owns(p) or p.is_symlink())


class RunFolder:
    """Creates or reopens the output folder according to ``if_exists`` ("error", "resume", "overwrite").

    Every file and folder the run writes is recorded in the folder's manifest (``lorakit.run_manifest``) before
    it is written, and "overwrite" deletes only what the manifest lists.  ``protect``: paths the run reads (the
    training data, regularization images, the config file); "overwrite" refuses a folder that holds one of them.
    ``name``: the result's file name (``<name>.safetensors``), a name the run will write.
    """

    def __init__(self, directory: str | Path, if_exists: str = "error", protect: Iterable[str | Path] = (),
                 name: str = "lorakit", lock: bool = False) -> None:
        self.path = Path(directory)
        self.resuming = False
        self.name = name
        self._lock: FolderLock | None = None
        if self.path.exists() and not self.path.is_dir():
            raise OutputFolderError(f"{self.path} is a file, not a folder: choose another output folder")
        if lock and self.path.is_dir():  # before looking inside: another run may be writing (or overwriting) it
            self._lock = FolderLock(self.path)
        try:
            outcome = check_run_folder(self.path, if_exists, protect, name)
            if outcome == "overwrite":  # delete the files the previous run wrote, and nothing else
                kept = RunManifest(self.path).remove_all()
                if kept:
                    print(f"overwrite: kept {', '.join(str(p) for p in kept)} (they hold files that are not "
                          "lorakit's)")
            self.resuming = outcome == "resume"
            self.created = not self.path.exists()  # made by this run: a failed start may remove it again
            self.path.mkdir(parents=True, exist_ok=True)
            if lock and self._lock is None:
                self._lock = FolderLock(self.path)
            self.manifest = RunManifest(self.path)
            self._pending_log: list[str] = []  # lines log.jsonl could not take yet
            for sub in ("checkpoints", "samples"):
                self.make_dir(sub)
        except BaseException:  # a refusal (a folder that holds files, ...) lets go of the lock
            self.release()
            raise

    def release(self) -> None:
        """Let another process use the folder (the lock also ends with the process, however it ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------------------------ recorded writing
    def file(self, relative: str | Path) -> Path:
        """The path of a file the run is about to write (``relative`` to the run folder), recorded first."""
        return self.manifest.add_file(self.path / relative)

    def make_dir(self, relative: str | Path) -> Path:
        return self.manifest.make_dir(self.path / relative)

    def record(self, paths: Iterable[Path]) -> None:
        """Record files already written (by code that chose their names itself)."""
        self.manifest.add_files(paths)

    def record_folder(self, folder: Path) -> None:
        """Record a folder written whole (by code that chose its name) and everything in it."""
        self.manifest.add_dirs([folder])
        self.record_tree(folder.relative_to(self.path))

    def record_tree(self, relative: str | Path) -> None:
        """Record every file under a folder the run created (class images, a latent cache)."""
        folder = self.path / relative
        if folder.is_dir() and self.manifest.owns(folder):
            self.manifest.add_files(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
            self.manifest.add_dirs(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())
            self.manifest.add_links(p for p in folder.rglob("*") if p.is_symlink())  # W&B's latest-run

    def write_text(self, relative: str, text: str) -> Path:
        path = self.file(relative)
        try:
            return atomic_write_text(path, text)
        except OSError as err:
            raise _write_error(path, err) from None

    def write_json(self, relative: str, data: Any) -> Path:
        return self.write_text(relative, json.dumps(data, indent=2, default=str) + "\n")

    # ----------------------------------------------------------------------------------------- checkpoints
    def _complete_dirs(self, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        found = []
        for child in (self.path / "checkpoints").iterdir():
            m = pattern.match(child.name)
            if m and (child / "state.pt").exists() and (child / "trained.safetensors").exists():
                found.append((int(m.group(1)), child))
        return sorted(found)

    def checkpoints(self) -> list[Checkpoint]:
        """The epoch checkpoints, oldest first (what evaluation, early stopping and pruning choose among)."""
        return [Checkpoint(epoch, path) for epoch, path in self._complete_dirs(EPOCH_DIR)]

    def step_checkpoints(self) -> list[Checkpoint]:
        """The step checkpoints (``training.save_every_n_steps``), oldest first."""
        return [Checkpoint(None, path, saved_step=step) for step, path in self._complete_dirs(STEP_DIR)]

    def latest_checkpoint(self) -> Checkpoint | None:
        """The checkpoint a resume continues from: the one saved after the most steps (an epoch's end and a step
        checkpoint at the same step hold the same state; the epoch's is taken)."""
        epochs, steps = self.checkpoints(), self.step_checkpoints()
        if not steps:
            return epochs[-1] if epochs else None
        if not epochs or steps[-1].step() > epochs[-1].step():
            return steps[-1]
        return epochs[-1]

    def checkpoint(self, epoch: int) -> Checkpoint | None:
        for c in self.checkpoints():
            if c.epoch == epoch:
                return c
        return None

    def save_checkpoint(self, epoch: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                        metadata: dict[str, str] | None = None, step: int | None = None) -> Checkpoint:
        """Write the checkpoint of ``epoch`` (or, given ``step``, the step checkpoint ``step-NNNNNNNN``) into a
        ``.tmp`` folder and rename it when complete; a failed write (a full disk) raises CheckpointSaveError and
        leaves the earlier checkpoints as they were."""
        final = self.path / "checkpoints" / (epoch_dir_name(epoch) if step is None else step_dir_name(step))
        tmp = final.with_name(final.name + ".tmp")
        self._remove_checkpoint_dir(tmp)
        inside = tmp.relative_to(self.path)  # file() and make_dir() take paths inside the run folder
        try:
            self.make_dir(inside)
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      str(self.file(inside / "trained.safetensors")), metadata=metadata)
            torch.save(state, self.file(inside / "state.pt"))
            # safetensors makes its file 0600 whatever the umask; an epoch's adapter is a file users hand on too
            os.chmod(tmp / "trained.safetensors", stat.S_IMODE((tmp / "state.pt").stat().st_mode))
        except (OSError, RuntimeError, SafetensorError) as err:
            self._remove_checkpoint_dir(tmp)
            last = self.latest_checkpoint()
            kept = f"the last complete checkpoint is {last.path}" if last else "no checkpoint had been saved yet"
            raise CheckpointSaveError(
                f"could not save the checkpoint of {'epoch' if step is None else 'step'} "
                f"{epoch if step is None else step} in {final} ({type(err).__name__}: {err}). "
                f"Is the disk full? Training stopped; {kept}. Free some space and continue with --resume") from None
        self._remove_checkpoint_dir(final)
        os.replace(tmp, final)
        self.manifest.add_dirs([final])
        self.record([final / "trained.safetensors", final / "state.pt"])
        self.manifest.remove_under(tmp.relative_to(self.path).as_posix())  # gone: only forgets the entries
        return Checkpoint(epoch, final) if step is None else Checkpoint(None, final, saved_step=step)

    def _remove_checkpoint_dir(self, folder: Path) -> None:
        """Delete a checkpoint folder lorakit wrote; a file in it that is not lorakit's stops the deletion."""
        if not folder.exists():
            return
        self.manifest.remove_under(folder.relative_to(self.path).as_posix())
        if folder.exists() and not folder.is_symlink():  # a run of an older lorakit: its two known files
            for name in ("trained.safetensors", "state.pt"):
                (folder / name).unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                raise OutputFolderError(f"{folder} holds files lorakit did not write "
                                        f"({', '.join(p.name for p in folder.iterdir())}): move them") from None

    def prune_checkpoints(self, keep: set[int]) -> None:
        """Delete checkpoints of epochs not in ``keep`` (native fine-tuning checkpoints are large)."""
        for c in self.checkpoints():
            if c.epoch not in keep:
                self._remove_checkpoint_dir(c.path)

    def prune_step_checkpoints(self, first_kept_step: int) -> None:
        """Delete the step checkpoints saved before ``first_kept_step`` (kohya's save_last_n_steps)."""
        for c in self.step_checkpoints():
            if c.step() < first_kept_step:
                self._remove_checkpoint_dir(c.path)

    # --------------------------------------------------------------------------------------------- files
    def sample_path(self, label: str) -> Path:
        return self.file(Path("samples") / f"{label}.png")

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to log.jsonl.  A line that cannot be written (a full disk) is kept in memory and
        written with the next one: a step never fails on its log line, since in a multi-process run the other
        processes would wait for this one until they time out.  ``flush_log`` raises if it still cannot be
        written; the trainer calls it with the epoch's checkpoint, where every process fails together."""
        self._pending_log.append(json.dumps(record) + "\n")
        try:
            self._write_pending_log()
        except OSError as err:
            if len(self._pending_log) == 1:  # say it once per failure, not once per step
                print(f"warning: cannot write {self.path / 'log.jsonl'} ({err.strerror or err}); its lines are "
                      "kept in memory and written when there is space", file=sys.stderr)

    def flush_log(self) -> None:
        """Write the log lines kept in memory; ``RunWriteError`` if they still cannot be written."""
        try:
            self._write_pending_log()
        except OSError as err:
            raise _write_error(self.path / "log.jsonl", err) from None

    def _write_pending_log(self) -> None:
        if not self._pending_log:
            return
        path = self.file("log.jsonl")
        size = path.stat().st_size if path.exists() else 0
        try:
            with path.open("a", encoding="utf-8") as f:
                f.write("".join(self._pending_log))
        except OSError:
            try:  # a write cut off mid-line would corrupt the line after it: back to the last whole line
                os.truncate(path, size)
            except OSError:
                pass  # read_log skips a cut-off last line
            raise
        self._pending_log.clear()

    def read_log(self) -> list[dict[str, Any]]:
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):  # the last line, cut off by a crash or a full disk mid-write
                    break
                raise OutputFolderError(f"{path}: line {number} is not JSON ({line[:60]!r}); the file was edited "
                                        "or damaged, move it away to continue the run") from None
        return records

    def truncate_log(self, max_step: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (they will be run again; -1: all of them, the
        sample stop's score of the base model at step 0 too)."""
        if not (self.path / "log.jsonl").exists():
            return
        records = [r for r in self.read_log() if r.get("step", 0) <= max_step]
        self.write_text("log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
