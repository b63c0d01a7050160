"""A grid of overfitting-curve runs (``lorakit world experiment``), run in parallel and resumable, then the table.

``lorakit world grid --out runs/grid`` trains and scores every combination of ``--concepts``, ``--algorithms``,
``--lrs`` and ``--seeds`` (default: the star and the heart × LoRA, LoCon, LoHa, LoKr × lr 2e-3 and 8e-3 × seeds 0
and 1 = 32 runs), ``--jobs`` at a time, each in its own process with one thread (two torch processes with two
threads each on two cores slow each other down 8x). A run that finished is marked ``grid_done`` and skipped; one
that was interrupted continues where it stopped (its training resumes, its scored epochs are kept). At the end the
table of every run under ``--out`` is rebuilt (``curve-report``), so the same command both fills the grid and
refreshes it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorakit.commands.arg_types import comma_list, non_negative_int, positive_float, positive_int
from lorakit.world.concept import CONCEPTS, PROMPT_TYPES, ZKZ, get_concept
from lorakit.world.onset import CHANGES

#: the issue's grid names LoRA and LoCon apart: LoRA on attention and MLP linears only, LoCon also on convs
ALGORITHMS = {"lora": ("lora", "kohya"), "locon": ("lora", "full"), "loha": ("loha", "full"),
              "lokr": ("lokr", "full")}
DONE = "grid_done"


@dataclass(frozen=True)
class GridRun:
    name: str
    folder: Path
    argv: tuple[str, ...]  # arguments of ``lorakit world experiment``

    @property
    def done(self) -> bool:
        return (self.folder / DONE).exists()

    @property
    def log(self) -> Path:
        # beside the run folder, not in it: the trainer refuses to start in a folder that holds files it did
        # not write
        return self.folder.parent / "logs" / f"{self.name}.log"


def plan(out: Path, algorithms: Sequence[str], lrs: Sequence[float], seeds: Sequence[int], *, epochs: int,
         seeds_per_prompt: int, types: str, changes: str, model: str | None = None,
         concepts: Sequence[str] = (ZKZ.name,)) -> list[GridRun]:
    """Every combination, named ``<algorithm>_lr<lr>_s<seed>`` for the first concept and
    ``<concept>_<algorithm>_lr<lr>_s<seed>`` for the others (the names ``curve-report`` shows)."""
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {', '.join(unknown)}; the grid knows {', '.join(ALGORITHMS)}")
    for name in concepts:
        get_concept(name)  # an unknown concept is an error before anything runs
    runs = []
    for concept_name in concepts:
        prefix = "" if concept_name == ZKZ.name else f"{concept_name}_"
        for algorithm in algorithms:
            algo, preset = ALGORITHMS[algorithm]
            for lr in lrs:
                for seed in seeds:
                    name = f"{prefix}{algorithm}_lr{lr:g}_s{seed}"
                    folder = out / name
                    argv = ["--out", str(folder), "--concept", concept_name, "--algorithm", algo, "--preset",
                            preset, "--lr", f"{lr:g}", "--seed", str(seed), "--epochs", str(epochs),
                            "--seeds-per-prompt", str(seeds_per_prompt), "--types", types, "--changes", changes,
                            "--score-every", "1"]
                    if model:
                        argv += ["--model", model]
                    runs.append(GridRun(name, folder, tuple(argv)))
    return runs


def rescoring(runs: Sequence[GridRun]) -> list[GridRun]:
    """The finished runs, each to be scored again from its cached images (unfinished ones are left alone: they
    score themselves when they finish)."""
    return [GridRun(r.name, r.folder, (*r.argv, "--rescore")) for r in runs if r.done]


#: the spectral sizes of a run's checkpoints (``update_sizes.checkpoint_spectral_sizes``): kept, since the
#: checkpoints they are read from are not
SPECTRAL_CACHE = "spectral_sizes.json"
#: what ``curve-report`` reads of a run: enough to rebuild the table and replay every rule without the
#: checkpoints, sampled images or image cache (a few hundred KB per run instead of tens of MB)
RECORD_FILES = ("config.toml", "curve.json", "cs_history.json", SPECTRAL_CACHE, DONE)


def archive(runs: Sequence[GridRun], dest: Path) -> list[Path]:
    """Copy the records of every finished run (``RECORD_FILES``) to ``dest/<run>/``, e.g. to commit them so that
    a later session judges a new rule on the same runs; a run already archived is brought up to date.
    Returns the archived run folders."""
    from lorakit.atomic import atomic_write_bytes

    archived = []
    for run in runs:
        if not run.done:
            continue
        target = dest / run.name
        for name in RECORD_FILES:
            source = run.folder / name
            if source.exists():
                atomic_write_bytes(target / name, source.read_bytes())
        archived.append(target)
    return archived


def experiment_command(run: GridRun) -> list[str]:
    # through the command line (not ``-m lorakit.world.experiment``): it quiets the libraries before importing them
    return [sys.executable, "-m", "lorakit.cli", "world", "experiment", *run.argv]


def run_all(runs: Sequence[GridRun], jobs: int = 2,
            command: Callable[[GridRun], list[str]] = experiment_command,
            report: Callable[[str], None] = print, redo_done: bool = False,
            on_done: Callable[[GridRun], None] | None = None) -> list[GridRun]:
    """Run every unfinished run (every run with ``redo_done``), ``jobs`` at a time, one thread each; returns the
    runs that failed (their log is ``<out>/logs/<run>.log``). ``on_done`` is called with each run as soon as it
    finishes (e.g. to archive its records before a long grid is interrupted)."""
    pending = [r for r in runs if redo_done or not r.done]
    skipped = len(runs) - len(pending)
    if skipped:
        report(f"{skipped} of {len(runs)} runs already done, skipped")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[GridRun, subprocess.Popen, object]] = []
    failed: list[GridRun] = []
    finished = 0
    while pending or running:
        while pending and len(running) < max(1, jobs):
            run = pending.pop(0)
            run.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.log, "a")  # noqa: SIM115  (closed when the run ends)
            running.append((run, subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=env), log))
            report(f"started {run.name}")
        time.sleep(0.2)
        for item in list(running):
            run, process, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            finished += 1
            if process.returncode == 0:
                (run.folder / DONE).write_text("")
                report(f"finished {run.name} ({finished + skipped}/{len(runs)})")
                if on_done is not None:
                    on_done(run)
            else:
                failed.append(run)
                report(f"FAILED {run.name} (exit {process.returncode}); see {run.log}")
    return failed


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, required=True, help="folder of the grid's run folders")
    ap.add_argument("--concepts", default="zkz,vlx", type=comma_list(choices=list(CONCEPTS)),
                    help="zkz: the star every rule was designed on; vlx: the heart, kept for judging")
    ap.add_argument("--algorithms", default="lora,locon,loha,lokr", type=comma_list(choices=list(ALGORITHMS)),
                    help="comma-separated")
    ap.add_argument("--lrs", default="2e-3,8e-3", type=comma_list(positive_float),
                    help="one that does not break the model in 20 epochs, one that does")
    ap.add_argument("--seeds", default="0,1", type=comma_list(non_negative_int), help="training seeds, comma-separated")
    ap.add_argument("--epochs", type=positive_int, default=20, help="epochs of every run")
    ap.add_argument("--seeds-per-prompt", type=positive_int, default=3, help="images per prompt and epoch")
    ap.add_argument("--types", default="alter,style,agnostic", type=comma_list(choices=PROMPT_TYPES),
                    help="prompt types scored every epoch (the onset's, and agnostic for concept leak)")
    ap.add_argument("--changes", default="color,position,background", type=comma_list(choices=CHANGES),
                    help="what the alter prompts change, comma-separated")
    ap.add_argument("--model", default=None, help="base model (default: the built-in one)")
    ap.add_argument("--jobs", type=positive_int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--rescore", action="store_true",
                    help="score every run's epochs again from its cached images (no training, no sampling); "
                         "for a new reader or outcome")
    ap.add_argument("--markdown", type=Path, help="write the table here (default: <out>/table.md)")
    ap.add_argument("--plot", type=Path, help="plot of the first run")
    ap.add_argument("--archive", type=Path,
                    help="also copy each finished run's records (config, scores, CS history) here: what the "
                         "table needs, small enough to commit")


def report_args(out: Path, markdown: Path | None, plot: Path | None, changes: str) -> argparse.Namespace:
    """The table's options, parsed by ``curve-report``'s own parser (so every option it reads has its default)."""
    from lorakit.world import curve_report

    parser = argparse.ArgumentParser()
    curve_report.add_arguments(parser)
    argv = [str(out), "--markdown", str(markdown or out / "table.md"), "--changes", changes,
            "--budget-sweep", "0.05,0.075,0.1,0.15,0.2"]
    return parser.parse_args(argv + (["--plot", str(plot)] if plot else []))


def run(args: argparse.Namespace) -> int:
    from lorakit.world import curve_report

    runs = plan(args.out, [a.strip() for a in args.algorithms.split(",")],
                [float(x) for x in args.lrs.split(",")], [int(x) for x in args.seeds.split(",")],
                epochs=args.epochs, seeds_per_prompt=args.seeds_per_prompt, types=args.types,
                changes=args.changes, model=args.model, concepts=[c.strip() for c in args.concepts.split(",")])
    if args.rescore:
        runs = rescoring(runs)
    # archive each run as it finishes, not at the end: a grid of hours is often stopped before its end
    on_done = (lambda finished: archive([finished], args.archive)) if args.archive else None
    failed = run_all(runs, args.jobs, redo_done=args.rescore, on_done=on_done)
    report = report_args(args.out, args.markdown, args.plot, args.changes)
    curve_report.run(report)
    done = sum(r.done for r in runs)
    print(f"grid: {done}/{len(runs)} runs done, {len(failed)} failed; table: {report.markdown}")
    if args.archive:
        archived = archive(runs, args.archive)
        print(f"archived the records of {len(archived)} finished runs in {args.archive}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.world.grid``: ``lorakit world grid`` itself (its messages, exit code)."""
    from lorakit.commands.world import run_as_script

    return run_as_script("grid", argv)


if __name__ == "__main__":
    raise SystemExit(main())
