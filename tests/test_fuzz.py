"""Property-based fuzzing of every input a user writes: space specs, plan documents, strategy options, budgets.

Each goes through the entry point the CLI uses. The property: the call succeeds, or it raises the
project's own one-line ``MPSearchError`` (exit code 2 from the CLI); never any other exception.
Plans that validate round-trip through JSON unchanged. Deterministic (``derandomize``), a bounded
number of examples per property, no deadline (these machines are noisy).
"""
from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpsearch.cli import _options
from mpsearch.core import Budget
from mpsearch.core.synthetic import SyntheticObjective, synthetic_space
from mpsearch.errors import MPSearchError
from mpsearch.search import Termination, search
from mpsearch.strategies import REGISTRY, get_strategy

EXAMPLES = int(__import__("os").environ.get("MPSEARCH_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

LAYERS = ["features.0", "features.2", "features.5", "classifier.1", "classifier.3", "classifier.5"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-40, 40), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["symmetric", "per-group", "Linear", "Conv2d", "8", "yes"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)
patterns = st.one_of(st.sampled_from(LAYERS + [r"features\.\d", r"classifier\..*", ".*", "(", "no.such", ""]),
                     st.text(max_size=6))
bits = st.one_of(st.sampled_from([1, 2, 3, 4, 8, 16, 32]), st.integers(-3, 40))
space_values = {
    "choices": st.one_of(st.lists(bits, max_size=5), json_values),
    "include": st.one_of(st.lists(patterns, max_size=3), patterns, json_values),
    "exclude": st.one_of(st.lists(patterns, max_size=2), json_values),
    "types": st.one_of(st.lists(st.sampled_from(["Linear", "Conv2d", "Conv1d", "Embedding", "GRU"]), max_size=3),
                       json_values),
    "pin": st.one_of(st.dictionaries(patterns, bits, max_size=2), json_values),
    "tie": st.one_of(st.lists(st.one_of(patterns, st.lists(patterns, max_size=3)), max_size=2), json_values),
    "limits": st.one_of(st.dictionaries(patterns, st.fixed_dictionaries({}, optional={"min": bits, "max": bits}),
                                        max_size=2), json_values),
    "layer_choices": st.one_of(st.dictionaries(patterns, st.lists(bits, max_size=3), max_size=2), json_values),
    "quantizer": st.one_of(st.fixed_dictionaries({}, optional={
        "scheme": st.sampled_from(["symmetric", "asymmetric", "odd"]),
        "granularity": st.sampled_from(["per-channel", "per-group", "per-tensor"]),
        "group_size": st.one_of(st.none(), st.integers(-2, 70)), "clip_search": st.one_of(st.booleans(), scalars),
        "scale_bits": st.one_of(st.just(16), bits), "zero_point_bits": bits}), json_values),
    "description": st.one_of(st.text(max_size=20), json_values),
    "bogus": json_values,
}
space_specs = st.fixed_dictionaries({}, optional=space_values)


@pytest.fixture(scope="module")
def digits_model():
    from mpsearch.tasks.digits import load_model

    return load_model()


@FUZZ
@given(spec=space_specs)
def test_space_specs(spec, digits_model):
    from mpsearch.core import SizeTable
    from mpsearch.model import space_from_spec

    try:
        space = space_from_spec(spec, digits_model, source="fuzz.yaml")
    except MPSearchError as exc:
        assert "\n" not in str(exc)
        return
    sizes = SizeTable(space)
    assert sizes.min_size_bytes() <= sizes.max_size_bytes()


@pytest.fixture(scope="module")
def plan_doc():
    import mpsearch

    res = mpsearch.optimize("digits", strategy="uniform", budget=mpsearch.Budget(max_avg_bits=4), max_evals=6)
    return res.plan().to_dict()


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def plan_documents(draw, base):
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return doc


@FUZZ
@given(data=st.data())
def test_plan_documents(data, plan_doc, tmp_path):
    from mpsearch.exporters import export
    from mpsearch.plan import QuantizationPlan, layer_table

    doc = data.draw(plan_documents(plan_doc))
    try:
        plan = QuantizationPlan.from_dict(json.loads(json.dumps(doc)), "fuzz.json")
    except MPSearchError as exc:
        assert "\n" not in str(exc)
        return
    again = QuantizationPlan.from_dict(json.loads(plan.to_json()), "again.json")
    assert again.to_dict() == plan.to_dict()
    try:  # what `show` and the table exporters do with it
        layer_table(plan)
        export(plan, "markdown", tmp_path / "plan.md")
        export(plan, "gptqmodel", tmp_path / "q.json")
    except MPSearchError:
        pass


option_keys = st.sampled_from(sorted({o.name for cls in REGISTRY.values() for o in cls.OPTIONS} | {"bogus", ""}))
option_values = st.one_of(st.sampled_from(["0", "-1", "1", "2", "16", "0.5", "nan", "inf", "-inf", "abc", "true",
                                           "null", "[]", "[[2,2,2,2,2,2]]", "tpe", "gp", "nsga2", "milp", "1e9"]),
                          st.text(max_size=8))


@FUZZ
@given(name=st.sampled_from(sorted(REGISTRY)), pairs=st.lists(st.tuples(option_keys, option_values), max_size=3))
def test_strategy_options(name, pairs):
    try:
        strategy = get_strategy(name, **_options([f"{k}={v}" for k, v in pairs]))
        obj = SyntheticObjective(synthetic_space(6, (2, 4, 8)))
        search(obj, strategy, Termination(max_evals=4), budget=Budget(max_avg_bits=4.0))
    except MPSearchError as exc:
        assert "\n" not in str(exc)


numbers = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**9))


@FUZZ
@given(mb=numbers, avg_bits=numbers)
def test_budgets(mb, avg_bits):
    obj = SyntheticObjective(synthetic_space(6, (2, 4, 8)))
    try:
        budget = Budget.from_args(mb, avg_bits)
        if budget is None:
            return
        budget.check(obj.sizes)
        r = search(obj, "random", Termination(max_evals=3), budget=budget)
    except MPSearchError as exc:
        assert "\n" not in str(exc)
        return
    assert all(budget.admits(t) for t in r.trials)
    assert math.isfinite(budget.max_bytes or 0) and math.isfinite(budget.max_avg_bits or 0)
