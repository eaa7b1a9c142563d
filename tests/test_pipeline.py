"""The one pipeline: optimize(), fronts and knees, the loop's terminations, and no side effects on the user's objects."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mpsearch
from mpsearch.core import Budget, Evaluation, ParetoFront, SizeTable, pareto_front
from mpsearch.core.synthetic import SyntheticObjective, synthetic_space
from mpsearch.errors import MPSearchError, StorageError
from mpsearch.search import MAX_STALLS, Termination, search
from mpsearch.strategies import Strategy


def ev(size, metric, cand=None, error=None):
    return Evaluation(cand or (size,), size, 4.0, metric, 0.0, error=error)


# ---- fronts ---------------------------------------------------------------------------------------
def test_front_keeps_exactly_the_non_dominated_points():
    pts = [ev(10, 0.5), ev(20, 0.7), ev(15, 0.4), ev(30, 0.7), ev(40, 0.9), ev(5, 0.1), ev(25, 0.65)]
    front = pareto_front(pts)
    assert [(p.size_bytes, p.metric) for p in front] == [(5, 0.1), (10, 0.5), (20, 0.7), (40, 0.9)]
    # brute force: a point is on the front iff nothing is at most as large and strictly better, or smaller and as good
    for p in pts:
        dominated = any((q.size_bytes <= p.size_bytes and q.metric > p.metric)
                        or (q.size_bytes < p.size_bytes and q.metric >= p.metric) for q in pts)
        assert (p in front) == (not dominated)


def test_front_ignores_failures_and_ties_break_on_the_candidate():
    pts = [ev(10, 0.5, (2, 2)), ev(10, 0.5, (1, 3)), ev(8, 0.9, (0, 0), error="boom")]
    assert [p.candidate for p in pareto_front(pts)] == [(1, 3)]
    assert [p.candidate for p in pareto_front(reversed(pts))] == [(1, 3)]


def test_hypervolume_of_a_staircase():
    # sizes as fractions of 100 bytes, accuracy against a reference of 1.0: area under the staircase to (1, 0)
    f = ParetoFront([ev(50, 0.8), ev(25, 0.5)], full_precision_bytes=100, reference_metric=1.0, metric_name="accuracy")
    assert f.hypervolume() == pytest.approx(0.25 * 0.5 + 0.5 * 0.8)
    assert ParetoFront([], 100, 1.0).hypervolume() == 0.0


def test_knee_is_the_point_farthest_from_the_chord():
    pts = [ev(10, 0.0), ev(20, 0.9), ev(50, 0.95), ev(100, 1.0)]
    assert ParetoFront(pts, 100, 1.0, "accuracy").knee().size_bytes == 20
    assert ParetoFront(pts[:2], 100, 1.0).knee().size_bytes == 20  # two points: the larger
    assert ParetoFront([], 100, 1.0).knee() is None


def test_best_within_uses_the_one_budget_rule():
    pts = [Evaluation((1,), 10, 3.0 + 5e-10, 0.6, 0.0), Evaluation((2,), 12, 3.2, 0.9, 0.0)]
    f = ParetoFront(pts, 100, 1.0)
    assert f.best_within(Budget(max_avg_bits=3.0)).candidate == (1,)  # within the tolerance
    assert f.best_within(Budget(max_bytes=9)) is None


# ---- the loop -------------------------------------------------------------------------------------
def test_wall_time_termination():
    obj = SyntheticObjective(synthetic_space(12, (2, 3, 4, 5, 6, 8)), cost_s=0.01)
    r = search(obj, "random", Termination(max_evals=10**6, wall_s=0.3), seed=0)
    assert r.stop_reason == "wall time"
    assert 1 <= r.n_evals < 10**6


class Stuck(Strategy):
    """Asks the same candidate forever: the loop must give up on it."""

    name = "stuck"

    def ask(self):
        return [self.space.lowest()]


def test_stall_stop():
    obj = SyntheticObjective(synthetic_space(6, (2, 4, 8)))
    r = search(obj, Stuck(), Termination(max_evals=100), seed=0)
    assert r.n_evals == 1 and r.stop_reason == "strategy proposes nothing new"
    assert MAX_STALLS >= 10


class Interrupted(Strategy):
    """A user presses Ctrl-C after a few evaluations."""

    name = "interrupted"

    def ask(self):
        if len(self.seen) >= 3:
            raise KeyboardInterrupt
        return self.new([self.space.random(self.rng)])


def test_ctrl_c_keeps_what_was_evaluated():
    obj = SyntheticObjective(synthetic_space(6, (2, 4, 8)))
    r = search(obj, Interrupted(), Termination(max_evals=100), seed=0)
    assert r.stop_reason == "interrupted" and r.n_evals == 3


def test_resume_into_a_study_of_another_space_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    a = SyntheticObjective(synthetic_space(6, (2, 4, 8)))
    search(a, "random", Termination(max_evals=5), storage=url, study_name="s")
    b = SyntheticObjective(synthetic_space(6, (2, 3, 4, 8)))
    with pytest.raises(StorageError, match="another search space"):
        search(b, "random", Termination(max_evals=5), storage=url, study_name="s")
    again = search(SyntheticObjective(synthetic_space(6, (2, 4, 8))), "random", Termination(max_evals=5), storage=url,
                   study_name="s")
    assert again.n_resumed == 5


def test_optimize_takes_a_synthetic_evaluator():
    obj = SyntheticObjective(synthetic_space(8, (2, 4, 8)))
    res = mpsearch.optimize(None, evaluator=obj, strategy="pso", budget=Budget(max_avg_bits=3.0), max_evals=30)
    assert res.best() is not None and res.best().avg_bits <= 3.0 + 1e-9
    assert res.point == "best within budget" and len(res.baselines) == 3
    assert res.plan().predicted["validation_metric"] == obj.validation_metric(res.best().candidate)


# ---- optimize on a real model ----------------------------------------------------------------------
@pytest.fixture()
def digits():
    return mpsearch.load_task("digits")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_optimize_end_to_end_leaves_the_model_as_it_was(digits):
    before = _weights(digits.model)
    res = mpsearch.optimize(digits, strategy="greedy", budget=mpsearch.Budget(max_avg_bits=3.0), max_evals=40)
    after = _weights(digits.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    best = res.best()
    assert best.avg_bits <= 3.0 + 1e-9 and res.point == "best within budget"
    plan = res.plan()
    assert plan.predicted["size_bytes"] == best.size_bytes
    assert plan.predicted["validation_metric"] == res.chosen_validation_metric
    assert [round(u.avg_bits - b, 6) for u, b in zip(res.baselines, (2, 3, 4, 5, 6, 8))] == [0.115149] * 6  # scales
    s = res.summary()
    assert s["best"]["point"] == "best within budget" and s["n_evals"] == res.search.n_evals
    # without a budget: the knee of the front is chosen
    knee = mpsearch.optimize(digits, strategy="random", max_evals=20)
    assert knee.point == "knee of the front" and knee.best() in knee.front.points


def test_optimize_takes_a_bare_module(digits):
    x, y = digits.calibration[0]
    res = mpsearch.optimize(digits.model, calibration=[(x, y)], validation=digits.validation, metric="accuracy",
                            strategy="uniform", max_evals=10)
    assert res.search.metric_name == "accuracy" and res.search.n_evals == 6


def test_apply_returns_a_quantized_copy(digits):
    from mpsearch.plan import apply

    res = mpsearch.optimize(digits, strategy="uniform", budget=mpsearch.Budget(max_avg_bits=4), max_evals=10)
    before = _weights(digits.model)
    q = apply(res.plan(), digits.model)
    assert q is not digits.model
    assert all(torch.equal(before[k], v) for k, v in _weights(digits.model).items())
    assert not torch.equal(q.features[0].weight, digits.model.features[0].weight)


def test_a_space_of_another_model_is_refused(digits):
    from mpsearch.evaluator import Evaluator
    from mpsearch.model import build_space

    other = build_space(torch.nn.Sequential(torch.nn.Linear(4, 4)), [2, 4])
    with pytest.raises(MPSearchError, match="another model"):
        Evaluator(digits, other)


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_bad_seed_is_refused(digits, seed):
    with pytest.raises(MPSearchError, match="seed"):
        mpsearch.optimize(digits, seed=seed, max_evals=1)


def test_a_bayes_search_stops_when_the_feasible_set_is_exhausted(digits):
    """729 candidates, 68 of them within 3 average bits: the run ends after those 68 (it used to spin)."""
    space = {"choices": [2, 4, 8], "quantizer": {"scheme": "symmetric", "granularity": "per-channel"}}
    res = mpsearch.optimize(digits, space=space, strategy="bayes", budget=mpsearch.Budget(max_avg_bits=3.0),
                            max_evals=300)
    r = res.search
    budget = mpsearch.Budget(max_avg_bits=3.0)
    assert res.search.n_evals == SizeTable(res.space).count_within(budget.fits) == 68
    assert r.stop_reason == "every feasible candidate evaluated"
    assert math.isfinite(res.best().metric)
    assert np.isclose(max(t.metric for t in r.trials), res.best().metric)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """README's example, executed verbatim: at most three imports, and it writes the plan."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert sum(1 for line in code.splitlines() if line.startswith(("import ", "from "))) <= 3
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert mpsearch.QuantizationPlan.load(tmp_path / "plan.json").predicted["avg_bits"] <= 3.0 + 1e-9
