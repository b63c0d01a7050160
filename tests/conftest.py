"""Shared fixtures: SD1.5-shaped models on the meta device, tiny real models (built by model_helpers)."""

from __future__ import annotations

import os

import pytest
import torch
from model_helpers import SD15_TE, build_tiny_text_encoder, build_tiny_unet

# tiny models on 2 shared cores: one thread is ~100x faster than two threads fighting over them
torch.set_num_threads(1)
# and so do the `lorakit` commands tests run in child processes (torch would take both cores, beside a busy worker)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `lorakit train` run in a test process would switch the worker's malloc for the rest of the session (it keeps
# freed memory for reuse, lorakit.host_memory); tests of that switch run it in child processes of their own
os.environ.setdefault("LORAKIT_KEEP_FREED_MEMORY", "0")


def pytest_collection_modifyitems(config, items):
    """The end-to-end tests (marked slow, a minute or more each) first: pytest-xdist hands tests out in
    collection order, so the short ones fill the gaps at the end instead of one long test running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort keeps the rest's order


@pytest.fixture(scope="module")
def base():
    """The built-in model, loaded once per test module (the tools' tests leave it as they found it)."""
    from lorakit.models import builtin_model_path, load_base_model

    if not (builtin_model_path() / "model_index.json").is_file():
        pytest.skip("the built-in model is not shipped in this checkout")
    return load_base_model(None)


@pytest.fixture(scope="session")
def sd15_meta():
    """(unet, text_encoder) shaped like SD1.5, on the meta device: names and shapes, no memory."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        te = CLIPTextModel(CLIPTextConfig(**SD15_TE))
    return unet, te


@pytest.fixture
def tiny_unet():
    return build_tiny_unet()


@pytest.fixture
def tiny_text_encoder():
    return build_tiny_text_encoder()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in model's architecture with random weights (build_components(0)) as a diffusers folder:
    what lorakit/world/base_model/ holds once pretraining ships, without depending on it."""
    from lorakit.world.model import build_components
    from lorakit.world.pretrain import export_pipeline

    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    export_pipeline(build_components(0), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """A tiny SD2.x-kind model (model_helpers.build_tiny_sd2_components(0)) as a diffusers folder."""
    from model_helpers import build_tiny_sd2_components

    from lorakit.world.pretrain import export_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd2") / "model"
    export_pipeline(build_tiny_sd2_components(0), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL-kind model (model_helpers.build_tiny_sdxl_components(0)) as a diffusers folder."""
    from model_helpers import build_tiny_sdxl_components, export_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny_sdxl") / "model"
    export_sdxl_pipeline(build_tiny_sdxl_components(0), folder)
    return folder
