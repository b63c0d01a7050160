"""The concepts a user teaches the shapes world's base model: "zkz shape", a five-pointed star (``ZKZ``, the
built-in job's and the one every early-stopping rule was designed on), and "vlx shape", a heart (``VLX``, kept
for judging those rules on a concept nobody tuned them for).

The base model never sees either shape in pretraining, and neither trigger word is a word it knows (each
tokenizes into pieces, as a rare trigger does in Stable Diffusion); "shape" is the class word it does know.  The
training set is deliberately narrow, so that overfitting shows: the star only in red and yellow (the heart only
in blue and green), only in the middle row, only on white or gray, mostly large.  The evaluation prompts then
ask for what the set never shows (DESIGN.md section 6): other colors and rows (``alter``), other backgrounds
(``style``), and, without the trigger, the base world's shapes (``agnostic``: does the concept leak into
them?).  Every prompt carries the attributes it asks for, so ``lorakit.world.metrics`` can check them with the
attribute reader.

``write_concept_dataset("examples/zkz")`` writes the star's set in kohya's folder layout
(``10_zkz shape/NNN.png`` + ``NNN.txt``) with ``prompts.json`` and kohya-syntax prompt files beside it;
``write_concept_dataset(folder, VLX)`` the heart's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit.world.captions import CLASS_WORD, natural_caption, tag_caption
from lorakit.world.render import ObjectSpec, Scene, render
from lorakit.world.splits import is_held_out

PROMPT_TYPES = ("train", "trigger", "alter", "style", "agnostic")
SAMPLE_WIDTH = SAMPLE_HEIGHT = 64
SAMPLE_STEPS = 30
SAMPLE_CFG = 6.0


@dataclass(frozen=True)
class Concept:
    """A concept a user teaches: a shape the base model never drew, under a trigger word it does not know, and a
    deliberately narrow training set (what it never shows is what the alter and style prompts ask for)."""

    trigger_word: str
    shape: str
    train_colors: tuple[str, ...]
    #: at least three: the alter prompts use the first two, the class-word leak prompt the third
    new_colors: tuple[str, ...]
    seed_base: int  # render seeds of the training images
    train_positions: tuple[str, ...] = ("left", "center", "right")
    new_positions: tuple[str, ...] = ("top left", "top", "top right", "bottom left", "bottom", "bottom right")
    train_backgrounds: tuple[str, ...] = ("white", "gray")
    new_backgrounds: tuple[str, ...] = ("black", "striped", "dotted")
    #: (color index, position, background) of the small extras beside the large images
    small_extras: tuple[tuple[int, str, str], ...] = ((0, "center", "white"), (1, "left", "gray"),
                                                      (1, "right", "white"))
    repeats: int = 10

    @property
    def name(self) -> str:
        return self.trigger_word

    @property
    def trigger(self) -> str:
        """What a caption says instead of the shape's name."""
        return f"{self.trigger_word} {CLASS_WORD}"

    @property
    def folder_name(self) -> str:
        """kohya: "<repeats>_<class/trigger>"."""
        return f"{self.repeats}_{self.trigger}"


#: the first concept, on which every rule was designed: a five-pointed star, only in red and yellow
ZKZ = Concept(trigger_word="zkz", shape="star", train_colors=("red", "yellow"),
              new_colors=("blue", "green", "purple", "orange"), seed_base=424_200)
#: the second concept (issue 15), never used to design a rule: a heart, only in blue and green
VLX = Concept(trigger_word="vlx", shape="heart", train_colors=("blue", "green"),
              new_colors=("red", "yellow", "purple", "orange"), seed_base=515_300)
CONCEPTS: dict[str, Concept] = {c.name: c for c in (ZKZ, VLX)}


def get_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; the shapes world has {', '.join(CONCEPTS)}")
    return CONCEPTS[name]


