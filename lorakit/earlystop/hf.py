"""CS-Fluctuation early stopping for PEFT LoRA models trained with a transformers ``Trainer`` (the paper's LLMs).

    trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                      callbacks=[CSFluctuationCallback(window=100)])
    trainer.train()   # stops at the turning point and leaves the turning-point adapter weights in the model

Every ``interval`` optimiser steps the callback computes CS (eq. 2) over the model's PEFT LoRA layers and feeds
a ``CSFluctuationMonitor``.  It keeps real copies of the trainable weights at the candidate points (every
epoch end, or every CS sample with ``save="sample"``), drops copies that can no longer be the turning point,
sets ``control.should_training_stop`` when the monitor says stop, and at train end copies the weights saved
nearest the turning point back into the model.  The result goes to ``self.turning_point``, ``state.log_history``
and ``<output_dir>/cs_fluctuation.json`` (the monitor's history, for ``plot_cs_fluctuation``).

Resuming from a Trainer checkpoint restores the monitor (it is an ``ExportableState``); weight copies are not
in checkpoints, so a turning point before the resume is reported but not restored.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from lorakit.atomic import atomic_write_text
from lorakit.earlystop.candidates import CandidateStore
from lorakit.earlystop.cs import (
    CSReading,
    cosine_from_terms,
    dense_terms,
    lowrank_spectral_norm,
    lowrank_terms,
    relative_update,
    spectral_norm,
    spectral_ratio,
)
from lorakit.earlystop.monitor import CSFluctuationMonitor, Decision, TurningPoint
from lorakit.earlystop.plot import plot_cs_fluctuation
from lorakit.earlystop.rules import Rule, rule_from_dict

RECORD_NAME = "cs_fluctuation.json"
PLOT_NAME = "cs_fluctuation.png"


# ---- CS over PEFT LoRA layers ------------------------------------------------------------------------


def peft_lora_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[nn.Module, str]]:
    """``(layer, adapter)`` for every PEFT LoRA layer of ``model`` and adapter (only ``adapter_name`` if given)."""
    from peft.tuners.lora import LoraLayer  # peft is optional: only this callback needs it

    found = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        names = list(module.lora_A.keys()) + list(getattr(module, "lora_embedding_A", {}).keys())
        found.extend((module, name) for name in names if adapter_name in (None, name))
    return found


def _peft_update(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None,
                                                          tuple[torch.Tensor, torch.Tensor, float] | None]:
    """``(W0, ΔW, None)`` of one PEFT LoRA layer and adapter, or ``(W0, None, (down, up, scale))`` when ``ΔW =
    scale · up @ down`` exactly (plain LoRA on a Linear or a GPT-2 ``Conv1D``, not merged), so that it need not be
    built.  LoRA variants (DoRA, ...) get the exact ``ΔW`` from PEFT's own merge; other layers from
    ``get_delta_weight``; a merged adapter is taken back out of the base weight."""
    weight = layer.get_base_layer().weight
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    merged = adapter in getattr(layer, "merged_adapters", [])
    down = layer.lora_A[adapter] if adapter in layer.lora_A else None
    if variant is None and not merged and isinstance(down, nn.Linear) and weight.dim() == 2:
        return weight, None, (down.weight, layer.lora_B[adapter].weight, layer.scaling[adapter])
    if variant is not None:
        original = weight - layer.get_delta_weight(adapter) if merged else weight
        return original, variant.merge_safe(layer, adapter, original.clone()) - original, None
    delta = layer.get_delta_weight(adapter)
    return (weight - delta if merged else weight), delta, None


@torch.no_grad()
def peft_layer_terms(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(<ΔW, W0>, ‖ΔW‖², ‖W0‖²)`` of one PEFT LoRA layer and adapter (the low-rank identities where
    ``_peft_update`` gives factors)."""
    weight, delta, factors = _peft_update(layer, adapter)
    if factors is not None:
        down, up, scale = factors
        w = weight.T if layer.fan_in_fan_out else weight  # (out, in), as B A
        dot, delta_sq = lowrank_terms(down, up, w, scale)
    else:
        dot, delta_sq = dense_terms(delta, weight)
    w = weight.reshape(-1).to(dot.dtype)
    return dot, delta_sq, torch.dot(w, w)


