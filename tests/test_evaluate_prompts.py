"""lorakit.evaluate.prompts: the three prompt-file formats, their errors (naming file and line), the world's
prompts as a TOML prompt file, and default prompts from a dataset's captions."""

import copy
import json
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.evaluate.prompts import (
    PROMPT_TYPES,
    EvalPrompt,
    PromptSetError,
    default_prompt_set,
    load_prompt_set,
)

ROOT = Path(__file__).resolve().parents[1]

def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_lists_tables_and_entries(tmp_path):
    path = _write(tmp_path, "p.toml", '''
concept = "teapot"
trigger = "sks teapot"
negative = "blurry"
train = ["a photo of {trigger} on a table", "{trigger}, close-up"]
agnostic = ["a photo of a cat"]

[style]
prompts = ["a watercolor painting of {trigger}"]
negative = "photo"
seed = 7

[[prompts]]
type = "alter"
text = "a blue {trigger}"
seed = 3
expected = { color = "blue" }
changes = ["color"]

[[prompts]]
type = "trigger"
text = "{trigger}"
''')
    s = load_prompt_set(path)
    assert (s.concept, s.trigger, s.source) == ("teapot", "sks teapot", str(path))
    by = s.by_type()
    assert list(by) == ["train", "trigger", "alter", "style", "agnostic"]  # PROMPT_TYPES order
    assert [p.text for p in by["train"]] == ["a photo of sks teapot on a table", "sks teapot, close-up"]
    assert by["train"][0].negative == "blurry" and by["train"][0].seed is None
    assert by["style"] == [EvalPrompt("a watercolor painting of sks teapot", "style", seed=7, negative="photo")]
    alter = by["alter"][0]
    assert (alter.text, alter.seed, dict(alter.expected), alter.changes) == ("a blue sks teapot", 3,
                                                                          {"color": "blue"}, ("color",))
    assert by["trigger"][0].text == "sks teapot"
    assert by["agnostic"][0].text == "a photo of a cat"


def test_trigger_argument_overrides_the_file(tmp_path):
    path = _write(tmp_path, "p.toml", 'trigger = "sks teapot"\ntrain = ["{trigger} on a table"]\n')
    s = load_prompt_set(path, trigger="ohwx mug")
    assert s.prompts[0].text == "ohwx mug on a table" and s.trigger == s.concept == "ohwx mug"


def test_plain_text_format(tmp_path):
    path = _write(tmp_path, "p.txt", """# a comment
trigger = sks dog

train: a photo of {trigger} in a garden --n lowres --d 42
trigger: {trigger}
agnostic: a photo of a cat
style: {trigger}, oil painting --d 5
""")
    s = load_prompt_set(path)
    assert s.trigger == "sks dog"
    assert s.prompts[0] == EvalPrompt("a photo of sks dog in a garden", "train", seed=42, negative="lowres")
    assert [p.type for p in s.prompts] == ["train", "trigger", "agnostic", "style"]
    assert s.prompts[3].seed == 5 and s.prompts[3].text == "sks dog, oil painting"


@pytest.mark.parametrize("name, text, message", [
    ("p.toml", 'trigger = "x"\ntrain = ["{trigger}"]\nmood = ["sad {trigger}"]\n',
     r"p.toml:3: unknown prompt type or setting 'mood'"),
    ("p.toml", 'trigger = "x"\n\n[[prompts]]\ntype = "moody"\ntext = "a sad {trigger}"\n',
     r"p.toml:5: \[\[prompts\]\] entry 1: unknown prompt type 'moody'"),
    ("p.txt", "trigger = x\ntrain: {trigger}\nmoody: a sad {trigger}\n",
     r"p.txt:3: prompt 2: unknown prompt type 'moody'"),
    ("p.txt", "train: a photo of {trigger}\n", r"p.txt:1: prompt 1: .*no trigger is given"),
    ("p.toml", 'train = ["{trigger} on a table"]\n', r"p.toml:1: \[train\] prompt 1: .*no trigger is given"),
    ("p.toml", "", r"p.toml: no prompts"),
    ("p.txt", "# only a comment\n\n", r"p.txt: no prompts"),
    ("p.toml", 'trigger = "x"\ntrain = ["{trigge} on a table"]\n', r"p.toml:2: .*unknown placeholder \{trigge\}"),
    ("p.toml", 'trigger = "x"\ntrain = [\n', r"p.toml: not valid TOML"),
    ("p.txt", "trigger = x\ntrain a photo\n", r"p.txt:2: expected 'type: prompt'"),
    ("p.txt", "trigger = x\ntrain: {trigger} --w 512\n", r"p.txt:2: option --w is a sampler setting"),
    ("p.toml", 'trigger = "x"\n[[prompts]]\ntype = "alter"\ntext = "a blue {trigger}"\nchanges = ["color"]\n',
     r"p.toml:4: .*changes \['color'\] but its expected attributes do not name them"),
    ("p.toml", 'trigger = "x"\n[[prompts]]\ntype = "train"\ntext = "{trigger}"\nseed = "one"\n',
     r"seed must be an integer"),
    ("p.toml", 'trigger = "x"\n[[prompts]]\ntype = "train"\ntext = "{trigger}"\nsteps = 20\n',
     r"unknown keys \['steps'\]"),
    ("p.json", '{"prompts": [{"type": "nope", "prompt": "a"}]}', r"p.json:1: prompt 1: unknown prompt type 'nope'"),
    ("p.json", '{"prompts": [', r"p.json:1: not valid JSON"),
    ("p.txt", "trigger = x\ntrain: {trigger}, <lora:x:0.8>\n",
     r"p.txt:2: prompt 1: <lora:x:0.8> is A1111's prompt syntax .*lorakit eval judges the checkpoints given as "
     r"its arguments \(x.safetensors\)"),
    ("p.toml", 'trigger = "x"\nnegative = "<lora:bad>"\ntrain = ["{trigger}"]\n', r"<lora:bad> is A1111's"),
])
def test_bad_files_name_the_file_line_and_problem(tmp_path, name, text, message):
    path = _write(tmp_path, name, text)
    with pytest.raises(PromptSetError, match=message) as info:
        load_prompt_set(path)
    assert str(path) in str(info.value)


