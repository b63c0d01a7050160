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

from lorakit.config import load_config
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
    color_control: list[float]
    onset: int
    turning: dict[str, int | None]  # rule name -> turning-point epoch (None: never decided)
    found: dict[str, int | None]  # rule name -> epoch at which the rule had decided

    @property
    def fidelity_peak(self) -> int:
        """The epoch where smoothed fidelity peaks (the concept is learned best; later it degrades)."""
        smoothed = smooth(self.fidelity)
        return self.epochs[max(range(len(self.epochs)), key=lambda i: (smoothed[i], -i))]

    def at(self, epoch: int | None, series: list[float]) -> float | None:
        """The series at the scored epoch nearest ``epoch``."""
        if epoch is None:
            return None
        i = min(range(len(self.epochs)), key=lambda k: (abs(self.epochs[k] - epoch), self.epochs[k]))
        return series[i]


def load_run(run_dir: Path) -> RunResult:
    rows = json.loads((run_dir / "curve.json").read_text())
    cfg = load_config(run_dir / "config.toml")
    turning, found = {}, {}
    for name, rule in RULES.items():
        tp = turning_epoch(run_dir, rule)
        turning[name] = None if tp is None else tp["epoch"]
        found[name] = None if tp is None else tp["found_at_epoch"]
    return RunResult(
        name=run_dir.name, algorithm=cfg.network.algorithm, lr=cfg.optimizer.learning_rate,
        seed=cfg.training.seed, epochs=[r["epoch"] for r in rows],
        fidelity=[r["fidelity"] for r in rows],
        alter_success=[r["success_by_type"].get("alter", 0.0) for r in rows],
        control=[r["controllability"] for r in rows],
        color_control=[r["controllability_by_attribute"].get("color", 0.0) for r in rows],
        onset=overfitting_onset(rows), turning=turning, found=found)


def find_runs(root: Path) -> list[RunResult]:
    """Every run under ``root`` with at least one scored checkpoint (runs still training are left out)."""
    scored = [p for p in sorted(root.glob("*/curve.json")) if any(r["epoch"] >= 1 for r in json.loads(p.read_text()))]
    return [load_run(p.parent) for p in scored]


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(runs: list[RunResult]) -> str:
    head = ("| run | fidelity peak: epoch (fidelity / control) | alter-success peak: epoch (value) | "
            "second valley TP: epoch, decided at (fidelity / control) | calm rule TP: epoch, decided at "
            "(fidelity / control) | epoch 0 → last: fidelity, control |")
    lines = [head, "|" + "---|" * 6]

    def cell(r: RunResult, epoch: int | None, found: int | None = None) -> str:
        if epoch is None:
            return "never"
        when = f", {found}" if found is not None else ""
        return f"{epoch}{when} ({_fmt(r.at(epoch, r.fidelity))} / {_fmt(r.at(epoch, r.control))})"

    for r in runs:
        lines.append(
            f"| {r.algorithm} lr {r.lr:g} seed {r.seed} | {cell(r, r.fidelity_peak)} | "
            f"{r.onset} ({_fmt(r.at(r.onset, r.alter_success))}) | "
            f"{cell(r, r.turning['second-valley'], r.found['second-valley'])} | "
            f"{cell(r, r.turning['calm'], r.found['calm'])} | "
            f"{r.fidelity[0]:.2f} → {r.fidelity[-1]:.2f}, {r.control[0]:.2f} → {r.control[-1]:.2f} |")
    return "\n".join(lines) + "\n"


def summary_lines(runs: list[RunResult]) -> list[str]:
    """Per rule: mean |TP - onset| in epochs, how often it fired, and alter success kept relative to the onset's."""
    out = []
    for name in RULES:
        fired = [r for r in runs if r.turning[name] is not None]
        if not fired:
            out.append(f"{name}: never fired in {len(runs)} runs")
            continue
        err = sum(abs(r.turning[name] - r.fidelity_peak) for r in fired) / len(fired)
        early = sum(r.turning[name] < r.fidelity_peak for r in fired)
        kept = [r.at(r.turning[name], r.fidelity) / r.at(r.fidelity_peak, r.fidelity) for r in fired
                if r.at(r.fidelity_peak, r.fidelity) > 0] or [float("nan")]
        out.append(f"{name}: fired in {len(fired)}/{len(runs)} runs, {early} of them before the fidelity peak; "
                   f"mean |TP - fidelity peak| = {err:.1f} epochs; fidelity at TP / at the peak = "
                   f"{sum(kept) / len(kept):.2f} (mean)")
    return out


def plot_run(run: RunResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.plot(run.epochs, run.fidelity, "o-", label="fidelity (concept drawn)")
    ax.plot(run.epochs, run.alter_success, "s-", label="alter prompts: concept + new color/position obeyed")
    ax.plot(run.epochs, smooth(run.alter_success), ":", color="C1", label="alter success, smoothed")
    ax.plot(run.epochs, run.control, "^-", label="controllability (all prompts)")
    ax.plot(run.epochs, run.color_control, "v-", label="color obeyed (all prompts)")
    ax.axvline(run.fidelity_peak, color="k", linestyle="--", label=f"fidelity peak (epoch {run.fidelity_peak})")
    for name, style in (("second-valley", "C3"), ("calm", "C4")):
        if run.turning[name] is not None:
            ax.axvline(run.turning[name], color=style, linestyle="-.", label=f"{name} TP (epoch {run.turning[name]})")
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{run.algorithm}, lr {run.lr:g}, seed {run.seed}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
