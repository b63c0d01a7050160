"""OFT (and the later members of the family) against the installed LyCORIS, both ways, on Linear and conv layers:

- lorakit's ``file_tensors()`` loaded strictly into LyCORIS's module give the same forward, and LyCORIS's
  ``get_diff_weight`` equals lorakit's ``delta_weight()``;
- a LyCORIS module's ``state_dict()`` (what its files hold) loaded with ``from_file_tensors`` gives the same
  forward and ΔW, and is detected as the right algorithm from its tensors;
- the places where lorakit follows other math than LyCORIS are pinned by tests that show LyCORIS's behaviour.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorakit.adapters import ALGORITHMS, detect_algorithm, make_adapter

lycoris_modules = pytest.importorskip("lycoris.modules")

LAYERS = {
    "linear": (lambda: nn.Linear(64, 48), (2, 3, 64)),
    "conv1x1": (lambda: nn.Conv2d(32, 48, 1), (2, 32, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(32, 48, 3, stride=2, padding=1), (2, 32, 7, 7)),
}

# (algorithm, LyCORIS class, rank, lorakit options); LyCORIS takes the same option names
CONFIGS = [
    ("oft", lycoris_modules.DiagOFTModule, 4, {}),
    ("oft", lycoris_modules.DiagOFTModule, 4, {"constraint": 1e-3}),
    ("oft", lycoris_modules.DiagOFTModule, 8, {"rescaled": True}),
    ("oft", lycoris_modules.DiagOFTModule, 2, {"constraint": 1e-3, "rescaled": True}),
    ("boft", lycoris_modules.ButterflyOFTModule, 6, {}),
    ("boft", lycoris_modules.ButterflyOFTModule, 16, {"constraint": 1e-3}),
    ("boft", lycoris_modules.ButterflyOFTModule, 6, {"rescaled": True}),
    ("glora", lycoris_modules.GLoRAModule, 4, {"alpha": None}),
    ("glora", lycoris_modules.GLoRAModule, 4, {"alpha": 1.0}),
    ("glora", lycoris_modules.GLoRAModule, 2, {"alpha": 8.0}),
]
MULTIPLIERS = [1.0, 0.6]


def config_id(config) -> str:
    algorithm, _, rank, options = config
    return f"{algorithm}-r{rank}" + "".join(f"-{k}={v}" for k, v in options.items())


def layer_and_input(layer: str):
    factory, shape = LAYERS[layer]
    torch.manual_seed(0)
    return factory(), torch.randn(shape)


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.startswith(("base.", "org_module")):
            continue
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.2 * noise if name == "rescale" else 0.3 * noise)


def comparable(algorithm: str, options: dict, multiplier: float) -> bool:
    """LyCORIS leaves OFT's ``rescale`` out of its multiplier (test_lycoris_oft_rescale_ignores_the_multiplier)
    and interpolates each BOFT stage toward I (test_lycoris_boft_multiplier_is_not_linear); lorakit's ΔW is
    linear in the multiplier, so there the two agree at multiplier 1 only."""
    return multiplier == 1 or not (options.get("rescaled") or algorithm == "boft")


cases = [(c, m) for c in CONFIGS for m in MULTIPLIERS if comparable(c[0], c[3], m)]
interop = pytest.mark.parametrize("config, multiplier", cases,
                                  ids=[f"{config_id(c)}-mult={m}" for c, m in cases])


def their_delta(theirs, multiplier: float) -> torch.Tensor:
    return theirs.get_diff_weight(multiplier=multiplier)[0]


@interop
@pytest.mark.parametrize("layer", list(LAYERS))
def test_lorakit_tensors_in_lycoris(config, multiplier, layer):
    algorithm, cls, rank, options = config
    base, x = layer_and_input(layer)
    ours = make_adapter(algorithm, copy.deepcopy(base), rank=rank, multiplier=multiplier, **options)
    randomize(ours)
    theirs = cls("test", copy.deepcopy(base), multiplier, lora_dim=rank, **options)
    theirs.load_state_dict(ours.file_tensors(), strict=True)
    with torch.no_grad():
        assert torch.count_nonzero(ours.delta_weight()) > 0
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.delta_weight(), their_delta(theirs, multiplier), rtol=1e-5, atol=1e-5)


@interop
@pytest.mark.parametrize("layer", list(LAYERS))
def test_lycoris_tensors_in_lorakit(config, multiplier, layer):
    algorithm, cls, rank, options = config
    base, x = layer_and_input(layer)
    theirs = cls("test", copy.deepcopy(base), multiplier, lora_dim=rank, **options)
    randomize(theirs)
    tensors = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    assert detect_algorithm(tensors) == algorithm
    ours = ALGORITHMS[algorithm].from_file_tensors(copy.deepcopy(base), tensors, multiplier)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.delta_weight(), their_delta(theirs, multiplier), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_same_keys_and_shapes_as_lycoris_at_init(config, layer):
    algorithm, cls, rank, options = config
    base, _ = layer_and_input(layer)
    ours = make_adapter(algorithm, copy.deepcopy(base), rank=rank, **options).file_tensors()
    theirs = cls("test", copy.deepcopy(base), 1.0, lora_dim=rank, **options).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert {k for k, v in ours.items() if v.dim() and not v.any()} == \
        {k for k, v in theirs.items() if v.dim() and not v.any()}  # the same zero factors
    for key in ("alpha", "oft_blocks", "rescale"):  # the deterministic ones
        if key in ours:
            torch.testing.assert_close(ours[key].float(), theirs[key].float())


@pytest.mark.parametrize("layer", list(LAYERS))
def test_lycoris_made_file_loads_from_disk(tmp_path, layer):
    """A file LyCORIS's own tensors make (kohya prefix, safetensors) loads through lorakit's reader."""
    from safetensors.torch import load_file, save_file

    base, x = layer_and_input(layer)
    theirs = lycoris_modules.DiagOFTModule("test", copy.deepcopy(base), 1.0, lora_dim=4, constraint=1e-3,
                                           rescaled=True)
    randomize(theirs)
    path = tmp_path / "oft.safetensors"
    save_file({f"lora_unet_x.{k}": v.detach().contiguous() for k, v in theirs.state_dict().items()}, str(path))
    tensors = {k.split(".", 1)[1]: v for k, v in load_file(str(path)).items()}
    ours = ALGORITHMS[detect_algorithm(tensors)].from_file_tensors(copy.deepcopy(base), tensors)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_lycoris_oft_rescale_ignores_the_multiplier():
    """LyCORIS's ``make_weight`` computes ``rescale ⊙ (m (Rᵀ − I) W) + (rescale − 1) W``: the rescale is not
    scaled by the multiplier, so at multiplier 0 its output is not the base layer.  lorakit scales the whole
    ``ΔW = s ⊙ R W0 − W0`` (multiplier 0 is the base layer, ΔW linear in the multiplier, as every other
    adapter) and agrees with LyCORIS at multiplier 1."""
    base, x = layer_and_input("linear")
    theirs = lycoris_modules.DiagOFTModule("test", copy.deepcopy(base), 0.0, lora_dim=4, rescaled=True)
    randomize(theirs)
    ours = ALGORITHMS["oft"].from_file_tensors(copy.deepcopy(base), dict(theirs.state_dict()), 0.0)
    with torch.no_grad():
        assert (theirs(x) - base(x)).abs().max() > 1e-2
        torch.testing.assert_close(ours(x), base(x))


def test_rotation_is_orthogonal_and_keeps_the_row_angles():
    """OFT's point: R is orthogonal (without rescale), so W' = R W0 keeps the Gram matrix of W0's columns."""
    base, _ = layer_and_input("conv3x3")
    ours = make_adapter("oft", base, rank=4, constraint=1e-3)
    randomize(ours)
    r = ours.rotation()
    eye = torch.eye(r.shape[-1]).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        w0 = base.weight.reshape(48, -1)
        w = w0 + ours.delta_weight().reshape(48, -1)
        torch.testing.assert_close(w.T @ w, w0.T @ w0, rtol=1e-4, atol=1e-5)


