"""What the U-Net is conditioned on for a batch of texts: the text encoder's states and, for SDXL, the second
encoder's pooled output and the image size (its "text_time" added conditioning).

SD1.x/2.x: ``lorakit.prompt_weights.encode_texts`` (the last layer, or a clip skip).  SDXL, as kohya trains it
(``get_hidden_states_sdxl``) and diffusers samples it: each encoder's penultimate hidden states, without the
final layer norm, joined along the width (768 + 1280 = 2048 for SDXL 1.0); the pooled output is the second
encoder's projected EOS state of the first 75-token chunk; the size conditioning is (original height, width, crop
top, left, target height, width): in training each image's as kohya computes it (``lorakit.data.buckets.
size_condition``), without images (samples, or a batch that does not say) (h, w, 0, 0, h, w), as diffusers samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.models import BaseModel, join_chunk_states, tokenize_prompts
from lorakit.prompt_weights import apply_weights, encode_texts, weighted_token_ids


@dataclass(frozen=True)
class Conditioning:
    """The text side of a U-Net call: ``states`` (batch, tokens, width) for cross-attention; SDXL's ``pooled``
    (batch, width of the second encoder's projection), else None."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def unet_kwargs(self, height: int, width: int, dtype: torch.dtype,
                    sizes: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel`` beside the states: SDXL's added conditioning for images
        of ``height`` × ``width`` pixels (``sizes``: each image's six numbers, when known); nothing for SD1.x/2.x."""
        if self.pooled is None:
            return {}
        if sizes is None:
            sizes = [(height, width, 0, 0, height, width)] * self.pooled.shape[0]
        ids = torch.tensor([list(s) for s in sizes], dtype=dtype, device=self.pooled.device)
        return {"added_cond_kwargs": {"text_embeds": self.pooled.to(dtype), "time_ids": ids}}


def encode_conditioning(model: BaseModel, texts: list[str], *, weighted: bool = False, clip_skip: int = 1,
                        max_token_length: int = 75, device: torch.device | str = "cpu",
                        text_encoders: Sequence[torch.nn.Module] | None = None) -> Conditioning:
    """The conditioning for ``texts`` as the trainer and the sampler read them; ``weighted``: A1111's ``(word:1.2)``
    syntax read as weights.  ``text_encoders``: the modules to run (accelerate's wrappers in a distributed run),
    default the model's own."""
    encoders = tuple(text_encoders) if text_encoders is not None else model.text_encoders
    if not model.is_sdxl:
        return Conditioning(encode_texts(model.tokenizer, encoders[0], texts, weighted=weighted, clip_skip=clip_skip,
                                         max_token_length=max_token_length, device=device))
    parts, pooled, weights = [], None, None
    for tokenizer, encoder in zip(model.tokenizers, encoders, strict=True):
        if weighted:  # the two tokenizers split a text alike; only their padding differs
            ids, weights = weighted_token_ids(tokenizer, texts, max_token_length)
        else:
            ids = tokenize_prompts(tokenizer, texts, max_token_length)
        ids = ids.to(device)
        out = encoder(ids.reshape(-1, ids.shape[-1]), output_hidden_states=True)
        parts.append(join_chunk_states(out.hidden_states[-2], ids))
        if getattr(out, "text_embeds", None) is not None:  # the second encoder's projection
            pooled = out.text_embeds.reshape(ids.shape[0], ids.shape[1], -1)[:, 0]
    states = torch.cat(parts, dim=-1)
    if weights is not None:
        states = apply_weights(states, weights)
    return Conditioning(states, pooled)


class ConditioningCache:
    """Each caption's conditioning, encoded once (kohya's ``cache_text_encoder_outputs``), for a run whose text
    encoders do not train and whose captions do not change from step to step.

    Every caption is encoded alone, so its row is the same whichever batch asks for it first: a resumed run, whose
    cache starts empty, trains exactly as a straight one.  Rows stay on the device they were encoded on, without
    gradients (the encoders are frozen)."""

    def __init__(self) -> None:
        self._rows: dict[str, Conditioning] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def conditioning(self, texts: Sequence[str], encode_one: Callable[[str], Conditioning]) -> Conditioning:
        """The conditioning of ``texts`` as one batch; ``encode_one`` encodes a caption not seen before."""
        for text in texts:
            if text not in self._rows:
                with torch.no_grad():
                    self._rows[text] = encode_one(text)
        rows = [self._rows[text] for text in texts]
        pooled = None if rows[0].pooled is None else torch.cat([r.pooled for r in rows])
        return Conditioning(torch.cat([r.states for r in rows]), pooled)
