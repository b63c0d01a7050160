"""The trainer on the built-in architecture with random weights: files, resume, failures, methods.

Whether training *learns* the concept is shown on the pretrained model in test_train_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.checkpoints import OutputFolderError, RunFolder
from lorakit.config import TrainConfig, load_config
from lorakit.data import DatasetError
from lorakit.world.captions import natural_caption
from lorakit.world.render import ObjectSpec, Scene, render


def write_dataset(folder: Path, n: int = 4, repeats: int = 1) -> Path:
    sub = folder / f"{repeats}_zkz shape"
    sub.mkdir(parents=True)
    for i in range(n):
        scene = Scene((ObjectSpec("star", ("red", "yellow")[i % 2], "large", ("left", "center")[i % 2]),),
                      "white", seed=i)
        render(scene).save(sub / f"{i:03d}.png")
        (sub / f"{i:03d}.txt").write_text(natural_caption(scene, shape_word="zkz shape"))
    return folder


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


def make_config(model_dir: Path, data_dir: Path, out: Path, **sections) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.base = str(model_dir)
    cfg.data.train_data = str(data_dir)
    cfg.data.batch_size = 2
    if sections.get("method", {}).get("kind") not in ("ti", "native"):  # they refuse adapter settings
        cfg.network.rank = 2
        cfg.network.alpha = 1.0
    cfg.optimizer.learning_rate = 1e-3
    cfg.training.max_epochs = 2
    cfg.early_stop.mode = "off"
    cfg.output.dir = str(out)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def run_train(cfg: TrainConfig):
    from lorakit.train import train

    return train(cfg, progress=False)


# -------------------------------------------------------------------------------------------------- files
def test_lora_run_writes_result_checkpoints_and_summary(tiny_model_dir, dataset, tmp_path):
    from lorakit.formats import load_network
    from lorakit.models import load_base_model

    out = tmp_path / "run"
    result = run_train(make_config(tiny_model_dir, dataset, out))
    assert result.steps == 4 and result.epochs == 2 and not result.stopped_early
    assert [c.epoch for c in RunFolder(out, "resume").checkpoints()] == [1, 2]
    adapter = out / "lorakit.safetensors"
    assert adapter in result.files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["method"] == "adapter"
    assert "adapter" in (out / "summary.txt").read_text()
    assert (out / "config.toml").exists()
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    assert losses == pytest.approx(result.losses) and len(losses) == 4

    # the file is a kohya-named LoRA that loads back into a fresh copy of the model, every key matched
    model = load_base_model(tiny_model_dir)
    network, report = load_network(adapter, model.unet, model.text_encoder)
    assert report.ok and len(report.matched) == len(network) > 0
    tensors = load_file(str(adapter))
    assert all(k.startswith("lora_unet_") for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert any(float(u.abs().max()) > 0 for u in ups), "training changed nothing"


def test_existing_output_folder_is_protected(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"already holds files.*--resume.*--overwrite"):
        run_train(make_config(tiny_model_dir, dataset, out))
    with pytest.raises(OutputFolderError, match="not a lorakit run folder"):
        run_train(make_config(tiny_model_dir, dataset, out, output={"if_exists": "overwrite"}))
    assert (out / "precious.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


def die_after_saving(monkeypatch, last_epoch: int):
    """Make the run die right after it saved the checkpoint of ``last_epoch``; returns the real save, to put
    back before resuming."""
    original = RunFolder.save_checkpoint

    def save_then_die(self, epoch, *args, **kwargs):
        saved = original(self, epoch, *args, **kwargs)
        if epoch == last_epoch:
            raise Interrupt(f"killed after epoch {last_epoch}")
        return saved

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_then_die)
    return original


def test_resume_continues_exactly(tiny_model_dir, dataset, tmp_path, monkeypatch):
    cfg = make_config(tiny_model_dir, dataset, tmp_path / "straight", training={"max_epochs": 3},
                      network={"dropout": 0.1})
    straight = run_train(cfg)

    interrupted = tmp_path / "interrupted"
    original = die_after_saving(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run_train(make_config(tiny_model_dir, dataset, interrupted, training={"max_epochs": 3},
                              network={"dropout": 0.1}))
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    resumed = run_train(make_config(tiny_model_dir, dataset, interrupted, training={"max_epochs": 3},
                                    network={"dropout": 0.1}, output={"if_exists": "resume"}))
    assert resumed.losses == straight.losses  # bit-identical on CPU
    a = load_file(str(tmp_path / "straight" / "lorakit.safetensors"))
    b = load_file(str(interrupted / "lorakit.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log holds each step once
    steps = [json.loads(line)["step"] for line in (interrupted / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_gradient_accumulation_steps_at_each_epoch_end_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """optimizer.gradient_accumulation_steps: an optimizer step every N batches and at an epoch's last batch, so a
    step never takes batches of two epochs (3 batches at N = 2 were 1 step in the first epoch, the third batch's
    gradient carried into the next, and the run fell short of its planned steps and schedule); a run killed after
    a step checkpoint in the middle of an epoch resumes to the straight run's weights."""
    data = write_dataset(tmp_path / "data", n=3)

    def config(out, **output):
        return make_config(tiny_model_dir, data, out, data={"batch_size": 1}, output=output,
                           training={"max_epochs": 2, "save_every_n_steps": 1},
                           optimizer={"gradient_accumulation_steps": 2, "lr_scheduler": "linear"})

    straight = run_train(config(tmp_path / "straight"))
    records = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in steps] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert [r["lr"] for r in steps] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])  # the schedule runs to its end

    original = die_after_saving(monkeypatch, 1)  # after the first step's checkpoint, mid-epoch
    with pytest.raises(Interrupt):
        run_train(config(tmp_path / "interrupted"))
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    resumed = run_train(config(tmp_path / "interrupted", if_exists="resume"))
    assert resumed.losses == straight.losses
    a = load_file(str(tmp_path / "straight" / "lorakit.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "lorakit.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_save_keeps_previous_checkpoint(tiny_model_dir, dataset, tmp_path, monkeypatch):
    import lorakit.checkpoints as checkpoints

    real_save = checkpoints.save_file
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise Interrupt("power cut while saving epoch 2")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", failing_save)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_train(make_config(tiny_model_dir, dataset, out))
    run = RunFolder(out, "resume")
    assert [c.epoch for c in run.checkpoints()] == [1]
    assert load_file(str(run.checkpoint(1).tensors_path))  # intact and readable
    monkeypatch.setattr(checkpoints, "save_file", real_save)
    resumed = run_train(make_config(tiny_model_dir, dataset, out, output={"if_exists": "resume"}))
    assert resumed.steps == 4 and [c.epoch for c in RunFolder(out, "resume").checkpoints()] == [1, 2]


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, dataset, tmp_path, monkeypatch):
    import lorakit.train as train_module

    real = train_module.compute_loss
    count = {"n": 0}

    def loss_goes_nan(*args, **kwargs):
        count["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if count["n"] == 3 else loss

    monkeypatch.setattr(train_module, "compute_loss", loss_goes_nan)
    out = tmp_path / "run"
    with pytest.raises(train_module.TrainingError, match=r"NaN or infinite at step 3.*epoch-0001"):
        run_train(make_config(tiny_model_dir, dataset, out))
    assert [c.epoch for c in RunFolder(out, "resume").checkpoints()] == [1]


def test_a_base_model_holding_nan_is_named_not_the_learning_rate(tiny_model_dir, dataset, tmp_path):
    """A model file with NaN in its weights: the loss is NaN at the first step, and the message said to lower the
    learning rate or check the images."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import lorakit.train as train_module

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if k.startswith("mid_block") and k.endswith("conv1.weight"))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(train_module.TrainingError, match=rf"at step 1 .*The base model itself holds NaN or infinite "
                                                         rf"values \(1 tensor, e.g. UNet2DConditionModel.{name}\)"):
        run_train(make_config(broken, dataset, tmp_path / "run"))
    assert train_module.nonfinite_weights([torch.nn.Linear(2, 2)]) == []


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_data_is_reported_before_training(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty"):
        run_train(make_config(tiny_model_dir, empty, tmp_path / "r1"))

    data = write_dataset(tmp_path / "corrupt")
    (data / "1_zkz shape" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match="001.png"):
        run_train(make_config(tiny_model_dir, data, tmp_path / "r2"))

    data = write_dataset(tmp_path / "orphan")
    (data / "1_zkz shape" / "ghost.txt").write_text("a zkz shape")
    with pytest.raises(DatasetError, match="ghost.txt"):
        run_train(make_config(tiny_model_dir, data, tmp_path / "r3"))


def test_small_images_warn_about_upscaling(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "small")
    from PIL import Image

    Image.new("RGB", (16, 16), "white").save(data / "1_zkz shape" / "000.png")
    from lorakit.data import DatasetWarning

    with pytest.warns(DatasetWarning, match="000.png"):
        run_train(make_config(tiny_model_dir, data, tmp_path / "run", training={"max_epochs": 1}))


# ------------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("algorithm", ["loha", "lokr", "ia3", "full", "oft", "boft", "glora"])
def test_other_algorithms_train(tiny_model_dir, dataset, tmp_path, algorithm):
    from lorakit.formats import read_adapter

    out = tmp_path / algorithm
    result = run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                                   network={"algorithm": algorithm, "preset": "attn-only"}))
    from lorakit.formats import detect_algorithm

    file = read_adapter(out / "lorakit.safetensors")
    assert {detect_algorithm(m) for m in file.modules().values()} == {algorithm} and result.steps == 2
    # every algorithm starts at ΔW = 0 (a zero factor), so a non-zero ΔW is what training changed
    from lorakit.formats import load_network
    from lorakit.models import load_base_model

    model = load_base_model(tiny_model_dir)
    network, report = load_network(out / "lorakit.safetensors", model.unet, model.text_encoder)
    assert report.ok and len(report.matched) == len(network) > 0
    changed = [n for n, a in network.adapters.items() if float(a.delta_weight().detach().abs().max()) > 0]
    assert len(changed) > len(network) // 2, f"{algorithm}: training left ΔW = 0 in most modules"


@pytest.mark.parametrize("algorithm, lycoris_algo", [("oft", "diag-oft"), ("boft", "boft"), ("glora", "glora")])
def test_lycoris_family_files_record_lycoris_names_and_load_back(tiny_model_dir, dataset, tmp_path, algorithm,
                                                                 lycoris_algo):
    """OFT/BOFT/GLoRA runs write ss_network_module/args as LyCORIS's kohya wrapper does, and the file loads back
    into adapters whose tensors are the file's and whose forward is the base layer with W0 + ΔW."""
    from lorakit.formats import load_network, read_adapter
    from lorakit.models import load_base_model

    out = tmp_path / algorithm
    run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                          network={"algorithm": algorithm, "preset": "attn-only", "args": {"constraint": 1e-2}
                                   if algorithm != "glora" else {}}))
    path = out / "lorakit.safetensors"
    metadata = read_adapter(path).metadata
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == lycoris_algo
    model = load_base_model(tiny_model_dir)
    network, report = load_network(path, model.unet, model.text_encoder)
    assert report.ok and len(network) > 0
    stored = load_file(str(path))
    for name, adapter in network.adapters.items():
        for key, value in adapter.file_tensors().items():
            torch.testing.assert_close(value.float(), stored[f"{name}.{key}"].float())
    for adapter in network.adapters.values():
        x = torch.randn((2, 3, adapter.in_features) if adapter.kind == "linear" else (2, adapter.in_features, 4, 4))
        with torch.no_grad():
            expected = adapter.base_forward(x, adapter.base.weight + adapter.delta_weight(), adapter.base.bias)
            torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-5)


