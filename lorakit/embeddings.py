"""Use a textual-inversion embedding: add its token(s) to a model's tokenizer and text encoder.

Reads the files lorakit writes (``{"clip_l": [n, d]}`` with ``lorakit_ti_token`` metadata; SDXL's
``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, one tensor per text encoder, as kohya, A1111 and ComfyUI write
them) and the common single-tensor layouts other tools write (A1111's ``emb_params``, diffusers' ``{token:
tensor}``).  Vectors go around as a tuple, one ``[n, d]`` tensor per text encoder of the model, in its order.  A file
with n vectors becomes the tokens ``tok tok_1 ... tok_{n-1}``; ``expand_prompt`` rewrites ``tok`` in a prompt
to all of them, as training did.  A name that is a word of the vocabulary ("style") gets tokens of its own,
``<style> ...``, and the word in prompts stands for them, as A1111 and ComfyUI match an embedding by its name.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorakit.errors import LorakitError
from lorakit.file_kinds import TI_TOKEN_KEY
from lorakit.models import BaseModel


class EmbeddingError(LorakitError):
    """An embedding file that cannot be used with this model."""


#: the file keys of an embedding's vectors, one per text encoder (SDXL: its CLIP-L, then its OpenCLIP bigG)
ENCODER_KEYS = ("clip_l", "clip_g")


def embedding_tensors(vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of an embedding file for vectors per encoder: ``clip_l`` (SD1.x/2.x), SDXL's ``clip_l`` and
    ``clip_g``."""
    if not 1 <= len(vectors) <= len(ENCODER_KEYS):
        raise ValueError(f"an embedding has vectors for 1 or 2 text encoders, not {len(vectors)}")
    return dict(zip(ENCODER_KEYS, vectors, strict=False))


