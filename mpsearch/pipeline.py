"""``optimize()``, the one pipeline: model -> search space -> evaluator -> search -> front, chosen point and plan, in one call.

The CLI, ``compare``, the experiments and the benchmarks all call it, so a search run from
Python and one run from the shell choose, score and report the same way.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .core.budget import Budget
from .core.pareto import HV_REFERENCE, ParetoFront
from .core.records import Evaluation
from .core.space import Candidate, SearchSpace
from .errors import BaselineWarning, MPSearchError, MPSearchWarning
from .search import SearchResult, Termination, search
from .strategies import Strategy, get_strategy


@dataclass
class OptimizeResult:
    """Every evaluation of a search, its front, the point it chose, that point's plan, and the baselines.

    Plain data: the model has its own weights back when ``optimize`` returns.
    """

    search: SearchResult
    task_name: str
    space: SearchSpace
    reference_validation_metric: float
    baselines: list[Evaluation]  # uniform bit-widths, on the calibration split (evaluated by the run, not the strategy)
    chosen: Evaluation | None = None
    point: str = ""  # why ``chosen`` was chosen: "best within budget" or "knee of the front"
    chosen_validation_metric: float | None = None
    uniform_at_same_size: dict | None = None
    warnings: list[str] = field(default_factory=list)
    memory: dict = field(default_factory=dict)  # peak resident memory and cache use when the run ended
    _plan: Any = None

    # ---- what a user reads ---------------------------------------------------------------
    @property
    def trials(self) -> list[Evaluation]:
        return self.search.trials

    @property
    def evaluated(self) -> list[Evaluation]:
        """Everything the run evaluated: the strategy's trials, then the uniform baselines it did not ask."""
        asked = {t.candidate for t in self.search.trials}
        return self.search.trials + [b for b in self.baselines if b.candidate not in asked]

    @property
    def front(self) -> ParetoFront:
        """The front of everything the run evaluated (the strategy's own is ``search.front``)."""
        r = self.search
        return ParetoFront(self.evaluated, r.full_precision_bytes, r.reference_metric, r.metric_name)

    def best(self, budget: Budget | None = None) -> Evaluation | None:
        """The chosen point (best within the run's budget, or the knee without one); with ``budget``,
        the best evaluation within that budget instead."""
        return best_within(self.evaluated, budget) if budget is not None else self.chosen

    def plan(self):
        """The ``QuantizationPlan`` of the chosen point (None when nothing was chosen)."""
        return self._plan

    def summary(self) -> dict:
        """What ``summary.json`` holds."""
        r = self.search
        out = {
            "model": self.task_name, "strategy": r.strategy, "seed": r.seed, "n_evals": r.n_evals,
            "n_resumed": r.n_resumed, "stop_reason": r.stop_reason, "wall_s": round(r.wall_s, 3),
            "eval_s": round(r.eval_s, 3), "strategy_s": round(r.strategy_s, 3), "storage_s": round(r.storage_s, 3),
            "metric_name": r.metric_name, "reference_metric": r.reference_metric,
            "reference_validation_metric": self.reference_validation_metric,
            "full_precision_bytes": r.full_precision_bytes, "n_failed": r.n_failed, "first_error": r.first_error,
            "hypervolume": self.front.hypervolume(), "strategy_hypervolume": r.hypervolume,
            "hypervolume_ref": {"size_fraction": HV_REFERENCE[0], "normalized_metric": HV_REFERENCE[1]},
            "front_size": len(self.front), "budget": r.budget.to_dict() if r.budget else None,
            "search_space": self.space.summary(), "study": r.extra.get("study_name"),
            "uniform": [{"avg_bits": u.avg_bits, "size_bytes": u.size_bytes, "metric": u.metric} for u in self.baselines],
        }
        if self._plan is not None:
            p = self._plan.predicted
            out["best"] = {"size_bytes": p["size_bytes"], "avg_bits": p["avg_bits"],
                           "compression_ratio": p["compression_ratio"], "bops_per_sample": p["bops_per_sample"],
                           "metric": p["metric"], "validation_metric": p["validation_metric"], "point": self.point}
        elif r.budget is not None:
            out["best"] = None
        if self.uniform_at_same_size is not None:
            out["uniform_at_same_size"] = self.uniform_at_same_size
        out["warnings"] = list(self.warnings)
        out["memory"] = dict(self.memory)
        return out


