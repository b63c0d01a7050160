"""Wall time of the built-in job as a whole: ``lorakit train`` with no arguments, in a fresh folder.

    python benchmarks/builtin_job.py                  # prints the machine, the wall and CPU time, the summary
    python benchmarks/builtin_job.py --keep --json built-in.json

The job runs as a child process (``python -m lorakit.cli train``) with the working directory set to a new
temporary folder, so its output (``output/train-<time>`` and the rendered dataset beside it) lands there and
nothing of an earlier run is reused.  ``--threads`` sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for the child
(default: leave the environment alone, as a user would).  The load average before and after is printed: on a
shared machine the wall time says little unless the machine was otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        info["cpu"] = platform.processor()
    return info


def load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the job (default: as set)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (its path is printed)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurement here")
    parser.add_argument("extra", nargs="*", help="arguments after -- go to `lorakit train` (default: none)")
    args = parser.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="lorakit-builtin-"))
    cmd = [sys.executable, "-m", "lorakit.cli", "train", *args.extra]
    info = machine()
    print(f"machine: {info['cpu']} ({info['cpu_count']} cores), {info['platform']}, torch {info['torch']}"
          + (f", {info['cuda']}" if info["cuda"] else ""))
    print(f"running: {' '.join(cmd[2:])} in {folder}", flush=True)
    before, children = load(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - children.ru_utime, after.ru_stime - children.ru_stime
    cpu = user + system
    peak_mib = after.ru_maxrss / 1024  # KiB on Linux; the largest child so far, and this is the only one
    result = {"machine": info, "command": "lorakit " + " ".join(cmd[3:]), "returncode": done.returncode,
              "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "user_s": round(user, 1),
              "system_s": round(system, 1), "peak_rss_mib": round(peak_mib),
              "keep_freed_memory": env.get("LORAKIT_KEEP_FREED_MEMORY", "(default: on)"),
              "load_before": before, "load_after": load(),
              "threads": env.get("OMP_NUM_THREADS"), "stdout_tail": done.stdout[-2000:]}
    print(done.stdout[-2000:])
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s (user {user:.1f}, system {system:.1f}; child process), peak RSS "
          f"{peak_mib:.0f} MiB, LORAKIT_KEEP_FREED_MEMORY={result['keep_freed_memory']}, load average before {before} "
          f"after {result['load_after']}, OMP_NUM_THREADS={result['threads']}, exit {done.returncode}")
    if args.keep:
        print(f"kept: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main()["returncode"])
