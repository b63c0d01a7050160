"""Interop with the installed LyCORIS package, module by module, both ways:

- lorakit's ``file_tensors()`` loaded into the corresponding LyCORIS module (``load_state_dict``, strict) give
  the same training forward;
- a LyCORIS module's ``state_dict()`` loaded with lorakit's ``from_file_tensors`` gives the same forward and
  the same ΔW (read off LyCORIS's forward on an identity batch for Linear layers).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import ALGORITHMS, factorization, make_adapter

lycoris_modules = pytest.importorskip("lycoris.modules")
from lycoris.functional.general import factorization as lycoris_factorization  # noqa: E402

RANK = 2
LYCORIS = {"lora": lycoris_modules.LoConModule, "loha": lycoris_modules.LohaModule,
           "lokr": lycoris_modules.LokrModule, "ia3": lycoris_modules.IA3Module,
           "full": lycoris_modules.FullModule}
# lorakit option → LyCORIS constructor argument
OPTION_NAMES = {"dora": "weight_decompose", "on_input": "train_on_input"}

LAYERS = {
    "linear": (lambda: nn.Linear(64, 48), (2, 3, 64)),
    "conv1x1": (lambda: nn.Conv2d(32, 48, 1), (2, 32, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), (2, 32, 7, 7)),
}

CONFIGS = [
    ("lora", {}),
    ("lora", {"use_tucker": True}),
    ("lora", {"dora": True, "wd_on_out": True}),
    ("lora", {"dora": True, "wd_on_out": False}),
    ("lora", {"use_scalar": True}),
    ("lora", {"use_scalar": True, "dora": True, "wd_on_out": True}),
    ("lora", {"use_scalar": True, "use_tucker": True}),
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("loha", {"dora": True, "wd_on_out": True}),
    ("loha", {"use_scalar": True}),
    ("lokr", {}),
    ("lokr", {"factor": 4}),
    ("lokr", {"decompose_both": True}),
    ("lokr", {"full_matrix": True}),
    ("lokr", {"use_tucker": True}),
    ("lokr", {"dora": True, "wd_on_out": True}),
    ("lokr", {"use_scalar": True}),
    ("lokr", {"decompose_both": True, "use_scalar": True}),
    ("ia3", {}),
    ("ia3", {"on_input": True}),
    ("full", {}),
]
ALPHAS = [None, 0.5, 8.0]  # alpha = rank, alpha ≠ rank both ways
MULTIPLIERS = [1.0, 0.6]


def config_id(config) -> str:
    algorithm, options = config
    return algorithm + "".join(f"-{k}={v}" for k, v in options.items())


def lycoris_module(algorithm: str, base: nn.Module, alpha, multiplier: float, options: dict):
    kwargs = {OPTION_NAMES.get(k, k): v for k, v in options.items()}
    if algorithm in ("ia3", "full"):
        return LYCORIS[algorithm]("test", base, multiplier, **kwargs)
    return LYCORIS[algorithm]("test", base, multiplier, lora_dim=RANK, alpha=alpha or RANK, **kwargs)


def lorakit_adapter(algorithm: str, base: nn.Module, alpha, multiplier: float, options: dict):
    if algorithm in ("ia3", "full"):
        return make_adapter(algorithm, base, multiplier=multiplier, **options)
    return make_adapter(algorithm, base, rank=RANK, alpha=alpha, multiplier=multiplier, **options)


@torch.no_grad()
def randomize(module: nn.Module, skip=("base.",), seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.startswith(skip):
            continue
        noise = torch.randn(p.shape, generator=g)
        p.copy_(p * (1 + 0.2 * noise) if name == "dora_scale" else 0.3 * noise)


def their_multiplier(options: dict, multiplier: float) -> float:
    """LyCORIS puts a DoRA multiplier inside the rescale; lorakit scales W' − W0 (A1111, ComfyUI), so DoRA is
    compared with LyCORIS at multiplier 1, scaled afterwards."""
    return 1.0 if options.get("dora") else multiplier


def scaled(their_out: torch.Tensor, base_out: torch.Tensor, options: dict, multiplier: float) -> torch.Tensor:
    return base_out + multiplier * (their_out - base_out) if options.get("dora") else their_out


def layer_and_input(layer: str):
    factory, shape = LAYERS[layer]
    torch.manual_seed(0)
    return factory(), torch.randn(shape)


def applicable(algorithm, options, alpha) -> bool:
    return not (algorithm in ("ia3", "full") and alpha is not None)


cases = [(c, a, m) for c in CONFIGS for a in ALPHAS for m in MULTIPLIERS if applicable(*c, a)]
interop = pytest.mark.parametrize(
    "config, alpha, multiplier", cases, ids=[f"{config_id(c)}-alpha={a}-mult={m}" for c, a, m in cases])


@interop
@pytest.mark.parametrize("layer", list(LAYERS))
def test_lorakit_tensors_in_lycoris_give_the_same_training_forward(config, alpha, multiplier, layer):
    algorithm, options = config
    base, x = layer_and_input(layer)
    ours = lorakit_adapter(algorithm, copy.deepcopy(base), alpha, multiplier, options)
    randomize(ours)
    theirs = lycoris_module(algorithm, copy.deepcopy(base), alpha, their_multiplier(options, multiplier), options)
    theirs.load_state_dict(ours.file_tensors(), strict=True)
    theirs.train()
    ours.train()
    with torch.no_grad():
        expected = scaled(theirs(x), base(x), options, multiplier)
        torch.testing.assert_close(expected, ours(x), rtol=1e-5, atol=1e-5)


@interop
@pytest.mark.parametrize("layer", list(LAYERS))
def test_lycoris_tensors_in_lorakit_give_the_same_update(config, alpha, multiplier, layer):
    algorithm, options = config
    base, x = layer_and_input(layer)
    theirs = lycoris_module(algorithm, copy.deepcopy(base), alpha, their_multiplier(options, multiplier), options)
    if algorithm == "full":
        # FullModule's state_dict subtracts W0 from its weight, which holds W0 + diff only after apply_to
        theirs.apply_to()
    randomize(theirs, skip=())
    tensors = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    ours = ALGORITHMS[algorithm].from_file_tensors(copy.deepcopy(base), tensors, multiplier)
    assert torch.count_nonzero(ours.delta_weight()) > 0
    with torch.no_grad():
        torch.testing.assert_close(ours(x), scaled(theirs(x), base(x), options, multiplier), rtol=1e-5, atol=1e-5)
        if layer == "linear":  # ΔW itself: LyCORIS's forward on the identity is (W0 + ΔW)ᵀ + b
            eye = torch.eye(base.in_features)
            plain = F.linear(eye, base.weight, base.bias)
            their_delta = (scaled(theirs(eye), plain, options, multiplier) - plain).T
            db = ours.delta_bias()
            if db is not None:
                their_delta = their_delta - db[:, None]
            torch.testing.assert_close(ours.delta_weight(), their_delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dimension", [320, 640, 768, 1280, 2560, 5120, 100, 127, 128, 360, 48, 1])
def test_factorization_matches_lycoris(dimension):
    for factor in (-1, 2, 4, 8, 16, 20, 64):
        assert factorization(dimension, factor) == lycoris_factorization(dimension, factor)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_same_keys_shapes_and_zero_factor_as_lycoris_at_init(config, layer):
    algorithm, options = config
    base, _ = layer_and_input(layer)
    ours = lorakit_adapter(algorithm, copy.deepcopy(base), None, 1.0, options).file_tensors()
    theirs = lycoris_module(algorithm, copy.deepcopy(base), None, 1.0, options)
    if algorithm == "full":
        theirs.apply_to()
    theirs = theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert {k for k, v in ours.items() if v.dim() and not v.any()} == \
        {k for k, v in theirs.items() if v.dim() and not v.any()}
    for key in ("alpha", "on_input", "dora_scale"):
        if key in ours:
            assert ours[key].dtype == theirs[key].dtype
            torch.testing.assert_close(ours[key], theirs[key])
