"""The forwards that never build ΔW (LoHa's rank-r² product, LoKr's Kronecker chain, (IA)^3's scaled
output, DoRA's thin norms): each equals F.linear/conv(x, W0 + delta_weight()) and has the gradients of that
materialised reference, on every layer kind; the per-layer choice between paths follows the cost; the
adapter forwards trace into one graph (no graph breaks)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_adapters import LAYERS, build, close, plain, randomize, reference
from torch import nn

from lorakit.adapters import make_adapter
from lorakit.adapters.functional import (
    KR_GRADS_LOOP_FROM,
    khatri_rao_rows,
    khatri_rao_stack,
    khatri_rao_stack_grads,
    loha_factors,
    loha_weight,
)

# configurations whose forward has a path that does not materialise ΔW
FAST = [
    ("loha", {}),
    ("loha", {"alpha": 8.0}),
    ("loha", {"use_tucker": True}),
    ("lokr", {}),
    ("lokr", {"factor": 4}),
    ("lokr", {"decompose_both": True}),
    ("lokr", {"full_matrix": True}),
    ("lokr", {"use_tucker": True}),
    ("lokr", {"unbalanced_factorization": True}),
    ("ia3", {}),
    ("ia3", {"on_input": True}),
    ("lora", {"dora": True}),
    ("lora", {"dora": True, "wd_on_out": False}),
    ("lora", {"dora": True, "alpha": 0.5}),
    ("oft", {}),
    ("oft", {"constraint": 1e-3, "rescaled": True}),
    ("boft", {"rank": 6, "constraint": 1e-3, "rescaled": True}),
    ("glora", {"alpha": 1.0}),  # at alpha 8 (scale 4) float32 rounding alone exceeds the 1e-5 bound here
    ("glora", {"use_tucker": True}),
]
fast_cases = pytest.mark.parametrize("config", FAST, ids=[a + "".join(f"-{k}={v}" for k, v in o.items())
                                                          for a, o in FAST])
all_layers = pytest.mark.parametrize("layer", list(LAYERS))


def fast(adapter):
    """Pin the factorised path (LoHa/LoKr) and make any use of ΔW in forward an error."""
    if hasattr(adapter, "forward_path"):
        adapter.forward_path = "factorised"

    def no_delta(train):
        raise AssertionError("the fast path built ΔW")

    adapter._deltas = no_delta
    return adapter


def grads(adapter) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    adapter.zero_grad(set_to_none=True)
    return out


@fast_cases
@all_layers
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_fast_forward_equals_reference_with_its_gradients(config, layer, multiplier):
    algorithm, options = config
    adapter, x = build(algorithm, layer, multiplier=multiplier, **options)
    randomize(adapter)
    x = x.requires_grad_(True)
    expected = reference(adapter, x)  # materialised: W0 + delta_weight()
    expected.square().sum().backward()
    want, want_x = grads(adapter), x.grad.clone()
    x.grad = None
    assert want and all(g.abs().max() > 0 for g in want.values())  # not vacuous

    fast(adapter)
    for mode in (adapter.eval, adapter.train):  # no dropout configured: both modes are the same function
        mode()
        y = adapter(x)
        close(y, expected.detach())
        y.square().sum().backward()
        got = grads(adapter)
        assert set(got) == set(want)
        for name in want:
            close(got[name], want[name], tol=1e-4)
        close(x.grad, want_x, tol=1e-4)
        x.grad = None


@pytest.mark.parametrize("config", [c for c in FAST if c[0] in ("loha", "lokr", "oft", "boft")], ids=str)
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_factorised_and_materialised_forwards_agree(config, layer):
    algorithm, options = config
    a, x = build(algorithm, layer, multiplier=0.8, **options)
    randomize(a)
    b = copy.deepcopy(a)
    a.forward_path, b.forward_path = "factorised", "materialised"
    assert a.factorised_for(x) and not b.factorised_for(x)
    ya, yb = a(x), b(x)
    close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if p.grad is not None or q.grad is not None:
            close(p.grad, q.grad, tol=1e-4)


def test_loha_factors_reproduce_the_hadamard_product():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(5, 3), (3, 7), (5, 3), (3, 7)]]
    u, v, core = loha_factors(*w)
    assert u.shape == (5, 9) and v.shape == (9, 7) and core is None
    torch.testing.assert_close(u @ v, loha_weight(*w))
    tucker = [torch.randn(s, generator=g, dtype=torch.float64)
              for s in [(3, 5), (3, 4), (3, 5), (3, 4), (3, 3, 2, 3), (3, 3, 2, 3)]]
    u, v, core = loha_factors(*tucker)
    assert core.shape == (9, 9, 2, 3)
    torch.testing.assert_close(torch.einsum("oi,ijhw,jc->ochw", u, core, v), loha_weight(*tucker))
    a, b = torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g)
    torch.testing.assert_close(khatri_rao_rows(a, b)[2], torch.kron(a[2], b[2]))


def _autograd_chain(adapter, x):
    """LoHa's factorised forward through plain autograd (the path ``loha_chain`` replaces), for comparison."""
    adapter.rank_dropout = 1e-12  # a training-time dropout that drops nothing keeps the autograd path
    try:
        return adapter(x)
    finally:
        adapter.rank_dropout = 0.0


