"""Max-norm regularisation (kohya's --scale_weight_norms): modules above the limit end on it with ΔW's direction
kept, the others are untouched, and a training run keeps every module's update within the limit."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import build_tiny_text_encoder, build_tiny_unet, randomize

from lorakit.max_norm import apply_max_norm, check_max_norm_supported, update_norm
from lorakit.network import UniformRanks, create_network


def _network(algorithm="lora", preset="full", **options):
    network = create_network(build_tiny_unet(), build_tiny_text_encoder(), preset=preset, algorithm=algorithm,
                             ranks=UniformRanks(4, 2.0, conv_rank=2, conv_alpha=1.0), options=options)
    randomize(network, scale=0.3)
    return network


def _deltas(network):
    with torch.no_grad():
        return {n: a.delta_weight().double().clone() for n, a in network.adapters.items()}


@pytest.mark.parametrize(("algorithm", "options"), [("lora", {}), ("lora", {"use_tucker": True}), ("loha", {}),
                                                     ("loha", {"use_tucker": True}), ("lokr", {"factor": 4})])
def test_modules_above_the_limit_end_on_it_in_the_same_direction_the_rest_untouched(algorithm, options):
    network = _network(algorithm, **options)
    before = _deltas(network)
    norms = {n: float(d.norm()) for n, d in before.items()}
    ordered = sorted(norms.values())
    limit = (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2  # half above it, none on it
    above = {n for n, v in norms.items() if v > limit}
    assert 0 < len(above) < len(norms)
    untouched = {n: {k: v.clone() for k, v in network[n].file_tensors().items()} for n in norms if n not in above}
    reading = apply_max_norm(network, limit)
    after = _deltas(network)
    assert reading.keys_scaled == len(above)
    for name, delta in after.items():
        if name in above:
            expected = before[name] * (limit / norms[name])
            torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
            assert float(delta.norm()) == pytest.approx(limit, rel=1e-5)
        else:
            assert all(torch.equal(network[name].file_tensors()[k], v) for k, v in untouched[name].items())
    expected = [min(v, limit) for v in norms.values()]
    assert reading.mean_norm == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert reading.max_norm == pytest.approx(limit, rel=1e-6)


def test_a_plain_loras_norm_from_its_gram_matrices_is_the_dense_norm():
    network = _network("lora")
    for adapter in network.adapters.values():
        torch.testing.assert_close(update_norm(adapter), adapter.delta_weight().norm(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("algorithm", "options", "named"), [("lora", {"dora": True}, "lora with DoRA"),
                                                              ("glora", {}, "glora"), ("ia3", {}, "ia3")])
def test_updates_that_are_no_product_of_the_trained_tensors_are_refused(algorithm, options, named):
    with pytest.raises(ValueError, match=f"not {named} \\(their update is not a product"):
        check_max_norm_supported(_network(algorithm, **options))


def test_a_run_keeps_every_module_within_the_limit_and_logs_it(tiny_model_dir, tmp_path):
    from test_train import make_config, run_train, write_dataset

    from lorakit.config import ConfigError
    from lorakit.formats import load_network, read_adapter
    from lorakit.models import load_base_model

    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    limit = 0.02
    run_train(make_config(tiny_model_dir, data, out, training={"max_epochs": 1}, network={"max_norm": limit},
                          optimizer={"learning_rate": 1e-2}))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all("keys_scaled" in r and r["max_key_norm"] <= limit * (1 + 1e-6) for r in steps)
    assert any(r["keys_scaled"] > 0 for r in steps)  # the learning rate pushes modules past the limit
    result = read_adapter(out / "lorakit.safetensors")
    assert result.metadata["ss_scale_weight_norms"] == str(limit)
    model = load_base_model(tiny_model_dir)
    network, _ = load_network(result, model.unet, model.text_encoder)
    assert max(float(update_norm(a)) for a in network.adapters.values()) <= limit * (1 + 1e-5)
    with pytest.raises(ConfigError, match="network.max_norm: max-norm regularisation scales .* not lora with DoRA"):
        run_train(make_config(tiny_model_dir, data, tmp_path / "dora", network={"max_norm": 1.0, "use_dora": True}))
    assert not (tmp_path / "dora").exists()
