"""(b) minilm: every strategy at 300 evaluations under average-bit budgets, on validation fidelity.

Each best plan's validation cosine is shown next to uniform quantization at the same size
(the widest uniform width that fits) and next to llama.cpp's Q4_K_M-style rule (attention
value and FFN down projections two bits wider in the first and last eighth of the layers
and in every third layer between, as llama.cpp's use_more_bits does; others at the base
width), for the widest base width whose size fits.
"""
from __future__ import annotations

import argparse
import re

import pandas as pd

from common import RESULTS, STRATEGIES, Timer, run, setup, write_table
from pathlib import Path

from mpsearch.core import Budget
from mpsearch.plan import QuantizationPlan
from mpsearch.report import front_trials, plot_front

OUT = RESULTS / "minilm"


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers' attn_v / ffn_down get more bits (integer division as in C)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4km_style(space, base: int):
    n_layers = 1 + max(int(m.group(1)) for d in space.decisions if (m := re.search(r"layer\.(\d+)\.", d.name)))
    high = {4: 6, 3: 5, 2: 4, 5: 8, 6: 8}.get(base, base)
    cand = []
    for d in space.decisions:
        m = re.search(r"layer\.(\d+)\.(attention\.self\.value|output\.dense)$", d.name)
        bits = high if m and use_more_bits(int(m.group(1)), n_layers) else base
        cand.append(bits if bits in d.choices else base)
    return tuple(cand)


def widest_fitting(ev, candidates, max_bytes):
    fitting = [c for c in candidates if ev.sizes.size_bytes(c) <= max_bytes]
    return max(fitting, key=lambda c: ev.sizes.size_bytes(c)) if fitting else None


