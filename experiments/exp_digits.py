"""(a) digits, enumerable space: every strategy against the exact front and the exact budget optima.

The exact front comes from `exhaustive` over search_spaces/digits_small.yaml (6 decisions x
{2, 3, 4, 8} bits = 4,096 candidates). Every other run shares its evaluator, so their
candidates are memo hits: they are charged the recorded cost of each evaluation, and the
experiment finishes in minutes.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from common import RESULTS, STRATEGIES, Timer, run, setup, write_json, write_table
from mpsearch.core import Budget
from mpsearch.report import front_trials, plot_front, trials_frame

OUT = RESULTS / "digits"
BUDGETS = (2.5, 3.0, 4.0)


def main(seeds: int, evals: list[int]) -> None:
    with Timer() as total:
        task, space, ev = setup("digits", "digits_small")
        exact = run(ev, "exhaustive", 0, space.cardinality).search
        hv_exact = exact.hypervolume
        OUT.mkdir(parents=True, exist_ok=True)
        trials_frame(front_trials(exact), space, exact.full_precision_bytes).to_csv(OUT / "exact_front.csv", index=False)
        optimum = {b: exact.best(Budget(max_avg_bits=b)) for b in BUDGETS}
        write_json({"hypervolume": hv_exact, "n_candidates": space.cardinality, "front_size": len(exact.front),
                    "reference_metric": ev.reference_metric, "full_precision_bytes": ev.full_precision_bytes,
                    "exhaustive_eval_s": sum(t.wall_s for t in exact.trials),
                    "optimum": {str(b): {"metric": t.metric, "avg_bits": t.avg_bits, "size_bytes": t.size_bytes,
                                         "bits": list(t.candidate)} for b, t in optimum.items()}},
                   OUT / "exact.json")
        rows, fronts = [], {"exact": front_trials(exact)}
        for strategy in STRATEGIES + ["uniform"]:
            for n in evals:
                for seed in range(seeds):
                    r = run(ev, strategy, seed, n).search
                    row = {"strategy": strategy, "max_evals": n, "seed": seed, "n_evals": r.n_evals,
                           "hypervolume": r.hypervolume, "hv_ratio": r.hypervolume / hv_exact,
                           "strategy_s": r.strategy_s, "eval_cost_s": sum(t.wall_s for t in r.trials)}
                    if n == max(evals) and seed == 0:
                        fronts[strategy] = front_trials(r)
                    for b in BUDGETS:
                        rb = run(ev, strategy, seed, n, Budget(max_avg_bits=b)).search
                        best = rb.best()
                        row[f"best@{b:g}"] = best.metric if best else np.nan
                        row[f"gap@{b:g}"] = optimum[b].metric - best.metric if best else np.nan
                        row[f"evals@{b:g}"] = rb.n_evals
                    rows.append(row)
                    print(f"{strategy:>8} n={n:<4} seed={seed} hv_ratio={row['hv_ratio']:.4f} "
                          + " ".join(f"best@{b:g}={row[f'best@{b:g}']:.4f}" for b in BUDGETS), flush=True)
        runs = pd.DataFrame(rows)
        runs.to_csv(OUT / "runs.csv", index=False)
        agg = (runs.groupby(["strategy", "max_evals"], sort=False)
               .agg(hv_ratio_median=("hv_ratio", "median"), hv_ratio_min=("hv_ratio", "min"),
                    hv_ratio_max=("hv_ratio", "max"),
                    **{f"best{b:g}_median": (f"best@{b:g}", "median") for b in BUDGETS},
                    **{f"gap{b:g}_median": (f"gap@{b:g}", "median") for b in BUDGETS},
                    strategy_s_median=("strategy_s", "median"))
               .reset_index())
        for c in agg.columns[2:]:
            agg[c] = agg[c].round(4)
        plot_front(OUT / "fronts.png", fronts, ev.full_precision_bytes, "accuracy", ev.reference_metric,
                   uniform=[ev.evaluate(space.uniform(b)) for b in space.uniform_choices()],
                   title=f"digits_small: exact front vs each strategy (seed 0, {max(evals)} evaluations)")
        _plot_ratio(agg, OUT / "hv_ratio.png")
    notes = (f"Space: search_spaces/digits_small.yaml, {space.cardinality} candidates; exact hypervolume "
             f"{hv_exact:.5f} ({len(exact.front)} front points). Exact optimum (calibration accuracy): "
             + ", ".join(f"{optimum[b].metric:.4f} at <= {b:g} avg bits" for b in BUDGETS)
             + f". Full precision {ev.reference_metric:.4f}. Median over {seeds} seeds (min-max for the hypervolume "
             "ratio). hv_ratio: run hypervolume / exact hypervolume (front mode, no budget). bestB / gapB: best "
             "calibration accuracy within B average bits in a budget-mode run, and its gap to the exact optimum "
             "(0 = optimal). uniform is deterministic (4 candidates).")
    write_table(agg, OUT, "summary", "digits: strategies against the exact front", notes, total.s)
    print(f"wrote {OUT} in {total.s:.0f} s")


def _plot_ratio(agg: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, g in agg.groupby("strategy", sort=False):
        ax.errorbar(g.max_evals, g.hv_ratio_median, yerr=[g.hv_ratio_median - g.hv_ratio_min,
                                                          g.hv_ratio_max - g.hv_ratio_median],
                    marker="o", capsize=3, label=s)
    ax.axhline(0.995, ls=":", c="k", lw=0.8, label="0.995")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume / exact hypervolume")
    ax.set_title("digits_small: hypervolume ratio (median, min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--evals", default="50,100,200")
    a = p.parse_args()
    main(a.seeds, [int(x) for x in a.evals.split(",")])
