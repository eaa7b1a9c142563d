"""Size budgets: bytes (given in MB) or average bits, checked exactly from the size tables."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .cost import MB, SizeModel
from .errors import BudgetError


@dataclass(frozen=True)
class Budget:
    max_bytes: int | None = None
    max_avg_bits: float | None = None

    @classmethod
    def from_args(cls, budget_mb: float | None = None, avg_bits: float | None = None) -> "Budget | None":
        if budget_mb is None and avg_bits is None:
            return None
        if budget_mb is not None and budget_mb <= 0:
            raise BudgetError(f"--budget-mb must be positive, got {budget_mb}")
        if avg_bits is not None and avg_bits <= 0:
            raise BudgetError(f"--avg-bits must be positive, got {avg_bits}")
        return cls(None if budget_mb is None else int(budget_mb * MB), avg_bits)

    def feasible(self, size: SizeModel, candidate: Sequence[int]) -> bool:
        if self.max_bytes is not None and size.size_bytes(candidate) > self.max_bytes:
            return False
        if self.max_avg_bits is not None and size.avg_bits(candidate) > self.max_avg_bits + 1e-9:
            return False
        return True

    def check(self, size: SizeModel) -> "Budget":
        """Refuse a budget that even the smallest candidate misses, naming that smallest size."""
        low = size.space.lowest()
        if self.max_bytes is not None and size.size_bytes(low) > self.max_bytes:
            raise BudgetError(
                f"budget {self.max_bytes / MB:.4g} MB is below the smallest possible model "
                f"({size.size_bytes(low) / MB:.4g} MB = {size.size_bytes(low)} bytes)"
            )
        if self.max_avg_bits is not None and size.avg_bits(low) > self.max_avg_bits + 1e-9:
            raise BudgetError(
                f"budget {self.max_avg_bits:g} average bits is below the smallest possible model "
                f"({size.avg_bits(low):.4g} average bits, {size.size_bytes(low)} bytes)"
            )
        return self

    def describe(self) -> str:
        parts = []
        if self.max_bytes is not None:
            parts.append(f"<= {self.max_bytes / MB:.4g} MB")
        if self.max_avg_bits is not None:
            parts.append(f"<= {self.max_avg_bits:g} avg bits")
        return " and ".join(parts)

    def to_dict(self) -> dict:
        return {"max_bytes": self.max_bytes, "max_avg_bits": self.max_avg_bits}
