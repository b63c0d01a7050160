"""One self-contained HTML page: image grids, metric tables, charts and the runs' settings.

Everything is inline (images and charts as base64 PNG ``data:`` URIs, CSS in a ``<style>``; no script, no
network), so the page can be mailed or archived as one file.  ``page_from_eval`` builds the page of a
``lorakit eval`` result; ``page_from_run`` the page of one training run from what its folder holds.

Every number in a table carries its exact value in ``data-value`` (what metrics.json holds), and the best value
of each column is marked (class ``best`` and a ★).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from lorakit.checkpoint_names import epoch_dir_name, step_dir_name
from lorakit.evaluate.generate import ImageJob
from lorakit.evaluate.pipeline import EvalResult
from lorakit.run_messages import count

CELL_PX = 96  # images are shown at least this wide (the built-in world's are 64 px)


@dataclass
class Grid:
    """Rows of labelled cells, one per column; a cell holds one image per seed."""

    title: str
    columns: list[str]
    rows: list[tuple[str, list[list[Image.Image]]]]
    cell_px: int = CELL_PX  # shown width of each image
    row_label: str = "prompt"  # what each row's label names


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[float | None]]]
    higher_is_better: list[bool | None]  # per column; None: no best marked
    note: str = ""
    #: text columns shown between the row label and the numbers (a run's method, say); one list per row
    info_columns: list[str] = field(default_factory=list)
    info: list[list[str]] = field(default_factory=list)


@dataclass
class Chart:
    title: str
    png: bytes


@dataclass
class Page:
    title: str
    summary: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)
    settings: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ render
def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def format_value(v: float | None) -> str:
    """How a table shows a number (4 significant digits; "—" for a missing one)."""
    return f"{v:.4g}" if _finite(v) else "—"


def best_rows(table: Table) -> list[set[int]]:
    """Per column, the row indices holding its best value (ties all marked)."""
    out: list[set[int]] = []
    for j, higher in enumerate(table.higher_is_better):
        values = [(i, row[1][j]) for i, row in enumerate(table.rows) if _finite(row[1][j])]
        if higher is None or len(values) < 2:
            out.append(set())
            continue
        target = max(v for _, v in values) if higher else min(v for _, v in values)
        out.append({i for i, v in values if v == target})
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1600px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
td.label,th.label{text-align:left}
td.best{font-weight:bold;background:#e3f4e3}
.grid td{text-align:center;vertical-align:top}.grid td.label{text-align:left;max-width:22em}
.scroll{overflow-x:auto}
.grid img{height:auto;image-rendering:pixelated;margin:1px}
.charts img{max-width:100%;margin:.3em 0}
.note{color:#666;font-size:.85em}
"""


#: in every page lorakit writes: a page that has it may be written over, any other file only when asked
GENERATOR_TAG = '<meta name="generator" content="lorakit">'


