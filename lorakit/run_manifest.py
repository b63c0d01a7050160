"""The list of files and folders a run wrote into its output folder, so that replacing a run deletes only those.

An output folder may also hold what the user put there (their images, notes, the config file, even the training
data); ``--overwrite`` must never touch any of it.  So every path lorakit writes is recorded here *before* it is
written (a crash after the write can then never leave an unrecorded lorakit file), and the manifest itself is
rewritten atomically after every change.  Paths are kept relative to the run folder; removing them never
follows a symbolic link and never leaves the folder, whatever the manifest says.  The symbolic links a writer made
itself (W&B's ``latest-run``, its debug logs) are recorded as links: removing one unlinks the link, never what it
points to.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

from lorakit.atomic import atomic_write_json
from lorakit.errors import LorakitError

MANIFEST_NAME = "lorakit-manifest.json"
_FORMAT = 1


class ManifestError(LorakitError):
    """The manifest cannot be read, or names a path outside its run folder."""


def _atomic_leftovers(path: Path) -> list[Path]:
    """Temporary files ``lorakit.atomic`` made beside ``path`` (``.NAME.<8 random>SUFFIX``) and never renamed."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}(\.[A-Za-z0-9]+)?$")
    return [p for p in path.parent.iterdir() if pattern.match(p.name) and p.is_file() and not p.is_symlink()]


class RunManifest:
    """The files and folders lorakit created in ``folder`` (a run's output folder)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        self.links: set[str] = set()  # symbolic links lorakit's writers made (never followed)
        if self.path.is_file():
            self._read()

    @classmethod
    def exists_in(cls, folder: str | os.PathLike) -> bool:
        return (Path(folder) / MANIFEST_NAME).is_file()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            files, dirs = data["files"], data["dirs"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"{self.path}: cannot read the list of files lorakit wrote ({err}); nothing was "
                                "deleted. Remove the run's files yourself, or choose another output folder") from None
        self.files = {self._checked(p) for p in files}
        self.dirs = {self._checked(p) for p in dirs}
        self.links = {self._checked(p) for p in data.get("links", [])}  # absent before links were recorded

    def _checked(self, relative: str) -> str:
        p = PurePosixPath(relative)
        if p.is_absolute() or not p.parts or ".." in p.parts or str(p) == ".":
            raise ManifestError(f"{self.path}: names {relative!r}, which is not inside the run folder; "
                                "nothing was deleted")
        return str(p)

    def _relative(self, path: str | os.PathLike) -> str:
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.folder))
        except ValueError:
            raise ManifestError(f"{path} is not inside the run folder {self.folder}") from None
        return self._checked(rel.as_posix())

    def save(self) -> None:
        atomic_write_json(self.path, {"lorakit_manifest": _FORMAT, "files": sorted(self.files),
                                      "dirs": sorted(self.dirs), "links": sorted(self.links)})

    # ------------------------------------------------------------------------------------------ recording
    def owns(self, path: str | os.PathLike) -> bool:
        rel = self._relative(path)
        return rel in self.files or rel in self.dirs or rel in self.links

    def add_file(self, path: str | os.PathLike) -> Path:
        """Record ``path`` (call before writing it); returns it, so ``write(manifest.add_file(p))`` reads well."""
        rel = self._relative(path)
        if rel not in self.files:
            self.files.add(rel)
            self.save()
        return Path(path)

    def add_files(self, paths) -> None:
        rels = {self._relative(p) for p in paths} - self.files
        if rels:
            self.files |= rels
            self.save()

    def add_dirs(self, paths) -> None:
        """Record folders lorakit made (inside a folder it created), e.g. by a writer that chose their names."""
        rels = {self._relative(p) for p in paths} - self.dirs
        if rels:
            self.dirs |= rels
            self.save()

    def add_links(self, paths) -> None:
        """Record symbolic links a writer made inside a folder lorakit created (the links, not their targets)."""
        rels = {self._relative(p) for p in paths} - self.links
        if rels:
            self.links |= rels
            self.save()

    def make_dir(self, path: str | os.PathLike) -> Path:
        """Create ``path`` (and the parents inside the run folder) and record each folder that was created."""
        path = Path(path)
        missing = []
        p = path
        while not p.exists() and p != self.folder and self.folder in p.parents:
            missing.append(p)
            p = p.parent
        new = {self._relative(m) for m in missing} - self.dirs
        if new:
            self.dirs |= new
            self.save()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def forget(self, path: str | os.PathLike) -> None:
        rel = self._relative(path)
        if rel in self.files or rel in self.dirs or rel in self.links:
            self.files.discard(rel)
            self.dirs.discard(rel)
            self.links.discard(rel)
            self.save()

    # ------------------------------------------------------------------------------------------- removing
    def _safe(self, rel: str) -> Path | None:
        """The path of ``rel`` if no component below the run folder is a symbolic link (else None: leave it)."""
        p = self.folder
        for part in PurePosixPath(rel).parts:
            p = p / part
            if p.is_symlink():
                return None
        return p

    def remove_under(self, rel_prefix: str) -> list[Path]:
        """Delete the recorded files under ``rel_prefix`` (a file or a folder), then the recorded folders there
        that are left empty.  Returns what was kept because it is not lorakit's (folders with other files)."""
        prefix = self._checked(rel_prefix) if rel_prefix else ""

        def inside(rel: str) -> bool:
            return not prefix or rel == prefix or rel.startswith(prefix + "/")

        for rel in sorted(r for r in self.files if inside(r)):
            path = self._safe(rel)
            if path is None:
                continue
            if path.is_file() or not path.exists():
                path.unlink(missing_ok=True)
                self.files.discard(rel)
            for tmp in _atomic_leftovers(path):  # temporary files of a write that was killed
                tmp.unlink(missing_ok=True)
        for rel in sorted(r for r in self.links if inside(r)):
            parent = self._safe(str(PurePosixPath(rel).parent)) if "/" in rel else self.folder
            link = None if parent is None else parent / PurePosixPath(rel).name
            if link is not None and link.is_symlink():
                link.unlink()  # the link only: its target is never touched
            if link is None or not link.exists():  # else a file or folder now stands there: not ours, kept
                self.links.discard(rel)
        kept = []
        for rel in sorted((r for r in self.dirs if inside(r)), key=lambda r: -len(PurePosixPath(r).parts)):
            path = self._safe(rel)
            if path is None or not path.exists():
                self.dirs.discard(rel)
                continue
            try:
                path.rmdir()
                self.dirs.discard(rel)
            except OSError:  # not empty: something that is not lorakit's is inside
                kept.append(path)
        return kept

    def remove_all(self) -> list[Path]:
        """Delete everything recorded (and then the manifest); returns the folders kept for holding other files."""
        kept = self.remove_under("")
        if self.files or self.dirs or self.links:
            self.save()
        else:
            self.path.unlink(missing_ok=True)
        return kept


def is_lorakit_run(folder: str | os.PathLike) -> bool:
    """A folder a lorakit run wrote: its config.toml and its manifest (a user's project folder may hold a
    config.toml of its own beside the data; only a run has both)."""
    return (Path(folder) / "config.toml").is_file() and RunManifest.exists_in(folder)


def enclosing_run(path: str | os.PathLike) -> Path | None:
    """The run folder that holds ``path``, for a message to a user who gave a file or folder of a run where the
    run itself was wanted; None when no folder above it is a run."""
    return next((folder for folder in Path(path).parents if is_lorakit_run(folder)), None)
