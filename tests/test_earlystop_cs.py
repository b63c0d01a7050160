"""CS (eq. 2): the low-rank identities equal the delta_weight() path; zero updates give 0; native fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorakit.adapters import ALGORITHMS, make_adapter
from lorakit.adapters.lora import LoRA
from lorakit.earlystop import CSMeter, cs_native, cs_value, layer_cosines
from lorakit.earlystop.cs import adapter_terms, lowrank_terms

# the algorithms that update a weight matrix, which CS reads (a norm layer's update is left out of it)
MATRIX_ALGORITHMS = sorted(name for name in ALGORITHMS if name != "norm")


def randomize(adapter: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Random values in every adapter tensor (a fresh LoRA has B = 0), in the base layer's dtype."""
    adapter.to(adapter.base.weight.dtype)  # adapters create their factors in the default dtype
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if not name.startswith("base."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# what an algorithm needs to fit every layer below: BOFT a block size bound ≥ 10 (40 = 10 · 4 channels), DyLoRA a
# rank that is a multiple of its block size
SIZES = {"boft": {"rank": 10}, "dylora": {"rank": 2, "block_size": 2}}


def sized(algorithm: str) -> dict:
    return SIZES.get(algorithm, {"rank": 2})


def layers(dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(24, 16, dtype=dtype), nn.Linear(16, 40, bias=False, dtype=dtype),
            nn.Conv2d(8, 12, 3, padding=1, dtype=dtype), nn.Conv2d(12, 6, 1, dtype=dtype),
            nn.Conv2d(4, 10, (3, 1), stride=2, dtype=dtype)]


def randomized_adapters(algorithm: str, seed: int) -> list[nn.Module]:
    """One adapter on each of ``layers()``, every tensor random (layer k seeded ``seed + k``)."""
    adapters = []
    for i, base in enumerate(layers()):
        adapter = make_adapter(algorithm, base, **sized(algorithm))
        randomize(adapter, seed=seed + i, scale=0.1)
        adapters.append(adapter)
    return adapters


def dense_cos(adapter: nn.Module) -> float:
    d = adapter.delta_weight().detach().double().reshape(-1)
    w = adapter.original_weight.detach().double().reshape(-1)
    return float(d @ w / (d.norm() * w.norm()))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_lowrank_path_equals_the_delta_weight_path(dtype, rtol):
    adapters = []
    for i, base in enumerate(layers(dtype)):
        adapter = LoRA(base, rank=1 + i, alpha=0.5 + i, multiplier=[1.0, 0.7, -1.3, 2.0, 1.0][i])
        randomize(adapter, seed=i)
        adapters.append(adapter)
    fast, slow = layer_cosines(adapters), layer_cosines(adapters, fast=False)
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(fast, torch.tensor([dense_cos(a) for a in adapters], dtype=torch.float64),
                               rtol=rtol, atol=1e-7)
    assert (fast.abs() > 1e-3).all()  # non-trivial cosines: the comparison means something
    for a in adapters:  # and the terms themselves, not only their ratio
        for x, y in zip(adapter_terms(a), adapter_terms(a, fast=False), strict=True):
            torch.testing.assert_close(x, y, rtol=rtol * 10, atol=1e-9)
    assert cs_value(adapters) == pytest.approx(float(slow.mean()), rel=rtol)


def test_hand_computed_two_by_two():
    """W = I, BA = [[1, 1], [0, 0]]: <BA, W> = 1, ‖BA‖ = ‖W‖ = √2, cos = 1/2 (and -1/2 at multiplier -1)."""
    base = nn.Linear(2, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    adapter = LoRA(base, rank=1, alpha=1)
    with torch.no_grad():
        adapter.lora_down.weight.copy_(torch.tensor([[1.0, 1.0]]))
        adapter.lora_up.weight.copy_(torch.tensor([[1.0], [0.0]]))
    dot, delta_sq = lowrank_terms(adapter.lora_down.weight, adapter.lora_up.weight, base.weight)
    assert (float(dot), float(delta_sq)) == (1.0, 2.0)
    assert cs_value([adapter]) == pytest.approx(0.5, abs=1e-15)
    assert cs_value([adapter], fast=False) == pytest.approx(0.5, abs=1e-15)
    adapter.multiplier = -1.0
    assert cs_value([adapter]) == pytest.approx(-0.5, abs=1e-15)


@pytest.mark.parametrize("algorithm", MATRIX_ALGORITHMS)
def test_zero_update_at_initialisation_gives_zero_not_nan(algorithm):
    adapters = [make_adapter(algorithm, base, **sized(algorithm)) for base in layers(torch.float32)]
    for fast in (True, False):
        values = layer_cosines(adapters, fast=fast)
        if algorithm in ("lora", "loha", "lokr", "ia3", "full"):
            assert torch.equal(values, torch.zeros_like(values))
        assert not values.isnan().any()


@pytest.mark.parametrize("algorithm", MATRIX_ALGORITHMS)
def test_every_adapter_works_through_delta_weight(algorithm):
    adapters = randomized_adapters(algorithm, seed=10)
    expected = torch.tensor([dense_cos(a) for a in adapters], dtype=torch.float64)
    torch.testing.assert_close(layer_cosines(adapters), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{"use_tucker": True}, {"dora": True}])
def test_tucker_and_dora_fall_back_to_delta_weight(options):
    base = nn.Conv2d(6, 8, 3, padding=1, dtype=torch.float64)
    adapter = LoRA(base, rank=3, alpha=2, **options)
    randomize(adapter, seed=5, scale=0.2)
    if "dora" in options:
        with torch.no_grad():  # a magnitude that is not just ‖W0‖, so ΔW is not the low-rank term alone
            adapter.dora_scale.mul_(1.5)
    assert cs_value([adapter]) == pytest.approx(dense_cos(adapter), rel=1e-12)
    if "dora" in options:  # the low-rank identity alone would be wrong here
        lowrank = lowrank_terms(adapter.lora_down.weight, adapter.lora_up.weight, base.weight)
        w = base.weight.reshape(-1)
        assert float(lowrank[0] / (lowrank[1].sqrt() * w.norm())) != pytest.approx(dense_cos(adapter), rel=1e-3)


def test_merged_adapter_is_measured_against_the_original_weight():
    adapter = LoRA(nn.Linear(12, 9, dtype=torch.float64), rank=3)
    randomize(adapter, seed=3)
    before = cs_value([adapter])
    adapter.merge()
    assert cs_value([adapter]) == pytest.approx(before, rel=1e-12)
    assert cs_value([adapter], fast=False) == pytest.approx(before, rel=1e-12)


def test_mappings_and_networks_are_accepted():
    adapters = {f"layer{i}": LoRA(base, rank=2) for i, base in enumerate(layers())}
    for i, a in enumerate(adapters.values()):
        randomize(a, seed=i)
    expected = cs_value(list(adapters.values()))
    assert cs_value(adapters) == expected
    assert cs_value(nn.ModuleDict(adapters)) == expected

    class Network:
        pass

    network = Network()
    network.adapters = nn.ModuleDict(adapters)
    assert cs_value(network) == expected
    with pytest.raises(ValueError):
        cs_value([])


def test_meter_caches_only_the_frozen_norms():
    adapters = [LoRA(base, rank=2) for base in layers()]
    meter = CSMeter(adapters)
    assert meter() == 0.0
    for i, a in enumerate(adapters):
        randomize(a, seed=i)
    assert meter() == pytest.approx(cs_value(adapters), rel=1e-12)
    with torch.no_grad():
        adapters[0].lora_up.weight.mul_(-1)
    assert meter() == pytest.approx(cs_value(adapters), rel=1e-12)


def test_native_fine_tuning_uses_w_minus_w0():
    torch.manual_seed(1)
    w0 = [torch.randn(5, 7, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)]
    w = [w0[0] + 0.1 * torch.randn(5, 7, dtype=torch.float64) + 0.05 * w0[0], w0[1].clone()]
    d = (w[0] - w0[0]).reshape(-1)
    expected0 = float(d @ w0[0].reshape(-1) / (d.norm() * w0[0].norm()))
    assert cs_native(zip(w, w0, strict=True)) == pytest.approx((expected0 + 0.0) / 2, rel=1e-12)
    value = cs_native([(w[1], w0[1])])  # unchanged weight: ΔW = 0 gives 0, not NaN
    assert value == 0.0 and not math.isnan(value)


@pytest.mark.parametrize("algorithm, options", [
    ("ia3", {}), ("ia3", {"on_input": True}),
    ("lokr", {}), ("lokr", {"factor": 2}), ("lokr", {"decompose_both": True}), ("lokr", {"full_matrix": True}),
    ("lokr", {"use_tucker": True}), ("lokr", {"unbalanced_factorization": True}),
], ids=str)
def test_ia3_and_lokr_short_forms_equal_the_delta_weight_terms(algorithm, options):
    adapters = []
    for i, base in enumerate(layers()):
        adapter = make_adapter(algorithm, base, rank=2, multiplier=[1.0, 0.7, -1.3, 2.0, 1.0][i], **options)
        randomize(adapter, seed=20 + i, scale=0.2)
        adapters.append(adapter)
    for a in adapters:
        for x, y in zip(adapter_terms(a), adapter_terms(a, fast=False), strict=True):
            assert float(y) != 0.0  # not vacuous
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    meter = CSMeter(adapters)
    torch.testing.assert_close(meter.layer_cosines(), layer_cosines(adapters, fast=False), rtol=1e-10, atol=1e-12)
    adapters[0].merge()  # measured against the original weight while merged, with the cached norms too
    assert meter() == pytest.approx(cs_value(adapters, fast=False), rel=1e-10)


@pytest.mark.parametrize("algorithm, options", [("oft", {"rank": 4, "constraint": 1e-2}),
                                                ("boft", {"rank": 6, "rescaled": True}),
                                                ("glora", {"rank": 2}), ("dylora", {"rank": 4, "block_size": 2})])
def test_cs_of_the_lycoris_family_is_the_cosine_of_delta_weight_with_w0(algorithm, options):
    """CS goes through delta_weight(): for OFT/BOFT that is ΔW = (R − I)·W0 (rescale included), built here
    independently from R applied to W0's rows, and its cosine with W0."""
    import torch.nn.functional as F
    from torch import nn

    from lorakit.adapters import make_adapter
    from lorakit.earlystop.cs import layer_cosines

    torch.manual_seed(0)
    adapters = [make_adapter(algorithm, nn.Linear(24, 48), **options),
                make_adapter(algorithm, nn.Conv2d(12, 48, 3, padding=1), **options)]
    with torch.no_grad():
        for adapter in adapters:
            for name, p in adapter.named_parameters():
                if not name.startswith("base."):
                    p.add_(0.2 * torch.randn_like(p))
    expected = []
    for adapter in adapters:
        w0 = adapter.base.weight.detach()
        if algorithm in ("oft", "boft"):
            rotated = adapter.rotate(w0, 0)
            if adapter.rescale is not None:
                rotated = rotated * adapter.rescale.detach()
            delta = rotated - w0
        else:
            delta = adapter.delta_weight().detach()
        expected.append(F.cosine_similarity(delta.reshape(1, -1), w0.reshape(1, -1)).item())
    got = layer_cosines(adapters).tolist()
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert all(abs(c) > 1e-3 for c in got)


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "ia3", "full"])
def test_the_update_size_is_the_norm_of_delta_w_over_the_norm_of_w(algorithm):
    """``read()`` gives CS and mean ‖ΔW‖/‖W0‖ from the same sums, through each adapter's short form."""
    adapters = randomized_adapters(algorithm, seed=20)
    sizes = [float(a.delta_weight().detach().double().norm() / a.original_weight.detach().double().norm())
             for a in adapters]
    reading = CSMeter(adapters).read()
    assert reading.update == pytest.approx(sum(sizes) / len(sizes), rel=1e-9)
    assert reading.cs == pytest.approx(CSMeter(adapters)(), rel=1e-12)
    assert reading.update > 0


