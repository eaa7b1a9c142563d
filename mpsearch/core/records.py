"""The one record of an evaluated candidate: what the evaluator returns, strategies are told,
the search keeps, storage persists and fronts are made of."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .space import Candidate


@dataclass(frozen=True)
class Evaluation:
    """A candidate, its exact size, its quality, what computing it cost, and who asked for it.

    ``number``, ``strategy`` and ``seed`` are stamped by the search loop; an evaluation
    straight from the evaluator has ``number == -1``. ``cached``: the evaluator had it
    already (e.g. another strategy on a shared evaluator asked first); ``resumed``: read
    back from storage rather than computed in this process; ``error``: the evaluation
    failed (its ``metric`` is then meaningless and it never enters a front).
    """

    candidate: Candidate
    size_bytes: int
    avg_bits: float
    metric: float
    wall_s: float
    cached: bool = False
    number: int = -1
    strategy: str = ""
    seed: int = 0
    resumed: bool = False
    error: str | None = None
    prep_s: float = 0.0  # one-off preparation this evaluation paid for (quantizing new settings), not in wall_s

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)