def test_dylora_run_writes_a_kohya_dylora_file_that_cuts_to_any_block(tiny_model_dir, dataset, tmp_path):
    """A DyLoRA run (rank 4, block size 2) writes a plain LoRA file with kohya's DyLoRA metadata; training changed
    it; cut to rank 2 it is its truncated factors and loads back as a LoRA."""
    from lorakit.formats import detect_algorithm, load_network, read_adapter
    from lorakit.models import load_base_model
    from lorakit.tools.lowrank import RankRule
    from lorakit.tools.resize import resize_adapter

    out = tmp_path / "dylora"
    run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                          network={"algorithm": "dylora", "preset": "attn-only", "rank": 4,
                                   "args": {"block_size": 2}}))
    path = out / "lorakit.safetensors"
    file = read_adapter(path)
    assert file.metadata["ss_network_module"] == "networks.dylora"
    assert json.loads(file.metadata["ss_network_args"])["unit"] == "2"
    assert {detect_algorithm(m) for m in file.modules().values()} == {"lora"}
    ups = [t["lora_up.weight"] for t in file.modules().values()]
    assert any(float(u[:, 2:].abs().max()) > 0 for u in ups), "the second block never learned"
    cut_path = tmp_path / "cut.safetensors"
    resize_adapter(path, RankRule(rank=2)).write(cut_path, [path])
    model = load_base_model(tiny_model_dir)
    network, report = load_network(cut_path, model.unet, model.text_encoder)
    assert report.ok and len(network) == len(file.modules())
    for name, tensors in file.modules().items():
        alpha = float(tensors["alpha"])
        expected = (alpha / 2) * (tensors["lora_up.weight"][:, :2].reshape(-1, 2)
                                  @ tensors["lora_down.weight"][:2].reshape(2, -1))
        got = network.adapters[name].delta_weight().detach().reshape(expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_keeps_adapters_fp32_and_samples(tiny_model_dir, dataset, tmp_path):
    """Also the samples drawn during the run: the U-Net accelerate wraps for mixed precision returns fp32, and the
    pipeline handed those latents to the bf16 VAE (the built-in job with --mixed-precision bf16 crashed at its
    first sample)."""
    import numpy as np
    from PIL import Image

    from lorakit.formats import read_adapter

    out = tmp_path / "bf16"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\n")
    result = run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                                   model={"mixed_precision": "bf16"}, sample={"prompts": str(prompts)}))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    tensors = read_adapter(out / "lorakit.safetensors").tensors
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    assert np.asarray(Image.open(out / "samples" / "epoch-0001.png")).std() > 1  # an image, not a blank frame


def test_no_half_vae_keeps_the_vae_fp32_and_samples_with_it(tiny_model_dir, dataset, tmp_path):
    """kohya's --no_half_vae under bf16: latents are encoded and samples decoded by an fp32 VAE beside the
    half-precision U-Net (the pipeline alone would mix the two dtypes)."""
    import numpy as np
    from accelerate import Accelerator
    from PIL import Image

    from lorakit.train import prepare_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\n")
    cfg = make_config(tiny_model_dir, dataset, tmp_path / "run", training={"max_epochs": 1},
                      model={"mixed_precision": "bf16", "no_half_vae": True}, sample={"prompts": str(prompts)},
                      data={"cache_latents": False})
    model = prepare_model(cfg, Accelerator(cpu=True))
    assert (model.vae.dtype, model.unet.dtype) == (torch.float32, torch.bfloat16)
    from lorakit.sample import generate

    image = generate(model, ["a zkz shape"], progress=False)[0]  # bf16 latents, decoded by the fp32 VAE
    assert np.asarray(image).std() > 1
    result = run_train(cfg)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "epoch-0001.png"))
    assert grid.std() > 1  # an image, not a blank frame


