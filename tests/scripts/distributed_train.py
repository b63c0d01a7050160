"""Run by test_train_distributed.py under `accelerate launch`: train, then each rank saves its own weights.

    distributed_train.py JOB.toml OUT_DIR [count-scorer | failing-scorer | full-disk | partial-state-first]

``count-scorer`` registers test_earlystop_samples.CountingScorer as the sample scorer "count-test"; each rank
records how often it was called in its process.  ``failing-scorer`` registers one that raises when it scores;
``full-disk`` makes the main process's first checkpoint fail as on a full disk.  ``partial-state-first`` makes a
``PartialState()`` before training, as a user's script might (without a GPU it sets accelerate up for one
process until ``train()`` corrects it).
"""

import sys

import torch
from accelerate import PartialState
from safetensors.torch import save_file

import lorakit.train as train_module
from lorakit.config import load_config

captured = {}
scorer = None
if sys.argv[3:] in (["count-scorer"], ["failing-scorer"]):
    from test_earlystop_samples import CountingScorer

    from lorakit.earlystop.samples import register_sample_scorer

    class FailingScorer(CountingScorer):
        def __call__(self, images, prompts) -> float:
            raise RuntimeError("the scorer's model is missing")

    if sys.argv[3] == "count-scorer":
        scorer = CountingScorer()
        register_sample_scorer("count-test", lambda path: scorer)
    else:
        register_sample_scorer("count-test", lambda path: FailingScorer())
elif sys.argv[3:] == ["full-disk"]:
    import errno
    import os

    from lorakit.checkpoints import RunFolder

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # the launcher's RANK: a PartialState made before train() would set accelerate up for one process
    if os.environ["RANK"] == "0":
        RunFolder.save_checkpoint = no_space

elif sys.argv[3:] == ["partial-state-first"]:
    PartialState()

make_method = train_module.make_method


def capture(cfg, model, **options):
    captured["method"] = make_method(cfg, model, **options)
    return captured["method"]


train_module.make_method = capture
result = train_module.train(load_config(sys.argv[1]), progress=False)
state = PartialState()
# the process group's timeout (training.ddp_timeout), as gloo's backend holds it
group = torch.distributed.distributed_c10d._get_default_group()
timeout = group._get_backend(torch.device("cpu")).options._timeout
save_file({k: v.contiguous() for k, v in captured["method"].trained_tensors().items()},
          f"{sys.argv[2]}/rank{state.process_index}.safetensors",
          metadata={"world": str(state.num_processes), "steps": str(result.steps), "backend": str(state.backend),
                    "final_epoch": str(result.final_epoch), "stopped_early": str(result.stopped_early),
                    "scorer_calls": str(len(scorer.calls) if scorer is not None else 0),
                    "timeout": str(timeout)})
