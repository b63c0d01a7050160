"""The commands sample, merge, extract, resize (through ``lorakit.cli.main``) and several adapters at once."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from test_tools import _random_adapter, unet_out

from lorakit.cli import main
from lorakit.formats import read_adapter
from lorakit.models import load_base_model
from lorakit.tools.apply import applied
from lorakit.tools.merge import bake


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return (_random_adapter(base, d / "a.safetensors", rank=4, alpha=2.0, seed=1),
            _random_adapter(base, d / "b.safetensors", rank=2, alpha=1.0, seed=2, preset="attn-mlp"))


def _state(model):
    return {k: v.clone() for k, v in {**model.unet.state_dict(), **model.text_encoder.state_dict()}.items()}


def test_several_adapters_unmerged_equal_merged_and_leave_the_model_alone(base, files):
    a, b = files
    specs = [f"{a}:0.8", f"{b}:0.5:MIDD"]
    before, plain = _state(base), unet_out(base)
    ids = torch.tensor([[845, 5, 17, 42, 846]])
    with torch.no_grad():
        plain_te = base.text_encoder(ids).last_hidden_state
    with applied(base, specs) as changed:
        unmerged = unet_out(base)
        with torch.no_grad():
            unmerged_te = base.text_encoder(ids).last_hidden_state
        assert changed > 0
        during = _state(base)
        assert all(torch.equal(v, during[k]) for k, v in before.items())  # unmerged: weights untouched
    with applied(base, specs, merged=True):
        merged = unet_out(base)
        with torch.no_grad():
            merged_te = base.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(unmerged_te, merged_te, rtol=1e-4, atol=1e-5)
    assert (unmerged_te - plain_te).abs().max() > 1e-3  # the text-encoder modules act too
    after = _state(base)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    torch.testing.assert_close(unet_out(base), plain, rtol=0, atol=0)
    torch.testing.assert_close(unmerged, merged, rtol=1e-4, atol=1e-5)
    assert (unmerged - plain).abs().max() > 1e-3


def test_sample_command_writes_grid_and_singles(base, files, tmp_path, capsys):
    a, b = files
    prompts = tmp_path / "p.txt"
    prompts.write_text("# kohya syntax\na star on a blue background --d 5 --s 3\na red circle --s 3 --l 5\n")
    rc = main(["sample", f"{a}:0.8:OUTALL", f"{b}:0.5", "--prompts", str(prompts), "--out", str(tmp_path / "s"),
               "--device", "cpu"])
    assert rc == 0
    pngs = sorted(p.name for p in (tmp_path / "s").glob("*.png"))
    assert pngs == ["000-a-star-on-a-blue-background.png", "001-a-red-circle.png", "grid.png"]
    out = capsys.readouterr().out
    assert "a:0.8:OUTALL" in out and "2 image(s)" in out
    # the same folder again: the images of the first call are the user's now; replaced only when asked
    first = (tmp_path / "s" / "grid.png").read_bytes()
    again = ["sample", f"{a}:0.2", "--prompts", str(prompts), "--out", str(tmp_path / "s"), "--device", "cpu"]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "000-a-star-on-a-blue-background.png" in err and "exist (an earlier call?)" in err
    assert "pass --overwrite to replace them" in err
    assert (tmp_path / "s" / "grid.png").read_bytes() == first
    assert main([*again, "--overwrite"]) == 0 and (tmp_path / "s" / "grid.png").read_bytes() != first
    (tmp_path / "a-file").write_text("mine")  # said before any image is drawn, not as "[Errno 17]" after
    assert main([*again[:-4], "--out", str(tmp_path / "a-file"), "--device", "cpu"]) == 2
    assert f"--out {tmp_path / 'a-file'}: exists and is not a folder" in capsys.readouterr().err
    # an adapter at multiplier 0 changes nothing; the same adapter merged or not gives (nearly) the same image
    for name, extra in (("plain", []), ("zero", [f"{a}:0"]), ("unmerged", [f"{a}:1"]),
                        ("merged", [f"{a}:1", "--merged"])):
        assert main(["sample", *extra, "--prompt", "a star --s 3 --d 7", "--out", str(tmp_path / name),
                     "--device", "cpu"]) == 0
    img = {n: np.asarray(Image.open(tmp_path / n / "000-a-star.png"),
                         dtype=np.int16) for n in ("plain", "zero", "unmerged", "merged")}
    assert np.array_equal(img["plain"], img["zero"])
    assert np.abs(img["unmerged"] - img["merged"]).max() <= 2
    assert np.abs(img["unmerged"] - img["plain"]).max() > 2


def test_a_sweep_draws_every_prompt_at_each_strength(files, tmp_path, capsys):
    """--sweep 0,0.5,1 (A1111's X/Y plot of a LoRA's weight): a row per prompt, a column per strength, each the
    adapter's multiplier times the value; ×0 is the base model's image and ×1 the adapter's as given."""
    a, _ = files
    flags = ["--prompt", "a star --s 3 --d 7", "--prompt", "a red circle --s 3 --d 8", "--device", "cpu"]
    assert main(["sample", f"{a}:2", *flags, "--sweep", "0,0.25,0.5", "--out", str(tmp_path / "sweep")]) == 0
    said = capsys.readouterr()
    out = said.out
    assert "sampling x0: " in said.err and "sampling x0.5: " in said.err  # a bar per column
    names = {p.name for p in (tmp_path / "sweep").glob("*.png")}
    assert names == {"000-a-star-x0.png", "000-a-star-x0.25.png", "000-a-star-x0.5.png", "001-a-red-circle-x0.png",
                     "001-a-red-circle-x0.25.png", "001-a-red-circle-x0.5.png", "grid.png"}, names
    assert "6 image(s)" in out
    for name, extra in (("plain", ["--no-progress"]), ("half", [f"{a}:1"])):
        assert main(["sample", *extra, *flags, "--out", str(tmp_path / name)]) == 0
        assert ("sampling: " in capsys.readouterr().err) == (name == "half")
    image = lambda path: np.asarray(Image.open(path), dtype=np.int16)  # noqa: E731
    sweep = tmp_path / "sweep"
    for prompt in ("000-a-star", "001-a-red-circle"):
        assert np.array_equal(image(sweep / f"{prompt}-x0.png"), image(tmp_path / "plain" / f"{prompt}.png"))
        assert np.array_equal(image(sweep / f"{prompt}-x0.5.png"), image(tmp_path / "half" / f"{prompt}.png"))
        assert np.abs(image(sweep / f"{prompt}-x0.25.png") - image(sweep / f"{prompt}-x0.5.png")).max() > 2
    grid, single = Image.open(sweep / "grid.png"), Image.open(sweep / "000-a-star-x0.png")
    assert grid.width >= 3 * single.width and grid.height < 3 * single.height + 200  # 3 columns, 2 rows
    assert main(["sample", *flags, "--sweep", "0,1", "--out", str(tmp_path / "none")]) == 2
    assert "--sweep draws a column per adapter setting: give at least one adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", f"{a}", *flags, "--sweep", "half", "--out", str(tmp_path / "bad")])
    assert "'half': comma-separated numbers" in capsys.readouterr().err


