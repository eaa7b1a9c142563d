"""The strategy interface: ask for a batch of candidates, be told their scores.

A strategy sees the search space, the exact size tables (``SizeModel``: a pure
function of the space), the budget and a seed; never the model. Every candidate it
asks is charged one evaluation by the search loop, so a strategy must not ask the
same candidate twice in a run and must spend its own measurements (greedy's
sensitivities, say) through ``ask`` like any other evaluation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from ..budget import Budget
from ..cost import SizeModel
from ..errors import MPSearchError
from ..evaluator import Evaluation
from ..space import Candidate, SearchSpace


@dataclass
class SearchContext:
    space: SearchSpace
    size: SizeModel
    budget: Budget | None
    seed: int
    max_evals: int | None  # a hint for planning; the loop enforces it
    reference_metric: float  # full-precision quality on the calibration split

    def feasible(self, candidate: Sequence[int]) -> bool:
        return self.budget is None or self.budget.feasible(self.size, candidate)


class Strategy(ABC):
    name: ClassVar[str] = ""
    batch_hint: ClassVar[bool] = False  # True when ask() naturally returns several candidates

    def __init__(self, **options):
        self.options = options
        self.ctx: SearchContext | None = None
        self.rng: np.random.Generator | None = None
        self.seen: set[Candidate] = set()

    def setup(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self.rng = np.random.default_rng(ctx.seed)
        self.seen = set()
        self.start()

    def start(self) -> None:
        """Hook for subclasses, called once the context is set."""

    @abstractmethod
    def ask(self) -> list[Candidate]:
        """Next candidates to evaluate; an empty list means the strategy is done."""

    def tell(self, results: list[Evaluation]) -> None:
        """Scores of the candidates just asked, in order (fewer when the search stopped)."""
        for r in results:
            self.seen.add(tuple(r.candidate))

    # ---- helpers shared by strategies ----------------------------------------------
    @property
    def space(self) -> SearchSpace:
        return self.ctx.space

    def feasible(self, candidate: Sequence[int]) -> bool:
        return self.ctx.feasible(candidate)

    def new(self, candidates: Sequence[Sequence[int]]) -> list[Candidate]:
        """Candidates not yet asked in this run, without duplicates, marked as asked."""
        out = []
        for c in candidates:
            c = tuple(int(b) for b in c)
            if c not in self.seen:
                self.seen.add(c)
                out.append(c)
        return out

    def objective(self, ev: Evaluation) -> float:
        """Budget mode: quality when feasible, else below any feasible quality."""
        if self.ctx.budget is None or self.ctx.budget.feasible(self.ctx.size, ev.candidate):
            return ev.metric
        return ev.metric - 1e6


REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str, **options) -> Strategy:
    import mpsearch.strategies  # noqa: F401  (registers the built-in strategies)

    if name not in REGISTRY:
        raise MPSearchError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**options)
    except TypeError as exc:
        raise MPSearchError(f"strategy {name!r}: {exc}") from None
