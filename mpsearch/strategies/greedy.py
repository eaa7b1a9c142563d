"""Greedy sensitivity search (AIMET AMP style), with real-evaluation refinement.

1. Phase 1 (``sensitivity.py``): the top candidate and every decision lowered alone to
   each lower choice, asked as one batch.
2. The greedy path, from the proxy alone (no evaluation): from the top, repeatedly
   lower by one step the decision that loses the least proxy quality per byte saved.
   Every point is kept in ``self.path`` (a list of candidates, sizes strictly
   decreasing) so other strategies can warm-start from it.
3. Real evaluations.
   Budget mode: bisection on the path for its largest feasible point (sizes are exact,
   so this costs no evaluation), evaluate it and the widest feasible uniform candidate,
   then hill-climb with local swaps that keep
   the budget (raise one decision a step and lower another, or raise one and repair the
   budget greedily), ranked by the real quality of the parent corrected by the proxy.
   Front mode: evaluate path points spread evenly by size, then neighbours of the real
   front points (one decision a step up or down, pair swaps on small spaces), ranked by
   the hypervolume they are predicted to add.
   It stops when no untried neighbour is left or ``max_evals`` is used.
"""
from __future__ import annotations

import numpy as np

from ..core.pareto import pareto_front
from ..core.repair import greedy_path, repair
from ..core.space import Candidate
from .base import Option, register
from .sensitivity import SensitivityStrategy

PAIR_SWAP_MAX_DECISIONS = 16  # front mode: pair swaps only on spaces this small


