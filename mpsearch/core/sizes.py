"""Exact size in bytes of a quantized model, and its average bits: the one size table.

Sizes are tabulated once per (decision, choice), so a candidate's size is a sum of table
entries: strategies check budgets on whole populations without evaluating anything, and
the evaluator, the plan and every strategy read the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .qconfig import (FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig, Setting, ggml_tensor_bytes, kept_weights, n_groups,
                      stored_bits)
from .space import LayerSpec, SearchSpace

MB = 1_000_000


def _ceil8(bits: int) -> int:
    return -(-bits // 8)


def layer_bytes(layer: LayerSpec, setting: Setting, cfg: QuantizerConfig) -> int:
    """Bytes as a runtime stores the tensor: the surviving integers packed in one bit-stream, the scales,
    the zero-points (asymmetric) and the sparsity mask each a whole number of bytes."""
    n, bits = layer.n_params, setting.bits
    if setting.ggml:
        return ggml_tensor_bytes(setting.method, layer.rows_shape)
    if bits >= UNQUANTIZED_BITS:
        return n * layer.element_size
    if bits == FLOAT16_BITS:
        return n * 2
    groups = n_groups(layer.rows_shape, cfg)
    total = _ceil8(kept_weights(layer.rows_shape, setting.sparsity) * bits) + _ceil8(groups * cfg.scale_bits)
    if cfg.scheme == "asymmetric":
        total += _ceil8(groups * cfg.zero_point_bits)
    if setting.sparse:
        total += _ceil8(n)
    return total


def layer_bits(layer: LayerSpec, setting: Setting, cfg: QuantizerConfig) -> int:
    """Every stored bit of the tensor (``qconfig.stored_bits``): what average bits count, as llama.cpp's
    bits per weight do."""
    return stored_bits(layer.rows_shape, setting, cfg, layer.element_size)


@dataclass(frozen=True)
class Size:
    size_bytes: int
    avg_bits: float
    compression_ratio: float


class SizeTable:
    """Bytes and stored bits of every (decision, choice), plus what every candidate shares.

    ``byte_table[d][i]`` and ``bit_table[d][i]`` are integers: bytes, and every stored bit of the
    weights (integers, scales, zero-points, masks), so average bits are bits per weight as llama.cpp
    counts them. With the ggml format the average runs over every tensor of the model, biases and norms
    at their float width included: the GGUF's bits per weight, as llama.cpp reports them. ``nominal_table`` counts the weights at their bit-width alone (``weight_bits``). The
    ``*_idx`` methods take an ``(n, decisions)`` array of choice indices and are exact.
    """

    def __init__(self, space: SearchSpace, macs: dict[str, int] | None = None, activation_bits: int = 32):
        self.space = space
        cfg = space.quantizer
        self.full_precision_bytes = sum(n * es for n, es in space.tensors.values())
        weights = {spec.weight_name for spec in space.layers.values()}
        # Everything that is not a searched or pinned weight ships unchanged.
        self.unquantized_tensors = sorted(name for name in space.tensors if name not in weights)
        self.unquantized_bytes = sum(space.tensors[name][0] * space.tensors[name][1] for name in self.unquantized_tensors)
        self.fixed_bytes = self.unquantized_bytes
        # Average bits run over every weight in the space; one left at 32 bits counts at its float width.
        self.fixed_bits = 0
        self.fixed_nominal = 0
        self.fixed_count = 0
        for name, c in space.pinned.items():
            layer, setting = space.layers[name], space.setting(c)
            self.fixed_bytes += layer_bytes(layer, setting, cfg)
            self.fixed_bits += layer_bits(layer, setting, cfg)
            self.fixed_nominal += layer.n_params * _nominal(layer, setting)
            self.fixed_count += layer.n_params
        if cfg.format == "ggml":  # GGUF bits per weight, as llama.cpp reports them: over every tensor in the file
            self.fixed_bits += 8 * self.unquantized_bytes
            self.fixed_nominal += 8 * self.unquantized_bytes
            self.fixed_count += sum(space.tensors[name][0] for name in self.unquantized_tensors)
        layers = space.layers

        def table(fn):
            return [np.array([sum(fn(layers[n], space.setting(c)) for n in d.layers) for c in d.choices],
                             dtype=np.int64) for d in space.decisions]

        self.byte_table = table(lambda layer, x: layer_bytes(layer, x, cfg))
        self.bit_table = table(lambda layer, x: layer_bits(layer, x, cfg))
        self.nominal_table = table(lambda layer, x: layer.n_params * _nominal(layer, x))
        self.counts = np.array([sum(layers[n].n_params for n in d.layers) for d in space.decisions], dtype=np.int64)
        self.total_count = self.fixed_count + int(self.counts.sum())
        # padded (decisions x widest choice list) copies for whole-population lookups
        D = len(space.decisions)
        k = max(space.n_choices, default=1)
        self._bytes = np.zeros((D, k), dtype=np.int64)
        self._bits = np.zeros((D, k), dtype=np.int64)
        for d in range(D):
            self._bytes[d, : len(self.byte_table[d])] = self.byte_table[d]
            self._bits[d, : len(self.bit_table[d])] = self.bit_table[d]
        self._rows = np.arange(D)
        self.macs = dict(macs or {})
        self.activation_bits = activation_bits

    # ---- one candidate (bits per decision) ----------------------------------------------
    def size_bytes(self, candidate: Sequence[int]) -> int:
        return int(self.bytes_idx(self.space.encode(candidate))[0])

    def avg_bits(self, candidate: Sequence[int]) -> float:
        return float(self.avg_bits_idx(self.space.encode(candidate))[0])

    def weight_bits(self, candidate: Sequence[int]) -> float:
        """Average bit-width of the weights alone, without scales, zero-points or masks."""
        idx = self.space.encode(candidate)
        bits = self.fixed_nominal + sum(int(t[i]) for t, i in zip(self.nominal_table, idx))
        return bits / self.total_count if self.total_count else float(UNQUANTIZED_BITS)

    def size(self, candidate: Sequence[int]) -> Size:
        idx = self.space.encode(candidate)  # once: this runs for every evaluation
        s = int(self.bytes_idx(idx)[0])
        return Size(s, float(self.avg_bits_idx(idx)[0]), self.full_precision_bytes / s)

    # ---- many candidates (choice indices) -------------------------------------------------
    def bytes_idx(self, idx) -> np.ndarray:
        idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
        return self.fixed_bytes + self._bytes[self._rows, idx].sum(axis=1)

    def weight_bits_idx(self, idx) -> np.ndarray:
        idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
        return self.fixed_bits + self._bits[self._rows, idx].sum(axis=1)

    def avg_bits_idx(self, idx) -> np.ndarray:
        bits = self.weight_bits_idx(idx)
        if not self.total_count:
            return np.full(len(bits), float(UNQUANTIZED_BITS))
        return bits / self.total_count

    def weight_bits_cap(self, max_avg_bits: float) -> float:
        """The average-bits budget as a cap on the decisions' weight bits: sum(bit_table) <= this."""
        return max_avg_bits * self.total_count - self.fixed_bits

    def bops(self, candidate: Sequence[int]) -> int:
        """Bit operations per sample: MACs x weight bits x activation bits (activations stay float)."""
        chosen = self.space.layer_settings(candidate)
        return int(sum(self.macs.get(n, 0) * x.bits * self.activation_bits for n, x in chosen.items()))

    def min_size_bytes(self) -> int:
        return int(self.fixed_bytes + sum(int(t.min()) for t in self.byte_table))

    def max_size_bytes(self) -> int:
        return int(self.fixed_bytes + sum(int(t.max()) for t in self.byte_table))

    def min_avg_bits(self) -> float:
        return self.avg_bits(self.space.lowest())

    def count_within(self, fits, limit: int = 2_000_000, chunk: int = 200_000) -> int | None:
        """How many candidates ``fits(bytes, avg_bits)`` admits; None when the space has more than ``limit``."""
        n = self.space.cardinality
        if n > limit:
            return None
        shape = self.space.n_choices
        total = 0
        for start in range(0, n, chunk):
            flat = np.arange(start, min(n, start + chunk))
            idx = np.stack(np.unravel_index(flat, shape), axis=1) if shape else np.zeros((len(flat), 0), np.int64)
            total += int(np.count_nonzero(fits(self.bytes_idx(idx), self.avg_bits_idx(idx))))
        return total


def _nominal(layer: LayerSpec, setting: Setting) -> int:
    return layer.element_size * 8 if setting.bits >= UNQUANTIZED_BITS else setting.bits
