"""The evaluator: one forward pass per new candidate, everything else cached.

Quantized weights are computed once per (layer, bits), lazily, and swapped into the
model by replacing ``param.data`` (no copy), only for layers whose bits change.
Scores are memoized by candidate, so a strategy that asks again pays nothing and a
shared evaluator makes every strategy pay the same price per evaluation.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Sequence

import torch

from .core.qconfig import DATA_METHODS, UNQUANTIZED_BITS
from .core.records import Evaluation
from .core.sizes import SizeTable
from .core.space import Candidate, SearchSpace, as_choice
from .errors import MPSearchError, TaskError
from .metrics import Metric, get_metric
from .model.walk import model_fingerprint
from .quantize import PreparedCache, default_cache_dir, fake_quantize, mse, sqnr_db
from .quantize.inputs import input_moments
from .tasks.task import Task


def _call(model: torch.nn.Module, inputs: Any):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _concat(parts: list) -> Any:
    return torch.cat(parts, dim=0) if parts and isinstance(parts[0], torch.Tensor) else parts


def _usable(value: float) -> bool:
    """A metric value candidates can be ranked by: a number, +inf included (sqnr of an exact model)."""
    return not (math.isnan(value) or value == -math.inf)


def _check_finite_weights(task: Task) -> None:
    for name, t in task.model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise TaskError(f"task {task.name!r}: tensor {name} holds {bad} NaN or infinite value(s); "
                            "mpsearch quantizes finite weights only")


class Evaluator:
    """Swaps quantized weights into the task's model while it scores candidates.

    Use it as a context manager (or call ``restore()``): the model gets its own weights back
    on exit. ``mpsearch.optimize`` does this for you.
    """

    def __init__(self, task: Task, space: SearchSpace, activation_bits: int = 32, cache_dir="default"):
        task.check()
        _check_finite_weights(task)
        if space.fingerprint and model_fingerprint(task.model) != space.fingerprint:
            raise MPSearchError(f"the search space was built for another model than task {task.name!r}'s "
                                f"(fingerprint {space.fingerprint[:19]}...); build the space from this task's model")
        self.task = task
        self.space = space
        self.model = task.model.eval()
        self.metric: Metric = get_metric(task.metric, task.has_targets)
        self.calibration = list(task.calibration)
        self.validation = list(task.validation)
        named = dict(self.model.named_modules(remove_duplicate=False))
        self._params = {n: named[n].weight for n in space.layers}
        self._original = {n: p.data for n, p in self._params.items()}
        self._qcache: dict[tuple, torch.Tensor] = {}
        self._groups = {n: getattr(named[n], "groups", 1) for n in space.layers}
        self._moments: dict[str, torch.Tensor] | None = None
        self.prepared = PreparedCache(default_cache_dir() if cache_dir == "default" else cache_dir)
        self.prep_s = 0.0  # one-off preparation: inputs captured, weights quantized
        self.prep_log: dict[tuple, float] = {}
        self._memo: dict[tuple[str, Candidate], Evaluation] = {}
        self.n_forward = 0  # forward passes over a split, for tests and benchmarks
        macs = self._count_macs()
        self.sizes = SizeTable(space, macs=macs, activation_bits=activation_bits)
        self._targets = {
            "calibration": self._targets_of(self.calibration),
            "validation": self._targets_of(self.validation),
        }
        self.reference_outputs = {"calibration": self._forward(self.calibration), "validation": self._forward(self.validation)}
        for split, out in self.reference_outputs.items():
            if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
                raise TaskError(f"task {task.name!r}: the full-precision model's {split} outputs are not finite "
                                "(NaN or infinity): there is nothing to compare candidates with")
        if not self.metric.uses_targets:
            self._targets = dict(self.reference_outputs)
        self.reference_metric = self._score("calibration", self.reference_outputs["calibration"])
        self.reference_validation_metric = self._score("validation", self.reference_outputs["validation"])
        for name, v in (("calibration", self.reference_metric), ("validation", self.reference_validation_metric)):
            if not _usable(v):
                raise TaskError(f"task {task.name!r}: the metric of the full-precision model on the {name} split "
                                f"is {v}, not a number to rank by")

    # ---- forward passes -----------------------------------------------------------------
    @staticmethod
    def _targets_of(batches: list):
        ts = [b[1] for b in batches]
        return None if ts[0] is None else _concat(list(ts))

    def _output(self, out: Any):
        if self.task.output_fn is not None:
            return self.task.output_fn(out)
        if isinstance(out, (tuple, list)):
            return out[0]
        return out

    def _forward(self, batches: list):
        with torch.inference_mode():
            outs = [self._output(_call(self.model, x)) for x, _ in batches]
        self.n_forward += 1
        return _concat(outs)

    def _score(self, split: str, outputs) -> float:
        with torch.inference_mode():
            return float(self.metric(outputs, self._targets[split]))

    def _count_macs(self) -> dict[str, int]:
        """Multiply-accumulates per sample of each Linear/Conv layer, from one calibration batch."""
        counts: dict[str, int] = {}
        hooks = []
        named = dict(self.model.named_modules())
        for name in self.space.layers:
            mod = named.get(name)
            if isinstance(mod, torch.nn.Linear):
                per_out = mod.in_features
            elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
                per_out = (mod.in_channels // mod.groups) * int(torch.tensor(mod.kernel_size).prod())
            else:
                continue

            def hook(m, inp, out, name=name, per_out=per_out):
                counts[name] = counts.get(name, 0) + out.numel() * per_out

            hooks.append(mod.register_forward_hook(hook))
        try:
            x = self.calibration[0][0]
            with torch.inference_mode():
                out = self._output(_call(self.model, x))
            n = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() > 0 else 1
        finally:
            for h in hooks:
                h.remove()
        return {k: v // max(n, 1) for k, v in counts.items()}

    # ---- weights --------------------------------------------------------------------------
    def input_moments(self) -> dict[str, torch.Tensor]:
        """H of every layer that some choice quantizes with a method that uses its inputs: captured once,
        on the full-precision model (``quantize.inputs``)."""
        if self._moments is None:
            t0 = time.perf_counter()
            wanted = {}
            for name, spec in self.space.layers.items():
                if any(self.space.setting(c).method in DATA_METHODS for c in spec.choices):
                    wanted[name] = (name,) + spec.aliases
            self.restore()
            self._moments = input_moments(self.model, self.calibration, wanted, _call) if wanted else {}
            self.prep_s += time.perf_counter() - t0
        return self._moments

    def quantized_weight(self, layer: str, choice) -> torch.Tensor:
        """The weight the model computes with at ``choice``: prepared once per (layer, choice), timed apart
        from evaluations (``prep_log``)."""
        setting = self.space.setting(choice)
        if setting.bits >= UNQUANTIZED_BITS:
            return self._original[layer]
        key = (layer, choice)
        q = self._qcache.get(key)
        if q is None:
            hessian = self.input_moments().get(layer) if setting.method in DATA_METHODS else None
            t0 = time.perf_counter()
            with torch.no_grad():
                q = fake_quantize(self._original[layer], setting, self.space.quantizer, hessian, self._groups[layer],
                                  self.prepared)
            self._qcache[key] = q
            dt = time.perf_counter() - t0
            self.prep_log[key] = dt
            self.prep_s += dt
        return q

    def layer_error(self, layer: str, choice) -> dict[str, float]:
        w, q = self._original[layer], self.quantized_weight(layer, choice)
        return {"mse": mse(w, q), "sqnr_db": sqnr_db(w, q)}

    def prepare(self, progress: bool = False) -> None:
        """Quantize every (layer, choice) of the space now instead of when a candidate first needs it."""
        work = [(n, c) for d in self.space.decisions for n in d.layers for c in d.choices]
        work += list(self.space.pinned.items())
        if progress:
            from tqdm.auto import tqdm

            work = tqdm(work, desc="preparing quantized weights", unit="weight", leave=False)
        for n, c in work:
            self.quantized_weight(n, c)

    def apply(self, candidate: Sequence) -> None:
        """Put the candidate's weights in the model, touching only layers that hold other weights.

        The check reads the parameter itself rather than a record of what was applied, so
        several evaluators (or a user) may share one model safely.
        """
        for layer, choice in self.space.layer_choices(candidate).items():
            self._swap(layer, self.quantized_weight(layer, choice))

    def restore(self) -> None:
        for layer in self._params:
            self._swap(layer, self._original[layer])

    def _swap(self, layer: str, weight: torch.Tensor) -> None:
        p = self._params[layer]
        if p.data_ptr() != weight.data_ptr():
            p.data = weight

    # ---- scoring ---------------------------------------------------------------------------
    def evaluate(self, candidate: Sequence[int], split: str = "calibration") -> Evaluation:
        cand = self.space.check_candidate(candidate)
        key = (split, cand)
        hit = self._memo.get(key)
        if hit is not None:
            return replace(hit, cached=True)
        prep0 = self.prep_s
        for layer, choice in self.space.layer_choices(cand).items():  # one-off work, timed apart
            self.quantized_weight(layer, choice)
        prep = self.prep_s - prep0
        t0 = time.perf_counter()
        error = None
        try:
            self.apply(cand)
            batches = self.calibration if split == "calibration" else self.validation
            value = self._score(split, self._forward(batches))
            if not _usable(value):
                error = f"the metric is {value}, not a number to rank by"
        except Exception as exc:  # the user's model or metric failed on this candidate: a failed trial, not a crash
            value, error = math.nan, f"{type(exc).__name__}: {exc}".strip()[:2000]
        wall = time.perf_counter() - t0
        size = self.sizes.size(cand)
        ev = Evaluation(cand, size.size_bytes, size.avg_bits, value if error is None else math.nan, wall, error=error,
                        prep_s=prep)
        self._memo[key] = ev
        return ev

    def validation_metric(self, candidate: Sequence[int]) -> float:
        """Quality on the validation split: what a chosen plan is reported with (NaN when it failed)."""
        return self.evaluate(candidate, split="validation").metric

    def score_model(self, split: str = "validation") -> float:
        """Quality of the model as it stands now (e.g. after a plan was applied to it)."""
        batches = self.calibration if split == "calibration" else self.validation
        return self._score(split, self._forward(batches))

    def is_memoized(self, candidate: Sequence[int], split: str = "calibration") -> bool:
        return (split, tuple(as_choice(b) for b in candidate)) in self._memo

    def remember(self, ev: Evaluation, split: str = "calibration") -> None:
        """Seed the memo with a stored evaluation (resume), so it is never computed again."""
        self._memo[(split, tuple(ev.candidate))] = ev

    @property
    def full_precision_bytes(self) -> int:
        return self.sizes.full_precision_bytes

    @property
    def metric_name(self) -> str:
        return self.metric.name

    @property
    def task_name(self) -> str:
        return self.task.name

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
