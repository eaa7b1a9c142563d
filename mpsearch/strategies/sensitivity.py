"""Phase 1 shared by ``greedy`` and ``ilp``: per-decision sensitivities, as AIMET AMP measures them.

The top candidate (every decision at its highest choice) is evaluated, then each decision
is lowered alone to each of its lower choices. The quality lost,
``loss[d][i] = metric(top) - metric(top with d at choice i)``, makes an additive proxy:
``proxy(c) = sum_d loss[d][c_d]`` (0 at the top).

When ``max_evals`` leaves too little room to measure everything, the lowest choice of
every decision is measured first, then the next ones up; a choice left unmeasured is
interpolated between its measured neighbours on the quantization-noise scale ``4**-bits``.
Measured losses are cleaned before use: negative ones (noise) become 0 and a lower
choice never loses less than a higher one of the same decision.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.records import Evaluation
from ..core.repair import noise_level
from ..core.space import Candidate
from .base import Strategy

PHASE1_SHARE = 0.6  # at most this share of max_evals goes to sensitivities (when they do not all fit)


class Sensitivity:
    """The phase-1 plan, its measurements and the additive proxy built from them."""

    def __init__(self, space, sizes, max_measurements: int | None = None):
        self.space = space
        self.sizes = sizes
        self.top_idx = tuple(d.n_choices - 1 for d in space.decisions)
        self.top: Candidate = space.decode(self.top_idx)
        # (decision, choice index) pairs, lowest level first across decisions; bigger savings first in a level.
        pairs = []
        for level in range(max((d.n_choices for d in space.decisions), default=1) - 1):
            row = [(d, level) for d, dec in enumerate(space.decisions) if level < dec.n_choices - 1]
            row.sort(key=lambda p: (-(int(sizes.byte_table[p[0]][-1]) - int(sizes.byte_table[p[0]][p[1]])), p[0]))
            pairs.extend(row)
        if max_measurements is not None:
            pairs = pairs[: max(0, max_measurements - 1)]
        self.pairs: list[tuple[int, int]] = pairs
        self.plan: list[Candidate] = [self.top] + [self.lowered(d, i) for d, i in pairs]
        self.top_metric: float | None = None
        self.metric: dict[tuple[int, int], float] = {}  # measured metric of (decision, choice index)
        self._loss: list[np.ndarray] | None = None

    @property
    def n_full(self) -> int:
        return 1 + sum(d.n_choices - 1 for d in self.space.decisions)

    def lowered(self, d: int, i: int) -> Candidate:
        c = list(self.top)
        c[d] = self.space.decisions[d].choices[i]
        return tuple(c)

    def record(self, results: Sequence[Evaluation]) -> None:
        by_cand = {tuple(r.candidate): r.metric for r in results}
        if self.top in by_cand:
            self.top_metric = float(by_cand[self.top])
        for d, i in self.pairs:
            c = self.lowered(d, i)
            if c in by_cand:
                self.metric[(d, i)] = float(by_cand[c])
        self._loss = None

    # ---- the proxy ------------------------------------------------------------------------
    def raw_loss(self) -> dict[tuple[int, int], float]:
        """Measured quality lost per (decision, choice index), uncleaned."""
        if self.top_metric is None:
            return {}
        return {k: self.top_metric - m for k, m in self.metric.items()}

    @property
    def loss(self) -> list[np.ndarray]:
        """Cleaned loss per decision and choice index (0 at the top choice)."""
        if self._loss is None:
            self._loss = self._build()
        return self._loss

    def _build(self) -> list[np.ndarray]:
        raw = self.raw_loss()
        decisions = self.space.decisions
        # Fallback for a decision with no measurement: mean loss per parameter at that bit-width elsewhere.
        per_param: dict = {}
        for (d, i), v in raw.items():
            per_param.setdefault(decisions[d].choices[i], []).append(max(v, 0.0) / max(int(self.sizes.counts[d]), 1))
        out = []
        for d, dec in enumerate(decisions):
            n = dec.n_choices
            noise = [noise_level(self.space.setting(c).bits) for c in dec.choices]
            known = {n - 1: 0.0}
            known.update({i: max(v, 0.0) for (dd, i), v in raw.items() if dd == d})
            vals = np.zeros(n)
            for i in range(n):
                if i in known:
                    vals[i] = known[i]
                    continue
                lo = max((k for k in known if k < i), default=None)
                hi = min(k for k in known if k > i)  # the top is always known
                b = dec.choices[i]
                if lo is None:
                    bits_here = [x for x in per_param.get(b, [])]
                    if bits_here:
                        vals[i] = float(np.mean(bits_here)) * int(self.sizes.counts[d])
                    else:  # nothing measured at or below: scale the nearest measured loss above by noise
                        nh, nb = noise[hi], noise[i]
                        vals[i] = known[hi] * (nb / nh) if nh > 0 else 0.0
                    continue
                nl, nh, nb = noise[lo], noise[hi], noise[i]
                w = (nb - nh) / (nl - nh) if nl > nh else 0.0
                vals[i] = known[hi] + w * (known[lo] - known[hi])
            # a lower choice never loses less than a higher one
            vals = np.maximum.accumulate(vals[::-1])[::-1].copy()
            out.append(vals)
        return out

    def proxy(self, candidate: Sequence[int]) -> float:
        idx = self.space.encode(candidate)
        return float(sum(self.loss[d][i] for d, i in enumerate(idx)))

    def proxy_idx(self, idx: np.ndarray) -> np.ndarray:
        """Proxy loss of candidates given as an (n, D) array of choice indices."""
        idx = np.atleast_2d(idx)
        total = np.zeros(len(idx))
        for d, table in enumerate(self.loss):
            total += table[idx[:, d]]
        return total


class SensitivityStrategy(Strategy):
    """Phase 1 (sensitivity measurements) then whatever ``phase2_ask`` proposes."""


    def start(self) -> None:
        ctx = self.ctx
        full = 1 + sum(d.n_choices - 1 for d in ctx.space.decisions)
        cap = None
        if ctx.max_evals is not None and full > ctx.max_evals * PHASE1_SHARE:
            # at least one evaluation is left for phase 2, so a budgeted run always evaluates a feasible candidate
            cap = max(min(ctx.space.n_decisions + 1, ctx.max_evals - 1), int(ctx.max_evals * PHASE1_SHARE))
        self.sens = Sensitivity(ctx.space, ctx.sizes, cap)
        self.results: dict[Candidate, Evaluation] = {}
        self.n_told = 0
        self._phase1_asked = False
        self._phase1_done = False
        self.byte_table = ctx.sizes.byte_table
        self._init()

    def _init(self) -> None:
        """Hook for subclasses."""

    @property
    def remaining(self) -> int | None:
        if self.ctx.max_evals is None:
            return None
        return max(0, self.ctx.max_evals - self.n_told)

    def ask(self) -> list[Candidate]:
        if not self._phase1_asked:
            self._phase1_asked = True
            return self.new(self.sens.plan)
        if not self._phase1_done:
            self._phase1_done = True
            self.phase2_start()
        if self.remaining == 0:
            return []
        return self.phase2_ask()

    def tell(self, results: list[Evaluation]) -> None:
        super().tell(results)
        for r in results:
            c = tuple(r.candidate)
            if c not in self.results:
                self.n_told += 1
            self.results[c] = r
        if not self._phase1_done:
            self.sens.record(results)

    # ---- helpers ------------------------------------------------------------------------
    def size_idx(self, idx: np.ndarray) -> np.ndarray:
        return self.ctx.sizes.bytes_idx(idx)

    def feasible_idx(self, idx: np.ndarray) -> np.ndarray:
        return self.ctx.feasible_idx(idx)

    def decode_idx(self, idx) -> Candidate:
        return self.space.decode([int(i) for i in idx])

    def phase2_start(self) -> None:
        """Called once, after phase 1 has been told."""

    def phase2_ask(self) -> list[Candidate]:
        return []
