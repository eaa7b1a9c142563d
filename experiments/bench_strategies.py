"""Strategies side by side on one shared evaluator: hypervolume, best within budget, and overhead.

    python experiments/bench_strategies.py [--model digits] [--search-space digits_small]
        [--strategies greedy,pso,bayes,ilp,random,uniform] [--seeds 3] [--max-evals 100] [--avg-bits 3] [--json]

Every run is charged for every candidate it asks; candidates another run already computed cost
what they cost then (the shared evaluator's memo), so later runs are fast but fairly charged.
overhead = time in ask/tell / (time in ask/tell + charged evaluation time). With a search
space small enough to enumerate (<= --exact-limit candidates), the hypervolume is also given as
a ratio to the exact front.
"""
from __future__ import annotations

import argparse
import json
import statistics

from common import Timer, run, setup
from mpsearch.core import Budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--search-space", default="digits_small")
    p.add_argument("--strategies", default="greedy,pso,bayes,ilp,random,uniform")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-evals", type=int, default=100)
    p.add_argument("--avg-bits", type=float, default=3.0)
    p.add_argument("--exact-limit", type=int, default=5000)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args()
    with Timer() as total:
        task, space, ev = setup(a.model, a.search_space)
        hv_exact = None
        if space.cardinality <= a.exact_limit:
            hv_exact = run(ev, "exhaustive", 0, space.cardinality).search.hypervolume
        rows = []
        for name in [s for s in a.strategies.split(",") if s]:
            hv, best, share = [], [], []
            for seed in range(a.seeds):
                front = run(ev, name, seed, a.max_evals).search
                budget = run(ev, name, seed, a.max_evals, Budget(max_avg_bits=a.avg_bits)).search
                hv.append(front.hypervolume)
                b = budget.best()
                best.append(b.metric if b else float("nan"))
                for r in (front, budget):
                    cost = sum(t.wall_s for t in r.trials)
                    share.append(r.strategy_s / (r.strategy_s + cost) if r.trials else 0.0)
            rows.append({"strategy": name, "hypervolume_median": statistics.median(hv),
                         "hv_ratio_median": statistics.median(hv) / hv_exact if hv_exact else None,
                         f"best_at_{a.avg_bits:g}_bits_median": statistics.median(best),
                         "overhead_max": max(share)})
        ev.restore()
    out = {"model": a.model, "search_space": a.search_space, "max_evals": a.max_evals, "seeds": a.seeds,
           "avg_bits": a.avg_bits, "exact_hypervolume": hv_exact, "wall_s": round(total.s, 1), "strategies": rows}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{a.model} ({a.search_space}), {a.max_evals} evaluations, {a.seeds} seeds, budget {a.avg_bits:g} avg bits"
          + (f"; exact hypervolume {hv_exact:.5f}" if hv_exact else ""))
    keys = list(rows[0])
    print("  ".join(f"{k:>22}" for k in keys))
    for r in rows:
        print("  ".join(f"{v:>22.4f}" if isinstance(v, float) else f"{str(v):>22}" for v in r.values()))
    print(f"wall time {total.s:.0f} s")


if __name__ == "__main__":
    main()
