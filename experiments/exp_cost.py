"""(d) Cost: wall time, evaluations and strategy overhead per strategy, and the evaluator benchmark.

Reads the per-run tables of experiments (a) and (b) and runs experiments/bench_evaluator.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from common import RESULTS, ROOT, Timer, write_table

OUT = RESULTS / "cost"


def main() -> None:
    with Timer() as total:
        rows = []
        digits = RESULTS / "digits" / "runs.csv"
        if digits.exists():
            d = pd.read_csv(digits)
            for (s, n), g in d.groupby(["strategy", "max_evals"], sort=False):
                rows.append({"task": "digits_small (front mode)", "strategy": s, "max_evals": n,
                             "evals_median": g.n_evals.median(), "eval_cost_s_median": round(g.eval_cost_s.median(), 3),
                             "strategy_s_median": round(g.strategy_s.median(), 3),
                             "overhead_share_median": round((g.strategy_s / (g.strategy_s + g.eval_cost_s)).median(), 4)})
        minilm = RESULTS / "minilm" / "runs.csv"
        if minilm.exists():
            m = pd.read_csv(minilm)
            for (sp, b, s), g in m.groupby(["space", "budget_avg_bits", "strategy"], sort=False):
                rows.append({"task": f"minilm ({sp}) <= {b:g} avg bits", "strategy": s, "max_evals": int(g.n_evals.max()),
                             "evals_median": g.n_evals.median(), "eval_cost_s_median": g.eval_cost_s.median(),
                             "strategy_s_median": g.strategy_s.median(),
                             "overhead_share_median": g.strategy_share.median(),
                             "overhead_share_max": g.strategy_share.max()})
        bench = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_evaluator.py"), "--json",
                                "--repeats", "9", "--threads", "1"], capture_output=True, text=True, check=True)
        figures = [json.loads(l) for l in bench.stdout.splitlines() if l.startswith("{")]
    keep = ["model", "forward_s", "eval_s", "naive_s", "ratio_vs_forward", "speedup_vs_naive"]
    write_table(pd.DataFrame([{k: f.get(k) for k in keep} for f in figures]), OUT, "evaluator",
                "Evaluator benchmark", "Median of 9 interleaved repetitions, one torch thread "
                "(experiments/bench_evaluator.py --repeats 9 --threads 1).", total.s)
    write_table(pd.DataFrame(rows), OUT, "strategies", "Cost per strategy",
                "eval_cost_s: recorded evaluation time of every candidate the run asked (memo hits are charged what "
                "they cost when first computed); strategy_s: time in ask/tell; overhead_share: strategy_s over the "
                "total (ask/tell plus charged evaluation time).", total.s)
    print(f"wrote {OUT} in {total.s:.0f} s")


if __name__ == "__main__":
    main()
