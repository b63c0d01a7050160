"""The adapter protocol, algorithm by algorithm: forward = reference with W0 + ΔW, zero init, merge/unmerge,
multiplier, alpha, file round trip, shape errors, dropouts, dtypes, LoKr factorisation and layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import (
    ALGORITHMS,
    AdapterFormatError,
    AdapterShapeError,
    LoKr,
    LoRA,
    detect_algorithm,
    factorization,
    make_adapter,
)
from lorakit.adapters.base import fit_shape
from lorakit.adapters.lokr import kron_layout

RANK = 2

# (id, layer factory, input shape); sizes chosen so that every LoKr layout (low-rank w2, decompose_both) exists
LAYERS = {
    "linear": (lambda: nn.Linear(96, 48), (2, 3, 96)),  # LoKr splits 96 = 8 × 12, 48 = 6 × 8 (c ≠ d)
    "conv1x1": (lambda: nn.Conv2d(32, 48, 1), (2, 32, 5, 5)),
    "conv3x3_s2": (lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), (2, 32, 7, 7)),
    "conv3x3_dil": (lambda: nn.Conv2d(32, 48, 3, padding=2, dilation=2, bias=False), (1, 32, 6, 6)),
    "conv3x1": (lambda: nn.Conv2d(32, 48, (3, 1), stride=(1, 2), padding=(1, 0)), (1, 32, 5, 6)),
}

# (algorithm, options): every option combination that means something
CONFIGS = [
    ("lora", {}),
    ("lora", {"alpha": 1.0}),
    ("lora", {"use_tucker": True}),
    ("lora", {"dora": True}),
    ("lora", {"dora": True, "wd_on_out": False}),
    ("lora", {"dora": True, "use_tucker": True, "alpha": 0.5}),
    ("loha", {}),
    ("loha", {"alpha": 8.0}),
    ("loha", {"use_tucker": True}),
    ("loha", {"dora": True}),
    ("lokr", {}),
    ("lokr", {"alpha": 1.0}),
    ("lokr", {"factor": 4}),
    ("lokr", {"decompose_both": True}),
    ("lokr", {"full_matrix": True}),
    ("lokr", {"use_tucker": True}),
    ("lokr", {"unbalanced_factorization": True}),
    ("lokr", {"bypass": True}),
    ("lokr", {"bypass": True, "decompose_both": True, "alpha": 3.0}),
    ("lokr", {"bypass": True, "full_matrix": True}),
    ("lokr", {"dora": True}),
    ("ia3", {}),
    ("ia3", {"on_input": True}),
    ("full", {}),
    ("oft", {}),
    ("oft", {"constraint": 1e-3, "rescaled": True}),
    ("boft", {"rank": 6}),
    ("boft", {"rank": 6, "constraint": 1e-3, "rescaled": True}),
    ("glora", {}),
    ("glora", {"alpha": 8.0}),
    ("glora", {"use_tucker": True}),
]


def config_id(config) -> str:
    algorithm, options = config
    return algorithm + "".join(f"-{k}={v}" for k, v in options.items())


def build(algorithm: str, layer: str, seed: int = 0, **options):
    factory, shape = LAYERS[layer]
    torch.manual_seed(seed)
    base = factory()
    options.setdefault("rank", RANK)  # BOFT needs a block size that splits 48 into a power of two of blocks
    adapter = make_adapter(algorithm, base, **options)
    return adapter, torch.randn(shape)


@torch.no_grad()
def randomize(adapter, seed: int = 1) -> None:
    """Random values in every adapter tensor (the zero factor too, or the checks would be vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in adapter.named_parameters():
        if name.startswith("base."):
            continue
        noise = torch.randn(p.shape, generator=g)
        p.copy_(p * (1 + 0.2 * noise) if name == "dora_scale" else 0.3 * noise)


def reference(adapter, x):
    """F.linear / F.conv2d with W0 + delta_weight() and b + delta_bias()."""
    base = adapter.base
    weight = base.weight + adapter.delta_weight()
    bias, db = base.bias, adapter.delta_bias()
    if db is not None:
        bias = db if bias is None else bias + db
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation)