@torch.no_grad()
def peft_layer_spectral(layer: nn.Module, adapter: str,
                        weight_norms: dict[tuple[int, str], torch.Tensor] | None = None) -> torch.Tensor:
    """σ1(ΔW)/σ1(W0) of one PEFT LoRA layer and adapter: σ1(ΔW) from r×r Grams where ``_peft_update`` gives
    factors, from ``ΔW`` otherwise.  ``weight_norms`` caches σ1(W0) (W0 is frozen: one SVD per layer and run, not
    per reading)."""
    original, delta, factors = _peft_update(layer, adapter)
    top_delta = lowrank_spectral_norm(*factors) if factors is not None else spectral_norm(delta)
    merged = adapter in getattr(layer, "merged_adapters", [])  # W0 recomputed from the merged weight: not cached
    key = (id(layer), adapter)
    if weight_norms is None or merged or key not in weight_norms:
        top_weight = spectral_norm(original)  # the transpose of fan_in_fan_out has the same σ1
        if weight_norms is not None and not merged:
            weight_norms[key] = top_weight
    else:
        top_weight = weight_norms[key]
    return spectral_ratio(top_delta.to(torch.float64), top_weight.to(torch.float64)).cpu()


@torch.no_grad()
def peft_cs_reading(model: nn.Module | list[tuple[nn.Module, str]], adapter_name: str | None = None,
                    spectral: bool = False,
                    weight_norms: dict[tuple[int, str], torch.Tensor] | None = None) -> CSReading:
    """Eq. 2 and the update's size (mean ‖ΔW‖/‖W‖) over the PEFT LoRA layers of ``model`` (or over
    ``peft_lora_layers(model)`` found before); with ``spectral``, also the mean σ1(ΔW)/σ1(W) (the
    ``spectral_budget`` rule's size; ``weight_norms``: a cache of σ1(W), see ``peft_layer_spectral``)."""
    layers = model if isinstance(model, list) else peft_lora_layers(model, adapter_name)
    if not layers:
        raise ValueError("the model has no PEFT LoRA layers" + (f" for adapter {adapter_name!r}" if adapter_name
                                                                   else ""))
    cosines, sizes, tops = [], [], []
    for layer, name in layers:
        dot, delta_sq, weight_sq = peft_layer_terms(layer, name)
        cosines.append(cosine_from_terms(dot, delta_sq, weight_sq).to(torch.float64).cpu())
        sizes.append(relative_update(delta_sq, weight_sq).to(torch.float64).cpu())
        if spectral:
            tops.append(peft_layer_spectral(layer, name, weight_norms))
    return CSReading(float(torch.stack(cosines).mean()), float(torch.stack(sizes).mean()),
                     float(torch.stack(tops).mean()) if spectral else None)


def peft_cs_value(model: nn.Module | list[tuple[nn.Module, str]], adapter_name: str | None = None) -> float:
    """Eq. 2 over the PEFT LoRA layers of ``model`` (or over ``peft_lora_layers(model)`` found before)."""
    return peft_cs_reading(model, adapter_name).cs


# ---- the callback ------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _epoch_number(state: TrainerState) -> int | None:
    """1-based number of the epoch the last step belongs to (``state.epoch`` is fractional)."""
    if state.epoch is None:
        return None
    return max(1, math.ceil(state.epoch - 1e-6))


