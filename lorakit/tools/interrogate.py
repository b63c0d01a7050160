"""Which words an adapter changes most: a file's trigger words when nobody wrote them down.

Every token of the vocabulary is encoded alone (``<bos> token <eos>``; the text encoders attend causally, so the
token's state is the one it has at the start of any prompt) and scored two ways:

- **text encoder** (kohya's ``lora_interrogator.py``): how far the adapter's text-encoder modules move that
  encoding, the mean ``|Δh|`` over its three states;
- **U-Net**: how far the adapter's cross-attention key and value projections (``attn2.to_k``/``to_v``) move what
  the U-Net reads of the token, past what they move in every token alike: ``‖ΔW (h − h̄)‖`` at the token's state
  ``h`` (``h̄``: the vocabulary's mean), over the layer's typical ``‖W (h − h̄)‖``, averaged over those layers.  Most
  LoRAs train the U-Net only, and kohya's tool has no answer for them; this one reads the question off the U-Net.

Tokens are ranked by each score (``Interrogation.top``).  The base model is left as it was.  Measured on the
built-in job's result trained with its text encoder (``benchmarks/interrogate_captions.py``; README): of the 30
words each score ranks first, 8 (U-Net) and 8 (text encoder) are words of its training captions, where chance
gives 1.2; its made-up trigger, split into three pieces, is not among them: a word the tokenizer does not know has
no one token to find.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorakit.formats import load_network, read_adapter
from lorakit.models import BaseModel, encode_prompt_ids
from lorakit.tools import ToolError
from lorakit.tools.apply import layers_by_name
from lorakit.tools.deltas import AdapterSpec, file_deltas, module_weights, parse_adapter_spec
from lorakit.tools.lowrank import Delta

#: the U-Net layers that read the text: the cross-attention's key and value projections (SD1.x/2.x/SDXL names)
CROSS_ATTENTION_READERS = ("attn2_to_k", "attn2_to_v")


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    text: str
    text_encoder: float | None  # None: the adapter has no text-encoder modules
    unet: float | None  # None: the adapter has no cross-attention key/value modules


@dataclass
class Interrogation:
    source: str
    scores: list[TokenScore]
    text_encoder_modules: int
    unet_modules: int

    def top(self, by: str, n: int = 30) -> list[TokenScore]:
        """The ``n`` tokens with the largest ``by`` score ("text_encoder" or "unet")."""
        scored = [s for s in self.scores if getattr(s, by) is not None]
        return sorted(scored, key=lambda s: -getattr(s, by))[:n]

    def summary(self, n: int = 30) -> str:
        lines = [f"lorakit interrogate: {self.source}: {len(self.scores)} tokens scored"]
        for by, what, modules in (("unet", "U-Net (cross-attention keys and values)", self.unet_modules),
                                  ("text_encoder", "text encoder", self.text_encoder_modules)):
            if not modules:
                continue
            top = self.top(by, n)
            peak = getattr(top[0], by) if top else 0.0
            lines.append(f"\nthe words the {what} changes most ({modules} modules; score relative to the first):")
            lines += [f"  {i + 1:3d}. {s.text!r:<24} {getattr(s, by) / peak if peak else 0.0:6.3f}"
                      for i, s in enumerate(top)]
        return "\n".join(lines)


def vocabulary(model: BaseModel) -> list[tuple[int, str]]:
    """(id, text) of every token of the first tokenizer but the special ones (begin, end, padding) and the byte
    pieces that are no text alone (a part of a multi-byte character, which reads as '�', or a control byte)."""
    tokenizer = model.tokenizers[0]
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    # CLIP's BPE marks a word's last piece with </w>; a piece without it starts a longer word ("zk" of "zkz")
    texts = [tokenizer.convert_tokens_to_string([t]).replace("</w>", "").strip()
             for t in tokenizer.convert_ids_to_tokens(ids)]
    return [(i, text) for i, text in zip(ids, texts, strict=True)
            if text and text.isprintable() and "\ufffd" not in text]


def token_states(model: BaseModel, token_ids: Sequence[int], clip_skip: int = 1) -> torch.Tensor:
    """``(tokens, 3, width)``: the U-Net's conditioning for each token alone, ``<bos> token <eos>`` (SDXL: both
    encoders' penultimate states, joined as the trainer joins them)."""
    states = []
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders, strict=True):
        ids = torch.tensor([[tokenizer.bos_token_id, t, tokenizer.eos_token_id] for t in token_ids])
        device = next(encoder.parameters()).device
        if model.is_sdxl:
            states.append(encoder(ids.to(device), output_hidden_states=True).hidden_states[-2])
        else:
            states.append(encode_prompt_ids(encoder, ids.to(device), clip_skip))
    return torch.cat(states, dim=-1).float().cpu()


def _specific_change(delta: Delta, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``‖ΔW (h − h̄)‖ / mean ‖W (h − h̄)‖`` for each row ``h`` of the vocabulary's states (a LoRA's ΔW applied as its
    two factors): the change the layer makes to this token beyond the one it makes to all, on the layer's scale."""
    centred = h.double() - h.double().mean(dim=0)
    moved = (centred @ delta.down.T) @ delta.up.T if delta.is_product else centred @ delta.matrix().T
    base = centred @ weight.detach().double().reshape(weight.shape[0], -1).T
    return moved.norm(dim=-1) / base.norm(dim=-1).mean().clamp_min(1e-12)


