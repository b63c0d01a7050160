"""Stability AI's ModelSpec entries (``modelspec.*``, spec 1.0.1) in the metadata of the files lorakit trains.

kohya writes them beside its ``ss_*`` entries, and model managers, ComfyUI nodes and model sites read them: the
title a file is listed under, the base model family it needs (``modelspec.architecture``), its resolution, how
its base model predicts, and the words that call it up (``modelspec.trigger_phrase``).  The values follow
kohya's choices for SD1.x and SD2.x: ``stable-diffusion-v1/lora`` (``stable-diffusion-v2-512``,
``stable-diffusion-v2-768-v``) with the ``diffusers`` implementation for an adapter,
``stable-diffusion-v1/textual-inversion`` with Stability AI's for an embedding; SDXL's adapters are
``stable-diffusion-xl-v1-base/lora`` with Stability AI's implementation, as kohya's SDXL scripts write them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping

SPEC_VERSION = "1.0.1"
ARCHITECTURE_SD1 = "stable-diffusion-v1"
ARCHITECTURE_SD2 = "stable-diffusion-v2-512"
ARCHITECTURE_SD2_V = "stable-diffusion-v2-768-v"
ARCHITECTURE_SDXL = "stable-diffusion-xl-v1-base"
IMPLEMENTATION_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
#: what a file holds -> (the architecture's suffix, the implementation kohya names for SD1.x and SD2.x)
KINDS = {
    "lora": ("lora", "diffusers"),
    "textual-inversion": ("textual-inversion", IMPLEMENTATION_STABILITY_AI),
}
#: the user's own entries, as kohya's --metadata_<name> options
USER_FIELDS = ("title", "author", "description", "license", "tags")


def modelspec_date(now: datetime.datetime | None = None) -> str:
    """``modelspec.date``: ``now`` (default: this moment, UTC) to the second, ISO 8601 as kohya writes it."""
    return (now or datetime.datetime.now(datetime.UTC)).replace(microsecond=0).isoformat()


def architecture(family: str, prediction_type: str) -> str:
    """The base model's ModelSpec architecture, as kohya names it: SD2.x's by its prediction type (a v model is the
    768 one)."""
    if family == "sdxl":
        return ARCHITECTURE_SDXL
    if family == "sd2":
        return ARCHITECTURE_SD2_V if prediction_type == "v_prediction" else ARCHITECTURE_SD2
    return ARCHITECTURE_SD1


def modelspec_metadata(kind: str, *, title: str, resolution: tuple[int, int], prediction_type: str,
                       family: str = "sd1", clip_skip: int = 1, timesteps: tuple[int, int] | None = None,
                       triggers: Iterable[str] = (), user: Mapping[str, str | None] | None = None,
                       now: datetime.datetime | None = None) -> dict[str, str]:
    """The ``modelspec.*`` entries of a file of ``kind`` ("lora": any adapter of the LoRA family; "textual-
    inversion") for a base model of ``family`` ("sd1", "sd2", "sdxl"): ``prediction_type`` as diffusers names it
    ("epsilon", "v_prediction"), ``clip_skip`` 1 for none, ``timesteps`` the trained range when it was narrowed,
    ``user`` the entries a person set (title, author, description, license, tags; None or "" left out).  The date
    is ``now`` (UTC) to the second."""
    suffix, implementation = KINDS[kind]
    user = {k: v for k, v in (user or {}).items() if v}
    unknown = sorted(set(user) - set(USER_FIELDS))
    if unknown:
        raise ValueError(f"unknown ModelSpec entries {unknown}; known: {', '.join(USER_FIELDS)}")
    entries = {
        "sai_model_spec": SPEC_VERSION,
        "architecture": f"{architecture(family, prediction_type)}/{suffix}",
        # kohya names Stability AI's code for an SDXL adapter (its key names are the original U-Net's)
        "implementation": IMPLEMENTATION_STABILITY_AI if family == "sdxl" else implementation,
        "title": user.pop("title", None) or title,
        "resolution": f"{resolution[0]}x{resolution[1]}",
        "date": modelspec_date(now),
        "prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        **user,
    }
    if clip_skip > 1:
        entries["encoder_layer"] = str(clip_skip)
    if timesteps is not None:
        entries["timestep_range"] = f"{timesteps[0]},{timesteps[1]}"
    words = list(dict.fromkeys(t for t in triggers if t))  # in order, once each
    if words:
        entries["trigger_phrase"] = ", ".join(words)
    return {f"modelspec.{k}": v for k, v in entries.items()}


def as_embedding(metadata: Mapping[str, str], token: str) -> dict[str, str]:
    """An adapter's metadata made an embedding's (pivotal tuning saves both from one record): its architecture,
    implementation and trigger are the embedding's own."""
    out = dict(metadata)
    if "modelspec.architecture" in out:
        suffix, implementation = KINDS["textual-inversion"]
        base = out["modelspec.architecture"].split("/")[0]
        out["modelspec.architecture"] = f"{base}/{suffix}"
        out["modelspec.implementation"] = implementation
        out["modelspec.trigger_phrase"] = token
    return out
