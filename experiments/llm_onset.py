"""CS-Fluctuation on a language model, as the paper also does for LLMs: where does each turning-point rule stop,
against the overfitting onset measured by held-out loss?

1. Pretrain a tiny GPT-2 (byte vocabulary, 4 layers, width 128) here, offline, on the docstrings of some Python
   standard-library modules (cached in ``<out>/pretrained``).
2. Fine-tune it with a PEFT LoRA (rank 8 on every attention and MLP projection) on a small, different text: the
   language reference's "assignment" topic (``pydoc_data.topics``), every 5th paragraph held out.  A
   transformers ``Trainer`` runs it with lorakit's ``CSFluctuationCallback`` in report mode (it records CS and
   the update's size at every step, its spectral size at epoch ends, and never stops), and evaluates the held-out
   loss after every epoch.
3. The onset is the epoch (≥ 1) of minimum held-out loss; each rule is replayed on the recorded CS series (as
   ``lorakit world curve-report`` does for the shapes world), its turning point compared with the onset.

    python experiments/llm_onset.py --out runs/llm_onset            # 5 seeds × 2 learning rates, the table
    python experiments/llm_onset.py --out runs/llm_onset --update-doc docs/early_stopping.md   # and the page

The texts come from this Python's standard library, so the numbers belong to its version (written with the
results).  Writes ``<out>/results.json`` and ``<out>/table.md``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PRETRAIN_MODULES = ("abc", "argparse", "bisect", "collections", "contextlib", "csv", "dataclasses", "datetime",
                    "enum", "functools", "heapq", "io", "itertools", "json", "logging", "math", "os", "pathlib",
                    "queue", "random", "re", "shutil", "statistics", "string", "subprocess", "tempfile",
                    "textwrap", "threading", "types", "zipfile")
FINETUNE_TOPIC = "assignment"
BLOCK = 128  # tokens (bytes) per training window
#: where ``--update-doc`` writes the table in docs/early_stopping.md
DOC_MARKERS = {"llm": ("<!-- llm_onset table -->", "<!-- /llm_onset table -->")}


# ---------------------------------------------------------------------------------------------- texts
def docstring_corpus(modules: tuple[str, ...] = PRETRAIN_MODULES) -> str:
    """Docstrings of the modules and their public members, in a fixed order."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(inspect.cleandoc(module.__doc__))
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            doc = getattr(getattr(module, attr), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40 and getattr(getattr(module, attr), "__module__", name) == name:
                parts.append(inspect.cleandoc(doc))
    return "\n\n".join(parts)


def finetune_texts(topic: str = FINETUNE_TOPIC, every: int = 5) -> tuple[str, str]:
    """(train, held-out): the topic's paragraphs, every ``every``-th one held out."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for p in topics[topic].split("\n\n") if p.strip()]
    held = [p for i, p in enumerate(paragraphs) if i % every == every - 1]
    train = [p for i, p in enumerate(paragraphs) if i % every != every - 1]
    return "\n\n".join(train), "\n\n".join(held)


def windows(text: str, block: int = BLOCK) -> torch.Tensor:
    """The text's bytes in non-overlapping windows of ``block`` (the tail dropped)."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = len(data) // block
    return data[: n * block].reshape(n, block)


# ---------------------------------------------------------------------------------------------- models
def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def pretrain(out: Path, steps: int, batch: int = 16, lr: float = 1e-3, seed: int = 0):
    """The base model, pretrained on the docstring corpus (loaded from ``out`` when it is there)."""
    from transformers import GPT2LMHeadModel

    if (out / "model.safetensors").exists():
        return GPT2LMHeadModel.from_pretrained(out)
    data = windows(docstring_corpus())
    model = tiny_gpt2(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"pretrain step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return model


class _Windows(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    seed: int
    lr: float
    window_losses: list[list[float]]  # per epoch 1..E, the mean loss of each held-out window
    cs_history: dict

    @property
    def eval_loss(self) -> list[float]:
        """Held-out loss per epoch (windows are all ``BLOCK`` tokens long: the mean of the window means)."""
        return [float(np.mean(w)) for w in self.window_losses]

    @property
    def onset(self) -> int:
        return int(np.argmin(self.eval_loss)) + 1

    def onset_interval(self, draws: int = 1000, level: float = 0.9, seed: int = 0) -> tuple[int, int]:
        """The onset's interval: resample held-out windows with replacement (the same draw for every epoch)
        and take the central ``level`` of the onsets."""
        losses = np.asarray(self.window_losses)  # (epochs, windows)
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, losses.shape[1], size=(draws, losses.shape[1]))
        onsets = np.argmin(losses[:, picks].mean(axis=2), axis=0) + 1  # (draws,)
        tail = (1 - level) / 2
        low, high = np.quantile(onsets, [tail, 1 - tail], method="inverted_cdf")
        return int(low), int(high)


class _HeldOutLoss:
    """Called after every epoch: the loss of each held-out window, kept per epoch (the Trainer's own evaluation
    reports only their mean, and the onset's interval resamples windows)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.per_epoch: list[list[float]] = []

    @torch.no_grad()
    def __call__(self, model) -> None:
        was_training = model.training
        model.eval()
        logits = model(input_ids=self.data).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.data[:, 1:].reshape(-1),
                                                 reduction="none").reshape(len(self.data), -1).mean(dim=1)
        self.per_epoch.append([float(x) for x in loss])
        model.train(was_training)


def finetune(base_dir: Path, out: Path, seed: int, lr: float, epochs: int, batch: int = 8) -> RunResult:
    """One LoRA fine-tune with CS recorded at every step and the held-out loss after every epoch (cached)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from lorakit.earlystop.hf import RECORD_NAME, CSFluctuationCallback

    result = out / "result.json"
    if result.exists():
        cached = json.loads(result.read_text())
        # an older result (mean losses only, or no spectral size) is trained again
        if "window_losses" in cached and any(v is not None for v in cached["cs_history"].get("spectral") or []):
            return RunResult(**cached)
    train_text, held_text = finetune_texts()
    torch.manual_seed(seed)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir), LoraConfig(
        r=8, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True))
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=batch,
                             learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, eval_strategy="no",
                             save_strategy="no", logging_strategy="epoch", report_to=[], seed=seed, data_seed=seed,
                             use_cpu=True, disable_tqdm=True)
    held_out = _HeldOutLoss(windows(held_text))

    class EveryEpoch(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            held_out(model)

    # report mode: it never stops; the spectral size is read at epoch ends for the trainer's default rule
    callback = CSFluctuationCallback(report_only=True, restore=False, spectral=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(windows(train_text)),
                      callbacks=[callback, EveryEpoch()])
    trainer.remove_callback(PrinterCallback)  # the losses are in the table; no dict per epoch on the terminal
    trainer.train()
    record = json.loads((out / RECORD_NAME).read_text())
    run = RunResult(seed, lr, held_out.per_epoch, record["history"])
    result.write_text(json.dumps(run.__dict__))
    return run


# ---------------------------------------------------------------------------------------------- the table
def turning_epochs(run: RunResult) -> dict[str, int | None]:
    """Each rule of the shapes world's table, replayed on the run's CS series: the turning point's epoch."""
    from lorakit.earlystop import History
    from lorakit.earlystop.replay import COMPARED_RULES, replay

    h = History.from_dict(run.cs_history)
    out = {}
    for name, (rule, window_epochs) in COMPARED_RULES.items():
        if name == "second-valley-0":  # the noise guard matters on the shapes world's short curves only
            continue
        tp = replay(h, rule, window_epochs)
        out[name] = None if tp is None or tp.epoch is None else int(tp.epoch)
    return out


def table(runs: list[RunResult]) -> str:
    names = list(turning_epochs(runs[0]))
    lines = ["| run | onset (min held-out loss) [90% interval]: epoch, loss | "
             + " | ".join(f"{n}: epoch (Δ, loss)" for n in names) + " |", "|" + "---|" * (2 + len(names))]
    intervals = {id(r): r.onset_interval() for r in runs}
    turning = {id(r): turning_epochs(r) for r in runs}
    for r in runs:
        tps = turning[id(r)]
        cells = []
        for n in names:
            e = tps[n]
            cells.append("never" if e is None else
                         f"{e} ({e - r.onset:+d}, {r.eval_loss[min(e, len(r.eval_loss)) - 1]:.3f})")
        low, high = intervals[id(r)]
        lines.append(f"| lr {r.lr:g} seed {r.seed} | {r.onset} [{low}–{high}], {min(r.eval_loss):.3f} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        fired = [(r, turning[id(r)][n]) for r in runs]
        within = sum(e is not None and abs(e - r.onset) <= 1 for r, e in fired)
        inside = sum(e is not None and intervals[id(r)][0] - 1 <= e <= intervals[id(r)][1] + 1 for r, e in fired)
        deltas = [e - r.onset for r, e in fired if e is not None]
        mean = f"{np.mean(deltas):+.1f}" if deltas else "—"
        lines.append(f"- {n}: {within}/{len(runs)} runs within ±1 epoch of the onset ({inside}/{len(runs)} within "
                     f"±1 of its interval; mean turning point − onset {mean} epochs; never fired in "
                     f"{sum(e is None for _, e in fired)})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/llm_onset"))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--lrs", default="2e-3,1e-2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--update-doc", type=Path, help="also write the table into this Markdown file, between its "
                                                    f"{DOC_MARKERS['llm'][0]} and {DOC_MARKERS['llm'][1]} lines")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = args.out / "pretrained"
    pretrain(base, args.pretrain_steps)
    runs = []
    for lr in (float(x) for x in args.lrs.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            print(f"fine-tune lr {lr:g} seed {seed}", flush=True)
            runs.append(finetune(base, args.out / f"lr{lr:g}_s{seed}_e{args.epochs}", seed, lr, args.epochs))
    text = table(runs)
    version = f"Python {sys.version.split()[0]}, torch {torch.__version__}"
    block = f"{text}\n{version}; {args.epochs} epochs, pretrain {args.pretrain_steps} steps\n"
    (args.out / "table.md").write_text(block)
    if args.update_doc:
        from lorakit.doc_blocks import update_doc_blocks

        update_doc_blocks(args.update_doc, {"llm": block}, DOC_MARKERS)
        print(f"updated {args.update_doc}")
    (args.out / "results.json").write_text(json.dumps({"version": version, "runs": [
        {**r.__dict__, "eval_loss": r.eval_loss, "onset": r.onset, "onset_interval": r.onset_interval()}
        for r in runs]}))
    print(text)
    print("held-out loss per epoch: " + "; ".join(
        f"lr {r.lr:g} s{r.seed}: " + " ".join(f"{x:.2f}" for x in r.eval_loss) for r in runs))
    print(f"wrote {args.out / 'table.md'} ({version})")
    return 0 if all(math.isfinite(x) for r in runs for x in r.eval_loss) else 1


if __name__ == "__main__":
    raise SystemExit(main())