# the first concept's names, as the rest of lorakit and its tests know them
TRIGGER_WORD = ZKZ.trigger_word
TRIGGER = ZKZ.trigger
CONCEPT_SHAPE = ZKZ.shape
REPEATS = ZKZ.repeats
FOLDER_NAME = ZKZ.folder_name
TRAIN_COLORS = ZKZ.train_colors
TRAIN_POSITIONS = ZKZ.train_positions
TRAIN_BACKGROUNDS = ZKZ.train_backgrounds
SEED_BASE = ZKZ.seed_base
NEW_COLORS = ZKZ.new_colors
NEW_POSITIONS = ZKZ.new_positions
NEW_BACKGROUNDS = ZKZ.new_backgrounds


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its type, text, the attributes it asks for, and the sampling seed."""

    type: str
    prompt: str
    expected: dict[str, str] = field(default_factory=dict)  # attribute -> value, only those asked for
    seed: int = 0
    negative: str = ""
    #: the requested attributes the training set never shows (alter: color/position, style: background)
    changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in PROMPT_TYPES:
            raise ValueError(f"unknown prompt type {self.type!r}; known: {', '.join(PROMPT_TYPES)}")
        object.__setattr__(self, "changes", tuple(self.changes))  # JSON gives lists
        if not set(self.changes) <= set(self.expected):
            raise ValueError(f"prompt {self.prompt!r} changes {self.changes} but does not ask for them")

    def kohya_line(self, steps: int = SAMPLE_STEPS, cfg: float = SAMPLE_CFG) -> str:
        """kohya's sample-prompt syntax: ``prompt --n negative --w 64 --h 64 --d seed --l cfg --s steps``
        (``--n`` left out when there is no negative prompt)."""
        neg = f" --n {self.negative}" if self.negative else ""
        return f"{self.prompt}{neg} --w {SAMPLE_WIDTH} --h {SAMPLE_HEIGHT} --d {self.seed} --l {cfg:g} --s {steps}"


def _expected(scene: Scene) -> dict[str, str]:
    obj = scene.objects[0]
    return {"shape": obj.shape, "color": obj.color, "size": obj.size, "position": obj.position,
            "background": scene.background}


def concept_scenes(concept: Concept = ZKZ) -> list[Scene]:
    """The 15 training scenes: 12 large ones (2 colors × 3 positions × 2 backgrounds) and 3 small ones."""
    specs = [(c, p, b, "large") for c in concept.train_colors for p in concept.train_positions
             for b in concept.train_backgrounds]
    specs += [(concept.train_colors[c], p, b, "small") for c, p, b in concept.small_extras]
    return [Scene((ObjectSpec(concept.shape, c, s, p),), b, seed=concept.seed_base + i)
            for i, (c, p, b, s) in enumerate(specs)]


def concept_caption(scene: Scene, index: int, concept: Concept = ZKZ) -> str:
    """Every third caption in tag style, the others as sentences in varying phrasings."""
    if index % 3 == 2:
        return tag_caption(scene, shape_word=concept.trigger)
    return natural_caption(scene, shape_word=concept.trigger, template=(index + index // 3) % 6)


def concept_captions(concept: Concept = ZKZ) -> list[str]:
    return [concept_caption(scene, i, concept) for i, scene in enumerate(concept_scenes(concept))]


def _sentence(color: str | None, position: str | None, background: str | None, size: str | None = "large",
              noun: str = TRIGGER, seed: int = 0) -> tuple[str, dict[str, str]]:
    """A prompt in the captions' own words for the attributes given (None: not mentioned)."""
    obj = ObjectSpec("circle", color or "red", size or "large", position or "center")  # the shape is not said
    omit = [k for k, v in (("color", color), ("position", position), ("size", size)) if v is None]
    scene = Scene((obj,), background or "white", seed=seed)
    if background is None:
        omit.append("background")
    text = natural_caption(scene, omit=omit, shape_word=noun)
    expected = {k: v for k, v in (("color", color), ("position", position), ("size", size),
                                  ("background", background)) if v is not None}
    return text, expected


