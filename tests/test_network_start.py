"""Starting a new network from an adapter file (kohya's --network_weights): what fits is copied exactly, what
the file lacks starts fresh, and anything that does not fit is refused by name with the setting to change, the
network left as it was."""

from __future__ import annotations

import pytest
import torch
from model_helpers import build_tiny_text_encoder, build_tiny_unet, randomize
from safetensors.torch import save_file

from lorakit.formats import AdapterFileError, read_adapter, save_network, start_network_from_file
from lorakit.network import UniformRanks, create_network


def _network(preset="kohya", algorithm="lora", rank=4, alpha=2.0, te=True, **options):
    unet, encoder = build_tiny_unet(), build_tiny_text_encoder() if te else None
    network = create_network(unet, encoder, preset=preset, algorithm=algorithm,
                             ranks=UniformRanks(rank, alpha, conv_rank=2, conv_alpha=1.0), options=options)
    return network, unet, encoder


def _trained_file(tmp_path, name="a.safetensors", fmt="kohya", **kw):
    network, _, _ = _network(**kw)
    randomize(network)
    return save_network(network, tmp_path / name, format=fmt), network


def _snapshot(network):
    return {k: v.clone() for k, v in network.file_tensors().items()}


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_a_matching_network_starts_exactly_where_the_file_left_off(tmp_path, algorithm):
    path, trained = _trained_file(tmp_path, preset="full", algorithm=algorithm)
    network, unet, encoder = _network(preset="full", algorithm=algorithm)
    report = start_network_from_file(network, path, unet, encoder)
    assert report.fresh == [] and len(report.loaded) == len(network) and str(path) in report.summary()
    expected = trained.file_tensors()
    got = network.file_tensors()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # it trains from there: the parameters are the network's own, not copies
    assert all(p.requires_grad for ps in network.trainable_parameters().values() for p in ps)


def test_a_diffusers_layout_file_and_a_kohya_file_without_alpha_start_it_too(tmp_path):
    path, trained = _trained_file(tmp_path, fmt="diffusers", te=False, rank=4, alpha=4.0)
    network, unet, _ = _network(te=False, rank=4, alpha=4.0)
    start_network_from_file(network, path, unet)
    assert all(torch.equal(network.file_tensors()[k], v) for k, v in trained.file_tensors().items())
    # kohya writes no alpha when it equals the rank: read as alpha = rank
    kohya = {k: v for k, v in read_adapter(_trained_file(tmp_path, "b.safetensors", te=False, rank=4,
                                                         alpha=4.0)[0]).tensors.items() if not k.endswith(".alpha")}
    save_file(kohya, str(tmp_path / "no-alpha.safetensors"))
    again, unet, _ = _network(te=False, rank=4, alpha=4.0)
    assert len(start_network_from_file(again, tmp_path / "no-alpha.safetensors", unet).loaded) == len(again)


def test_a_lone_text_encoder_named_te1_starts_it_as_the_loader_reads_it(tmp_path):
    """diffusers' kohya converter names SD1's only text encoder ``lora_te1_``: the file starts the network as
    ``load_network`` would read it (the same lookup), and all of it is loaded."""
    path, trained = _trained_file(tmp_path)
    renamed = {k.replace("lora_te_", "lora_te1_", 1): v for k, v in read_adapter(path).tensors.items()}
    assert any(k.startswith("lora_te1_") for k in renamed)
    save_file(renamed, str(tmp_path / "te1.safetensors"))
    network, unet, encoder = _network()
    report = start_network_from_file(network, tmp_path / "te1.safetensors", unet, encoder)
    assert report.fresh == [] and len(report.loaded) == len(network)
    assert all(torch.equal(network.file_tensors()[k], v) for k, v in trained.file_tensors().items())