def test_native_reading_has_the_update_size_too():
    from lorakit.earlystop.cs import native_reading

    w0 = [torch.ones(4, 4, dtype=torch.float64), torch.ones(3, 3, dtype=torch.float64)]
    w = [w0[0] * 1.5, w0[1].clone()]  # ΔW = 0.5 W0 in the first, nothing in the second
    reading = native_reading(zip(w, w0, strict=True))
    assert reading.update == pytest.approx((0.5 + 0.0) / 2) and reading.cs == pytest.approx((1.0 + 0.0) / 2)


def _svd_top(matrix: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(matrix.detach().double().reshape(matrix.shape[0], -1))[0])


@pytest.mark.parametrize("algorithm, options", [
    ("lora", {}), ("lora", {"multiplier": -0.7}), ("loha", {}), ("lokr", {}), ("lokr", {"factor": 2}),
    ("lokr", {"decompose_both": True}), ("lokr", {"use_tucker": True}), ("ia3", {}), ("full", {}),
    ("lora", {"dora": True}),
], ids=str)
def test_the_spectral_size_is_the_top_singular_value_of_delta_w_over_that_of_w(algorithm, options):
    """``read(spectral=True)``: mean over layers of σ1(ΔW)/σ1(W0), through LoRA's r×r Grams and LoKr's factors,
    equal to an SVD of the materialised ΔW; off by default (it is read at epoch ends only)."""
    from lorakit.earlystop.cs import delta_spectral_norm

    adapters = []
    for i, base in enumerate(layers()):
        adapter = make_adapter(algorithm, base, rank=2, **options)
        randomize(adapter, seed=40 + i, scale=0.2)
        adapters.append(adapter)
    for a in adapters:
        assert float(delta_spectral_norm(a)) == pytest.approx(_svd_top(a.delta_weight()), rel=1e-9)
    ratios = [_svd_top(a.delta_weight()) / _svd_top(a.original_weight) for a in adapters]
    meter = CSMeter(adapters)
    assert meter.read().spectral is None
    reading = meter.read(spectral=True)
    assert reading.spectral == pytest.approx(sum(ratios) / len(ratios), rel=1e-9) and reading.spectral > 0
    assert reading.update == pytest.approx(meter.read().update, rel=1e-12)


def test_a_rank_one_update_is_spectrally_larger_than_a_spread_one_of_the_same_frobenius_size():
    from lorakit.earlystop.cs import native_reading

    w0 = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    u, v = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), torch.tensor([0, 0.6, 0.8, 0], dtype=torch.float64)
    focused = native_reading([(w0 + 3 * torch.outer(u, v), w0)], spectral=True)  # ‖ΔW‖ = 3, σ1 = 3
    spread = native_reading([(w0 + 1.5 * torch.eye(4, dtype=torch.float64), w0)], spectral=True)  # ‖ΔW‖ 3, σ1 1.5
    assert focused.update == pytest.approx(spread.update)
    assert focused.spectral == pytest.approx(3 / 4) and spread.spectral == pytest.approx(1.5 / 4)
    assert native_reading([(w0 * 1.5, w0)]).spectral is None  # only when asked for
