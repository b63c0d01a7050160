"""Keep third-party noise off lorakit's commands.

Libraries lorakit builds on print things that are not about the user's input: transformers says an image
processor it never uses would like torchvision, transformers and huggingface_hub draw "Loading weights" bars,
diffusers warns about dtype casts it does itself, and schedulers trip numpy deprecations.  A person running
``lorakit train`` should see lorakit's own lines, warnings about their data and settings among them, and nothing
else; ``--verbose`` brings the libraries' output back for debugging.

This must run before those libraries are imported: their verbosity and progress-bar switches are read from the
environment at import time.
"""

from __future__ import annotations

import logging
import os
import warnings

#: the libraries whose own warnings and progress bars are silenced (lorakit's warnings are never touched)
THIRD_PARTY = ("transformers", "diffusers", "accelerate", "huggingface_hub", "torch", "numpy", "safetensors",
               "peft", "lycoris", "matplotlib", "PIL", "tqdm", "bitsandbytes")

_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also turns off transformers' "Loading weights" bar
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of tokenizers
}


def silence_third_party() -> None:
    """Silence the libraries' own log output, progress bars and Python warnings, for this process and children.

    A variable the user set themselves is left as it is.
    """
    for name, value in _ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    pattern = r"(" + "|".join(THIRD_PARTY) + r")(\.|$)"
    # warnings attributed to library code; lorakit's own (about the user's images, captions, settings) stay
    warnings.filterwarnings("ignore", module=pattern)
    # and the ones the libraries raise with a stacklevel that points at lorakit's call site
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # their loggers (bitsandbytes logs, on a CPU, that an optional kernel package is missing): errors only
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