def counting_backend(graphs: list) -> str:
    """A torch.compile backend that records the inputs of every graph it compiles, then runs it with
    ``aot_eager`` (which traces and partitions like inductor, op by op): how a test counts (re)compilations."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    def counting(gm, example_inputs, **kwargs):
        graphs.append([tuple(t.shape) for t in example_inputs if torch.is_tensor(t)])
        return lookup_backend("aot_eager")(gm, example_inputs, **kwargs)

    name = f"lorakit_test_counting_{id(graphs)}"
    register_backend(counting, name=name)
    return name


# compiling takes 45 s (LoRA) and more (LoHa, its autograd Function traced) of one worker: both run with
# pytest -m extended, where they passed on 2026-12-06; the settings' checks stay in the suite (below)
@pytest.mark.parametrize("algorithm", [pytest.param("lora", marks=pytest.mark.extended),
                                       pytest.param("loha", marks=pytest.mark.extended)])
def test_a_compiled_unet_trains_the_same_adapter_as_the_eager_one(tiny_model_dir, dataset, tmp_path, algorithm):
    """``model.compile``: torch.compile traces the training step (the adapters' forward and backward included,
    LoHa's autograd Function too) and trains what eager mode trains, compiling once: sampling, checkpoints and
    the CS meter between epochs run beside the compiled graph and never make it compile again (with inductor
    every recompile costs minutes)."""
    import torch._dynamo

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\n")
    sections = {"training": {"max_epochs": 2}, "network": {"algorithm": algorithm},
                "sample": {"prompts": str(prompts)}, "early_stop": {"mode": "report"}}
    eager = run_train(make_config(tiny_model_dir, dataset, tmp_path / "eager", **sections))
    torch._dynamo.reset()
    graphs: list = []
    compiled = run_train(make_config(tiny_model_dir, dataset, tmp_path / "compiled", **sections,
                                     model={"compile": True, "compile_backend": counting_backend(graphs)}))
    assert len(compiled.losses) == len(eager.losses) == 4
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-6)
    a = load_file(str(tmp_path / "eager" / "lorakit.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "lorakit.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    moved = [k for k in a if "lora_up" in k or "hada_w1_a" in k]
    assert moved and any(b[k].abs().sum() > 0 for k in moved)  # it trained something
    assert len(list((tmp_path / "compiled" / "samples").rglob("*.png"))) >= 2  # it sampled after each epoch
    assert len(graphs) == 1, graphs  # 4 steps of one shape, two epochs with samples between: one compilation


def test_compile_settings_are_checked_before_anything_runs(tiny_model_dir, dataset, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.config import ConfigError

    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "flag"), "--compile", "--print-config"]) == 0
    assert "compile = true" in capsys.readouterr().out

    for key, value in (("compile_mode", "fastest"), ("compile_backend", "tensorrt-please")):
        cfg = make_config(tiny_model_dir, dataset, tmp_path / key, model={"compile": True, key: value})
        with pytest.raises(ConfigError, match=f"model.{key}"):
            run_train(cfg)
        assert not (tmp_path / key).exists()


def test_text_encoder_gets_its_own_learning_rate(tiny_model_dir, dataset, tmp_path):
    from lorakit.formats import read_adapter
    from lorakit.methods import AdapterMethod
    from lorakit.models import load_base_model

    cfg = make_config(tiny_model_dir, dataset, tmp_path / "te", training={"max_epochs": 1},
                      network={"train_text_encoder": True}, optimizer={"text_encoder_lr": 5e-5, "unet_lr": 2e-4})
    groups = {g["name"]: g["lr"] for g in AdapterMethod(cfg, load_base_model(tiny_model_dir)).param_groups()}
    assert groups == {"unet": 2e-4, "text_encoder": 5e-5}
    run_train(cfg)
    keys = read_adapter(tmp_path / "te" / "lorakit.safetensors").tensors.keys()
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)


def test_sampling_during_training_bakes_the_adapters_in_and_restores_the_weights_exactly(tiny_model_dir, dataset,
                                                                                        tmp_path):
    import numpy as np

    from lorakit.methods import AdapterMethod
    from lorakit.models import load_base_model
    from lorakit.sample import SamplePrompt, generate

    model = load_base_model(tiny_model_dir)
    method = AdapterMethod(make_config(tiny_model_dir, dataset, tmp_path / "run", network={"conv_rank": 4}), model)
    torch.manual_seed(0)
    with torch.no_grad():
        for adapter in method.network.adapters.values():
            adapter.lora_up.weight.normal_(std=0.5)  # a large update (a fresh one is zero)
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    prompts = [SamplePrompt("a red circle", steps=4), SamplePrompt("a blue square on a gray background", steps=4)]
    unmerged = generate(model, prompts, progress=False)
    with method.sampling():
        assert method.network.merged
        merged = generate(model, prompts, progress=False)
    assert not method.network.merged
    assert all(torch.equal(weights[k], v) for k, v in model.unet.state_dict().items())
    for a, b in zip(unmerged, merged, strict=True):  # the same images, up to float rounding
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    method.network.set_multiplier(0.0)
    base = generate(model, prompts, progress=False)
    pixel_change = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
                    for a, b in zip(base, merged, strict=True)]
    assert max(pixel_change) > 8  # the update shows: the test above compares images that differ


def test_native_fine_tuning_writes_a_checkpoint_that_loads(tiny_model_dir, dataset, tmp_path):
    from lorakit.models import load_base_model

    out = tmp_path / "native"
    run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                          method={"kind": "native"}, optimizer={"learning_rate": 1e-4}))
    base = load_base_model(tiny_model_dir)
    tuned = load_base_model(out / "lorakit.safetensors")
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed, "native fine-tuning changed no U-Net weight"
    te_a, te_b = tuned.text_encoder.state_dict(), base.text_encoder.state_dict()
    assert all(torch.equal(te_a[k], te_b[k]) for k in te_b)


def test_native_fine_tuning_in_full_bf16_trains_and_keeps_its_state_in_bf16(tiny_model_dir, dataset, tmp_path):
    """kohya's --full_bf16: the weights native fine-tuning trains (the text encoder's too), and the optimizer's
    state, in bf16; a resumed run goes on from them; refused without bf16 mixed precision or with an adapter."""
    from safetensors.torch import load_file

    from lorakit.checkpoint_names import TEXT_ENCODER_PREFIXES
    from lorakit.config import ConfigError
    from lorakit.models import load_base_model

    def config(**model):
        return make_config(tiny_model_dir, dataset, tmp_path / "run", training={"max_epochs": 1},
                           method={"kind": "native", "native_text_encoder": True}, optimizer={"learning_rate": 1e-4},
                           model={"mixed_precision": "bf16", "full_bf16": True, **model})

    result = run_train(config())
    assert torch.isfinite(torch.tensor(result.losses)).all()
    saved = tmp_path / "run" / "checkpoints" / "epoch-0001"
    trained = load_file(str(saved / "trained.safetensors"))
    assert {t.dtype for t in trained.values()} == {torch.bfloat16}
    assert any(k.startswith(TEXT_ENCODER_PREFIXES) for k in trained)  # the text encoder's weights too
    state = torch.load(saved / "state.pt", weights_only=True)["optimizer"]["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k.startswith("exp_avg")} == {torch.bfloat16}
    base, tuned = load_base_model(tiny_model_dir), load_base_model(tmp_path / "run" / "lorakit.safetensors")
    for net in ("unet", "text_encoder"):
        ours, theirs = getattr(tuned, net).state_dict(), getattr(base, net).state_dict()
        assert any(not torch.equal(ours[k], theirs[k]) for k in theirs), f"the {net} did not change"
    resumed = config()
    resumed.training.max_epochs, resumed.output.if_exists = 2, "resume"
    assert len(run_train(resumed).losses) == 2 * len(result.losses)
    with pytest.raises(ConfigError, match="model.full_bf16 trains the weights in bf16, which needs"):
        config(mixed_precision="no").validate()
    adapter = config()
    adapter.method.kind = "adapter"
    with pytest.raises(ConfigError, match="model.full_bf16 is for native fine-tuning"):
        adapter.validate()


def test_native_fine_tuning_of_the_text_encoder_too_saves_resumes_and_evaluates_both(tiny_model_dir, dataset,
                                                                                     tmp_path, monkeypatch):
    """method.native_text_encoder (kohya's train_db.py, diffusers' --train_text_encoder): both networks train, at
    their own learning rates; the result holds both; an interrupted run resumes to the straight run's weights;
    eval applies an epoch checkpoint's text encoder too."""
    from lorakit.evaluate.checkpoints import EvalCheckpoint
    from lorakit.evaluate.generate import applied
    from lorakit.methods import NativeMethod
    from lorakit.models import load_base_model

    def config(out, **extra):
        return make_config(tiny_model_dir, dataset, out, training={"max_epochs": 2}, output=extra,
                           method={"kind": "native", "native_text_encoder": True},
                           optimizer={"learning_rate": 1e-4, "text_encoder_lr": 3e-4})

    straight = run_train(config(tmp_path / "straight"))
    base = load_base_model(tiny_model_dir)
    tuned = load_base_model(tmp_path / "straight" / "lorakit.safetensors")
    for net in ("unet", "text_encoder"):
        ours, theirs = getattr(tuned, net).state_dict(), getattr(base, net).state_dict()
        assert any(not torch.equal(ours[k], theirs[k]) for k in theirs), f"the {net} did not change"
    groups = NativeMethod(config(tmp_path / "unused"), load_base_model(tiny_model_dir)).param_groups()
    assert {g["name"]: g["lr"] for g in groups} == {"unet": 1e-4, "text_encoder": 3e-4}
    # with a clip skip of 2 the last layer is never read, so it is not trained (no gradient would reach it)
    skipping = config(tmp_path / "unused")
    skipping.model.clip_skip = 2
    method = NativeMethod(skipping, load_base_model(tiny_model_dir))
    last = base.text_encoder.config.num_hidden_layers - 1
    assert method.text_params and not any(f"layers.{last}." in n for n in method.text_params)
    assert len(method.text_params) < len(NativeMethod(config(tmp_path / "unused"),
                                                      load_base_model(tiny_model_dir)).text_params)

    original = die_after_saving(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run_train(config(tmp_path / "interrupted"))
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    resumed = run_train(config(tmp_path / "interrupted", if_exists="resume"))
    assert resumed.losses == straight.losses
    again = load_base_model(tmp_path / "interrupted" / "lorakit.safetensors")
    assert all(torch.equal(v, tuned.text_encoder.state_dict()[k]) for k, v in again.text_encoder.state_dict().items())

    epoch = next((tmp_path / "straight" / "checkpoints").glob("epoch-0002/*.safetensors"))
    name, param = next(iter(base.text_encoder.named_parameters()))
    before = param.detach().clone()
    with applied(base, EvalCheckpoint(label="epoch 2", kind="native", path=epoch, hash="h")):
        assert torch.equal(param.detach(), tuned.text_encoder.state_dict()[name].to(param.dtype))
    assert torch.equal(param.detach(), before)


def test_the_text_encoder_trains_for_its_first_steps_only_and_a_resume_keeps_the_limit(tiny_model_dir, dataset,
                                                                                        tmp_path, monkeypatch):
    """method.native_text_encoder_steps (kohya's stop_text_encoder_training): after 1 step of 4 the text encoder
    stays what that step made it (a 1-step run's), while the U-Net trains on; a run interrupted after the stop
    resumes to the straight run's weights."""
    from lorakit.models import load_base_model

    def config(out, **training):
        return make_config(tiny_model_dir, dataset, out, training={"max_epochs": 2, **training},
                           output={"if_exists": "resume"} if out.exists() else {},
                           method={"kind": "native", "native_text_encoder": True, "native_text_encoder_steps": 1},
                           optimizer={"learning_rate": 1e-4, "text_encoder_lr": 3e-4})

    straight = run_train(config(tmp_path / "limited"))
    one_step = run_train(config(tmp_path / "one step", max_steps=1))
    assert len(straight.losses) == 4 and one_step.losses == straight.losses[:1]
    limited, after_one = (load_base_model(tmp_path / name / "lorakit.safetensors") for name in ("limited", "one step"))
    assert all(torch.equal(v, after_one.text_encoder.state_dict()[k])
               for k, v in limited.text_encoder.state_dict().items())
    assert not all(torch.equal(v, after_one.unet.state_dict()[k]) for k, v in limited.unet.state_dict().items())

    original = die_after_saving(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run_train(config(tmp_path / "interrupted"))
    monkeypatch.setattr(RunFolder, "save_checkpoint", original)
    assert run_train(config(tmp_path / "interrupted")).losses == straight.losses
    a, b = (load_file(str(tmp_path / name / "lorakit.safetensors")) for name in ("limited", "interrupted"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_any_epoch_of_a_native_run_becomes_a_model_with_merge(tiny_model_dir, dataset, tmp_path, capsys):
    """A native run's epoch checkpoint is lorakit's own file (trained parameters, not a model): `lorakit merge` bakes
    it into the base model, with a multiplier the share of the way from the base weights; commands that take
    adapters say so."""
    from lorakit.cli import main
    from lorakit.models import load_base_model

    run = tmp_path / "native"
    run_train(make_config(tiny_model_dir, dataset, run, training={"max_epochs": 1}, optimizer={"learning_rate": 1e-3},
                          method={"kind": "native", "native_text_encoder": True}))
    epoch = run / "checkpoints" / "epoch-0001" / "trained.safetensors"
    for spec, out in ((str(epoch), "whole"), (f"{epoch}:0.5", "half")):
        assert main(["merge", spec, "--model", str(tiny_model_dir), "--out", str(tmp_path / f"{out}.safetensors")]) == 0
    said = capsys.readouterr().out
    assert "native fine-tuning checkpoint" in said and "text-encoder weights put in (×0.5)" in said
    base, result, whole, half = (load_base_model(p) for p in (tiny_model_dir, run / "lorakit.safetensors",
                                                              tmp_path / "whole.safetensors",
                                                              tmp_path / "half.safetensors"))
    for net in ("unet", "text_encoder"):
        b, r, w, h = (getattr(m, net).state_dict() for m in (base, result, whole, half))
        assert all(torch.equal(w[k], r[k]) for k in r), f"merging epoch 1 is not the run's {net}"
        assert any(not torch.equal(r[k], b[k]) for k in b)
        assert all(torch.allclose(h[k], (b[k] + r[k]) / 2, atol=1e-6) for k in b if b[k].is_floating_point())
    assert main(["sample", str(epoch), "--model", str(tiny_model_dir), "--prompt", "zkz", "--out",
                 str(tmp_path / "s")]) != 0
    assert f"lorakit merge {epoch} --out" in capsys.readouterr().err
    assert main(["merge", str(epoch), "--to-adapter", "--out", str(tmp_path / "a.safetensors")]) != 0
    assert "lorakit extract" in capsys.readouterr().err


def test_textual_inversion_trains_only_the_new_rows(tiny_model_dir, dataset, tmp_path):
    from lorakit.methods import TextualInversion
    from lorakit.models import load_base_model

    out = tmp_path / "ti"
    cfg = make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                      method={"kind": "ti", "ti_token": "zkz", "ti_vectors": 2})
    model = load_base_model(tiny_model_dir)
    method = TextualInversion(cfg, model)
    assert method.expand_prompt("a zkz shape, zkzz") == "a zkz zkz_1 shape, zkzz"
    before = model.text_encoder.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        method.embeddings[0].add_(1.0)  # as if the optimizer (with weight decay) had touched every row
    method.after_optimizer_step()
    after = model.text_encoder.get_input_embeddings().weight
    frozen = torch.ones(after.shape[0], dtype=torch.bool)
    frozen[method.ids] = False
    assert torch.equal(after[frozen], before[frozen]) and not torch.equal(after[~frozen], before[~frozen])

    run_train(cfg)
    emb = load_file(str(out / "lorakit-zkz.safetensors"))
    assert list(emb) == ["clip_l"] and emb["clip_l"].shape == (2, model.text_encoder.config.hidden_size)


def test_textual_inversion_continues_an_embedding_file(tiny_model_dir, dataset, tmp_path, capsys):
    """method.ti_weights (kohya's --weights): the token starts from the file's vectors, not the init word's; a
    file with another number of vectors, or none at all, is refused before the model loads."""
    from lorakit.cli import main
    from lorakit.config import ConfigError
    from lorakit.methods import TextualInversion
    from lorakit.models import load_base_model

    first = make_config(tiny_model_dir, dataset, tmp_path / "first", training={"max_epochs": 1},
                        method={"kind": "ti", "ti_token": "zkz", "ti_vectors": 2})
    run_train(first)
    trained = load_file(str(tmp_path / "first" / "lorakit-zkz.safetensors"))["clip_l"]
    cfg = make_config(tiny_model_dir, dataset, tmp_path / "again", training={"max_epochs": 1},
                      method={"kind": "ti", "ti_token": "zkz", "ti_vectors": 2,
                              "ti_weights": str(tmp_path / "first" / "lorakit-zkz.safetensors")})
    method = TextualInversion(cfg, load_base_model(tiny_model_dir), trained)
    assert torch.equal(method.vectors()[0], trained) and "from " in method.summary()
    run_train(cfg)  # and it trains on from there
    again = load_file(str(tmp_path / "again" / "lorakit-zkz.safetensors"))["clip_l"]
    assert not torch.equal(again, trained)
    cfg.method.ti_vectors, cfg.output.dir = 3, str(tmp_path / "three")
    with pytest.raises(ConfigError, match="holds 2 vector.*ti_vectors is 3: set --set method.ti_vectors=2"):
        run_train(cfg)
    assert not (tmp_path / "three").exists()
    flags = ["train", "--data", str(dataset), "--model", str(tiny_model_dir), "--method", "ti", "--no-progress"]
    assert main([*flags, "--set", "method.ti_weights=missing.safetensors", "--out", str(tmp_path / "m")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main([*flags, "--method", "adapter", "--set", f"method.ti_weights={tmp_path}", "--out",
                 str(tmp_path / "a")]) == 2
    assert "method.ti_weights starts a textual-inversion embedding" in capsys.readouterr().err


def test_pivotal_tuning_writes_embedding_and_adapter(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "pivotal"
    cfg = make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                      method={"kind": "pivotal", "ti_token": "zkz"}, optimizer={"ti_lr": 1e-2, "unet_lr": 1e-4})
    result = run_train(cfg)
    names = sorted(p.name for p in result.files)
    assert "lorakit.safetensors" in names and "lorakit-zkz.safetensors" in names
    # both parts trained: the token moved away from its init word, the adapter away from ΔW = 0
    from lorakit.models import load_base_model

    model = load_base_model(tiny_model_dir)
    init_id = model.tokenizer(cfg.method.ti_init_word, add_special_tokens=False).input_ids[0]
    start = model.text_encoder.get_input_embeddings().weight[init_id].detach()
    vector = load_file(str(out / "lorakit-zkz.safetensors"))["clip_l"][0]
    assert float((vector - start).abs().max()) > 1e-4
    ups = [v for k, v in load_file(str(out / "lorakit.safetensors")).items() if k.endswith("lora_up.weight")]
    assert ups and all(float(u.abs().max()) > 0 for u in ups)
    # each file says what it is to the tools that list models (ModelSpec): an adapter and an embedding
    from safetensors import safe_open

    adapter, embedding = (safe_open(str(out / n), "pt").metadata() for n in ("lorakit.safetensors",
                                                                              "lorakit-zkz.safetensors"))
    assert adapter["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert adapter["modelspec.trigger_phrase"] == "zkz"  # the training folder's trigger
    assert embedding["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert embedding["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert embedding["modelspec.trigger_phrase"] == "zkz" and embedding["modelspec.title"] == "lorakit"



def test_a_pivotal_result_is_sampled_and_judged_with_the_embedding_beside_it(tiny_model_dir, dataset, tmp_path,
                                                                             capsys):
    """The adapter of a pivotal run names its token, so `lorakit sample` and `lorakit eval` given the adapter
    alone read the prompt's token with the embedding beside it, as training did."""
    import numpy as np
    from PIL import Image

    from lorakit.cli import main
    from lorakit.evaluate.checkpoints import CheckpointError, read_file_checkpoint
    from lorakit.evaluate.generate import applied
    from lorakit.file_kinds import pivotal_embedding
    from lorakit.models import load_base_model

    out = tmp_path / "pivotal"
    run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                          method={"kind": "pivotal", "ti_token": "zkz"}, optimizer={"ti_lr": 1e-2}))
    adapter, embedding = out / "lorakit.safetensors", out / "lorakit-zkz.safetensors"
    assert pivotal_embedding(adapter) == (True, embedding) and pivotal_embedding(embedding) == (False, None)
    sample = ["sample", str(adapter), "--model", str(tiny_model_dir), "--prompt", "a zkz shape --s 2 --d 1",
              "--device", "cpu"]
    assert main([*sample, "--out", str(tmp_path / "with")]) == 0
    assert f"pivotal tuning, with its embedding {embedding}" in capsys.readouterr().out
    checkpoint = read_file_checkpoint(adapter)
    assert (checkpoint.kind, checkpoint.token, checkpoint.embedding) == ("pivotal", "zkz", embedding)
    model = load_base_model(tiny_model_dir)
    with applied(model, checkpoint) as written:
        assert "zkz" in model.tokenizer.get_vocab() and any("lora" in n for n, _ in model.unet.named_modules())
        assert written("a zkz shape") == "a zkz shape"
    assert main(["inspect", str(adapter)]) == 0
    assert f"trained with: an embedding (pivotal tuning): {embedding}, beside it" in capsys.readouterr().out
    # merged into the model, the adapter leaves its token to the embedding: said, since no model file holds it
    assert main(["merge", str(adapter), "--model", str(tiny_model_dir), "--out", str(tmp_path / "merged")]) == 0
    assert (f"note: {adapter} was trained by pivotal tuning: its token is learnt in its embedding {embedding}, "
            "which the result does not hold") in capsys.readouterr().out
    embedding.rename(tmp_path / "elsewhere.safetensors")  # the embedding moved away: said, not silently left out
    assert main([*sample, "--out", str(tmp_path / "without")]) == 0
    assert "its token is plain text; pass --embedding FILE" in capsys.readouterr().out
    assert main(["inspect", str(adapter)]) == 0
    assert "trained with: an embedding (pivotal tuning): not beside it" in capsys.readouterr().out
    with_it, without = (np.asarray(Image.open(tmp_path / d / "000-a-zkz-shape.png"), dtype=np.int16)
                        for d in ("with", "without"))
    assert np.abs(with_it - without).max() > 0
    with pytest.raises(CheckpointError, match="lorakit.safetensors: a pivotal-tuning adapter, trained with an "
                                              r"embedding that is not beside it .*give its embedding file too"):
        read_file_checkpoint(adapter)
    # a renamed pair given together is one checkpoint: the embedding (called zkz by its metadata) is the adapter's
    from lorakit.evaluate.checkpoints import checkpoint_hash, discover

    moved = tmp_path / "elsewhere.safetensors"
    checkpoints, _ = discover([adapter, moved])
    assert [(c.kind, c.token, c.embedding) for c in checkpoints] == [("base", None, None), ("pivotal", "zkz", moved)]
    assert checkpoints[1].hash == checkpoint_hash(adapter, "zkz", moved)  # the cache key holds the pair


def test_prior_preservation_generates_class_images(tiny_model_dir, dataset, tmp_path, monkeypatch):
    import lorakit.train as train_module

    seen: list[tuple[Path, bool]] = []
    real = train_module.compute_loss

    def recording(cfg, model, method, batch, *args, **kwargs):
        seen.extend(zip(batch.image_paths, batch.is_reg.tolist(), strict=True))
        return real(cfg, model, method, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", recording)
    out = tmp_path / "db"
    run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 1},
                          data={"num_class_images": 3, "class_prompt": "a shape", "batch_size": 2},
                          sample={"steps": 2}))
    images = sorted((out / "class_images" / "1_a shape").glob("*.png"))
    assert len(images) == 3
    assert (out / "class_images" / "1_a shape" / "0000.txt").read_text().strip() == "a shape"
    # the class images are trained on, as regularization samples: 4 training images, balanced by 4 reg samples
    reg = [path for path, is_reg in seen if is_reg]
    assert len(reg) == 4 and {p.name for p in reg} <= {p.name for p in images} and len(set(reg)) == 3
    assert all(p.parent.parent == out / "class_images" for p in reg)
    assert sum(not is_reg for _, is_reg in seen) == 4


def test_class_images_a_user_kept_are_neither_redrawn_nor_overwritten(tiny_model_dir, tmp_path):
    """A DreamBooth user deletes the bad class images (0000, 0001 of 0000-0003) and runs again: the missing two
    were drawn as 0002 and 0003, over the two kept ones, leaving two images where four were asked for."""
    from PIL import Image

    from lorakit.models import load_base_model
    from lorakit.prior import ensure_class_images, missing_class_images

    folder = tmp_path / "reg" / "1_a shape"
    folder.mkdir(parents=True)
    for name in ("0002", "0003"):
        Image.new("RGB", (64, 64), (250, 0, 0)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("my caption\n")
    (folder / "._0002.png").write_bytes(bytes(50))  # macOS's: no image, not counted
    assert missing_class_images(tmp_path / "reg", "a shape", 4) == [0, 1]
    assert missing_class_images(tmp_path / "reg", "a shape", 2) == []
    assert missing_class_images(tmp_path / "none", "a shape", 2) == [0, 1]
    ensure_class_images(load_base_model(tiny_model_dir), tmp_path / "reg", "a shape", 4, steps=2)
    assert sorted(p.name for p in folder.glob("[!.]*.png")) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    for name in ("0002", "0003"):  # the user's, untouched
        assert Image.open(folder / f"{name}.png").getpixel((0, 0)) == (250, 0, 0)
        assert (folder / f"{name}.txt").read_text() == "my caption\n"
    assert (folder / "0000.txt").read_text() == "a shape\n"


def test_single_file_checkpoint_trains_like_the_folder(tiny_model_dir, dataset, tmp_path):
    from lorakit.models import load_base_model, save_single_file_checkpoint

    single = tmp_path / "model.safetensors"
    save_single_file_checkpoint(load_base_model(tiny_model_dir), single)
    # SGD: Adam's first steps are sign-like and would turn float rounding into visible differences
    a = run_train(make_config(tiny_model_dir, dataset, tmp_path / "a", training={"max_epochs": 2},
                              optimizer={"optimizer": "sgd", "learning_rate": 0.5}))
    b = run_train(make_config(single, dataset, tmp_path / "b", training={"max_epochs": 2},
                              optimizer={"optimizer": "sgd", "learning_rate": 0.5}))
    assert len(a.losses) == 4 and a.losses[0] != a.losses[3]
    assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------ early stopping
def test_early_stop_hands_back_the_turning_point_checkpoint(tiny_model_dir, dataset, tmp_path, monkeypatch):
    """The monitor decides (tested on its own in test_earlystop_*); the trainer must obey it exactly."""
    import lorakit.train as train_module
    from lorakit.earlystop import Decision, TurningPoint

    class StopAtStep5(train_module.CSFluctuationMonitor):
        """The real monitor, told to decide "turning point at step 2" when it sees step 5."""

        def update(self, step, cs, epoch=None, update=None, spectral=None):
            super().update(step, cs, epoch, update=update, spectral=spectral)
            if step == 5:
                self.turning_point = TurningPoint(step=2, epoch=1, index=1, valley_index=1, found_at_step=5,
                                                  found_at_index=4, csf=0.0, reason="test")
                return Decision(True, "stop", self.turning_point)
            return Decision(False, "go on")

    monkeypatch.setattr(train_module, "CSFluctuationMonitor", StopAtStep5)
    out = tmp_path / "run"
    result = run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 5},
                                   early_stop={"mode": "cs-fluctuation"}))
    assert result.stopped_early and result.steps == 5 and result.final_epoch == 1
    final = load_file(str(out / "lorakit.safetensors"))
    epoch1 = RunFolder(out, "resume").checkpoint(1).load_tensors()
    assert final.keys() == epoch1.keys() and all(torch.equal(final[k], epoch1[k]) for k in final)
    from safetensors import safe_open

    with safe_open(str(out / "lorakit.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lorakit_turning_point_step"] == "2" and meta["lorakit_turning_point_epoch"] == "1"
    assert meta["lorakit_checkpoint_epoch"] == "1"
    assert meta["ss_v_parameterization"] == meta["ss_zero_terminal_snr"] == "False"  # an epsilon model
    assert "turning point at step 2" in result.summary
    assert (out / "cs_fluctuation.png").exists() and (out / "cs_history.json").exists()


def test_the_budget_rule_stops_where_the_update_reaches_its_size(tiny_model_dir, dataset, tmp_path):
    """Not patched: a report-mode run records the update's size every step; a budget set to the size of step 5
    stops the same run at step 5, with the turning point there (no lag) and the nearest epoch handed back."""
    watch = tmp_path / "watch"
    run_train(make_config(tiny_model_dir, dataset, watch, training={"max_epochs": 3},
                          early_stop={"mode": "report", "rule": "budget"}))
    records = [json.loads(line) for line in (watch / "log.jsonl").read_text().splitlines()]
    sizes = [r["update_size"] for r in records if "update_size" in r]
    assert len(sizes) == len(records) and sizes[0] > 0 and sizes[-1] > sizes[0]  # it grows with training
    history = json.loads((watch / "cs_history.json").read_text())
    assert history["update"] == pytest.approx(sizes)
    budget = sizes[4]  # reached at step 5 (sizes grow step by step here)
    assert all(s < budget for s in sizes[:4])
    out = tmp_path / "run"
    result = run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 3},
                                   early_stop={"mode": "cs-fluctuation", "rule": "budget",
                                               "rule_args": {"budget": budget}}))
    assert result.stopped_early and result.steps == 5
    tp = json.loads((out / "cs_history.json").read_text())["turning_point"]
    assert tp["step"] == tp["found_at_step"] == 5 and "budget" in tp["reason"]


