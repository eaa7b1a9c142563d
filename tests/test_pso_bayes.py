"""pso (pyswarms) and bayes (optuna) strategies on the real digits_small task."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mpsearch.errors import OptionError

from mpsearch.core import Budget
from mpsearch.search import Termination, search
from mpsearch.strategies import SearchContext, get_strategy

BUDGET = Budget(max_avg_bits=3.0)
ROOT = Path(__file__).resolve().parent.parent


def run(space, evaluator, name, n, seed=0, budget=BUDGET, **options):
    return search(evaluator, get_strategy(name, **options), Termination(max_evals=n), seed=seed, budget=budget)


def cands(result):
    return [t.candidate for t in result.trials]


def check_run(result, n, budget=BUDGET):
    assert result.n_evals == n
    assert result.stop_reason == "max evaluations"
    assert len(set(cands(result))) == n, "a candidate was evaluated twice"
    if budget is not None:
        best = result.best()
        assert best is not None and best.avg_bits <= budget.max_avg_bits + 1e-9
        # both strategies repair on the exact size tables: nothing over budget is ever evaluated
        assert all(t.avg_bits <= budget.max_avg_bits + 1e-9 for t in result.trials)


def test_population_size_checks_match_one_candidate_checks(digits_small_space, digits_small_evaluator):
    """The vectorised size lookups and budget rule that strategies use agree with the per-candidate ones,
    and the shared repair always lands inside the budget without raising any decision."""
    sizes = digits_small_evaluator.sizes
    ctx = SearchContext(digits_small_space, sizes, BUDGET, 0, None, 1.0)
    rng = np.random.default_rng(0)
    cs = [digits_small_space.random(rng) for _ in range(50)]
    idx = np.array([digits_small_space.encode(c) for c in cs])
    assert sizes.bytes_idx(idx).tolist() == [sizes.size_bytes(c) for c in cs]
    assert sizes.avg_bits_idx(idx).tolist() == [sizes.avg_bits(c) for c in cs]
    assert ctx.feasible_idx(idx).tolist() == [BUDGET.feasible(sizes, c) for c in cs]
    s = get_strategy("random")
    s.setup(ctx)
    for i in idx:
        fixed = s.repaired(i)
        assert BUDGET.feasible(sizes, digits_small_space.decode(fixed))
        assert (fixed <= i).all()


# ---- pso -------------------------------------------------------------------------------
def test_pso_budget_run(digits_small_space, digits_small_evaluator):
    r = run(digits_small_space, digits_small_evaluator, "pso", 48)
    check_run(r, 48)
    # projection onto the budget's boundary: most candidates use nearly all of it
    assert np.median([t.avg_bits for t in r.trials]) > 2.6
    assert r.best().metric >= 0.98


def test_pso_deterministic_and_seeded(digits_small_space, digits_small_evaluator):
    a = run(digits_small_space, digits_small_evaluator, "pso", 40, seed=0)
    np.random.seed(12345)  # the global RNG's state must not matter
    b = run(digits_small_space, digits_small_evaluator, "pso", 40, seed=0)
    c = run(digits_small_space, digits_small_evaluator, "pso", 40, seed=1)
    assert cands(a) == cands(b)
    assert cands(a) != cands(c)


def test_pso_front_mode(digits_small_space, digits_small_evaluator):
    r = run(digits_small_space, digits_small_evaluator, "pso", 48, budget=None)
    check_run(r, 48, budget=None)
    bits = [t.avg_bits for t in r.trials]
    # particles carry their own size caps, so the swarm spreads over the size range
    assert min(bits) < 3.0 and max(bits) > 5.0
    assert r.hypervolume > 0.9


def test_pso_leaves_global_rng_and_logging_alone(digits_small_space, digits_small_evaluator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    np.random.seed(7)
    before = np.random.get_state()
    run(digits_small_space, digits_small_evaluator, "pso", 24, seed=3, n_particles=8)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    assert list(root.handlers) == handlers and root.level == level
    assert not (tmp_path / "report.log").exists()


def test_pso_import_writes_no_report_log(tmp_path):
    """A fresh interpreter: importing pyswarms through the strategy must not configure logging."""
    code = textwrap.dedent("""
        import logging, os
        import numpy as np
        from torch import nn
        from mpsearch.model import build_space
        from mpsearch.core import SizeTable
        from mpsearch.core import Evaluation
        from mpsearch.strategies import SearchContext, get_strategy
        root = logging.getLogger()
        h, lvl = list(root.handlers), root.level
        space = build_space(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), (2, 4, 8))
        size = SizeTable(space)
        s = get_strategy("pso", n_particles=4)
        s.setup(SearchContext(space, size, None, 0, 10, 1.0))
        for _ in range(3):
            batch = s.ask()
            s.tell([Evaluation(c, size.size_bytes(c), size.avg_bits(c), sum(c) / 16, 0.0) for c in batch])
        import pyswarms.backend  # noqa: F401  (already imported by the strategy)
        assert list(root.handlers) == h and root.level == lvl, (root.handlers, root.level)
        assert not os.path.exists("report.log")
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert not (tmp_path / "report.log").exists()


