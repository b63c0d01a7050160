"""A CLIP byte-level BPE tokenizer for the shapes world, learned from its own words.

The real CLIP vocabulary cannot be downloaded here, so the tiny base model gets its own: the 256 byte
symbols (alone and word-final, as CLIP has them), then merges learned by plain BPE over the world's words
and a few hundred common English words, until each of those words is one token.  Any other word (a trigger
such as "zkz") still tokenizes, into smaller pieces, exactly as rare words do in Stable Diffusion.
The files are CLIP's own format (vocab.json + merges.txt), loaded by ``transformers.CLIPTokenizer``.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer

from lorakit.vocab import END, MAX_LENGTH, build_vocab, bytes_to_unicode
from lorakit.world.captions import CLASS_WORD
from lorakit.world.render import BACKGROUNDS, COLORS, POSITIONS, PRETRAINING_SHAPES, SIZES

_CAPTION_WORDS = "a an the at on in of and picture photo background center top bottom left right".split()
# Common words so that prompts beyond the world's vocabulary still get whole-word tokens.
_COMMON_WORDS = """
image drawing painting render style art simple flat clean detailed high quality best low worst blurry
one two three four five many some with without no not very small big tiny huge large little medium
light dark bright pale deep pink brown cyan magenta white black gray grey silver gold
shape object thing icon logo symbol sign pattern texture plain solid striped dotted checkered
is are be this that it its near next to above below under over behind front middle side corner edge
up down inside outside between around by for from into like as or but so
dog cat person man woman face house tree car sky water sun moon flower hat
""".split()


def world_words() -> list[str]:
    """Every word a shapes-world caption can contain, plus the common words above."""
    words: list[str] = []
    for phrase in (*PRETRAINING_SHAPES, *COLORS, *SIZES, *POSITIONS, *BACKGROUNDS, CLASS_WORD,
                   *_CAPTION_WORDS, *_COMMON_WORDS):
        words.extend(phrase.split())
    return sorted(set(words))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair (ties broken by the pair itself, so the result is
    deterministic) until every word is a single symbol."""
    byte_map = bytes_to_unicode()
    segmented = {w: [byte_map[b] for b in w.encode("utf-8")] for w in words}
    for symbols in segmented.values():
        symbols[-1] += END
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in segmented.values():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in segmented.items():
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = merged


def build_tokenizer() -> CLIPTokenizer:
    """The shapes-world tokenizer, built from scratch (deterministic, no files needed)."""
    merges = learn_merges(world_words())
    vocab = build_vocab(merges)
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges))
    tok.model_max_length = MAX_LENGTH
    return tok