def test_constraint_caps_the_skew_norm():
    """constraint c: ‖P‖_F ≤ c · out (LyCORIS's bound); a tighter constraint moves the weight less."""
    base, _ = layer_and_input("linear")
    deltas = []
    for constraint in (0.0, 1e-2, 1e-3):
        ours = make_adapter("oft", copy.deepcopy(base), rank=4, constraint=constraint)
        randomize(ours)
        with torch.no_grad():
            deltas.append(ours.delta_weight().norm().item())
    assert deltas[0] > deltas[1] > deltas[2] > 0


def test_lycoris_boft_multiplier_is_not_linear():
    """LyCORIS's BOFT takes ``m R_i + (1 − m) I`` for every stage, so its ΔW at multiplier 0.5 is not half the
    ΔW at 1 (a product of interpolated stages); lorakit's is (``ΔW = m (B W0 − W0)``), and at 1 they agree."""
    base, _ = layer_and_input("linear")
    theirs = lycoris_modules.ButterflyOFTModule("test", copy.deepcopy(base), 1.0, lora_dim=6)
    randomize(theirs)
    ours = ALGORITHMS["boft"].from_file_tensors(copy.deepcopy(base), dict(theirs.state_dict()), 0.5)
    with torch.no_grad():
        full, half = their_delta(theirs, 1.0), their_delta(theirs, 0.5)
        assert (half - 0.5 * full).abs().max() > 1e-3
        torch.testing.assert_close(ours.delta_weight(), 0.5 * full, rtol=1e-5, atol=1e-5)


