"""Integer program over the additive sensitivity proxy (HAWQ-V3 / knapsack style), solved with scipy's milp.

Variables ``x[d, i]`` in {0, 1}: decision ``d`` takes choice ``i``; one choice per decision.
Objective: the phase-1 proxy ``sum loss[d][i] x[d, i]`` plus a tie-break far below any
measured loss that counts the weight-bits given up (``n_d * (top bits - bits)``), so that
among candidates the proxy cannot tell apart, the one with more bits is taken.
Constraints, from the exact size tables:

- bytes: ``fixed_bytes + sum table[d][i] x[d, i] <= max_bytes``;
- average bits: ``sum bit_table[d][i] x[d, i] <= B * total_count - fixed_bits``, which is
  ``avg_bits <= B`` multiplied out.

Budget mode: the proxy optimum is evaluated first. Then the best real feasible candidate
is expanded: for each decision and each other choice of it, the proxy-best candidate within
the budget with the decision forced there (one variable's lower bound set to 1). The pairs
are taken in order of the proxy change of moving that decision alone and solved lazily, a
batch at a time, so the solver runs about once per evaluation; the incumbent moves
whenever a real evaluation beats it.
Front mode: the byte limit is swept evenly between the smallest and the largest model,
then at midpoints while new solutions keep appearing; afterwards the real front's points
are expanded the same way, at their own size.

Solver: a program with one limit (bytes or average bits; every front level) and at most
one forced decision is a multiple-choice knapsack, read off an exact dynamic-programming
table (``mckp.KnapsackTable``, built once per limit kind) in well under a millisecond;
HiGHS through ``milp`` took about 60 ms a solve on minilm's 234 binaries, which made the
solver, not the evaluations, the cost of a run. Programs with both limits, or a table
over ``mckp.MAX_CELLS`` cells, go to ``milp``; ``solver="milp"`` sends every program there.

Next-best solutions are not enumerated with no-good cuts: with HiGHS a few dozen cut rows
make each solve 10-30 times slower even on a 24-variable program, while forbidding one
or forcing one variable through its bound costs nothing.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from ..core.budget import AVG_BITS_TOLERANCE, Budget
from ..core.pareto import pareto_front
from ..core.space import Candidate
from .base import Option, register
from .mckp import KnapsackTable
from .sensitivity import SensitivityStrategy

NOT_SOLVED = object()  # the knapsack table does not apply: solve with milp
TIE_BREAK = 1e-3  # tie-break weight, relative to the smallest positive loss
MIN_NEW_SHARE = 0.25  # a midpoint round that finds fewer new solutions than this share ends the sweep


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS (inside scipy) sometimes prints a debug line to the C-level stdout that no option silences."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@register
class ILP(SensitivityStrategy):
    name = "ilp"

    OPTIONS = (
        Option("solver", str, "auto", "auto: knapsack table where it applies, milp otherwise; milp: always milp",
               choices=("auto", "milp")),
        Option("batch_size", int, 8, "candidates per ask after phase 1", low=1),
        Option("time_limit", float, 2.0, "seconds per milp solve", low=0.0),
        Option("sweep_share", float, 0.5, "front mode: share of the remaining evaluations for the byte-level sweep",
               low=0.0, high=1.0),
    )

    def __init__(self, **options):
        super().__init__(**options)
        self.use_knapsack = self.solver == "auto"

    def _init(self) -> None:
        self.solutions: list[Candidate] = []  # every candidate the program proposed, in order
        self.optimum: Candidate | None = None  # budget mode: the proxy optimum
        self.n_solves = 0
        self.solve_s = 0.0
        self._solved: dict[tuple, Candidate | None] = {}
        self._tables: dict[str, KnapsackTable] = {}
        self._levels_done: list[int] = []
        self._pending_levels: list[int] = []
        self._round_new = 0
        self._round_size = 0
        self._sweep_over = False
        self._queue: dict[Candidate, list[Candidate]] = {}
        self._exhausted = False

    # ---- the program ---------------------------------------------------------------------------
    def phase2_start(self) -> None:
        space, size = self.space, self.ctx.sizes
        n_ch = space.n_choices
        self.offsets = np.concatenate([[0], np.cumsum(n_ch)]).astype(int)
        nvar = int(self.offsets[-1])
        loss = self.sens.loss
        pos = [v for t in loss for v in t if v > 0]
        unit = min(pos) if pos else 1.0
        # tie-break: stored bits given up, at most TIE_BREAK * the smallest loss in all
        drop = [np.asarray(size.bit_table[d][-1] - size.bit_table[d], dtype=float) for d in range(len(n_ch))]
        total = sum(float(t.max()) for t in drop) or 1.0
        self.objective_table = [np.asarray(t, dtype=float) + TIE_BREAK * unit * dr / total for t, dr in zip(loss, drop)]
        # solved in units of 1/1000 of the smallest loss, so HiGHS's absolute tolerances (1e-6) resolve the tie-break
        self.obj_scale = 1000.0 / unit
        self.c = np.concatenate(self.objective_table) * self.obj_scale if nvar else np.zeros(0)
        rows = np.repeat(np.arange(len(n_ch)), n_ch)
        self.A_onehot = sparse.csr_matrix((np.ones(nvar), (rows, np.arange(nvar))), shape=(len(n_ch), nvar))
        self.bytes_row = np.concatenate([np.asarray(t, dtype=float) for t in size.byte_table]) if nvar else np.zeros(0)
        self.bits_row = {}
        self.top_bytes = int(self.size_idx(np.array(self.sens.top_idx))[0])
        self.min_bytes = int(size.min_size_bytes())
        if self.ctx.budget is not None:
            self.optimum = self.solve(self.ctx.budget.max_bytes, self.ctx.budget.max_avg_bits)

    def objective_of(self, candidate) -> float:
        """The program's objective for a candidate: the proxy plus the tie-break."""
        idx = self.space.encode(candidate)
        return float(sum(self.objective_table[d][i] for d, i in enumerate(idx)))

    def _constraints(self, max_bytes: int | None, max_avg_bits: float | None) -> LinearConstraint:
        size = self.ctx.sizes
        A = [self.A_onehot]
        low = [np.ones(self.A_onehot.shape[0])]
        high = [np.ones(self.A_onehot.shape[0])]
        if max_bytes is not None:
            A.append(sparse.csr_matrix(self.bytes_row[None, :]))
            low.append([-np.inf])
            high.append([float(max_bytes - size.fixed_bytes)])
        if max_avg_bits is not None:
            # sum of weight bits <= B x (every weight in the space) - pinned bits
            row = np.concatenate([t.astype(float) for t in size.bit_table])
            A.append(sparse.csr_matrix(row[None, :]))
            low.append([-np.inf])
            high.append([size.weight_bits_cap(float(max_avg_bits) + AVG_BITS_TOLERANCE)])
        return LinearConstraint(sparse.vstack(A).tocsr(), np.concatenate(low), np.concatenate(high))

    def solve(self, max_bytes: int | None = None, max_avg_bits: float | None = None,
              force: tuple[tuple[int, int], ...] = ()) -> Candidate | None:
        """Proxy-optimal candidate under the limits with decision ``d`` at choice index ``i`` for
        each pair in ``force``; None when there is none."""
        if len(self.c) == 0:
            return None
        key = (max_bytes, max_avg_bits, tuple(sorted(force)))
        if key in self._solved:  # the same program again (another parent forcing the same pair)
            return self._solved[key]
        self._solved[key] = c = self._solve(max_bytes, max_avg_bits, force)
        return c

    def _solve(self, max_bytes, max_avg_bits, force) -> Candidate | None:
        t0 = time.perf_counter()
        idx = self._solve_knapsack(max_bytes, max_avg_bits, force)
        if idx is NOT_SOLVED:
            idx = self._solve_milp(max_bytes, max_avg_bits, force)
        self.solve_s += time.perf_counter() - t0
        self.n_solves += 1
        if idx is None:
            return None
        c = self.decode_idx(idx)
        if not Budget(max_bytes, max_avg_bits).feasible(self.ctx.sizes, c):
            return None  # the solver's tolerance let a row slip
        return c

    def _solve_knapsack(self, max_bytes, max_avg_bits, force):
        """One limit and at most one forced pair: a multiple-choice knapsack, read off a ``KnapsackTable``."""
        if (max_bytes is None) == (max_avg_bits is None) or len(force) > 1 or not self.use_knapsack:
            return NOT_SOLVED
        size = self.ctx.sizes
        if max_bytes is not None:
            kind, weights, cap = "bytes", size.byte_table, float(max_bytes - size.fixed_bytes)
        else:
            kind, weights, cap = "bits", size.bit_table, size.weight_bits_cap(float(max_avg_bits) + AVG_BITS_TOLERANCE)
        table = self._tables.get(kind)
        if table is None or (table.applicable and not table.covers(cap)):
            table = self._tables[kind] = KnapsackTable(self.objective_table, weights, cap)
        if not table.applicable:
            return NOT_SOLVED
        return table.solve(cap, force[0] if force else None)

    def _solve_milp(self, max_bytes, max_avg_bits, force) -> list[int] | None:
        lb = np.zeros(len(self.c))
        for d, i in force:
            lb[self.offsets[d] + i] = 1.0
        with _quiet_stdout():
            res = milp(self.c, constraints=self._constraints(max_bytes, max_avg_bits), integrality=np.ones(len(self.c)),
                       bounds=Bounds(lb, 1), options={"time_limit": self.time_limit, "mip_rel_gap": 0.0})
        if res.x is None:
            return None
        return [int(np.argmax(res.x[self.offsets[d]:self.offsets[d + 1]])) for d in range(len(self.offsets) - 1)]

    def expansion_order(self, parent: Candidate) -> list[tuple[int, int]]:
        """(decision, choice) pairs to force around the parent, most promising first by the change in
        proxy of moving that decision alone; each is solved only when its turn comes."""
        idx = self.space.encode(parent)
        pairs = [(d, j) for d, i in enumerate(idx) for j in range(self.space.decisions[d].n_choices) if j != i]
        return sorted(pairs, key=lambda p: (self.objective_table[p[0]][p[1]] - self.objective_table[p[0]][idx[p[0]]], p))

    # ---- asking ---------------------------------------------------------------------------------
    def phase2_ask(self) -> list[Candidate]:
        if self._exhausted:
            return []
        out = self._ask_budget() if self.ctx.budget is not None else self._ask_front()
        if not out:
            self._exhausted = True
        return out

    def _batch(self) -> int:
        rem = self.remaining
        return self.batch_size if rem is None else max(1, min(self.batch_size, rem))

    def _ask_expansions(self, parents: list[Candidate], limits) -> list[Candidate]:
        """Next unasked expansions of the first parent (best real quality first) that still has some:
        for each forced (decision, choice), the proxy-best candidate under the limits."""
        out: list[Candidate] = []
        for p in parents:
            if p not in self._queue:
                self._queue[p] = self.expansion_order(p)
            q = self._queue[p]
            while q and len(out) < self._batch():
                c = self.solve(*limits(p), force=(q.pop(0),))
                if c is not None and c not in self.seen:
                    self.solutions.append(c)
                    out.extend(self.new([c]))
            if out:
                return out
        return out

    def _ask_budget(self) -> list[Candidate]:
        b = self.ctx.budget
        if self.optimum is not None and self.optimum not in self.solutions:
            self.solutions.append(self.optimum)
            first = self.new([self.optimum])
            if first:
                return first
        feas = sorted((r for c, r in self.results.items() if self.feasible(c)),
                      key=lambda r: (-r.metric, r.size_bytes, r.candidate))
        return self._ask_expansions([r.candidate for r in feas], lambda p: (b.max_bytes, b.max_avg_bits))

    def _ask_front(self) -> list[Candidate]:
        if not self._levels_done and not self._pending_levels:
            rem = self.remaining
            k = 32 if rem is None else max(2, int(rem * self.sweep_share))
            self._pending_levels = sorted({int(round(v)) for v in np.linspace(self.min_bytes, self.top_bytes, k)},
                                          reverse=True)
            self._round_size = len(self._pending_levels)
        out: list[Candidate] = []
        while len(out) < self._batch() and not self._sweep_over:
            if not self._pending_levels:
                self._pending_levels = self._midpoints()
                if not self._pending_levels:
                    self._sweep_over = True
                    break
            level = self._pending_levels.pop(0)
            self._levels_done.append(level)
            c = self.solve(level, None)
            if c is not None and c not in self.seen:
                self._round_new += 1
                self.solutions.append(c)
                out.extend(self.new([c]))
        if out:
            return out
        # the sweep has found what it can: expand the real front's points at their own size
        return self._ask_expansions(self._front_candidates(), lambda p: (self.ctx.sizes.size_bytes(p), None))

    def _front_candidates(self) -> list[Candidate]:
        front = sorted(pareto_front(self.results.values()), key=lambda r: (-r.metric, r.size_bytes, r.candidate))
        return [r.candidate for r in front]

    def _midpoints(self) -> list[int]:
        """Byte levels halfway between the levels tried, while the last round found enough new solutions."""
        if self._round_new < MIN_NEW_SHARE * max(self._round_size, 1):
            return []
        levels = sorted(set(self._levels_done))
        mids = sorted({(a + b) // 2 for a, b in zip(levels, levels[1:]) if b - a >= 2} - set(levels), reverse=True)
        self._round_new, self._round_size = 0, len(mids)
        return mids