def plain(adapter, x):
    base = adapter.base
    if isinstance(base, nn.Linear):
        return F.linear(x, base.weight, base.bias)
    return F.conv2d(x, base.weight, base.bias, base.stride, base.padding, base.dilation)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


all_cases = pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
all_layers = pytest.mark.parametrize("layer", list(LAYERS))


# ---- the protocol, for every algorithm × option × layer -----------------------------------------------


@all_cases
@all_layers
def test_zero_update_at_init(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options)
    assert torch.count_nonzero(adapter.delta_weight()) == 0
    assert adapter.delta_bias() is None or torch.count_nonzero(adapter.delta_bias()) == 0
    close(adapter(x), plain(adapter, x), tol=1e-6)


def kaiming_bound(t: torch.Tensor) -> float:
    """kaiming_uniform_(a=√5) draws from U(−1/√fan_in, 1/√fan_in), fan_in = t[0].numel()."""
    return 1 / t[0].numel() ** 0.5


INIT = {  # key: "zero" | "kaiming" | standard deviation of a normal init
    "lora_down.weight": "kaiming", "lora_mid.weight": "kaiming", "lora_up.weight": "zero",
    "hada_w1_a": 0.1, "hada_w1_b": 1.0, "hada_w2_a": "zero", "hada_w2_b": 1.0, "hada_t1": 0.1, "hada_t2": 0.1,
    "lokr_w1": "kaiming", "lokr_w1_a": "kaiming", "lokr_w1_b": "kaiming", "lokr_w2_a": "kaiming",
    "lokr_t2": "kaiming", "lokr_w2": "zero", "lokr_w2_b": "zero", "weight": "zero", "diff": "zero",
    "diff_b": "zero", "oft_blocks": "zero", "rescale": "ones",
    "a1.weight": "kaiming", "b1.weight": "kaiming", "bm.weight": "kaiming", "a2.weight": "zero", "b2.weight": "zero",
}


@all_cases
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_initialisation(config, layer):
    algorithm, options = config
    adapter, _ = build(algorithm, layer, **options)
    for key, t in adapter.file_tensors().items():
        if key == "alpha":
            assert t.shape == () and t.dtype == torch.float32
        elif key == "on_input":
            assert t.shape == () and int(t) == int(options.get("on_input", False))
        elif key == "dora_scale":  # the norms of W0 (input columns by default)
            w0 = adapter.base.weight
            axis = 0 if options.get("wd_on_out", False) else 1
            norms = w0.transpose(0, axis).reshape(w0.shape[axis], -1).norm(dim=1)
            close(t.reshape(-1), norms, tol=1e-6)
        elif INIT[key] == "zero":
            assert torch.count_nonzero(t) == 0, key
        elif INIT[key] == "ones":
            assert torch.equal(t, torch.ones_like(t)), key
        elif INIT[key] == "kaiming":
            bound = kaiming_bound(t)
            assert t.abs().max() <= bound and t.abs().max() > 0.5 * bound, key
        elif t.numel() >= 30:  # normal with the given std
            assert abs(t.std().item() / INIT[key] - 1) < 0.35, key


@all_cases
@all_layers
def test_forward_equals_reference_with_delta_weight(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, multiplier=0.7, **options)
    randomize(adapter)
    adapter.eval()
    assert adapter.delta_weight().abs().max() > 1e-3  # not vacuous
    assert adapter.delta_weight().shape == adapter.base.weight.shape
    close(adapter(x), reference(adapter, x))
    adapter.train()  # no dropout configured: training forward is the same function
    close(adapter(x), reference(adapter, x))


