"""Baselines: uniform bit-widths, random feasible candidates, and exhaustive enumeration."""
from __future__ import annotations

import itertools

from ..errors import MPSearchError
from ..space import Candidate
from .base import Strategy, register


@register
class Uniform(Strategy):
    """Every layer at the same bit-width, once per width that all decisions allow (feasible ones only)."""

    name = "uniform"
    batch_hint = True

    def start(self):
        widths = sorted(self.space.uniform_bits(), reverse=True)
        self._todo = [c for c in (self.space.uniform(b) for b in widths) if self.feasible(c)]

    def ask(self) -> list[Candidate]:
        todo, self._todo = self._todo, []
        return self.new(todo)


@register
class Random(Strategy):
    """Independent draws, uniform over the feasible candidates (rejection sampling on the size tables)."""

    name = "random"
    batch_hint = True

    def __init__(self, batch_size: int = 8, max_tries: int = 10_000):
        super().__init__(batch_size=batch_size, max_tries=max_tries)
        self.batch_size = int(batch_size)
        self.max_tries = int(max_tries)

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
    batch_hint = True

    def __init__(self, limit: int = 100_000, batch_size: int = 256):
        super().__init__(limit=limit, batch_size=batch_size)
        self.limit = int(limit)
        self.batch_size = int(batch_size)

    def start(self):
        n = self.space.cardinality
        if n > self.limit:
            raise MPSearchError(f"exhaustive: the space has {n:.4g} candidates, above the limit of {self.limit}")
        self._it = (c for c in self.space.enumerate() if self.feasible(c))

    def ask(self) -> list[Candidate]:
        return self.new(itertools.islice(self._it, self.batch_size))
