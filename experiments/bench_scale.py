"""(scale) Memory and time of the evaluator on models of real size, and prefix reuse on MiniLM.

* Synthetic pre-norm transformer stacks (width 1024-2048, 4 searched Linear per block: fused qkv, o, up,
  down) of about 0.1B, 0.4B and 1.2B parameters, in float32 and bfloat16, each in its own process (so
  peak RSS is that size's own): model bytes, peak RSS, a plain forward, and the mean evaluation time
  of a random search (100 evaluations by default, --evals) and of a greedy budget search (<= 4 average
  bits) at 6 bit choices.
  Memory target: peak RSS <= 1.6 x model bytes + 1.5 GB.
* MiniLM, 300-evaluation searches (greedy at <= 4.0 average bits; bayes, pso and random on the whole
  front): mean evaluation cost as a fraction of one plain forward timed right after every evaluation, in
  the same run; the same in the Linear layers' multiply-accumulates, counted exactly (``work_ratio``);
  greedy again with an unbounded activation cache; and the largest difference between a score with
  prefix reuse and a full forward.

    python experiments/bench_scale.py [--sizes 0.1B,0.4B,1.2B] [--dtypes float32,bfloat16] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

from common import RESULTS, Timer, environment, write_json
from mpsearch import optimize
from mpsearch.core import Budget
from mpsearch.evaluator import Evaluator
from mpsearch.model import build_space, space_for
from mpsearch.tasks import Task, load_task

OUT = RESULTS / "cost"
SIZES = {"0.1B": (1024, 8), "0.4B": (2048, 8), "1.2B": (2048, 24)}  # (width, blocks); 12 width^2 per block
TOKENS = (2, 32)  # calibration: 2 sequences of 32 tokens, one batch; validation the same


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Stack(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, d // 64) for _ in range(n))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.norm(x)


def synthetic_task(size: str, dtype: torch.dtype) -> Task:
    d, n = SIZES[size]
    torch.manual_seed(0)
    model = Stack(d, n)
    for p in model.parameters():  # small weights keep the residual stream tame over 24 blocks
        if p.dim() == 2:
            nn.init.normal_(p, std=0.5 / d ** 0.5)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    cal = [(torch.randn(*TOKENS, d, generator=g).to(dtype), None)]
    val = [(torch.randn(*TOKENS, d, generator=g).to(dtype), None)]
    return Task(model, cal, val, metric="cosine", name=f"stack-{size}-{str(dtype).split('.')[-1]}")


def one_size(size: str, dtype_name: str, evals: int, greedy_evals: int | None = None) -> dict:
    dtype = getattr(torch, dtype_name)
    task = synthetic_task(size, dtype)
    model_bytes = sum(t.numel() * t.element_size() for t in task.model.state_dict().values())
    params = sum(p.numel() for p in task.model.parameters())
    space = build_space(task.model, [2, 3, 4, 5, 6, 8])
    ev = Evaluator(task, space, cache_dir=None)
    fwd = []
    for _ in range(3):
        t0 = time.perf_counter()
        ev._forward(ev.calibration)
        fwd.append(time.perf_counter() - t0)
    row = {"size": size, "dtype": dtype_name, "params": params, "model_mb": round(model_bytes / 2**20, 1),
           "decisions": len(space.decisions), "forward_s": round(statistics.median(fwd), 3)}
    for strategy, budget in (("random", None), ("greedy", Budget(max_avg_bits=4.0))):
        n = evals if strategy == "random" or greedy_evals is None else greedy_evals
        with Timer() as t:
            res = optimize(task, evaluator=ev, strategy=strategy, max_evals=n, budget=budget, seed=0)
        walls = [e.wall_s for e in res.search.trials if not e.cached]
        row[f"{strategy}_evals"] = len(walls)
        row[f"{strategy}_eval_s"] = round(statistics.mean(walls), 3)
        row[f"{strategy}_prep_s"] = round(sum(e.prep_s for e in res.search.trials), 1)
        row[f"{strategy}_wall_s"] = round(t.s, 1)
        if strategy == "random":  # the memory target is stated for the random search
            row["peak_rss_mb_random"] = ev.memory()["peak_rss_mb"]
    mem = ev.memory()
    row.update(peak_rss_mb=mem["peak_rss_mb"], weight_cache_cap_mb=mem["weight_cache_cap_mb"],
               limit_mb=round(1.6 * model_bytes / 2**20 + 1536, 1))
    row["within_limit"] = row["peak_rss_mb"] <= row["limit_mb"]
    ev.close()
    return row


class LinearWork:
    """Multiply-accumulates of the matrix products nn.Linear layers compute (``F.linear``) while ``on``: the work an
    evaluation really computes, counted exactly, beside its time, which this machine measures only to a few
    percent. Counted inside the product, not in a module hook: a layer whose kept output stands in (a lead
    point) still runs its hooks, but not its product."""

    def __init__(self):
        self.on, self.macs = False, 0
        self._linear = F.linear
        F.linear = self._count

    def _count(self, input, weight, bias=None):
        if self.on:
            self.macs += input.numel() * weight.shape[0]  # tokens x in_features x out_features
        return self._linear(input, weight, bias)

    def remove(self) -> None:
        F.linear = self._linear


UNBOUNDED_MB = 8192.0  # more than greedy's MiniLM run computes: ~5,250 block outputs of 0.74 MB on average


def minilm_ratios(evals: int, strategies: list[str], unbounded: bool = True) -> list[dict]:
    """Each strategy with the default caches; greedy also with an unbounded activation cache (and the same
    weight cache), which shows what the bounded one costs. Candidates one decision below the top (greedy's
    and ilp's sensitivity phase) are reported apart: what each costs is fixed by the block it lowers."""
    task = load_task("minilm")
    space = space_for(task)
    top = space.decode([n - 1 for n in space.n_choices])
    runs = [(s, None) for s in strategies] + ([("greedy", UNBOUNDED_MB)] if unbounded and "greedy" in strategies else [])
    weight_mb = None
    rows = []
    for strategy, activation_mb in runs:
        ev = Evaluator(task, space, activation_cache_mb=activation_mb, cache_mb=weight_mb if activation_mb else None)
        weight_mb = weight_mb or ev.memory()["weight_cache_cap_mb"]
        ev.prepare()  # one-off preparation is reported apart from evaluations
        work = LinearWork()
        fwd, forward_macs, spent = [], [0], {}
        evaluate = ev.evaluate

        def counted(candidate, split="calibration", _evaluate=evaluate, _work=work):
            before = _work.macs
            _work.on = True
            try:
                result = _evaluate(candidate, split)
            finally:
                _work.on = False
            if split == "calibration" and not result.cached:
                spent[tuple(result.candidate)] = _work.macs - before
            return result

        ev.evaluate = counted

        def timed_forward(trial, result, _work=work):
            before = _work.macs
            _work.on = True
            t0 = time.perf_counter()
            ev._forward(ev.calibration)
            fwd.append(time.perf_counter() - t0)
            _work.on = False
            forward_macs[0] = _work.macs - before

        budget = Budget(max_avg_bits=4.0) if strategy == "greedy" else None
        from mpsearch.search import Termination, search

        res = search(ev, strategy, Termination(max_evals=evals), seed=0, budget=budget, callbacks=[timed_forward])
        del ev.evaluate
        work.remove()
        # each evaluation against the forward timed right after it: a subset's ratio then shares its time of
        # day with its own forwards (this machine drifts by several percent over a run)
        assert len(fwd) == len(res.trials), "one timed forward per recorded trial"
        done = [(e, f) for e, f in zip(res.trials, fwd) if not e.cached]
        walls = [e.wall_s for e, _ in done]
        near, rest = [], []
        for e, f in done:
            (near if sum(a != b for a, b in zip(e.candidate, top)) <= 1 else rest).append((e, f))

        def ratios(pairs):
            if not pairs:
                return None, None
            t = statistics.mean(e.wall_s for e, _ in pairs) / statistics.mean(f for _, f in pairs)
            w = statistics.mean(spent[tuple(e.candidate)] for e, _ in pairs) / forward_macs[0]
            return round(t, 3), round(w, 3)

        # every score against a full forward without reuse
        with Evaluator(task, space, blocks="") as plain:
            sample = res.trials[:: max(1, len(res.trials) // 40)]
            diff = max(abs(plain.evaluate(t.candidate).metric - t.metric) for t in sample)
        (ratio, work_ratio), (near_ratio, near_work), (rest_ratio, rest_work) = ratios(done), ratios(near), ratios(rest)
        rows.append({"model": "minilm", "strategy": strategy,
                     "activation_cache": "unbounded" if activation_mb else "default",
                     "activation_cache_cap_mb": round(ev.activations.cap / 2**20),
                     "evals": len(walls), "mean_eval_s": round(statistics.mean(walls), 4),
                     "mean_forward_s": round(statistics.mean(f for _, f in done), 4), "ratio": ratio, "work_ratio": work_ratio,
                     "top_or_one_lowered_evals": len(near), "ratio_top_or_one_lowered": near_ratio,
                     "work_ratio_top_or_one_lowered": near_work, "ratio_others": rest_ratio, "work_ratio_others": rest_work,
                     "points_reused": ev.points_reused, "points_run": ev.points_run,
                     "leads_reused": ev.leads_reused,
                     "max_score_diff_vs_full_forward": diff, "scores_checked": len(sample)})
        print(json.dumps(rows[-1]), flush=True)
        ev.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "synthetic", "minilm"], default="all",
                   help="run one half; each updates its rows in results/cost/scale.json and rewrites scale.md")
    p.add_argument("--sizes", default="0.1B,0.4B,1.2B")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--evals", type=int, default=100, help="evaluations per search on the synthetic stacks")
    p.add_argument("--greedy-evals", type=int, help="evaluations of the greedy search there (default: --evals)")
    p.add_argument("--minilm-evals", type=int, default=300)
    p.add_argument("--minilm-strategies", default="greedy,bayes,pso,random")
    p.add_argument("--no-unbounded", action="store_true",
                   help="skip the second greedy run on MiniLM with an unbounded activation cache")
    p.add_argument("--one", help=argparse.SUPPRESS)  # SIZE:DTYPE, run in a child process
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--render", action="store_true", help="only rewrite scale.md from scale.json")
    a = p.parse_args()
    if a.render:
        write_markdown(json.loads((OUT / "scale.json").read_text()))
        return
    if a.one:
        size, dtype = a.one.split(":")
        print("ROW " + json.dumps(one_size(size, dtype, a.evals, a.greedy_evals)), flush=True)
        return
    path = OUT / "scale.json"
    out = json.loads(path.read_text()) if path.exists() else {"synthetic": [], "minilm": [], "wall_s": {}}
    with Timer() as total:
        if a.part in ("all", "synthetic"):
            for size in [s for s in a.sizes.split(",") if s]:
                for dtype in [d for d in a.dtypes.split(",") if d]:
                    extra = [] if a.greedy_evals is None else ["--greedy-evals", str(a.greedy_evals)]
                    proc = subprocess.run([sys.executable, __file__, "--one", f"{size}:{dtype}", "--evals",
                                           str(a.evals), *extra], capture_output=True, text=True)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
                    row = json.loads(line[4:]) if line else {
                        "size": size, "dtype": dtype, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
                    print(json.dumps(row), flush=True)
                    out = json.loads(path.read_text()) if path.exists() else out  # the other half may have written
                    out["synthetic"] = [r for r in out["synthetic"] if (r["size"], r["dtype"]) != (size, dtype)] + [row]
                    _save(out)
        if a.part in ("all", "minilm"):
            rows = minilm_ratios(a.minilm_evals, [s for s in a.minilm_strategies.split(",") if s], not a.no_unbounded)
            out = json.loads(path.read_text()) if path.exists() else out
            done = {(r["strategy"], r["activation_cache"]) for r in rows}
            out["minilm"] = [r for r in out["minilm"]
                             if (r["strategy"], r.get("activation_cache", "default")) not in done] + rows
    out["wall_s"] = {**out.get("wall_s", {}), a.part: round(total.s, 1)}
    _save(out)
    if a.json:
        print(json.dumps(out))


def _save(out: dict) -> None:
    order = {s: i for i, s in enumerate(SIZES)}
    out["synthetic"].sort(key=lambda r: (order.get(r["size"], 99), r["dtype"] != "float32"))
    out["environment"] = environment()
    write_json(out, OUT / "scale.json")
    write_markdown(out)


def write_markdown(out: dict) -> None:
    import pandas as pd

    from mpsearch.report import markdown_table

    syn = pd.DataFrame(out["synthetic"])
    mini = pd.DataFrame(out["minilm"])
    walls = ", ".join(f"{k} {v:.0f} s" for k, v in out.get("wall_s", {}).items())
    text = ("# Scale: memory and time on models of real size\n\n"
            "Synthetic pre-norm transformer stacks, 6 bit choices per Linear (2-8 bits, per-channel rtn), one "
            "calibration batch of 2 x 32 tokens; each size in its own process. peak_rss_mb is the process's peak "
            "resident memory after both searches (peak_rss_mb_random: after the random search; random_evals and "
            "greedy_evals: how many each ran); "
            "limit_mb = 1.6 x model + 1.5 GB. Evaluation times exclude one-off preparation (quantizing a "
            "(layer, bits) the first time: *_prep_s).\n\n"
            f"{markdown_table(syn)}\n"
            "## Prefix reuse on MiniLM\n\n"
            "Mean evaluation time over the mean of the plain forwards timed right after the same evaluations, in "
            "the same run (ratio; 1.0: no saving), and the same in the multiply-accumulates of the model's "
            "Linear layers, counted exactly (work_ratio). Candidates at most one decision below the top (the "
            "sensitivity phase of greedy) are also reported apart from the others (*_top_or_one_lowered, "
            "*_others). activation_cache: the default cap, or one no run fills, with the same weight cache. The "
            "scores of a sample of the run's candidates recomputed by a full forward without reuse differ from "
            "the stored ones by at most max_score_diff_vs_full_forward.\n\n"
            f"{markdown_table(mini)}\n"
            f"_{out['environment']}; wall time {walls}; regenerate with "
            "`python experiments/bench_scale.py`._\n")
    if out.get("notes"):  # how rows measured in separate runs came together (kept in scale.json)
        text += "\n" + out["notes"].strip() + "\n"
    (OUT / "scale.md").write_text(text)


if __name__ == "__main__":
    main()
