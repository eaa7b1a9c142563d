"""The one descent rule: lower the decision that loses the least quality per byte saved.

Greedy builds its path with it, and every strategy repairs a candidate over the budget with
it (pso, bayes and greedy's swaps). The quality lost per choice comes from a loss table:
measured sensitivities (greedy, ilp) or, where nothing was measured, the quantization-noise
proxy ``n_params * 4**-bits``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .qconfig import FLOAT16_BITS
from .sizes import SizeTable


def noise_level(bits: float) -> float:
    """Relative quantization noise of a bit-width: 4**-bits, 0 for float16 and unquantized weights."""
    return 0.0 if bits >= FLOAT16_BITS else 4.0 ** (-bits)


def noise_loss(sizes: SizeTable) -> list[np.ndarray]:
    """Loss table of the noise proxy: per decision and choice, weight count x 4^-(stored bits per weight)."""
    out = []
    for d, bits in enumerate(sizes.bit_table):
        cnt = max(int(sizes.counts[d]), 1)
        out.append(cnt * 4.0 ** -np.maximum(bits / cnt, 0.5))
    return out


def lowest_cost_step(idx: Sequence[int], loss: Sequence[np.ndarray], byte_table: Sequence[np.ndarray],
                     frozen: int | None = None) -> int | None:
    """The decision to lower by one choice: least loss per byte saved; ties go to more bytes saved,
    then to the first decision. None when nothing can be lowered."""
    idx = np.asarray(idx, dtype=np.int64)
    d = np.flatnonzero(idx > 0)
    if frozen is not None:
        d = d[d != frozen]
    if not len(d):
        return None
    i = idx[d]
    dl = np.array([float(loss[k][j - 1] - loss[k][j]) for k, j in zip(d, i)])
    db = np.array([int(byte_table[k][j] - byte_table[k][j - 1]) for k, j in zip(d, i)], dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(db > 0, dl / np.where(db > 0, db, 1), np.where(dl <= 0, -np.inf, np.inf))
    return int(d[np.lexsort((d, -db, ratio))[0]])


def greedy_path(start: Sequence[int], loss, byte_table) -> list[tuple[int, ...]]:
    """From ``start`` down to the lowest choices, one ``lowest_cost_step`` at a time (start included)."""
    idx = list(int(i) for i in start)
    out = [tuple(idx)]
    while (d := lowest_cost_step(idx, loss, byte_table)) is not None:
        idx[d] -= 1
        out.append(tuple(idx))
    return out


def repair(idx: Sequence[int], fits: Callable[[np.ndarray], bool], loss, byte_table,
           frozen: int | None = None) -> np.ndarray:
    """Lower decisions (never ``frozen``) by the descent rule until ``fits(idx)``, or nothing is left to lower."""
    idx = np.array(idx, dtype=np.int64)
    while not fits(idx):
        d = lowest_cost_step(idx, loss, byte_table, frozen)
        if d is None:
            break
        idx[d] -= 1
    return idx
