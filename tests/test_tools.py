"""lorakit.tools: low-rank SVD, extract, resize, merge (bake and combine); round trips and refusals.

Models: the built-in model (loaded once per module) for everything that needs a real base model.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_unet

from lorakit.blocks import SD1
from lorakit.errors import LorakitError
from lorakit.formats import AdapterFileError, load_network, read_adapter, save_network, write_adapter
from lorakit.models import builtin_model_path, load_base_model
from lorakit.network import UniformRanks, create_network
from lorakit.tools import MismatchError, ToolError
from lorakit.tools.deltas import file_deltas, parse_adapter_spec
from lorakit.tools.extract import extract_adapter
from lorakit.tools.lowrank import Delta, RankRule, factorize, thin_svd
from lorakit.tools.merge import bake, combine, save_model
from lorakit.tools.resize import resize_adapter

needs_builtin = pytest.mark.skipif(not (builtin_model_path() / "model_index.json").is_file(),
                                   reason="the built-in model is not shipped in this checkout")


# ---- lowrank ------------------------------------------------------------------------------------------------

def test_product_svd_equals_dense_svd_without_materialising():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 6, generator=g), torch.randn(6, 90, generator=g)
    u, s, vh = thin_svd(Delta((40, 90), up=up, down=down))
    assert s.shape == (6,)  # the core is 6 x 6: nothing 40 x 90 was decomposed
    dense_s = torch.linalg.svdvals(up.double() @ down.double())
    torch.testing.assert_close(s, dense_s[:6], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, up.double() @ down.double(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(60, 400), (400, 60)])
def test_gram_svd_of_large_dense_matrices_matches_lapack(shape):
    from lorakit.tools.lowrank import dense_svd

    g = torch.Generator().manual_seed(3)
    m, n = shape
    k = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -6, k, dtype=torch.float64)
    a = (q1 * spectrum) @ q2.T
    u, s, vh = dense_svd(a, gram_above=0)  # forced through eigh(A Aᵀ)
    torch.testing.assert_close(s[:20], spectrum[:20], rtol=1e-9, atol=0)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, rtol=0, atol=1e-14)  # full rank: exact
    r = 10
    best = torch.linalg.norm(a - (q1[:, :r] * spectrum[:r]) @ q2[:, :r].T)
    torch.testing.assert_close(torch.linalg.norm(a - (u[:, :r] * s[:r]) @ vh[:r]), best, rtol=1e-9, atol=0)


def test_rank_rules_follow_kohya_definitions():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    assert RankRule(3).choose(s) == 3 and RankRule(10).choose(s) == 5
    assert RankRule(dynamic="sv_ratio", param=4).choose(s) == 2  # keep σ > 8/4 = 2 strictly
    assert RankRule(dynamic="sv_ratio", param=4.01).choose(s) == 3
    # sv_fro: sqrt(64/85.25)=0.866, sqrt(80/85.25)=0.969 -> 0.9 needs 2
    assert RankRule(dynamic="sv_fro", param=0.9).choose(s) == 2
    # sv_cumulative: 8/15.5=0.516, 12/15.5=0.774, 14/15.5=0.903 -> 0.8 needs 3
    assert RankRule(dynamic="sv_cumulative", param=0.8).choose(s) == 3
    assert RankRule(2, dynamic="sv_cumulative", param=0.8).choose(s) == 2  # rank caps a dynamic rule
    assert RankRule().choose(torch.tensor([1.0, 1e-9])) == 1  # lossless drops float noise only
    assert RankRule(4).choose(torch.zeros(3)) == 0
    for bad in (dict(dynamic="sv_fro", param=1.5), dict(dynamic="sv_ratio", param=0.5), dict(dynamic="svd"),
                dict(dynamic="sv_fro"), dict(param=0.5), dict(rank=-1)):
        with pytest.raises(ToolError):
            RankRule(**bad)


def test_factorize_reports_energy_and_errors():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    f = factorize(Delta.from_weight(w), RankRule(5))
    assert f.rank == 5
    assert f.report.energy == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), rel=1e-12)
    err = w - f.up @ f.down
    assert f.report.fro_error == pytest.approx(float(err.norm() / w.norm()), rel=1e-9)
    assert f.report.fro_error == pytest.approx((1 - f.report.energy) ** 0.5, rel=1e-9)
    assert f.report.max_error == pytest.approx(float(err.abs().max() / w.abs().max()), rel=1e-9)
    clamped = factorize(Delta.from_weight(w), RankRule(5), clamp_quantile=0.5)
    assert clamped.up.abs().max() < f.up.abs().max() or clamped.down.abs().max() < f.down.abs().max()
    assert clamped.report.fro_error > f.report.fro_error  # the clamp shows in the error, not in the energy
    assert clamped.report.energy == f.report.energy


def test_conv_factors_have_locon_layout():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 4, 3, 3, generator=g)
    f = factorize(Delta.from_weight(w), RankRule())
    from lorakit.tools.lowrank import lora_tensors

    t = lora_tensors(f, alpha=2.0)
    assert t["lora_down.weight"].shape == (f.rank, 4, 3, 3) and t["lora_up.weight"].shape == (8, f.rank, 1, 1)
    rebuilt = (2.0 / f.rank) * (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1))
    torch.testing.assert_close(rebuilt.reshape(w.shape), w, rtol=1e-5, atol=1e-5)


def test_adapter_specs():
    spec = parse_adapter_spec("some/dir/a.safetensors")
    assert spec.multiplier == 1.0 and spec.block_weights is None
    spec = parse_adapter_spec("a.safetensors:0.5:MIDD")
    assert spec.multiplier == 0.5 and spec.lbw == "MIDD"
    assert spec.weight("lora_unet_mid_block_attentions_0_proj_in") == 0.5
    assert spec.weight("lora_unet_down_blocks_0_attentions_0_proj_in") == 0.0  # IN01: 0 in MIDD
    spec = parse_adapter_spec("C:/x/a.safetensors:0.5")  # a colon in the path
    assert str(spec.path) == "C:/x/a.safetensors" and spec.multiplier == 0.5 and spec.block_weights is None
    spec = parse_adapter_spec("a.safetensors:0.7:" + ",".join(["1"] * 26))
    assert spec.block_weights.blocks == (1.0,) * len(SD1)
    with pytest.raises(ToolError, match="17 or 26 values"):
        parse_adapter_spec("a.safetensors:1:1,0,1")
    with pytest.raises(LorakitError):
        parse_adapter_spec("a.safetensors:1:NOPRESET")



def test_a_multiplier_that_is_no_number_is_named_not_called_a_missing_file(tmp_path):
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"")
    for typed, rest in ((f"{adapter}:O.8", "'O.8'"), (f"{adapter}:abc:MIDD", "'abc:MIDD'")):
        with pytest.raises(ToolError, match=f"{adapter} is a file, but {rest} after it is no multiplier; give "):
            parse_adapter_spec(typed)
    with pytest.raises(ToolError, match="the multiplier 'nan' is not a finite number"):
        parse_adapter_spec(f"{adapter}:nan")
    with pytest.raises(LorakitError, match="block weights must be finite numbers"):
        parse_adapter_spec(f"{adapter}:1:" + ",".join(["1"] * 16 + ["inf"]))
    odd = tmp_path / "b.safetensors:x"  # a file whose own name holds a colon is still read as it is
    odd.write_bytes(b"")
    assert parse_adapter_spec(str(odd)).path == odd


# ---- with the built-in model -----------------------------------------------------------------------------------

def _random_adapter(model, path, *, algorithm="lora", preset="full", rank=4, alpha=2.0, seed=0, scale=0.05,
                    text_encoder=True, **options):
    network = create_network(model.unet, model.text_encoder if text_encoder else None, preset=preset,
                             algorithm=algorithm, ranks=UniformRanks(rank, alpha, conv_rank=2, conv_alpha=1.0),
                             options=options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for key, p in adapter.named_parameters():
                if not key.startswith("base."):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_network(network, path)
    network.remove()
    return path


def unet_out(model, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 6, model.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return model.unet(latents, torch.tensor([10, 700]), context).sample


def _weights(model) -> dict[str, torch.Tensor]:
    return {**{f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in model.text_encoder.state_dict().items()}}


def _layer_weights(model) -> dict[str, torch.Tensor]:
    from lorakit.network import adaptable_layers, components

    return {c.kohya_name(p): layer.weight.detach().reshape(layer.weight.shape[0], -1)
            for c in components(model.unet, model.text_encoder) for p, layer in adaptable_layers(c)}


def test_merge_then_extract_at_full_rank_recovers_delta(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors")
    expected = file_deltas(path, base)
    tuned = copy.deepcopy(base)
    bake(tuned, [path])
    weights = _layer_weights(tuned)
    result = extract_adapter(tuned, base, RankRule(10_000))
    got = file_deltas(result.as_file(), base)
    assert set(got) == set(expected)
    for name, delta in expected.items():
        want = delta.matrix()
        # float precision: the merge rounded W0 + ΔW to float32, so ΔW is known to about eps·|W0 + ΔW|
        tol = 2 * torch.finfo(torch.float32).eps * float(weights[name].abs().max())
        assert float((got[name].matrix() - want).abs().max()) <= tol, name
    assert all(r.energy == pytest.approx(1.0, abs=1e-12) for r in result.reports)


def test_extract_then_resize_energy_matches_direct_svd(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors", rank=8)
    tuned = copy.deepcopy(base)
    bake(tuned, [path])
    extracted = extract_adapter(tuned, base, RankRule(6), RankRule(3))
    extracted.write(tmp_path / "x.safetensors")
    resized = resize_adapter(tmp_path / "x.safetensors", RankRule(dynamic="sv_fro", param=0.9, rank=4))
    direct = {}
    w_tuned = file_deltas(tmp_path / "x.safetensors")
    for r in resized.reports:
        s = torch.linalg.svdvals(w_tuned[r.name].matrix())  # a direct SVD of the extracted ΔW
        k = RankRule(dynamic="sv_fro", param=0.9, rank=4).choose(s)
        direct[r.name] = float((s[:k] ** 2).sum() / (s**2).sum())
        assert r.rank == k
        assert r.energy == pytest.approx(direct[r.name], rel=1e-9, abs=1e-12), r.name
    assert 0.5 < min(direct.values()) and max(r.rank for r in resized.reports) <= 4
    # alpha/rank of the source (1 for an extracted file) is kept: one alpha, ratio x the largest rank
    file = resized.as_file()
    assert {float(t["alpha"]) for t in file.modules().values()} == {4.0}


def test_resize_keeps_alpha_ratio_and_reduces_error_with_rank(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors", rank=4, alpha=2.0, text_encoder=False)
    errors = []
    for rank in (1, 2, 4):
        result = resize_adapter(path, RankRule(rank))
        alphas = {float(t["alpha"]) for t in result.as_file().modules().values()}
        assert alphas == {0.5 * rank}  # the source's alpha / rank = 2 / 4
        errors.append(max(r.fro_error for r in result.reports))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6
    # the resized file's ΔW is what the report claims
    result = resize_adapter(path, RankRule(2))
    before, after = file_deltas(path), file_deltas(result.as_file())
    for r in result.reports:
        want = before[r.name].matrix()
        err = float((after[r.name].matrix() - want).norm() / want.norm())
        assert err == pytest.approx(r.fro_error, rel=1e-4, abs=1e-6)


def test_reported_errors_are_those_of_the_written_dtype(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors", rank=4, text_encoder=False)
    result = resize_adapter(path, RankRule(4), dtype=torch.float16)  # nothing dropped: only fp16 rounding
    before, after = file_deltas(path), file_deltas(result.as_file())
    assert next(iter(result.as_file().tensors.values())).dtype == torch.float16
    errors = []
    for r in result.reports:
        want = before[r.name].matrix()
        errors.append(float((after[r.name].matrix() - want).norm() / want.norm()))
        # the report rounds the factors before the file's alpha is folded in: the same size, not the same bits
        assert 0.4 < errors[-1] / r.fro_error < 2.5, r.name
    assert 1e-5 < max(errors) < 1e-2


def test_resize_writes_kohya_names_for_a_lycoris_wrapper_file(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors", rank=4, alpha=2.0)
    file = read_adapter(path)
    renamed = {}
    for key, tensor in file.tensors.items():  # as LyCORIS's own wrapper names them (transformers-5 TE paths)
        key = key.replace("lora_unet_", "lycoris_").replace("lora_te_text_model_", "lycoris_")
        renamed[key] = tensor
    lyco = write_adapter(tmp_path / "lyco.safetensors", renamed)
    result = resize_adapter(lyco, RankRule(2))
    assert set(result.as_file().modules()) == set(file.modules())
    assert {float(t["alpha"]) for t in result.as_file().modules().values()} == {1.0}  # alpha / rank 1/2 kept


def test_block_weight_zero_leaves_those_blocks_bit_identical(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors")
    model = copy.deepcopy(base)
    before = _weights(model)
    lines = bake(model, [f"{path}:0.8:OUTALL"])  # OUTALL: BASE 1, IN 0, MID 0, OUT03..OUT11 1
    assert "left alone (weight 0)" in lines[0]
    after = _weights(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed
    for key in before:
        if key.startswith("unet.down_blocks.") or key.startswith("unet.mid_block."):
            assert torch.equal(before[key], after[key]), key  # bit for bit
    assert any(k.startswith("unet.up_blocks.") for k in changed)
    assert any(k.startswith("te.") for k in changed)
    # SDXL's 20-value layout fits no SD1.x file: refused naming the file, nothing merged
    sdxl_string = ",".join(["1"] * 20)
    for call in (lambda: bake(model, [f"{path}:1:{sdxl_string}"]),
                 lambda: file_deltas(path, spec=parse_adapter_spec(f"{path}:1:{sdxl_string}"))):
        with pytest.raises(ToolError, match=r"a.safetensors: a sd1 block-weight string has 17 or 26 values"):
            call()
    assert all(torch.equal(after[k], v) for k, v in _weights(model).items())


def test_lora_plus_lora_combined_exactly_equals_applying_both(base, tmp_path):
    a = _random_adapter(base, tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=1)
    b = _random_adapter(base, tmp_path / "b.safetensors", rank=2, alpha=8.0, seed=2, preset="attn-mlp")
    specs = [f"{a}:0.7", f"{b}:-0.4:INALL"]
    result = combine(specs, base)
    assert all(r.note == "exact" for r in result.reports)
    out = result.write(tmp_path / "ab.safetensors", [a, b])
    both = copy.deepcopy(base)
    nets = []
    for spec in (parse_adapter_spec(s) for s in specs):
        net, _ = load_network(spec.path, both.unet, both.text_encoder)
        net.set_multiplier(spec.multiplier, spec.block_weights)
        nets.append(net)
        # stack: merge this one so the next can load on plain layers
        net.merge()
        net.remove(keep_merged=True)
    expected = unet_out(both)
    combined = copy.deepcopy(base)
    net, report = load_network(out, combined.unet, combined.text_encoder)
    assert report.ok
    torch.testing.assert_close(unet_out(combined), expected, rtol=1e-4, atol=1e-5)
    file = read_adapter(out)
    # ranks concatenated where both touch a module: attention layers of IN blocks have 4 + 2
    ranks = {n: t["lora_down.weight"].shape[0] for n, t in file.modules().items()}
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 6
    assert ranks["lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"] == 4
    assert file.metadata["ss_network_module"] == "networks.lora"


def test_combine_to_a_target_rank_reports_energy(base, tmp_path):
    a = _random_adapter(base, tmp_path / "a.safetensors", rank=4, seed=1, text_encoder=False)
    b = _random_adapter(base, tmp_path / "b.safetensors", rank=4, seed=2, text_encoder=False)
    result = combine([a, b], base, RankRule(4))
    assert max(r.rank for r in result.reports) == 4
    assert all(0 < r.energy < 1 for r in result.reports if r.rank_in > 4)
    da, db = file_deltas(a), file_deltas(b)
    summed = {n: da[n].matrix() + db[n].matrix() for n in da}
    got = file_deltas(result.as_file())
    for r in result.reports[:20]:
        err = float((got[r.name].matrix() - summed[r.name]).norm() / summed[r.name].norm())
        assert err == pytest.approx(r.fro_error, rel=1e-4, abs=1e-6)


def test_save_model_single_file_and_folder_load_back(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors", text_encoder=False)
    model = copy.deepcopy(base)
    bake(model, [f"{path}:0.5"])
    expected = unet_out(model)
    single = save_model(model, tmp_path / "merged.safetensors", [path])
    folder = save_model(model, tmp_path / "merged", [path])
    for where in (single, folder):
        torch.testing.assert_close(unet_out(load_base_model(where)), expected, rtol=0, atol=0)
    with pytest.raises(ToolError, match="exists"):
        save_model(model, folder)


def test_a_merged_model_is_readable_by_other_users_as_the_umask_says(base, tmp_path):
    """diffusers' save_pretrained writes its safetensors 0600 (safetensors >= 0.8.1): another user's client, or a
    container with another uid, could not load the merged model.  Under umask 022: folders 0755, files 0644."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        folder = save_model(copy.deepcopy(base), tmp_path / "merged", [])
        single = save_model(copy.deepcopy(base), tmp_path / "merged.safetensors", [])
    finally:
        os.umask(previous)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
    assert modes == {0o644} and stat.S_IMODE(single.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert any(p.suffix == ".safetensors" for p in folder.rglob("*"))


# ---- refusals --------------------------------------------------------------------------------------------------

def test_never_overwrites_an_input_or_an_existing_file(base, tmp_path):
    path = _random_adapter(base, tmp_path / "a.safetensors", text_encoder=False)
    result = resize_adapter(path, RankRule(2))
    before = path.read_bytes()
    with pytest.raises(ToolError, match="is an input"):
        result.write(path, [path], overwrite=True)
    assert path.read_bytes() == before
    result.write(tmp_path / "b.safetensors", [path])
    with pytest.raises(ToolError, match="exists"):
        result.write(tmp_path / "b.safetensors", [path])
    with pytest.raises(ToolError, match="is an input"):
        save_model(base, path, [path])


def test_a_folder_holding_an_input_or_a_users_files_is_never_replaced_by_a_merged_model(base, tmp_path, capsys):
    """`lorakit merge run/lorakit.safetensors --out run --overwrite` replaced the run folder with the model: the
    adapter it had just read and every other file in it were gone. An output folder holding an input, a file of an
    input model folder and a folder that is not a model are refused; a model folder is replaced, as asked."""
    from lorakit.cli import main

    run = tmp_path / "run"
    run.mkdir()
    adapter = _random_adapter(base, run / "lorakit.safetensors", text_encoder=False)
    (run / "notes.txt").write_text("mine")
    model = str(builtin_model_path())
    for out, said in ((run, "holds an input"), (tmp_path, "holds an input")):
        assert main(["merge", str(adapter), "--model", model, "--out", str(out), "--overwrite"]) == 2
        assert f"{out}: {said} ({adapter})" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["lorakit.safetensors", "notes.txt"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.png").write_bytes(b"irreplaceable")
    assert main(["merge", str(adapter), "--model", model, "--out", str(mine), "--overwrite"]) == 2
    assert "a folder that is not a diffusers model (it holds photo.png" in capsys.readouterr().err
    assert (mine / "photo.png").read_bytes() == b"irreplaceable"
    merged = tmp_path / "merged"
    for _ in range(2):  # a model folder written before is replaced when asked
        assert main(["merge", str(adapter), "--model", model, "--out", str(merged), "--overwrite"]) == 0
    weights = next((merged / "unet").glob("*.safetensors"))
    before = weights.read_bytes()
    assert main(["extract", str(merged), "--base", model, "--out", str(weights), "--overwrite", "--no-progress"]) == 2
    assert f"{weights}: part of the input {merged} (a model's own file)" in capsys.readouterr().err
    assert weights.read_bytes() == before


def test_a_model_folder_whose_weights_are_another_file_is_refused_by_name(base, tmp_path):
    """A diffusers folder whose U-Net weights file holds an adapter loaded with the weights unset (a traceback
    about meta tensors); it is said which part lacks what."""
    from lorakit.models import ModelLoadError

    folder = save_model(copy.deepcopy(base), tmp_path / "model", [])
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.unlink()
    _random_adapter(base, weights, text_encoder=False)
    with pytest.raises(ModelLoadError, match=r"model/unet: its weights file lacks \d+ of the weights its config "
                                             r"describes \(e\.g\. .*\); \d+ it does not expect \(e\.g\. lora_unet_"):
        load_base_model(folder)


def test_adapter_for_another_architecture_is_refused(base, tmp_path):
    unet = build_tiny_unet()  # cross-attention width 32, the built-in model has 128
    network = create_network(unet, preset="kohya", ranks=UniformRanks(2, 1.0))
    other = save_network(network, tmp_path / "other.safetensors")
    network.remove()
    for call in (lambda: bake(copy.deepcopy(base), [other]), lambda: combine([other], base),
                 lambda: resize_adapter(other, to_lora=True, model=base)):
        with pytest.raises(MismatchError, match="other.safetensors: does not fit the model"):
            call()


def test_models_of_different_shapes_are_refused(base, tmp_path, tiny_model_dir):
    other = load_base_model(tiny_model_dir)  # same architecture: fine
    extract_adapter(other, base, RankRule(1))
    with torch.no_grad():
        other.unet.conv_in = torch.nn.Conv2d(4, 32, 5, padding=2)
    with pytest.raises(MismatchError, match="differ in shape at U-Net conv_in.weight"):
        extract_adapter(other, base, RankRule(1))
    with pytest.raises(MismatchError, match="nothing to extract"):
        extract_adapter(base, base, RankRule(1))


def test_resize_refuses_other_algorithms_without_to_lora(base, tmp_path):
    path = _random_adapter(base, tmp_path / "h.safetensors", algorithm="loha", preset="attn-only",
                           text_encoder=False)
    with pytest.raises(ToolError, match="--to lora"):
        resize_adapter(path, RankRule(2))
    with pytest.raises(ToolError, match="needs the base model"):
        resize_adapter(path, to_lora=True)
    with pytest.raises(ToolError, match="--rank"):
        resize_adapter(_random_adapter(base, tmp_path / "l.safetensors", text_encoder=False))
    write_adapter(tmp_path / "empty.safetensors", {"lora_unet_loose": torch.zeros(2)})  # an adapter's name only
    with pytest.raises(ToolError, match="no adapter modules"):
        resize_adapter(tmp_path / "empty.safetensors", RankRule(1))
    write_adapter(tmp_path / "other.safetensors", {"emb": torch.zeros(2)})  # said from the header
    with pytest.raises(AdapterFileError, match="not an adapter: none of its 1 tensors has an adapter's key names"):
        resize_adapter(tmp_path / "other.safetensors", RankRule(1))


def _sdxl_lora(path, scale: float = 0.1) -> None:
    """A kohya SDXL LoRA file: LDM module names, both text encoders."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp) in {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (64, 64),
                             "lora_unet_middle_block_1_proj_in": (64, 64),
                             "lora_unet_output_blocks_8_1_proj_out": (32, 32),
                             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (48, 48),
                             "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (80, 80)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=gen) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=gen) * scale
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def test_block_weights_on_an_sdxl_file_act_on_its_own_blocks(tmp_path):
    """LoRA Block Weight's SDXL string (BASE, IN00-IN08, M00, OUT00-OUT08) on kohya's LDM names; an SD1.x preset
    does not fit an SDXL file and is refused naming it (before: every U-Net module kept weight 1)."""
    path = tmp_path / "xl.safetensors"
    _sdxl_lora(path)
    full = file_deltas(path)
    values = ["0.5"] + ["0"] * 4 + ["2"] + ["0"] * 4 + ["3"] + ["0"] * 8 + ["1"]  # IN04 2, MID 3, OUT08 1
    deltas = file_deltas(path, spec=parse_adapter_spec(f"{path}:1:{','.join(values)}"))
    for name, weight in (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 2.0),
                         ("lora_unet_middle_block_1_proj_in", 3.0), ("lora_unet_output_blocks_8_1_proj_out", 1.0),
                         ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 0.5)):
        torch.testing.assert_close(deltas[name].weight(), weight * full[name].weight())
    with pytest.raises(ToolError, match=r"xl.safetensors: a sdxl block-weight string has 12, 20 or 26 values"):
        file_deltas(path, spec=parse_adapter_spec(f"{path}:1:MIDD"))
    merged = combine([f"{path}:1:{','.join(values)}"])
    assert set(merged.factors) == set(full)  # merge --to-adapter of an SDXL file with its block weights


def test_inspect_counts_an_sdxl_file_in_sdxl_blocks(tmp_path):
    from lorakit.inspection import block_ranks, inspect_file, summary

    path = tmp_path / "xl.safetensors"
    _sdxl_lora(path)
    report = inspect_file(path)
    assert report.base_model == "sdxl" and report.blocks == {"IN04": 1, "MID": 1, "OUT08": 1}
    assert block_ranks(report) == "IN04 4, MID 4, OUT08 4"
    assert "It touches U-Net blocks IN04, MID, OUT08." in summary(report)
    # resize reads it without a model: the same modules, cut to rank 2, still counted as SDXL
    out = resize_adapter(path, RankRule(rank=2)).write(tmp_path / "xl2.safetensors", [path])
    small = inspect_file(out)
    assert small.base_model == "sdxl" and block_ranks(small) == "IN04 2, MID 2, OUT08 2"
    assert {m.name for m in small.modules} == {m.name for m in report.modules}


@pytest.fixture(scope="module")
def other_model(base, tmp_path_factory):
    """The built-in model with every weight moved a little: another fine-tune of the same base, as a folder."""
    from lorakit.models import save_diffusers_folder

    other = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for part in (other.unet, other.text_encoder, other.vae):
            for p in part.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return save_diffusers_folder(other, tmp_path_factory.mktemp("other") / "model"), other


def test_a_whole_model_merges_as_a_weighted_sum_from_the_base_as_given(base, other_model, tmp_path):
    folder, other = other_model
    adapter = _random_adapter(base, tmp_path / "a.safetensors")
    merged = copy.deepcopy(base)
    lines = bake(merged, [str(adapter), f"{folder}:0.3"])
    assert "a whole model, every weight 0.3 of the way from the base to its own (U-Net, text encoder, VAE)" in lines[1]
    with_adapter = copy.deepcopy(base)
    bake(with_adapter, [str(adapter)])
    for part in ("unet", "text_encoder", "vae"):  # the model's difference from the base, not from base + adapter
        got, start, theirs, mine = (getattr(m, part).state_dict() for m in (merged, base, other, with_adapter))
        for key in list(got)[:40]:
            expected = mine[key] + 0.3 * (theirs[key] - start[key])
            torch.testing.assert_close(got[key], expected, rtol=1e-5, atol=1e-6)


def test_merge_takes_a_whole_model_on_the_command_line_and_refuses_to_combine_it(base, other_model, tmp_path):
    folder, other = other_model
    out = tmp_path / "merged.safetensors"
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "merge", f"{folder}:0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    merged = load_base_model(str(out))
    key = "conv_in.weight"
    torch.testing.assert_close(merged.unet.state_dict()[key],
                               0.5 * (base.unet.state_dict()[key] + other.unet.state_dict()[key]), rtol=1e-5, atol=1e-6)
    refused = subprocess.run([sys.executable, "-m", "lorakit.cli", "merge", f"{folder}:0.5", "--to-adapter", "--out",
                              str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "a whole model holds weights, not an update to combine" in refused.stderr


@pytest.mark.parametrize("algorithm", ["lora", "loha"])
def test_the_tools_read_an_fp8_file_as_its_upcast_values(base, tmp_path, algorithm):
    """A float8 file (a storage choice some savers make) was an isfinite traceback in every command."""
    path = _random_adapter(base, tmp_path / "a.safetensors", algorithm=algorithm)
    stored = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v
              for k, v in read_adapter(path).tensors.items()}
    fp8 = write_adapter(tmp_path / "fp8.safetensors", stored)
    upcast = write_adapter(tmp_path / "upcast.safetensors", {k: v.float() for k, v in stored.items()})
    for got, want in ((file_deltas(fp8, base), file_deltas(upcast, base)),
                      (file_deltas(resize_adapter(fp8, RankRule(2), to_lora=True, model=base).as_file(), base),
                       file_deltas(resize_adapter(upcast, RankRule(2), to_lora=True, model=base).as_file(), base))):
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name].matrix(), want[name].matrix(), rtol=0, atol=0)
