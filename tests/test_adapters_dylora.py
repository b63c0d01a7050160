"""DyLoRA: every training step is the LoRA cut to a sampled multiple of the block size, with the scale a reader
of the cut file applies; only the last block of that step learns; the file is a plain LoRA file, and
``resize --rank N`` of a DyLoRA file is the truncated factors (not an SVD)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.adapters import ALGORITHMS, detect_algorithm, make_adapter

LAYERS = {
    "linear": (lambda: nn.Linear(24, 20), (3, 5, 24)),
    "conv3x3": (lambda: nn.Conv2d(12, 20, 3, stride=2, padding=1), (2, 12, 7, 7)),
}


def trained_like(layer: str, rank: int = 8, block_size: int = 2, alpha: float = 3.0):
    factory, shape = LAYERS[layer]
    torch.manual_seed(0)
    adapter = make_adapter("dylora", factory(), rank=rank, alpha=alpha, block_size=block_size)
    with torch.no_grad():
        adapter.lora_up.weight.normal_(0, 0.3)
    return adapter, torch.randn(shape)


def cut(adapter, n: int):
    """The adapter's file cut to rank n and loaded as what it is: a plain LoRA."""
    tensors = adapter.file_tensors()
    tensors["lora_down.weight"] = tensors["lora_down.weight"][:n]
    tensors["lora_up.weight"] = tensors["lora_up.weight"][:, :n]
    assert detect_algorithm(tensors) == "lora"
    return ALGORITHMS["lora"].from_file_tensors(copy.deepcopy(adapter.base), tensors)


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_a_training_step_at_rank_n_is_the_file_cut_to_n(layer, n):
    adapter, x = trained_like(layer)
    adapter.train()
    adapter.train_rank = n
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), cut(adapter, n)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_outside_training_it_is_the_full_lora(layer):
    adapter, x = trained_like(layer)
    adapter.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), cut(adapter, 8)(x), rtol=1e-5, atol=1e-5)


def test_only_the_last_block_of_the_step_learns():
    adapter, x = trained_like("linear")
    adapter.train()
    adapter.train_rank = 6
    adapter(x).square().sum().backward()
    down, up = adapter.lora_down.weight.grad, adapter.lora_up.weight.grad
    assert down[:4].abs().max() == 0 and up[:, :4].abs().max() == 0  # blocks before: detached
    assert down[4:6].abs().min() > 0 and up[:, 4:6].abs().max() > 0  # the sampled block
    assert down[6:].abs().max() == 0 and up[:, 6:].abs().max() == 0  # blocks after: not in the step


def test_sampled_ranks_are_the_multiples_of_the_block_size():
    adapter, x = trained_like("linear")
    torch.manual_seed(3)
    seen = {adapter.sample_rank() for _ in range(200)}
    assert seen == {2, 4, 6, 8}


def test_rank_must_be_a_multiple_of_the_block_size():
    with pytest.raises(ValueError, match="multiple of block_size"):
        make_adapter("dylora", nn.Linear(8, 8), rank=6, block_size=4)


def test_resize_of_a_dylora_file_truncates_its_factors(tmp_path):
    """kohya's DyLoRA metadata (networks.dylora, unit) makes ``resize --rank N`` keep the first N ranks: the
    cut file's ΔW is (alpha / N) · up[:, :N] @ down[:N], which an SVD resize would not give."""
    from lorakit.formats import read_adapter
    from lorakit.tools.lowrank import RankRule
    from lorakit.tools.resize import resize_adapter

    adapters = {"lora_unet_a": trained_like("linear")[0], "lora_unet_b": trained_like("conv3x3")[0]}
    with torch.no_grad():
        adapters["lora_unet_b"].lora_down.weight.mul_(1.5)
    tensors = {f"{name}.{k}": v.contiguous() for name, a in adapters.items() for k, v in a.file_tensors().items()}
    path = tmp_path / "dy.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "networks.dylora",
                                   "ss_network_args": json.dumps({"unit": "2"})})
    result = resize_adapter(path, RankRule(rank=4))
    out = tmp_path / "cut.safetensors"
    result.write(out, [path])
    cut_file = read_adapter(out).modules()
    for name, adapter in adapters.items():
        expected = cut(adapter, 4).delta_weight()
        got = ALGORITHMS["lora"].from_file_tensors(copy.deepcopy(adapter.base), cut_file[name]).delta_weight()
        assert cut_file[name]["lora_down.weight"].shape[0] == 4
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of its block size 2"):
        resize_adapter(path, RankRule(rank=3))


def test_kohya_unit_is_the_block_size():
    assert make_adapter("dylora", nn.Linear(8, 8), rank=4, unit=2).block_size == 2
