"""lorakit: personalize text-to-image diffusion models with the LoRA family, and stop before they overfit."""

__version__ = "0.1.0"