@register
class Greedy(SensitivityStrategy):
    name = "greedy"

    OPTIONS = (Option("batch_size", int, 4, "candidates per ask after phase 1", low=1),
               Option("parents", int, 3, "budget mode: best feasible candidates whose swaps are ranked", low=1),
               Option("spread_share", float, 0.5, "front mode: share of the remaining evaluations spread along the path",
                      low=0.0, high=1.0))

    def _init(self) -> None:
        self.path: list[Candidate] = []
        self.path_idx: list[tuple[int, ...]] = []
        self.path_sizes: list[int] = []
        self.path_loss: list[float] = []
        self.boundary: int | None = None  # budget mode: index on the path of its largest feasible point
        self._neigh: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._spread_done = False

    # ---- phase 2: the path ------------------------------------------------------------------
    def phase2_start(self) -> None:
        loss = self.sens.loss
        self.path_idx = greedy_path(self.sens.top_idx, loss, self.byte_table)
        arr = np.array(self.path_idx, dtype=np.int64).reshape(len(self.path_idx), -1)
        self.path = [self.decode_idx(p) for p in self.path_idx]
        self.path_sizes = [int(s) for s in self.size_idx(arr)]
        self.path_loss = [float(v) for v in self.sens.proxy_idx(arr)]
        if self.ctx.budget is not None:
            self.boundary = self._bisect_boundary(arr)

    def _bisect_boundary(self, arr: np.ndarray) -> int | None:
        """First (largest) feasible point of the path; feasibility only grows along it."""
        ok = self.feasible_idx(arr)
        if not ok.any():
            return None
        if not ok[-1] or not all(ok[i] <= ok[i + 1] for i in range(len(ok) - 1)):
            return int(np.argmax(ok))  # not monotone (float16/unquantized choices): first feasible
        lo, hi = 0, len(ok) - 1  # ok[hi] is True
        while lo < hi:
            mid = (lo + hi) // 2
            if ok[mid]:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ---- phase 3 ------------------------------------------------------------------------------
    def phase2_ask(self) -> list[Candidate]:
        if self.ctx.budget is not None:
            return self._ask_budget()
        return self._ask_front()

    # budget mode
    def _ask_budget(self) -> list[Candidate]:
        if self.boundary is None:
            return []
        first = self.new([self.path[self.boundary]] + self._uniform_start())
        if first:
            return first
        feas = [r for c, r in self.results.items() if self.feasible(c)]
        if not feas:
            return []
        feas.sort(key=lambda r: (-r.metric, r.size_bytes, r.candidate))
        pool: dict[tuple[int, ...], float] = {}
        for r in feas[: self.parents]:
            pidx = tuple(self.space.encode(r.candidate))
            nb, delta = self._budget_neighbours(pidx)
            for row, dv in zip(nb, delta):
                t = tuple(int(v) for v in row)
                pred = r.metric - dv
                if pred > pool.get(t, -np.inf):
                    pool[t] = pred
        ranked = sorted(pool.items(), key=lambda kv: (-kv[1], kv[0]))
        out: list[Candidate] = []
        for t, _ in ranked:
            out.extend(self.new([self.decode_idx(t)]))
            if len(out) >= self._batch():
                break
        return out

    def _uniform_start(self) -> list[Candidate]:
        """The widest feasible uniform candidate: a second starting point for the swaps, since the
        path's per-byte ratios can miss moves that change three or more decisions at once."""
        for b in reversed(self.space.uniform_choices()):
            c = self.space.uniform(b)
            if c is not None and self.feasible(c):
                return [c]
        return []

    def _batch(self) -> int:
        rem = self.remaining
        return self.batch_size if rem is None else max(1, min(self.batch_size, rem))

    def _budget_neighbours(self, pidx: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Feasible swaps around a parent, with their proxy loss minus the parent's; cached per parent."""
        hit = self._neigh.get(pidx)
        if hit is not None:
            rows, delta = hit
        else:
            n_ch = np.array(self.space.n_choices)
            p = np.array(pidx, dtype=np.int64)
            D = len(p)
            rows_l = []
            for d in range(D):
                if p[d] + 1 >= n_ch[d]:
                    continue
                up = p.copy()
                up[d] += 1
                rows_l.append(up[None, :])
                downs = np.repeat(up[None, :], D, axis=0)
                downs[np.arange(D), np.arange(D)] -= 1
                keep = (np.arange(D) != d) & (p > 0)
                rows_l.append(downs[keep])
                rows_l.append(np.array(self._repair(up, d))[None, :])
            rows = np.concatenate(rows_l) if rows_l else np.zeros((0, D), dtype=np.int64)
            if len(rows):
                rows = np.unique(rows, axis=0)
                rows = rows[self.feasible_idx(rows)]
            delta = self.sens.proxy_idx(rows) - self.sens.proxy_idx(p)[0] if len(rows) else np.zeros(0)
            self._neigh[pidx] = (rows, delta)
        seen = self.seen
        keep = np.array([self.decode_idx(r) not in seen for r in rows], dtype=bool) if len(rows) else np.zeros(0, bool)
        return rows[keep], delta[keep]

    def _repair(self, idx: np.ndarray, frozen: int) -> tuple[int, ...]:
        """Lower decisions other than ``frozen`` by the descent rule on the measured losses until it fits."""
        fixed = repair(idx, lambda i: bool(self.feasible_idx(i)[0]), self.sens.loss, self.byte_table, frozen)
        return tuple(int(v) for v in fixed)

    # front mode
    def _ask_front(self) -> list[Candidate]:
        if not self._spread_done:
            self._spread_done = True
            out = self._spread()
            if out:
                return out
        return self._refine_front()

    def _spread(self) -> list[Candidate]:
        rem = self.remaining
        n = len(self.path) if rem is None else max(1, int(rem * self.spread_share))
        sizes = np.array(self.path_sizes, dtype=float)
        targets = np.linspace(sizes.min(), sizes.max(), n + 2) if n < len(self.path) else sizes
        picks = sorted({int(np.argmin(np.abs(sizes - t))) for t in targets})
        cands = [self.path[i] for i in picks]
        return self.new(cands)

    def _refine_front(self) -> list[Candidate]:
        front = [(r.size_bytes, r.metric, r.candidate) for r in pareto_front(self.results.values())]
        if not front:
            return []
        n_ch = np.array(self.space.n_choices)
        D = len(n_ch)
        pool: dict[tuple[int, ...], float] = {}
        for s, m, cand in front:
            p = np.array(self.space.encode(cand), dtype=np.int64)
            rows = []
            for d in range(D):
                for step in (-1, 1):
                    if 0 <= p[d] + step < n_ch[d]:
                        q = p.copy()
                        q[d] += step
                        rows.append(q)
                        if D <= PAIR_SWAP_MAX_DECISIONS and step == 1:
                            for e in range(D):
                                if e != d and p[e] > 0:
                                    r2 = q.copy()
                                    r2[e] -= 1
                                    rows.append(r2)
            if not rows:
                continue
            rows = np.array(rows)
            pred = m - (self.sens.proxy_idx(rows) - self.sens.proxy_idx(p)[0])
            for row, v in zip(rows, pred):
                t = tuple(int(x) for x in row)
                if v > pool.get(t, -np.inf):
                    pool[t] = v
        items = [(t, v) for t, v in pool.items() if self.decode_idx(t) not in self.seen]
        if not items:
            return []
        keys = np.array([t for t, _ in items], dtype=np.int64)
        pred = np.array([v for _, v in items])
        size = self.size_idx(keys).astype(float)
        contrib, gap = _hv_gain(front, size, pred, float(self.ctx.sizes.full_precision_bytes))
        order = np.lexsort((np.arange(len(items)), -gap, -contrib))
        out: list[Candidate] = []
        for j in order:
            out.extend(self.new([self.decode_idx(items[j][0])]))
            if len(out) >= self._batch():
                break
        return out


def _hv_gain(front, size: np.ndarray, metric: np.ndarray, s_ref: float):
    """Area (size x metric) each point would add to a 2-D front, and its metric gap to the front's staircase."""
    xs = np.array([p[0] for p in front], dtype=float) / s_ref
    ys = np.array([p[1] for p in front], dtype=float)
    s = size / s_ref
    floor = min(float(ys.min()), float(metric.min()) if len(metric) else 0.0) - 1e-9
    edges_hi = np.append(xs[1:], max(1.0, float(s.max(initial=1.0))))
    lo = np.maximum(s[:, None], xs[None, :])
    width = np.clip(edges_hi[None, :] - lo, 0.0, None)
    gain = np.clip(metric[:, None] - ys[None, :], 0.0, None)
    contrib = (width * gain).sum(axis=1) + np.clip(xs[0] - s, 0.0, None) * np.clip(metric - floor, 0.0, None)
    j = np.searchsorted(xs, s, side="right") - 1
    level = np.where(j >= 0, ys[np.maximum(j, 0)], floor)
    return contrib, metric - level
