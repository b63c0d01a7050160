"""A1111's extra-network tags in a prompt (``<lora:name:0.8>``, ``<lyco:…>``, ``<hypernet:…>``).  A1111 and Forge
take them off the prompt and load the adapter they name; lorakit's commands take adapters as arguments, and a tag
left in a prompt would reach the text encoder as words, so prompts copied from A1111 are refused with the
argument that means the same."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<\s*(lora|lyco|hypernet)\s*:\s*([^:<>]+?)\s*(?::\s*([^<>]*?)\s*)?>", re.IGNORECASE)


@dataclass(frozen=True)
class NetworkTag:
    text: str  # as written in the prompt
    name: str
    multiplier: str  # as written (A1111's default 1); a block-weight suffix is kept: lorakit's ADAPTER:MULT:LBW


def find_network_tag(text: str) -> NetworkTag | None:
    """The first extra-network tag of ``text``, or None."""
    m = _TAG.search(text)
    if m is None:
        return None
    return NetworkTag(m[0], m[2], m[3] or "1")


def network_tag_problem(text: str, evaluating: bool = False) -> str | None:
    """What to say about a prompt holding an extra-network tag (None when it holds none): where the adapter goes
    instead, for ``lorakit sample`` and a run's samples, or for ``lorakit eval`` (``evaluating``)."""
    tag = find_network_tag(text)
    if tag is None:
        return None
    instead = (f"lorakit eval judges the checkpoints given as its arguments ({tag.name}.safetensors)" if evaluating
               else f"lorakit sample takes adapters as arguments ({tag.name}.safetensors:{tag.multiplier}), and a "
                    "run draws its samples with the adapter it trains")
    return (f"{tag.text} is A1111's prompt syntax for loading an adapter, which lorakit does not read from prompts "
            f"(it would be drawn as words): leave it out; {instead}")
