"""Pareto fronts of size (down) against quality (up), and their hypervolume.

Hypervolume is computed on normalised objectives so that numbers compare across runs
and strategies: size as a fraction of the full-precision size, quality through the
metric's ``normalize`` (1 = full precision; accuracy and cosine are divided by the
reference value, -KL becomes exp(-KL), -MSE becomes 1/(1+MSE)). The reference point is
(size = 1.0, quality = 0.0): the full-precision size and no quality at all, so every
candidate smaller than the original model with positive quality contributes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import moocore
import numpy as np

HV_REFERENCE = (1.0, 0.0)


@dataclass(frozen=True)
class Point:
    candidate: tuple
    size_bytes: int
    avg_bits: float
    metric: float


class ParetoFront:
    """Non-dominated points (size down, metric up), sorted by size."""

    def __init__(self, points: Sequence, full_precision_bytes: int, reference_metric: float,
                 normalize: Callable[[float, float], float] | None = None):
        self.full_precision_bytes = full_precision_bytes
        self.reference_metric = reference_metric
        self._normalize = normalize or (lambda v, r: v / r if r > 0 else v)
        pts = [Point(tuple(p.candidate), int(p.size_bytes), float(p.avg_bits), float(p.metric)) for p in points]
        uniq = {p.candidate: p for p in pts}
        pts = list(uniq.values())
        if pts:
            obj = np.array([[p.size_bytes, -p.metric] for p in pts], dtype=float)
            mask = moocore.is_nondominated(obj)
            pts = [p for p, keep in zip(pts, mask) if keep]
        self.points: list[Point] = sorted(pts, key=lambda p: (p.size_bytes, -p.metric))

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(self.points)

    def normalized(self) -> np.ndarray:
        """(size fraction, -normalised quality) per point: the minimisation form used for hypervolume."""
        return np.array([[p.size_bytes / self.full_precision_bytes, -self._normalize(p.metric, self.reference_metric)]
                         for p in self.points], dtype=float).reshape(-1, 2)

    def hypervolume(self) -> float:
        if not self.points:
            return 0.0
        x = self.normalized()
        inside = (x[:, 0] < HV_REFERENCE[0]) & (x[:, 1] < -HV_REFERENCE[1])
        if not inside.any():
            return 0.0
        return float(moocore.hypervolume(x[inside], ref=list(HV_REFERENCE)))

    def best_within(self, max_bytes: int | None = None, max_avg_bits: float | None = None) -> Point | None:
        """Highest quality among points within the budget (smallest on ties)."""
        ok = [p for p in self.points
              if (max_bytes is None or p.size_bytes <= max_bytes) and (max_avg_bits is None or p.avg_bits <= max_avg_bits + 1e-9)]
        if not ok:
            return None
        return max(ok, key=lambda p: (p.metric, -p.size_bytes))

    def knee(self) -> Point | None:
        """The point farthest from the line through the front's extremes (normalised objectives)."""
        if len(self.points) <= 2:
            return self.points[-1] if self.points else None
        x = self.normalized()
        a, b = x[0], x[-1]
        d = b - a
        norm = np.hypot(*d) or 1.0
        dist = np.abs(d[0] * (x[:, 1] - a[1]) - d[1] * (x[:, 0] - a[0])) / norm
        return self.points[int(np.argmax(dist))]


def hypervolume_curve(points: Sequence, full_precision_bytes: int, reference_metric: float,
                      normalize: Callable[[float, float], float] | None = None) -> list[float]:
    """Hypervolume of the front of the first k points, for k = 1..n (anytime performance)."""
    out, front = [], []
    for p in points:
        f = ParetoFront(front + [p], full_precision_bytes, reference_metric, normalize)
        front = f.points
        out.append(f.hypervolume())
    return out