class CSFluctuationCallback(TrainerCallback, ExportableState):
    """Stop a ``Trainer`` at the CS-Fluctuation turning point and hand back the turning-point weights.

    ``window``: M in CS samples (default: update steps per epoch / ``interval``, at least 2); ``interval``:
    compute CS every this many optimiser steps; ``lr``: eq. 4's learning rate (default ``args.learning_rate``);
    ``rule``: a rule or its ``to_dict()`` (default ``SecondValley()``); ``min_steps``, ``report_only``,
    ``alignment``: as ``CSFluctuationMonitor``; ``save``: ``"epoch"`` (copy at epoch ends, as the paper
    returns the turning-point epoch) or ``"sample"`` (copy at every CS sample: the exact step);
    ``restore``: put the turning-point weights back at train end; ``record``/``plot``: write
    ``cs_fluctuation.json``/``.png`` to ``args.output_dir``; ``adapter_name``: only this PEFT adapter;
    ``spectral``: also read σ1(ΔW)/σ1(W) at every epoch end (one SVD per layer the first time, r×r problems
    after), as the lorakit trainer does; default: when the rule reads it (``spectral_budget``), and ``True``
    records it in report mode for replaying that rule afterwards.
    """

    def __init__(self, window: int | None = None, interval: int = 1, lr: float | None = None,
                 rule: Rule | dict[str, Any] | None = None, min_steps: int = 0, report_only: bool = False,
                 alignment: str | int = "centre", save: str = "epoch", restore: bool = True,
                 record: bool = True, plot: bool = False, adapter_name: str | None = None,
                 spectral: bool | None = None) -> None:
        if save not in ("epoch", "sample"):
            raise ValueError(f"save must be 'epoch' or 'sample', got {save!r}")
        if int(interval) < 1:
            raise ValueError(f"interval must be a positive number of steps, got {interval}")
        self.window, self.interval, self.lr = window, int(interval), lr
        self.rule = rule_from_dict(rule) if isinstance(rule, dict) else rule
        needs_spectral = self.rule is not None and self.rule.series == "spectral"
        if spectral is False and needs_spectral:
            raise ValueError(f"the {self.rule.name} rule reads σ1(ΔW)/σ1(W): spectral=False cannot serve it")
        self.spectral = needs_spectral if spectral is None else bool(spectral)
        self._steps_per_epoch: int | None = None
        self._weight_norms: dict[tuple[int, str], torch.Tensor] = {}  # σ1(W0) per layer: W0 never changes
        self.min_steps, self.report_only, self.alignment = int(min_steps), bool(report_only), alignment
        self.save, self.restore, self.record, self.plot = save, bool(restore), bool(record), bool(plot)
        self.adapter_name = adapter_name
        self.monitor: CSFluctuationMonitor | None = None
        self.candidates = CandidateStore()
        self.decision: Decision | None = None
        self.turning_point: TurningPoint | None = None
        self.restored_step: int | None = None
        self._pending_state: dict[str, Any] | None = None
        self._layers: list[tuple[nn.Module, str]] = []

    # ---- resuming (transformers ExportableState) ---------------------------------------------
    def state(self) -> dict[str, Any]:
        args = {"window": self.window, "interval": self.interval, "lr": self.lr,
                "rule": None if self.rule is None else self.rule.to_dict(), "min_steps": self.min_steps,
                "report_only": self.report_only, "alignment": self.alignment, "save": self.save,
                "restore": self.restore, "record": self.record, "plot": self.plot,
                "adapter_name": self.adapter_name, "spectral": self.spectral}
        return {"args": args, "attributes": {"monitor_state": self.monitor_state}}

    @property
    def monitor_state(self) -> dict[str, Any] | None:
        return self.monitor.state_dict() if self.monitor is not None else self._pending_state

    @monitor_state.setter
    def monitor_state(self, value: dict[str, Any] | None) -> None:
        # the Trainer sets this on a fresh instance before on_train_begin; the monitor is built there
        self._pending_state = value

    # ---- events --------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        # found once: walking every module of a large model each step would cost more than CS itself
        self._layers = [] if model is None else peft_lora_layers(model, self.adapter_name)
        if not self._layers:
            raise ValueError("CSFluctuationCallback needs a PEFT model with LoRA layers")
        window = self.window
        if train_dataloader is not None:
            self._steps_per_epoch = max(len(train_dataloader) // args.gradient_accumulation_steps, 1)
        if window is None:
            if self._steps_per_epoch is None:
                raise ValueError("give CSFluctuationCallback a window: steps per epoch are unknown")
            window = max(2, round(self._steps_per_epoch / self.interval))
        if self.spectral and self._steps_per_epoch is None:
            raise ValueError("the spectral size is read at epoch ends, and the steps per epoch are unknown (no "
                             "train_dataloader)")
        lr = self.lr if self.lr is not None else args.learning_rate
        self.monitor = CSFluctuationMonitor(window, lr, self.rule, self.min_steps, self.report_only, self.alignment)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self.turning_point = self.monitor.turning_point
            self._pending_state = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        # the spectral size costs an SVD-sized problem per layer: read at epoch ends, where its rule decides,
        # also when the epoch's last step is not one of every ``interval``
        at_epoch_end = self._steps_per_epoch is not None and state.global_step % self._steps_per_epoch == 0
        if self.monitor is None or model is None or (state.global_step % self.interval
                                                     and not (self.spectral and at_epoch_end)):
            return
        epoch = _epoch_number(state)
        reading = peft_cs_reading(self._layers, spectral=self.spectral and at_epoch_end,
                                  weight_norms=self._weight_norms)
        self.decision = self.monitor.update(state.global_step, reading.cs, epoch, update=reading.update,
                                            spectral=reading.spectral)
        if self.save == "sample":
            self._take_copy(model, state.global_step, epoch)
        self.turning_point = self.monitor.turning_point
        if self.decision.stop:
            control.should_training_stop = True

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.monitor is None or model is None or self.save != "epoch":
            return
        self._take_copy(model, state.global_step, _epoch_number(state))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        tp = self.turning_point = self.monitor.turning_point
        if tp is not None and self.restore and model is not None:
            self._restore(model, tp)
        state.log_history.append({"step": state.global_step, "cs_fluctuation_turning_point_step":
                                  None if tp is None else tp.step,
                                  "cs_fluctuation_restored_step": self.restored_step})
        if args.output_dir and (self.record or self.plot) and args.process_index == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            if self.record:
                self._write_record(os.path.join(args.output_dir, RECORD_NAME))
            if self.plot:
                plot_cs_fluctuation(self.monitor.history, os.path.join(args.output_dir, PLOT_NAME),
                                    budget=getattr(self.rule, "budget", None))

    # ---- helpers ---------------------------------------------------------------------------------
    def _take_copy(self, model: nn.Module, step: int, epoch: int | None) -> None:
        tp = self.monitor.turning_point
        if tp is not None and any(s >= tp.step for s in self.candidates.steps):
            return  # decided, and a copy at or after the turning point exists: later ones are never nearer
        self.candidates.add(step, _trainable(model), epoch)
        self.candidates.prune(self.monitor.earliest_candidate_step())

    @torch.no_grad()
    def _restore(self, model: nn.Module, tp: TurningPoint) -> None:
        chosen = self.candidates.nearest(tp.step)
        if chosen is None:
            warnings.warn(f"CS-Fluctuation turning point at step {tp.step}, but no weights were saved near it "
                          "(resumed after it?); the model keeps its final weights", stacklevel=2)
            return
        params = dict(model.named_parameters())
        missing = sorted(set(chosen.tensors) - set(params))
        if missing:
            raise KeyError(f"saved turning-point weights do not match the model: {missing[:5]}")
        for name, saved in chosen.tensors.items():
            params[name].copy_(saved.to(params[name].device, params[name].dtype))
        self.restored_step = chosen.step

    def _write_record(self, path: str) -> None:
        record = {"history": self.monitor.history.to_dict(),
                  "decision": None if self.decision is None else {"stop": self.decision.stop,
                                                                  "reason": self.decision.reason},
                  "restored_step": self.restored_step, "config": self.monitor.config()}
        atomic_write_text(path, json.dumps(record, indent=1))
