"""Particle swarm optimisation over bit-widths, driven by ``pyswarms.backend``.

Each decision is one continuous dimension in ``[0, n_choices)``, floored to a choice
index. Every position is projected onto its size cap before it is asked: the whole
vector is shifted along the diagonal (keeping the particle's relative preferences)
to the largest shift that fits, then the decisions closest to their next level are
raised one step while they still fit. The projected position is written back
(Lamarckian repair), so the swarm moves on the budget's boundary.

* Budget mode: one cap (the budget); cost = -metric, star topology (global best).
* Front mode (no budget): epsilon-constraint scalarisation. Every particle gets its
  own size cap, stratified over [smallest, largest] size and jittered each iteration;
  its personal best and its social attractor are the best quality within that cap,
  so the swarm spreads along the whole front.

pyswarms draws from the global numpy RNG and its ``Reporter`` reconfigures the root
logger and opens ``report.log`` in the working directory whenever one is built (on
import, too). Both are contained here: ``logging.config.dictConfig`` is a no-op while
pyswarms is imported or its objects are built, and every call that draws random
numbers runs on a global state seeded from ``self.rng`` and restored afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import logging.config
import threading
from typing import Sequence

import numpy as np

from ..evaluator import Evaluation
from ..quantize import UNQUANTIZED_BITS
from ..space import Candidate
from .base import Strategy, register

_PS_LOCK = threading.Lock()
_PS = None  # (Swarm, Star, BoundaryHandler, VelocityHandler, ops) once imported


@contextlib.contextmanager
def _contained_logging():
    """Keep pyswarms' Reporter from touching logging: no dictConfig, no report.log, root unchanged."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, root.disabled)
    orig = logging.config.dictConfig
    logging.config.dictConfig = lambda *a, **k: None
    try:
        yield
    finally:
        logging.config.dictConfig = orig
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        root.disabled = saved[2]


def _pyswarms():
    global _PS
    with _PS_LOCK:
        if _PS is None:
            with _contained_logging():
                from pyswarms.backend import operators as ops
                from pyswarms.backend.handlers import BoundaryHandler, VelocityHandler
                from pyswarms.backend.swarms import Swarm
                from pyswarms.backend.topology import Star
            _PS = (Swarm, Star, BoundaryHandler, VelocityHandler, ops)
    return _PS


@contextlib.contextmanager
def _global_numpy_seed(rng: np.random.Generator):
    """Run a block on the global numpy RNG seeded from ``rng``; restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(int(rng.integers(2**32)))
    try:
        yield
    finally:
        np.random.set_state(state)


class SizeTables:
    """Exact bytes and average bits of index vectors, vectorised over rows (from ``SizeModel``)."""

    def __init__(self, ctx):
        space, size = ctx.space, ctx.size
        self.n = np.array(space.n_choices, dtype=np.int64)
        self.D = len(self.n)
        k = int(self.n.max()) if self.D else 1
        self.bytes = np.zeros((self.D, k), dtype=np.float64)
        self.bits = np.zeros((self.D, k), dtype=np.float64)  # quantized-weight bits (numerator of avg bits)
        self.cnt = np.zeros((self.D, k), dtype=np.float64)  # quantized-weight count (denominator)
        for d, dec in enumerate(space.decisions):
            for i, b in enumerate(dec.choices):
                self.bytes[d, i] = size.table[d][i]
                self.bits[d, i] = float(size.bits_table[d][i])  # 32-bit weights count at float width
                self.cnt[d, i] = float(size.counts[d])
            self.bytes[d, dec.n_choices:] = np.inf
        self.fixed_bytes = float(size.fixed_bytes)
        self.fixed_bits = float(size.fixed_bits)
        self.fixed_count = float(size.fixed_count)
        self.rows = np.arange(self.D)
        self.min_bytes = float(size.min_size_bytes())
        self.max_bytes = self.fixed_bytes + float(sum(size.table[d][-1] for d in range(self.D)))
        budget = ctx.budget
        self.cap_bytes = None if budget is None or budget.max_bytes is None else float(budget.max_bytes)
        self.cap_bits = None if budget is None or budget.max_avg_bits is None else float(budget.max_avg_bits) + 1e-9
        self.bits_per_byte_saved = None

    def stats(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bytes, avg bits) of each row of an (N, D) index matrix."""
        idx = np.atleast_2d(idx)
        b = self.fixed_bytes + self.bytes[self.rows, idx].sum(axis=1)
        cnt = self.fixed_count + self.cnt[self.rows, idx].sum(axis=1)
        bits = self.fixed_bits + self.bits[self.rows, idx].sum(axis=1)
        avg = np.where(cnt > 0, bits / np.maximum(cnt, 1.0), float(UNQUANTIZED_BITS))
        return b, avg

    def fits(self, idx: np.ndarray, cap: np.ndarray | float | None = None) -> np.ndarray:
        """Rows within the budget and within ``cap`` bytes (per row or scalar)."""
        b, avg = self.stats(idx)
        ok = np.ones(len(b), dtype=bool)
        if self.cap_bytes is not None:
            ok &= b <= self.cap_bytes
        if self.cap_bits is not None:
            ok &= avg <= self.cap_bits
        if cap is not None:
            ok &= b <= cap
        return ok

    def excess(self, idx: np.ndarray) -> np.ndarray:
        """Relative excess over the budget per row (<= 0 feasible)."""
        b, avg = self.stats(idx)
        out = np.full(len(b), -np.inf)
        if self.cap_bytes is not None:
            out = np.maximum(out, (b - self.cap_bytes) / self.cap_bytes)
        if self.cap_bits is not None:
            out = np.maximum(out, (avg - self.cap_bits) / self.cap_bits)
        return np.where(np.isfinite(out), out, 0.0)

    def repair(self, idx: Sequence[int], cap: float | None = None) -> np.ndarray:
        """Lower decisions until ``idx`` fits: each step takes the one-level drop that saves the most
        bytes per unit of a quantisation-noise proxy (n_params x 4^-bits)."""
        idx = np.array(idx, dtype=np.int64)
        while not self.fits(idx[None], cap)[0]:
            can = idx > 0
            if not can.any():
                break
            lo = np.where(can, idx - 1, 0)
            saved = self.bytes[self.rows, idx] - self.bytes[self.rows, lo]
            # noise proxy from the bit-widths themselves: counts * (4^-b_lo - 4^-b_hi)
            cnt = np.maximum(self.cnt[self.rows, idx], 1.0)
            b_hi = self.bits[self.rows, idx] / cnt
            b_lo = self.bits[self.rows, lo] / cnt
            loss = cnt * (4.0 ** -np.maximum(b_lo, 0.5) - 4.0 ** -np.maximum(b_hi, 0.5)) + 1e-12
            score = np.where(can, saved / loss, -np.inf)
            idx[int(np.argmax(score))] -= 1
        return idx


@register
class PSO(Strategy):
    """Particle swarm over per-decision positions in [0, n_choices), projected onto the size cap."""

    name = "pso"
    batch_hint = True

    def __init__(self, n_particles: int = 16, w: float = 0.7, c1: float = 1.5, c2: float = 1.5,
                 vmax: float = 0.5, init_uniform: float = 0.3, cap_gamma: float = 2.0,
                 repair: bool = True, penalty: float = 1.0, mutation_tries: int = 8):
        super().__init__(n_particles=n_particles, w=w, c1=c1, c2=c2, vmax=vmax, init_uniform=init_uniform,
                         cap_gamma=cap_gamma, repair=repair, penalty=penalty, mutation_tries=mutation_tries)
        if int(n_particles) < 1:
            raise ValueError("n_particles must be at least 1")
        self.n_particles = int(n_particles)
        self.w, self.c1, self.c2 = float(w), float(c1), float(c2)
        self.vmax = float(vmax)  # velocity clamp, as a fraction of the widest dimension
        self.init_uniform = float(init_uniform)  # share of the first swarm placed near the diagonal
        self.cap_gamma = float(cap_gamma)  # front mode: caps at min + (max - min) * u**gamma
        self.do_repair = bool(repair)
        self.penalty = float(penalty)
        self.mutation_tries = int(mutation_tries)

    # ---- set-up ------------------------------------------------------------------------
    def start(self):
        Swarm, Star, BoundaryHandler, VelocityHandler, self._ops = _pyswarms()
        self.tab = SizeTables(self.ctx)
        D, N = self.tab.D, self.n_particles
        self.front_mode = self.ctx.budget is None
        self.upper = self.tab.n.astype(float) - 1e-6
        self.bounds = (np.zeros(D), self.upper.copy())
        vm = self.vmax * float(self.tab.n.max())
        self.clamp = (-vm, vm)
        with _contained_logging():
            self.topology = Star()
            self.bh = BoundaryHandler(strategy="nearest")
            self.vh = VelocityHandler(strategy="unmodified")
        n_diag = int(round(self.init_uniform * N))
        pos = self.rng.uniform(0.0, 1.0, (N, D)) * self.tab.n
        for i in range(min(n_diag, N)):
            # near-uniform allocations at spread-out levels (they are projected onto the cap anyway)
            level = (i + 0.5) / max(n_diag, 1)
            pos[i] = level * self.tab.n + self.rng.normal(0.0, 0.15, D)
        pos = np.clip(pos, 0.0, self.upper)
        vel = self.rng.uniform(-0.1, 0.1, (N, D)) * vm
        options = {"c1": self.c1, "c2": self.c2, "w": self.w}
        self.swarm = Swarm(position=pos, velocity=vel, options=options)
        self.swarm.pbest_pos = pos.copy()
        self.swarm.pbest_cost = np.full(N, np.inf)
        self.swarm.current_cost = np.full(N, np.inf)
        self.swarm.best_pos = pos[0].copy()
        self.swarm.best_cost = np.inf
        self.archive: dict[Candidate, Evaluation] = {}
        self.history: list[list[tuple[np.ndarray, Candidate]]] = [[] for _ in range(N)]  # front mode
        self.caps = self._draw_caps()
        self.iteration = 0
        self.pending: list[Candidate | None] = []
        self.pending_excess = np.zeros(N)

    def _draw_caps(self) -> np.ndarray | None:
        if not self.front_mode:
            return None
        N = self.n_particles
        u = (self.rng.permutation(N) + self.rng.uniform(0.0, 1.0, N)) / N
        return self.tab.min_bytes + (self.tab.max_bytes - self.tab.min_bytes) * u ** self.cap_gamma

    # ---- projection --------------------------------------------------------------------
    def _decode(self, pos: np.ndarray) -> np.ndarray:
        return np.minimum(np.floor(np.clip(pos, 0.0, None)).astype(np.int64), self.tab.n - 1)

    def _project(self, pos: np.ndarray, caps: np.ndarray | None, fill: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Shift each row along the diagonal to the largest shift that fits, then fill the slack."""
        pos = np.clip(pos, 0.0, self.upper)
        if not self.do_repair:
            return pos, self._decode(pos)
        N = len(pos)
        span = float(self.tab.n.max())
        lo, hi = np.full(N, -span), np.full(N, span)
        lo_ok = self.tab.fits(self._decode(pos + lo[:, None]), caps)
        for _ in range(16):
            mid = 0.5 * (lo + hi)
            ok = self.tab.fits(self._decode(pos + mid[:, None]), caps)
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        shift = np.where(lo_ok, lo, -span)
        new = np.clip(pos + shift[:, None], 0.0, self.upper)
        idx = self._decode(new)
        if not fill:
            return new, idx
        # fill: raise the decisions nearest to their next level, one step each, while they fit
        for r in range(N):
            cap = None if caps is None else float(caps[r])
            frac = new[r] - idx[r] + self.rng.uniform(0.0, 1e-6, self.tab.D)
            self._fill(idx[r], new[r], np.argsort(-frac), cap)
        return new, idx

    def _fill(self, idx: np.ndarray, x: np.ndarray, order, cap: float | None) -> None:
        t = self.tab
        rows = t.rows
        nbytes = t.fixed_bytes + float(t.bytes[rows, idx].sum())
        nbits = t.fixed_bits + float(t.bits[rows, idx].sum())
        ncnt = t.fixed_count + float(t.cnt[rows, idx].sum())
        limit = min(v for v in (t.cap_bytes, cap, np.inf) if v is not None)

        def ok(b, bits, cnt):
            if b > limit:
                return False
            return t.cap_bits is None or (bits / cnt if cnt > 0 else float(UNQUANTIZED_BITS)) <= t.cap_bits

        if not ok(nbytes, nbits, ncnt):
            return
        for d in order:
            i = idx[d]
            if i + 1 >= t.n[d]:
                continue
            b = nbytes + t.bytes[d, i + 1] - t.bytes[d, i]
            bits = nbits + t.bits[d, i + 1] - t.bits[d, i]
            cnt = ncnt + t.cnt[d, i + 1] - t.cnt[d, i]
            if ok(b, bits, cnt):
                idx[d] = i + 1
                nbytes, nbits, ncnt = b, bits, cnt
                x[d] = max(x[d], i + 1.05)

    # ---- ask / tell ----------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        for _ in range(3):
            batch = self._step()
            if batch:
                return batch
            self._update(self._known_costs())  # every particle landed on known points: move on for free
        return self._fallback()

    def _step(self) -> list[Candidate]:
        sw, N = self.swarm, self.n_particles
        if self.iteration > 0:
            with _global_numpy_seed(self.rng):
                sw.velocity = self.topology.compute_velocity(sw, self.clamp, self.vh, self.bounds)
                sw.position = self.topology.compute_position(sw, self.bounds, self.bh)
            self.caps = self._draw_caps()
        self.iteration += 1
        raw_excess = self.tab.excess(self._decode(sw.position)) if not self.front_mode else np.zeros(N)
        pos, idx = self._project(sw.position, self.caps)
        batch: list[Candidate] = []
        taken: set[Candidate] = set()
        self.pending = []
        for r in range(N):
            cand = self.space.decode(idx[r])
            if cand in self.seen or cand in taken:
                pos[r], cand = self._diversify(pos[r], r, taken)
            if cand is not None:
                taken.add(cand)
                batch.append(cand)
            self.pending.append(cand)
        sw.position = pos
        self.pending_excess = np.maximum(raw_excess, 0.0)
        return self.new(batch)

    def _diversify(self, x: np.ndarray, r: int, taken: set) -> tuple[np.ndarray, Candidate | None]:
        """A particle that decodes to a known candidate: mutate a few decisions, else re-seed it."""
        T, D = self.mutation_tries, self.tab.D
        ys = np.repeat(x[None], T + 1, axis=0)
        for t in range(T):
            k = 1 + int(self.rng.integers(min(3, D)))
            dims = self.rng.choice(D, size=k, replace=False)
            ys[t, dims] += self.rng.choice([-1.0, 1.0], size=k) * self.rng.uniform(0.6, 1.6, size=k)
        ys[T] = self.rng.uniform(0.0, 1.0, D) * self.tab.n  # re-seed: a fresh random position
        caps = None if self.caps is None else np.full(T + 1, self.caps[r])
        for fill in (True, False):  # unfilled (not maximal) variants once the boundary is used up
            zs, idx = self._project(ys, caps, fill)
            for t in range(T + 1):
                cand = self.space.decode(idx[t])
                if cand not in self.seen and cand not in taken:
                    if t == T:
                        self.swarm.velocity[r] = self.rng.uniform(-0.1, 0.1, D) * self.clamp[1]
                    return zs[t], cand
        return x, None

    def _fallback(self) -> list[Candidate]:
        for _ in range(10_000):
            c = self.space.random(self.rng)
            if not self.feasible(c):
                c = self.space.decode(self.tab.repair(self.space.encode(c)))
            if self.feasible(c) and c not in self.seen:
                return self.new([c])
        return []

    def tell(self, results: list[Evaluation]) -> None:
        super().tell(results)
        for r in results:
            self.archive[tuple(r.candidate)] = r
        if self.pending:
            self._update(self._known_costs())

    def _cost(self, ev: Evaluation | None, cap: float | None) -> float:
        if ev is None:
            return np.inf
        if cap is not None and ev.size_bytes > cap + 1e-9:
            return 1e6 + (ev.size_bytes - cap) / self.tab.max_bytes
        return -self.objective(ev)

    def _known_costs(self) -> np.ndarray:
        out = np.full(self.n_particles, np.inf)
        for r, cand in enumerate(self.pending):
            ev = self.archive.get(cand) if cand is not None else None
            cap = None if self.caps is None else self.caps[r]
            out[r] = self._cost(ev, cap)
            if not self.do_repair and np.isfinite(out[r]):
                out[r] += self.penalty * self.pending_excess[r]
        return out

    def _update(self, cost: np.ndarray) -> None:
        sw = self.swarm
        sw.current_cost = cost
        if not self.front_mode:
            sw.pbest_pos, sw.pbest_cost = self._ops.compute_pbest(sw)
            sw.best_pos, sw.best_cost = self.topology.compute_gbest(sw)
            return
        # front mode: bests under each particle's current cap, from its history and from the archive
        for r, cand in enumerate(self.pending):
            if cand is not None and cand in self.archive:
                self.history[r].append((sw.position[r].copy(), cand))
        keys = list(self.archive)
        sizes = np.array([self.archive[k].size_bytes for k in keys], dtype=float)
        metrics = np.array([self.archive[k].metric for k in keys], dtype=float)
        positions = {}
        for hist in self.history:
            for p, c in hist:
                positions[c] = p
        best_pos = sw.position.copy()
        for r in range(self.n_particles):
            cap = self.caps[r]
            hist = self.history[r]
            if hist:
                costs = [self._cost(self.archive[c], cap) for _, c in hist]
                j = int(np.argmin(costs))
                sw.pbest_pos[r], sw.pbest_cost[r] = hist[j][0], costs[j]
            ok = sizes <= cap + 1e-9
            if ok.any():
                j = int(np.argmax(np.where(ok, metrics, -np.inf)))
                if keys[j] in positions:
                    best_pos[r] = positions[keys[j]]
                else:
                    best_pos[r] = np.array(self.space.encode(keys[j]), dtype=float) + 0.5
        sw.best_pos = best_pos
        sw.best_cost = float(np.min(sw.pbest_cost))