# ---- bayes -----------------------------------------------------------------------------
def test_bayes_tpe_budget_run(digits_small_space, digits_small_evaluator):
    r = run(digits_small_space, digits_small_evaluator, "bayes", 40)
    check_run(r, 40)
    # warm start: the feasible uniform candidates come first, widest first
    sizes = digits_small_evaluator.sizes
    warm = [digits_small_space.uniform(b) for b in reversed(digits_small_space.uniform_choices())
            if BUDGET.feasible(sizes, digits_small_space.uniform(b))]
    assert warm and cands(r)[:len(warm)] == warm
    assert r.best().metric >= 0.96


@pytest.mark.parametrize("local_share", [0.0, 0.5])
def test_bayes_sampler_asks_per_evaluation(digits_small_space, digits_small_evaluator, local_share):
    """A known suggestion enqueues a near new candidate instead of asking TPE again (the costly part),
    and local moves take their share of the candidates without asking TPE at all."""
    s = get_strategy("bayes", local_share=local_share)
    r = search(digits_small_evaluator, s, Termination(max_evals=80), seed=0, budget=BUDGET)
    check_run(r, 80)
    trials = s.study.trials
    fixed = ["fixed_params" in t.system_attrs for t in trials]
    seen, known = set(), []
    for k, t in enumerate(trials):
        if t.state.name != "COMPLETE":
            continue
        c = digits_small_space.decode([int(t.params[f"d{j}"]) for j in range(digits_small_space.n_decisions)])
        if not fixed[k] and c in seen:
            known.append(k)
        seen.add(c)
    if local_share == 0.0:
        assert known, "the run never re-proposed a known candidate, so this test checks nothing"
    # after a known suggestion the next trial is an enqueued near (or random new) one, not another sample
    assert all(fixed[k + 1] for k in known if k + 1 < len(trials))
    sampled = [t for t, f in zip(trials, fixed) if not f]
    infeasible = [t for t in sampled if (t.constraints or {}).get("size", 0) > 0]
    assert len(sampled) <= r.n_evals * (1 - local_share) + len(infeasible) + len(known) + 1
    # TPE's coordinates are in [0, n_choices) and floor to the evaluated indices
    for t in trials:
        if t.state.name == "COMPLETE" and not (t.constraints or {}).get("size", 0) > 0:
            idx = [int(t.params[f"d{j}"]) for j in range(digits_small_space.n_decisions)]
            assert digits_small_space.decode(idx) in s.archive


def test_bayes_deterministic_and_seeded(digits_small_space, digits_small_evaluator):
    a = run(digits_small_space, digits_small_evaluator, "bayes", 25, seed=0)
    b = run(digits_small_space, digits_small_evaluator, "bayes", 25, seed=0)
    c = run(digits_small_space, digits_small_evaluator, "bayes", 25, seed=1)
    assert cands(a) == cands(b)
    assert cands(a) != cands(c)


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2"])
def test_bayes_samplers_run(digits_small_space, digits_small_evaluator, sampler):
    r = run(digits_small_space, digits_small_evaluator, "bayes", 11, seed=2, sampler=sampler, n_startup_trials=8)
    check_run(r, 11)
    f = run(digits_small_space, digits_small_evaluator, "bayes", 10, seed=2, budget=None, sampler=sampler,
            n_startup_trials=8)
    check_run(f, 10, budget=None)
    assert f.hypervolume > 0.8


def test_bayes_batches_and_options(digits_small_space, digits_small_evaluator):
    ctx = SearchContext(digits_small_space, digits_small_evaluator.sizes, BUDGET, 0, 20,
                        digits_small_evaluator.reference_metric)
    s = get_strategy("bayes", batch_size=4, warm_start=None)
    s.setup(ctx)
    batch = s.ask()
    assert len(batch) == 4 and len(set(batch)) == 4
    assert all(BUDGET.feasible(ctx.sizes, c) for c in batch)
    r = run(digits_small_space, digits_small_evaluator, "bayes", 20, batch_size=4,
            warm_start=[(8, 2, 2, 2, 2, 8), (4, 4, 2, 2, 4, 4)])
    check_run(r, 20)
    assert cands(r)[0] == (8, 2, 2, 2, 2, 8)  # warm-start list, feasible
    with pytest.raises(OptionError, match="sampler"):
        get_strategy("bayes", sampler="cmaes")