def written_by_lorakit(path: Path) -> bool:
    """Whether the file at ``path`` is a page lorakit wrote (pages from before the tag: by their title)."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return False
    return GENERATOR_TAG in head or "<title>lorakit " in head


def render_html(page: Page) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", f'<html lang="en"><head><meta charset="utf-8">{GENERATOR_TAG}',
             f"<title>{e(page.title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(page.title)}</h1>"]
    if page.summary:
        parts.append('<ul class="summary">' + "".join(f"<li>{e(s)}</li>" for s in page.summary) + "</ul>")
    for t_index, table in enumerate(page.tables):
        parts.append(f"<h2>{e(table.title)}</h2>")
        if table.note:
            parts.append(f'<p class="note">{e(table.note)}</p>')
        best = best_rows(table)
        head = "".join(f'<th data-metric="{e(c)}">{e(c)}'
                       + ("" if table.higher_is_better[j] is None else (" ↑" if table.higher_is_better[j] else " ↓"))
                       + "</th>" for j, c in enumerate(table.columns))
        info_head = "".join(f'<th class="label">{e(c)}</th>' for c in table.info_columns)
        parts.append(f'<div class="scroll"><table class="metrics" data-table="{t_index}" data-title="{e(table.title)}">'
                     f'<thead><tr><th class="label">checkpoint</th>{info_head}{head}</tr></thead><tbody>')
        for i, (label, values) in enumerate(table.rows):
            info = table.info[i] if i < len(table.info) else []
            info_cells = "".join(f'<td class="label info">{e(str(info[k]) if k < len(info) else "")}</td>'
                                 for k in range(len(table.info_columns)))
            cells = []
            for j, v in enumerate(values):
                mark = i in best[j]
                data = json.dumps(v if _finite(v) else None)
                cells.append(f'<td class="{"best" if mark else ""}" data-metric="{e(table.columns[j])}" '
                             f'data-value="{e(data)}">{format_value(v)}{" ★" if mark else ""}</td>')
            parts.append(f'<tr><td class="label" data-checkpoint="{e(label)}">{e(label)}</td>{info_cells}'
                         f'{"".join(cells)}</tr>')
        parts.append("</tbody></table></div>")
    if page.charts:
        parts.append('<h2>Charts</h2><div class="charts">')
        for chart in page.charts:
            uri = "data:image/png;base64," + base64.b64encode(chart.png).decode("ascii")
            parts.append(f'<figure><img alt="{e(chart.title)}" src="{uri}"><figcaption>{e(chart.title)}'
                         "</figcaption></figure>")
        parts.append("</div>")
    for grid in page.grids:
        parts.append(f"<h2>{e(grid.title)}</h2>")
        head = "".join(f"<th>{e(c)}</th>" for c in grid.columns)
        parts.append(f'<div class="scroll"><table class="grid"><thead><tr><th class="label">{e(grid.row_label)}</th>'
                     f"{head}</tr></thead><tbody>")
        for label, cells in grid.rows:
            img = '<img alt="{}" style="width:{}px" src="{}">'
            tds = "".join("<td>" + "".join(img.format(e(label), grid.cell_px, _png(im)) for im in cell) + "</td>"
                          for cell in cells)
            parts.append(f'<tr><td class="label">{e(label)}</td>{tds}</tr>')
        parts.append("</tbody></table></div>")
    if page.settings:
        # a row per setting, a column per run (and the evaluation): read down, not scrolled across
        parts.append("<h2>Settings</h2>")
        keys: list[str] = []
        for _, s in page.settings:
            keys.extend(k for k in s if k not in keys)
        head = "".join(f"<th>{e(name)}</th>" for name, _ in page.settings)
        parts.append(f'<div class="scroll"><table class="settings"><thead><tr><th class="label">setting</th>{head}'
                     "</tr></thead><tbody>")
        for k in keys:
            tds = "".join(f"<td>{e(str(s.get(k, '')))}</td>" for _, s in page.settings)
            parts.append(f'<tr><td class="label">{e(k)}</td>{tds}</tr>')
        parts.append("</tbody></table></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ charts
def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_charts(result: EvalResult, max_metrics: int = 8) -> list[Chart]:
    """Per prompt type, each metric against the epoch, one line per run (the base model is every run's
    epoch 0), with the run's CS-Fluctuation turning point drawn where it has one."""
    runs = [r["name"] for r in result.runs]
    points_per_run = [sum(c["run"] == r for c in result.checkpoints) for r in runs]
    has_base = any(c["kind"] == "base" for c in result.checkpoints)
    if not runs or max(points_per_run) + has_base < 2:  # a line needs two epochs
        return []
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    base = next((c["label"] for c in result.checkpoints if c["kind"] == "base"), None)
    turning = {r["name"]: r.get("turning_epoch") for r in result.runs}
    charts = []
    for group in result.groups:
        names = result.metric_names(group)[:max_metrics]
        if not names:
            continue
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for k, metric in enumerate(names):
            ax = axes[k // cols][k % cols]
            for n, run in enumerate(runs):
                points = [(c["epoch"], result.value(group, c["label"], metric)) for c in result.checkpoints
                          if c["run"] == run and c["epoch"] is not None]
                if base is not None:
                    points.insert(0, (0, result.value(group, base, metric)))
                points = [(x, y) for x, y in points if _finite(y)]
                if points:
                    ax.plot(*zip(*points, strict=True), "o-", ms=3, color=f"C{n}", label=run)
                if turning.get(run) is not None:
                    ax.axvline(turning[run], color=f"C{n}", linestyle="--", lw=1,
                               label=f"{run} CS turning point (epoch {turning[run]})")
            ax.set_title(metric, fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch", fontsize=7)
            ax.tick_params(labelsize=7)
        for k in range(len(names), rows * cols):
            axes[k // cols][k % cols].axis("off")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)))
        fig.suptitle(f"{group} prompts: metrics vs epoch", fontsize=9)
        # fixed margins: tight_layout costs seconds per figure on a busy CPU
        fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.5 / (2.4 * rows), bottom=0.5 / (2.4 * rows) + 0.25 / rows,
                            wspace=0.3, hspace=0.75)
        charts.append(Chart(f"{group} prompts: each metric against the epoch", _figure_png(fig)))
    return charts


def tradeoff_pair(result: EvalResult) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """((group, fidelity metric), (group, controllability metric)) to plot against each other, if any."""
    fid = ctl = None
    for group, prefixes in (("train", ("world.fidelity", "fidelity[")),):
        names = result.metric_names(group)
        fid = next(((group, m) for p in prefixes for m in names if m.startswith(p)), None)
    for group in ("alter", "style"):
        names = result.metric_names(group)
        ctl = ctl or next(((group, m) for p in ("world.controllability", "clip_score[") for m in names
                           if m.startswith(p)), None)
    return (fid, ctl) if fid and ctl else None


def tradeoff_chart(result: EvalResult) -> Chart | None:
    """Fidelity against controllability, every checkpoint a point, one color per run."""
    pair = tradeoff_pair(result)
    if pair is None:
        return None
    (fg, fm), (cg, cm) = pair
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[str | None, list[dict]] = {}
    base = [c for c in result.checkpoints if c["kind"] == "base"]
    for c in result.checkpoints:
        if c["run"] is not None or c["kind"] != "base":
            groups.setdefault(c["run"], []).append(c)
    for run in groups:  # every run's line starts at the base model (its epoch 0)
        if run is not None:
            groups[run] = base + groups[run]
    if not groups and base:
        groups[None] = base
    for n, (run, cs) in enumerate(groups.items()):
        pts = [(result.value(fg, c["label"], fm), result.value(cg, c["label"], cm), c) for c in cs]
        pts = [(x, y, c) for x, y, c in pts if _finite(x) and _finite(y)]
        if not pts:
            continue
        marker = "*" if run is None else "o"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, linestyle="-" if run else "", ms=6,
                color=f"C{n}", label=run or "base / files")
        for x, y, c in pts:
            text = epoch_text(c, short=True) if c["run"] or c["kind"] == "base" else c["label"]
            ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"fidelity: {fm} on {fg} prompts", fontsize=8)
    ax.set_ylabel(f"controllability: {cm} on {cg} prompts", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    steps = ", sN a step checkpoint's step" if any(c.get("step") is not None for c in result.checkpoints) else ""
    return Chart(f"fidelity ({fm}, {fg}) against controllability ({cm}, {cg}); labels are epochs{steps}",
                 _figure_png(fig))


# ------------------------------------------------------------------------------------------------ pages
#: the metric a person compares checkpoints by first, per prompt type (the first name present wins; a prefix
#: ending in "[" matches any extractor); the agnostic prompts have two: what the base model keeps, and the leak
KEY_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train", ("world.fidelity", "fidelity[")),
    ("trigger", ("world.fidelity", "fidelity[")),
    ("alter", ("world.controllability", "clip_score[", "prompt_acc[")),
    ("style", ("world.controllability", "clip_score[", "style_loss[")),
    ("agnostic", ("world.preservation", "style_loss[")),
    ("agnostic", ("world.leak", "leak[")),
)


def key_metrics(result: EvalResult) -> list[tuple[str, str]]:
    """(group, metric) of each prompt type's key metric that the result has (KEY_METRICS)."""
    out: list[tuple[str, str]] = []
    for group, prefixes in KEY_METRICS:
        names = result.metric_names(group)
        for prefix in prefixes:
            match = next((m for m in names if m == prefix or (prefix.endswith("[") and m.startswith(prefix))), None)
            if match and (group, match) not in out:
                out.append((group, match))
                break
    return out


def checkpoint_method(result: EvalResult, checkpoint: Mapping[str, Any]) -> str:
    """What a checkpoint is, in a few words: "base model", the run's algorithm ("lora", "loha", ...), "native",
    "textual inversion", "pivotal tuning (lora)"; a loose file's kind ("adapter", "embedding", "fine-tuned
    model")."""
    if checkpoint.get("kind") == "base":
        return "base model"
    settings = next((r["settings"] for r in result.runs if r["name"] == checkpoint.get("run")), None)
    if settings is None:  # a loose file: what it holds
        kind = str(checkpoint.get("kind") or "")
        return {"pivotal": "pivotal tuning", "model": "fine-tuned model"}.get(kind, kind)
    method, algorithm = settings.get("method", "adapter"), str(settings.get("algorithm", "adapter"))
    if method == "ti":
        return "textual inversion"
    if method == "pivotal":
        return f"pivotal tuning ({algorithm})"
    return algorithm if method == "adapter" else str(method)


def epoch_text(checkpoint: Mapping[str, Any], short: bool = False) -> str:
    """A checkpoint's place in its run: "3", a step checkpoint's "1.5 (step 6)" ("s6" when ``short``), "" when
    unknown."""
    epoch, step = checkpoint.get("epoch"), checkpoint.get("step")
    if step is not None:
        return f"s{step}" if short else (f"step {step}" if epoch is None else f"{epoch:g} (step {step})")
    return "" if epoch is None else f"{epoch:g}"


def ranking_table(result: EvalResult) -> Table | None:
    """The checkpoints compared, best first, in one table (the paper's Table 1 for these runs): method, epoch,
    each prompt type's key metric, the harmonic and arithmetic means of the rank-normalised scores, the rank."""
    if len(result.harmonic_mean) < 2:
        return None
    info = {c["label"]: c for c in result.checkpoints}
    keys = key_metrics(result)
    order = result.ranking()
    rows, texts = [], []
    for rank, lb in enumerate(order, start=1):
        c = info[lb]
        rows.append((lb, [result.value(g, lb, m) for g, m in keys]
                     + [result.harmonic_mean.get(lb), result.mean_score.get(lb), float(rank)]))
        texts.append([checkpoint_method(result, c), epoch_text(c)])
    columns = [f"{m} ({g})" for g, m in keys] + ["harmonic mean", "arithmetic mean", "rank"]
    return Table("ranking: the checkpoints compared, best first", columns, rows,
                 [result.directions.get(m) for _, m in keys] + [True, True, False],
                 note="rank: by the harmonic mean of every metric below, each rank-normalised to [0, 1] across the "
                 "checkpoints compared (best 1), per prompt type (the paper's rule); a checkpoint worst on any one "
                 "metric has harmonic mean 0, and the arithmetic mean of the same scores breaks such ties. The "
                 "metric columns are each prompt type's key metric; every metric is in the tables below",
                 info_columns=["method", "epoch"], info=texts)


def page_from_eval(result: EvalResult, jobs: Sequence[ImageJob], images: Mapping[str, Sequence[Image.Image]],
                   title: str = "lorakit eval", summary: Sequence[str] = ()) -> Page:
    """The page of a ``lorakit eval`` result: tables per prompt type (and pooled), the harmonic-mean ranking,
    charts, one image grid per prompt type (rows prompts, columns checkpoints, one image per seed)."""
    labels = [c["label"] for c in result.checkpoints]
    page = Page(title=title, summary=list(summary))
    if (ranking := ranking_table(result)) is not None:
        page.tables.append(ranking)
    for group in result.groups:
        names = result.metric_names(group)
        rows = [(lb, [result.value(group, lb, m) for m in names]) for lb in labels]
        page.tables.append(Table(f"metrics: {group} prompts" if group != "all" else "metrics: all prompts pooled",
                                 names, rows, [result.directions.get(m) for m in names]))
    if result.importance:
        features: list[str] = []
        for values in result.importance.values():
            features.extend(f for f in values if f not in features)
        rows = [(key, [values.get(f) for f in features]) for key, values in result.importance.items()]
        page.tables.append(Table("what drives each metric: mean |SHAP value| per setting", features, rows,
                                 [True] * len(features), note="a CatBoost regressor predicts each metric from the "
                                 "run's settings and the epoch (the paper's analysis); larger means the setting "
                                 "moves the metric more; ★ marks the largest per setting"))
    page.charts = metric_charts(result)
    if (chart := tradeoff_chart(result)) is not None:
        page.charts.append(chart)
    by_type: dict[str, dict[int, list[int]]] = {}
    for i, job in enumerate(jobs):
        by_type.setdefault(job.prompt.type, {}).setdefault(job.prompt_index, []).append(i)
    for t, prompts in by_type.items():
        rows = []
        for _, idx in prompts.items():
            text = jobs[idx[0]].prompt.text
            rows.append((text, [[images[lb][i] for i in idx] for lb in labels]))
        page.grids.append(Grid(f"images: {t} prompts (one image per seed)", labels, rows))
    page.settings = [(r["name"], r["settings"] | {"turning point epoch": r.get("turning_epoch")})
                     for r in result.runs]
    page.settings.append(("evaluation", {k: v for k, v in result.setup.items() if not isinstance(v, dict | list)}))
    return page


def turning_point_rank(result: EvalResult, run_name: str, epoch: int | None) -> tuple[int, int] | None:
    """Where the run's turning-point checkpoint ranks among the checkpoints an eval compared: (rank, of how
    many); None when the eval did not measure that epoch of that run (or ranked nothing)."""
    if epoch is None or len(result.harmonic_mean) < 2:
        return None
    order = result.ranking()
    label = next((c["label"] for c in result.checkpoints if c.get("run") == run_name and c.get("epoch") == epoch
                  and c.get("step") is None), None)
    return None if label is None else (order.index(label) + 1, len(order))


def changed_since_eval(result: EvalResult, run_dir: Path, run_name: str) -> list[str]:
    """Labels of the run's checkpoints the eval measured whose files have changed since (the run was trained again
    into the same folder): its numbers are not this run's.  A checkpoint no longer there (a native run keeps
    only the ones it may hand back) cannot be told and is not listed."""
    from lorakit.evaluate.checkpoints import checkpoint_hash

    changed = []
    for c in result.checkpoints:
        if c.get("run") != run_name or (c.get("epoch") is None and c.get("step") is None):
            continue
        folder = step_dir_name(c["step"]) if c.get("step") is not None else epoch_dir_name(int(c["epoch"]))
        file = run_dir / "checkpoints" / folder / "trained.safetensors"
        if file.is_file() and checkpoint_hash(file, c.get("token")) != c.get("hash"):
            changed.append(str(c["label"]))
    return changed


def add_eval_result(page: Page, result: EvalResult, where: str, run_name: str, turning_epoch: int | None,
                    label: str = "", position: int = 0) -> None:
    """Put what ``lorakit eval`` measured on a run's checkpoints on the run's page: the best checkpoint and where
    the turning point ranks (the early stop judged), the ranking table (at ``position`` among the page's tables:
    first), the metric charts.  ``label``: put before the table's and charts' titles, when the page shows several
    evals.  The eval's own page (``where``/report.html) keeps the per-prompt-type tables and the images."""
    from lorakit.evaluate.pipeline import summary_lines

    def labelled(item):
        return replace(item, title=f"{label}: {item.title}") if label else item

    best = summary_lines(result)[:1]
    page.summary.append(f"measured by lorakit eval ({where}, its page with the images: {where}/report.html): "
                        + (best[0] if best else "one checkpoint, nothing ranked"))
    if (placed := turning_point_rank(result, run_name, turning_epoch)) is not None:
        page.summary.append(f"the turning point's checkpoint (epoch {turning_epoch}) ranks {placed[0]} of "
                            f"{placed[1]} there")
    elif turning_epoch is not None:
        page.summary.append(f"the eval did not measure the turning point's checkpoint (epoch {turning_epoch})")
    if (ranking := ranking_table(result)) is not None:
        page.tables.insert(position, labelled(ranking))
    page.charts.extend(labelled(chart) for chart in metric_charts(result))
    if (chart := tradeoff_chart(result)) is not None:
        page.charts.append(labelled(chart))


def page_from_run(run_dir: str | Path) -> Page:
    """The page of one training run from its folder alone: sample grids per epoch, loss and CS per epoch,
    the CS-Fluctuation chart with its turning point, the run's settings and summary.  Generates nothing."""
    from lorakit.evaluate.checkpoints import (
        CheckpointError,
        _read_json,
        _read_toml,
        is_run_folder,
        not_a_run,
        run_settings,
        summary_turning_point,
    )

    run = Path(run_dir)
    if not is_run_folder(run):
        raise CheckpointError(not_a_run(run, "report"))
    settings = run_settings(_read_toml(run / "config.toml"))
    page = Page(title=f"lorakit report: {run.resolve().name}")
    try:
        summary = _read_json(run / "summary.json") or {}
        unreadable = None
    except CheckpointError as err:  # the page shows what else the folder holds; the line says what is missing
        summary, unreadable = {}, str(err)
    if unreadable:
        page.summary.append(f"the run's summary is not shown: {unreadable}")
    elif summary:
        tp = summary_turning_point(summary)
        epochs = summary.get("epochs_run")
        page.summary.append(f"{summary.get('method', '?')}: {summary.get('steps', '?')} steps in "
                            f"{count(epochs, 'epoch') if isinstance(epochs, int) else '? epochs'}, "
                            f"{summary.get('seconds', '?')} s; result = "
                            f"epoch {summary.get('final_epoch', '?')}")
        if tp:
            page.summary.append(f"early-stopping turning point at step {tp.get('step')} (epoch {tp.get('epoch')})"
                                + (", training stopped there" if summary.get("stopped_early") else ", report only"))
        elif summary.get("undecided"):  # why the rule did not stop the run
            page.summary.append(f"early stopping did not decide: {summary['undecided']}")
        validation = summary.get("validation") or {}
        if isinstance(validation.get("lowest"), dict):
            low = validation["lowest"]
            where = "before training (the base model)" if low.get("step") == 0 else \
                f"at step {low.get('step')} (epoch {low.get('epoch')})"
            base = f"base model {validation['base_model']}, " if validation.get("base_model") is not None else ""
            page.summary.append(f"validation loss on {validation.get('held_out_images', '?')} held-out images: "
                                f"{base}lowest {low.get('val_loss')} {where}")
    else:
        page.summary.append("no summary.json: the run has not finished (or was interrupted)")
    # loss and CS per epoch from the step log
    per_epoch: dict[int, dict[str, list[float]]] = {}
    log = run / "log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if not any(_finite(rec.get(key)) for key in ("loss", "cs", "val_loss")):
                continue  # not a training step (a sample score of the sample stop)
            slot = per_epoch.setdefault(int(rec.get("epoch", 0)), {"loss": [], "cs": [], "val_loss": []})
            for key in ("loss", "cs", "val_loss"):
                if _finite(rec.get(key)):
                    slot[key].append(float(rec[key]))
    if per_epoch:
        # the held-out images' loss (data.validation_split), when the run measured it: its last value per epoch
        validated = any(v["val_loss"] for v in per_epoch.values())
        watched = any(v["cs"] for v in per_epoch.values())  # textual inversion has no adapter weights to read
        rows = [(f"epoch {e}", [sum(v["loss"]) / len(v["loss"]) if v["loss"] else None]
                 + ([v["cs"][-1] if v["cs"] else None] if watched else []) + [float(len(v["loss"]))]
                 + ([v["val_loss"][-1] if v["val_loss"] else None] if validated else []))
                for e, v in sorted(per_epoch.items())]
        page.tables.append(Table("training: per epoch", ["mean loss"] + (["CS at epoch end"] if watched else [])
                                 + ["steps"] + (["validation loss"] if validated else []), rows,
                                 [False] + ([None] if watched else []) + [None] + ([False] if validated else [])))
    if len(per_epoch) >= 2:  # a line needs two epochs (one was a lone dot on ticks of 0.945 to 1.050)
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 3))
        epochs = [e for e, _ in sorted(per_epoch.items())]
        ax.plot(epochs, [r[1][0] for r in rows], "o-", label="mean loss")
        if validated:  # the last column
            points = [(e, r[1][-1]) for e, r in zip(epochs, rows, strict=True) if r[1][-1] is not None]
            ax.plot([e for e, _ in points], [v for _, v in points], "s-", color="C2",
                    label="validation loss (held-out images)")
        if tp := summary_turning_point(summary):
            ax.axvline(tp.get("epoch"), color="C3", linestyle="--", label=f"turning point (epoch {tp.get('epoch')})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole: no tick at 1.2
        ax.legend(fontsize=7)
        fig.tight_layout()
        page.charts.append(Chart("mean training loss per epoch" + (", and the validation loss" if validated else ""),
                                 _figure_png(fig)))
    if (run / "cs_fluctuation.png").is_file():
        page.charts.append(Chart("CS-Fluctuation (saved by the trainer)", (run / "cs_fluctuation.png").read_bytes()))
    samples = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
    if samples:
        rows, width = [], 0
        for s in samples:
            with Image.open(s) as im:
                rows.append((s.stem, [[im.convert("RGB")]]))
                width = max(width, im.width)
        page.grids.append(Grid("samples (each grid: the run's sample prompts)", ["sample grid"], rows,
                               cell_px=min(2 * width, 1200), row_label="when"))
    page.settings = [(run.resolve().name, settings)]
    return page
