"""The search loop: ask -> evaluate -> tell, with records, resume and anytime results."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import numpy as np

from .core.budget import Budget
from .core.pareto import ParetoFront
from .core.records import Evaluation
from .core.sizes import SizeTable
from .core.space import Candidate, SearchSpace
from .errors import MPSearchError, SpaceError
from .storage import TrialStore
from .strategies import SearchContext, Strategy, get_strategy

MAX_STALLS = 100  # batches in a row that bring nothing new before the loop gives up on a strategy
MIN_FAILURES = 3  # failed evaluations before the share of failures is judged


@dataclass(frozen=True)
class Termination:
    """``max_failures``: the search stops once more than this share of its evaluations failed
    (judged from ``MIN_FAILURES`` failures on)."""

    max_evals: int | None = None
    wall_s: float | None = None
    max_failures: float = 0.5

    def __post_init__(self):
        if self.max_evals is not None and (isinstance(self.max_evals, bool) or not isinstance(self.max_evals, int)
                                           or self.max_evals <= 0):
            raise MPSearchError(f"max evaluations must be a positive integer, got {self.max_evals!r}")
        if self.wall_s is not None and not (isinstance(self.wall_s, (int, float)) and math.isfinite(self.wall_s)
                                            and self.wall_s > 0):
            raise MPSearchError(f"wall time must be a positive number of seconds, got {self.wall_s!r}")
        if not (isinstance(self.max_failures, (int, float)) and 0.0 <= self.max_failures <= 1.0):
            raise MPSearchError(f"max failures must be a share between 0 and 1, got {self.max_failures!r}")


class Objective(Protocol):
    """What the loop needs from an evaluator: ``mpsearch.evaluator.Evaluator``, or a synthetic one in tests."""

    space: SearchSpace
    sizes: SizeTable
    metric_name: str
    reference_metric: float

    def evaluate(self, candidate: Sequence[int]) -> Evaluation: ...

    def remember(self, ev: Evaluation) -> None: ...


@dataclass
class SearchResult:
    trials: list[Evaluation]
    strategy: str
    seed: int
    budget: Budget | None
    full_precision_bytes: int
    reference_metric: float
    metric_name: str
    wall_s: float = 0.0
    eval_s: float = 0.0  # time spent computing evaluations in this process
    strategy_s: float = 0.0  # time inside ask() and tell()
    storage_s: float = 0.0
    stop_reason: str = ""
    n_resumed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def n_evals(self) -> int:
        return len(self.trials)

    @property
    def n_failed(self) -> int:
        return sum(1 for t in self.trials if not t.ok)

    @property
    def first_error(self) -> str | None:
        return next((f"candidate {list(t.candidate)}: {t.error}" for t in self.trials if not t.ok), None)

    @property
    def front(self) -> ParetoFront:
        return ParetoFront(self.trials, self.full_precision_bytes, self.reference_metric, self.metric_name)

    @property
    def hypervolume(self) -> float:
        return self.front.hypervolume()

    def best(self, budget: Budget | None = None) -> Evaluation | None:
        """Best evaluation within the budget (the search's own by default); None without a budget or a feasible one."""
        budget = budget or self.budget
        if budget is None:
            return None
        ok = [t for t in self.trials if t.ok and budget.admits(t)]
        return max(ok, key=lambda t: (t.metric, -t.size_bytes, -t.number)) if ok else None


class LocalExecutor:
    """Evaluates in this process, one candidate at a time, stopping early when asked to.

    An executor's ``run`` calls ``on_result(evaluation, persisted)`` once per candidate it
    completes; ``persisted`` says the executor already wrote the record to the store (as
    remote workers do), so the loop must not write it again. ``attach`` hands it the store.
    """

    def __init__(self, evaluator: Objective):
        self.evaluator = evaluator

    def attach(self, store: TrialStore) -> None:
        pass

    def run(self, candidates: Sequence[Candidate], on_result: Callable[[Evaluation, bool], None],
            should_stop: Callable[[], bool]) -> None:
        # in the order that shares block prefixes best; each recorded as it completes, so a kill loses none
        order = getattr(self.evaluator, "prefix_order", None)
        for i in (order(candidates) if order is not None else range(len(candidates))):
            if should_stop():
                return
            on_result(self.evaluator.evaluate(candidates[i]), False)


def search(
    evaluator: Objective,
    strategy: Strategy | str,
    termination: Termination | None = None,
    *,
    seed: int = 0,
    budget: Budget | None = None,
    storage=None,
    study_name: str | None = None,
    fresh: bool = False,
    callbacks: Sequence[Callable[[Evaluation, "SearchResult"], None]] = (),
    progress: bool = False,
    executor=None,
) -> SearchResult:
    """Run ``strategy`` on ``evaluator.space`` until it is done or ``termination`` hits.

    Candidates already in ``storage`` (same study) are read back instead of evaluated, so a
    restarted search with the same seed replays to where it stopped and goes on from there.
    The search also ends once every candidate the budget admits has been evaluated.
    """
    space, sizes = evaluator.space, evaluator.sizes
    if space.cardinality <= 1:
        raise SpaceError("the search space has no decision to make: every searched layer is pinned or has a single "
                         f"choice ({space.summary()})")
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    termination = termination or Termination(max_evals=100)
    if budget is not None:
        budget.check(sizes)
    t_start = time.perf_counter()
    store = TrialStore(space, storage, study_name or f"{strategy.name}-seed{seed}", fresh=fresh)
    stored = {r.candidate: r for r in store.load()}
    result = SearchResult([], strategy.name, seed, budget, sizes.full_precision_bytes, evaluator.reference_metric,
                          evaluator.metric_name)
    result.extra["study_name"] = store.study_name
    executor = executor or LocalExecutor(evaluator)
    executor.attach(store)
    ctx = SearchContext(space, sizes, budget, seed, termination.max_evals, evaluator.reference_metric)
    n_feasible = sizes.count_within(budget.fits if budget is not None else lambda b, a: np.ones(len(b), bool))
    feasible_seen: set[Candidate] = set()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=termination.max_evals, desc=f"{strategy.name} seed {seed}", unit="eval", leave=False)
    front: list[Evaluation] = []
    best: list[Evaluation | None] = [None]
    prep = [0.0]  # one-off preparation paid so far, shown on the progress bar
    asked: dict[Candidate, Evaluation] = {}  # what the strategy is told, per candidate
    ref = float(evaluator.reference_metric)
    worst = [ref if math.isfinite(ref) else 0.0]  # the lowest finite quality seen

    def should_stop() -> bool:
        failed = result.n_failed
        if failed >= MIN_FAILURES and failed > termination.max_failures * len(result.trials):
            result.stop_reason = result.stop_reason or "too many failed evaluations"
            return True
        if termination.max_evals is not None and len(result.trials) >= termination.max_evals:
            result.stop_reason = result.stop_reason or "max evaluations"
            return True
        if termination.wall_s is not None and time.perf_counter() - t_start >= termination.wall_s:
            result.stop_reason = result.stop_reason or "wall time"
            return True
        if n_feasible is not None and len(feasible_seen) >= n_feasible:
            result.stop_reason = result.stop_reason or "every feasible candidate evaluated"
            return True
        return False

    def record(ev: Evaluation, resumed: bool, persisted: bool = False) -> None:
        trial = replace(ev, number=len(result.trials), strategy=strategy.name, seed=seed, resumed=resumed)
        if not resumed:
            result.eval_s += 0.0 if ev.cached else ev.wall_s
        if not (resumed or persisted):
            t0 = time.perf_counter()
            store.add([trial])
            result.storage_s += time.perf_counter() - t0
        result.trials.append(trial)
        if trial.ok and math.isfinite(trial.metric):
            worst[0] = min(worst[0], trial.metric)
        # a failed evaluation is told as the worst quality seen, less a margin: never preferred, never asked again
        asked[trial.candidate] = trial if trial.ok else replace(trial, metric=worst[0] - max(1.0, abs(worst[0])))
        if budget is None or budget.admits(trial):
            feasible_seen.add(trial.candidate)
        if bar is not None:  # the running front and best only feed the progress bar
            nonlocal front
            f = ParetoFront(front + [trial], result.full_precision_bytes, result.reference_metric, result.metric_name)
            front = f.points
            if trial.ok and budget is not None and budget.admits(trial):
                if best[0] is None or trial.metric > best[0].metric:
                    best[0] = trial
            prep[0] += trial.prep_s if not resumed else 0.0
            post = {"hv": f"{f.hypervolume():.4f}"}
            if best[0] is not None:
                post["best"] = f"{best[0].metric:.4f}"
            if prep[0] >= 0.5:  # one-off quantization (gptq, gradient...), not part of any evaluation's cost
                post["prep"] = f"{prep[0]:.0f}s"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        for cb in callbacks:
            cb(trial, result)

    strategy.setup(ctx)
    stalls = 0
    try:
        while not should_stop():
            t0 = time.perf_counter()
            batch = [space.check_candidate(c) for c in strategy.ask()]
            result.strategy_s += time.perf_counter() - t0
            if not batch:
                result.stop_reason = "strategy finished"
                break
            n_before = len(result.trials)
            todo: list[Candidate] = []
            for c in batch:
                if c in asked or c in todo:
                    continue  # asked before in this run: answered again for free
                if termination.max_evals is not None and len(todo) + len(result.trials) >= termination.max_evals:
                    break
                todo.append(c)
            for c in [c for c in todo if c in stored]:
                ev = stored[c]
                evaluator.remember(ev)
                result.n_resumed += 1
                record(ev, resumed=True)
            executor.run([c for c in todo if c not in stored],
                         lambda ev, persisted: record(ev, resumed=False, persisted=persisted), should_stop)
            answers = [asked[c] for c in batch if c in asked]
            t0 = time.perf_counter()
            strategy.tell(answers)
            result.strategy_s += time.perf_counter() - t0
            stalls = stalls + 1 if len(result.trials) == n_before else 0
            if stalls >= MAX_STALLS:
                result.stop_reason = "strategy proposes nothing new"
                break
    except KeyboardInterrupt:
        # Anytime: what was evaluated is stored and returned; the caller decides what to write.
        result.stop_reason = "interrupted"
    finally:
        if bar is not None:
            bar.close()
        result.wall_s = time.perf_counter() - t_start
    return result