def test_ranks_from_a_file_build_its_network_module_by_module(tmp_path):
    """kohya's --dim_from_weights: each module gets the file's rank and alpha (alpha = rank where kohya left it
    out), layers the file has no module for get none, whatever the run's own rank."""
    from lorakit.formats import ranks_from_file
    from lorakit.network import ModuleSpec

    unet, encoder = build_tiny_unet(), build_tiny_text_encoder()
    mixed = create_network(unet, encoder, preset="attn-only",
                           ranks=lambda name, layer: ModuleSpec(1 if "to_q" in name else 3, 2.0))
    randomize(mixed)
    path = save_network(mixed, tmp_path / "mixed.safetensors")
    tensors = {k: v for k, v in read_adapter(path).tensors.items()
               if not (k.endswith(".alpha") and "to_k" in k)}  # to_k: alpha left out, so alpha = its rank
    save_file(tensors, str(tmp_path / "some-alphas.safetensors"))
    unet, encoder = build_tiny_unet(), build_tiny_text_encoder()
    rule = ranks_from_file(tmp_path / "some-alphas.safetensors", UniformRanks(8, 8.0), unet, encoder)
    network = create_network(unet, encoder, preset="full", ranks=rule)
    assert sorted(network.names()) == sorted(mixed.names()) and rule.ranks() == [1, 3]
    for name in network.names():
        expected_alpha = 3.0 if "to_k" in name else 2.0
        assert (network[name].rank, float(network[name].alpha)) == (mixed[name].rank, expected_alpha), name
    report = start_network_from_file(network, tmp_path / "some-alphas.safetensors", unet, encoder)
    assert report.fresh == [] and len(report.loaded) == len(mixed)


def _mixed_spec(name, layer):
    """A module per algorithm and shape-changing option, as LyCORIS's algorithm maps mix them in one file."""
    from lorakit.network import ModuleSpec

    for part, spec in (("to_q", ModuleSpec(2, 1.0, "lokr", {"factor": 4})),
                       ("to_k", ModuleSpec(3, 3.0, "loha")),
                       ("to_v", ModuleSpec(2, 1.0, "lora", {"dora": True})),
                       ("to_out", ModuleSpec(1, 1.0, "ia3")),
                       ("proj_in", ModuleSpec(2, 2.0, "glora")),
                       ("proj_out", ModuleSpec(4, 1.0, "oft", {"constraint": 1e-3, "rescaled": True})),
                       ("ff_net_2", ModuleSpec(2, 1.0, "boft")),
                       ("conv1", ModuleSpec(2, 1.0, "lora", {"use_tucker": True})),
                       ("conv2", ModuleSpec(2, 1.0, "loha", {"use_tucker": True})),
                       ("self_attn_q", ModuleSpec(1, 1.0, "full")),
                       ("lokr_full", None)):
        if part in name:
            return spec
    return None


def test_dim_from_weights_builds_each_module_as_the_file_holds_it(tmp_path):
    """LyCORIS's create_network_from_weights: each module gets the file's algorithm and the options that shape it
    (LoKr's factors, DoRA, Tucker cores, OFT's blocks and rescale, BOFT's stages), whatever the run's algorithm;
    the file then starts the network exactly, module for module."""
    from lorakit.formats import ranks_from_file

    unet, encoder = build_tiny_unet(), build_tiny_text_encoder()
    mixed = create_network(unet, encoder, preset="full", ranks=_mixed_spec)
    algorithms = {name: mixed[name].algorithm for name in mixed.names()}
    assert set(algorithms.values()) == {"lokr", "loha", "lora", "ia3", "glora", "oft", "boft", "full"}
    randomize(mixed)
    path = save_network(mixed, tmp_path / "mixed.safetensors")
    unet, encoder = build_tiny_unet(), build_tiny_text_encoder()
    rule = ranks_from_file(path, UniformRanks(8, 8.0), unet, encoder, algorithm="lora")
    network = create_network(unet, encoder, preset="lycoris-full", ranks=rule, algorithm="lora",
                             options={"dropout": 0.1})
    assert {name: network[name].algorithm for name in network.names()} == algorithms
    assert network[next(n for n in network.names() if "to_q" in n)].layout == \
        mixed[next(n for n in mixed.names() if "to_q" in n)].layout  # factor 4, not the default
    report = start_network_from_file(network, path, unet, encoder)
    assert report.fresh == [] and len(report.loaded) == len(mixed)
    expected = mixed.file_tensors()
    assert network.file_tensors().keys() == expected.keys()
    for key, value in network.file_tensors().items():
        assert torch.equal(value, expected[key]), key
    # the run's training options still reach the modules of its own algorithm
    assert all(network[n].dropout == 0.1 for n in network.names() if network[n].algorithm == "lora")


