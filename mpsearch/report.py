"""Tables (pandas -> CSV, Markdown, LaTeX) and figures (matplotlib, Agg) from search results.

This sits at the edge: it reads results, and nothing in the core imports it.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .core.pareto import hypervolume_curve
from .core.space import SearchSpace
from .files import json_text, write_atomic
from .search import SearchResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trials_frame(records, space: SearchSpace, full_precision_bytes: int, budget=None) -> pd.DataFrame:
    """One row per evaluation: size, average bits, metric (empty when it failed, with the error), cost,
    and the bits of every decision."""
    rows = []
    for t in records:
        row = {"number": t.number, "strategy": t.strategy, "seed": t.seed, "size_bytes": t.size_bytes,
               "avg_bits": round(t.avg_bits, 6), "compression_ratio": round(full_precision_bytes / t.size_bytes, 6),
               "metric": t.metric, "wall_s": round(t.wall_s, 6), "resumed": t.resumed, "cached": t.cached,
               "error": t.error or ""}
        if budget is not None:
            row["feasible"] = budget.admits(t)
        for d, bits in zip(space.decisions, t.candidate):
            row[f"bits:{d.name}"] = bits
        rows.append(row)
    return pd.DataFrame(rows)


def front_trials(result: SearchResult) -> list:
    return list(result.front.points)


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    return write_atomic(path, df.to_csv(index=False))


METRIC_LABELS = {"neg_kl": "-KL to full precision (higher is better)",
                 "neg_mse": "-MSE to full precision (higher is better)",
                 "neg_token_kl": "-KL per token to full precision (higher is better)",
                 "neg_perplexity": "-perplexity (higher is better)",
                 "cosine": "cosine to full precision", "sqnr": "SQNR to full precision (dB)"}


def fmt_metric(v, digits: int = 4) -> str:
    """A number for a table or a line of text: fixed decimals, or 3 significant digits when that small,
    "n/a" for what is not a finite number (a plan may hold null, a failed evaluation NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3e}" if v != 0 and abs(v) < 10.0 ** -(digits - 1) else f"{v + 0.0:.{digits}f}"  # + 0.0: no -0.0000


def metric_label(metric_name: str) -> str:
    """The oriented quantity a metric value is, for axes and tables."""
    return METRIC_LABELS.get(metric_name, metric_name)