@pytest.mark.parametrize("algorithm", ["lora", "loha"])
def test_the_spectral_budget_reads_at_epoch_ends_and_stops_there(tiny_model_dir, dataset, tmp_path, algorithm):
    """``early_stop.rule = "spectral-budget"``: σ1(ΔW)/σ1(W) is read at each epoch's last step only (2 steps per
    epoch here), recorded, and equal to what the epoch's checkpoint says; a budget between the first and the
    second epoch's size stops the run at the end of epoch 2 and hands epoch 2 back."""
    from lorakit.world.update_sizes import checkpoint_spectral_sizes

    watch = tmp_path / "watch"
    sections = {"training": {"max_epochs": 3}, "network": {"algorithm": algorithm}}
    run_train(make_config(tiny_model_dir, dataset, watch, **sections,
                          early_stop={"mode": "report", "rule": "spectral-budget"}))
    records = [json.loads(line) for line in (watch / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "spectral_size" in r] == [2, 4, 6]
    sizes = [r["spectral_size"] for r in records if "spectral_size" in r]
    assert 0 < sizes[0] < sizes[1] < sizes[2]
    history = json.loads((watch / "cs_history.json").read_text())
    assert [v for v in history["spectral"] if v is not None] == pytest.approx(sizes)
    assert list(checkpoint_spectral_sizes(watch).values()) == pytest.approx(sizes, rel=1e-6)
    # the budget (0.25) is never reached here: the summary says how far the run got, so a user can judge it
    said = json.loads((watch / "summary.json").read_text())["undecided"]
    assert said.startswith(f"the update's spectral size σ1(ΔW)/σ1(W) was {sizes[-1]:.3g} at the end, "
                           f"{sizes[-1] / 0.25:.0%} of its budget 0.25")
    assert said in (watch / "summary.txt").read_text()

    out = tmp_path / "run"
    budget = (sizes[0] + sizes[1]) / 2
    result = run_train(make_config(tiny_model_dir, dataset, out, **sections,
                                   early_stop={"mode": "cs-fluctuation", "rule": "spectral-budget",
                                               "rule_args": {"budget": budget}}))
    assert result.stopped_early and result.steps == 4
    tp = json.loads((out / "cs_history.json").read_text())["turning_point"]
    assert tp["step"] == tp["found_at_step"] == 4 and "σ1(ΔW)/σ1(W)" in tp["reason"]
    assert result.final_epoch == 2


def test_the_growth_stall_stops_at_the_epoch_end_where_the_update_slows(tiny_model_dir, dataset, tmp_path):
    """``early_stop.rule = "growth-stall"``, not patched: a report-mode run records the update's size every step;
    a growth threshold between two epochs' growth rates stops the same run at the end of the first epoch whose
    rate is below it, and hands that epoch back.  A run that never stalls says how fast it still grew."""
    watch = tmp_path / "watch"
    never = {"growth": 1e-9, "span": 1, "cap": 1e9}
    run_train(make_config(tiny_model_dir, dataset, watch, training={"max_epochs": 4},
                          early_stop={"mode": "report", "rule": "growth-stall", "rule_args": never}))
    history = json.loads((watch / "cs_history.json").read_text())
    assert history["window"] == 2  # two steps per epoch: the window ends are the epoch ends
    ends = history["update"][1::2]
    rates = [ends[e] / ends[e - 1] - 1 for e in range(1, 4)]  # epochs 2, 3, 4 against the one before
    said = json.loads((watch / "summary.json").read_text())["undecided"]
    assert said.startswith(f"the update's size ‖ΔW‖/‖W‖ was still growing by {rates[-1]:.1%} per window")
    # a threshold between the two fastest epochs' rates: the first epoch growing slower than it is where it stops
    growth = sum(sorted(rates)[-2:]) / 2
    stall = 2 + next(i for i, rate in enumerate(rates) if rate < growth)
    assert stall < 4  # the update decelerates here (61%, 33%, 22% per epoch): the stop comes before the last epoch
    out = tmp_path / "run"
    result = run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 4},
                                   early_stop={"mode": "cs-fluctuation", "rule": "growth-stall",
                                               "rule_args": {"growth": growth, "span": 1, "cap": 1e9}}))
    assert result.stopped_early and result.steps == 2 * stall and result.final_epoch == stall
    tp = json.loads((out / "cs_history.json").read_text())["turning_point"]
    assert tp["step"] == tp["found_at_step"] == 2 * stall and "per window over the last 1" in tp["reason"]


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_train_runs_a_config_and_flags(tiny_model_dir, dataset, tmp_path, capsys):
    from lorakit.cli import main

    config = tmp_path / "job.toml"
    config.write_text(f'[model]\nbase = "{tiny_model_dir}"\n[data]\ntrain_data = "{dataset}"\nbatch_size = 2\n'
                      '[training]\nmax_epochs = 1\n[early_stop]\nmode = "off"\n')
    out = tmp_path / "cli-run"
    assert main(["train", str(config), "--rank", "2", "--out", str(out), "--no-progress",
                 "--set", "network.preset=attn-only"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "lorakit.safetensors").exists()
    assert 'preset = "attn-only"' in (out / "config.toml").read_text()
    assert main(["train", str(config), "--set", "network.rnak=4"]) == 2
    assert "did you mean 'rank'" in capsys.readouterr().err
    # a setting in the wrong section was answered with a near name of that section ("did you mean 'huber_schedule'?")
    assert main(["train", str(config), "--set", "training.lr_scheduler=cosine"]) == 2
    assert ("--set [training]: 'lr_scheduler' is a setting of [optimizer], not of [training]: --set "
            "optimizer.lr_scheduler=...") in capsys.readouterr().err
    config.write_text(config.read_text().replace("[training]\n", "[training]\nlr_scheduler = 'cosine'\n"))
    assert main(["train", str(config)]) == 2
    assert "job.toml [training]: 'lr_scheduler' is a setting of [optimizer]" in capsys.readouterr().err
    # above every [section] line, TOML reads a key as a section of its own ("unknown section [max_epochs]")
    config.write_text("max_epochs = 2\n" + config.read_text())
    assert main(["train", str(config)]) == 2
    assert ("job.toml: max_epochs = 2 stands outside any [section]; it is a setting of [training]: move it below a "
            "[training] line") in capsys.readouterr().err


def test_cli_builtin_default_job(tmp_path, capsys):
    """`lorakit train` with no data: the concept is rendered next to the output and trained on the built-in model."""
    from lorakit.cli import main

    out = tmp_path / "job"
    assert main(["train", "--out", str(out), "--print-config", "--lr", "0.001"]) == 0
    printed = capsys.readouterr().out
    assert 'preset = "full"' in printed and "learning_rate = 0.001" in printed  # the user's flag wins
    assert "every_n_epochs = 2" in printed
    # the README's `lorakit train --print-config > config.toml`: the file runs as the built-in job again; it names
    # no dataset that was never rendered, and says how to point it at your own images
    assert printed.startswith("# lorakit train's built-in job") and "train_data" not in printed.split("[data]")[1]
    config = tmp_path / "config.toml"
    config.write_text(printed)
    assert main(["train", str(config), "--out", str(tmp_path / "from-file"), "--max-steps", "2", "--no-progress"]) == 0
    assert (tmp_path / "from-file" / "lorakit.safetensors").exists()
    assert (tmp_path / "from-file-data" / "10_zkz shape").is_dir()  # the concept, rendered next to the output
    assert "2 steps in 1 epoch," in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "from-file" / "samples").glob("*.png"))  # the final samples
    # the built-in job's own shape (15 images × 10 repeats in batches of 4), checked without training a whole epoch
    # (the README's command trains it; tests/test_first_minutes.py runs it in a child process)
    assert main(["train", "--out", str(out), "--dry-run"]) == 0
    assert "38 steps per epoch" in capsys.readouterr().out


