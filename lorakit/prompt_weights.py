"""Prompt weighting as A1111 and kohya's sample prompts write it: ``(word)`` is 1.1× as strong, ``((word))``
1.21×, ``[word]`` 1/1.1×, ``(word:1.5)`` 1.5×; ``\\(`` and ``\\)`` are literal brackets.  A prompt without them means
what it always meant.

The weights scale the text encoder's output token by token, then the whole is scaled back to its unweighted mean,
as A1111 does, so a weight changes a word's share of the conditioning rather than the conditioning's size.
"""

from __future__ import annotations

import re

import torch
from transformers import CLIPTokenizer

from lorakit.models import encode_prompt_ids, tokenize_prompts

#: A1111's factors for one pair of round / square brackets
ROUND, SQUARE = 1.1, 1 / 1.1
_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|[\\:]")
_SYNTAX = re.compile(r"[()\[\]]")


def uses_bracket_syntax(text: str) -> bool:
    """Whether ``text`` has a bracket, escaped or not: it must be parsed, even where every weight is 1, so that
    ``(word:1.0)`` means ``word`` and ``\\(`` a literal bracket."""
    return bool(_SYNTAX.search(text))


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, weight) runs, brackets removed; a bracket left open weighs the rest of the prompt, and a
    closing one without its opening is kept as text (both as A1111 reads them)."""
    pieces: list[list] = []  # [text, weight]
    open_at: list[tuple[int, str]] = []  # (index into pieces where the bracket opened, "(" or "[")

    def close(kind: str, factor: float) -> bool:
        for depth in range(len(open_at) - 1, -1, -1):
            if open_at[depth][1] == kind:
                start = open_at.pop(depth)[0]
                for piece in pieces[start:]:
                    piece[1] *= factor
                return True
        return False

    for match in _TOKENS.finditer(text):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token in ("(", "["):
            open_at.append((len(pieces), token))
        elif number is not None:  # ":1.5)": the innermost round bracket's own weight
            if not close("(", float(number)):
                pieces.append([token, 1.0])
        elif token == ")":
            if not close("(", ROUND):
                pieces.append([token, 1.0])
        elif token == "]":
            if not close("[", SQUARE):
                pieces.append([token, 1.0])
        else:
            pieces.append([token, 1.0])
    while open_at:  # left open: weighs everything after it
        close(open_at[-1][1], ROUND if open_at[-1][1] == "(" else SQUARE)
    merged: list[tuple[str, float]] = []
    for piece, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        elif piece:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def plain_text(text: str) -> str:
    """What a weighted prompt says, without its syntax (``a (red:1.3) star`` -> ``a red star``): the text a CLIP
    text embedding or a token count should read."""
    return "".join(piece for piece, _ in parse_weights(text)) if uses_bracket_syntax(text) else text


def weighted_token_ids(tokenizer: CLIPTokenizer, texts: list[str], max_token_length: int = 75
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(batch, chunks, 77)`` laid out exactly as ``lorakit.models.tokenize_prompts`` lays out the
    unweighted text (BOS, the tokens cut at ``max_token_length``, EOS, padding; 75 tokens a chunk), and each
    position's weight in the layout ``encode_prompt_ids`` returns its states in (``(batch, 77)`` for one chunk,
    ``(batch, 2 + 75·chunks)`` for several)."""
    body = tokenizer.model_max_length - 2  # 75
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    all_ids, all_weights = [], []
    for text in texts:
        tokens: list[int] = []
        weights: list[float] = []
        for piece, weight in parse_weights(text):
            piece_ids = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
            tokens += piece_ids
            weights += [weight] * len(piece_ids)
        tokens, weights = tokens[:max_token_length], weights[:max_token_length]
        full = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
        full += [pad] * (max_token_length + 2 - len(full))
        full_weights = [1.0, *weights] + [1.0] * (max_token_length + 1 - len(weights))
        if max_token_length == body:
            all_ids.append([full])
            all_weights.append(full_weights)
            continue
        starts = range(1, max_token_length + 1, body)
        all_ids.append([[full[0], *full[i:i + body], full[-1]] for i in starts])
        all_weights.append([1.0, *[w for i in starts for w in full_weights[i:i + body]], 1.0])
    return torch.tensor(all_ids), torch.tensor(all_weights)


def apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The encoder's states ``(batch, tokens, dim)`` scaled token by token, then back to each prompt's unweighted
    mean (A1111's rule)."""
    before = states.mean(dim=(1, 2), keepdim=True)
    scaled = states * weights.to(states)[..., None]
    after = scaled.mean(dim=(1, 2), keepdim=True)
    ratio = before / after
    # a mean near zero would blow the ratio up (or flip the states' sign): those prompts keep the plain scaling
    ratio = torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, torch.ones_like(ratio))
    return scaled * ratio


def encode_texts(tokenizer: CLIPTokenizer, text_encoder: torch.nn.Module, texts: list[str], *, weighted: bool,
                 clip_skip: int = 1, max_token_length: int = 75, device: torch.device | str = "cpu") -> torch.Tensor:
    """The text encoder's states for ``texts`` as the trainer encodes them (``lorakit.models.encode_prompt_ids``);
    ``weighted``: the bracket syntax read as weights (every text parsed), else brackets are plain text."""
    if not weighted:
        return encode_prompt_ids(text_encoder, tokenize_prompts(tokenizer, texts, max_token_length).to(device),
                                 clip_skip)
    ids, weights = weighted_token_ids(tokenizer, texts, max_token_length)
    return apply_weights(encode_prompt_ids(text_encoder, ids.to(device), clip_skip), weights)
