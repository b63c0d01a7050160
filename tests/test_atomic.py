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
