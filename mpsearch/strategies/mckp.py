"""Exact multiple-choice knapsack by dynamic programming: one choice per group, one
integer capacity row, least total cost.

The ilp strategy's programs have this shape whenever there is a single limit (bytes, or
average bits; every front-sweep level). HiGHS (scipy's ``milp``) solves them exactly but
spends about 60 ms per call on minilm's 234 binaries, mostly in presolve, probing and
cuts, and a branch and bound on the closed-form relaxation stalls on the many
near-identical layers. Dynamic programming does not care about symmetry: weights are
integer (bytes or weight bits), each group's weights minus its lightest choice share a
large common divisor (a layer's weight count), and on minilm the table has 176k cells.

Tables run both ways: ``prefix[k][w]`` is the least cost of groups ``< k`` within ``w``
units, ``suffix[k][w]`` that of groups ``>= k``. Then the optimum with group ``d``
forced to choice ``j`` (ilp's expansions) is one vectorised minimum over the split of
the remaining room, ``prefix[d][w] + suffix[d + 1][room - w]``, instead of a new solve.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Sequence

import numpy as np

MAX_CELLS = 300_000  # units of capacity a table may have; beyond it the caller uses milp


class KnapsackTable:
    """Least-cost choices under ``sum weights[g][i_g] <= capacity``, for every capacity up to one given."""

    def __init__(self, costs: Sequence[np.ndarray], weights: Sequence[np.ndarray], capacity: float,
                 max_cells: int = MAX_CELLS):
        w = [np.asarray(t, dtype=np.int64) for t in weights]
        if any(not np.array_equal(np.asarray(t, dtype=float), x) for t, x in zip(weights, w)):
            raise ValueError("knapsack weights must be integers")
        self.costs = [np.asarray(c, dtype=float) for c in costs]
        self.base = int(sum(int(t.min()) for t in w))
        extra = [t - t.min() for t in w]
        self.unit = reduce(math.gcd, [int(v) for t in extra for v in t], 0) or 1
        self.u = [(t // self.unit).astype(np.int64) for t in extra]
        self.full = int(sum(int(t.max()) for t in self.u))  # room that fits every group's heaviest choice
        self.cells = min(self.full, max(0, self.room(capacity))) + 1
        self.applicable = self.cells <= max_cells and max((len(c) for c in self.costs), default=0) < 128
        if self.applicable:
            self._build()

    def room(self, capacity: float) -> int:
        """Capacity above every group's lightest choice, in table units (negative: nothing fits)."""
        spare = float(capacity) - self.base
        return math.floor(spare / self.unit) if spare >= 0 else -1

    def covers(self, capacity: float) -> bool:
        return self.room(capacity) < self.cells or self.cells == self.full + 1

    def _step(self, prev: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        best = np.full_like(prev, np.inf)
        arg = np.zeros(len(prev), dtype=np.int8)
        for j, (u, c) in enumerate(zip(self.u[k], self.costs[k])):
            if u >= len(prev):
                continue
            cand = np.full_like(prev, np.inf)
            cand[u:] = prev[: len(prev) - u] + c
            better = cand < best
            best[better] = cand[better]
            arg[better] = j
        return best, arg

    def _build(self) -> None:
        n, m = len(self.costs), self.cells
        self.prefix = np.zeros((n + 1, m))
        self.prefix_arg = np.zeros((n, m), dtype=np.int8)
        for k in range(n):
            self.prefix[k + 1], self.prefix_arg[k] = self._step(self.prefix[k], k)
        self.suffix = np.zeros((n + 1, m))
        self.suffix_arg = np.zeros((n, m), dtype=np.int8)
        for k in range(n - 1, -1, -1):
            self.suffix[k], self.suffix_arg[k] = self._step(self.suffix[k + 1], k)

    def _walk_prefix(self, k_end: int, w: int, out: list[int]) -> None:
        for k in range(k_end - 1, -1, -1):
            j = int(self.prefix_arg[k][w])
            out[k] = j
            w -= int(self.u[k][j])

    def _walk_suffix(self, k_start: int, w: int, out: list[int]) -> None:
        for k in range(k_start, len(self.costs)):
            j = int(self.suffix_arg[k][w])
            out[k] = j
            w -= int(self.u[k][j])

    def solve(self, capacity: float, force: tuple[int, int] | None = None) -> list[int] | None:
        """Choice index per group, optionally with group ``force[0]`` at choice ``force[1]``; None when nothing fits."""
        r = self.room(capacity)
        if r < 0:
            return None
        if not self.covers(capacity):
            raise ValueError("capacity beyond the table's; build a larger table")
        r = min(r, self.cells - 1)
        out = [0] * len(self.costs)
        if force is None:
            self._walk_prefix(len(self.costs), r, out)
            return out
        d, j = force
        rest = r - int(self.u[d][j])
        if rest < 0:
            return None
        split = self.prefix[d][: rest + 1] + self.suffix[d + 1][rest::-1]
        w = int(np.argmin(split))
        if not np.isfinite(split[w]):
            return None
        out[d] = j
        self._walk_prefix(d, w, out)
        self._walk_suffix(d + 1, rest - w, out)
        return out