@all_cases
@all_layers
def test_merge_then_unmerge_restores_base(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options)
    randomize(adapter)
    w0 = adapter.base.weight.detach().clone()
    b0 = None if adapter.base.bias is None else adapter.base.bias.detach().clone()
    expected, delta = adapter(x), adapter.delta_weight()
    adapter.merge()
    assert adapter.merged
    assert not torch.equal(adapter.base.weight, w0)
    close(adapter(x), expected)
    close(adapter.delta_weight(), delta)  # ΔW is still the update of the original W0
    adapter.multiplier = 0.3  # changed while merged: unmerge must still restore W0
    adapter.unmerge()
    assert torch.equal(adapter.base.weight, w0)
    if b0 is None:
        assert adapter.base.bias is None
    else:
        assert torch.equal(adapter.base.bias, b0)
    adapter.multiplier = 1.0
    close(adapter(x), expected)


@all_cases
@all_layers
def test_file_round_trip(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, multiplier=0.6, **options)
    randomize(adapter)
    tensors = adapter.file_tensors()
    assert not any(k.startswith("base.") for k in tensors)
    assert detect_algorithm(tensors) == algorithm
    other_base = copy.deepcopy(adapter.base)
    loaded = ALGORITHMS[algorithm].from_file_tensors(other_base, tensors, multiplier=0.6)
    assert set(loaded.file_tensors()) == set(tensors)
    assert torch.equal(loaded.delta_weight(), adapter.delta_weight())
    close(loaded(x), adapter(x), tol=1e-6)  # bypass is a run-time choice, not in the file


@all_cases
def test_multiplier_scales_delta_linearly(config):
    algorithm, options = config
    adapter, _ = build(algorithm, "conv3x3_s2", **options)
    randomize(adapter)
    full = adapter.delta_weight()
    adapter.multiplier = 0.0
    at_zero = adapter.delta_weight()
    adapter.multiplier = -0.5
    half = adapter.delta_weight()
    # DoRA too: W0 + mult·(W' − W0) as A1111 and ComfyUI apply it, so multiplier 0 is the base model exactly
    close(half, -0.5 * full)
    assert torch.count_nonzero(at_zero) == 0


@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] in ("lora", "loha", "lokr")
                                    and "alpha" not in c[1]], ids=config_id)
def test_alpha_scales_update(config):
    algorithm, options = config
    one, _ = build(algorithm, "conv3x3_s2", **options)
    randomize(one)
    tensors = one.file_tensors()
    tensors["alpha"] = torch.tensor(float(RANK) * 3)
    three = ALGORITHMS[algorithm].from_file_tensors(copy.deepcopy(one.base), tensors)
    both_full = algorithm == "lokr" and one.layout.w1 == one.layout.w2 == "full"
    if both_full:  # no rank: LyCORIS and ComfyUI use scale 1 whatever alpha says
        close(three.delta_weight(), one.delta_weight())
    elif options.get("dora"):
        assert not torch.allclose(three.delta_weight(), one.delta_weight())
    else:
        close(three.delta_weight(), 3 * one.delta_weight())
    # alpha absent or zero means alpha = rank
    for missing in ({k: v for k, v in tensors.items() if k != "alpha"}, {**tensors, "alpha": torch.tensor(0.0)}):
        again = ALGORITHMS[algorithm].from_file_tensors(copy.deepcopy(one.base), missing)
        close(again.delta_weight(), one.delta_weight())


def test_alpha_buffer_and_scale_follow_load_state_dict():
    adapter, _ = build("lora", "linear")
    assert adapter.alpha.shape == () and float(adapter.alpha) == RANK
    adapter.load_state_dict({**adapter.state_dict(), "alpha": torch.tensor(1.0)})
    assert adapter.scale == 0.5


