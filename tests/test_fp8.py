"""kohya's fp8_base (model.fp8_base / fp8_base_unet): the frozen base weights stored in fp8 and upcast where they
compute.  Every adapter, and the whole model, computes with fp8-stored weights exactly as with the same values in
bf16 (outputs and gradients, bit for bit); autograd keeps the fp8 weights, not upcast copies; a merge into fp8 is
refused; runs train and sample on SD1.x and SDXL."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_adapters import CONFIGS, build, config_id, randomize

from lorakit.errors import LorakitError
from lorakit.fp8 import FP8, Fp8Linear, frozen_bytes, store_frozen_in_fp8

LOW = torch.bfloat16


def rounded_through_fp8(adapter):
    """The adapter over a bf16 base whose weight holds exactly the values fp8 storage keeps."""
    twin = copy.deepcopy(adapter)
    twin.base.weight.data = twin.base.weight.data.to(FP8).to(LOW)
    return twin


def outputs_and_grads(adapter, x):
    y = adapter(x)
    y.float().square().sum().backward()
    return y, {n: p.grad for n, p in adapter.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("layer", ["linear", "conv3x3_s2"])
def test_adapter_on_an_fp8_base_computes_as_on_its_values_in_bf16(config, layer):
    algorithm, options = config
    adapter, x = build(algorithm, layer, **options)
    randomize(adapter)
    adapter.base.to(LOW)
    x = x.to(LOW)
    expected_y, expected_grads = outputs_and_grads(rounded_through_fp8(adapter), x)
    store_frozen_in_fp8(adapter)
    assert adapter.base.weight.dtype == FP8 and adapter.base_weight.dtype == LOW
    y, grads = outputs_and_grads(adapter, x)
    assert y.dtype == LOW
    assert torch.equal(y, expected_y)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name
    assert adapter.base.weight.grad is None and adapter.base.weight.dtype == FP8  # still stored narrow


def test_merge_into_fp8_is_refused_and_leaves_the_layer_as_it_was():
    adapter, x = build("lora", "linear")
    randomize(adapter)
    adapter.base.to(LOW)
    store_frozen_in_fp8(adapter)
    before = adapter(x.to(LOW))
    with pytest.raises(LorakitError, match="stored in torch.float8_e4m3fn"):
        adapter.merge()
    assert not adapter.merged and torch.equal(adapter(x.to(LOW)), before)


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "ia3", "oft"])
def test_a_network_on_an_fp8_unet_and_text_encoder_computes_as_on_its_values_in_bf16(algorithm):
    """The whole model: adapted layers through their adapters, the others through diffusers' hooks."""
    from model_helpers import build_tiny_text_encoder, build_tiny_unet, randomize, unet_inputs

    from lorakit.network import create_network

    unet, text_encoder = build_tiny_unet().to(LOW), build_tiny_text_encoder().to(LOW)
    unet.requires_grad_(False), text_encoder.requires_grad_(False)
    network = create_network(unet, text_encoder, preset="attn-mlp", algorithm=algorithm)
    randomize(network, scale=0.05)
    for p in network.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the trainer keeps what it trains in fp32
    reference = copy.deepcopy((unet, text_encoder, network))
    sizes = [store_frozen_in_fp8(unet), store_frozen_in_fp8(text_encoder)]
    for before, after in sizes:
        assert after < 0.7 * before  # most of a bf16 model's bytes are now one byte each
    for model, twin in zip((unet, text_encoder), reference[:2], strict=True):
        twin_parameters = dict(twin.named_parameters())
        stored = [name for name, p in model.named_parameters() if p.dtype == FP8]
        assert any(".base.weight" in name for name in stored)  # adapted layers
        assert model is text_encoder or any(".base." not in name for name in stored)  # the U-Net's plain layers
        assert not any("norm" in name for name in stored)  # norms keep their dtype
        for name in stored:
            twin_parameters[name].data = twin_parameters[name].data.to(FP8).to(LOW)
    assert text_encoder.get_input_embeddings().weight.dtype == LOW  # and embeddings
    assert frozen_bytes(unet) == sizes[0][1]

    def run(unet, text_encoder, network):
        latents, timesteps, _ = unet_inputs()
        ids = torch.tensor([[0, 5, 9, 1], [0, 7, 1, 1]])
        hidden = text_encoder(ids).last_hidden_state
        context = torch.nn.functional.pad(hidden, (0, 0, 0, 1))
        out = unet(latents.to(LOW), timesteps, context).sample
        out.float().square().mean().backward()
        return out, {n: p.grad for n, p in network.named_parameters() if p.requires_grad}

    y, grads = run(unet, text_encoder, network)
    expected_y, expected_grads = run(*reference)
    assert y.dtype == LOW and torch.equal(y, expected_y)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and torch.equal(grad, expected_grads[name]), name