def test_dim_from_weights_keeps_dylora_on_a_lora_file_and_refuses_a_module_that_does_not_fit(tmp_path):
    from lorakit.formats import ranks_from_file

    path, trained = _trained_file(tmp_path, preset="attn-only", te=False, rank=4)
    unet = build_tiny_unet()
    rule = ranks_from_file(path, UniformRanks(8, 8.0), unet, algorithm="dylora")
    network = create_network(unet, preset="lycoris-full", ranks=rule, algorithm="dylora",
                             options={"block_size": 2})
    assert {network[n].algorithm for n in network.names()} == {"dylora"} and len(network) == len(trained)
    lokr, _ = _trained_file(tmp_path, "lokr.safetensors", preset="attn-only", te=False, algorithm="lokr")
    tensors = dict(read_adapter(lokr).tensors)
    name = sorted(k for k in tensors if k.endswith("lokr_w1"))[0]
    tensors[name] = tensors[name][:-1]  # one row short: w1 ⊗ w2 no longer covers the layer's outputs
    save_file(tensors, str(tmp_path / "short.safetensors"))
    with pytest.raises(AdapterFileError) as info:
        create_network(build_tiny_unet(), preset="lycoris-full", ranks=ranks_from_file(
            tmp_path / "short.safetensors", UniformRanks(8, 8.0), build_tiny_unet()))
    message = str(info.value)
    assert str(tmp_path / "short.safetensors") in message and name.split(".")[0] in message and "lokr_w1" in message


def test_modules_the_file_lacks_start_fresh(tmp_path):
    path, _ = _trained_file(tmp_path, preset="attn-only", te=False)
    network, unet, _ = _network(preset="full", te=False)
    fresh = _snapshot(network)
    report = start_network_from_file(network, path, unet)
    assert report.loaded and report.fresh and len(report.loaded) + len(report.fresh) == len(network)
    assert f"{len(report.fresh)} start fresh" in report.summary()
    after = network.file_tensors()
    for name in report.fresh:
        assert all(torch.equal(after[k], v) for k, v in fresh.items() if k.startswith(name + "."))
    changed = [k for k in after if not torch.equal(after[k], fresh[k])]
    assert changed and all(k.split(".")[0] in report.loaded for k in changed)


@pytest.mark.parametrize(("change", "said"), [
    ({"rank": 2}, "rank 4 in the file, 2 here (--rank"),
    ({"alpha": 1.0}, "alpha 2 in the file, 1 here (--alpha"),
    ({"algorithm": "loha"}, "the file's modules are lora, this run trains loha (--algorithm)"),
    ({"preset": "attn-only"}, "their layers are not adapted in this run (--preset"),
    ({"te": False}, "this run does not train the text encoder (network.train_unet, network.train_text_encoder)"),
    ({"dora": True}, "the file's keys differ from this run's adapter (missing ['dora_scale']"),
])
def test_a_file_that_does_not_fit_is_refused_naming_it_and_what_to_change(tmp_path, change, said):
    path, _ = _trained_file(tmp_path, preset="full")
    kw = {"preset": "full", **change}
    network, unet, encoder = _network(**kw)
    before = _snapshot(network)
    with pytest.raises(AdapterFileError) as info:
        start_network_from_file(network, path, unet, encoder)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot start this run's network from it: ") and said in message
    assert " of its " in message and " modules (" in message  # counted once, not listed module by module
    assert all(torch.equal(network.file_tensors()[k], v) for k, v in before.items())  # nothing changed


def test_a_file_for_another_model_names_no_layer(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 4)}, str(path))
    network, unet, encoder = _network()
    with pytest.raises(AdapterFileError, match=r"1 of its 1 modules \(lora_unet_not_a_layer\): they name no layer"):
        start_network_from_file(network, path, unet, encoder)


def test_a_files_norm_updates_are_built_through_block_learning_rates_too(tmp_path):
    """--dim-from-weights with kohya's block learning rates: the file's norm-layer updates are built where their
    blocks train, as the rest of its modules are (the rule wrapping the file's still says which)."""
    from lorakit.blocks import SD1, WithoutZeroBlocks, parse_block_lr_weights
    from lorakit.formats import ranks_from_file

    unet = build_tiny_unet()
    trained = create_network(unet, preset="attn-mlp", options={"train_norm": True})
    randomize(trained)
    path = save_network(trained, tmp_path / "norms.safetensors")
    unet = build_tiny_unet()
    weights = parse_block_lr_weights("0,0,0,0,0,0,1,1,1,1,1,1", None, None, 0.0, SD1)  # down blocks untrained
    rule = WithoutZeroBlocks(ranks_from_file(path, UniformRanks(4, 4.0), unet, algorithm="lora"), weights)
    assert rule.holds_norms() and rule.chooses_norms
    network = create_network(unet, preset="lycoris-full", ranks=rule, options={"train_norm": True})
    kept = {n for n in trained.names() if weights(n) != 0}
    assert set(network.names()) == kept and any(network[n].kind == "norm" for n in kept)
