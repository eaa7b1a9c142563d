"""(methods) Quantizer methods and pruning: what each buys at the same honest size, on minilm and digits.

* minilm, 300 evaluations, greedy and ilp, at <= 4.0 and <= 3.0 average bits (every stored bit counted:
  scales, zero-points, masks), validation cosine: one row per method searched alone (rtn, mse-clip,
  gptq, gradient), one for the searched mix of methods, each per output channel and with groups of 64.
* digits, 200 evaluations, at <= 2.5 average bits: the same rows, validation accuracy.
* pruning: bits alone against bits and sparsity (0, 50%, 2:4) searched jointly, gptq, whole fronts
  (no budget), hypervolume on the same axes (size / full-precision size, quality / full precision).
* act order (act_order.md): minilm, groups of 64, gptq with and without ``quantizer.act_order``, the
  same budgets, strategies and evaluations as the methods table.
* low bits (low_bits.md): minilm with asymmetric groups of 128 and act order, rtn, mse-clip, gptq and their
  mix, the same budgets, strategies and evaluations.

    python experiments/exp_methods.py [--minilm-evals 300] [--digits-evals 200] [--part all|act-order|low-bits]
"""
from __future__ import annotations

import argparse

import pandas as pd

from common import RESULTS, Timer, run, setup, write_table
from mpsearch.core import Budget

OUT = RESULTS / "methods"
MINILM_BASE = {"choices": [2, 3, 4, 5, 6, 8], "types": ["Linear", "Embedding"]}
DIGITS_BASE = {"choices": [2, 3, 4, 5, 6, 8]}
GROUPS = {"per-channel": {}, "groups of 64": {"quantizer": {"granularity": "per-group", "group_size": 64}}}
METHOD_SETS = {"rtn": ["rtn"], "mse-clip": ["mse-clip"], "gptq": ["gptq"], "gradient": ["gradient"],
               "mix (mse-clip, gptq, gradient)": ["mse-clip", "gptq", "gradient"]}


def methods_table(model: str, base: dict, budgets: tuple, strategies: tuple, evals: int, groups: dict,
                  method_sets: dict = METHOD_SETS) -> list[dict]:
    rows = []
    for gname, gspec in groups.items():
        for mname, methods in method_sets.items():
            spec = {**base, **gspec, "methods": methods}
            task, space, ev = setup(model, spec)
            ev.prepare()  # one-off (disk-cached); its cost is measured by experiments/bench_methods.py
            for b in budgets:
                for strategy in strategies:
                    r = run(ev, strategy, 0, evals, Budget(max_avg_bits=b)).search
                    best = r.best()
                    val = ev.validation_metric(best.candidate)
                    chosen = [ev.space.setting(c) for c in best.candidate]
                    used = sorted({x.method for x in chosen if x.quantized})
                    rows.append({"model": model, "scales": gname, "methods": mname, "budget_avg_bits": b,
                                 "strategy": strategy, "n_evals": r.n_evals, "avg_bits": round(best.avg_bits, 4),
                                 "weight_bits": round(ev.sizes.weight_bits(best.candidate), 4),
                                 "cal_metric": round(best.metric, 4), "val_metric": round(val, 4),
                                 "methods_chosen": "+".join(used)})
                    print(rows[-1], flush=True)
            ev.restore()
    return rows


def pruning_table(model: str, base: dict, strategies: tuple, evals: int) -> list[dict]:
    rows = []
    for name, extra in (("bits alone", {}), ("bits + sparsity (0, 50%, 2:4)", {"sparsity": [0.0, 0.5, "2:4"]})):
        task, space, ev = setup(model, {**base, "methods": ["gptq"], **extra})
        for strategy in strategies:
            r = run(ev, strategy, 0, evals).search
            sparse = sum(1 for t in r.front.points if any(ev.space.setting(c).sparse for c in t.candidate))
            rows.append({"model": model, "space": name, "strategy": strategy, "n_evals": r.n_evals,
                         "hypervolume": round(r.hypervolume, 5), "front_points": len(r.front),
                         "front_points_with_pruning": sparse})
            print(rows[-1], flush=True)
        ev.restore()
    return rows


ACT_ORDER = {"gptq, column order": {"quantizer": {"granularity": "per-group", "group_size": 64}},
             "gptq, act order kept where better": {"quantizer": {"granularity": "per-group", "group_size": 64,
                                                                  "act_order": True}}}


