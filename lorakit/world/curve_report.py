"""Tables and plots of overfitting-curve runs (``lorakit.world.experiment``): where each early-stopping rule
puts the turning point compared with the measured overfitting onset.

``python -m lorakit.world.curve_report RUNS_DIR --markdown docs/early_stopping_table.md --plot docs/curve.png``
reads every run folder under ``RUNS_DIR`` that has a ``curve.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.earlystop import CalmRule, SecondValley
from lorakit.world.experiment import overfitting_onset, smooth, turning_epoch

RULES = {"second-valley": SecondValley(), "second-valley-0": SecondValley(prominence=0.0), "calm": CalmRule()}


@dataclass
class RunResult:
    name: str
    algorithm: str
    lr: float
    seed: int
    epochs: list[int]
    fidelity: list[float]
    alter_success: list[float]
    control: list[float]
    onset: int
    turning: dict[str, int | None]  # rule name -> turning-point epoch (None: never decided)
    found: dict[str, int | None]  # rule name -> epoch at which the rule had decided

    def at(self, epoch: int | None, series: list[float]) -> float | None:
        """The series at the scored epoch nearest ``epoch``."""
        if epoch is None:
            return None
        i = min(range(len(self.epochs)), key=lambda k: (abs(self.epochs[k] - epoch), self.epochs[k]))
        return series[i]


def _config(run_dir: Path) -> dict:
    import tomllib

    return tomllib.loads((run_dir / "config.toml").read_text())


def load_run(run_dir: Path) -> RunResult:
    rows = json.loads((run_dir / "curve.json").read_text())
    cfg = _config(run_dir)
    turning, found = {}, {}
    for name, rule in RULES.items():
        tp = turning_epoch(run_dir, rule)
        turning[name] = None if tp is None else tp["epoch"]
        found[name] = None if tp is None else tp["found_at_epoch"]
    return RunResult(
        name=run_dir.name, algorithm=cfg["network"]["algorithm"], lr=cfg["optimizer"]["learning_rate"],
        seed=cfg["training"]["seed"], epochs=[r["epoch"] for r in rows],
        fidelity=[r["fidelity"] for r in rows],
        alter_success=[r["success_by_type"].get("alter", 0.0) for r in rows],
        control=[r["controllability"] for r in rows], onset=overfitting_onset(rows), turning=turning, found=found)


def find_runs(root: Path) -> list[RunResult]:
    return [load_run(p.parent) for p in sorted(root.glob("*/curve.json"))]


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(runs: list[RunResult]) -> str:
    head = ("| run | algorithm | lr | seed | onset (epoch) | alter success at onset | second valley: TP epoch "
            "(decided) | alter success at TP | calm rule: TP epoch (decided) | alter success at TP | "
            "final epoch: fidelity / alter success |")
    lines = [head, "|" + "---|" * 11]
    for r in runs:
        sv, calm = r.turning["second-valley"], r.turning["calm"]
        lines.append(
            f"| {r.name} | {r.algorithm} | {r.lr:g} | {r.seed} | {r.onset} | {_fmt(r.at(r.onset, r.alter_success))} | "
            f"{sv if sv is not None else 'none'} ({r.found['second-valley'] or '—'}) | "
            f"{_fmt(r.at(sv, r.alter_success))} | {calm if calm is not None else 'none'} ({r.found['calm'] or '—'}) | "
            f"{_fmt(r.at(calm, r.alter_success))} | {r.fidelity[-1]:.2f} / {r.alter_success[-1]:.2f} |")
    return "\n".join(lines) + "\n"


def summary_lines(runs: list[RunResult]) -> list[str]:
    """Per rule: mean |TP - onset| in epochs, how often it fired, and alter success kept relative to the onset's."""
    out = []
    for name in RULES:
        fired = [r for r in runs if r.turning[name] is not None]
        if not fired:
            out.append(f"{name}: never fired in {len(runs)} runs")
            continue
        err = sum(abs(r.turning[name] - r.onset) for r in fired) / len(fired)
        kept = [r.at(r.turning[name], r.alter_success) / max(r.at(r.onset, r.alter_success), 1e-9) for r in fired]
        out.append(f"{name}: fired in {len(fired)}/{len(runs)} runs, mean |TP - onset| = {err:.1f} epochs, "
                   f"alter success at TP / at onset = {sum(kept) / len(kept):.2f} (mean)")
    return out


def plot_run(run: RunResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(run.epochs, run.fidelity, "o-", label="fidelity (concept drawn)")
    ax.plot(run.epochs, run.alter_success, "s-", label="alter prompts: concept + new color/position obeyed")
    ax.plot(run.epochs, smooth(run.alter_success), ":", color="C1", label="alter success, smoothed")
    ax.plot(run.epochs, run.control, "^-", label="controllability (all prompts)")
    ax.axvline(run.onset, color="k", linestyle="--", label=f"measured onset (epoch {run.onset})")
    for name, style in (("second-valley", "C3"), ("calm", "C4")):
        if run.turning[name] is not None:
            ax.axvline(run.turning[name], color=style, linestyle="-.", label=f"{name} TP (epoch {run.turning[name]})")
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{run.algorithm}, lr {run.lr:g}, seed {run.seed}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path, help="plot of the first run (or --plot-run NAME)")
    ap.add_argument("--plot-run")
    args = ap.parse_args(argv)
    runs = find_runs(args.runs)
    table = markdown_table(runs)
    print(table)
    for line in summary_lines(runs):
        print(line)
    if args.markdown:
        args.markdown.write_text(table + "\n" + "\n".join(f"- {s}" for s in summary_lines(runs)) + "\n")
    if args.plot and runs:
        chosen = next((r for r in runs if r.name == args.plot_run), runs[0])
        print("wrote", plot_run(chosen, args.plot))


if __name__ == "__main__":
    main()
