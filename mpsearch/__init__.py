"""mpsearch: search-based mixed-precision quantization for PyTorch models.

    import mpsearch
    result = mpsearch.optimize("digits", strategy="pso", budget=mpsearch.Budget(max_avg_bits=3), max_evals=200)
    result.plan().save("plan.json")

Names load lazily, so ``import mpsearch`` imports no torch until a name that needs it is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_NAMES = {
    "optimize": "mpsearch.pipeline",
    "OptimizeResult": "mpsearch.pipeline",
    "Budget": "mpsearch.core.budget",
    "SearchSpace": "mpsearch.core.space",
    "QuantizerConfig": "mpsearch.core.qconfig",
    "Evaluation": "mpsearch.core.records",
    "ParetoFront": "mpsearch.core.pareto",
    "MPSearchError": "mpsearch.errors",
    "Task": "mpsearch.tasks.task",
    "load_task": "mpsearch.tasks",
    "QuantizationPlan": "mpsearch.plan",
    "Evaluator": "mpsearch.evaluator",
    "build_space": "mpsearch.model.walk",
}

__all__ = sorted(_NAMES) + ["__version__"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")


def __dir__():
    return __all__
