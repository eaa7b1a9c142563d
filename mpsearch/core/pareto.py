"""Pareto fronts of size (down) against quality (up), their hypervolume and their knee.

Hypervolume is computed on normalised objectives so that numbers compare across runs
and strategies: size as a fraction of the full-precision size, quality through
``normalize`` (1 = full precision; accuracy and cosine are divided by the reference
value, -KL becomes exp(-KL), -MSE becomes 1/(1+MSE)). The reference point is (size = 1.0,
quality = 0.0): the full-precision size and no quality at all, so every candidate smaller
than the original model with positive quality contributes.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import moocore
import numpy as np

from .records import Evaluation

HV_REFERENCE = (1.0, 0.0)


def normalize(metric_name: str, value: float, reference: float) -> float:
    """A metric value on the scale 1 = full precision, 0 = nothing (higher is better)."""
    if metric_name in ("neg_kl", "kl", "neg_token_kl"):  # "kl": plans written before the name said -KL
        return math.exp(value)  # value = -KL
    if metric_name == "neg_perplexity":  # value = -perplexity: the full-precision perplexity over this one's
        return reference / value if value < 0 else 0.0
    if metric_name in ("neg_mse", "mse"):
        return 1.0 / (1.0 - value)  # value = -MSE
    if metric_name == "sqnr":
        return max(0.0, min(1.0, value / 40.0))
    if reference > 0:
        return max(0.0, value) / reference
    return value


def pareto_front(records: Iterable[Evaluation]) -> list[Evaluation]:
    """The non-dominated records (smaller and better), sorted by size; one per (size, metric) point.

    Failed evaluations never enter. Among records with equal size and metric the one with
    the lowest candidate is kept, so the front does not depend on the order of ``records``.
    """
    ok = sorted((r for r in records if r.error is None), key=lambda r: (r.size_bytes, -r.metric, tuple(r.candidate)))
    front: list[Evaluation] = []
    for r in ok:
        if not front or r.metric > front[-1].metric:
            front.append(r)
    return front


class ParetoFront:
    """The front of a set of evaluations, with the normalisation its hypervolume needs."""

    def __init__(self, records: Iterable[Evaluation], full_precision_bytes: int, reference_metric: float,
                 metric_name: str = ""):
        self.full_precision_bytes = full_precision_bytes
        self.reference_metric = reference_metric
        self.metric_name = metric_name
        self.points: list[Evaluation] = pareto_front(records)

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(self.points)

    def normalized(self) -> np.ndarray:
        """(size fraction, -normalised quality) per point: the minimisation form used for hypervolume."""
        return np.array([[p.size_bytes / self.full_precision_bytes,
                          -normalize(self.metric_name, p.metric, self.reference_metric)]
                         for p in self.points], dtype=float).reshape(-1, 2)

    def hypervolume(self) -> float:
        if not self.points:
            return 0.0
        x = self.normalized()
        inside = (x[:, 0] < HV_REFERENCE[0]) & (x[:, 1] < -HV_REFERENCE[1])
        if not inside.any():
            return 0.0
        return float(moocore.hypervolume(x[inside], ref=list(HV_REFERENCE)))

    def best_within(self, budget) -> Evaluation | None:
        """Highest quality among points the budget admits (smallest on ties)."""
        ok = [p for p in self.points if budget.admits(p)]
        return max(ok, key=lambda p: (p.metric, -p.size_bytes)) if ok else None

    def knee(self) -> Evaluation | None:
        """The point farthest from the line through the front's extremes (normalised objectives)."""
        if len(self.points) <= 2:
            return self.points[-1] if self.points else None
        x = self.normalized()
        a, b = x[0], x[-1]
        d = b - a
        norm = np.hypot(*d) or 1.0
        dist = np.abs(d[0] * (x[:, 1] - a[1]) - d[1] * (x[:, 0] - a[0])) / norm
        return self.points[int(np.argmax(dist))]


def hypervolume_curve(records: Sequence[Evaluation], full_precision_bytes: int, reference_metric: float,
                      metric_name: str = "") -> list[float]:
    """Hypervolume of the front of the first k records, for k = 1..n (anytime performance)."""
    out: list[float] = []
    front: list[Evaluation] = []
    for r in records:
        f = ParetoFront(front + [r], full_precision_bytes, reference_metric, metric_name)
        front = f.points
        out.append(f.hypervolume())
    return out