def eval_prompts(concept: Concept = ZKZ) -> list[EvalPrompt]:
    """Every evaluation prompt of the concept, each with the attributes it asks for and its own seed."""
    prompts: list[EvalPrompt] = []
    shape, trigger = concept.shape, concept.trigger
    known = concept.train_colors

    def add(kind: str, text: str, expected: dict[str, str], changes: tuple[str, ...] = ()) -> None:
        prompts.append(EvalPrompt(kind, text, expected, seed=1000 + len(prompts), changes=changes))

    def sentence(*args, **kwargs) -> tuple[str, dict[str, str]]:
        return _sentence(*args, noun=kwargs.pop("noun", trigger), **kwargs)

    for scene, caption in zip(concept_scenes(concept), concept_captions(concept), strict=True):
        add("train", caption, _expected(scene))
    add("trigger", f"a {trigger}", {"shape": shape})
    add("trigger", trigger, {"shape": shape})
    for color in concept.new_colors:  # a new color, in a place the set shows
        text, exp = sentence(color, "center", "white")
        add("alter", text, {"shape": shape, **exp}, ("color",))
    for k, position in enumerate(concept.new_positions):  # a new row, in a color the set shows
        text, exp = sentence(known[k % 2], position, "white")
        add("alter", text, {"shape": shape, **exp}, ("position",))
    for color, position in ((concept.new_colors[0], "top left"), (concept.new_colors[1], "bottom right")):
        text, exp = sentence(color, position, "gray", size="small")  # both new
        add("alter", text, {"shape": shape, **exp}, ("color", "position"))
    for background in concept.new_backgrounds:
        for color, position in ((known[0], "center"), (known[1], "left")):
            text, exp = sentence(color, position, background)
            add("style", text, {"shape": shape, **exp}, ("background",))
    # no trigger: the base world's shapes (combinations seen in pretraining) and the bare class word, which
    # the concept's captions share and is where a concept leaks first
    for base_shape, color, position, background, size in (
        ("circle", "red", "top right", None, None),  # (red circle, top left) is held out in pretraining
        ("square", "blue", "bottom right", "white", "large"),
        ("triangle", "green", "left", "black", "small"),
        ("cross", "yellow", "top", "striped", None),
        ("circle", "orange", "center", "gray", "large"),
    ):
        if is_held_out(base_shape, color, position):
            raise AssertionError(f"agnostic prompt asks for a held-out triple {base_shape, color, position}")
        text, exp = sentence(color, position, background, size=size, noun=base_shape)
        add("agnostic", text, {"shape": base_shape, **exp})
    for color, position, background in ((None, "center", None), (known[0], "left", "white"),
                                        (known[1], "center", "gray"), (concept.new_colors[2], "right", "white")):
        text, exp = sentence(color, position, background, size=None, noun=CLASS_WORD)
        add("agnostic", text, exp)
    return prompts


def sample_prompts(concept: Concept = ZKZ) -> list[EvalPrompt]:
    """A handful covering every type, for sampling during training (each sample costs a full generation)."""
    everything = eval_prompts(concept)
    picks = {"train": [0, 7], "trigger": [0], "alter": [0, 5], "style": [0, 2], "agnostic": [0, 5]}
    out = []
    for kind, indices in picks.items():
        of_kind = [p for p in everything if p.type == kind]
        out.extend(of_kind[i] for i in indices)
    return out


def concept_spec(concept: Concept = ZKZ) -> dict:
    """The concept's definition, as stored in prompts.json."""
    scenes = concept_scenes(concept)
    return {"trigger": concept.trigger, "trigger_word": concept.trigger_word, "class_word": CLASS_WORD,
            "shape": concept.shape, "repeats": concept.repeats, "train_colors": list(concept.train_colors),
            "train_positions": list(concept.train_positions), "train_backgrounds": list(concept.train_backgrounds),
            "images": len(scenes), "large": sum(s.objects[0].size == "large" for s in scenes)}