@all_layers
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "input_without_grad"])
def test_loha_chain_is_one_node_with_the_autograd_paths_values_and_gradients(layer, batch, layout):
    adapter, x = build("loha", layer, multiplier=0.7, alpha=3.0)
    randomize(adapter)
    adapter.forward_path = "factorised"
    adapter.train()
    x = torch.randn(batch, *x.shape[1:], dtype=torch.float64)
    adapter.double()
    if layout == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
        adapter.base.to(memory_format=torch.channels_last)
    x.requires_grad_(layout != "input_without_grad")
    expected = _autograd_chain(adapter, x)
    assert "LoHaChain" not in type(expected.grad_fn).__name__
    weights = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (expected * weights).sum().backward()
    want, want_x = grads(adapter), None if x.grad is None else x.grad.clone()
    x.grad = None

    y = adapter(x)
    assert type(y.grad_fn).__name__ == "_LoHaChainBackward"
    torch.testing.assert_close(y, expected.detach())
    (y * weights).sum().backward()
    got = grads(adapter)
    assert set(got) == set(want) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    if want_x is None:
        assert x.grad is None
    else:
        torch.testing.assert_close(x.grad, want_x)


@pytest.mark.parametrize("rows, columns", [(3, 50), (8, 50), (4, KR_GRADS_LOOP_FROM // 4), (8, 2900), (5, 7000)])
def test_khatri_rao_stack_grads_are_autograds_on_both_sides_of_the_loop_size(rows, columns):
    g = torch.Generator().manual_seed(rows * columns)
    p = torch.randn(rows, columns, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(rows + 1, columns, generator=g, dtype=torch.float64, requires_grad=True)  # m ≠ k
    grad = torch.randn(rows * (rows + 1), columns, generator=g, dtype=torch.float64)
    khatri_rao_stack(p, q).backward(grad)
    got_p, got_q = khatri_rao_stack_grads(grad, p.detach(), q.detach())
    torch.testing.assert_close(got_p, p.grad)
    torch.testing.assert_close(got_q, q.grad)


@pytest.mark.parametrize("shape", [(2900, 6), (6, 2900)], ids=["wide_input", "wide_output"])
def test_loha_chain_on_a_layer_wide_enough_for_the_row_loop(shape):
    n_in, n_out = shape
    adapter = make_adapter("loha", nn.Linear(n_in, n_out).requires_grad_(False), rank=8, alpha=3.0).double()
    randomize(adapter)
    adapter.forward_path = "factorised"
    assert 8 * max(n_in, n_out) >= KR_GRADS_LOOP_FROM  # the backward takes the loop on one side
    x = torch.randn(2, 5, n_in, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, n_out, dtype=torch.float64)
    (_autograd_chain(adapter, x) * weights).sum().backward()
    want, want_x = grads(adapter), x.grad.clone()
    x.grad = None
    y = adapter(x)
    assert type(y.grad_fn).__name__ == "_LoHaChainBackward"
    (y * weights).sum().backward()
    got = grads(adapter)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    torch.testing.assert_close(x.grad, want_x)


@pytest.mark.parametrize("algorithm", ["lora", "loha"])
def test_a_base_layer_trained_along_gets_its_gradient(algorithm):
    adapter, x = build(algorithm, "linear")
    randomize(adapter)
    if algorithm == "loha":
        adapter.forward_path = "factorised"
    adapter.base.weight.requires_grad_(True)
    adapter.base.bias.requires_grad_(True)
    adapter(x).square().sum().backward()
    assert adapter.base.weight.grad is not None and adapter.base.bias.grad is not None
    assert adapter.base.weight.grad.abs().sum() > 0


def test_loha_chain_is_left_to_autograd_where_it_does_not_apply():
    adapter, x = build("loha", "conv3x3_s2", use_tucker=True)
    adapter.forward_path = "factorised"
    assert "LoHaChain" not in type(adapter(x.requires_grad_()).grad_fn).__name__  # Tucker cores
    adapter, x = build("loha", "linear")
    adapter.forward_path = "factorised"
    adapter.base.to(torch.bfloat16)
    assert "LoHaChain" not in type(adapter(x.to(torch.bfloat16)).grad_fn).__name__  # mixed dtypes
    adapter, x = build("loha", "linear", dropout=0.5)
    adapter.forward_path = "factorised"
    assert "LoHaChain" not in type(adapter.train()(x).grad_fn).__name__  # training-time dropout
    assert type(adapter.eval()(x).grad_fn).__name__ == "_LoHaChainBackward"  # no dropout in eval


@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_loha_chain_traces_without_graph_breaks(layer):
    adapter, x = build("loha", layer)
    randomize(adapter)
    adapter.forward_path = "factorised"
    torch._dynamo.reset()
    compiled = torch.compile(adapter, backend="aot_eager", fullgraph=True)  # traces forward and backward
    x = x.requires_grad_(True)
    y = compiled(x)
    y.square().sum().backward()
    got, got_x = grads(adapter), x.grad.clone()
    x.grad = None
    expected = reference(adapter, x)
    expected.square().sum().backward()
    close(y, expected.detach())
    for name, grad in grads(adapter).items():
        close(got[name], grad, tol=1e-4)
    close(got_x, x.grad, tol=1e-4)


@pytest.mark.parametrize("algorithm, options", [("loha", {}), ("lokr", {"factor": 4})])
def test_the_cheaper_path_is_chosen_from_shapes(algorithm, options):
    # a big 3x3 conv seeing a 2x2 map (a U-Net's deepest level): building ΔW would dominate
    deep = make_adapter(algorithm, nn.Conv2d(256, 256, 3, padding=1), rank=4, **options)
    assert deep.factorised_for(torch.zeros(1, 256, 2, 2))
    # a small Linear seeing many tokens: the fused matmul with W0 + ΔW is cheaper than an r²-wide chain
    if algorithm == "loha":
        small = make_adapter(algorithm, nn.Linear(32, 32), rank=8, **options)
        assert not small.factorised_for(torch.zeros(4, 4096, 32))
    pinned = make_adapter(algorithm, nn.Conv2d(256, 256, 3, padding=1), rank=4, **options)
    pinned.forward_path = "materialised"
    assert not pinned.factorised_for(torch.zeros(1, 256, 2, 2))


@pytest.mark.parametrize("algorithm, options", [("oft", {}), ("boft", {"rank": 8})])
def test_oft_rotates_whichever_is_smaller_weight_or_output(algorithm, options):
    conv = make_adapter(algorithm, nn.Conv2d(64, 64, 3, padding=1), **options)
    assert not conv.factorised_for(torch.zeros(4, 64, 16, 16))  # 576 weights per channel, 1024 positions
    assert conv.factorised_for(torch.zeros(1, 64, 4, 4))  # a deep 4x4 map: 16 positions
    linear = make_adapter(algorithm, nn.Linear(32, 64), **options)
    assert not linear.factorised_for(torch.zeros(2, 77, 32))
    linear.forward_path = "factorised"
    assert linear.factorised_for(torch.zeros(2, 77, 32))


@pytest.mark.parametrize("config", [("loha", {}), ("lokr", {}), ("ia3", {}), ("lora", {"dora": True})], ids=str)
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_dropouts_on_the_fast_path(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, module_dropout=1.0, **options)
    randomize(adapter)
    if hasattr(adapter, "forward_path"):
        adapter.forward_path = "factorised"
    adapter.train()
    close(adapter(x), plain(adapter, x))  # the whole update skipped
    adapter.module_dropout, adapter.rank_dropout = 0.0, 1.0
    if algorithm != "lora":  # every output row of ΔW dropped
        close(adapter(x), plain(adapter, x))
    adapter.eval()  # no dropout in eval
    close(adapter(x), reference(adapter, x))


@fast_cases
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_half_precision_base_on_the_fast_path(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options)
    randomize(adapter)
    expected = reference(adapter, x)
    adapter.base.to(torch.bfloat16)
    fast(adapter)
    y = adapter(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    close(y.float(), expected.detach(), tol=6e-2)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in adapter.named_parameters() if not n.startswith("base."))


@pytest.mark.parametrize("config", [("lora", {}), ("loha", {}), ("lokr", {}), ("ia3", {}),
                                    ("lora", {"dora": True})], ids=str)
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_forward_traces_without_graph_breaks(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, rank_dropout=0.1, module_dropout=0.1, **options)
    randomize(adapter)
    adapter.train()
    torch._dynamo.reset()
    compiled = torch.compile(adapter, backend="eager", fullgraph=True)  # raises on any graph break
    compiled(x).square().sum().backward()
    adapter.eval()
    close(compiled(x), reference(adapter, x))


@pytest.mark.parametrize("algorithm, options", [("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {}),
                                                ("ia3", {}), ("lora", {"dora": True})], ids=str)
def test_unbatched_conv_input(algorithm, options):
    adapter, x = build(algorithm, "conv3x3_s2", **options)
    randomize(adapter)
    if hasattr(adapter, "forward_path"):
        adapter.forward_path = "factorised"
    close(adapter(x[0]), reference(adapter, x[0]))
