"""LyCORIS's ``use_scalar`` (``network.args = {use_scalar = true}``, a ticked "Use Scalar" in the kohya_ss GUI): every
factor of LoRA/LoCon, LoHa and LoKr starts random and a trained scalar, starting at 0, multiplies the update.  The
training is LyCORIS's step for step; the files hold the scalar folded into its factor, as LyCORIS writes them, so
they load anywhere; a resumed run goes on from the factor and the scalar apart, exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.adapters import make_adapter

# each algorithm with the factor LyCORIS multiplies by the scalar (the file holds their product there)
SCALED = {"lora": "lora_up.weight", "loha": "hada_w1_a", "lokr": "lokr_w1"}
LAYERS = {"linear": (lambda: nn.Linear(24, 32), (3, 24)),
          "conv3x3": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 6, 6))}


def _layer(kind):
    factory, shape = LAYERS[kind]
    torch.manual_seed(0)
    return factory(), torch.randn(shape)


@pytest.mark.parametrize("algorithm", list(SCALED))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_the_update_starts_at_zero_with_every_factor_random_and_only_the_scalar_learns_first(algorithm, kind):
    base, x = _layer(kind)
    adapter = make_adapter(algorithm, copy.deepcopy(base), rank=4, alpha=2.0, use_scalar=True)
    assert torch.count_nonzero(adapter.delta_weight()) == 0
    assert torch.equal(adapter(x), base(x))
    raw = adapter.trained_state()
    assert all(v.any() for k, v in raw.items() if k != "alpha" and not k.endswith(".scalar"))  # every factor
    adapter(x).square().sum().backward()
    moved = {k for k, p in adapter.named_parameters() if p.grad is not None and p.grad.any()}
    assert moved == {k for k in raw if k.endswith(".scalar")}  # ΔW = s·(...): at s = 0 only s has a gradient
    # the file holds the product, which is 0 at the start, and nothing of the scalar
    assert set(adapter.file_tensors()) == set(make_adapter(algorithm, copy.deepcopy(base), rank=4).file_tensors())


@pytest.mark.parametrize("algorithm", list(SCALED))
def test_training_follows_lycoris_use_scalar_step_for_step(algorithm):
    """The same start in both (lorakit's factors and scalar copied into LyCORIS's module), three SGD steps each:
    the same updates, so LyCORIS's dynamics, not only its file layout."""
    modules = pytest.importorskip("lycoris.modules")
    their_class = {"lora": modules.LoConModule, "loha": modules.LohaModule, "lokr": modules.LokrModule}[algorithm]
    base, x = _layer("linear")
    ours = make_adapter(algorithm, copy.deepcopy(base), rank=4, alpha=2.0, use_scalar=True)
    theirs = their_class("t", copy.deepcopy(base), 1.0, lora_dim=4, alpha=2.0, use_scalar=True)
    with torch.no_grad():
        key, factor, scalar = ours._scalar_keys
        assert key == SCALED[algorithm]
        for name, value in ours.trained_state().items():
            if name == factor:
                target = theirs.get_parameter(key)
            elif name == scalar:
                target = theirs.scalar
            else:
                target = theirs.get_parameter(name) if name != "alpha" else theirs.alpha
            target.copy_(value)
        ours.trained_state()[scalar].fill_(0.25)  # a scalar under way, so that every factor moves
        theirs.scalar.fill_(0.25)
    theirs.apply_to()
    ours_opt = torch.optim.SGD([p for n, p in ours.named_parameters() if not n.startswith("base.")], lr=0.05)
    their_opt = torch.optim.SGD([p for n, p in theirs.named_parameters() if not n.startswith("org_")], lr=0.05)
    for _ in range(3):
        for module, opt in ((ours, ours_opt), (theirs, their_opt)):
            opt.zero_grad()
            module(x).square().mean().backward()
            opt.step()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(ours.trained_state()[scalar]), float(theirs.scalar.detach()))


def test_a_run_with_use_scalar_writes_plain_files_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    from test_train import Interrupt, die_after_saving, make_config, run_train, write_dataset

    from lorakit.checkpoints import RunFolder
    from lorakit.formats import load_network, read_adapter
    from lorakit.models import load_base_model

    dataset = write_dataset(tmp_path / "data")

    def config(out, **output):
        return make_config(tiny_model_dir, dataset, out, training={"max_epochs": 3, "ema_decay": 0.9},
                           network={"algorithm": "loha", "args": {"use_scalar": True}}, output=output)

    straight = run_train(config(tmp_path / "straight"))
    original = die_after_saving(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run_train(config(tmp_path / "cut"))
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "epoch-0001" / "state.pt", weights_only=True)
    assert any(k.endswith(".scalar") for k in state["live_tensors"])  # the factor and the scalar, apart
    resumed = run_train(config(tmp_path / "cut", if_exists="resume"))
    assert resumed.losses == straight.losses  # bit-identical on CPU
    a = load_file(str(tmp_path / "straight" / "lorakit.safetensors"))
    b = load_file(str(tmp_path / "cut" / "lorakit.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the files hold LoHa's own keys (the scalar folded in), and load as any LoHa does
    assert not any("scalar" in k or "parametrizations" in k for k in a)
    checkpoint = load_file(str(tmp_path / "cut" / "checkpoints" / "epoch-0002" / "trained.safetensors"))
    assert not any("scalar" in k or "parametrizations" in k for k in checkpoint)
    model = load_base_model(str(tiny_model_dir))
    network, report = load_network(read_adapter(tmp_path / "straight" / "lorakit.safetensors"), model.unet,
                                   model.text_encoders)
    assert report.ok and {ad.algorithm for ad in network.adapters.values()} == {"loha"}
    assert any(torch.count_nonzero(ad.delta_weight()) for ad in network.adapters.values())


def test_max_norm_and_a_start_file_work_with_the_scalar():
    from lorakit.max_norm import apply_max_norm, update_norm
    from lorakit.network import AdapterNetwork

    base, _ = _layer("linear")
    adapter = make_adapter("lora", base, rank=4, use_scalar=True)
    with torch.no_grad():
        adapter.trained_state()[adapter._scalar_keys[2]].fill_(3.0)
    network = AdapterNetwork()
    network.attach("lora_unet_x", "unet", nn.ModuleDict({"x": base}), "x", adapter, {})
    limit = float(update_norm(adapter)) / 2
    apply_max_norm(network, limit)
    torch.testing.assert_close(float(adapter.delta_weight().detach().norm()), limit, rtol=1e-4, atol=1e-6)
    # a file's module starts it with the scalar at 1, the update as the file has it
    fresh = make_adapter("lora", copy.deepcopy(base), rank=4, use_scalar=True)
    fresh.load_trained(adapter.file_tensors())
    torch.testing.assert_close(fresh.delta_weight(), adapter.delta_weight())
    assert float(fresh.trained_state()[fresh._scalar_keys[2]]) == 1.0
