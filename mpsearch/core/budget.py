"""Size budgets (bytes, given in MB, or average bits) and the one rule that says what fits.

Every check in the project goes through ``Budget.fits``, on one candidate or a whole
population, so there is exactly one tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import BudgetError
from .sizes import MB, SizeTable

AVG_BITS_TOLERANCE = 1e-9  # average bits are a float quotient; a candidate exactly at the budget fits


@dataclass(frozen=True)
class Budget:
    max_bytes: int | None = None
    max_avg_bits: float | None = None

    def __post_init__(self):
        for name, v in (("max_bytes", self.max_bytes), ("max_avg_bits", self.max_avg_bits)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise BudgetError(f"budget {name} must be a number, got {v!r}")
            if not math.isfinite(v) or v <= 0:
                raise BudgetError(f"budget {name} must be a positive finite number, got {v}")

    @classmethod
    def from_args(cls, budget_mb: float | None = None, avg_bits: float | None = None) -> "Budget | None":
        if budget_mb is None and avg_bits is None:
            return None
        for flag, v in (("--budget-mb", budget_mb), ("--avg-bits", avg_bits)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise BudgetError(f"{flag} must be a positive finite number, got {v}")
        max_bytes = None if budget_mb is None else budget_mb * MB
        if max_bytes is not None and not math.isfinite(max_bytes):
            raise BudgetError(f"--budget-mb {budget_mb} is too large to count in bytes")
        return cls(None if max_bytes is None else int(max_bytes), avg_bits)

    # ---- the rule ---------------------------------------------------------------------
    def fits(self, size_bytes, avg_bits):
        """Whether a size fits: scalars give a bool, arrays an array of bools."""
        if np.ndim(size_bytes) == 0 and np.ndim(avg_bits) == 0:
            return ((self.max_bytes is None or size_bytes <= self.max_bytes)
                    and (self.max_avg_bits is None or avg_bits <= self.max_avg_bits + AVG_BITS_TOLERANCE))
        ok = np.ones(np.shape(size_bytes), dtype=bool)
        if self.max_bytes is not None:
            ok &= np.asarray(size_bytes) <= self.max_bytes
        if self.max_avg_bits is not None:
            ok &= np.asarray(avg_bits) <= self.max_avg_bits + AVG_BITS_TOLERANCE
        return bool(ok) if ok.ndim == 0 else ok

    def admits(self, record) -> bool:
        """Whether an evaluated record (anything with ``size_bytes`` and ``avg_bits``) fits."""
        return self.fits(record.size_bytes, record.avg_bits)

    def feasible(self, sizes: SizeTable, candidate: Sequence[int]) -> bool:
        idx = sizes.space.encode(candidate)
        return bool(self.feasible_idx(sizes, idx)[0])

    def feasible_idx(self, sizes: SizeTable, idx) -> np.ndarray:
        """Budget check of an ``(n, decisions)`` array of choice indices."""
        return np.atleast_1d(self.fits(sizes.bytes_idx(idx), sizes.avg_bits_idx(idx)))

    def excess(self, sizes: SizeTable, idx) -> np.ndarray:
        """Relative excess over the budget per row of choice indices (<= 0: it fits)."""
        b, avg = sizes.bytes_idx(idx), sizes.avg_bits_idx(idx)
        out = np.full(len(b), -np.inf)
        if self.max_bytes is not None:
            out = np.maximum(out, (b - self.max_bytes) / self.max_bytes)
        if self.max_avg_bits is not None:
            cap = self.max_avg_bits + AVG_BITS_TOLERANCE
            out = np.maximum(out, (avg - cap) / cap)
        return np.where(np.isfinite(out), out, 0.0)

    # ---- checks and text -----------------------------------------------------------------
    def check(self, sizes: SizeTable) -> "Budget":
        """Refuse a budget that even the smallest candidate misses, naming that smallest size."""
        low = sizes.space.lowest()
        s, avg = sizes.size_bytes(low), sizes.avg_bits(low)
        if self.max_bytes is not None and not Budget(max_bytes=self.max_bytes).fits(s, avg):
            raise BudgetError(f"budget {self.max_bytes / MB:.4g} MB is below the smallest possible model "
                              f"({s / MB:.4g} MB = {s} bytes)")
        if self.max_avg_bits is not None and not Budget(max_avg_bits=self.max_avg_bits).fits(s, avg):
            raise BudgetError(f"budget {self.max_avg_bits:g} average bits is below the smallest possible model "
                              f"({avg:.4g} average bits, {s} bytes)")
        return self

    def binds(self, sizes: SizeTable) -> bool:
        """Whether the budget excludes anything: False when even the largest candidate fits."""
        top = sizes.space.highest()
        return not self.fits(sizes.size_bytes(top), sizes.avg_bits(top))

    def describe(self) -> str:
        parts = []
        if self.max_bytes is not None:
            parts.append(f"<= {self.max_bytes / MB:.4g} MB")
        if self.max_avg_bits is not None:
            parts.append(f"<= {self.max_avg_bits:g} avg bits")
        return " and ".join(parts)

    def to_dict(self) -> dict:
        return {"max_bytes": self.max_bytes, "max_avg_bits": self.max_avg_bits}