@all_cases
@all_layers
def test_wrong_shape_names_the_key(config, layer):
    algorithm, options = config
    adapter, _ = build(algorithm, layer, **options)
    tensors = adapter.file_tensors()
    for key, value in tensors.items():
        if value.dim() == 0:
            continue
        broken = dict(tensors)
        broken[key] = torch.zeros(*value.shape[:-1], value.shape[-1] + 1)
        with pytest.raises(AdapterShapeError, match=key):
            ALGORITHMS[algorithm].from_file_tensors(copy.deepcopy(adapter.base), broken)


def test_missing_and_unexpected_keys_are_reported():
    adapter, _ = build("lora", "linear")
    tensors = adapter.file_tensors()
    with pytest.raises(AdapterFormatError, match="lora_up.weight"):
        LoRA.from_file_tensors(adapter.base, {k: v for k, v in tensors.items() if k != "lora_up.weight"})
    with pytest.raises(AdapterFormatError, match="hada_t1"):
        LoRA.from_file_tensors(adapter.base, {**tensors, "hada_t1": torch.zeros(2)})
    # a Tucker core needs a spatial kernel: each algorithm's core is named, with its shape
    for algorithm, core in (("lora", "lora_mid.weight"), ("loha", "hada_t1"), ("glora", "bm.weight")):
        conv, _ = build(algorithm, "conv3x3_s2", use_tucker=True)
        shape = tuple(conv.file_tensors()[core].shape)
        with pytest.raises(AdapterShapeError, match=rf"{core}: a Tucker core \({shape[0]}, .*needs a conv with a"):
            ALGORITHMS[algorithm].from_file_tensors(nn.Conv2d(32, 48, 1), conv.file_tensors())


def test_conv1x1_tensors_load_into_linear_and_back():
    """Files carry (r, in, 1, 1) for SD1.x's conv proj_in, which is Linear in SD2 (A1111/ComfyUI accept it)."""
    conv, x = build("lora", "conv1x1")
    randomize(conv)
    linear = nn.Linear(32, 48)  # same sizes as the 1×1 conv
    linear.weight.data = conv.base.weight.data.reshape(48, 32).clone()
    loaded = LoRA.from_file_tensors(linear, conv.file_tensors())
    close(loaded.delta_weight(), conv.delta_weight().reshape(48, 32), tol=0)
    assert fit_shape("k", torch.zeros(48), (48, 1)).shape == (48, 1)
    with pytest.raises(AdapterShapeError, match="k"):
        fit_shape("k", torch.zeros(48, 2), (48, 1, 1, 1))


def test_peft_key_names_load_as_lora():
    adapter, x = build("lora", "linear")
    randomize(adapter)
    t = adapter.file_tensors()
    peft = {"lora_A.weight": t["lora_down.weight"], "lora_B.weight": t["lora_up.weight"]}
    assert detect_algorithm(peft) == "lora"
    loaded = LoRA.from_file_tensors(copy.deepcopy(adapter.base), peft)  # no alpha: alpha = rank, as here
    close(loaded.delta_weight(), adapter.delta_weight(), tol=0)


# ---- dropouts ----------------------------------------------------------------------------------------

DROPOUTS = {"dropout": 0.5, "rank_dropout": 0.5, "module_dropout": 0.5}
dropout_cases = pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c[1].keys() <= {"use_tucker", "dora", "bypass", "on_input"}], ids=config_id)


@dropout_cases
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_dropouts_only_in_training(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options, **DROPOUTS, rank_dropout_scale=True)
    randomize(adapter)
    adapter.eval()
    first = adapter(x)
    close(adapter(x), first, tol=0)  # deterministic
    close(first, reference(adapter, x))
    adapter.train()
    torch.manual_seed(3)
    outputs = [adapter(x) for _ in range(6)]
    assert any(not torch.allclose(o, first) for o in outputs)  # dropout does something in training


@dropout_cases
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_module_dropout_one_skips_the_update(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options, module_dropout=1.0, dropout=0.3)
    randomize(adapter)
    adapter.train()
    close(adapter(x), plain(adapter, x), tol=1e-6)
    adapter.eval()
    assert not torch.allclose(adapter(x), plain(adapter, x))


