"""The LoRA family on one protocol (see ``base.py``)."""

from lorakit.adapters.base import Adapter, AdapterShapeError

__all__ = ["Adapter", "AdapterShapeError"]