def test_missing_file_and_error_type(tmp_path):
    with pytest.raises(PromptSetError, match="no such prompt file"):
        load_prompt_set(tmp_path / "nope.toml")
    assert issubclass(PromptSetError, LorakitError) and issubclass(PromptSetError, ValueError)


def test_prompts_are_hashable_read_only_and_serialisable():
    p = EvalPrompt("a blue x", "alter", seed=1, expected={"color": "blue"}, changes=["color"])
    assert p.changes == ("color",)
    assert hash(p) == hash(EvalPrompt("a blue x", "alter", seed=1, expected={"color": "blue"}, changes=("color",)))
    with pytest.raises(TypeError, match="read-only"):
        p.expected["color"] = "red"
    assert json.loads(json.dumps(asdict(p)))["expected"] == {"color": "blue"}
    assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p  # a pipeline may copy or pickle them
    with pytest.raises(PromptSetError, match="unknown prompt type"):
        EvalPrompt("x", "training")


# ------------------------------------------------------------------------------------------ the world's file
def _world_view(p):
    return (p.prompt if hasattr(p, "prompt") else p.text, p.type, p.seed, p.negative, dict(p.expected),
            tuple(p.changes))


def test_world_prompt_file_is_the_worlds_prompts():
    from lorakit.world.concept import TRIGGER, eval_prompts

    world = [_world_view(p) for p in eval_prompts()]
    toml = load_prompt_set(ROOT / "examples/zkz/eval_prompts.toml")
    assert (toml.concept, toml.trigger) == ("zkz", TRIGGER)
    assert [_world_view(p) for p in toml.prompts] == world
    # the world's own prompts.json reads into the same prompts
    assert load_prompt_set(ROOT / "examples/zkz/prompts.json").prompts == toml.prompts
    assert set(toml.by_type()) == set(PROMPT_TYPES)
    # the agnostic prompts really lack the trigger, the others carry it
    assert all((TRIGGER in p.text) == (p.type != "agnostic") for p in toml.prompts)


# --------------------------------------------------------------------------------------------- defaults
def test_default_prompt_set_from_captions():
    captions = [f"zkz shape, {c}, {s}" for c in ("red", "yellow", "blue") for s in ("large", "small", "tiny")]
    captions += ["zkz shape", "ZKZ SHAPE on a table", "zkz shape, red, large"]  # bare, other case, duplicate
    s = default_prompt_set(captions, "zkz shape", concept="zkz", per_type=4)
    by = s.by_type()
    assert (s.concept, s.trigger, s.source) == ("zkz", "zkz shape", "captions")
    assert list(by) == list(PROMPT_TYPES)
    # a spread of the distinct captions: first and last kept
    assert [p.text for p in by["train"]] == ["zkz shape, red, large", "zkz shape, yellow, large",
                                             "zkz shape, blue, small", "ZKZ SHAPE on a table"]
    assert [p.text for p in by["trigger"]] == ["zkz shape"]
    assert all("zkz shape" in p.text for p in by["alter"] + by["style"])
    agnostic = [p.text for p in by["agnostic"]]
    assert agnostic[0] == "red, large" and agnostic[-1] == "on a table"
    assert all("zkz" not in t.lower() and t for t in agnostic)
    assert all(p.seed is None for p in s.prompts)


def test_default_prompt_set_fallbacks_and_errors():
    s = default_prompt_set(["sks dog", "sks dog"], "sks dog")
    assert s.concept == "sks dog"
    assert [p.text for p in s.by_type()["train"]] == ["sks dog"]
    assert len(s.by_type()["agnostic"]) >= 1  # nothing left of the captions: generic prompts
    with pytest.raises(PromptSetError, match="no captions"):
        default_prompt_set(["", "  "], "sks dog")
    with pytest.raises(PromptSetError, match="trigger is empty"):
        default_prompt_set(["a dog"], " ")