@dropout_cases
def test_rank_dropout_one_drops_everything(config):
    algorithm, options = config
    adapter, x = build(algorithm, "conv3x3_s2", **options, rank_dropout=1.0)
    randomize(adapter)
    adapter.train()
    if not options.get("dora"):
        close(adapter(x), plain(adapter, x), tol=1e-6)
        return
    # DoRA: the whole update is dropped, the rescale of W0 stays: W' = W0 · m / ‖W0‖ (rows, or columns)
    base, m = adapter.base, adapter.dora_scale.detach()
    w0 = base.weight.detach()
    on_out = options.get("wd_on_out", False)  # lorakit default: input columns
    norm = (w0.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) if on_out
            else w0.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, 1, 1))
    expected = F.conv2d(x, w0 * m / norm, base.bias, base.stride, base.padding, base.dilation)
    close(adapter(x), expected, tol=1e-5)
    assert not torch.allclose(expected, plain(adapter, x))  # the random magnitude matters: the check can fail


def test_rank_dropout_scale_keeps_the_expectation():
    adapter, x = build("lora", "linear", rank_dropout=0.25, rank_dropout_scale=True)
    randomize(adapter)
    expected = adapter.eval()(x) - plain(adapter, x)
    adapter.train()
    torch.manual_seed(0)
    mean = torch.stack([adapter(x) - plain(adapter, x) for _ in range(400)]).mean(0)
    assert (mean - expected).norm() < 0.1 * expected.norm()


def test_invalid_probabilities_are_rejected():
    with pytest.raises(ValueError, match="rank_dropout"):
        build("lora", "linear", rank_dropout=1.5)


# ---- dtypes and gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("config", [c for c in CONFIGS if len(c[1]) <= 1], ids=config_id)
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_half_precision_base_with_fp32_adapter(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options)
    randomize(adapter)
    expected = reference(adapter, x)
    adapter.base.to(torch.bfloat16)
    y = adapter(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    close(y.float(), expected, tol=6e-2)
    y.float().square().sum().backward()
    grads = [p.grad for n, p in adapter.named_parameters() if not n.startswith("base.")]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert adapter.base.weight.grad is None


def test_loha_custom_backward_matches_autograd():
    from lorakit.adapters.functional import loha_weight

    g = torch.Generator().manual_seed(0)
    plain_args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                  for s in [(5, 2), (2, 6), (5, 2), (2, 6)]]
    torch.autograd.gradcheck(lambda a, b, c, d: loha_weight(a, b, c, d, None, None, 0.7), plain_args)
    tucker_args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
                   for s in [(2, 5), (2, 4), (2, 5), (2, 4), (2, 2, 3, 3), (2, 2, 3, 3)]]
    torch.autograd.gradcheck(lambda a, b, c, d, t1, t2: loha_weight(a, b, c, d, t1, t2, 1.3), tucker_args)


@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2", "conv3x3_dil"])
@pytest.mark.parametrize("options", [{}, {"decompose_both": True}, {"use_tucker": True}, {"full_matrix": True}],
                         ids=str)
def test_lokr_bypass_equals_materialised_path_with_gradients(layer, options):
    built, x = build("lokr", layer, alpha=3.0, **options)
    randomize(built)
    bypass = LoKr.from_file_tensors(copy.deepcopy(built.base), built.file_tensors(), multiplier=0.8)
    dense = LoKr.from_file_tensors(copy.deepcopy(built.base), built.file_tensors(), multiplier=0.8)
    bypass.bypass = True
    dense.forward_path = "materialised"
    y_bypass, y_dense = bypass(x), dense(x)
    close(y_bypass, y_dense)
    y_bypass.square().sum().backward()
    y_dense.square().sum().backward()
    for (name, p), q in zip(bypass.named_parameters(), dense.parameters(), strict=True):
        if not name.startswith("base."):
            close(p.grad, q.grad, tol=1e-4)