def act_order(minilm_evals: int) -> None:
    with Timer() as total:
        rows = methods_table("minilm", MINILM_BASE, (4.0, 3.0), ("greedy", "ilp"), minilm_evals, ACT_ORDER,
                             {"gptq": ["gptq"]})
    write_table(pd.DataFrame(rows), OUT, "act_order", "gptq with act order (minilm, groups of 64)",
                "quantizer.act_order: besides GPTQ in column order, each layer is also quantized over its columns in "
                "decreasing order of the input second moment's diagonal, with every group's scale fitted on the "
                "unquantized weights (static groups); the layer keeps whichever has the lower output error "
                "trace(E H E^T) on the calibration inputs. Same budgets (average bits counting float16 scales), "
                "300 evaluations, seed 0 and validation cosine as methods.md; the column-order rows repeat that "
                "table's gptq rows for groups of 64.", total.s)


# the layout that reaches <= 3.0 average bits best on MiniLM: zero-points (8 bits per group of 128) buy asymmetric
# 2- and 3-bit grids for a sixteenth of a bit per weight, and gptq keeps act order where it lowers the error
LOW_BITS = {"asymmetric, groups of 128, act order": {"quantizer": {"scheme": "asymmetric", "granularity": "per-group",
                                                                    "group_size": 128, "act_order": True}}}
LOW_BITS_METHODS = {"rtn": ["rtn"], "mse-clip": ["mse-clip"], "gptq": ["gptq"], "mix (mse-clip, gptq)": ["mse-clip", "gptq"]}


def low_bits(minilm_evals: int) -> None:
    with Timer() as total:
        rows = methods_table("minilm", MINILM_BASE, (4.0, 3.0), ("greedy", "ilp"), minilm_evals, LOW_BITS,
                             LOW_BITS_METHODS)
    write_table(pd.DataFrame(rows), OUT, "low_bits", "Asymmetric groups of 128 with act order (minilm)",
                "The storage layout that does best at <= 3.0 average bits: asymmetric integers in groups of 128 "
                "along the input (a float16 scale and an 8-bit zero-point per group, 0.19 bits per weight, counted "
                "in avg_bits), gptq with quantizer.act_order. Same budgets, 300 evaluations, seed 0 and validation "
                "cosine as methods.md; gradient is left out for time (its preparation is 74 s per bit-width).",
                total.s)


def main(minilm_evals: int, digits_evals: int) -> None:
    act_order(minilm_evals)
    low_bits(minilm_evals)
    with Timer() as total:
        rows = methods_table("digits", DIGITS_BASE, (2.5,), ("greedy", "ilp"), digits_evals, GROUPS)
        rows += methods_table("minilm", MINILM_BASE, (4.0, 3.0), ("greedy", "ilp"), minilm_evals, GROUPS)
        prune = pruning_table("digits", {"choices": [2, 3, 4, 8]}, ("greedy", "pso"), digits_evals)
        prune += pruning_table("minilm", {**MINILM_BASE, "choices": [2, 3, 4, 8]}, ("greedy",), minilm_evals)
    runs = pd.DataFrame(rows)
    notes = ("Average bits count every stored bit of the quantized weights (integers, float16 scales, zero-points, "
             "pruning masks), as llama.cpp's bits per weight do; weight_bits counts the integers alone. cal_metric is "
             "the searched (calibration) quality of the strategy's best candidate within the budget, val_metric the "
             "same candidate on the validation split (minilm: cosine to the full-precision embeddings; digits: "
             "accuracy). Embedding layers have no inputs to compensate over: gptq and gradient give them the mse-clip "
             "scale. Seed 0.")
    write_table(runs, OUT, "methods", "Quantizer methods at equal honest size", notes, total.s)
    write_table(pd.DataFrame(prune), OUT, "pruning", "Pruning: bits alone against bits and sparsity searched jointly",
                "Whole fronts (no budget), gptq; hypervolume of size / full-precision size against quality normalised "
                "to full precision, reference point (1, 0): the same axes for both spaces. Pruned layers store the "
                "surviving integers plus a one-bit-per-weight mask.", total.s)
    print(f"wrote {OUT} in {total.s:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--minilm-evals", type=int, default=300)
    p.add_argument("--digits-evals", type=int, default=200)
    p.add_argument("--part", choices=["all", "act-order", "low-bits"], default="all")
    a = p.parse_args()
    if a.part == "act-order":
        act_order(a.minilm_evals)
    elif a.part == "low-bits":
        low_bits(a.minilm_evals)
    else:
        main(a.minilm_evals, a.digits_evals)