def test_each_adapter_alone_in_a_column_of_its_own(files, tmp_path, capsys):
    """--each: every prompt with each adapter alone (a run's epoch checkpoints side by side, named by their
    folders); each column is what that adapter draws alone."""
    import shutil

    a, b = files
    epoch = tmp_path / "run" / "checkpoints" / "epoch-0003"
    epoch.mkdir(parents=True)
    shutil.copy(b, epoch / "trained.safetensors")
    flags = ["--prompt", "a star --s 3 --d 7", "--device", "cpu"]
    assert main(["sample", f"{a}:0.5", str(epoch / "trained.safetensors"), *flags, "--each",
                 "--out", str(tmp_path / "each")]) == 0
    out = capsys.readouterr().out
    assert "adapter epoch-0003:1" in out and "2 image(s)" in out
    names = {p.name for p in (tmp_path / "each").glob("*.png")}
    assert names == {"000-a-star-a-0.5.png", "000-a-star-epoch-0003-1.png", "grid.png"}, names
    assert main(["sample", f"{b}", *flags, "--out", str(tmp_path / "b")]) == 0
    image = lambda path: np.asarray(Image.open(path), dtype=np.int16)  # noqa: E731
    assert np.array_equal(image(tmp_path / "each" / "000-a-star-epoch-0003-1.png"),
                          image(tmp_path / "b" / "000-a-star.png"))
    with pytest.raises(SystemExit):  # one axis of columns at a time
        main(["sample", str(a), *flags, "--each", "--sweep", "0,1", "--out", str(tmp_path / "both")])


