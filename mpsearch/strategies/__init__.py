"""Search strategies, registered by name. Everything here imports ``mpsearch.core`` only, never torch."""
from .base import REGISTRY, Option, SearchContext, Strategy, describe_options, get_strategy, register


def _load_all():
    import importlib

    for mod in ("baselines", "greedy", "pso", "bayes", "ilp"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


_load_all()

__all__ = ["REGISTRY", "Option", "SearchContext", "Strategy", "describe_options", "get_strategy", "register"]
