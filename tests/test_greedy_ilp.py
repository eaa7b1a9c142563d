"""greedy and ilp on the real digits_small task (6 decisions x {2, 3, 4, 8} bits = 4,096 candidates)."""
from __future__ import annotations

import numpy as np
import pytest

from mpsearch.core import Budget
from mpsearch.search import Termination, search
from mpsearch.strategies import get_strategy

BUDGET = Budget(max_avg_bits=3.0)


def run(space, evaluator, name, n, budget=BUDGET, seed=0):
    st = get_strategy(name)
    res = search(evaluator, st, Termination(max_evals=n), seed=seed, budget=budget)
    return st, res


@pytest.mark.parametrize("name", ["greedy", "ilp"])
def test_budget_respected_no_repeats_and_deterministic(digits_small_space, digits_small_evaluator, name):
    st, res = run(digits_small_space, digits_small_evaluator, name, 40)
    best = res.best()
    assert best is not None
    assert best.avg_bits <= 3.0 + 1e-9
    assert digits_small_evaluator.sizes.avg_bits(best.candidate) <= 3.0 + 1e-9
    cands = [t.candidate for t in res.trials]
    assert len(cands) == len(set(cands)), "a candidate was evaluated twice"
    assert len(cands) <= 40
    # phase 2 did propose something beyond the sensitivity measurements
    assert set(cands) - set(st.sens.plan)
    # the best is at least as good as the best feasible sensitivity point and as uniform 3-bit
    uniform3 = digits_small_evaluator.evaluate(digits_small_space.uniform(3)).metric
    assert best.metric >= uniform3 - 0.02
    st2, res2 = run(digits_small_space, digits_small_evaluator, name, 40)
    assert [t.candidate for t in res2.trials] == cands
    assert [t.metric for t in res2.trials] == [t.metric for t in res.trials]


@pytest.mark.parametrize("name", ["greedy", "ilp"])
@pytest.mark.parametrize("budget", [None, BUDGET])
def test_stops_at_max_evals(digits_small_space, digits_small_evaluator, name, budget):
    # 15 < 19 phase-1 measurements: the strategy measures a subset and still leaves room for phase 2
    st, res = run(digits_small_space, digits_small_evaluator, name, 15, budget=budget)
    assert res.n_evals <= 15
    assert len(st.sens.plan) < st.sens.n_full
    assert len(st.sens.plan) <= 15
    assert st.sens.plan[0] == digits_small_space.highest()
    if budget is None:  # front mode always has candidates left to try here
        assert res.n_evals == 15 and res.stop_reason == "max evaluations"
    # each decision's lowest choice is measured first
    lowest = {(d, 0) for d in range(digits_small_space.n_decisions)}
    assert lowest <= set(st.sens.pairs)


def test_sensitivities_are_single_decision_drops(digits_small_space, digits_small_evaluator):
    st, res = run(digits_small_space, digits_small_evaluator, "greedy", 40, budget=None)
    space = digits_small_space
    n_full = 1 + sum(d.n_choices - 1 for d in space.decisions)
    assert len(st.sens.plan) == n_full  # 19 measurements fit in 40 evaluations
    assert [t.candidate for t in res.trials[:n_full]] == list(st.sens.plan)
    top = space.highest()
    top_metric = digits_small_evaluator.evaluate(top).metric
    for (d, i), loss in st.sens.raw_loss().items():
        c = list(top)
        c[d] = space.decisions[d].choices[i]
        assert loss == pytest.approx(top_metric - digits_small_evaluator.evaluate(tuple(c)).metric)
        assert st.sens.loss[d][i] >= 0
    for t in st.sens.loss:
        assert t[-1] == 0 and np.all(np.diff(t) <= 1e-12)  # lower choices never lose less


@pytest.mark.parametrize("budget", [Budget(max_avg_bits=3.0), Budget(max_avg_bits=4.0), Budget(max_bytes=20_000)])
def test_ilp_budget_solution_is_proxy_optimal(digits_small_space, digits_small_evaluator, budget):
    st, res = run(digits_small_space, digits_small_evaluator, "ilp", 25, budget=budget)
    size = digits_small_evaluator.sizes
    assert st.optimum is not None and budget.feasible(size, st.optimum)
    cands = list(digits_small_space.enumerate())
    idx = np.array([digits_small_space.encode(c) for c in cands])
    ok = np.array([budget.feasible(size, c) for c in cands])
    proxy = sum(st.sens.loss[d][idx[:, d]] for d in range(idx.shape[1]))
    objective = sum(st.objective_table[d][idx[:, d]] for d in range(idx.shape[1]))
    assert st.objective_of(st.optimum) == pytest.approx(objective[ok].min(), rel=1e-9, abs=1e-12)
    # the tie-break never costs proxy quality beyond its own tiny weight
    assert st.sens.proxy(st.optimum) <= proxy[ok].min() + 1e-6
    # the optimum is the first candidate phase 2 evaluated (unless phase 1 had measured it)
    n1 = len(st.sens.plan)
    if st.optimum not in st.sens.plan:
        assert res.trials[n1].candidate == st.optimum


def test_ilp_front_sweep_is_proxy_optimal(digits_small_space, digits_small_evaluator):
    st, res = run(digits_small_space, digits_small_evaluator, "ilp", 40, budget=None)
    size = digits_small_evaluator.sizes
    cands = list(digits_small_space.enumerate())
    idx = np.array([digits_small_space.encode(c) for c in cands])
    sizes = np.array([size.size_bytes(c) for c in cands])
    objective = sum(st.objective_table[d][idx[:, d]] for d in range(idx.shape[1]))
    for level in st._levels_done[:10]:
        c = st.solve(level)
        assert size.size_bytes(c) <= level
        assert st.objective_of(c) == pytest.approx(objective[sizes <= level].min(), rel=1e-9, abs=1e-12)


def test_greedy_path_goes_down(digits_small_space, digits_small_evaluator):
    st, res = run(digits_small_space, digits_small_evaluator, "greedy", 40)
    space, size = digits_small_space, digits_small_evaluator.sizes
    path = st.path
    assert len(path) == 1 + sum(d.n_choices - 1 for d in space.decisions)
    assert path[0] == space.highest() and path[-1] == space.lowest()
    sizes = [size.size_bytes(c) for c in path]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert sizes == st.path_sizes
    for a, b in zip(path, path[1:]):  # one decision, one step down
        ea, eb = space.encode(a), space.encode(b)
        diff = [x - y for x, y in zip(ea, eb)]
        assert sorted(diff) == [0] * (len(diff) - 1) + [1]
    # the proxy loss along the path never decreases, and each step was the cheapest per byte
    assert all(x <= y + 1e-12 for x, y in zip(st.path_loss, st.path_loss[1:]))
    # the boundary found by bisection is the first feasible path point, and it was evaluated
    feas = [BUDGET.feasible(size, c) for c in path]
    assert st.boundary == feas.index(True)
    assert path[st.boundary] in {t.candidate for t in res.trials}
