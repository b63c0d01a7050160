"""A CPU training step, or a sampling step, with glibc's malloc as it is and keeping freed memory
(``lorakit.host_memory``).

    OMP_NUM_THREADS=1 python benchmarks/host_memory_ab.py                                   # SD1.5 width, 256²
    OMP_NUM_THREADS=1 python benchmarks/host_memory_ab.py --width half --resolution 128     # the CPU tables' U-Net
    OMP_NUM_THREADS=1 python benchmarks/host_memory_ab.py --job sample --resolution 512     # denoising steps

malloc's settings hold for a whole process, so each setting runs in child processes of its own (``--repeats``
pairs, alternating), each timing two variants of ``train_step.py``'s U-Net, interleaved, and reporting the
medians of user time, system time and minor page faults per step; the parent prints them side by side.
``--job train``: the frozen floor and a LoCon step (full preset, rank 8). ``--job sample``: one denoising step
as ``lorakit sample`` runs it (a batch of 2: the prompt and the negative prompt, no autograd), of the base U-Net
and of the U-Net with that LoCon applied unmerged.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(job: str, width: str, resolution: int, steps: int, keep: bool) -> dict[str, dict[str, float]]:
    """Median user/system seconds and minor faults per step of the base U-Net and of LoCon, in this process."""
    import torch

    sys.path.insert(0, str(HERE))
    import train_step as ts

    from lorakit.host_memory import keep_freed_memory
    from lorakit.network import UniformRanks, create_network

    torch.set_num_threads(1)
    kept = keep_freed_memory() if keep else False
    config = ts.unet_config(False, width)
    batch = ts.make_batch(1 if job == "train" else 2, resolution // 8, config["cross_attention_dim"], "cpu",
                          torch.float32)
    base = ts.build_unet(config, "cpu", torch.float32)
    unet = ts.build_unet(config, "cpu", torch.float32)
    network = create_network(unet, preset="full", ranks=UniformRanks(ts.RANK, ts.ALPHA), algorithm="lora")
    if job == "train":
        params = [p for group in network.trainable_parameters().values() for p in group]
        steps_by_name = {"floor": ts.make_step(base, batch, [], nullcontext),
                         "LoCon": ts.make_step(unet, batch, params, nullcontext)}
    else:
        steps_by_name = {"floor": denoise_step(base.eval(), batch), "LoCon": denoise_step(unet.eval(), batch)}
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in steps_by_name}
    for i in range(steps + 1):
        names = list(steps_by_name) if i % 2 else list(steps_by_name)[::-1]
        for name in names:
            before = resource.getrusage(resource.RUSAGE_SELF)
            steps_by_name[name]()
            after = resource.getrusage(resource.RUSAGE_SELF)
            if i:  # the first round warms up
                samples[name].append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                                      after.ru_minflt - before.ru_minflt))
    result = {name: {key: statistics.median(s[k] for s in values) for k, key in enumerate(("user", "system",
                                                                                           "faults"))}
              for name, values in samples.items()}
    result["kept"] = {"applied": float(kept)}
    return result


def denoise_step(unet, batch):
    """One U-Net evaluation of a sampler's loop, without autograd."""
    import torch

    def step() -> None:
        with torch.inference_mode():
            unet(batch.latents, batch.timesteps, encoder_hidden_states=batch.text)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=["train", "sample"], default="train")
    parser.add_argument("--width", choices=["half", "full"], default="full")
    parser.add_argument("--resolution", type=int, default=256, help="image side; latents are 1/8")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant in each child")
    parser.add_argument("--repeats", type=int, default=2, help="child processes per setting")
    parser.add_argument("--child", choices=["keep", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.job, args.width, args.resolution, args.steps, args.child == "keep")))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    rows = []
    for repeat in range(args.repeats):
        for mode in ("default", "keep") if repeat % 2 == 0 else ("keep", "default"):
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--job", args.job, "--width", args.width,
                                   "--resolution", str(args.resolution), "--steps", str(args.steps)],
                                  capture_output=True, text=True, env=env, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((mode, repeat + 1, result))
            print(f"done: {mode}, repeat {repeat + 1}", file=sys.stderr, flush=True)
    what = "training steps, batch 1" if args.job == "train" else "denoising steps, batch 2, no autograd"
    print(f"U-Net at {args.width} width, {args.resolution}², {what}, one thread; median per step over {args.steps} "
          f"steps in each child process")
    print("| malloc | repeat | floor s (user + system) | floor faults | LoCon s (user + system) | LoCon faults "
          "| LoCon × floor |")
    print("|---|---|---|---|---|---|---|")
    for mode, repeat, r in rows:
        floor, locon = r["floor"], r["LoCon"]
        total_f, total_l = floor["user"] + floor["system"], locon["user"] + locon["system"]
        label = {"keep": "freed memory kept", "default": "as it is"}[mode]
        if (mode == "keep") != bool(r["kept"]["applied"]):
            label += " (keep_freed_memory did not apply here)"
        print(f"| {label} | {repeat} | {total_f:.3f} ({floor['user']:.3f} + {floor['system']:.3f}) | "
              f"{floor['faults']:.0f} | {total_l:.3f} ({locon['user']:.3f} + {locon['system']:.3f}) | "
              f"{locon['faults']:.0f} | {total_l / total_f:.3f} |")


if __name__ == "__main__":
    main()
