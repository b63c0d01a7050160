"""The text files a user writes are read the same way everywhere: a UTF-8 byte-order mark (Windows Notepad writes
one) is no error, and a file in another encoding is refused naming it (the training config and the sample prompts
were UnicodeDecodeError tracebacks; a BOM made tomllib say "Invalid statement at line 1")."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.commands.kohya_config import read_kohya_file
from lorakit.config import load_config
from lorakit.data.config import read_dataset_toml
from lorakit.errors import LorakitError
from lorakit.evaluate.prompts import load_prompt_set
from lorakit.lycoris_preset import read_preset
from lorakit.sample import load_prompts
from lorakit.trackers import read_tracker_settings

BOM = b"\xef\xbb\xbf"

# (file name, its text, a reader returning something the text decides)
READERS = [
    ("config.toml", "[network]\nrank = 6\n", lambda p: load_config(p).network.rank),
    ("prompts.txt", "a café star --s 3\n", lambda p: [(x.prompt, x.steps) for x in load_prompts(p)]),
    ("kohya.toml", "network_dim = 12\n", lambda p: read_kohya_file(p)["network_dim"]),
    ("dataset.toml", "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'img'\n",
     lambda p: [s.image_dir for d in read_dataset_toml(p, {}) for s in d.subsets]),
    ("eval.toml", 'concept = "zkz"\ntrigger = "zkz"\n[[prompts]]\ntype = "train"\ntext = "a café {trigger}"\n',
     lambda p: [x.text for x in load_prompt_set(p).prompts]),
    ("preset.toml", 'enable_conv = false\nunet_target_module = ["Transformer2DModel"]\n',
     lambda p: (read_preset(p).unet, read_preset(p).text_encoder)),
    ("trackers.toml", '[tensorboard]\nflush_secs = 5\n', lambda p: read_tracker_settings(p, "tensorboard")),
]


@pytest.mark.parametrize(("name", "text", "read"), READERS, ids=[r[0] for r in READERS])
def test_a_bom_is_read_as_nothing_and_another_encoding_is_refused_by_name(tmp_path, name, text, read):
    plain, marked = tmp_path / name, tmp_path / f"bom-{name}"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(BOM + text.encode("utf-8"))
    assert read(marked) == read(plain)
    if "é" not in text:  # an encoding only tells where there is a byte above 127
        text = "# café\n" + text
    latin = tmp_path / f"latin-{name}"
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(LorakitError, match=f"{latin}: .*(not UTF-8 text|utf-8)"):
        read(latin)


def test_the_commands_say_it_in_one_line(tmp_path, capsys):
    config, prompts = tmp_path / "config.toml", tmp_path / "prompts.txt"
    config.write_bytes("# café\n[network]\nrank = 4\n".encode("latin-1"))
    prompts.write_bytes("a café star\n".encode("latin-1"))
    assert main(["train", str(config), "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"lorakit train: error: {config}: not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8"
    assert main(["sample", "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"lorakit sample: error: {prompts}: not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8"
    assert not (tmp_path / "out").exists()


def test_a_caption_in_another_encoding_is_said_the_same_way(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "data" / "1_zkz star"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "white").save(folder / "a.png")
    (folder / "a.txt").write_bytes("a star\nun café".encode("latin-1"))  # was: Python's own "position 10" words
    assert main(["train", "--data", str(tmp_path / "data"), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lorakit train: error: {folder / 'a.txt'}: caption file is not UTF-8 text (byte 0xe9 on line 2); save it "
        "as UTF-8")
