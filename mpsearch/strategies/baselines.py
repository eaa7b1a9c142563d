"""Baselines: uniform bit-widths, random feasible candidates, and exhaustive enumeration."""
from __future__ import annotations

import itertools

from ..errors import MPSearchError
from ..core.space import Candidate
from .base import Option, Strategy, register


@register
class Uniform(Strategy):
    """Every layer at the same bit-width, once per width that all decisions allow (feasible ones only)."""

    name = "uniform"

    def start(self):
        widths = reversed(self.space.uniform_choices())
        self._todo = [c for c in (self.space.uniform(b) for b in widths) if self.feasible(c)]

    def ask(self) -> list[Candidate]:
        todo, self._todo = self._todo, []
        return self.new(todo)


@register
class Random(Strategy):
    """Independent draws, uniform over the feasible candidates (rejection sampling on the size tables)."""

    name = "random"

    OPTIONS = (Option("batch_size", int, 8, "candidates per ask", low=1),
               Option("max_tries", int, 10_000, "draws per ask before giving up on finding a feasible one", low=1))

    def ask(self) -> list[Candidate]:
        out: list[Candidate] = []
        tries = 0
        while len(out) < self.batch_size and tries < self.max_tries:
            tries += 1
            c = self.space.random(self.rng)
            if self.feasible(c):
                out.extend(self.new([c]))
        return out


@register
class Exhaustive(Strategy):
    """Every candidate (every feasible one under a budget), in lexicographic order of bits."""

    name = "exhaustive"

    OPTIONS = (Option("limit", int, 100_000, "refuse spaces with more candidates than this", low=1),
               Option("batch_size", int, 256, "candidates per ask", low=1))

    def start(self):
        n = self.space.cardinality
        if n > self.limit:
            raise MPSearchError(f"exhaustive: the space has {n:.4g} candidates, above the limit of {self.limit}")
        self._it = (c for c in self.space.enumerate() if self.feasible(c))

    def ask(self) -> list[Candidate]:
        return self.new(itertools.islice(self._it, self.batch_size))