def test_early_stop_rule_is_configurable(tiny_model_dir, dataset, tmp_path, monkeypatch):
    import lorakit.train as train_module
    from lorakit.config import ConfigError
    from lorakit.earlystop import CalmRule, SpectralBudget

    seen = []

    class Recording(train_module.CSFluctuationMonitor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.rule)

    monkeypatch.setattr(train_module, "CSFluctuationMonitor", Recording)
    run_train(make_config(tiny_model_dir, dataset, tmp_path / "run", training={"max_epochs": 1},
                          early_stop={"mode": "report", "rule": "calm", "rule_args": {"threshold": 0.2}}))
    assert seen == [CalmRule(threshold=0.2)]
    # the default (docs/early_stopping.md says why)
    assert TrainConfig().early_stop.make_rule() == SpectralBudget(budget=0.25)
    for bad in ({"rule": "third-valley"}, {"rule": "second-valley", "rule_args": {"prominence": 2.0}},
                {"rule": "budget", "rule_args": {"budget": 0.0}},
                {"rule": "second-valley", "rule_args": {"patience": 1}}, {"rule_args": {"prominence": 0.1}}):
        with pytest.raises(ConfigError, match="early_stop.rule"):
            make_config(tiny_model_dir, dataset, tmp_path / "x", early_stop=bad).validate()


