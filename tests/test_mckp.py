"""The knapsack table behind ilp: exact against enumeration, and the same runs as milp."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpsearch.core import Budget
from mpsearch.search import Termination, search
from mpsearch.strategies import get_strategy
from mpsearch.strategies.mckp import KnapsackTable


def brute(costs, weights, cap, force=None):
    best = None
    for x in itertools.product(*[range(len(c)) for c in costs]):
        if force is not None and x[force[0]] != force[1]:
            continue
        if sum(weights[g][i] for g, i in enumerate(x)) > cap:
            continue
        v = sum(costs[g][i] for g, i in enumerate(x))
        if best is None or v < best - 1e-12:
            best = v
    return best


def test_table_is_exact_against_enumeration():
    rng = np.random.default_rng(3)
    checked = 0
    for t in range(150):
        g, k = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        costs = [rng.random(k) * rng.choice([1.0, 50.0]) for _ in range(g)]
        if t % 3 == 0:  # exact ties
            costs = [np.round(c * 2) / 2 for c in costs]
        weights = [rng.integers(0, 20, k) * int(rng.choice([1, 6])) + int(rng.integers(0, 9)) for _ in range(g)]
        top = sum(int(w.max()) for w in weights)
        cap = float(rng.integers(0, top + 5))
        table = KnapsackTable(costs, weights, cap)
        assert table.applicable
        queries = [(cap, None), (cap * 0.5, None)] + [(cap, (int(rng.integers(g)), int(rng.integers(k)))) for _ in range(3)]
        for c, force in queries:
            x = table.solve(c, force)
            want = brute(costs, weights, c, force)
            if want is None:
                assert x is None
                continue
            assert x is not None
            assert sum(weights[j][i] for j, i in enumerate(x)) <= c
            if force is not None:
                assert x[force[0]] == force[1]
            assert sum(costs[j][i] for j, i in enumerate(x)) == pytest.approx(want, rel=1e-12, abs=1e-12)
            checked += 1
    assert checked > 200


def test_table_refuses_a_capacity_beyond_it_and_needs_integer_weights():
    costs = [np.array([3.0, 1.0, 0.0])] * 3
    weights = [np.array([1, 2, 4])] * 3
    table = KnapsackTable(costs, weights, 6)
    assert table.solve(6) is not None
    assert not table.covers(9)
    with pytest.raises(ValueError):
        table.solve(9)
    assert KnapsackTable(costs, weights, 100).solve(100) == [2, 2, 2]  # room for all: every heaviest choice
    assert KnapsackTable(costs, weights, 2).solve(2) is None  # the lightest choices weigh 3
    with pytest.raises(ValueError):
        KnapsackTable(costs, [np.array([1.0, 2.5, 4.0])] * 3, 6)


@pytest.mark.parametrize("limit", ["avg_bits", "bytes", None])
def test_ilp_table_and_milp_solve_the_same_programs(digits_small_space, digits_small_evaluator, limit):
    """The knapsack table and HiGHS find optima of equal value for every program a run poses (where the proxy
    has ties, either optimum may come back), and single-limit programs never reach milp."""
    size = digits_small_evaluator.sizes
    budget = {"avg_bits": Budget(max_avg_bits=3.0), None: None,
              "bytes": Budget(max_bytes=(size.min_size_bytes() + size.size_bytes(digits_small_space.highest())) // 2)}[limit]
    st = get_strategy("ilp")
    milp_calls = []
    real = st._solve_milp
    st._solve_milp = lambda *a: milp_calls.append(a) or real(*a)
    programs = []
    real_solve = st._solve
    st._solve = lambda *a: programs.append(a) or real_solve(*a)
    search(digits_small_evaluator, st, Termination(max_evals=60), seed=0, budget=budget)
    assert programs and not milp_calls, "a single-limit program went to milp instead of the knapsack table"
    checked = 0
    for max_bytes, max_avg_bits, force in programs:
        by_table = st._solve_knapsack(max_bytes, max_avg_bits, force)
        by_milp = real(max_bytes, max_avg_bits, force)
        assert (by_table is None) == (by_milp is None)
        if by_table is None:
            continue
        cost = lambda idx: sum(st.objective_table[d][i] for d, i in enumerate(idx))  # noqa: E731
        assert cost(by_table) == pytest.approx(cost(by_milp), rel=1e-9, abs=1e-12)
        checked += 1
    assert checked > 0
