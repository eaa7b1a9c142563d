"""Search strategies, registered by name."""
from .base import REGISTRY, SearchContext, Strategy, get_strategy, register


def _load_all():
    import importlib

    for mod in ("baselines", "greedy", "pso", "bayes", "ilp"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


_load_all()

__all__ = ["REGISTRY", "SearchContext", "Strategy", "get_strategy", "register"]
