"""Does ``lorakit interrogate`` find a run's words?  Of the tokens each score ranks first, how many are words of the
run's training captions, against what chance would give.  Run on demand, on a trained run folder:

    lorakit train --out runs/builtin --set network.train_text_encoder=true   # the built-in job, text encoder too
    python benchmarks/interrogate_captions.py runs/builtin

The captions are the ``.txt`` files beside the run's training images (``data.train_data`` in its config.toml);
"chance" is how many caption tokens ``--top`` tokens drawn at random from the vocabulary would hold on average.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.config import load_config
from lorakit.data.images import IMAGE_EXTENSIONS
from lorakit.models import load_base_model
from lorakit.tools.interrogate import interrogate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a lorakit run folder (config.toml, lorakit.safetensors)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    cfg = load_config(args.run / "config.toml")
    model = load_base_model(cfg.model.base)
    # the caption files beside images only (not the prompt files the built-in dataset keeps next to them)
    captions = [p.read_text(encoding="utf-8") for p in Path(cfg.data.train_data).rglob("*.txt")
                if any(p.with_suffix(ext).is_file() for ext in IMAGE_EXTENSIONS)]
    caption_tokens = {t for text in captions for t in model.tokenizer(text)["input_ids"]}
    result = interrogate(model, args.run / "lorakit.safetensors", clip_skip=cfg.model.clip_skip)
    vocabulary = {s.token_id for s in result.scores}
    chance = len(caption_tokens & vocabulary) / len(vocabulary) * args.top
    print(f"{args.run}: {len(captions)} captions, {len(caption_tokens & vocabulary)} of {len(vocabulary)} tokens in "
          f"them; chance {chance:.1f} of {args.top}")
    for by in ("unet", "text_encoder"):
        top = result.top(by, args.top)
        if top:
            hits = sum(s.token_id in caption_tokens for s in top)
            print(f"  {by}: {hits} of the first {args.top} are caption words ({hits / chance:.1f}× chance): "
                  + ", ".join(repr(s.text) for s in top[:10]))


if __name__ == "__main__":
    main()
