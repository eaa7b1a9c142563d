"""Strategies x seeds at equal evaluation budgets on one shared evaluator.

Every candidate is computed once (the evaluator's memo is shared), yet each strategy
is charged for every candidate it asks: its cost is the evaluation time of what it
asked, wherever that was first computed, plus its own time in ask/tell.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from .core.budget import Budget
from .errors import BaselineWarning
from .files import write_atomic
from .pipeline import OptimizeResult, optimize
from .strategies import get_strategy


def run_comparison(evaluator, strategies: Sequence[str], seeds: Sequence[int], *, max_evals: int | None,
                   wall_s: float | None = None, max_failures: float = 0.5, budget: Budget | None = None, storage=None,
                   study_prefix: str = "compare", options: dict | None = None, progress: bool = False,
                   fresh: bool = False) -> list[OptimizeResult]:
    for name in strategies:  # fail before running anything on an unknown name or a bad option
        get_strategy(name, **(options or {}).get(name, {}))
    runs = [(s, seed) for s in strategies for seed in seeds]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="compare", unit="run")
    results = []
    try:
        for name, seed in runs:
            with warnings.catch_warnings():
                # a comparison reports each strategy's own best, not the run's chosen plan
                warnings.simplefilter("ignore", BaselineWarning)
                r = optimize(evaluator.task, evaluator=evaluator, strategy=name, options=(options or {}).get(name),
                             budget=budget, max_evals=max_evals, wall_s=wall_s, max_failures=max_failures, seed=seed,
                             storage=storage, study=f"{study_prefix}-{name}-seed{seed}", fresh=fresh, progress=progress)
            results.append(r)
            if bar is not None:
                bar.update(1)
            if r.search.stop_reason == "interrupted":
                break
    finally:
        if bar is not None:
            bar.close()
    return results


def runs_frame(results: Sequence[OptimizeResult], evaluator) -> pd.DataFrame:
    """One row per (strategy, seed): hypervolume, best quality under budget, evaluations to 99% HV, cost."""
    from .report import evals_to_reach, hv_curve

    curves = [hv_curve(res.search) for res in results]
    best_hv = max((c[-1] for c in curves if c), default=0.0)
    rows = []
    for res, curve in zip(results, curves):
        r = res.search
        best = r.best()
        rows.append({
            "strategy": r.strategy, "seed": r.seed, "n_evals": r.n_evals, "hypervolume": r.hypervolume,
            "best_metric": best.metric if best else math.nan,
            "best_avg_bits": best.avg_bits if best else math.nan,
            "best_size_bytes": best.size_bytes if best else math.nan,
            "best_validation_metric": evaluator.validation_metric(best.candidate) if best else math.nan,
            "evals_to_99pct_hv": evals_to_reach(curve, 0.99 * best_hv),
            "wall_s": r.wall_s,
            "cost_s": sum(t.wall_s for t in r.trials) + r.strategy_s,
            "strategy_s": r.strategy_s,
        })
    evaluator.restore()
    return pd.DataFrame(rows)


def write_comparison(results: Sequence[OptimizeResult], evaluator, out: Path, title: str = "") -> pd.DataFrame:
    from . import report

    out = Path(out)
    runs = runs_frame(results, evaluator)
    report.write_csv(runs, out / "comparison.csv")
    table = report.aggregate(runs)
    fp = evaluator.full_precision_bytes
    head = (f"# Strategy comparison{': ' + title if title else ''}\n\n"
            f"{len(results)} runs; full precision {fp / 1e6:.4g} MB, {evaluator.metric_name} {evaluator.reference_metric:.4f}. "
            "Mean ± std over seeds. hypervolume: normalised size x quality (reference point: full-precision size, "
            "zero quality). best_metric: calibration quality of the best candidate within the budget; "
            "best_validation_metric: the same candidate on the validation split. evals_to_99pct_hv: evaluations until the "
            "run's hypervolume reached 99% of the best final hypervolume in this comparison (reached_99pct_hv counts "
            "the runs that did). cost_s: evaluation time of every candidate the strategy asked plus its own time.\n\n")
    write_atomic(out / "comparison.md", head + report.markdown_table(table))
    write_atomic(out / "comparison.tex", report.latex_table(table, caption=title or "Strategy comparison"))
    curves: dict[str, list] = {}
    fronts: dict[str, list] = {}
    for res in results:
        r = res.search
        curves.setdefault(r.strategy, []).append(report.hv_curve(r))
        if r.strategy not in fronts:
            fronts[r.strategy] = report.front_trials(r)
    report.plot_hypervolume(out / "hypervolume.png", curves, title=title)
    uniform = results[0].baselines if results else []
    budget = results[0].search.budget if results else None
    report.plot_front(out / "fronts.png", fronts, fp, evaluator.metric_name, evaluator.reference_metric, uniform=uniform,
                      budget_bytes=budget.max_bytes if budget else None,
                      title=(title + ": " if title else "") + "fronts (first seed of each strategy)")
    return runs