def test_trained_layers_embeddings_and_norms_keep_their_dtype():
    from model_helpers import build_tiny_text_encoder

    text_encoder = build_tiny_text_encoder().to(LOW).requires_grad_(False)
    text_encoder.get_input_embeddings().weight.requires_grad_(True)  # textual inversion trains it
    trained = text_encoder.get_encoder().layers[0].mlp.fc1
    trained.weight.requires_grad_(True)  # as a native run's layer
    store_frozen_in_fp8(text_encoder)
    stored = {name for name, p in text_encoder.named_parameters() if p.dtype == FP8}
    assert stored and all(name.endswith(".weight") for name in stored)  # biases keep their dtype
    assert not any("embeddings." in name or "norm" in name for name in stored)
    assert type(trained) is torch.nn.Linear and trained.weight.dtype == LOW
    assert isinstance(text_encoder.get_encoder().layers[0].mlp.fc2, Fp8Linear)


def test_autograd_keeps_the_fp8_weights_not_upcast_copies():
    """What fp8 saves at rest would come back during the step if the backward pass kept an upcast copy of every
    frozen weight: against the same step in bf16, what autograd keeps differs only in that each weight it keeps
    is the fp8 one."""
    from collections import Counter

    from model_helpers import build_tiny_unet, randomize, unet_inputs

    from lorakit.network import create_network

    def saved_by_a_step(fp8: bool) -> Counter:
        unet = build_tiny_unet().to(LOW).requires_grad_(False)
        randomize(create_network(unet, None, preset="attn-mlp", algorithm="lora"))
        if fp8:
            store_frozen_in_fp8(unet)
        saved = Counter()

        def pack(tensor):
            saved[(tensor.dtype, tuple(tensor.shape))] += 1
            return tensor

        latents, timesteps, context = unet_inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = unet(latents.to(LOW), timesteps, context.to(LOW)).sample
        out.float().square().mean().backward()
        return saved

    def as_bf16(saved: Counter, fp8: bool) -> Counter:
        """The entries in fp8 (or all others) as bf16 ones; a matrix either way round (F.linear keeps Wᵀ)."""
        out = Counter()
        for (dtype, shape), n in saved.items():
            if (dtype == FP8) == fp8:
                out[(LOW, tuple(sorted(shape)) if len(shape) == 2 else shape)] += n
        return out

    in_bf16, in_fp8 = as_bf16(saved_by_a_step(False), False), saved_by_a_step(True)
    kept_in_fp8, kept_otherwise = as_bf16(in_fp8, True), as_bf16(in_fp8, False)
    assert sum(kept_in_fp8.values()) > 50  # every adapted and plain layer's weight the gradient passes
    assert kept_in_fp8 <= in_bf16  # each kept where the bf16 step kept that weight in bf16
    assert kept_otherwise <= in_bf16 - kept_in_fp8  # and no upcast copy of it beside (nothing the bf16 step had not)


# ---- training ----------------------------------------------------------------------------------------------------
def fp8_lines(text: str) -> list[tuple[float, float]]:
    """(MiB in fp8, MiB before) of each line a run printed about its fp8 base."""
    found = re.findall(r"^fp8 base: .* take ([\d.]+) MiB with their linear and conv layers in fp8, instead of "
                       r"([\d.]+) MiB$", text, flags=re.M)
    return [(float(a), float(b)) for a, b in found]