def _as_task(task, calibration, validation, metric, name, text=None):
    from torch import nn

    from .tasks import Task, load_task

    if isinstance(task, str):
        return load_task(task, text)
    if isinstance(task, Task):
        return task.check()
    if isinstance(task, nn.Module):
        if calibration is None:
            raise MPSearchError("optimize(model, ...) needs calibration=[(inputs, targets), ...] (and validation=...)")
        return Task(model=task, calibration=calibration, validation=validation or calibration,
                    metric=metric or "kl", name=name or "model").check()
    raise MPSearchError(f"optimize() takes a Task, a torch.nn.Module or a task name, got {type(task).__name__}")


def _as_space(task, space) -> SearchSpace:
    from .model.space_files import space_for

    if isinstance(space, SearchSpace):
        return space
    return space_for(task, space)


def best_within(records, budget: Budget) -> Evaluation | None:
    """The best evaluation the budget admits: highest quality, then smallest, then first evaluated."""
    ok = [t for t in records if t.ok and budget.admits(t)]
    return max(ok, key=lambda t: (t.metric, -t.size_bytes, -t.number)) if ok else None


def widest_uniform_within(space: SearchSpace, sizes, max_bytes: int) -> Candidate | None:
    """The widest uniform candidate no larger than ``max_bytes`` (None when none fits)."""
    best = None
    for b in space.uniform_choices():
        c = space.uniform(b)
        if sizes.size_bytes(c) <= max_bytes:
            best = c
    return best


