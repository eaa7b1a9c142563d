"""Scaling out: evaluation throughput with 1 and 2 worker processes, and what coordination costs per trial.

Two measurements:

  throughput   a random search of ``--evals`` candidates on ``--model`` (default minilm), driven
               through ``QueueExecutor`` on a SQLite file, evaluated by 1 worker process (all
               cores to it) and then by 2 (cores split between them, as ``--workers 2`` does).
               Evaluations per minute are counted from the first claim to the last completion,
               so model loading in the workers is left out. 1 worker also runs with 1 thread,
               which separates the gain of a second process from that of fewer threads per
               process. The same search in-process (``LocalExecutor``, no storage round trips,
               all cores) is the reference.

  overhead     with a trivial task (4 small linear layers: evaluation well under 1 ms), per trial:
               - ops: the storage operations alone, in one process, no waiting: enqueue (driver),
                 claim (worker), complete (worker), collect (driver's poll that sees it);
               - e2e: a real driver and one worker process, ``--overhead-evals`` trials:
                 (wall from the first claim to the end of the search - evaluation time) / trials,
                 which adds polling latency and the batch round trips of the loop.
               for SQLite (a file) and PostgreSQL (a throwaway local server from tests/pg.py,
               durable: fsync on, like SQLite's default), when one can be started.

    python experiments/bench_workers.py [--model minilm] [--evals 24] [--overhead-evals 200] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from mpsearch.evaluator import Evaluator  # noqa: E402
from mpsearch.tasks import load_task  # noqa: E402
from mpsearch.search import Termination, search  # noqa: E402
from mpsearch.model import space_for  # noqa: E402
from mpsearch.storage import TrialStore, quiet_optuna  # noqa: E402
from mpsearch.optuna_rdb import complete, frozen_trial_id, swap_state  # noqa: E402
from mpsearch.workers import QueueExecutor  # noqa: E402

TINY_TASK = textwrap.dedent('''
    import torch
    from mpsearch.tasks import Task

    def make_task():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
        x = torch.randn(8, 16)
        return Task(model=model, calibration=[(x, None)], validation=[(x, None)], metric="cosine", name="tiny")
''')


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env.pop("MPSEARCH_WORKER_PARENT", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _workers(url: str, study: str, n: int, threads: int) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "mpsearch.cli", "worker", "--storage", url, "--study", study]
    return [subprocess.Popen(cmd, env=_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)]


def _driven(url: str, model: str, space, evaluator, n_workers: int, threads: int, evals: int, seed: int) -> dict:
    """One search through ``n_workers`` worker processes; timings from the stored trials."""
    study = f"bench-{uuid.uuid4().hex[:8]}"
    procs = _workers(url, study, n_workers, threads)
    ex = QueueExecutor(url, model, n_local=0, strategy="random", seed=seed)
    try:
        t0 = time.perf_counter()
        res = search(evaluator, "random", Termination(max_evals=evals), seed=seed, storage=url,
                     study_name=study, executor=ex)
        wall = time.perf_counter() - t0
        end = datetime.now()
    finally:
        ex.close()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    trials = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    span = (last - first).total_seconds()
    eval_s = sum(float(t.user_attrs["wall_s"]) for t in trials)
    return {"n": len(trials), "n_workers": n_workers, "threads_per_worker": threads, "wall_s": wall,
            "span_s": span, "evals_per_min": 60.0 * len(trials) / span, "eval_s_mean": eval_s / len(trials),
            "driver_span_s": (end - first).total_seconds(), "n_evals_result": res.n_evals}


def throughput(model: str, evals: int, seed: int) -> dict:
    import torch

    cores = os.cpu_count() or 1
    task = load_task(model)
    space = space_for(task)
    evaluator = Evaluator(task, space)
    out = {"model": model, "cores": cores, "evals": evals}
    # In-process reference: the same candidates, no storage, all cores.
    torch.set_num_threads(cores)
    ref_ev = Evaluator(load_task(model), space)
    t0 = time.perf_counter()
    res = search(ref_ev, "random", Termination(max_evals=evals), seed=seed + 100)
    out["in_process"] = {"evals_per_min": 60.0 * res.n_evals / (time.perf_counter() - t0),
                         "eval_s_mean": res.eval_s / res.n_evals}
    del ref_ev
    torch.set_num_threads(1)  # the driver only waits
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        out["workers_1"] = _driven(url, model, space, evaluator, 1, cores, evals, seed)
        if cores > 1:  # separates the gain of a second process from that of fewer threads per process
            out["workers_1x1"] = _driven(url, model, space, evaluator, 1, 1, evals, seed + 2)
        out["workers_2"] = _driven(url, model, space, evaluator, 2, max(1, cores // 2), evals, seed + 1)
    best_1 = max(out[k]["evals_per_min"] for k in ("workers_1", "workers_1x1") if k in out)
    out["speedup_2_vs_1"] = out["workers_2"]["evals_per_min"] / out["workers_1"]["evals_per_min"]
    out["speedup_2_vs_best_1"] = out["workers_2"]["evals_per_min"] / best_1
    return out


def ops_overhead(url: str, space, n: int) -> dict:
    """Storage operations of one trial's round trip, timed one by one in a single process."""
    store = TrialStore(space, url, f"ops-{uuid.uuid4().hex[:8]}")
    names = [d.name for d in space.decisions]
    driver = optuna.load_study(study_name=store.study_name, storage=url)
    worker_storage = optuna.storages.RDBStorage(url)
    worker = optuna.load_study(study_name=store.study_name, storage=worker_storage)
    times = {"enqueue": [], "claim": [], "complete": [], "collect": []}
    for i in range(n):
        cand = tuple(d.choices[(i + j) % len(d.choices)] for j, d in enumerate(space.decisions))
        t0 = time.perf_counter()
        driver.enqueue_trial(dict(zip(names, cand)), user_attrs={"strategy": "bench", "seed": 0, "order": i})
        t1 = time.perf_counter()
        waiting = worker.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        ok = swap_state(worker_storage, frozen_trial_id(waiting[0]), TrialState.WAITING, TrialState.RUNNING, claimant="bench")
        t2 = time.perf_counter()
        assert ok
        complete(worker_storage, frozen_trial_id(waiting[0]), dict(zip(names, cand)), store.distributions,
                  {"avg_bits": 4.0, "wall_s": 0.0, "cached": False, "strategy": "bench", "seed": 0, "order": i},
                  [1000.0, 0.5])
        t3 = time.perf_counter()
        seen = driver.get_trials(deepcopy=False)[-1]
        t4 = time.perf_counter()
        assert seen.state == TrialState.COMPLETE
        for k, a, b in (("enqueue", t0, t1), ("claim", t1, t2), ("complete", t2, t3), ("collect", t3, t4)):
            times[k].append(b - a)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["total"] = sum(out.values())
    return out