def plot_front(path: Path, fronts: dict[str, Sequence], full_precision_bytes: int, metric_name: str,
               reference_metric: float | None = None, uniform: Sequence | None = None, all_points: Sequence | None = None,
               budget_bytes: int | None = None, title: str = "") -> Path:
    """Size against quality: one step line per front, grey dots for every trial, uniform points marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_points = [p for p in all_points or () if p.ok]
    if all_points:
        ax.scatter([p.size_bytes / 1e6 for p in all_points], [p.metric for p in all_points], s=6, c="0.75",
                   label="evaluated", zorder=1)
    for i, (label, pts) in enumerate(fronts.items()):
        pts = sorted(pts, key=lambda p: p.size_bytes)
        if not pts:
            continue
        ax.step([p.size_bytes / 1e6 for p in pts], [p.metric for p in pts], where="post", marker="o", ms=3,
                label=f"{label} front", zorder=3 + i)
    if uniform:
        ax.scatter([p.size_bytes / 1e6 for p in uniform], [p.metric for p in uniform], marker="x", s=50, c="k",
                   label="uniform", zorder=10)
        for p in uniform:
            ax.annotate(f"W{int(round(p.avg_bits))}", (p.size_bytes / 1e6, p.metric), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    if reference_metric is not None:
        ax.axhline(reference_metric, ls=":", c="k", lw=0.8, label="full precision")
    if budget_bytes is not None:
        ax.axvline(budget_bytes / 1e6, ls="--", c="r", lw=0.8, label="budget")
    return _finish(plt, fig, ax, path, "size (MB)", metric_label(metric_name),
                   title or f"Pareto front (full precision {full_precision_bytes / 1e6:.3g} MB)")


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(plt, fig, path, dpi=110)
    return path


def save_figure(plt, fig, path: Path, dpi: int) -> None:
    """Render to memory, then write the file whole (a crash never leaves half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def hv_curve(result: SearchResult) -> list[float]:
    return hypervolume_curve(result.trials, result.full_precision_bytes, result.reference_metric, result.metric_name)


def plot_hypervolume(path: Path, curves: dict[str, list[list[float]]], title: str = "") -> Path:
    """Hypervolume against evaluations: the median over seeds per strategy, with the min-max band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in curves.items():
        n = max(len(r) for r in runs)
        arr = np.array([r + [r[-1]] * (n - len(r)) if r else [0.0] * n for r in runs], dtype=float)
        x = np.arange(1, n + 1)
        ax.plot(x, np.median(arr, axis=0), label=label)
        if len(runs) > 1:
            ax.fill_between(x, arr.min(axis=0), arr.max(axis=0), alpha=0.15)
    return _finish(plt, fig, ax, path, "evaluations", "hypervolume (normalised size x quality)",
                   title or "Hypervolume against evaluations (median, min-max over seeds)")


def evals_to_reach(curve: Sequence[float], target: float) -> float:
    for i, v in enumerate(curve):
        if v >= target:
            return i + 1
    return math.nan


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "—"
    m = float(np.mean(v))
    s = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std per strategy of the per-run numbers in ``runs`` (one row per strategy x seed)."""
    rows = []
    for strategy, g in runs.groupby("strategy", sort=False):
        row = {"strategy": strategy, "runs": len(g),
               "hypervolume": mean_std(g["hypervolume"].tolist()),
               "best_metric": mean_std(g["best_metric"].tolist()) if "best_metric" in g else "—",
               "best_validation_metric": mean_std(g["best_validation_metric"].tolist()) if "best_validation_metric" in g else "—",
               "evals_to_99pct_hv": mean_std(g["evals_to_99pct_hv"].tolist(), 1),
               "reached_99pct_hv": f"{int(g['evals_to_99pct_hv'].notna().sum())}/{len(g)}",
               "wall_s": mean_std(g["wall_s"].tolist(), 2),
               "cost_s": mean_std(g["cost_s"].tolist(), 2)}
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def latex_table(df: pd.DataFrame, caption: str = "") -> str:
    cols = [str(c).replace("_", r"\_") for c in df.columns]
    body = [" & ".join(_cell(v).replace("±", r"$\pm$").replace("_", r"\_").replace("%", r"\%") for v in row) + r" \\"
            for row in df.itertuples(index=False)]
    out = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" + "r" * (len(cols) - 1) + "}", r"\toprule",
           " & ".join(cols) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(r"\caption{" + caption + "}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}"
    return str(v)


def write_run(res, out: Path, *, title: str = "", summary_extra: dict | None = None) -> dict:
    """The run directory: trials.csv, front.csv, front.png, hypervolume.png, plan.json, plan.png and
    summary.json (written last, listing the files). Every file is written whole or not at all, and a
    plan.json left by an earlier run into the same folder is removed when this run has none.
    Returns the summary."""
    out = Path(out)
    r = res.search
    budget = r.budget
    write_csv(trials_frame(res.evaluated, res.space, r.full_precision_bytes, budget), out / "trials.csv")
    front = res.front.points
    write_csv(trials_frame(front, res.space, r.full_precision_bytes, budget), out / "front.csv")
    plot_front(out / "front.png", {"run": front}, r.full_precision_bytes, r.metric_name, r.reference_metric,
               uniform=res.baselines, all_points=res.evaluated, budget_bytes=budget.max_bytes if budget else None,
               title=title or f"{res.task_name}: {r.strategy}, seed {r.seed}, {r.n_evals} evaluations")
    plot_hypervolume(out / "hypervolume.png", {r.strategy: [hv_curve(r)]})
    files = ["summary.json", "trials.csv", "front.csv", "front.png", "hypervolume.png"]
    plan = res.plan()
    if plan is not None:
        from .report_plan import plot_plan

        plan.save(out / "plan.json")
        plot_plan(plan, out / "plan.png")
        files += ["plan.json", "plan.png"]
    else:
        for stale in ("plan.json", "plan.png"):
            (out / stale).unlink(missing_ok=True)
    summary = {**res.summary(), **(summary_extra or {}), "files": files}
    write_atomic(out / "summary.json", json_text(summary))
    return summary