def optimize(
    task,
    *,
    strategy: str | Strategy = "greedy",
    budget: Budget | None = None,
    max_evals: int | None = 200,
    seed: int = 0,
    space: SearchSpace | str | Path | dict | None = None,
    options: dict | None = None,
    wall_s: float | None = None,
    max_failures: float = 0.5,
    storage=None,
    study: str | None = None,
    fresh: bool = False,
    workers: int = 0,
    progress: bool = False,
    evaluator=None,
    evaluator_options: dict | None = None,
    calibration: list | None = None,
    validation: list | None = None,
    metric: str | Callable | None = None,
    name: str | None = None,
    on_start: Callable[[Any, Any], None] | None = None,
    text: str | None = None,
) -> OptimizeResult:
    """Search per-layer bit-widths for ``task`` and return every evaluation, the front, the chosen point and its plan.

    ``task``: a ``Task``, a built-in name (``digits``, ``minilm``) or ``module:function`` /
    ``file.py:function`` spec, or a ``torch.nn.Module`` with ``calibration=`` (and
    ``validation=``, ``metric=``; default metric: KL to the full-precision outputs).
    ``space``: the task's own space by default, or a space file / name / parsed mapping, or
    a ``SearchSpace``. ``budget``: a ``Budget``; without one the whole front is searched and
    the knee is chosen. ``storage``: an Optuna storage URL to persist and resume trials.
    ``workers``: evaluate in N worker processes sharing ``storage`` (``task`` must be a spec
    string then). ``evaluator``: share one evaluator (and its cache) between runs; ``evaluator_options``:
    for the one made here (``cache_mb``, ``activation_cache_mb``, ``blocks``, ``device``).
    ``max_failures``: the share of failed evaluations (a forward that raises, a metric that is not
    finite) above which the search stops; failed ones are recorded and never asked again.
    ``on_start(evaluator, budget)`` is called once everything is built, before the search.
    The model gets its own weights back before this returns.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise MPSearchError(f"seed must be a non-negative integer, got {seed!r}")
    strategy = get_strategy(strategy, **(options or {})) if isinstance(strategy, str) else strategy
    termination = Termination(max_evals=max_evals, wall_s=wall_s, max_failures=max_failures)
    own = evaluator is None
    if own:
        from .evaluator import Evaluator

        task_obj = _as_task(task, calibration, validation, metric, name, text)
        evaluator = Evaluator(task_obj, _as_space(task_obj, space), **(evaluator_options or {}))
    task_name = evaluator.task_name
    notes = []
    if budget is not None:
        budget.check(evaluator.sizes)
        if not budget.binds(evaluator.sizes):
            notes.append(f"the budget {budget.describe()} admits every candidate, the largest included: "
                         "the search is not constrained by it")
    executor = None
    if workers:
        from .workers import local_pool

        if text is not None:
            raise MPSearchError("workers load the task by its spec and cannot take a text file; drop --workers or --text")
        if not isinstance(task, str) or not isinstance(storage, str):
            raise MPSearchError("workers need the task as a spec string (e.g. 'digits') and a storage URL to share")
        space_file = None if space is None else str(space)
        executor = local_pool(task, space_file, storage, workers, strategy.name, seed)
    if on_start is not None:
        on_start(evaluator, budget)
    try:
        result = search(evaluator, strategy, termination, seed=seed, budget=budget, storage=storage, study_name=study,
                        fresh=fresh, progress=progress, executor=executor)
        if executor is not None:
            executor.close()
            executor = None
        out = _finish(result, evaluator, task_name)
        out.warnings[:0] = notes
        if result.stop_reason == "too many failed evaluations":
            out.warnings.append(f"{result.n_failed} of {result.n_evals} evaluations failed; the first: "
                                f"{result.first_error}")
        for w in out.warnings:
            warnings.warn(w, BaselineWarning if w.startswith("uniform ") else MPSearchWarning, stacklevel=2)
        return out
    finally:
        if executor is not None:
            executor.close()
        if own:  # one it made: hooks off, the model as it was; a shared one stays ready for the next run
            evaluator.close()
        else:
            evaluator.restore()


def _finish(result: SearchResult, evaluator, task_name: str) -> OptimizeResult:
    from .plan import QuantizationPlan

    space, sizes = evaluator.space, evaluator.sizes
    n = result.n_evals
    baselines = [replace(evaluator.evaluate(space.uniform(b)), number=n + i, strategy="uniform-baseline",
                         seed=result.seed) for i, b in enumerate(space.uniform_choices())]
    out = OptimizeResult(result, task_name, space, evaluator.reference_validation_metric, baselines)
    out.memory = evaluator.memory() if hasattr(evaluator, "memory") else {}
    # chosen among everything the run evaluated, so no point it printed beats the plan
    if result.budget is not None:
        out.chosen, out.point = best_within(out.evaluated, result.budget), "best within budget"
    else:
        out.chosen, out.point = out.front.knee(), "knee of the front"
    chosen = out.chosen
    if chosen is None:
        return out
    out.chosen_validation_metric = evaluator.validation_metric(chosen.candidate)
    out._plan = QuantizationPlan.from_candidate(
        evaluator, chosen.candidate, metric=chosen.metric, validation_metric=out.chosen_validation_metric,
        provenance={"strategy": result.strategy, "seed": result.seed, "n_evals": result.n_evals, "point": out.point,
                    "chosen_from": chosen.strategy})
    if chosen.strategy == "uniform-baseline" and result.budget is not None:
        out.warnings.append(f"uniform {space.describe(chosen.candidate[0])} quantization is at least as good as every candidate "
                            f"{result.strategy} evaluated within the budget: the plan is that baseline")
    uc = widest_uniform_within(space, sizes, chosen.size_bytes)
    if uc is not None:
        u = evaluator.evaluate(uc)
        out.uniform_at_same_size = {"choice": space.describe(uc[0]), "bits": space.setting(uc[0]).bits, "size_bytes": u.size_bytes,
                                    "avg_bits": u.avg_bits, "metric": u.metric,
                                    "validation_metric": evaluator.validation_metric(uc)}
    return out