def e2e_overhead(url: str, task_spec: str, space, evaluator, n: int) -> dict:
    r = _driven(url, task_spec, space, evaluator, 1, 1, n, seed=0)
    per = (r["driver_span_s"] - r["eval_s_mean"] * r["n"]) / r["n"]
    return {"n": r["n"], "per_trial_s": per, "eval_s_mean": r["eval_s_mean"], "driver_span_s": r["driver_span_s"]}


def overhead(n_ops: int, n_e2e: int, with_pg: bool) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "tiny_task.py"
        spec_path.write_text(TINY_TASK)
        spec = f"{spec_path}:make_task"
        task = load_task(spec)
        space = space_for(task)
        evaluator = Evaluator(task, space)
        backends = [("sqlite", f"sqlite:///{Path(tmp) / 'overhead.db'}", None)]
        server = None
        if with_pg:
            try:
                from pg import PostgresServer, Unavailable

                server = PostgresServer(durable=True).start()
                backends.append(("postgresql", server.url, None))
            except Exception as exc:  # Unavailable, or psycopg missing
                out["postgresql"] = {"skipped": str(exc).splitlines()[0]}
                if server is not None:
                    server.stop()
                server = None
        try:
            for name, url, _ in backends:
                out[name] = {"ops": ops_overhead(url, space, n_ops), "e2e": e2e_overhead(url, spec, space, evaluator, n_e2e),
                             "decisions": len(space.decisions)}
        finally:
            if server is not None:
                server.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--evals", type=int, default=24, help="evaluations per throughput run")
    ap.add_argument("--ops", type=int, default=100, help="trials for the storage-operation timings")
    ap.add_argument("--overhead-evals", type=int, default=200, help="trials for the end-to-end overhead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    quiet_optuna()
    import warnings

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    res = {"load_avg_start": os.getloadavg()}
    if not args.skip_throughput:
        res["throughput"] = throughput(args.model, args.evals, args.seed)
    res["overhead"] = overhead(args.ops, args.overhead_evals, not args.no_postgres)
    res["load_avg_end"] = os.getloadavg()
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"load average at start {res['load_avg_start'][0]:.1f}, at end {res['load_avg_end'][0]:.1f} "
          f"({os.cpu_count()} cores)")
    tp = res.get("throughput")
    if tp:
        print(f"\nthroughput: {tp['model']}, random search, {tp['evals']} evaluations")
        print(f"  {'setup':<34}{'evals/min':>10}{'s/eval':>9}")
        print(f"  {'in process (no storage)':<34}{tp['in_process']['evals_per_min']:>10.1f}"
              f"{tp['in_process']['eval_s_mean']:>9.3f}")
        for k in ("workers_1", "workers_1x1", "workers_2"):
            if k not in tp:
                continue
            w = tp[k]
            label = f"{w['n_workers']} worker(s) x {w['threads_per_worker']} thread(s)"
            print(f"  {label:<34}{w['evals_per_min']:>10.1f}{w['eval_s_mean']:>9.3f}")
        print(f"  speedup 2 workers vs 1 worker with all cores: {tp['speedup_2_vs_1']:.2f}x; "
              f"vs the best 1-worker setup: {tp['speedup_2_vs_best_1']:.2f}x")
    print("\ncoordination overhead per trial (trivial evaluation), milliseconds")
    print(f"  {'storage':<12}{'enqueue':>9}{'claim':>9}{'complete':>10}{'collect':>9}{'ops sum':>9}{'end-to-end':>12}")
    for name, o in res["overhead"].items():
        if "skipped" in o:
            print(f"  {name:<12}skipped: {o['skipped']}")
            continue
        ops, e2e = o["ops"], o["e2e"]
        print(f"  {name:<12}{ops['enqueue'] * 1e3:>9.2f}{ops['claim'] * 1e3:>9.2f}{ops['complete'] * 1e3:>10.2f}"
              f"{ops['collect'] * 1e3:>9.2f}{ops['total'] * 1e3:>9.2f}{e2e['per_trial_s'] * 1e3:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