def test_an_fp8_run_trains_and_samples_about_as_its_bf16_run(tiny_model_dir, tmp_path, capsys):
    """The same run with the base in bf16 and in fp8: half the frozen bytes, nearly the same losses, an fp32
    adapter that learned, and samples drawn with the fp8 text encoder and U-Net."""
    from test_train import make_config, run_train, write_dataset

    from lorakit.formats import read_adapter

    data = write_dataset(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\n")
    losses = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        result = run_train(make_config(tiny_model_dir, data, tmp_path / name, training={"max_epochs": 1},
                                       model={"mixed_precision": "bf16", "fp8_base": fp8},
                                       sample={"prompts": str(prompts)}))
        losses[name] = torch.tensor(result.losses)
    (stored, before), = fp8_lines(capsys.readouterr().out)  # printed by the fp8 run only
    assert 0.45 < stored / before < 0.6  # bf16 → fp8, but the norms and embeddings
    assert torch.isfinite(losses["fp8"]).all()
    assert abs(losses["fp8"].mean() / losses["bf16"].mean() - 1) < 0.1
    tensors = read_adapter(tmp_path / "fp8" / "lorakit.safetensors").tensors
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    assert np.asarray(Image.open(tmp_path / "fp8" / "samples" / "epoch-0001.png")).std() > 1


def test_an_sdxl_run_with_trained_text_encoders_on_an_fp8_base(tiny_sdxl_dir, tmp_path, capsys):
    """SDXL's two text encoders, adapted (their frozen weights fp32, stored in fp8 and computed in fp32) and
    pooled, and its U-Net in fp8."""
    from test_train import make_config, run_train, write_dataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zkz shape --w 64 --h 64 --d 1 --s 2\n")
    result = run_train(make_config(tiny_sdxl_dir, write_dataset(tmp_path / "data"), tmp_path / "run",
                                   training={"max_epochs": 1}, data={"resolution": 64},
                                   network={"train_text_encoder": True},
                                   model={"mixed_precision": "bf16", "fp8_base": True},
                                   sample={"prompts": str(prompts)}))
    assert torch.isfinite(torch.tensor(result.losses)).all()
    out = capsys.readouterr().out
    assert "the U-Net's and text encoders' frozen weights" in out
    (stored, before), = fp8_lines(out)
    assert stored / before < 0.5  # the text encoders' fp32 layers take a quarter (their embeddings keep theirs)
    assert np.asarray(Image.open(tmp_path / "run" / "samples" / "epoch-0001.png")).std() > 1


@pytest.mark.parametrize(("settings", "says"), [
    ({"model.fp8_base": True}, r"model\.fp8_base stores the base weights in fp8 .* set model\.mixed_precision to bf16"),
    ({"model.fp8_base_unet": True, "model.mixed_precision": "bf16", "method.kind": "native"},
     r"model\.fp8_base_unet: native fine-tuning trains the base model's weights"),
])
def test_fp8_settings_that_cannot_work_are_refused_before_anything_loads(settings, says):
    from lorakit.config import ConfigError, TrainConfig, set_option

    cfg = TrainConfig()
    for key, value in settings.items():
        set_option(cfg, key, value)
    with pytest.raises(ConfigError, match=says):
        cfg.validate()


def test_textual_inversion_learns_its_token_on_an_fp8_base(tiny_model_dir, tmp_path, capsys):
    """The token embedding it trains is not stored in fp8 (no embedding is): the text encoders' layers may be."""
    from test_train import make_config, run_train, write_dataset

    from lorakit.embeddings import read_embedding

    result = run_train(make_config(tiny_model_dir, write_dataset(tmp_path / "data"), tmp_path / "run",
                                   method={"kind": "ti", "ti_token": "zkz"}, training={"max_steps": 3},
                                   model={"mixed_precision": "bf16", "fp8_base": True}))
    assert torch.isfinite(torch.tensor(result.losses)).all()
    assert "the U-Net's and text encoders' frozen weights" in capsys.readouterr().out
    vectors, _ = read_embedding(tmp_path / "run" / "lorakit-zkz.safetensors")
    assert vectors and all(torch.isfinite(v).all() and v.abs().max() > 0 for v in vectors)


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from model_helpers import build_tiny_unet, randomize, unet_inputs
from lorakit.fp8 import store_frozen_in_fp8
from lorakit.network import create_network
from lorakit.train import keep_frozen_out_of_ddp
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
unet = build_tiny_unet().to(torch.bfloat16).requires_grad_(False)
network = create_network(unet, None, preset="attn-mlp")
randomize(network)
for p in network.parameters():
    if p.requires_grad:
        p.data = p.data.float()
store_frozen_in_fp8(unet)
if sys.argv[3] == "kept-out":
    keep_frozen_out_of_ddp(unet)
try:
    wrapped = torch.nn.parallel.DistributedDataParallel(unet)
except RuntimeError as err:
    print("refused:", err)
    sys.exit(0)
latents, timesteps, context = unet_inputs()
wrapped(latents.to(torch.bfloat16), timesteps, context.to(torch.bfloat16)).sample.float().square().mean().backward()
trained = [p for p in network.parameters() if p.requires_grad]
print("trained:", sum(p.grad is not None for p in trained), "of", len(trained))
"""


@pytest.mark.parametrize("frozen", ["kept-out", "synchronised"])
def test_distributed_data_parallel_wraps_an_fp8_unet_once_its_frozen_weights_are_kept_out(tmp_path, frozen):
    """DistributedDataParallel broadcasts the model's weights from the first process as it wraps it, which gloo
    cannot do in fp8; the trainer keeps the frozen weights (the same in every process) out of it."""
    from test_train_distributed import free_port

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(free_port()), frozen],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    if frozen == "kept-out":
        counted = re.search(r"trained: (\d+) of (\d+)", done.stdout)
        assert counted and counted[1] == counted[2] != "0"
    else:  # what the trainer's keep_frozen_out_of_ddp is for
        assert "refused: Invalid scalar type" in done.stdout


def test_an_fp8_conv_takes_an_unbatched_image_and_refuses_a_trained_bias():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).to(LOW).requires_grad_(False)
    twin = copy.deepcopy(conv)
    twin.weight.data = twin.weight.data.to(FP8).to(LOW)
    store_frozen_in_fp8(conv)
    x = torch.randn(4, 5, 5, dtype=LOW, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    conv(x).float().square().sum().backward()
    twin(x2).float().square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    conv.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="fp8 layer's bias is frozen with its weight"):
        conv(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_cpus_upcast_is_torchs_conversion_for_every_fp8_value(dtype):
    """All 256 bit patterns, NaN and the subnormals included, in any shape."""
    from lorakit.fp8 import upcast

    every = torch.arange(256, dtype=torch.uint8).view(FP8).reshape(4, 8, 8)
    ours, torchs = upcast(every, dtype), every.to(dtype)
    assert ours.dtype == dtype and ours.shape == every.shape
    assert torch.equal(ours.isnan(), torchs.isnan()) and torch.equal(ours.nan_to_num(), torchs.nan_to_num())
