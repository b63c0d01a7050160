"""The one atomic-write helper: complete files or none, and no clobbering when asked not to."""

import pytest

from lorakit.atomic import DestinationExistsError, atomic_path, atomic_write, atomic_write_json, atomic_write_text


def test_write_replaces_only_when_complete(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temp file left behind


def test_no_overwrite_refuses_existing_file(tmp_path):
    target = tmp_path / "b.json"
    atomic_write_json(target, {"x": 1})
    with pytest.raises(DestinationExistsError):
        atomic_write_json(target, {"x": 2}, overwrite=False)
    assert target.read_text().strip().endswith("}") and '"x": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_suffix_is_kept_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "c.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "c.png").read_bytes() == b"x"


def test_a_writer_reporting_a_full_disk_in_its_own_words_raises_oserror(tmp_path):
    """safetensors' Rust writer says "... (os error 28)" in its own exception type: it becomes an OSError naming
    the file (the CLI says it in one line), and the temporary file goes; any other failure is left as it is."""
    import errno

    class WriterError(Exception):
        pass

    def full(tmp):
        tmp.write_bytes(b"half")
        raise WriterError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "x.safetensors", full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.safetensors")
    assert isinstance(info.value.__cause__, WriterError) and list(tmp_path.iterdir()) == []

    def broken(tmp):
        raise WriterError("a bug (os error 5)")  # not a disk condition: unchanged

    with pytest.raises(WriterError):
        atomic_write(tmp_path / "y.safetensors", broken)


@pytest.fixture
def umask_022():
    import os

    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_files_and_folders_get_the_mode_the_umask_gives_not_owner_only(tmp_path, umask_022):
    """An adapter or model another user's service (ComfyUI, A1111 in a container) must read: 0644 under umask 022,
    as a plain open() gives; tempfile's 0600 stayed on every renamed file."""
    import os
    import stat

    from lorakit.atomic import new_temp_path

    written = atomic_write_text(tmp_path / "config.toml", "x = 1\n")
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    # safetensors' own writer makes its file 0600: the adapter handed to other tools gets the umask's mode too
    import torch
    from safetensors.torch import save_file

    adapter = atomic_write(tmp_path / "lorakit.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
    assert stat.S_IMODE(adapter.stat().st_mode) == 0o644
    folder = new_temp_path(tmp_path / "model", ".tmp", lambda candidate: candidate.mkdir())
    assert folder.name.startswith(".model.") and stat.S_IMODE(folder.stat().st_mode) == 0o755
    os.umask(0o077)  # a user who wants their files private still gets that
    assert stat.S_IMODE(atomic_write_text(tmp_path / "private.txt", "x").stat().st_mode) == 0o600


def test_ctrl_c_while_the_temporary_file_is_made_leaves_nothing_behind(tmp_path, monkeypatch):
    """A Ctrl-C that lands right after the temporary file exists but before its name is known (the worst moment)
    is raised once the name is known, and the file is removed; the target is untouched."""
    import os
    import signal

    import lorakit.atomic as atomic

    made = []

    def make_then_ctrl_c(candidate):
        os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        made.append(candidate)
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, delivered now

    atomic_write_text(tmp_path / "kept.txt", "old")
    monkeypatch.setattr(atomic, "_make_file", make_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a test worker may ignore SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_text(tmp_path / "kept.txt", "new")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert made and not made[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"] and (tmp_path / "kept.txt").read_text() == "old"


def test_a_place_that_cannot_be_written_is_said_of_the_file_asked_for_before_the_work(tmp_path):
    """``merge --out /proc/x.safetensors`` merged first, then said "/proc/.x.safetensors.1488b8a1.tmp: No such file
    or directory", a name the user never gave. /proc takes no new file, for root too (a read-only place here)."""
    import errno
    import sys

    from lorakit.atomic import cannot_write_beside
    from lorakit.tools import ToolError, check_output

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux's")
    with pytest.raises(OSError) as err:
        atomic_write_text("/proc/lorakit-x.txt", "x")
    assert err.value.filename == "/proc/lorakit-x.txt" and "cannot be written there" in err.value.strerror
    assert err.value.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS)
    with pytest.raises(ToolError, match=r"^/proc/sub/x.safetensors: cannot be written there \("):
        check_output("/proc/sub/x.safetensors", [], suffix=".safetensors")
    # a place that can be written: the probe leaves nothing behind, and folders still to make are fine
    assert cannot_write_beside(tmp_path / "new" / "deeper" / "x.safetensors") is None
    assert check_output(tmp_path / "x.safetensors", []) == tmp_path / "x.safetensors"
    assert list(tmp_path.iterdir()) == []


def test_a_folder_is_made_whole_or_not_at_all(tmp_path):
    """The built-in job rendered its images in place: stopped after a few files, the next run trained on those."""
    from lorakit.atomic import atomic_folder

    target = tmp_path / "zkz-data"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as rendering:
            (rendering / "000.png").write_bytes(b"one of fifteen")
            raise KeyboardInterrupt  # Ctrl-C while it renders
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden temporary one
    with atomic_folder(target) as rendering:
        assert rendering.parent == tmp_path and rendering.name.startswith(".zkz-data.")
        (rendering / "a" / "b.txt").parent.mkdir()
        (rendering / "a" / "b.txt").write_text("done")
    assert (target / "a" / "b.txt").read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["zkz-data"]
    with pytest.raises(OSError), atomic_folder(target) as rendering:  # a folder with files is never replaced
        (rendering / "other.txt").write_text("x")
    assert (target / "a" / "b.txt").read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["zkz-data"]
    # the same content, made by another process meanwhile (a grid's two runs rendering one dataset): kept, no error
    with atomic_folder(target, same_if_there=True) as rendering:
        (rendering / "other.txt").write_text("x")
    assert (target / "a" / "b.txt").read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["zkz-data"]
