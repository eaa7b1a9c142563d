"""Bayesian / model-based search with Optuna: multivariate TPE (default), GP or NSGA-II.

The strategy owns an in-memory optuna study and drives it with ``ask``/``tell``. Each
decision is an ordered choice index, so the samplers see that 3 bits lies between 2 and
4: for GP and NSGA-II an integer (``suggest_int(name, 0, n_choices - 1)``); for TPE a
coordinate in ``[0, n_choices)`` floored to the index, the encoding pso uses. Optuna's
discrete TPE kernels evaluate a truncated-normal mass per kernel, per dimension and per
candidate, in Python, and cost clearly more per ask than float kernels on minilm's 39
decisions; 12 expected-improvement candidates instead of optuna's 24 save a little more.

* Budget mode: one objective (maximise the metric) and one constraint per trial,
  ``trial.set_constraint("size", excess)`` with excess = relative size over the budget
  (<= 0 feasible; optuna 5 replaced ``constraints_func`` with this). A suggestion that
  misses the budget is never evaluated: it is told to the study as infeasible (free),
  and, with ``repair=True``, its repair on the exact size tables (lower the decisions
  that save the most bytes per unit of quantisation-noise proxy) is enqueued instead.
* Front mode (no budget): two objectives, minimise size (fraction of full precision)
  and maximise the metric.

Local moves (``local_share``, default 0.5): that share of the candidates are not sampled
but taken next to the incumbent (the best feasible evaluation; in front mode a random
point of the evaluated front): one decision one step away, else one decision up and
another down, at random among those that fit and were not asked. They are enqueued as
trials and told like any other, so TPE learns from them. Two reasons. On minilm's 39
decisions pure TPE (``local_share=0``) did not leave the uniform 4-bit warm start within
300 evaluations (validation cosine 0.889 against 0.913 with local moves, seed 0), and
optuna's ask was 5.3-5.5% of the run (3 seeds), against 3.6-3.8% with local moves
(``experiments/exp_minilm.py``). On digits_small the hypervolume ratio at 100
evaluations went from 0.9994 to 0.9999 (``experiments/exp_digits.py``).

A suggestion that was evaluated before is told its known values (free) and, instead of
asking the sampler again (the costly part), a near candidate not yet asked is enqueued
the same way, or a random new one when every near one was asked.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import numpy as np

from ..core.pareto import pareto_front
from ..core.records import Evaluation
from ..errors import OptionError
from ..core.space import Candidate
from .base import Option, Strategy, register

SAMPLERS = ("tpe", "gp", "nsga2")


def _warm_start(value):
    if value is None or value == "uniform":
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(c, (list, tuple)) for c in value):
        return [tuple(c) for c in value]
    raise ValueError("expected 'uniform', a list of candidates (lists of bits per decision) or null")


@contextlib.contextmanager
def _quiet():
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@register
class Bayes(Strategy):
    """Optuna samplers over ordered bit-width indices, with exact budget constraints."""

    name = "bayes"

    OPTIONS = (
        Option("sampler", str, "tpe", "optuna sampler", choices=SAMPLERS),
        Option("batch_size", int, 1, "candidates per ask (set it to the number of workers)", low=1),
        Option("warm_start", object, "uniform", "'uniform', a list of candidates (bits per decision) or null",
               check=lambda v: _warm_start(v)),
        Option("repair", bool, True, "enqueue the repair of an infeasible suggestion"),
        Option("max_retries", int, 20, "suggestions of known candidates before a random new one is enqueued", low=1),
        Option("n_startup_trials", int, None, "random trials before the model is used (optuna's default: null)",
               low=0, nullable=True),
        Option("population_size", int, None, "nsga2 population (default: from the number of decisions)", low=2,
               nullable=True),
        Option("n_ei_candidates", int, 12, "TPE: candidates scored per suggestion", low=1),
        Option("local_share", float, 0.5, "share of candidates taken as local moves next to the incumbent",
               low=0.0, high=1.0, high_open=True),
    )

    def __init__(self, **options):
        super().__init__(**options)
        self.sampler_name = self.sampler
        self.continuous = self.sampler == "tpe"  # see the module docstring

    # ---- set-up ------------------------------------------------------------------------
    def _make_sampler(self):
        import optuna

        seed = int(self.rng.integers(2**31 - 1))
        kw = {} if self.n_startup_trials is None else {"n_startup_trials": int(self.n_startup_trials)}
        if self.sampler_name == "tpe":
            return optuna.samplers.TPESampler(multivariate=True, seed=seed, constant_liar=self.batch_size > 1,
                                              n_ei_candidates=self.n_ei_candidates, **kw)
        if self.sampler_name == "gp":
            return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True, **kw)
        pop = self.population_size or max(10, min(50, 4 * self.space.n_decisions))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=int(pop))

    def start(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.front_mode = self.ctx.budget is None
        self.names = [f"d{j}" for j in range(self.space.n_decisions)]
        self.fp_bytes = float(self.ctx.sizes.full_precision_bytes)
        with _quiet():
            self.sampler = self._make_sampler()
            directions = ["minimize", "maximize"] if self.front_mode else ["maximize"]
            self.study = optuna.create_study(sampler=self.sampler, directions=directions)
        self.archive: dict[Candidate, Evaluation] = {}
        self.pending: dict[Candidate, object] = {}
        self.n_free = 0  # trials told without an evaluation (infeasible or known)
        self._local_credit = 0.0  # local moves owed (local_share per candidate asked)
        # near moves: each decision one step, then one decision up and another down (every ordered pair)
        self.n_choices = np.array(self.space.n_choices)
        D = len(self.n_choices)
        up, down = np.nonzero(~np.eye(D, dtype=bool))
        swaps = np.zeros((len(up), D), dtype=np.int64)
        swaps[np.arange(len(up)), up] = 1
        swaps[np.arange(len(up)), down] = -1
        self.moves = (np.concatenate([np.eye(D, dtype=np.int64), -np.eye(D, dtype=np.int64)]), swaps)
        warm: list = []
        if self.warm_start == "uniform":
            warm = [self.space.uniform(b) for b in reversed(self.space.uniform_choices())]
            warm = [c for c in warm if c is not None and self.feasible(c)]
        elif self.warm_start is not None:
            try:
                warm = [self.space.check_candidate(c) for c in self.warm_start]
            except ValueError as exc:
                raise OptionError(f"strategy 'bayes': option warm_start: {exc}") from None
        for c in warm:
            self._enqueue(c)

    def _enqueue(self, cand: Sequence[int]) -> None:
        idx = self.space.encode(cand)
        values = (i + 0.5 for i in idx) if self.continuous else (int(i) for i in idx)
        self.study.enqueue_trial(dict(zip(self.names, values)))

    # ---- values told to optuna -----------------------------------------------------------
    def _values(self, ev: Evaluation):
        if self.front_mode:
            return [ev.size_bytes / self.fp_bytes, float(ev.metric)]
        return float(ev.metric)

    def _worst(self) -> float:
        if self.archive:
            return float(min(e.metric for e in self.archive.values()))
        ref = float(self.ctx.reference_metric)
        return ref - 1.0 - abs(ref)

    def _tell(self, trial, idx: np.ndarray, ev: Evaluation | None) -> None:
        if not self.front_mode:
            trial.set_constraint("size", float(self.ctx.budget.excess(self.ctx.sizes, idx[None])[0]))
        self.study.tell(trial, self._values(ev) if ev is not None else self._worst())

    # ---- ask / tell ----------------------------------------------------------------------
    def ask(self) -> list[Candidate]:
        out: list[Candidate] = []
        with _quiet():
            while len(out) < self.batch_size:
                c = self._next()
                if c is None:
                    break
                out.append(c)
        return self.new(out)

    def _suggest(self):
        trial = self.study.ask()
        if self.continuous:
            idx = np.array([min(int(trial.suggest_float(n, 0.0, k)), k - 1)
                            for n, k in zip(self.names, self.space.n_choices)], dtype=np.int64)
        else:
            idx = np.array([trial.suggest_int(n, 0, k - 1) for n, k in zip(self.names, self.space.n_choices)],
                           dtype=np.int64)
        return trial, idx

    def _next(self) -> Candidate | None:
        from optuna.trial import TrialState

        self._local_credit += self.local_share
        if self._local_credit >= 1.0 and self.archive:
            self._local_credit -= 1.0
            self._enqueue_near(self._incumbent())
        for attempt in range(self.max_retries + 100):
            if attempt >= self.max_retries:
                # the sampler keeps proposing known points: enqueue a random new candidate (the queue
                # is first-in first-out, so older entries may come first and are answered for free)
                c = self._random_new()
                if c is None:
                    return None
                self._enqueue(c)
            trial, idx = self._suggest()
            cand = self.space.decode(idx)
            if not self.feasible(cand):
                self._tell(trial, idx, None)  # infeasible: told for free, never evaluated
                self.n_free += 1
                if self.repair:
                    self._enqueue(self.space.decode(self.repaired(idx)))
                continue
            if cand in self.archive:
                self._tell(trial, idx, self.archive[cand])  # known: its values again, for free
                self.n_free += 1
                self._enqueue_near_or_new(idx)
                continue
            if cand in self.pending or cand in self.seen:
                self.study.tell(trial, state=TrialState.FAIL)  # asked in this batch, answer not in yet
                self._enqueue_near_or_new(idx)
                continue
            self.pending[cand] = trial
            return cand
        return None

    def _fresh(self, c: Candidate) -> bool:
        return self.feasible(c) and c not in self.seen and c not in self.pending

    def _incumbent(self) -> np.ndarray:
        """Budget mode: the best feasible evaluation; front mode: a random point of the evaluated front."""
        if self.front_mode:
            front = pareto_front(self.archive.values())
            pick = front[int(self.rng.integers(len(front)))]
        else:
            feasible = [e for e in self.archive.values() if self.feasible(e.candidate)]
            if feasible:  # the best; among equals the smallest
                pick = min(feasible, key=lambda e: (-e.metric, e.size_bytes, e.candidate))
            else:
                pick = min(self.archive.values(), key=lambda e: (e.size_bytes, -e.metric, e.candidate))
        return np.array(self.space.encode(pick.candidate), dtype=np.int64)

    def _enqueue_near(self, idx: np.ndarray) -> bool:
        """Enqueue a random feasible candidate not asked yet among the nearest: one decision one step
        away, else one up and another down (what a candidate at the budget needs); False when none is left."""
        n = self.n_choices
        for moves in self.moves:
            rows = idx[None, :] + moves
            rows = rows[((rows >= 0) & (rows < n)).all(axis=1)]
            rows = rows[self.ctx.feasible_idx(rows)] if len(rows) else rows
            for k in self.rng.permutation(len(rows)):
                c = self.space.decode(rows[k])
                if self._fresh(c):
                    self._enqueue(c)
                    return True
        return False

    def _enqueue_near_or_new(self, idx: np.ndarray) -> None:
        if not self._enqueue_near(idx):
            c = self._random_new()
            if c is not None:
                self._enqueue(c)

    def _random_new(self) -> Candidate | None:
        for _ in range(10_000):
            c = self.space.random(self.rng)
            if not self.feasible(c):
                c = self.space.decode(self.repaired(self.space.encode(c)))
            if self._fresh(c):
                return c
        return None

    def tell(self, results: list[Evaluation]) -> None:
        super().tell(results)
        with _quiet():
            for r in results:
                cand = tuple(r.candidate)
                self.archive[cand] = r
                trial = self.pending.pop(cand, None)
                if trial is not None:
                    self._tell(trial, np.array(self.space.encode(cand), dtype=np.int64), r)
