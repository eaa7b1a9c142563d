"""The strategy interface: ask for a batch of candidates, be told their scores.

A strategy sees the search space, the exact size tables, the budget and a seed, never the
model: everything here comes from ``mpsearch.core`` and imports no torch. Every candidate
it asks is charged one evaluation by the search loop, so a strategy must not ask the same
candidate twice in a run and must spend its own measurements (greedy's sensitivities, say)
through ``ask`` like any other evaluation.

Each strategy declares its options (``OPTIONS``: name, type, range, default); they are
checked when the strategy is built, before any evaluation, and listed by
``mpsearch search --strategy NAME --help-options``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..core.budget import Budget
from ..core.records import Evaluation
from ..core.repair import noise_loss, repair
from ..core.sizes import SizeTable
from ..core.space import Candidate, SearchSpace, as_choice
from ..errors import MPSearchError, OptionError


@dataclass
class SearchContext:
    space: SearchSpace
    sizes: SizeTable
    budget: Budget | None
    seed: int
    max_evals: int | None  # a hint for planning; the loop enforces it
    reference_metric: float  # full-precision quality on the calibration split

    def feasible(self, candidate: Sequence[int]) -> bool:
        return self.budget is None or self.budget.feasible(self.sizes, candidate)

    def feasible_idx(self, idx) -> np.ndarray:
        """Budget check of an ``(n, decisions)`` array of choice indices (all True without a budget)."""
        if self.budget is None:
            return np.ones(len(np.atleast_2d(idx)), dtype=bool)
        return self.budget.feasible_idx(self.sizes, idx)


@dataclass(frozen=True)
class Option:
    """One strategy option: its type, its allowed values and its default."""

    name: str
    kind: type  # int, float, bool or str; object for a custom ``check``
    default: Any
    help: str = ""
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    high_open: bool = False  # high itself is not allowed
    choices: tuple | None = None
    nullable: bool = False
    check: Callable[[Any], Any] | None = None  # kind=object: returns the value or raises ValueError

    def describe(self) -> str:
        if self.choices:
            allowed = "one of " + ", ".join(map(str, self.choices))
        elif self.kind in (int, float):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            allowed = f"{'an integer' if self.kind is int else 'a number'} in [{lo}, {hi}{')' if self.high_open else ']'}"
        elif self.kind is bool:
            allowed = "true or false"
        else:
            allowed = self.help or "see the strategy's documentation"
        return allowed + (" or null" if self.nullable else "")

    def parse(self, value: Any, owner: str) -> Any:
        if value is None and (self.nullable or self.default is None):
            return None
        bad = OptionError(f"strategy {owner!r}: option {self.name}={value!r}: expected {self.describe()}")
        if self.kind is object:
            try:
                return self.check(value) if self.check else value
            except (TypeError, ValueError) as exc:
                raise OptionError(f"strategy {owner!r}: option {self.name}={value!r}: {exc}") from None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise bad
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise bad
        if not math.isfinite(float(value)):
            raise bad
        if self.kind is int:
            if float(value) != int(value):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if (self.low is not None and value < self.low) or (self.high is not None and (
                value > self.high or (self.high_open and value == self.high))):
            raise bad
        return value


class Strategy(ABC):
    name: ClassVar[str] = ""
    OPTIONS: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, **options):
        known = {o.name: o for o in self.OPTIONS}
        unknown = sorted(set(options) - set(known))
        if unknown:
            listed = ", ".join(known) or "none"
            raise OptionError(f"strategy {self.name!r} has no option(s) {', '.join(unknown)}; its options: {listed}")
        self.options = {n: o.parse(options[n], self.name) if n in options else o.default for n, o in known.items()}
        for n, v in self.options.items():
            setattr(self, n, v)
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
            c = tuple(as_choice(b) for b in c)
            if c not in self.seen:
                self.seen.add(c)
                out.append(c)
        return out

    def objective(self, ev: Evaluation) -> float:
        """Budget mode: quality when feasible, else below any feasible quality."""
        if self.ctx.budget is None or self.ctx.budget.admits(ev):
            return ev.metric
        return ev.metric - 1e6

    def repaired(self, idx, cap_bytes: float | None = None) -> np.ndarray:
        """Choice indices lowered by the descent rule on the noise proxy until they fit the budget
        (and ``cap_bytes``, when given)."""
        if not hasattr(self, "_noise_loss"):
            self._noise_loss = noise_loss(self.ctx.sizes)
        sizes = self.ctx.sizes

        def fits(i):
            return bool(self.ctx.feasible_idx(i)[0]) and (cap_bytes is None or sizes.bytes_idx(i)[0] <= cap_bytes)

        return repair(idx, fits, self._noise_loss, sizes.byte_table)


REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str, **options) -> Strategy:
    import mpsearch.strategies  # noqa: F401  (registers the built-in strategies)

    if name not in REGISTRY:
        raise MPSearchError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)


def describe_options(name: str) -> str:
    """The options of strategy ``name``, one per line: name, default, allowed values, what it does."""
    import mpsearch.strategies  # noqa: F401

    if name not in REGISTRY:
        raise MPSearchError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    lines = [f"options of strategy {name!r} (--option KEY=VALUE):"]
    for o in cls.OPTIONS:
        lines.append(f"  {o.name} (default {o.default!r}): {o.describe()}" + (f". {o.help}" if o.help else ""))
    if not cls.OPTIONS:
        lines.append("  (none)")
    return "\n".join(lines)