# ---- registry, detection, LoKr factorisation ----------------------------------------------------------


def test_registry_and_make_adapter():
    assert set(ALGORITHMS) == {"lora", "loha", "lokr", "ia3", "full", "oft", "boft", "glora", "dylora", "norm"}
    base = nn.Conv2d(8, 8, 3)
    assert isinstance(make_adapter("LoCon", base, rank=2), LoRA)
    assert isinstance(make_adapter("kron", base, rank=2), LoKr)
    adapter = make_adapter("lora", base, rank=2, alpha=1, dora_wd=True, multiplier=0.5)
    assert adapter.dora_scale is not None and adapter.multiplier == 0.5 and adapter.scale == 0.5
    assert make_adapter("ia3", base, rank=8, train_on_input=True).scales_input
    with pytest.raises(ValueError, match="known"):
        make_adapter("nope", base)
    with pytest.raises(TypeError):
        make_adapter("lora", base, factor=4)  # an option of another algorithm
    with pytest.raises(TypeError, match="groups"):
        make_adapter("lora", nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(TypeError, match="nn.Linear"):
        make_adapter("lora", nn.LayerNorm(8))


@pytest.mark.parametrize("keys, algorithm", [
    (["lora_down.weight", "lora_up.weight", "alpha"], "lora"),
    (["lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"], "lora"),
    (["lora_A.weight", "lora_B.weight"], "lora"),
    (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"], "loha"),
    (["lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"], "lokr"),
    (["lokr_w1_a", "lokr_w1_b", "lokr_w2", "alpha"], "lokr"),
    (["weight", "on_input"], "ia3"),
    (["diff", "diff_b"], "full"),
    (["oft_blocks", "rescale", "alpha"], "oft"),
    (["oft_diag"], "oft-legacy"),
    (["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"], "glora"),
    (["a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha"], "glora"),
    (["w_norm", "b_norm"], "norm"),
])
def test_detect_algorithm(keys, algorithm):
    assert detect_algorithm(keys) == algorithm


def test_detect_algorithm_rejects_unknown_keys():
    with pytest.raises(ValueError, match="no adapter algorithm"):
        detect_algorithm(["something.weight"])


FACTORIZATION_TABLE = {  # dimension: {factor: (u, v)}; u goes to w1, v to w2
    320: {-1: (16, 20), 4: (4, 80), 8: (8, 40), 16: (16, 20)},
    640: {-1: (20, 32), 4: (4, 160), 8: (8, 80), 16: (16, 40)},
    768: {-1: (24, 32), 4: (4, 192), 8: (8, 96), 16: (16, 48)},
    1280: {-1: (32, 40), 4: (4, 320), 8: (8, 160), 16: (16, 80)},
    2560: {-1: (40, 64), 4: (4, 640), 8: (8, 320), 16: (16, 160)},
    5120: {-1: (64, 80), 4: (4, 1280), 8: (8, 640), 16: (16, 320)},
}
# where LyCORIS's convention differs from "largest divisor ≤ min(f, √p)": a dividing factor is taken as is
FACTORIZATION_EDGES = {(100, 20): (5, 20), (360, 16): (15, 24), (127, -1): (1, 127), (128, 16): (8, 16),
                       (48, 64): (6, 8), (7, 7): (1, 7), (1, -1): (1, 1)}


@pytest.mark.parametrize("dimension", list(FACTORIZATION_TABLE))
def test_factorization_table(dimension):
    for factor, expected in FACTORIZATION_TABLE[dimension].items():
        assert factorization(dimension, factor) == expected
    for (p, f), expected in FACTORIZATION_EDGES.items():
        assert factorization(p, f) == expected


def test_lokr_layout_rules():
    # SD1.5 attention 320→320: factor -1 splits 16 × 20; rank 8 < 20 / 2 keeps w2 low-rank
    lay = kron_layout(320, 320, (), rank=8)
    assert (lay.a, lay.b, lay.c, lay.d, lay.w1, lay.w2) == (16, 20, 16, 20, "full", "lowrank")
    assert kron_layout(320, 320, (), rank=10).w2 == "full"  # rank ≥ max(b, d) / 2
    assert kron_layout(320, 320, (), rank=4, decompose_both=True).w1 == "lowrank"
    assert kron_layout(320, 320, (), rank=8, decompose_both=True).w1 == "full"  # 8 ≥ 16 / 2
    assert kron_layout(320, 320, (), rank=4, decompose_both=True, full_matrix=True) == \
        kron_layout(320, 320, (), rank=1, full_matrix=True)
    assert kron_layout(640, 320, (3, 3), rank=4, use_tucker=True).w2 == "tucker"
    assert kron_layout(640, 320, (1, 1), rank=4, use_tucker=True).w2 == "lowrank"
    lay = kron_layout(640, 320, (), rank=4, factor=8, unbalanced_factorization=True)
    assert (lay.a, lay.b, lay.c, lay.d) == (80, 8, 8, 40)


def test_lokr_full_matrix_has_scale_one_and_alpha_rank():
    adapter = make_adapter("lokr", nn.Linear(64, 48), rank=16, alpha=1.0, full_matrix=True)  # 64 = 8 × 8
    assert adapter.scale == 1.0 and float(adapter.alpha) == 16.0  # LyCORIS writes alpha = rank here
    assert set(adapter.file_tensors()) == {"alpha", "lokr_w1", "lokr_w2"}
    assert adapter.lokr_w1.shape == (6, 8) and adapter.lokr_w2.shape == (8, 8)


# ---- the registry: every table derives from the classes' own attributes ---------------------------------------

def test_registry_is_derived_from_the_classes():
    from lorakit.adapters import _DETECTION, ALGORITHMS, ALIASES
    from lorakit.formats import module_rank
    from lorakit.inspection import _ALGORITHM_NAMES

    for key, specs in _DETECTION.items():  # a shared key needs a check on the tensors to tell them apart
        assert len(specs) == 1 or all(hasattr(spec, "matches") for spec in specs), key
    for name, cls in ALGORITHMS.items():
        if getattr(cls, "file_algorithm", None):  # DyLoRA: its files are another algorithm's (plain LoRA)
            tensors = make_adapter(name, nn.Linear(64, 64), rank=4, block_size=2).file_tensors()
            assert not cls.file_keys and detect_algorithm(tensors) == cls.file_algorithm
            continue
        assert cls.algorithm == name and cls.display_name and cls.file_keys
        assert _ALGORITHM_NAMES[name] == cls.display_name
        assert all(cls in _DETECTION[key] for key in cls.file_keys)
        assert all(ALIASES[alias] == name for alias in cls.aliases)
        # wide enough for LoKr to factor its w2 (at 12×8 both halves are full); the norm update wraps a norm layer
        base = nn.LayerNorm(64) if name == "norm" else nn.Linear(64, 64)
        tensors = make_adapter(name, base, rank=3).file_tensors()
        assert detect_algorithm(tensors) == name
        assert module_rank(tensors) == (3 if cls.rank_keys else None)


@dropout_cases
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_dropouts_in_training_take_an_unbatched_input(config, layer):
    """torch layers take one sample without a batch axis (Linear: (in,), Conv2d: (C, H, W)); the rank mask is one
    sample's then, and rank dropout 1 still leaves the base layer alone."""
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options, **DROPOUTS)
    randomize(adapter)
    one = x.reshape(-1, x.shape[-1])[0] if layer == "linear" else x[0]
    adapter.train()
    assert adapter(one).shape == plain(adapter, one).shape
    adapter.dropout = adapter.module_dropout = 0.0
    adapter.rank_dropout = 1.0
    if not options.get("dora"):
        close(adapter(one), plain(adapter, one), tol=1e-6)
