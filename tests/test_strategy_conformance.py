"""Every registered strategy keeps the same contract, on the real digits_small space."""
from __future__ import annotations

import pytest

from mpsearch.core import Budget
from mpsearch.search import Termination, search
from mpsearch.strategies import REGISTRY, get_strategy

NAMES = sorted(REGISTRY)


def test_registry_holds_every_strategy_of_the_brief():
    assert {"greedy", "pso", "bayes", "ilp", "random", "uniform", "exhaustive"} <= set(NAMES)


def _run(space, evaluator, name, seed, n, budget=None):
    return search(evaluator, get_strategy(name), Termination(max_evals=n), seed=seed, budget=budget)


@pytest.mark.parametrize("name", NAMES)
def test_respects_the_budget_and_never_asks_twice(name, digits_small_space, digits_small_evaluator):
    budget = Budget(max_avg_bits=3.0)
    r = _run(digits_small_space, digits_small_evaluator, name, 0, 40, budget)
    assert 1 <= r.n_evals <= 40
    cands = [t.candidate for t in r.trials]
    assert len(set(cands)) == len(cands), "a candidate was evaluated twice in one run"
    best = r.best()
    assert best is not None and best.avg_bits <= 3.0 + 1e-9
    if name in ("uniform", "random", "exhaustive", "pso", "bayes"):
        # these only ask feasible candidates; greedy and ilp also measure sensitivities above the budget
        assert all(budget.feasible(digits_small_evaluator.sizes, c) for c in cands)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed(name, digits_small_space, digits_small_evaluator):
    a = _run(digits_small_space, digits_small_evaluator, name, 3, 30)
    b = _run(digits_small_space, digits_small_evaluator, name, 3, 30)
    assert [t.candidate for t in a.trials] == [t.candidate for t in b.trials]


@pytest.mark.parametrize("name", NAMES)
def test_stops_at_its_termination(name, digits_small_space, digits_small_evaluator):
    r = _run(digits_small_space, digits_small_evaluator, name, 1, 25)
    assert r.n_evals <= 25
    if name != "uniform":  # uniform has only 4 candidates to ask
        assert r.n_evals == 25 and r.stop_reason == "max evaluations"