def token_names(token: str, vectors: int) -> list[str]:
    """The tokens an embedding of ``vectors`` vectors stands for: ``tok tok_1 ... tok_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def expand_tokens(prompt: str, tokens: list[str], word: str | None = None) -> str:
    """Rewrite ``word`` (default ``tokens[0]``) in ``prompt`` to all of ``tokens`` (as training and sampling see
    it): ``zkz`` → ``zkz zkz_1``."""
    word = tokens[0] if word is None else word
    if tokens == [word]:
        return prompt
    return re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", " ".join(tokens), prompt)


def register_tokens(model: BaseModel, tokens: list[str]) -> list[int] | None:
    """Add ``tokens`` to the tokenizer(s) and rows for them to the text encoder(s); their ids, or ``None`` when
    one of them is already a single token of the vocabulary."""
    # checked first, in every tokenizer: add_tokens would add the others and keep them
    if any(t in tokenizer.get_vocab() for tokenizer in model.tokenizers for t in tokens):
        return None
    ids = None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders, strict=True):
        if tokenizer.add_tokens(tokens) != len(tokens):
            return None
        encoder.resize_token_embeddings(len(tokenizer))
        these = tokenizer.convert_tokens_to_ids(tokens)
        if ids is not None and these != ids:  # SDXL's two tokenizers share CLIP's vocabulary, so they agree
            raise EmbeddingError(f"the two tokenizers of {model.source or 'the model'} give the new tokens "
                                 f"{tokens} different ids ({ids}, {these}): their vocabularies differ")
        ids = these
    return ids


@dataclass
class LoadedEmbedding:
    token: str  # the word prompts write
    tokens: list[str]  # the tokenizer's tokens it stands for

    def expand_prompt(self, prompt: str) -> str:
        return expand_tokens(prompt, self.tokens, self.token)


def expand_all(prompt: str, embeddings: Iterable[LoadedEmbedding]) -> str:
    """``prompt`` with the words of all ``embeddings`` expanded (what a model holding them reads)."""
    for embedding in embeddings:
        prompt = embedding.expand_prompt(prompt)
    return prompt


def _what_it_holds(f) -> str:
    """What an open safetensors file that is no embedding holds, in a few words (not its hundreds of keys)."""
    from lorakit.file_kinds import describe_weights

    keys = list(f.keys())
    said = describe_weights({k: f.get_slice(k).get_shape() for k in keys})
    if said is None:  # adapter key names
        return f"an adapter file ({len(keys)} tensors such as {sorted(keys)[0]!r}); give it as an adapter"
    if said.startswith("not an adapter: "):  # no kind of file it knows: a few of its names
        shown = ", ".join(repr(k) for k in sorted(keys)[:3])
        return f"{len(keys)} tensors named {shown}{', ...' if len(keys) > 3 else ''}"
    return said.removesuffix(", not an adapter")


def read_embedding(path: str | Path) -> tuple[tuple[torch.Tensor, ...], str | None]:
    """The ``[n, dim]`` vectors of an embedding file, one tensor per text encoder (SDXL's ``clip_l`` and ``clip_g``;
    else the file's one tensor), and the token its metadata names (if any)."""
    path = Path(path)
    if path.is_dir():
        raise EmbeddingError(f"{path}: is a folder; give an embedding's .safetensors file")
    if path.suffix != ".safetensors":
        raise EmbeddingError(f"{path}: embeddings are read from .safetensors files only (never unpickled)")
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            if "clip_g" in keys:  # SDXL's: both encoders' vectors
                if "clip_l" not in keys:
                    raise EmbeddingError(f"{path}: an SDXL embedding needs 'clip_l' beside 'clip_g', found keys "
                                         f"{keys}")
                chosen = list(ENCODER_KEYS)
            else:
                known = [k for k in ("clip_l", "clip_h", "emb_params") if k in keys]
                key = known[0] if known else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise EmbeddingError(f"{path}: not an embedding (one tensor 'clip_l', 'clip_h' or 'emb_params', "
                                         f"or SDXL's 'clip_l' and 'clip_g'): {_what_it_holds(f)}")
                chosen = [key]
            vectors = {key: f.get_tensor(key) for key in chosen}
    except EmbeddingError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise EmbeddingError(f"{path}: not a readable safetensors file ({e})") from e
    out = []
    for key, tensor in vectors.items():
        if tensor.ndim == 1:
            tensor = tensor[None]
        if tensor.ndim != 2:
            raise EmbeddingError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected [vectors, dim]")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):  # the prompt's word would be noise
            raise EmbeddingError(f"{path}: tensor {key!r} holds NaN or infinite values: the embedding is broken (its "
                                 "training diverged, or fp16 overflowed when it was saved)")
        out.append(tensor)
    if len({t.shape[0] for t in out}) > 1:
        raise EmbeddingError(f"{path}: its tensors hold different numbers of vectors "
                             f"({', '.join(f'{k} {t.shape[0]}' for k, t in zip(vectors, out, strict=True))})")
    return tuple(out), meta.get(TI_TOKEN_KEY)


def load_embedding(model: BaseModel, path: str | Path, token: str | None = None,
                   default_token: str | None = None) -> LoadedEmbedding:
    """Add the embedding of ``path`` to ``model`` under ``token`` (default: the token saved in the file, else
    ``default_token``)."""
    vectors, saved_token = read_embedding(path)
    token = token or saved_token or default_token
    if not token:
        raise EmbeddingError(f"{path}: the file names no token; pass one (e.g. token='zkz')")
    return add_embedding(model, vectors, token, str(path))


def check_vectors(model: BaseModel, vectors: Sequence[torch.Tensor], where: str) -> None:
    """Refuse vectors that do not fit the model's text encoder(s): another number of encoders, another width."""
    encoders = model.text_encoders
    if len(vectors) != len(encoders):
        held = "SDXL's two encoders (clip_l, clip_g)" if len(vectors) == 2 else "one text encoder"
        raise EmbeddingError(f"{where}: an embedding for {held}, and {model.source or 'the model'} has "
                             f"{len(encoders)} (an embedding for another kind of model)")
    for key, tensor, encoder in zip(ENCODER_KEYS, vectors, encoders, strict=False):
        width = encoder.get_input_embeddings().weight.shape[1]
        if tensor.ndim != 2:
            raise EmbeddingError(f"{where}: embedding vectors of shape {tuple(tensor.shape)}, expected [vectors, dim]")
        if tensor.shape[1] != width:
            which = f"{key} " if len(encoders) > 1 else ""
            raise EmbeddingError(f"{where}: {which}vectors of size {tensor.shape[1]}, but this text encoder's "
                                 f"embeddings have size {width} (an embedding for another model)")


def add_embedding(model: BaseModel, vectors: Sequence[torch.Tensor] | torch.Tensor, token: str,
                  where: str) -> LoadedEmbedding:
    """Add ``vectors`` (one [n, dim] tensor per text encoder) to ``model`` as the tokens of ``token``; ``where``
    names their file in errors."""
    vectors = (vectors,) if isinstance(vectors, torch.Tensor) else tuple(vectors)
    check_vectors(model, vectors, where)
    tokens = token_names(token, vectors[0].shape[0])
    ids = register_tokens(model, tokens)
    if ids is None:  # a word of the vocabulary ("style"): it stands for tokens of its own, as A1111 matches names
        tokens = token_names(f"<{token}>", vectors[0].shape[0])
        ids = register_tokens(model, tokens)
    if ids is None:
        raise EmbeddingError(f"{where}: token {token!r} (or one of {tokens}) is already in the vocabulary")
    with torch.no_grad():
        for tensor, encoder in zip(vectors, model.text_encoders, strict=True):
            rows = encoder.get_input_embeddings().weight
            rows[ids] = tensor.to(rows.dtype)
    return LoadedEmbedding(token, tokens)


@contextmanager
def embedding_added(model: BaseModel, vectors: Sequence[torch.Tensor] | torch.Tensor, token: str,
                    where: str) -> Iterator[LoadedEmbedding]:
    """``add_embedding`` for the duration: the tokenizer(s) and the text encoders' embedding rows are exactly as
    before afterwards (a tokenizer cannot forget an added token, so the one before it learned them comes back)."""
    tokenizers = (model.tokenizer, model.tokenizer_2)
    rows = [encoder.get_input_embeddings().weight.shape[0] for encoder in model.text_encoders]
    model.tokenizer = copy.deepcopy(model.tokenizer)
    model.tokenizer_2 = copy.deepcopy(model.tokenizer_2)
    try:
        yield add_embedding(model, vectors, token, where)
    finally:
        model.tokenizer, model.tokenizer_2 = tokenizers
        for encoder, count in zip(model.text_encoders, rows, strict=True):
            if encoder.get_input_embeddings().weight.shape[0] != count:
                encoder.resize_token_embeddings(count)  # drops the added rows, keeps the others as they were