def test_boft_is_one_dense_rotation():
    """Four butterfly stages of 6×6 blocks over 48 channels connect every output channel with every other
    (OFT's blocks never do), and the product stays orthogonal."""
    base, _ = layer_and_input("linear")
    ours = make_adapter("boft", base, rank=6)
    randomize(ours)
    with torch.no_grad():
        eye = torch.eye(48)
        b = ours.rotate(eye, 0)  # the butterfly applied to the identity's rows: B itself
        torch.testing.assert_close(b @ b.T, eye, rtol=1e-5, atol=1e-5)
        assert (b.abs() > 1e-9).all()


def test_lycoris_glora_never_builds_its_tucker_core():
    """GLoRAModule asks ``use_tucker and all(k == 1)`` and then ``use_tucker and any(k != 1)``: ``bm`` is never
    made, so LyCORIS cannot load a GLoRA file with ``bm.weight``; lorakit makes and reads one, and its ΔW is
    the forward's."""
    base, x = layer_and_input("conv3x3")
    theirs = lycoris_modules.GLoRAModule("test", copy.deepcopy(base), 1.0, lora_dim=4, alpha=4, use_tucker=True)
    assert "bm.weight" not in theirs.state_dict()
    ours = make_adapter("glora", copy.deepcopy(base), rank=4, use_tucker=True)
    randomize(ours)
    tensors = ours.file_tensors()
    assert tensors["bm.weight"].shape == (4, 4, 3, 3) and tensors["b2.weight"].shape == (4, 32, 1, 1)
    with pytest.raises(RuntimeError, match="bm.weight"):
        theirs.load_state_dict(tensors, strict=True)
    again = ALGORITHMS["glora"].from_file_tensors(copy.deepcopy(base), tensors)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x, base.weight + again.delta_weight(), base.bias, 2, 1)
        torch.testing.assert_close(again(x), ref, rtol=1e-5, atol=1e-5)


def test_boft_refuses_a_layer_it_cannot_split_and_a_file_that_does_not_fit():
    """48 channels cannot be cut into even blocks of at most 4 whose count is a power of two (LyCORIS raises
    too); a file's blocks that do not cover the layer are refused naming the key."""
    with pytest.raises(ValueError, match="BOFT cannot split the 48 output channels"):
        make_adapter("boft", nn.Linear(8, 48), rank=4)
    tensors = make_adapter("boft", nn.Linear(8, 48), rank=6).file_tensors()
    with pytest.raises(ValueError, match="oft_blocks"):
        ALGORITHMS["boft"].from_file_tensors(nn.Linear(8, 40), tensors)
    oft = make_adapter("oft", nn.Linear(8, 48), rank=4).file_tensors()
    with pytest.raises(ValueError, match="oft_blocks"):
        ALGORITHMS["oft"].from_file_tensors(nn.Linear(8, 40), oft)
