"""Every registered strategy keeps the same contract: a sampler test suite on synthetic problems.

The problems need no model (``mpsearch.core.synthetic``), so each run takes milliseconds and
the suite covers every strategy on several shapes of space: small and enumerable, tied
decisions, many decisions, a byte budget, an average-bit budget and the whole front. One
test runs the same strategies with torch blocked from being imported at all.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mpsearch.core import Budget
from mpsearch.core.synthetic import SyntheticObjective, synthetic_space
from mpsearch.search import Termination, search
from mpsearch.strategies import REGISTRY, get_strategy

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(REGISTRY)
SEARCHING = ("greedy", "ilp", "pso", "bayes")

PROBLEMS = {
    "small": dict(n_layers=5, choices=(2, 4, 8)),  # 243 candidates
    "tied": dict(n_layers=8, choices=(2, 3, 4, 8), tie=[(0, 1, 2), (5, 6)]),
    "wide": dict(n_layers=40, choices=(2, 3, 4, 5, 6, 8)),
}


def objective(problem: str, seed: int = 0) -> SyntheticObjective:
    return SyntheticObjective(synthetic_space(seed=seed, **PROBLEMS[problem]), seed=seed)


def budgets(obj: SyntheticObjective) -> dict:
    sizes = obj.sizes
    mid = (sizes.min_size_bytes() + sizes.max_size_bytes()) // 2
    # 4.2 average bits: a share of random candidates fits even on the wide space (random samples by rejection)
    return {"front": None, "avg_bits": Budget(max_avg_bits=4.2), "bytes": Budget(max_bytes=int(mid))}


def run(obj, name, seed, n, budget=None):
    return search(obj, get_strategy(name), Termination(max_evals=n), seed=seed, budget=budget)


def test_registry_holds_every_strategy_of_the_brief():
    assert {"greedy", "pso", "bayes", "ilp", "random", "uniform", "exhaustive"} <= set(NAMES)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", NAMES)
def test_contract(name, problem):
    """Within budget, never the same candidate twice, the same sequence under the same seed, stops on time."""
    for kind, budget in budgets(objective(problem)).items():
        if name == "exhaustive" and problem == "wide":
            continue  # refuses spaces above its limit (tested below)
        obj = objective(problem)
        r = run(obj, name, 3, 40, budget)
        cands = [t.candidate for t in r.trials]
        assert 1 <= r.n_evals <= 40, (kind, r.stop_reason)
        assert len(set(cands)) == len(cands), f"{kind}: a candidate was evaluated twice in one run"
        assert obj.n_evaluated == r.n_evals  # each asked candidate cost exactly one evaluation
        if budget is not None:
            best = r.best()
            assert best is not None and budget.admits(best), kind
            if name not in ("greedy", "ilp"):  # they also measure sensitivities above the budget
                assert all(budget.admits(t) for t in r.trials), kind
        again = run(objective(problem), name, 3, 40, budget)
        assert [t.candidate for t in again.trials] == cands, f"{kind}: not deterministic under a seed"
        if name not in ("uniform", "exhaustive") and r.n_evals < 40:
            assert r.stop_reason in ("strategy finished", "every feasible candidate evaluated"), (kind, r.stop_reason)


@pytest.mark.parametrize("name", SEARCHING)
def test_searching_strategies_beat_uniform_under_a_budget(name):
    obj = objective("tied")
    budget = Budget(max_avg_bits=3.5)
    r = run(obj, name, 0, 60, budget)
    uniform = max(obj.evaluate(obj.space.uniform(b)).metric for b in obj.space.uniform_choices()
                  if budget.feasible(obj.sizes, obj.space.uniform(b)))
    assert r.best().metric >= uniform


@pytest.mark.parametrize("name", NAMES)
def test_stops_once_every_feasible_candidate_is_evaluated(name):
    """A tight budget on a small space: no strategy spins on repeats once nothing new fits."""
    obj = objective("small")
    budget = Budget(max_avg_bits=2.6)
    n_feasible = obj.sizes.count_within(budget.fits)
    assert 0 < n_feasible < 40
    r = run(obj, name, 0, 500, budget)
    assert r.n_evals <= n_feasible + (obj.space.n_decisions * 2 + 1 if name in ("greedy", "ilp") else 0)
    if name in ("random", "bayes", "pso", "exhaustive"):
        assert r.n_evals == n_feasible and r.stop_reason == "every feasible candidate evaluated"


def test_exhaustive_refuses_a_space_above_its_limit():
    from mpsearch.errors import MPSearchError

    with pytest.raises(MPSearchError, match="above the limit"):
        run(objective("wide"), "exhaustive", 0, 10)


TORCH_BLOCKED = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    from mpsearch.core import Budget
    from mpsearch.core.synthetic import SyntheticObjective, synthetic_space
    from mpsearch.search import Termination, search
    from mpsearch.strategies import REGISTRY, get_strategy
    for name in sorted(REGISTRY):
        for budget in (None, Budget(max_avg_bits=4.0)):
            obj = SyntheticObjective(synthetic_space(n_layers=6, choices=(2, 3, 4, 8)))
            r = search(obj, get_strategy(name), Termination(max_evals=30), seed=0, budget=budget)
            assert r.n_evals >= 1 and r.hypervolume > 0, (name, budget)
    import mpsearch
    assert mpsearch.optimize and mpsearch.Budget  # the lazy top-level names that need no torch
    print("ok", len(REGISTRY))
""")


def test_every_strategy_runs_with_torch_blocked():
    r = subprocess.run([sys.executable, "-c", TORCH_BLOCKED], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")
