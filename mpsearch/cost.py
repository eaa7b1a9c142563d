"""Exact size in bytes of a quantized model, average bits and BOPs.

Sizes are tabulated once per (decision, choice) so a candidate's size is a sum of
table entries: strategies can check budgets without evaluating anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .quantize import FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig, n_groups
from .space import LayerSpec, SearchSpace

MB = 1_000_000


def layer_bytes(layer: LayerSpec, bits: int, cfg: QuantizerConfig) -> int:
    """Packed integer weights (one contiguous bit-stream per tensor) plus their scales and zero-points."""
    n = layer.n_params
    if bits >= UNQUANTIZED_BITS:
        return n * layer.element_size
    if bits == FLOAT16_BITS:
        return n * 2
    groups = n_groups(layer.shape, cfg)
    total = -(-n * bits // 8) + -(-groups * cfg.scale_bits // 8)
    if cfg.scheme == "asymmetric":
        total += -(-groups * cfg.zero_point_bits // 8)
    return total


def _stored_bits(layer: LayerSpec, bits: int) -> int:
    return layer.element_size * 8 if bits >= UNQUANTIZED_BITS else bits


@dataclass(frozen=True)
class Size:
    size_bytes: int
    avg_bits: float
    compression_ratio: float


class SizeModel:
    def __init__(self, space: SearchSpace, macs: dict[str, int] | None = None, activation_bits: int = 32):
        self.space = space
        cfg = space.quantizer
        self.full_precision_bytes = sum(n * es for n, es in space.tensors.values())
        weights = {l.weight_name for l in space.layers.values()}
        # Everything that is not a searched or pinned weight ships unchanged.
        self.unquantized_bytes = sum(n * es for name, (n, es) in space.tensors.items() if name not in weights)
        self.unquantized_tensors = sorted(name for name in space.tensors if name not in weights)
        self.fixed_bytes = self.unquantized_bytes
        # Average bits run over every weight in the space; one left at 32 bits counts at its float width.
        self.fixed_bits = 0
        self.fixed_count = 0
        for name, b in space.pinned.items():
            layer = space.layers[name]
            self.fixed_bytes += layer_bytes(layer, b, cfg)
            self.fixed_bits += layer.n_params * _stored_bits(layer, b)
            self.fixed_count += layer.n_params
        self.table = [np.array([sum(layer_bytes(space.layers[n], b, cfg) for n in d.layers) for b in d.choices], dtype=np.int64)
                      for d in space.decisions]
        self.counts = np.array([sum(space.layers[n].n_params for n in d.layers) for d in space.decisions], dtype=np.int64)
        # bits_table[d][i]: weight bits of decision d at choice i (n_params x bits; 32 counts at float width)
        self.bits_table = [np.array([sum(space.layers[n].n_params * _stored_bits(space.layers[n], b) for n in d.layers)
                                     for b in d.choices], dtype=np.int64) for d in space.decisions]
        self.total_count = self.fixed_count + int(self.counts.sum())
        self.macs = dict(macs or {})
        self.activation_bits = activation_bits

    def size_bytes(self, candidate: Sequence[int]) -> int:
        return self._bytes(self.space.encode(candidate))

    def avg_bits(self, candidate: Sequence[int]) -> float:
        return self._avg_bits(self.space.encode(candidate))

    def size(self, candidate: Sequence[int]) -> Size:
        idx = self.space.encode(candidate)  # once: this runs for every evaluation
        s = self._bytes(idx)
        return Size(s, self._avg_bits(idx), self.full_precision_bytes / s)

    def _bytes(self, idx: Sequence[int]) -> int:
        return int(self.fixed_bytes + sum(int(t[i]) for t, i in zip(self.table, idx)))

    def _avg_bits(self, idx: Sequence[int]) -> float:
        bits = self.fixed_bits + sum(int(t[i]) for t, i in zip(self.bits_table, idx))
        return bits / self.total_count if self.total_count else float(UNQUANTIZED_BITS)

    def size_bytes_idx(self, idx: np.ndarray) -> np.ndarray:
        """Sizes of many candidates at once, given as an (n, decisions) array of choice indices."""
        idx = np.atleast_2d(idx)
        total = np.full(len(idx), self.fixed_bytes, dtype=np.int64)
        for d, t in enumerate(self.table):
            total += t[idx[:, d]]
        return total

    def avg_bits_idx(self, idx: np.ndarray) -> np.ndarray:
        """Average bits of many candidates at once (choice indices), same arithmetic as avg_bits."""
        idx = np.atleast_2d(idx)
        bits = np.full(len(idx), self.fixed_bits, dtype=np.int64)
        for d, t in enumerate(self.bits_table):
            bits += t[idx[:, d]]
        if not self.total_count:
            return np.full(len(idx), float(UNQUANTIZED_BITS))
        return bits / self.total_count

    def weight_bits_cap(self, max_avg_bits: float) -> float:
        """The average-bits budget as a cap on total weight bits: sum(bits_table) <= this - fixed_bits."""
        return max_avg_bits * self.total_count - self.fixed_bits

    def bops(self, candidate: Sequence[int]) -> int:
        """Bit operations per sample: MACs x weight bits x activation bits (activations stay float)."""
        bits = self.space.layer_bits(candidate)
        return int(sum(self.macs.get(n, 0) * b * self.activation_bits for n, b in bits.items()))

    def min_size_bytes(self) -> int:
        return int(self.fixed_bytes + sum(int(t.min()) for t in self.table))

    def min_avg_bits(self) -> float:
        return self.avg_bits(self.space.lowest())