def test_sample_refuses_bad_block_weights(files, tmp_path, capsys):
    a, _ = files
    rc = main(["sample", f"{a}:1:1,0,1", "--prompt", "x", "--out", str(tmp_path / "s")])
    assert rc == 2 and "17 or 26 values" in capsys.readouterr().err


def test_merge_commands(base, files, tmp_path, capsys):
    a, b = files
    assert main(["merge", f"{a}:0.7", f"{b}:-0.3", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "modules merged" in capsys.readouterr().out
    baked = copy.deepcopy(base)
    bake(baked, [f"{a}:0.7", f"{b}:-0.3"])
    torch.testing.assert_close(unet_out(load_base_model(tmp_path / "m.safetensors")), unet_out(baked), rtol=0,
                               atol=0)
    assert main(["merge", f"{a}:0.7", f"{b}:-0.3", "--out", str(tmp_path / "ab.safetensors"), "--to-adapter",
                 "--report", str(tmp_path / "ab.txt")]) == 0
    out = capsys.readouterr().out
    assert "exact: ranks concatenated" in out and "retained energy 1.000000" in out
    assert "lora_unet_" in (tmp_path / "ab.txt").read_text()
    # refusals: an input as output, an existing output
    assert main(["merge", str(a), "--out", str(a), "--to-adapter"]) == 2
    assert "is an input" in capsys.readouterr().err
    assert main(["merge", str(a), "--out", str(tmp_path / "ab.safetensors"), "--to-adapter"]) == 2
    assert "exists" in capsys.readouterr().err
    # the --report file is the user's too: refused before any work, not replaced after it
    (tmp_path / "mine.txt").write_text("my notes")
    assert main(["merge", str(a), "--out", str(tmp_path / "c.safetensors"), "--to-adapter",
                 "--report", str(tmp_path / "mine.txt")]) == 2
    assert "mine.txt exists" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "my notes" and not (tmp_path / "c.safetensors").exists()


def test_extract_and_resize_commands(base, files, tmp_path, capsys):
    a, _ = files
    tuned = copy.deepcopy(base)
    bake(tuned, [a])
    from lorakit.tools.merge import save_model

    save_model(tuned, tmp_path / "tuned")
    x = tmp_path / "x.safetensors"
    assert main(["extract", str(tmp_path / "tuned"), "--out", str(x), "--rank", "6", "--conv-rank", "2",
                 "--report", str(tmp_path / "x.txt")]) == 0
    said = capsys.readouterr()
    assert "extract: " in said.out and "retained energy" in said.out
    assert "extracting: " in said.err and "/301 " in said.err  # an SVD per layer: a bar over them
    assert main(["extract", str(tmp_path / "tuned"), "--out", str(tmp_path / "quiet.safetensors"), "--rank", "2",
                 "--no-progress"]) == 0
    assert "extracting" not in capsys.readouterr().err
    file = read_adapter(x)
    ranks = {n: t["lora_down.weight"].shape[0] for n, t in file.modules().items()}
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 2
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 6  # fixed rank
    assert any(n.startswith("lora_te_") for n in ranks)
    assert file.metadata["ss_network_module"] == "networks.lora"
    assert file.metadata["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "6"}'  # one alpha per file
    y = tmp_path / "y.safetensors"
    assert main(["resize", str(x), "--out", str(y), "--dynamic", "sv_fro", "--param", "0.9", "--rank", "3"]) == 0
    resized = read_adapter(y)
    assert max(t["lora_down.weight"].shape[0] for t in resized.modules().values()) <= 3
    assert "resize" in resized.metadata["lorakit_tool"]
    # described for model managers: the extracted file after its model, the resized one as its source
    assert file.metadata["modelspec.title"] == "tuned"
    assert file.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert file.metadata["modelspec.resolution"] == f"{base.resolution}x{base.resolution}"
    assert {k: v for k, v in resized.metadata.items() if k.startswith("modelspec.") and k != "modelspec.date"} \
        == {k: v for k, v in file.metadata.items() if k.startswith("modelspec.") and k != "modelspec.date"}
    assert main(["resize", str(x), "--out", str(tmp_path / "z.safetensors")]) == 2
    assert "--rank" in capsys.readouterr().err
    # an output that is no adapter file is said before the work, not as a traceback after it
    for command in (["resize", str(x), "--rank", "2"], ["extract", str(tmp_path / "tuned"), "--rank", "2"],
                    ["convert", str(x), "--to", "diffusers"], ["merge", str(x), "--to-adapter"]):
        assert main([*command, "--out", str(tmp_path / "tuned"), "--overwrite"]) == 2
        assert f"{tmp_path / 'tuned'}: is a folder; give the path of the .safetensors file" in capsys.readouterr().err
        assert main([*command, "--out", str(tmp_path / "x.pt")]) == 2
        assert "x.pt: does not end in .safetensors" in capsys.readouterr().err



def test_rank_zero_and_an_output_with_no_module_are_refused_before_a_file_is_written(base, files, tmp_path, capsys):
    """--rank 0 (or a typo's -1) would write a file with no module, which no client reads as anything: refused by
    every tool that takes it; --conv-rank 0 leaves the convs out and says so, not that their ΔW is zero; a file
    that would hold no module (every ΔW zero) is not written."""
    from safetensors.torch import save_file

    from lorakit.tools.merge import save_model

    a, _ = files
    out = tmp_path / "out.safetensors"
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.unet.down_blocks[0].resnets[0].conv1.weight.add_(0.01)  # only a 3x3 conv differs
    save_model(tuned, tmp_path / "tuned")
    for command in (["resize", str(a)], ["extract", str(tmp_path / "tuned")], ["merge", str(a), "--to-adapter"]):
        for rank in ("0", "-1"):
            with pytest.raises(SystemExit) as exit_:
                main([*command, "--rank", rank, "--out", str(out)])
            assert exit_.value.code == 2
            assert f"argument --rank: must be a whole number of 1 or more, got '{rank}'" in capsys.readouterr().err
            assert not out.exists()
    assert main(["extract", str(tmp_path / "tuned"), "--rank", "2", "--conv-rank", "0", "--out", str(out)]) == 2
    assert "the only layers that differ are 1 k x k conv(s), and --conv-rank 0 leaves them out" in \
        capsys.readouterr().err and not out.exists()
    assert main(["resize", str(a), "--rank", "2", "--conv-rank", "0", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "lora_unet_down_blocks_0_resnets_0_conv1: --conv-rank 0 leaves k x k convs out; no module written" in said
    assert "ΔW is zero" not in said
    assert not any("resnets_0_conv1" in name for name in read_adapter(out).modules())
    zero = {k: torch.zeros_like(v) if k.endswith("lora_up.weight") else v for k, v in read_adapter(a).tensors.items()}
    save_file(zero, str(tmp_path / "zero.safetensors"))
    empty = tmp_path / "z.safetensors"
    assert main(["resize", str(tmp_path / "zero.safetensors"), "--rank", "2", "--out", str(empty)]) == 2
    assert "no module is left to write, so" in capsys.readouterr().err and not empty.exists()


def test_python_api_with_adapters_and_an_embedding(base, files, tmp_path):
    from safetensors.torch import save_file

    from lorakit.sample import SamplePrompt, generate_with_adapters

    a, _ = files
    emb = tmp_path / "qxz.safetensors"
    width = base.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"clip_l": torch.randn(2, width, generator=torch.Generator().manual_seed(0))}, str(emb),
              metadata={"lorakit_ti_token": "qxz"})
    model = copy.deepcopy(base)
    prompt = [SamplePrompt("a qxz star", steps=2, seed=4)]
    plain = generate_with_adapters(model, [], prompt, progress=False)[0]
    before = _state(model)
    both = generate_with_adapters(model, [f"{a}:0.5"], prompt, embeddings=[emb], progress=False)[0]
    assert model.tokenizer.convert_tokens_to_ids(["qxz", "qxz_1"]) == [len(model.tokenizer) - 2,
                                                                      len(model.tokenizer) - 1]
    after = _state(model)
    assert all(torch.equal(v, after[k]) for k, v in before.items() if "token_embedding" not in k)
    assert np.abs(np.asarray(both, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).max() > 2
    # an A1111 embedding names no token: its file name is the word, as in A1111 and ComfyUI
    a1111 = tmp_path / "my_style.safetensors"
    vector = torch.randn(1, width, generator=torch.Generator().manual_seed(1))
    save_file({"emb_params": vector}, str(a1111))
    generate_with_adapters(model, [], [SamplePrompt("a my_style star", steps=2, seed=4)], embeddings=[a1111],
                           progress=False)
    (token_id,) = model.tokenizer.convert_tokens_to_ids(["my_style"])
    assert token_id == len(model.tokenizer) - 1 and model.tokenizer("a my_style").input_ids[2] == token_id
    assert torch.equal(model.text_encoder.get_input_embeddings().weight[token_id], vector[0])


def _limit_file_size() -> None:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_merge_past_a_file_size_limit_says_so_and_leaves_no_file(files, tmp_path):
    """A real `lorakit merge` under a 2 MB file-size limit (as a full disk) writing a 14 MB checkpoint: one line
    naming the file, exit 2, and no half-written file or temporary left (safetensors' writer reports it as
    "os error 27", not as an OSError, and it ended in a traceback)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "merge", str(files[0]), "--out",
                           str(out / "merged.safetensors")], capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"lorakit merge: error: {out / 'merged.safetensors'}: File too large (a full disk, a file-size limit or a "
        "full quota); lorakit's writes are atomic, so no half-written file was left: free space and run the same "
        "command again")
    assert "Traceback" not in done.stderr and list(out.iterdir()) == []


def test_merge_and_extract_on_an_sd2_model_write_sd2_files(tiny_sd2_dir, tmp_path, capsys):
    """An adapter baked into an SD2.x-kind model comes out in SD2.x's single-file layout (or a diffusers folder),
    equal to the baked model; a LoRA extracted from it names SD2 as kohya does."""
    from lorakit.models import read_checkpoint

    sd2 = load_base_model(tiny_sd2_dir)
    a = _random_adapter(sd2, tmp_path / "a.safetensors")
    baked = copy.deepcopy(sd2)
    bake(baked, [f"{a}:0.7"])
    single, folder = tmp_path / "m.safetensors", tmp_path / "m"
    for out in (single, folder):
        assert main(["merge", f"{a}:0.7", "--model", str(tiny_sd2_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    tensors, _ = read_checkpoint(single)
    assert any(k.startswith("cond_stage_model.model.") for k in tensors)
    for merged in (load_base_model(single, config=tiny_sd2_dir), load_base_model(folder)):
        assert merged.version == "sd2"
        torch.testing.assert_close(unet_out(merged), unet_out(baked), rtol=0, atol=0)
        ids = torch.tensor([[1, 5, 9, 2]])
        with torch.no_grad():
            torch.testing.assert_close(merged.text_encoder(ids)[0], baked.text_encoder(ids)[0], rtol=0, atol=0)
    x = tmp_path / "x.safetensors"
    assert main(["extract", str(folder), "--base", str(tiny_sd2_dir), "--out", str(x), "--rank", "4"]) == 0
    meta = read_adapter(x).metadata
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


@pytest.mark.parametrize("command", [
    ["resize", "{file}", "--to", "lora", "--out", "{tmp}/r.safetensors"],
    ["convert", "{file}", "--to", "kohya", "--out", "{tmp}/c.safetensors"],
    ["merge", "{file}", "--out", "{tmp}/m.safetensors"],
    ["sample", "{file}", "--prompt", "a star --s 2", "--out", "{tmp}/s"],
    ["interrogate", "{file}", "--no-progress"],
], ids=lambda c: c[0])
def test_a_file_for_another_model_says_when_the_built_in_model_was_used_for_want_of_model(command, tmp_path,
                                                                                           capsys):
    """``lorakit resize SDXL_LOKR.safetensors --to lora`` (the trainer's own hint for diffusers) answered "does not
    fit the model (... the model is cross-attention width 128)": the user gave no model and did not know one was
    chosen for them."""
    from conftest import build_tiny_unet

    from lorakit.formats import save_network
    from lorakit.models import builtin_model_path
    from lorakit.network import UniformRanks, create_network

    # width 32, not 128; a LoHa, so that resize --to lora reads it on the model
    network = create_network(build_tiny_unet(), preset="kohya", ranks=UniformRanks(2, 1.0), algorithm="loha")
    other = save_network(network, tmp_path / "other.safetensors")
    line = [part.format(file=other, tmp=tmp_path) for part in command]
    assert main(line) == 2
    err = capsys.readouterr().err
    assert "other.safetensors: does not fit the model" in err
    assert "no --model was given, so that was the built-in shapes-world model: give the base model the file was " \
           "made for" in err
    assert main([*line, "--model", str(builtin_model_path())]) == 2  # a model given: nothing said about a default
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "no --model" not in err
    assert not [p for p in tmp_path.iterdir() if p.name != "other.safetensors"]


def test_a_device_or_clip_skip_this_model_or_machine_lacks_is_refused_in_words(base, files, tmp_path, capsys):
    """--device cuda on a CPU-only torch was an AssertionError traceback, --device tpu a RuntimeError; interrogate
    took --clip-skip -1 (a layer counted from the wrong end)."""
    a, _ = files
    absent = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for device, said in (("tpu", "--device 'tpu': not a device torch knows; use cpu, cuda (or cuda:N) or mps"),
                         (absent, f"--device {absent}: this " + ("torch" if absent == "cuda" else "machine"))):
        assert main(["sample", "--prompt", "x", "--device", device, "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"lorakit sample: error: {said}")
        assert not (tmp_path / "out").exists()
    assert main(["interrogate", str(a), "--clip-skip", "-1"]) == 2
    assert "clip skip -1: the text encoder of " in capsys.readouterr().err


def test_sample_says_a_missing_or_wrong_file_and_a_place_it_cannot_write_before_drawing(base, tmp_path, capsys):
    """Each was an OS error's own words ("[Errno 2] No such file or directory", "[Errno 21] Is a directory"), or for
    --out under a file, said only after the images were made; a call that fails leaves no empty --out behind."""
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    for options, said in (
            (["--prompts", str(tmp_path / "none.txt")], f"{tmp_path / 'none.txt'}: no such prompt file"),
            (["--prompts", str(tmp_path)], f"{tmp_path}: is a folder; give a prompt file (.txt, .toml or .json)"),
            (["--prompt", "x", "--embedding", str(tmp_path / "none.safetensors")],
             f"{tmp_path / 'none.safetensors'}: no such embedding file"),
            (["--prompt", "x", "--embedding", str(tmp_path)], f"{tmp_path}: is a folder; give an embedding's"),
            (["--prompt", "x", "--out", str(tmp_path / "notes.txt" / "out")],
             f"--out {tmp_path / 'notes.txt' / 'out'}: cannot be made there (Not a directory); choose another folder"),
            (["--prompt", "x", "--clip-skip", "9"], "clip skip 9: the text encoder of ")):  # after --out was made
        assert main(["sample", "--steps", "2", "--out", str(out), *options]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"lorakit sample: error: {said}")
        assert not out.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_output_path_inside_a_file_is_refused_naming_the_file_by_every_command(files, tmp_path, capsys):
    """`--out notes.txt/x`: the OS said "[Errno 17] File exists: 'notes.txt'" (train: "[Errno 20] Not a directory",
    after rendering its data); each command names the file in the way now, before any work, and writes nothing."""
    a, _ = files
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    inside = notes / "x"
    run = tmp_path / "run"  # a run folder for report
    for command in (["resize", str(a), "--rank", "2", "--out", f"{inside}.safetensors"],
                    ["convert", str(a), "--to", "kohya", "--out", f"{inside}.safetensors"],
                    ["merge", str(a), "--out", str(inside)],
                    ["interrogate", str(a), "--json", f"{inside}.json"],
                    ["train", "--out", str(inside), "--max-steps", "1"],  # the built-in job renders data first
                    ["train", "--out", str(inside), "--dry-run"],
                    ["world", "dataset", str(inside)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.splitlines()[-1]
        assert f"{notes} is a file, not a folder" in err and "Errno" not in err, err
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    from eval_helpers import write_run

    write_run(run, epochs=1)
    assert main(["report", str(run), "--out", f"{inside}.html"]) == 2
    assert f"--out {inside}.html: {notes} is a file, not a folder" in capsys.readouterr().err
