"""The concept a user teaches the shapes world's base model: "zkz shape", a five-pointed star.

The base model never sees a star in pretraining, and "zkz" is not a word it knows (it tokenizes into
pieces, as a rare trigger does in Stable Diffusion); "shape" is the class word it does know.  The training
set is deliberately narrow, so that overfitting shows: the star only in red and yellow, only in the middle
row, only on white or gray, mostly large.  The evaluation prompts then ask for what the set never shows
(DESIGN.md section 6): other colors and rows (``alter``), other backgrounds (``style``), and, without the
trigger, the base world's shapes (``agnostic``: does the star leak into them?).  Every prompt carries the
attributes it asks for, so ``lorakit.world.metrics`` can check them with the attribute reader.

``write_concept_dataset("examples/zkz")`` writes the set in kohya's folder layout
(``10_zkz shape/NNN.png`` + ``NNN.txt``) with ``prompts.json`` and kohya-syntax prompt files beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit.world.captions import CLASS_WORD, natural_caption, tag_caption
from lorakit.world.render import ObjectSpec, Scene, render
from lorakit.world.splits import is_held_out

TRIGGER_WORD = "zkz"
TRIGGER = f"{TRIGGER_WORD} {CLASS_WORD}"  # what a caption says instead of the shape's name
CONCEPT_SHAPE = "star"
REPEATS = 10
FOLDER_NAME = f"{REPEATS}_{TRIGGER}"  # kohya: "<repeats>_<class/trigger>"

# the training set's narrow variety
TRAIN_COLORS = ("red", "yellow")
TRAIN_POSITIONS = ("left", "center", "right")
TRAIN_BACKGROUNDS = ("white", "gray")
# three small stars on top of the 12 large ones (every color × position × background)
SMALL_EXTRAS = (("red", "center", "white"), ("yellow", "left", "gray"), ("yellow", "right", "white"))
SEED_BASE = 424_200

# what the set never shows, for the alter and style prompts
NEW_COLORS = ("blue", "green", "purple", "orange")
NEW_POSITIONS = ("top left", "top", "top right", "bottom left", "bottom", "bottom right")
NEW_BACKGROUNDS = ("black", "striped", "dotted")

PROMPT_TYPES = ("train", "trigger", "alter", "style", "agnostic")
SAMPLE_WIDTH = SAMPLE_HEIGHT = 64
SAMPLE_STEPS = 30
SAMPLE_CFG = 6.0


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


def concept_scenes() -> list[Scene]:
    """The 15 training scenes: 12 large stars (2 colors × 3 positions × 2 backgrounds) and 3 small ones."""
    specs = [(c, p, b, "large") for c in TRAIN_COLORS for p in TRAIN_POSITIONS for b in TRAIN_BACKGROUNDS]
    specs += [(c, p, b, "small") for c, p, b in SMALL_EXTRAS]
    return [Scene((ObjectSpec(CONCEPT_SHAPE, c, s, p),), b, seed=SEED_BASE + i)
            for i, (c, p, b, s) in enumerate(specs)]


def concept_caption(scene: Scene, index: int) -> str:
    """Every third caption in tag style, the others as sentences in varying phrasings."""
    if index % 3 == 2:
        return tag_caption(scene, shape_word=TRIGGER)
    return natural_caption(scene, shape_word=TRIGGER, template=(index + index // 3) % 6)


def concept_captions() -> list[str]:
    return [concept_caption(scene, i) for i, scene in enumerate(concept_scenes())]


def _sentence(color: str | None, position: str | None, background: str | None, size: str | None = "large",
              noun: str = TRIGGER, seed: int = 0) -> tuple[str, dict[str, str]]:
    """A prompt in the captions' own words for the attributes given (None: not mentioned)."""
    obj = ObjectSpec(CONCEPT_SHAPE, color or "red", size or "large", position or "center")
    omit = [k for k, v in (("color", color), ("position", position), ("size", size)) if v is None]
    scene = Scene((obj,), background or "white", seed=seed)
    if background is None:
        omit.append("background")
    text = natural_caption(scene, omit=omit, shape_word=noun)
    expected = {k: v for k, v in (("color", color), ("position", position), ("size", size),
                                  ("background", background)) if v is not None}
    return text, expected