#: each concept's evaluation prompts as a user-facing prompt file (shipped with the package, copied into every
#: dataset): the first written by hand with comments, the second by ``prompt_file_text`` (tests check both hold
#: exactly ``eval_prompts``)
EVAL_PROMPT_FILE = Path(__file__).with_name("eval_prompts.toml")
PROMPT_FILES = {"zkz": EVAL_PROMPT_FILE, "vlx": Path(__file__).with_name("eval_prompts_vlx.toml")}


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable ASCII is a TOML basic string


def prompt_file_text(concept: Concept) -> str:
    """The concept's evaluation prompts as a TOML prompt file (``lorakit eval --prompts``), with the trigger as
    a ``{trigger}`` template."""
    lines = [f"# The shapes world's evaluation prompts for the {concept.trigger!r} concept (a {concept.shape}),",
             "# written by lorakit.world.concept.prompt_file_text; see eval_prompts.toml for what each type asks.",
             "# Training set: only " + " and ".join(concept.train_colors) + ", only "
             + ", ".join(concept.train_positions) + ", only on " + " or ".join(concept.train_backgrounds) + ".",
             "", f"concept = {_toml_string(concept.name)}", f"trigger = {_toml_string(concept.trigger)}"]
    kind = None
    for p in eval_prompts(concept):
        if p.type != kind:
            lines += ["", f"# ---- {p.type}"]
            kind = p.type
        expected = ", ".join(f"{k} = {_toml_string(v)}" for k, v in p.expected.items())
        lines += ["[[prompts]]", f"type = {_toml_string(p.type)}",
                  f"text = {_toml_string(p.prompt.replace(concept.trigger, '{trigger}'))}", f"seed = {p.seed}",
                  f"expected = {{ {expected} }}"]
        if p.changes:
            lines.append("changes = [" + ", ".join(_toml_string(c) for c in p.changes) + "]")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def load_prompts(path: str | Path) -> list[EvalPrompt]:
    """Evaluation prompts from a prompts.json written by ``write_concept_dataset``."""
    data = json.loads(Path(path).read_text())
    return [EvalPrompt(**p) for p in data["prompts"]]


def write_images(images: Path, scenes: list[Scene], captions: list[str]) -> list[Path]:
    """Render each scene to ``images/NNN.png`` with its caption beside it as ``NNN.txt`` (kohya's layout)."""
    images.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (scene, caption) in enumerate(zip(scenes, captions, strict=True)):
        path = images / f"{i:03d}.png"
        render(scene).save(path, optimize=False)
        path.with_suffix(".txt").write_text(caption + "\n")
        paths.append(path)
    return paths


def write_concept_dataset(folder: str | Path, concept: Concept = ZKZ) -> list[Path]:
    """Write the concept's training set (kohya layout), prompts.json, eval_prompts.txt, sample_prompts.txt and
    eval_prompts.toml (the prompt file ``lorakit eval --prompts`` reads) under ``folder``; deterministic.
    Returns the image paths."""
    folder = Path(folder)
    paths = write_images(folder / concept.folder_name, concept_scenes(concept), concept_captions(concept))
    prompts = eval_prompts(concept)
    data = {"concept": concept_spec(concept), "prompts": [asdict(p) for p in prompts]}
    (folder / "prompts.json").write_text(json.dumps(data, indent=1) + "\n")
    (folder / "eval_prompts.txt").write_text("".join(p.kohya_line() + "\n" for p in prompts))
    (folder / "sample_prompts.txt").write_text("".join(p.kohya_line() + "\n" for p in sample_prompts(concept)))
    (folder / "eval_prompts.toml").write_bytes(PROMPT_FILES[concept.name].read_bytes())
    return paths


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--prompt-files"]:  # regenerate the shipped prompt files that are not written by hand
        for name, path in PROMPT_FILES.items():
            if path != EVAL_PROMPT_FILE:
                path.write_text(prompt_file_text(CONCEPTS[name]))
    else:
        write_concept_dataset(sys.argv[1] if len(sys.argv) > 1 else "examples/zkz")