def test_checkpoints_to_keep_are_those_early_stopping_may_hand_back():
    from lorakit.train import checkpoints_to_keep

    saved = [1, 2, 3, 4, 5]  # 10 steps per epoch: epoch e ends at step 10 e
    assert checkpoints_to_keep(saved, 10, None) == {5}  # nothing handed back: the last (result, resume)
    assert checkpoints_to_keep(saved, 10, 26) == {2, 3, 4, 5}  # the last ending at or before 26, and later ones
    assert checkpoints_to_keep(saved, 10, 30) == {3, 4, 5}
    assert checkpoints_to_keep(saved, 10, 0) == set(saved)
    assert checkpoints_to_keep([], 10, 5) == set()
    # kohya's save_last_n_epochs: the last N, and still every checkpoint early stopping may hand back
    assert checkpoints_to_keep(saved, 10, None, last_n=2) == {4, 5}
    assert checkpoints_to_keep(saved, 10, 26, last_n=1) == {2, 3, 4, 5}
    assert checkpoints_to_keep(saved, 10, 46, last_n=3) == {3, 4, 5}
    assert checkpoints_to_keep([3], 10, None, last_n=2) == {3}


def test_save_last_n_epochs_keeps_the_last_checkpoints_and_resumes_from_them(tiny_model_dir, dataset, tmp_path):
    from lorakit.config import ConfigError
    from lorakit.run_manifest import RunManifest

    out = tmp_path / "run"
    result = run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 4, "save_last_n_epochs": 2}))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0003", "epoch-0004"]
    manifest = RunManifest(out)
    assert not any("epoch-0001" in p or "epoch-0002" in p for p in manifest.files | manifest.dirs)  # forgotten
    assert any("epoch-0003" in p for p in manifest.files)
    assert result.final_epoch == 4
    cfg = make_config(tiny_model_dir, dataset, out, training={"max_epochs": 6, "save_last_n_epochs": 3})
    cfg.output.if_exists = "resume"
    run_train(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0004", "epoch-0005", "epoch-0006"]
    with pytest.raises(ConfigError, match="training.save_last_n_epochs"):
        make_config(tiny_model_dir, dataset, out, training={"save_last_n_epochs": 0}).validate()


def test_step_checkpoints_are_saved_pruned_and_resumed_from_mid_epoch_and_at_epoch_ends(tiny_model_dir, dataset,
                                                                                       tmp_path, monkeypatch):
    """kohya's save_every_n_steps / save_last_n_steps: 2 steps per epoch, a step checkpoint every step; a run
    killed right after the one of step 4 (an epoch's end not saved as the epoch's) or of step 3 (mid-epoch)
    continues from it exactly."""
    training = {"max_epochs": 3, "save_every_n_epochs": 3, "save_every_n_steps": 1, "save_last_n_steps": 2}
    straight = run_train(make_config(tiny_model_dir, dataset, tmp_path / "straight", training=training))
    checkpoints = tmp_path / "straight" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch-0003", "step-00000003", "step-00000004", "step-00000005"]  # 1 and 2 pruned; 6 is epoch 3's end
    run = RunFolder(tmp_path / "straight", "resume")
    states = {c.step(): c.load_state() for c in run.step_checkpoints()}
    assert {s: (st["epoch"], st["batches_done"], st["step"]) for s, st in states.items()} == {
        3: (2, 1, 3), 4: (2, 0, 4), 5: (3, 1, 5)}  # (epoch ended or in progress, its batches done, step)
    assert run.latest_checkpoint().path.name == "epoch-0003"  # step 6: the epoch's checkpoint
    assert "step checkpoints (with their training state): step 3, 4, 5 in " in straight.summary

    original = RunFolder.save_checkpoint
    for killed_after in (4, 3):
        def save_then_die(self, epoch, *args, step=None, killed_after=killed_after, **kwargs):
            saved = original(self, epoch, *args, step=step, **kwargs)
            if step == killed_after:
                raise Interrupt(f"killed after step {step}")
            return saved

        out = tmp_path / f"killed-{killed_after}"
        monkeypatch.setattr(RunFolder, "save_checkpoint", save_then_die)
        with pytest.raises(Interrupt):
            run_train(make_config(tiny_model_dir, dataset, out, training=training))
        monkeypatch.setattr(RunFolder, "save_checkpoint", original)
        assert RunFolder(out, "resume").latest_checkpoint().path.name == f"step-{killed_after:08d}"
        resumed = run_train(make_config(tiny_model_dir, dataset, out, training=training,
                                        output={"if_exists": "resume"}))
        assert resumed.losses == straight.losses  # bit-identical on the CPU
        a = load_file(str(tmp_path / "straight" / "lorakit.safetensors"))
        b = load_file(str(out / "lorakit.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 7))


def test_the_latest_checkpoint_is_the_one_saved_after_the_most_steps(tmp_path):
    """An epoch checkpoint saved mid-epoch (max_steps) and a step checkpoint of the same epoch, resumed later:
    the steps decide, read from the epoch checkpoint's metadata or, without it, from its state."""
    run = RunFolder(tmp_path / "run", "error")
    tensors = {"w": torch.zeros(2)}
    run.save_checkpoint(1, tensors, {"step": 2, "epoch": 1})
    run.save_checkpoint(2, tensors, {"step": 3, "epoch": 2, "batches_done": 1}, metadata={"ss_steps": "3"})
    assert run.latest_checkpoint().path.name == "epoch-0002"
    later = run.save_checkpoint(2, tensors, {"step": 4, "epoch": 2}, step=4)
    assert later.step() == 4 and run.latest_checkpoint().path == later.path
    run.save_checkpoint(2, tensors, {"step": 5, "epoch": 2, "batches_done": 1})  # no metadata: its state says 5
    assert run.latest_checkpoint().path.name == "epoch-0002" and run.latest_checkpoint().step() == 5
    assert [c.epoch for c in run.checkpoints()] == [1, 2]  # evaluation's list: epochs only
    run.prune_step_checkpoints(5)
    assert run.step_checkpoints() == []


def test_step_checkpoint_settings_are_checked(tiny_model_dir, dataset, tmp_path):
    from lorakit.config import ConfigError

    with pytest.raises(ConfigError, match="training.save_every_n_steps must be a positive integer"):
        make_config(tiny_model_dir, dataset, tmp_path, training={"save_every_n_steps": 0}).validate()
    with pytest.raises(ConfigError, match="training.save_last_n_steps must be set together with "
                                          "training.save_every_n_steps"):
        make_config(tiny_model_dir, dataset, tmp_path, training={"save_last_n_steps": 100}).validate()


def test_sampling_every_0_epochs_says_how_to_draw_no_samples(tiny_model_dir, dataset, tmp_path):
    from lorakit.config import ConfigError

    with pytest.raises(ConfigError, match=r"sample.every_n_epochs must be a positive integer \(no samples: leave "
                                          r"sample.prompts out\), got 0"):
        make_config(tiny_model_dir, dataset, tmp_path, sample={"every_n_epochs": 0}).validate()


def test_a_native_run_prunes_up_to_the_earliest_step_it_may_still_hand_back():
    """Each source of that step in turn: the decided turning point; the sample stop's earliest candidate epoch (0
    before it trusts any); the weight rule's; nothing (the last checkpoint only) without a stop that hands back."""
    from lorakit.config import TrainConfig
    from lorakit.earlystop import CSFluctuationMonitor
    from lorakit.earlystop.monitor import Decision, TurningPoint
    from lorakit.earlystop.samples import SamplePlateau, SampleStop
    from lorakit.train import _earliest_handed_back_step

    cfg = TrainConfig()
    decided = Decision(True, "found", TurningPoint(step=70, epoch=7, index=69, valley_index=69, found_at_step=70,
                                                   found_at_index=69, csf=None, reason="test"))
    monitor = CSFluctuationMonitor(10, 1e-4)
    for k in range(5):
        monitor.update(k + 1, 0.1 * k, epoch=1)
    plateau = SampleStop(scorer=None, prompts=[], seeds=1, rule=SamplePlateau(0.8, 4))
    assert _earliest_handed_back_step(cfg, decided, plateau, monitor, 10) == 70
    assert _earliest_handed_back_step(cfg, None, plateau, monitor, 10) == 0  # no score yet: every epoch may be
    for epoch, score in enumerate([0.0, 0.2, 0.9, 1.0, 1.0, 1.0]):
        plateau.rule.update(epoch, score)
    assert plateau.rule.earliest_candidate() is not None
    assert _earliest_handed_back_step(cfg, None, plateau, monitor, 10) == 10 * plateau.rule.earliest_candidate()
    assert _earliest_handed_back_step(cfg, None, None, monitor, 10) == monitor.earliest_candidate_step()
    assert _earliest_handed_back_step(cfg, None, None, None, 10) is None
    cfg.early_stop.mode = "report"  # nothing is handed back but the last checkpoint
    assert _earliest_handed_back_step(cfg, None, plateau, monitor, 10) is None
    assert _earliest_handed_back_step(cfg, decided, None, monitor, 10) == 70


def test_native_runs_keep_only_the_last_checkpoint_without_early_stopping(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "native-pruned"
    run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 3},
                          method={"kind": "native"}, optimizer={"learning_rate": 1e-4}))
    assert [c.epoch for c in RunFolder(out, "resume").checkpoints()] == [3]


def test_a_run_starts_from_another_runs_adapter_file(tiny_model_dir, dataset, tmp_path):
    """--network-weights (kohya's --network_weights): a second run continues the first's adapter.  At a learning
    rate of 1e-12 it hands back the file it started from (a fresh LoRA has every up matrix at zero); a file that
    does not fit is refused before the first step, and leaves no run folder."""
    import shutil

    from lorakit.cli import main
    from lorakit.config import ConfigError
    from lorakit.formats import read_adapter

    first = tmp_path / "first"
    run_train(make_config(tiny_model_dir, dataset, first, training={"max_epochs": 1}))
    started = read_adapter(first / "lorakit.safetensors").tensors
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in started.items())
    second, start = tmp_path / "second", tmp_path / "downloaded.safetensors"
    shutil.copyfile(first / "lorakit.safetensors", start)
    cfg = make_config(tiny_model_dir, dataset, second, training={"max_epochs": 1}, network={"weights": str(start)},
                      optimizer={"learning_rate": 1e-12, "optimizer": "sgd"})
    result = run_train(cfg)
    got = read_adapter(second / "lorakit.safetensors").tensors
    assert got.keys() == started.keys()
    for key, value in started.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-9)
    assert f"network weights from {start}: " in result.summary
    # the file is gone (deleted after the download): a resumed run does not need it, its checkpoint has the weights
    start.unlink()
    cfg.training.max_epochs, cfg.output.if_exists = 2, "resume"
    assert run_train(cfg).epochs == 2
    with pytest.raises(ConfigError, match=rf"network.weights: {start}: no such file"):
        run_train(make_config(tiny_model_dir, dataset, tmp_path / "third", network={"weights": str(start)}))
    assert not (tmp_path / "third").exists()
    # the same from the command line, with a rank that does not fit: refused by name, nothing left behind
    refused = tmp_path / "refused"
    code = main(["train", "--data", str(dataset), "--model", str(tiny_model_dir), "--out", str(refused),
                 "--network-weights", str(first / "lorakit.safetensors"), "--rank", "4", "--no-progress"])
    assert code == 2 and not refused.exists()


