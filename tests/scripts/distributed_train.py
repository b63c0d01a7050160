"""Run by test_train_distributed.py under `accelerate launch`: train, then each rank saves its own weights."""

import sys

from accelerate import PartialState
from safetensors.torch import save_file

import lorakit.train as train_module
from lorakit.config import load_config

captured = {}
make_method = train_module.make_method


def capture(cfg, model):
    captured["method"] = make_method(cfg, model)
    return captured["method"]


train_module.make_method = capture
result = train_module.train(load_config(sys.argv[1]), progress=False)
state = PartialState()
save_file({k: v.contiguous() for k, v in captured["method"].trained_tensors().items()},
          f"{sys.argv[2]}/rank{state.process_index}.safetensors",
          metadata={"world": str(state.num_processes), "steps": str(result.steps), "backend": str(state.backend)})