def main(seeds: int, max_evals: int, budgets: list[float], extra_seeds: int, extra_strategies: list[str],
         clip_strategies: list[str]) -> None:
    with Timer() as total:
        task, space, ev = setup("minilm")
        ev.prepare()
        uniforms = [space.uniform(b) for b in space.uniform_choices()]
        rules = [q4km_style(space, b) for b in space.uniform_choices() if b <= 6]
        rows, fronts = [], {}
        plan = [("minilm.yaml", b, s, seed) for b in budgets
                for s in (STRATEGIES if b == max(budgets) else extra_strategies)
                for seed in range(seeds if b == max(budgets) else extra_seeds)]
        plan += [("minilm_clip.yaml", max(budgets), s, 0) for s in clip_strategies]
        main_pair, clip_pair = (space, ev), None
        for space_file, b, strategy, seed in plan:
            if space_file == "minilm_clip.yaml" and clip_pair is None:
                clip_pair = setup("minilm", "minilm_clip")[1:]
            space, ev = clip_pair if space_file == "minilm_clip.yaml" else main_pair
            r = run(ev, strategy, seed, max_evals, Budget(max_avg_bits=b)).search
            best = r.best()  # the strategy's own best (the run also evaluates uniform baselines, reported apart)
            cost = sum(t.wall_s for t in r.trials)  # evaluation time charged, memo hits at their first cost
            row = {"space": space_file, "budget_avg_bits": b, "strategy": strategy, "seed": seed, "n_evals": r.n_evals,
                   "wall_s": round(r.wall_s, 1), "eval_cost_s": round(cost, 1), "strategy_s": round(r.strategy_s, 2),
                   "strategy_share": round(r.strategy_s / (r.strategy_s + cost), 4)}
            if best is not None:
                val = ev.validation_metric(best.candidate)
                row.update({"avg_bits": round(best.avg_bits, 4), "size_mb": round(best.size_bytes / 1e6, 4),
                            "cal_cosine": round(best.metric, 4), "val_cosine": round(val, 4)})
                if seed == 0:
                    (OUT / "plans").mkdir(parents=True, exist_ok=True)
                    QuantizationPlan.from_candidate(ev, best.candidate, metric=best.metric, validation_metric=val,
                                                    provenance={"strategy": strategy, "seed": seed, "n_evals": r.n_evals,
                                                                "budget_avg_bits": b, "search_space": space_file}
                                                    ).save(OUT / "plans" / f"{Path(space_file).stem}-{strategy}-{b:g}bits.json")
                u = widest_fitting(ev, uniforms, best.size_bytes)
                q = widest_fitting(ev, rules, best.size_bytes)
                row["uniform_same_size"] = f"W{u[0]}: {ev.validation_metric(u):.4f}" if u else "—"
                row["q4km_style_same_size"] = (f"{ev.sizes.avg_bits(q):.2f} bits: {ev.validation_metric(q):.4f}"
                                               if q else "—")
            rows.append(row)
            print(row, flush=True)
            if b == max(budgets) and seed == 0 and space_file == "minilm.yaml":
                fronts[strategy] = front_trials(r)
        if clip_pair is not None:
            clip_pair[1].restore()
        space, ev = main_pair
        baselines = []
        for name, c in [(f"uniform W{c[0]}", c) for c in uniforms] + [
                (f"Q4_K_M-style base {min(c)}", c) for c in rules]:
            e = ev.evaluate(c)
            baselines.append({"baseline": name, "avg_bits": round(e.avg_bits, 4), "size_mb": round(e.size_bytes / 1e6, 4),
                              "cal_cosine": round(e.metric, 4), "val_cosine": round(ev.validation_metric(c), 4)})
        ev.restore()
        runs = pd.DataFrame(rows)
        OUT.mkdir(parents=True, exist_ok=True)
        plot_front(OUT / "fronts.png", fronts, ev.full_precision_bytes,
                   "cosine", ev.reference_metric, uniform=[ev.evaluate(c) for c in uniforms],
                   budget_bytes=None, title=f"minilm: evaluated fronts at <= {max(budgets):g} avg bits (seed 0)")
        ev.restore()
    notes = (f"all-MiniLM-L6-v2, {space.n_decisions} decisions x {{2,3,4,5,6,8}} bits, symmetric per-channel "
             f"round-to-nearest; {max_evals} evaluations per run; cosine of sentence embeddings to full precision on "
             f"{task.meta['n_calibration']} calibration and {task.meta['n_validation']} validation sentences. "
             f"{seeds} seeds at {max(budgets):g} average bits, {extra_seeds} at the other budgets "
             f"({', '.join(extra_strategies)}). minilm_clip.yaml is the same space with the MSE clipping search "
             "(same storage format and size), run once per strategy listed. "
             "val_cosine is the best plan's validation fidelity (plans of seed 0 in plans/); uniform_same_size and q4km_style_same_size are the "
             "widest baseline that is no larger than that plan. strategy_share: time in ask/tell over ask/tell plus the "
             "evaluation time charged (eval_cost_s: memo hits from earlier runs on the shared evaluator are charged what "
             "they cost when first computed, so a deterministic strategy's later seeds cost little wall time).")
    write_table(runs, OUT, "runs", "minilm: best plans under average-bit budgets", notes, total.s)
    write_table(pd.DataFrame(baselines), OUT, "baselines", "minilm: uniform and Q4_K_M-style baselines",
                "Validation cosine to full precision.", total.s)
    agg = (runs.groupby(["space", "budget_avg_bits", "strategy"], sort=False)
           .agg(runs=("seed", "count"), val_cosine_median=("val_cosine", "median"), val_cosine_min=("val_cosine", "min"),
                val_cosine_max=("val_cosine", "max"), avg_bits_median=("avg_bits", "median"),
                strategy_share_max=("strategy_share", "max"))
           .reset_index())
    write_table(agg, OUT, "summary", "minilm: validation fidelity of the best plan per strategy", notes, total.s)
    print(f"wrote {OUT} in {total.s:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--extra-seeds", type=int, default=1)
    p.add_argument("--max-evals", type=int, default=300)
    p.add_argument("--budgets", default="3.0,3.5,4.0")
    p.add_argument("--extra-strategies", default="greedy,pso,ilp", help="strategies at the budgets below the largest")
    p.add_argument("--clip-strategies", default="greedy,pso", help="strategies run on minilm_clip.yaml")
    a = p.parse_args()
    main(a.seeds, a.max_evals, [float(x) for x in a.budgets.split(",")], a.extra_seeds,
         [s for s in a.extra_strategies.split(",") if s], [s for s in a.clip_strategies.split(",") if s])
