"""(tasks) speech and video: the built-in keyword-spotting (Conv1d+GRU+Linear) and clip-classification
(Conv3d) tasks, searched by greedy, pso, bayes and random.

For each task, into results/<task>/:
- runs.csv, summary.md/csv, fronts.png: front mode (no budget), 200 evaluations, 3 seeds per
  strategy; hypervolume, wall time of the run, evaluation cost. All runs share one evaluator
  (memo hits are charged what they cost when first computed).
- budget_runs.csv, budget.md/csv: budget mode at <= 3.0 and <= 4.0 average bits, and at the exact sizes
  of uniform 3 and 4 bits; the validation accuracy of each strategy's best plan next to the best
  uniform quantization that fits.
- summary.json: full-precision accuracy, space size, model bytes, and the wall time of one
  200-evaluation search per strategy (seed 0) on the shared evaluator and on a fresh one.

Search space: search_spaces/<task>.yaml when it exists (``--space`` to name another), else the task's own.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from common import RESULTS, ROOT, Timer, run, setup, write_json, write_table
from mpsearch.core import Budget
from mpsearch.core.pareto import ParetoFront
from mpsearch.errors import SpaceError
from mpsearch.model.space_files import resolve_space_file
from mpsearch.report import front_trials, plot_front

TASKS = ("speech", "video")
STRATEGIES = ["greedy", "pso", "bayes", "random"]
BUDGETS = (3.0, 4.0)
DESCRIPTION = {"speech": "keyword spotting, 14 words, Conv1d+GRU+Linear on log-mel features",
               "video": "clip classification, moving digits (40 classes), Conv3d"}


def space_name(task: str, space: str | None) -> str | None:
    """The space file to use: ``space`` when given, else ``<task>.yaml`` when it exists, else None (the task's own)."""
    if space:
        return space
    try:
        resolve_space_file(task)
        return task
    except SpaceError:
        return None


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def n_samples(batches) -> int:
    return sum(len(t) for _, t in batches)


def best_uniform(ev, space, b: float):
    """The uniform candidate with the highest calibration accuracy among those within ``b`` average bits
    (ties: the wider one); None when none fits."""
    fitting = [e for e in (ev.evaluate(space.uniform(c)) for c in space.uniform_choices()) if e.avg_bits <= b]
    return max(fitting, key=lambda e: (e.metric, e.size_bytes)) if fitting else None


def main_task(name: str, space_arg: str | None, seeds: int, evals: int) -> None:
    out = RESULTS / name
    sname = space_name(name, space_arg)
    space_label = _relative(resolve_space_file(sname)) if sname else "the task's own space (no search_spaces/<task>.yaml)"
    with Timer() as total:
        with Timer() as t_setup:
            task, space, ev = setup(name, sname)
        uniforms = [ev.evaluate(space.uniform(c)) for c in space.uniform_choices()]
        uniform_hv = ParetoFront(uniforms, ev.full_precision_bytes, ev.reference_metric, ev.metric_name).hypervolume()

        # 1. fronts at equal evaluations
        rows, fronts = [], {}
        for strategy in STRATEGIES:
            for seed in range(seeds):
                with Timer() as t:
                    r = run(ev, strategy, seed, evals).search
                rows.append({"strategy": strategy, "seed": seed, "max_evals": evals, "n_evals": r.n_evals,
                             "hypervolume": r.hypervolume, "front_size": len(r.front), "wall_s": round(t.s, 3),
                             "search_wall_s": round(r.wall_s, 3), "strategy_s": round(r.strategy_s, 3),
                             "eval_cost_s": round(sum(x.wall_s for x in r.trials), 3)})
                if seed == 0:
                    fronts[strategy] = front_trials(r)
                print(f"{name} {strategy:>7} seed={seed} n={r.n_evals} hv={r.hypervolume:.5f} wall={t.s:.2f}s", flush=True)
        runs = pd.DataFrame(rows)
        out.mkdir(parents=True, exist_ok=True)
        runs.to_csv(out / "runs.csv", index=False)
        agg = (runs.groupby("strategy", sort=False)
               .agg(runs=("seed", "count"), n_evals_median=("n_evals", "median"),
                    hv_median=("hypervolume", "median"), hv_min=("hypervolume", "min"),
                    hv_max=("hypervolume", "max"), wall_s_median=("wall_s", "median"),
                    eval_cost_s_median=("eval_cost_s", "median"), strategy_s_median=("strategy_s", "median"))
               .reset_index())
        agg = pd.concat([agg, pd.DataFrame([{"strategy": f"uniform ({len(uniforms)} points)", "runs": 1,
                                             "n_evals_median": len(uniforms), "hv_median": uniform_hv,
                                             "hv_min": uniform_hv, "hv_max": uniform_hv}])], ignore_index=True)
        for c in ("hv_median", "hv_min", "hv_max"):
            agg[c] = agg[c].round(5)
        for c in ("wall_s_median", "eval_cost_s_median", "strategy_s_median"):
            agg[c] = agg[c].round(2)
        plot_front(out / "fronts.png", fronts, ev.full_precision_bytes, "accuracy", ev.reference_metric,
                   uniform=uniforms,
                   title=f"{name}: evaluated fronts of each strategy (seed 0, {evals} evaluations, calibration accuracy)")

        # 2. budgets: the best plan's validation accuracy against uniform quantization that fits
        # nominal budgets, and the exact sizes of uniform 3 and 4 bits (scales make those a little over 3 and 4)
        same_size = [u.avg_bits for u in uniforms if space.setting(u.candidate[0]).bits in (3, 4)]
        budgets = sorted(set(BUDGETS) | set(same_size))
        brows = []
        for b in budgets:
            for strategy in STRATEGIES:
                for seed in range(seeds):
                    with Timer() as t:
                        rb = run(ev, strategy, seed, evals, Budget(max_avg_bits=b)).search
                    best = rb.best()  # the strategy's own best (the run's uniform baselines are reported apart)
                    row = {"budget_avg_bits": b, "strategy": strategy, "seed": seed, "n_evals": rb.n_evals,
                           "wall_s": round(t.s, 3), "avg_bits": np.nan, "cal_acc": np.nan, "val_acc": np.nan}
                    if best is not None:
                        row.update({"avg_bits": round(best.avg_bits, 4), "cal_acc": best.metric,
                                    "val_acc": ev.validation_metric(best.candidate),
                                    "bits": " ".join(str(x) for x in best.candidate)})
                    brows.append(row)
                    print(f"{name} <={b:g} bits {strategy:>7} seed={seed} avg_bits={row['avg_bits']} "
                          f"cal={row['cal_acc']:.4f} val={row['val_acc']:.4f}", flush=True)
        bruns = pd.DataFrame(brows)
        bruns.to_csv(out / "budget_runs.csv", index=False)
        parts = []
        for b in budgets:
            g = (bruns[bruns.budget_avg_bits == b].groupby("strategy", sort=False)
                 .agg(runs=("seed", "count"), val_acc_median=("val_acc", "median"), val_acc_min=("val_acc", "min"),
                      val_acc_max=("val_acc", "max"), cal_acc_median=("cal_acc", "median"),
                      avg_bits_median=("avg_bits", "median"))
                 .reset_index())
            g.insert(0, "budget_avg_bits", b)
            u = best_uniform(ev, space, b)
            urow = {"budget_avg_bits": b, "strategy": "uniform (none fits)", "runs": 1}
            if u is not None:
                uval = ev.validation_metric(u.candidate)
                urow.update({"strategy": f"uniform {space.describe(u.candidate[0])}", "val_acc_median": uval,
                             "val_acc_min": uval, "val_acc_max": uval, "cal_acc_median": u.metric,
                             "avg_bits_median": round(u.avg_bits, 4)})
            parts += [g, pd.DataFrame([urow])]
        budget = pd.concat(parts, ignore_index=True)
        fits = "; ".join(f"<= {b:g}: {space.describe(u.candidate[0]) + f' ({u.avg_bits:.3f} bits)' if u else 'none'}"
                         for b in budgets for u in [best_uniform(ev, space, b)])
        uniform_bits = ", ".join(f"{space.describe(u.candidate[0])} = {u.avg_bits:.3f}" for u in uniforms)
        for c in ("val_acc_median", "val_acc_min", "val_acc_max", "cal_acc_median"):
            budget[c] = budget[c].astype(float).round(4)

        # 3. one 200-evaluation search per strategy on a fresh evaluator: what a user's first run costs
        fresh = {}
        for strategy in STRATEGIES:
            with Timer() as t_ev:
                ev_fresh = setup(name, sname)[2]
            with Timer() as t:
                rf = run(ev_fresh, strategy, 0, evals).search
            ev_fresh.close()
            fresh[strategy] = {"n_evals": rf.n_evals, "run_wall_s": round(t.s, 3), "evaluator_setup_s": round(t_ev.s, 3),
                               "strategy_s": round(rf.strategy_s, 3), "hypervolume": rf.hypervolume}
            print(f"{name} fresh evaluator {strategy:>7} n={rf.n_evals} wall={t.s:.2f}s", flush=True)

        seed0 = runs[runs.seed == 0].set_index("strategy")
        write_json({
            "task": name, "description": DESCRIPTION.get(name, ""), "search_space": space_label,
            "metric": ev.metric_name, "n_calibration": n_samples(task.calibration), "n_validation": n_samples(task.validation),
            "reference_metric": ev.reference_metric, "reference_validation_metric": ev.reference_validation_metric,
            "n_decisions": space.n_decisions, "cardinality": space.cardinality,
            "full_precision_bytes": ev.full_precision_bytes, "evaluator_setup_s": round(t_setup.s, 3),
            "uniform": [{"choice": space.describe(u.candidate[0]), "avg_bits": u.avg_bits, "size_bytes": u.size_bytes,
                         "cal_acc": u.metric, "val_acc": ev.validation_metric(u.candidate)} for u in uniforms],
            "search_wall_s": {
                "what": (f"seconds of one run(...) call (search, uniform baselines, validation of the chosen point), "
                         f"front mode, {evals} evaluations requested, seed 0; 'fresh_evaluator': on an evaluator "
                         "built just before (its construction is evaluator_setup_s, not included); 'shared_evaluator': "
                         "within this experiment, where earlier runs' evaluations are memo hits"),
                "fresh_evaluator": fresh,
                "shared_evaluator": {s: {"n_evals": int(seed0.loc[s, "n_evals"]), "run_wall_s": float(seed0.loc[s, "wall_s"]),
                                         "eval_cost_s": float(seed0.loc[s, "eval_cost_s"])} for s in STRATEGIES},
            },
            "experiment_wall_s": round(total.elapsed, 1),
        }, out / "summary.json")

    exhausted = ("; the space has fewer candidates than the evaluations requested, so runs stop early "
                 "(n_evals below max_evals)" if space.cardinality < evals else "")
    common_notes = (f"Task {name}: {DESCRIPTION.get(name, '')}. Space: {space_label}, {space.n_decisions} decisions, "
                    f"{space.cardinality:.4g} candidates{exhausted}. Accuracy on {n_samples(task.calibration)} calibration "
                    f"and {n_samples(task.validation)} validation clips; full precision {ev.reference_metric:.4f} "
                    f"(calibration), {ev.reference_validation_metric:.4f} (validation). {seeds} seeds per strategy, "
                    f"{evals} evaluations per run, all runs on one shared evaluator (a candidate another run evaluated is "
                    "a memo hit, charged in eval_cost_s at what it first cost, so wall_s of later runs is lower than a "
                    "first run's; summary.json has each strategy's wall time on a fresh evaluator). Average bits count "
                    f"the quantization scales too: uniform {uniform_bits} average bits.")
    write_table(agg, out, "summary", f"{name}: fronts at equal evaluations",
                common_notes + " Front mode (no budget); hypervolume of the strategy's own evaluated front (calibration "
                "accuracy against size), median and min-max over seeds; the uniform row is the front of the "
                f"{len(uniforms)} uniform candidates alone. wall_s: the run(...) call; strategy_s: time in ask/tell.",
                total.s)
    write_table(budget, out, "budget", f"{name}: best plan within an average-bit budget against uniform quantization",
                common_notes + " Budget mode: each strategy's own best plan within the budget (best calibration "
                "accuracy), reported with its VALIDATION accuracy (val_acc, median and min-max over seeds; cal_acc is "
                "the calibration accuracy it was chosen by). The uniform row is the uniform candidate with the best "
                "calibration accuracy among those whose average bits (scales included) fit the budget, ties to the "
                "wider; because scales count, uniform b-bit does not fit a budget of exactly b bits, so at a nominal budget "
                "the row is narrower than the budget's width; the budgets equal to uniform 3- and 4-bit's own average bits "
                f"compare a mixed plan with uniform quantization at the same size ({fits}). Per-seed runs and plans (bits per decision): budget_runs.csv.",
                total.s)
    print(f"wrote {out} in {total.s:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--evals", type=int, default=200)
    p.add_argument("--space", default=None,
                   help="search space name or file for every task (default: search_spaces/<task>.yaml when it exists, "
                        "else the task's own)")
    a = p.parse_args()
    for t in a.tasks.split(","):
        if t:
            main_task(t, a.space, a.seeds, a.evals)