@torch.no_grad()
def interrogate(model: BaseModel, adapter: str | os.PathLike | AdapterSpec, *, clip_skip: int = 1,
                batch_size: int = 256, progress: Callable[[int], None] | None = None) -> Interrogation:
    """Score every token (see the module doc); ``progress(n)`` is told each batch's size."""
    spec = parse_adapter_spec(adapter)
    file = read_adapter(spec.path)
    deltas = file_deltas(file, model, spec=spec, layer_updates=True)  # strict: a file for another model fails
    layers = layers_by_name(model)
    readers = {n: d for n, d in deltas.items() if n.endswith(CROSS_ATTENTION_READERS) and len(d.shape) == 2}
    text_network = None
    if any(n.startswith("lora_te") for n in deltas):  # the text encoders with the adapter's modules, switchable
        text_network, _ = load_network(file, None, model.text_encoders)
    if not readers and text_network is None:
        raise ToolError(f"{spec.path}: neither text-encoder modules nor cross-attention key/value modules "
                        "(attn2.to_k/to_v): nothing in it reads the words, so no word can be told apart")
    weight = module_weights(file, spec=spec)
    text_modules = len(text_network) if text_network is not None else 0
    tokens = vocabulary(model)
    token_state, text_scores = [], []  # each token's own state (what the U-Net reads of it), the text scores
    try:
        for start in range(0, len(tokens), batch_size):
            ids = [i for i, _ in tokens[start:start + batch_size]]
            if text_network is not None:
                text_network.set_multiplier(0.0)
            states = token_states(model, ids, clip_skip)
            token_state.append(states[:, 1])
            if text_network is not None:
                text_network.set_multiplier(1.0, weight)
                text_scores.append((token_states(model, ids, clip_skip) - states).abs().mean(dim=(1, 2)))
            if progress is not None:
                progress(len(ids))
    finally:
        if text_network is not None:
            text_network.remove()
    te = torch.cat(text_scores).tolist() if text_scores else [None] * len(tokens)
    unet = [None] * len(tokens)
    if readers:
        h = torch.cat(token_state)
        unet = torch.stack([_specific_change(d, layers[n].weight, h) for n, d in readers.items()]).mean(0).tolist()
    scores = [TokenScore(i, text, te[k], unet[k]) for k, (i, text) in enumerate(tokens)]
    return Interrogation(str(spec.path), scores, text_modules, len(readers))


@dataclass
class EmbeddingNeighbours:
    """For each vector of a textual-inversion embedding (per text encoder), the vocabulary's words whose input
    embeddings point the same way (cosine), with the cosine: what the learned token resembles to the encoder."""

    source: str
    token: str | None
    neighbours: dict[str, list[list[tuple[str, float]]]]  # encoder -> per vector -> (word, cosine)

    def summary(self) -> str:
        lines = [f"lorakit interrogate: {self.source}: a textual-inversion embedding"
                 + (f" for {self.token!r}" if self.token else "")]
        for encoder, vectors in self.neighbours.items():
            for k, words in enumerate(vectors):
                listed = ", ".join(f"{w!r} {c:.2f}" for w, c in words)
                lines.append(f"  {encoder} vector {k + 1}: nearest words {listed}")
        return "\n".join(lines)


@torch.no_grad()
def embedding_neighbours(model: BaseModel, path: str | os.PathLike, top: int = 8) -> EmbeddingNeighbours:
    """The ``top`` nearest vocabulary words (``vocabulary``) of each vector of an embedding file, by cosine in each
    encoder's own input embeddings."""
    from lorakit.embeddings import ENCODER_KEYS, EmbeddingError, read_embedding

    vectors, token = read_embedding(path)
    if len(vectors) != len(model.text_encoders):
        raise ToolError(f"{path}: an embedding for {len(vectors)} text encoder(s), and this model has "
                        f"{len(model.text_encoders)}")
    tokens = vocabulary(model)
    ids = torch.tensor([i for i, _ in tokens])
    found: dict[str, list[list[tuple[str, float]]]] = {}
    for name, vecs, encoder in zip(ENCODER_KEYS, vectors, model.text_encoders, strict=False):
        table = encoder.get_input_embeddings().weight.detach().float().cpu()[ids]
        vecs = vecs.detach().float().cpu().reshape(-1, vecs.shape[-1])
        if vecs.shape[-1] != table.shape[-1]:
            raise EmbeddingError(f"{path}: vectors of size {vecs.shape[-1]}, and the model's {name} encoder takes "
                                 f"{table.shape[-1]}")
        cosine = torch.nn.functional.normalize(vecs, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
        best = cosine.topk(min(top, len(tokens)), dim=-1)
        found[name if len(vectors) > 1 else "text encoder"] = [
            [(tokens[int(j)][1], float(c)) for c, j in zip(row_c, row_j, strict=True)]
            for row_c, row_j in zip(best.values, best.indices, strict=True)]
    return EmbeddingNeighbours(str(path), token, found)
