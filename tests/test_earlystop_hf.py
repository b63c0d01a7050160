"""The transformers callback on a tiny PEFT LoRA causal LM: it stops a real Trainer and restores the weights."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lorakit.earlystop import find_turning_point  # noqa: E402
from lorakit.earlystop.hf import (  # noqa: E402
    RECORD_NAME,
    CSFluctuationCallback,
    peft_cs_reading,
    peft_cs_value,
    peft_lora_layers,
)
from lorakit.earlystop.rules import SpectralBudget  # noqa: E402

MAX_STEPS = 200


def tiny_llama(seed: int = 0, **lora) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **lora))


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return get_peft_model(GPT2LMHeadModel(config), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_dropout=0.0, fan_in_fan_out=True))


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def merged_updates(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ΔW, W0)`` of every LoRA layer from PEFT's own merge: merge, read the weights, unmerge."""
    layers = peft_lora_layers(model)
    originals = [layer.get_base_layer().weight.detach().clone() for layer, _ in layers]
    model.merge_adapter()
    deltas = [layer.get_base_layer().weight.detach() - w0 for (layer, _), w0 in zip(layers, originals, strict=True)]
    model.unmerge_adapter()
    return list(zip(deltas, originals, strict=True))


def dense_cs(model: torch.nn.Module) -> float:
    """Eq. 2 with ΔW from PEFT's own merge."""
    cos = [torch.nn.functional.cosine_similarity(d.reshape(1, -1).double(), w.reshape(1, -1).double())
           for d, w in merged_updates(model)]
    return float(torch.cat(cos).mean())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, lambda: tiny_llama(use_dora=True)],
                         ids=["llama", "gpt2-fan_in_fan_out", "llama-dora"])
def test_peft_cs_equals_the_merged_weights(build):
    model = build()
    assert peft_cs_value(model) == 0.0  # PEFT initialises B = 0
    randomize_lora(model)
    value = peft_cs_value(model)
    assert abs(value) > 1e-3
    assert value == pytest.approx(dense_cs(model), rel=1e-4, abs=1e-6)


def dense_spectral_size(model: torch.nn.Module) -> float:
    """Mean σ1(ΔW)/σ1(W0) with ΔW from PEFT's own merge, by full SVDs."""
    return float(torch.stack([torch.linalg.matrix_norm(d.double(), ord=2) / torch.linalg.matrix_norm(w.double(), ord=2)
                              for d, w in merged_updates(model)]).mean())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, lambda: tiny_llama(use_dora=True)],
                         ids=["llama", "gpt2-fan_in_fan_out", "llama-dora"])
def test_peft_spectral_size_equals_the_merged_weights(build):
    model = build()
    assert peft_cs_reading(model).spectral is None  # only when asked: it costs an SVD per layer
    assert peft_cs_reading(model, spectral=True).spectral == 0.0
    randomize_lora(model)
    cache = {}
    first = peft_cs_reading(model, spectral=True, weight_norms=cache).spectral
    assert first > 1e-3 and first == pytest.approx(dense_spectral_size(model), rel=1e-6)
    assert len(cache) == len(peft_lora_layers(model))  # σ1(W0) once per layer; the next reading reuses it
    assert peft_cs_reading(model, spectral=True, weight_norms=cache).spectral == pytest.approx(first, rel=1e-6)


def test_callback_stops_on_the_spectral_budget_read_at_epoch_ends(tmp_path):
    """The lorakit trainer's default rule in a transformers Trainer: σ1(ΔW)/σ1(W) read at every epoch end (2
    steps), never between, and the run stops at the first epoch end where it reaches the budget, handing back
    that epoch's weights."""
    model = tiny_llama()
    # a model trained from scratch has small weights: σ1(ΔW)/σ1(W) passes 1 within epochs; 3: epoch ends off it
    callback = CSFluctuationCallback(rule=SpectralBudget(budget=5.0), interval=3)
    trainer, snapshots = train_with(model, callback, tmp_path)
    history = callback.monitor.history
    read = {int(step): float(v) for step, v in zip(history.steps, history.spectral, strict=True) if v == v}
    assert read and all(step % 2 == 0 for step in read)  # 8 examples, batch 4: 2 steps per epoch
    assert set(history.steps) == set(range(3, trainer.state.global_step + 1, 3)) | set(read)
    stop = trainer.state.global_step
    assert stop < MAX_STEPS and stop % 2 == 0 and read[stop] >= 5.0 > max(v for s, v in read.items() if s < stop)
    assert callback.turning_point.step == stop and callback.turning_point.epoch == stop // 2
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(weights[n], snapshots.by_step[stop][n]) for n in weights)
    # what was read is the spectral size of the weights at that step
    for n, p in weights.items():
        p.data.copy_(snapshots.by_step[stop - 2][n])
    assert dense_spectral_size(model) == pytest.approx(read[stop - 2], rel=1e-6)


