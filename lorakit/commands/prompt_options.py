"""Options the commands that draw images with trained adapters share (not a command): how prompts are read."""

from __future__ import annotations

import argparse

from lorakit.metadata import TOKEN_LENGTHS


def add_prompt_reading_arguments(parser: argparse.ArgumentParser, files: str) -> None:
    """``--clip-skip`` and ``--max-token-length``, defaulting to what ``files`` (the adapters, the checkpoints)
    were trained with (``lorakit.sample.trained_text_settings``)."""
    parser.add_argument("--clip-skip", type=int, default=None,
                        help="read prompts from the text encoder's N-th layer from the end, as kohya and A1111 count "
                             f"(1 = last); default: what the {files} were trained with (ss_clip_skip), else 1")
    parser.add_argument("--max-token-length", type=int, choices=TOKEN_LENGTHS, default=None,
                        help="read prompts of up to this many tokens in chunks of 75, as kohya trains; default: what "
                             f"the {files} were trained with (ss_max_token_length), else 75")
