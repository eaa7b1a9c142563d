"""What one evaluation costs: the cached evaluator against a plain forward and against a naive evaluator.

For each task, one run measures, interleaved (the order rotates every repetition so machine noise
falls on all three alike), the median wall time of:

  forward  one full-precision forward over the calibration set (``evaluator.restore()``, then the
           model over ``evaluator.calibration`` under ``torch.inference_mode``, as the evaluator does);
  eval     one ``evaluator.evaluate`` of a fresh random candidate (never evaluated before), after
           ``evaluator.prepare()`` has quantized every (layer, bits) once;
  naive    an evaluator without caches: deep-copy the model, re-quantize every layer of the candidate
           with ``mpsearch.quantize.fake_quantize``, run the same forward and the same metric.

    python experiments/bench_evaluator.py [--models digits,minilm] [--repeats 15] [--threads N] [--cache-mb MB] [--json]

``ratio_vs_forward`` = eval_s / forward_s (1.0 = the evaluator adds nothing to the forward);
``speedup_vs_naive`` = naive_s / eval_s.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpsearch.evaluator import Evaluator, _call, _concat  # noqa: E402
from mpsearch.tasks import load_task  # noqa: E402
from mpsearch.quantize import fake_quantize as quantize_weight  # noqa: E402
from mpsearch.model import space_for  # noqa: E402


class NaiveEvaluator:
    """No weight cache, no swapping: a fresh copy of the model quantized from scratch per candidate."""

    def __init__(self, ev: Evaluator):
        ev.restore()
        self.ev = ev
        self.pristine = copy.deepcopy(ev.model)
        self.space = ev.space
        # what the metric compares with: task targets, or the full-precision outputs
        self.targets = ev._targets["calibration"]
        self.parts: dict[str, list[float]] = {"copy": [], "quantize": []}

    def evaluate(self, candidate) -> float:
        t0 = time.perf_counter()
        model = copy.deepcopy(self.pristine)
        t1 = time.perf_counter()
        named = dict(model.named_modules())
        with torch.no_grad():
            for layer, choice in self.space.layer_choices(candidate).items():
                w = named[layer].weight
                w.data = quantize_weight(w.data, self.space.setting(choice).bits, self.space.quantizer)
        t2 = time.perf_counter()
        self.parts["copy"].append(t1 - t0)
        self.parts["quantize"].append(t2 - t1)
        with torch.inference_mode():
            outs = _concat([self.ev._output(_call(model, x)) for x, _ in self.ev.calibration])
            return float(self.ev.metric(outs, self.targets))


def plain_forward(ev: Evaluator):
    with torch.inference_mode():
        return _concat([ev._output(_call(ev.model, x)) for x, _ in ev.calibration])


def fresh(ev: Evaluator, rng: np.random.Generator, taken: set):
    for _ in range(10_000):
        c = ev.space.random(rng)
        if c not in taken and not ev.is_memoized(c):
            taken.add(c)
            return c
    raise RuntimeError("the space ran out of unevaluated candidates")


def bench(model_name: str, repeats: int, warmup: int = 2, seed: int = 0, cache_mb: float | None = None) -> dict:
    task = load_task(model_name)
    space = space_for(task)
    ev = Evaluator(task, space, cache_mb=cache_mb)
    t0 = time.perf_counter()
    ev.prepare()
    warm_s = time.perf_counter() - t0
    naive = NaiveEvaluator(ev)
    rng = np.random.default_rng(seed)
    taken: set = set()

    def run_forward():
        ev.restore()
        t = time.perf_counter()
        plain_forward(ev)
        return time.perf_counter() - t

    def run_eval():
        c = fresh(ev, rng, taken)
        t = time.perf_counter()
        ev.evaluate(c)
        return time.perf_counter() - t

    def run_naive():
        c = fresh(ev, rng, taken)
        t = time.perf_counter()
        naive.evaluate(c)
        return time.perf_counter() - t

    runs = {"forward": run_forward, "eval": run_eval, "naive": run_naive}
    order = list(runs)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(warmup + repeats):
        shift = rep % len(order)
        for k in order[shift:] + order[:shift]:
            dt = runs[k]()
            if rep >= warmup:
                times[k].append(dt)
    ev.restore()
    fwd, evs, nv = (statistics.median(times[k]) for k in ("forward", "eval", "naive"))
    paired = statistics.median(e / f for e, f in zip(times["eval"], times["forward"]))
    return {
        "model": model_name,
        "forward_s": fwd,
        "eval_s": evs,
        "naive_s": nv,
        "ratio_vs_forward": evs / fwd,
        "speedup_vs_naive": nv / evs,
        # robustness: the same ratio paired within each repetition, and where the naive time goes
        "ratio_vs_forward_paired": paired,
        "naive_copy_s": statistics.median(naive.parts["copy"][warmup:]),
        "naive_quantize_s": statistics.median(naive.parts["quantize"][warmup:]),
        "repeats": repeats,
        "n_calibration_batches": len(ev.calibration),
        "n_layers": len(space.layers),
        "warm_cache_s": warm_s,
        "torch_threads": torch.get_num_threads(),
        "weight_cache_cap_mb": ev.memory()["weight_cache_cap_mb"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits,minilm", help="comma-separated task names")
    ap.add_argument("--repeats", type=int, default=15, help="measured repetitions per task (after 2 warm-up ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0 = torch's default); 1 steadies timings on a busy machine")
    ap.add_argument("--cache-mb", type=float, help="the evaluator's weight cache (default: its own default)")
    ap.add_argument("--json", action="store_true", help="one JSON object per task, one per line")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = [bench(m.strip(), args.repeats, seed=args.seed, cache_mb=args.cache_mb) for m in args.models.split(",") if m.strip()]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    head = f"{'model':<8} {'forward_s':>10} {'eval_s':>10} {'naive_s':>10} {'eval/fwd':>9} {'naive/eval':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<8} {r['forward_s']:>10.5f} {r['eval_s']:>10.5f} {r['naive_s']:>10.5f} "
              f"{r['ratio_vs_forward']:>9.3f} {r['speedup_vs_naive']:>11.2f}")
    print(f"(medians of {args.repeats} interleaved repetitions; {rows[0]['torch_threads'] if rows else '?'} torch threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
