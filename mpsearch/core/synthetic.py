"""A synthetic problem for strategies: a space of made-up layers and an objective that needs no model.

The quality of a candidate is one minus an additive loss table (each decision's weight
count times a per-decision sensitivity times the quantization noise ``4**-bits``) plus a
small deterministic interaction term, so the additive proxy is good but not exact, as on
real models. It runs in microseconds, imports no torch, and behaves like an evaluator
(``mpsearch.search.Objective``), so every strategy can be tested and compared on it.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import replace
from typing import Sequence

import numpy as np

from .qconfig import FLOAT16_BITS
from .records import Evaluation
from .sizes import SizeTable
from .space import Decision, LayerSpec, SearchSpace


def synthetic_space(n_layers: int = 8, choices: Sequence[int] = (2, 4, 8), seed: int = 0,
                    tie: Sequence[Sequence[int]] = ()) -> SearchSpace:
    """``n_layers`` Linear-like layers of random shapes; ``tie`` lists groups of layer indices sharing a decision."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(n_layers):
        shape = (int(rng.integers(8, 65)), int(rng.integers(8, 129)))
        layers[f"layer{i}"] = LayerSpec(f"layer{i}", "Linear", f"layer{i}.weight", shape, tuple(choices))
    tied = {i for g in tie for i in g}
    decisions = [Decision(f"layer{i}", (f"layer{i}",), tuple(choices)) for i in range(n_layers) if i not in tied]
    decisions += [Decision("+".join(f"layer{i}" for i in g), tuple(f"layer{i}" for i in g), tuple(choices)) for g in tie]
    tensors = {f"layer{i}.weight": (layers[f"layer{i}"].n_params, 4) for i in range(n_layers)}
    tensors.update({f"layer{i}.bias": (layers[f"layer{i}"].shape[0], 4) for i in range(n_layers)})
    return SearchSpace(layers, decisions, tensors=tensors, fingerprint=f"synthetic:{n_layers}:{seed}",
                       model_name="synthetic")


class SyntheticObjective:
    """Scores candidates of a ``synthetic_space`` like an evaluator does, without a model."""

    metric_name = "synthetic"
    task_name = "synthetic"
    reference_metric = 1.0
    reference_validation_metric = 1.0

    def __init__(self, space: SearchSpace, seed: int = 0, interaction: float = 0.1, cost_s: float = 0.0):
        self.space = space
        self.sizes = SizeTable(space)
        rng = np.random.default_rng(seed + 1)
        self.sensitivity = rng.lognormal(0.0, 1.0, space.n_decisions)
        self.interaction = interaction
        self.cost_s = cost_s  # pretend each evaluation takes this long (for wall-time tests)
        self.n_evaluated = 0
        self._memo: dict[tuple, Evaluation] = {}
        scale = float(self.sizes.counts.sum()) or 1.0
        self.loss = [self.sensitivity[d] * self.sizes.counts[d] / scale * 16.0
                     * np.array([0.0 if b >= FLOAT16_BITS else 4.0 ** -b for b in dec.choices])
                     for d, dec in enumerate(space.decisions)]

    def quality(self, candidate: Sequence[int], salt: str = "") -> float:
        idx = self.space.encode(candidate)
        additive = sum(float(self.loss[d][i]) for d, i in enumerate(idx))
        wiggle = (zlib.crc32((salt + repr(tuple(candidate))).encode()) % 1000) / 1000.0 - 0.5
        return 1.0 - additive * (1.0 + self.interaction * wiggle)

    def evaluate(self, candidate: Sequence[int]) -> Evaluation:
        cand = self.space.check_candidate(candidate)
        hit = self._memo.get(cand)
        if hit is not None:
            return replace(hit, cached=True)
        t0 = time.perf_counter()
        if self.cost_s:
            time.sleep(self.cost_s)
        size = self.sizes.size(cand)
        self.n_evaluated += 1
        ev = Evaluation(cand, size.size_bytes, size.avg_bits, self.quality(cand), time.perf_counter() - t0)
        self._memo[cand] = ev
        return ev

    def validation_metric(self, candidate: Sequence[int]) -> float:
        """The same quality on "held-out data": the interaction term drawn differently."""
        return self.quality(candidate, salt="validation")

    def remember(self, ev: Evaluation) -> None:
        self._memo[tuple(ev.candidate)] = ev

    def restore(self) -> None:
        """Nothing to restore: there is no model (here for ``optimize(evaluator=...)``)."""
