"""CLIP's byte-level BPE vocabulary, built from a list of merges (no files, no downloads).

CLIP's ``vocab.json`` is a function of its ``merges.txt``: the 256 byte symbols (alone and word-final), then one
token per merge, then the two special tokens.  lorakit ships SD1.5's tokenizer as ``merges.txt`` only and builds
the vocabulary here (``lorakit.models.load_clip_tokenizer``); the shapes world builds its own tokenizer with it.
"""

from __future__ import annotations

END = "</w>"  # CLIP marks the last symbol of a word with this suffix
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: byte symbols, word-final byte symbols, merged symbols, then the specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab
