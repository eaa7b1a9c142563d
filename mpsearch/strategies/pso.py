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


import numpy as np

from ..core.records import Evaluation
from ..core.space import Candidate
from .base import Option, Strategy, register

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


@register
class PSO(Strategy):
    """Particle swarm over per-decision positions in [0, n_choices), projected onto the size cap."""

    name = "pso"

    OPTIONS = (
        Option("n_particles", int, 16, "swarm size", low=1),
        Option("w", float, 0.7, "inertia", low=0.0),
        Option("c1", float, 1.5, "cognitive coefficient", low=0.0),
        Option("c2", float, 1.5, "social coefficient", low=0.0),
        Option("vmax", float, 0.5, "velocity clamp, as a fraction of the widest dimension", low=0.0),
        Option("init_uniform", float, 0.3, "share of the first swarm placed near the diagonal", low=0.0, high=1.0),
        Option("cap_gamma", float, 2.0, "front mode: caps at min + (max - min) * u**gamma", low=0.0),
        Option("repair", bool, True, "project positions onto the budget (else penalise the excess)"),
        Option("penalty", float, 1.0, "without repair: cost per unit of relative excess", low=0.0),
        Option("mutation_tries", int, 8, "mutations tried when a particle lands on a known candidate", low=0),
    )

    # ---- set-up ------------------------------------------------------------------------
    def start(self):
        Swarm, Star, BoundaryHandler, VelocityHandler, self._ops = _pyswarms()
        sizes = self.ctx.sizes
        self.n = np.array(self.space.n_choices, dtype=np.int64)
        self.D = D = len(self.n)
        N = self.n_particles
        self.min_bytes = float(sizes.min_size_bytes())
        self.max_bytes = float(sizes.max_size_bytes())
        self.front_mode = self.ctx.budget is None
        self.upper = self.n.astype(float) - 1e-6
        self.bounds = (np.zeros(D), self.upper.copy())
        vm = self.vmax * float(self.n.max())
        self.clamp = (-vm, vm)
        with _contained_logging():
            self.topology = Star()
            self.bh = BoundaryHandler(strategy="nearest")
            self.vh = VelocityHandler(strategy="unmodified")
        n_diag = int(round(self.init_uniform * N))
        pos = self.rng.uniform(0.0, 1.0, (N, D)) * self.n
        for i in range(min(n_diag, N)):
            # near-uniform allocations at spread-out levels (they are projected onto the cap anyway)
            level = (i + 0.5) / max(n_diag, 1)
            pos[i] = level * self.n + self.rng.normal(0.0, 0.15, D)
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
        return self.min_bytes + (self.max_bytes - self.min_bytes) * u ** self.cap_gamma

    # ---- projection --------------------------------------------------------------------
    def _fits(self, idx: np.ndarray, caps: np.ndarray | float | None = None) -> np.ndarray:
        """Rows of choice indices within the budget and within ``caps`` bytes (per row or scalar)."""
        ok = self.ctx.feasible_idx(idx)
        if caps is not None:
            ok &= self.ctx.sizes.bytes_idx(idx) <= caps
        return ok

    def _decode(self, pos: np.ndarray) -> np.ndarray:
        return np.minimum(np.floor(np.clip(pos, 0.0, None)).astype(np.int64), self.n - 1)

    def _project(self, pos: np.ndarray, caps: np.ndarray | None, fill: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Shift each row along the diagonal to the largest shift that fits, then fill the slack."""
        pos = np.clip(pos, 0.0, self.upper)
        if not self.repair:
            return pos, self._decode(pos)
        N = len(pos)
        span = float(self.n.max())
        lo, hi = np.full(N, -span), np.full(N, span)
        lo_ok = self._fits(self._decode(pos + lo[:, None]), caps)
        for _ in range(16):
            mid = 0.5 * (lo + hi)
            ok = self._fits(self._decode(pos + mid[:, None]), caps)
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
            frac = new[r] - idx[r] + self.rng.uniform(0.0, 1e-6, self.D)
            self._fill(idx[r], new[r], np.argsort(-frac), cap)
        return new, idx

    def _fill(self, idx: np.ndarray, x: np.ndarray, order, cap: float | None) -> None:
        sizes, budget = self.ctx.sizes, self.ctx.budget
        nbytes = int(sizes.bytes_idx(idx)[0])
        nbits = int(sizes.weight_bits_idx(idx)[0])
        count = sizes.total_count

        def ok(b: int, bits: int) -> bool:
            if cap is not None and b > cap:
                return False
            return budget is None or budget.fits(b, bits / count if count else 32.0)

        if not ok(nbytes, nbits):
            return
        for d in order:
            i = idx[d]
            if i + 1 >= self.n[d]:
                continue
            b = nbytes + int(sizes.byte_table[d][i + 1] - sizes.byte_table[d][i])
            bits = nbits + int(sizes.bit_table[d][i + 1] - sizes.bit_table[d][i])
            if ok(b, bits):
                idx[d] = i + 1
                nbytes, nbits = b, bits
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
        raw_excess = self.ctx.budget.excess(self.ctx.sizes, self._decode(sw.position)) if not self.front_mode else np.zeros(N)
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
        T, D = self.mutation_tries, self.D
        ys = np.repeat(x[None], T + 1, axis=0)
        for t in range(T):
            k = 1 + int(self.rng.integers(min(3, D)))
            dims = self.rng.choice(D, size=k, replace=False)
            ys[t, dims] += self.rng.choice([-1.0, 1.0], size=k) * self.rng.uniform(0.6, 1.6, size=k)
        ys[T] = self.rng.uniform(0.0, 1.0, D) * self.n  # re-seed: a fresh random position
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
                c = self.space.decode(self.repaired(self.space.encode(c)))
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
            return 1e6 + (ev.size_bytes - cap) / self.max_bytes
        return -self.objective(ev)

    def _known_costs(self) -> np.ndarray:
        out = np.full(self.n_particles, np.inf)
        for r, cand in enumerate(self.pending):
            ev = self.archive.get(cand) if cand is not None else None
            cap = None if self.caps is None else self.caps[r]
            out[r] = self._cost(ev, cap)
            if not self.repair and np.isfinite(out[r]):
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
