"""The trainer's optimizers: AdamW takes torch's fused kernel where it can, and it is the same AdamW."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import OptimizerConfig
from lorakit.optimizers import OPTIMIZERS, can_fuse


def _params(seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((8, 40), (40, 8), (16,))]


def test_adamw_is_fused_on_the_cpu_and_matches_the_loop_version():
    opt_cfg = OptimizerConfig()
    opt_cfg.weight_decay = 0.01
    fused_params, loop_params = _params(0), _params(0)
    fused = OPTIMIZERS["adamw"]([{"params": fused_params, "lr": 1e-2}], opt_cfg)
    loop = torch.optim.AdamW([{"params": loop_params, "lr": 1e-2}], betas=tuple(opt_cfg.betas), weight_decay=0.01)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_params, loop_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    assert not torch.equal(fused_params[0], _params(0)[0])  # the steps moved the weights
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_not_fused_where_the_kernel_cannot_run():
    cpu = nn.Parameter(torch.zeros(3))
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    assert can_fuse([{"params": [cpu]}])
    assert not can_fuse([{"params": [cpu]}, {"params": [meta]}])  # two devices
    assert not can_fuse([{"params": [meta]}])  # no kernel for the meta device
