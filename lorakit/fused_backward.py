"""kohya's ``--fused_backward_pass`` (``optimizer.fused_backward_pass``): the optimizer steps each parameter the
moment the backward pass has its gradient, and that gradient is freed at once.

Native fine-tuning keeps a gradient the size of every trained weight until the optimizer steps: an SDXL U-Net's
2.6 G parameters hold 10 GB of fp32 gradients (5 GB under full_bf16) at the end of the backward pass.  Stepped as
they arrive, at most the gradients of the layers the backward pass is working on exist at once.

Each parameter gets an optimizer of its own, built with its group's settings (the recipe of PyTorch's tutorial
"How to save memory by fusing the optimizer step into the backward pass"). That is the same update for the
optimizers whose update reads one tensor at a time (AdamW, SGD, Lion, Adafactor, 8-bit AdamW); the ones that
estimate a step size over all parameters at once (Prodigy, D-Adaptation) would each estimate their own, so they are
refused.  Gradient clipping, which needs the norm over all gradients, clips each parameter's gradient to
``max_grad_norm`` alone, as kohya does with this option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lorakit.optimizers import ADAPTIVE

#: optimizer.optimizer values whose update reads all parameters together (a step size estimated over the model)
NOT_PER_PARAMETER = ADAPTIVE


def fused_backward_refusal(kind: str, optimizer: str, mixed_precision: str, accumulation: int) -> str | None:
    """Why ``optimizer.fused_backward_pass`` cannot run with these settings (None: it can)."""
    if kind != "native":
        return (f"it saves the memory of native fine-tuning's gradients (the model's size), and method.kind = "
                f"{kind!r} trains small tensors: turn it off")
    if optimizer.lower() in NOT_PER_PARAMETER:
        return (f"optimizer.optimizer = {optimizer!r} estimates its step size over all parameters together, and "
                "the fused pass steps each parameter alone: use adamw, adamw8bit, adafactor, lion or sgd")
    if accumulation != 1:  # the gradient is freed once used: nothing is left to add the next batch's to
        return (f"the gradient of each parameter is used and freed during the backward pass, so "
                f"optimizer.gradient_accumulation_steps = {accumulation} has nothing to accumulate into: set it to 1")
    if mixed_precision == "fp16":  # the loss scale is known only after every gradient is checked for overflow
        return ("fp16 mixed precision scales the loss and skips a step whose gradients overflowed, which is known "
                "only after the whole backward pass: use bf16")
    return None


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per trained parameter, stepped by a hook as soon as that parameter's gradient is complete.

    It stands where the run's optimizer stands: its ``param_groups`` are the per-parameter optimizers' own groups
    (a learning-rate schedule that sets ``lr`` sets theirs), its state dict holds theirs for a resume, and its
    ``step()`` does nothing (the hooks have stepped).
    """

    def __init__(self, groups: list[dict], build: Callable[[list[dict]], torch.optim.Optimizer],
                 max_grad_norm: float = 0.0) -> None:
        self.parts: list[torch.optim.Optimizer] = []
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            self.parts.extend(build([{**settings, "params": [p]}]) for p in group["params"])
        params = [p for part in self.parts for p in part.param_groups[0]["params"]]
        super().__init__(params, {})
        self.param_groups = [part.param_groups[0] for part in self.parts]  # the same dicts: lr set once, used
        self.max_grad_norm = max_grad_norm
        self._hooks = [p.register_post_accumulate_grad_hook(self._stepper(part)) for part, p in zip(
            self.parts, params, strict=True)]

    def _stepper(self, part: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step_now(param: torch.Tensor) -> None:
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
            part.step()
            param.grad = None  # the memory this option exists to save
        return step_now

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """Nothing left to do: each parameter stepped when its gradient was ready."""
        if closure is not None:
            raise ValueError("the fused backward pass steps during backward(); it takes no closure")

    def state_dict(self) -> dict[str, Any]:
        return {"fused_parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("fused_parts")
        if parts is None or len(parts) != len(self.parts):
            found = "a whole-model optimizer's state" if parts is None else f"{len(parts)} parameters' states"
            raise ValueError(f"the fused backward pass has {len(self.parts)} parameters' optimizers, and the saved "
                             f"state is {found}")
        for part, state in zip(self.parts, parts, strict=True):
            part.load_state_dict(state)

    def remove_hooks(self) -> None:
        """Detach the hooks (the parameters step with another optimizer, or not at all, afterwards)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
