"""The one atomic-write helper: complete files or none, and no clobbering when asked not to."""

import pytest

from lorakit.atomic import DestinationExistsError, atomic_path, atomic_write_json, atomic_write_text


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