def eval_prompts() -> list[EvalPrompt]:
    """Every evaluation prompt of the concept, each with the attributes it asks for and its own seed."""
    prompts: list[EvalPrompt] = []

    def add(kind: str, text: str, expected: dict[str, str], changes: tuple[str, ...] = ()) -> None:
        prompts.append(EvalPrompt(kind, text, expected, seed=1000 + len(prompts), changes=changes))

    for scene, caption in zip(concept_scenes(), concept_captions(), strict=True):
        add("train", caption, _expected(scene))
    add("trigger", f"a {TRIGGER}", {"shape": CONCEPT_SHAPE})
    add("trigger", TRIGGER, {"shape": CONCEPT_SHAPE})
    for color in NEW_COLORS:  # a new color, in a place the set shows
        text, exp = _sentence(color, "center", "white")
        add("alter", text, {"shape": CONCEPT_SHAPE, **exp}, ("color",))
    for color, position in zip(("red", "yellow", "red", "yellow", "red", "yellow"), NEW_POSITIONS, strict=True):
        text, exp = _sentence(color, position, "white")  # a new row, in a color the set shows
        add("alter", text, {"shape": CONCEPT_SHAPE, **exp}, ("position",))
    for color, position in (("blue", "top left"), ("green", "bottom right")):  # both new
        text, exp = _sentence(color, position, "gray", size="small")
        add("alter", text, {"shape": CONCEPT_SHAPE, **exp}, ("color", "position"))
    for background in NEW_BACKGROUNDS:
        for color, position in (("red", "center"), ("yellow", "left")):
            text, exp = _sentence(color, position, background)
            add("style", text, {"shape": CONCEPT_SHAPE, **exp}, ("background",))
    # no trigger: the base world's shapes (combinations seen in pretraining) and the bare class word, which
    # the concept's captions share and is where a concept leaks first
    for shape, color, position, background, size in (
        ("circle", "red", "top right", None, None),  # (red circle, top left) is held out in pretraining
        ("square", "blue", "bottom right", "white", "large"),
        ("triangle", "green", "left", "black", "small"),
        ("cross", "yellow", "top", "striped", None),
        ("circle", "orange", "center", "gray", "large"),
    ):
        if is_held_out(shape, color, position):
            raise AssertionError(f"agnostic prompt asks for a held-out triple {shape, color, position}")
        text, exp = _sentence(color, position, background, size=size, noun=shape)
        add("agnostic", text, {"shape": shape, **exp})
    for color, position, background in ((None, "center", None), ("red", "left", "white"),
                                        ("yellow", "center", "gray"), ("purple", "right", "white")):
        text, exp = _sentence(color, position, background, size=None, noun=CLASS_WORD)
        add("agnostic", text, exp)
    return prompts


def sample_prompts() -> list[EvalPrompt]:
    """A handful covering every type, for sampling during training (each sample costs a full generation)."""
    everything = eval_prompts()
    picks = {"train": [0, 7], "trigger": [0], "alter": [0, 5], "style": [0, 2], "agnostic": [0, 5]}
    out = []
    for kind, indices in picks.items():
        of_kind = [p for p in everything if p.type == kind]
        out.extend(of_kind[i] for i in indices)
    return out


def concept_spec() -> dict:
    """The concept's definition, as stored in prompts.json."""
    return {"trigger": TRIGGER, "trigger_word": TRIGGER_WORD, "class_word": CLASS_WORD, "shape": CONCEPT_SHAPE,
            "repeats": REPEATS, "train_colors": list(TRAIN_COLORS), "train_positions": list(TRAIN_POSITIONS),
            "train_backgrounds": list(TRAIN_BACKGROUNDS), "images": len(concept_scenes()),
            "large": sum(s.objects[0].size == "large" for s in concept_scenes())}


#: the evaluation prompts as a user-facing prompt file (shipped with the package, copied into every dataset)
EVAL_PROMPT_FILE = Path(__file__).with_name("eval_prompts.toml")


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


def write_concept_dataset(folder: str | Path) -> list[Path]:
    """Write the training set (kohya layout), prompts.json, eval_prompts.txt, sample_prompts.txt and
    eval_prompts.toml (the prompt file ``lorakit eval --prompts`` reads) under ``folder``; deterministic.
    Returns the image paths."""
    folder = Path(folder)
    paths = write_images(folder / FOLDER_NAME, concept_scenes(), concept_captions())
    data = {"concept": concept_spec(), "prompts": [asdict(p) for p in eval_prompts()]}
    (folder / "prompts.json").write_text(json.dumps(data, indent=1) + "\n")
    (folder / "eval_prompts.txt").write_text("".join(p.kohya_line() + "\n" for p in eval_prompts()))
    (folder / "sample_prompts.txt").write_text("".join(p.kohya_line() + "\n" for p in sample_prompts()))
    # written by hand as templates with comments; tests check it holds exactly eval_prompts()
    (folder / "eval_prompts.toml").write_bytes(EVAL_PROMPT_FILE.read_bytes())
    return paths


if __name__ == "__main__":
    import sys

    write_concept_dataset(sys.argv[1] if len(sys.argv) > 1 else "examples/zkz")