def test_dim_from_weights_takes_each_modules_rank_from_the_file(tiny_model_dir, dataset, tmp_path, capsys):
    """--dim-from-weights (kohya's --dim_from_weights): a file whose modules have different ranks (as `resize`
    writes) starts a network of those ranks, alphas and layers, whatever --rank and --preset say; resumed after
    the file is gone, the run takes them from its own checkpoint.  Without it the file is refused, naming the
    option."""
    from safetensors.torch import save_file

    from lorakit.cli import main
    from lorakit.formats import read_adapter

    first = tmp_path / "first"
    run_train(make_config(tiny_model_dir, dataset, first, training={"max_epochs": 1},
                          network={"rank": 4, "alpha": 2.0, "preset": "full"}))  # LoCon: convs too
    tensors = dict(read_adapter(first / "lorakit.safetensors").tensors)
    modules = sorted({k.split(".")[0] for k in tensors})
    for name in modules[::2]:  # every other module cut to rank 1: a file of mixed ranks
        tensors[f"{name}.lora_down.weight"] = tensors[f"{name}.lora_down.weight"][:1].contiguous()
        tensors[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"][:, :1].contiguous()
    start = tmp_path / "mixed.safetensors"
    save_file(tensors, str(start))
    second = tmp_path / "second"
    flags = ["train", "--data", str(dataset), "--model", str(tiny_model_dir), "--network-weights", str(start),
             "--rank", "8", "--lr", "1e-12", "--set", "optimizer.optimizer=sgd", "--set", "early_stop.mode=off",
             "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "refused")]) == 2
    assert "--dim-from-weights to take the file's" in capsys.readouterr().err
    assert main([*flags, "--dim-from-weights", "--epochs", "1", "--out", str(second)]) == 0
    said = capsys.readouterr().out  # the layers are the file's, whatever --preset (here the default, attn-mlp)
    assert f"an adapter (algorithms, ranks and layers from {start})" in said
    assert "lora ranks 1–4 and layers from the file" in said
    got = read_adapter(second / "lorakit.safetensors").tensors
    assert got.keys() == tensors.keys()
    for key, value in tensors.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-9)
    start.unlink()
    assert main([*flags, "--dim-from-weights", "--epochs", "2", "--out", str(second), "--resume"]) == 0
    assert {k: v.shape for k, v in read_adapter(second / "lorakit.safetensors").tensors.items()} == \
        {k: v.shape for k, v in tensors.items()}


def test_dim_from_weights_needs_the_file_and_leaves_the_blocks_to_it(tmp_path):
    from lorakit.config import ConfigError

    cfg = TrainConfig()
    cfg.network.dim_from_weights = True
    with pytest.raises(ConfigError, match="network.dim_from_weights takes the ranks from network.weights"):
        cfg.validate()
    cfg.network.weights, cfg.network.blocks = str(tmp_path / "a.safetensors"), "upper"
    with pytest.raises(ConfigError, match="network.dim_from_weights and network.blocks/block_dims"):
        cfg.validate()


def test_diffusers_format_result_holds_the_trained_adapter(tiny_model_dir, dataset, tmp_path):
    from lorakit.formats import load_network, read_adapter
    from lorakit.models import load_base_model

    out = tmp_path / "run"
    run_train(make_config(tiny_model_dir, dataset, out, network={"preset": "full"},
                          output={"format": "diffusers"}, training={"max_epochs": 1}))
    result = read_adapter(out / "lorakit.safetensors")
    assert result.layout == "diffusers" and any(k.endswith("lora_A.weight") for k in result.tensors)
    # the same ΔW as the run's last checkpoint, which keeps kohya names for resume
    outputs = []
    for source in (out / "lorakit.safetensors", out / "checkpoints" / "epoch-0001" / "trained.safetensors"):
        model = load_base_model(tiny_model_dir)
        load_network(source, model.unet, model.text_encoder)
        torch.manual_seed(0)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        with torch.no_grad():
            hidden = model.text_encoder(torch.zeros(1, 8, dtype=torch.long))[0]
            outputs.append(model.unet(x, t, hidden).sample)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_diffusers_format_is_refused_before_training_for_what_it_cannot_hold(tiny_model_dir, dataset, tmp_path):
    from lorakit.config import ConfigError

    cfg = make_config(tiny_model_dir, dataset, tmp_path / "run", network={"algorithm": "loha"},
                      output={"format": "diffusers"})
    with pytest.raises(ConfigError, match="plain LoRA/LoCon only, not loha.*resize FILE --to lora"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()
    cfg = make_config(tiny_model_dir, dataset, tmp_path / "run", method={"kind": "ti", "ti_token": "zkz"},
                      output={"format": "diffusers"})
    with pytest.raises(ConfigError, match="method.kind = 'ti' writes an embedding"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_textual_inversion_takes_its_token_from_the_kohya_folder(tiny_model_dir, tmp_path, capsys):
    """`lorakit train --method ti --data DIR` on `1_zkz shape/`: the token is the folder's trigger, as for an
    adapter (it asked for --set method.ti_token=...); several triggers are refused, naming them; the printed
    config stays TOML."""
    import tomllib

    from lorakit.cli import main

    data = write_dataset(tmp_path / "data")
    flags = ["--data", str(data), "--model", str(tiny_model_dir), "--method", "ti", "--no-progress"]
    assert main(["train", *flags, "--out", str(tmp_path / "ti"), "--max-steps", "2"]) == 0
    assert "method.ti_token = 'zkz', the trigger of 1_zkz shape" in capsys.readouterr().err
    assert load_config(tmp_path / "ti" / "config.toml").method.ti_token == "zkz"
    assert main(["train", *flags, "--print-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["method"]["ti_token"] == "zkz"
    (data / "2_qwx cat").mkdir()
    assert main(["train", *flags, "--out", str(tmp_path / "two")]) == 2
    assert "name several: 'zkz' (1_zkz shape); 'qwx' (2_qwx cat)" in capsys.readouterr().err
    # the built-in job (no --data) learns its concept's trigger, as its folder would say
    assert main(["train", "--method", "pivotal", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["method"]["ti_token"] == "zkz" and "the trigger of the built-in concept" in err


def test_prior_preservation_takes_its_class_prompt_from_the_kohya_folder(tmp_path, capsys):
    """`--set data.num_class_images=N` on `1_zkz shape/`: the class images are generated from the folder's class
    (`shape`), as kohya names them; a folder without a class is refused before the model loads."""
    import tomllib

    from lorakit.cli import main

    data = write_dataset(tmp_path / "data")
    assert main(["train", "--data", str(data), "--set", "data.num_class_images=2", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert tomllib.loads(out)["data"]["class_prompt"] == "shape"
    assert "data.class_prompt = 'shape', the class of 1_zkz shape" in err
    (data / "1_zkz shape").rename(data / "1_zkz")
    assert main(["train", "--data", str(data), "--set", "data.num_class_images=2", "--out", str(tmp_path / "r")]) == 2
    assert "data.num_class_images > 0 needs data.class_prompt" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_training_comment_and_output_name_go_into_the_results_metadata(tiny_model_dir, dataset, tmp_path):
    """kohya's ss_training_comment and ss_output_name: what A1111's metadata view shows for a LoRA."""
    from lorakit.cli import main
    from lorakit.formats import read_adapter

    out = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--model", str(tiny_model_dir), "--out", str(out), "--max-steps",
                 "1", "--name", "mycat", "--training-comment", "my cat, 12 photos", "--no-progress"]) == 0
    meta = read_adapter(out / "mycat.safetensors").metadata
    assert (meta["ss_training_comment"], meta["ss_output_name"]) == ("my cat, 12 photos", "mycat")


def test_sample_at_first_draws_the_start_once_without_changing_the_training(tiny_model_dir, tmp_path):
    """kohya's sample_at_first: a grid before the first step, sorted first on the run page; not drawn again when
    the run is resumed, and the run trains what it trains without it."""
    import numpy as np
    from PIL import Image

    from lorakit.sample import SamplePrompt, generate, save_sample_grid

    data = write_dataset(tmp_path / "data", n=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\n")
    results = {}
    for first in (False, True):
        cfg = make_config(tiny_model_dir, data, tmp_path / f"first-{first}", training={"max_epochs": 1},
                          sample={"prompts": str(prompts), "at_first": first})
        results[first] = run_train(cfg)
    out = tmp_path / "first-True"
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "epoch-0000-before-training.png", "epoch-0001.png", "final.png"]
    assert results[True].losses == results[False].losses
    # the grid is the base model's own picture of the prompt
    from lorakit.models import load_base_model

    prompt = SamplePrompt("a zkz shape", width=64, height=64, seed=1, steps=2)
    expected = save_sample_grid(generate(load_base_model(tiny_model_dir), [prompt], progress=False), [prompt],
                                tmp_path / "base.png")
    with Image.open(out / "samples" / "epoch-0000-before-training.png") as grid, Image.open(expected) as base:
        assert np.array_equal(np.asarray(grid), np.asarray(base))
    resumed = make_config(tiny_model_dir, data, out, training={"max_epochs": 2},
                          sample={"prompts": str(prompts), "at_first": True}, output={"if_exists": "resume"})
    run_train(resumed)
    assert len(list((out / "samples").glob("epoch-0000*.png"))) == 1


def test_samples_every_n_steps_within_epochs_without_changing_the_training(tiny_model_dir, tmp_path):
    """kohya's sample_every_n_steps: grids mid-epoch, named to sort before their epoch's own; the run trains the
    same adapter as without them (sampling forks the random state)."""
    data = write_dataset(tmp_path / "data", n=8)  # 4 steps an epoch at batch size 2
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\n")
    results = {}
    for every in (None, 3):
        out = tmp_path / f"every-{every}"
        results[every] = run_train(make_config(tiny_model_dir, data, out, sample={"prompts": str(prompts),
                                                                                   "every_n_steps": every}))
    grids = sorted(p.name for p in (tmp_path / "every-3" / "samples").glob("*.png"))
    assert grids == ["epoch-0001-step-000003.png", "epoch-0001.png", "epoch-0002-step-000006.png", "epoch-0002.png",
                     "final.png"]
    assert results[3].losses == results[None].losses
    a, b = (load_file(str(tmp_path / f"every-{e}" / "lorakit.safetensors")) for e in (None, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_batch_size_sets_how_many_images_the_vae_encodes_at_once(tiny_model_dir, tmp_path, monkeypatch):
    """kohya's vae_batch_size: 4 images cached one at a time (4 encoder calls) or all together (1), the same
    training either way up to the VAE's batching."""
    from diffusers import AutoencoderKL

    data = write_dataset(tmp_path / "data", n=4)
    real = AutoencoderKL.encode
    runs = {}
    for size in (1, 8):
        batches = []

        def counting(self, x, *args, _batches=batches, **kwargs):
            _batches.append(x.shape[0])
            return real(self, x, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "encode", counting)
        runs[size] = run_train(make_config(tiny_model_dir, data, tmp_path / f"vae{size}",
                                           data={"vae_batch_size": size}, training={"max_epochs": 1}))
        assert batches == ([1, 1, 1, 1] if size == 1 else [4])
    assert runs[1].losses == pytest.approx(runs[8].losses, rel=1e-4)


def test_weighted_captions_weigh_the_words_of_training_captions(tiny_model_dir, tmp_path):
    """kohya's weighted_captions: ``(zkz shape:1.0)`` trains exactly as ``zkz shape`` does, ``(zkz shape:1.5)``
    trains otherwise; without the option the brackets are text, so the same caption trains otherwise again."""
    losses = {}
    for name, caption, weighted in [("plain", "zkz shape, a red star", False),
                                    ("weight 1", "(zkz shape:1.0), a red star", True),
                                    ("weight 1.5", "(zkz shape:1.5), a red star", True),
                                    ("as text", "(zkz shape:1.5), a red star", False)]:
        data = write_dataset(tmp_path / name / "data", n=2)
        for txt in data.rglob("*.txt"):
            txt.write_text(caption)
        losses[name] = run_train(make_config(tiny_model_dir, data, tmp_path / name / "run", training={
            "max_epochs": 1, "seed": 3}, data={"weighted_captions": weighted})).losses
    assert losses["weight 1"] == losses["plain"]
    assert losses["weight 1.5"] != pytest.approx(losses["plain"], rel=1e-6)
    assert losses["as text"] != pytest.approx(losses["weight 1.5"], rel=1e-6)
    assert losses["as text"] != pytest.approx(losses["plain"], rel=1e-6)


def test_lora_fa_keeps_the_down_matrices_as_they_start(tiny_model_dir, dataset, tmp_path):
    """LoRA-FA (network.args frozen_down, kohya's networks.lora_fa): only the up matrices train; the down ones
    of the result are those of step 1 (the up matrices start at zero, so no down matrix moves in step 1 either
    way), where an ordinary LoRA's have moved by step 3. The file is an ordinary LoRA's."""
    downs = {}
    for frozen in (False, True):
        out = tmp_path / f"fa-{frozen}"
        args = {"frozen_down": True} if frozen else {}
        run_train(make_config(tiny_model_dir, dataset, out, network={"args": args},
                              training={"max_steps": 3, "save_every_n_steps": 1}))
        first = RunFolder(out, "resume").step_checkpoints()[0].load_tensors()
        final = load_file(str(out / "lorakit.safetensors"))
        moved = [not torch.equal(first[k], final[k]) for k in final if k.endswith("lora_down.weight")]
        ups = [not torch.equal(first[k], final[k]) for k in final if k.endswith("lora_up.weight")]
        downs[frozen] = any(moved)
        assert all(ups) and {k.split(".", 1)[1] for k in final} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert downs == {False: True, True: False}


def test_the_lr_schedule_takes_kohyas_cycles_and_power(tiny_model_dir, dataset, tmp_path):
    """optimizer.lr_scheduler_num_cycles restarts cosine_with_restarts that many times; lr_scheduler_power bends
    the polynomial decay (kohya's lr_scheduler_num_cycles / lr_scheduler_power, passed to diffusers' schedules)."""
    def lrs(name: str, **optimizer) -> list[float]:
        out = tmp_path / name
        run_train(make_config(tiny_model_dir, dataset, out, training={"max_epochs": 4}, optimizer=optimizer))
        return [r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]

    restarts = lrs("restarts", lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    # each record holds the lr after its step: the first cycle falls over 3, the second starts at the top again
    assert len(restarts) == 8 and restarts[0] > restarts[1] > restarts[2] < restarts[3] == pytest.approx(1e-3)
    assert restarts[4:7] == pytest.approx(restarts[:3]) and restarts[7] == 0  # the run's end: 0
    linear, squared = lrs("linear", lr_scheduler="polynomial"), lrs("squared", lr_scheduler="polynomial",
                                                                     lr_scheduler_power=2.0)
    assert linear[3] == pytest.approx(1e-3 * 4 / 8, rel=1e-3) and squared[3] < linear[3]  # falls faster


def test_an_sd2_model_trains_natively_into_an_sd2_single_file_and_its_adapters_say_sd2(tiny_sd2_dir, dataset,
                                                                                       tmp_path):
    """A model with SD2.x's kind of text encoder (OpenCLIP's gelu) is an SD2.x model: native training writes its
    single file in SD2.x's layout (cond_stage_model.model.*, which A1111 and ComfyUI read as SD2), and an adapter
    trained on it names SD2 as kohya does (ss_v2, ss_base_model_version, the ModelSpec architecture)."""
    from lorakit.models import load_base_model, read_checkpoint

    native = run_train(make_config(tiny_sd2_dir, dataset, tmp_path / "native", method={"kind": "native"},
                                   training={"max_epochs": 1}))
    tensors, metadata = read_checkpoint(native.files[0])
    assert metadata["lorakit_architecture"] == "sd2"
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in tensors)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    trained = load_base_model(native.files[0], config=tiny_sd2_dir)
    base = load_base_model(tiny_sd2_dir)
    assert trained.version == "sd2"
    changed = [k for k, t in trained.unet.state_dict().items() if not torch.equal(t, base.unet.state_dict()[k])]
    assert changed  # the trained U-Net, not the base's

    adapter = run_train(make_config(tiny_sd2_dir, dataset, tmp_path / "lora", training={"max_epochs": 1}))
    _, meta = read_checkpoint(adapter.files[0])
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


def test_textual_inversion_on_an_sd2_model_writes_an_sd2_embedding(tiny_sd2_dir, dataset, tmp_path):
    """The embedding is sized for SD2.x's encoder, and says SD2 as kohya's do (its ModelSpec architecture too)."""
    from lorakit.embeddings import load_embedding
    from lorakit.models import load_base_model, read_checkpoint

    result = run_train(make_config(tiny_sd2_dir, dataset, tmp_path / "ti", training={"max_epochs": 1},
                                   method={"kind": "ti", "ti_token": "zkz"}, optimizer={"ti_lr": 1e-2}))
    _, meta = read_checkpoint(result.files[0])
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/textual-inversion"
    assert load_embedding(load_base_model(tiny_sd2_dir), result.files[0]).tokens == ["zkz"]


def test_a_text_encoder_of_neither_family_is_refused_naming_its_activation(tiny_model_dir, tmp_path):
    import shutil

    from lorakit.models import ModelLoadError, load_base_model

    folder = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_act": "relu"}))
    with pytest.raises(ModelLoadError, match=r"odd: a text encoder with hidden_act 'relu' is neither SD1\.x's"):
        load_base_model(folder)