def test_callback_stops_on_the_growth_stall_at_an_epoch_end(tmp_path):
    """``GrowthStall`` in a transformers Trainer: the update's size is compared from epoch end to epoch end (2
    steps per epoch, one CS sample per step), and the run stops at the first epoch end whose growth is below the
    threshold, handing back that epoch's weights."""
    from lorakit.earlystop import GrowthStall

    model = tiny_llama()
    # growth from epoch to epoch here is far below 1000%: the first epoch end that can be compared (the second)
    callback = CSFluctuationCallback(rule=GrowthStall(growth=10.0, span=1, cap=1e9))
    trainer, snapshots = train_with(model, callback, tmp_path)
    assert trainer.state.global_step == 4 and callback.monitor.window == 2
    tp = callback.turning_point
    assert tp.step == 4 and tp.epoch == 2 and "per window over the last 1" in tp.reason
    sizes = callback.monitor.history.update
    assert sizes[3] / sizes[1] - 1 < 10.0 and sizes[3] > sizes[1] > 0  # still growing, but below the threshold
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(weights[n], snapshots.by_step[4][n]) for n in weights)


def train_with(model, callback, out, **extra) -> tuple[Trainer, Snapshots]:
    """A transformers Trainer over ``token_data()`` (constant lr 1e-2, batch 4: 2 steps per epoch, at most
    MAX_STEPS) with ``callback`` and a ``Snapshots`` of the weights after every step, run to its end."""
    snapshots = Snapshots()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=MAX_STEPS, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), callbacks=[callback, snapshots])
    trainer.train()
    return trainer, snapshots


class Snapshots(TrainerCallback):
    """Independent copies of the trainable weights after every step, to check what the callback restores."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}


def token_data(n: int = 8, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (length,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    model = tiny_llama()
    callback = CSFluctuationCallback(window=10, save="sample")
    trainer, snapshots = train_with(model, callback, out, dataloader_num_workers=0)
    return trainer, callback, snapshots, out


@pytest.mark.slow
def test_callback_stops_a_trainer_and_restores_the_turning_point_weights(stopped_run):
    trainer, callback, snapshots, out = stopped_run
    tp = callback.turning_point
    assert tp is not None and callback.decision.stop
    # stopped early, at the step the turning point became known
    assert trainer.state.global_step == tp.found_at_step < MAX_STEPS
    assert tp.step < tp.found_at_step and tp.epoch == (tp.step + 1) // 2  # 2 steps per epoch, counted from 1
    # the model now holds the weights of the turning-point step, not the final ones
    assert callback.restored_step == tp.step
    now = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert now and set(now) == set(snapshots.by_step[tp.step])
    for name, value in now.items():
        assert torch.equal(value, snapshots.by_step[tp.step][name]), name
    final = snapshots.by_step[trainer.state.global_step]
    assert any(not torch.equal(now[n], final[n]) for n in now)
    # and they are the weights whose CS the monitor recorded at that sample
    history = callback.monitor.history
    assert peft_cs_value(trainer.model) == pytest.approx(history.cs[tp.index], rel=1e-12)
    from lorakit.earlystop.hf import peft_cs_reading

    # the update's size is recorded beside it, from the same sums: ‖ΔW‖/‖W‖ of the PEFT layers
    assert peft_cs_reading(trainer.model).update == pytest.approx(history.update[tp.index], rel=1e-12)
    # the same series offline gives the same turning point
    offline = find_turning_point(history.cs, 10, 1e-2, steps=history.steps, epochs=history.epochs)
    assert offline == tp
    # only copies that could still be nearest were kept
    assert len(callback.candidates) <= tp.found_at_step - tp.step + 2


@pytest.mark.slow
def test_callback_records_the_turning_point(stopped_run):
    trainer, callback, _, out = stopped_run
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["history"]["turning_point"]["step"] == callback.turning_point.step
    assert record["restored_step"] == callback.turning_point.step and record["decision"]["stop"]
    assert trainer.state.log_history[-1]["cs_fluctuation_turning_point_step"] == callback.turning_point.step


@pytest.mark.slow
def test_callback_state_survives_a_checkpoint(stopped_run):
    """The Trainer rebuilds a stateful callback as ``type(cb)(**args)`` and sets its attributes on resume."""
    trainer, callback, _, _ = stopped_run
    saved = json.loads(json.dumps(callback.state()))
    fresh = CSFluctuationCallback(**saved["args"])
    for key, value in saved["attributes"].items():
        setattr(fresh, key, value)
    fresh.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    assert fresh.monitor.state_dict() == callback.monitor.state_dict()
    assert fresh.turning_point == callback.turning_point


def test_callback_refuses_a_model_without_lora():
    callback = CSFluctuationCallback(window=4)
    with pytest.raises(ValueError, match="PEFT"):
        callback.on_train_begin(None, None, None, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        CSFluctuationCallback(save="never")
    with pytest.raises(ValueError, match="spectral=False cannot serve it"):
        CSFluctuationCallback(rule={"name": "spectral_budget", "budget": 0.25}, spectral=False)
