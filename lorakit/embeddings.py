"""Use a textual-inversion embedding: add its token(s) to a model's tokenizer and text encoder.

Reads the files lorakit writes (``{"clip_l": [n, d]}`` with ``lorakit_ti_token`` metadata) and the common
single-tensor layouts other tools write (A1111's ``emb_params``, diffusers' ``{token: tensor}``).  A file
with n vectors becomes the tokens ``tok tok_1 ... tok_{n-1}``; ``expand_prompt`` rewrites ``tok`` in a prompt
to all of them, as training did.  A name that is a word of the vocabulary ("style") gets tokens of its own,
``<style> ...``, and the word in prompts stands for them, as A1111 and ComfyUI match an embedding by its name.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
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
    """Add ``tokens`` to the tokenizer and rows for them to the text encoder; their ids, or ``None`` when one
    of them is already a single token of the vocabulary."""
    vocabulary = model.tokenizer.get_vocab()
    if any(t in vocabulary for t in tokens):  # checked first: add_tokens would add the others and keep them
        return None
    if model.tokenizer.add_tokens(tokens) != len(tokens):
        return None
    model.text_encoder.resize_token_embeddings(len(model.tokenizer))
    return model.tokenizer.convert_tokens_to_ids(tokens)


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


def read_embedding(path: str | Path) -> tuple[torch.Tensor, str | None]:
    """The ``[n, dim]`` vectors of an embedding file and the token its metadata names (if any)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise EmbeddingError(f"{path}: embeddings are read from .safetensors files only (never unpickled)")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            known = [k for k in ("clip_l", "clip_h", "emb_params") if k in keys]
            key = known[0] if known else keys[0] if len(keys) == 1 else None
            if key is None:
                raise EmbeddingError(f"{path}: expected one tensor ('clip_l', 'clip_h' or 'emb_params'), found keys "
                                     f"{keys}")
            vectors = f.get_tensor(key)
    except EmbeddingError:
        raise
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise EmbeddingError(f"{path}: not a readable safetensors file ({e})") from e
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise EmbeddingError(f"{path}: tensor {key!r} has shape {tuple(vectors.shape)}, expected [vectors, dim]")
    return vectors, meta.get(TI_TOKEN_KEY)


def load_embedding(model: BaseModel, path: str | Path, token: str | None = None,
                   default_token: str | None = None) -> LoadedEmbedding:
    """Add the embedding of ``path`` to ``model`` under ``token`` (default: the token saved in the file, else
    ``default_token``)."""
    vectors, saved_token = read_embedding(path)
    token = token or saved_token or default_token
    if not token:
        raise EmbeddingError(f"{path}: the file names no token; pass one (e.g. token='zkz')")
    return add_embedding(model, vectors, token, str(path))


def add_embedding(model: BaseModel, vectors: torch.Tensor, token: str, where: str) -> LoadedEmbedding:
    """Add ``vectors`` ([n, dim]) to ``model`` as the tokens of ``token``; ``where`` names their file in errors."""
    if model.is_sdxl:  # an SDXL embedding is a pair (clip_l, clip_g), one per encoder
        raise EmbeddingError(f"{where}: lorakit does not use textual-inversion embeddings with SDXL models yet")
    emb = model.text_encoder.get_input_embeddings().weight
    if vectors.ndim != 2:
        raise EmbeddingError(f"{where}: embedding vectors of shape {tuple(vectors.shape)}, expected [vectors, dim]")
    if vectors.shape[1] != emb.shape[1]:
        raise EmbeddingError(f"{where}: vectors of size {vectors.shape[1]}, but this text encoder's embeddings have "
                             f"size {emb.shape[1]} (an embedding for another model)")
    tokens = token_names(token, vectors.shape[0])
    ids = register_tokens(model, tokens)
    if ids is None:  # a word of the vocabulary ("style"): it stands for tokens of its own, as A1111 matches names
        tokens = token_names(f"<{token}>", vectors.shape[0])
        ids = register_tokens(model, tokens)
    if ids is None:
        raise EmbeddingError(f"{where}: token {token!r} (or one of {tokens}) is already in the vocabulary")
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[ids] = vectors.to(emb.dtype)
    return LoadedEmbedding(token, tokens)


@contextmanager
def embedding_added(model: BaseModel, vectors: torch.Tensor, token: str, where: str) -> Iterator[LoadedEmbedding]:
    """``add_embedding`` for the duration: the tokenizer and the text encoder's embedding rows are exactly as
    before afterwards (a tokenizer cannot forget an added token, so the one before it learned them comes back)."""
    tokenizer = model.tokenizer
    rows = model.text_encoder.get_input_embeddings().weight.shape[0]
    model.tokenizer = copy.deepcopy(tokenizer)
    try:
        yield add_embedding(model, vectors, token, where)
    finally:
        model.tokenizer = tokenizer
        if model.text_encoder.get_input_embeddings().weight.shape[0] != rows:
            model.text_encoder.resize_token_embeddings(rows)  # drops the added rows, keeps the others as they were
