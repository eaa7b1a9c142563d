"""A task is what a user hands mpsearch: a model, calibration and validation batches, and a metric."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import TaskError


@dataclass
class Task:
    """``calibration`` and ``validation`` are lists of ``(inputs, targets)``; targets may be None.

    ``inputs`` may be a tensor, a tuple of tensors (positional) or a dict (keyword arguments).
    ``output_fn`` picks the tensor to score out of what the model returns (default: the
    output itself, or its first element when it is a tuple).
    """

    model: nn.Module
    calibration: list
    validation: list
    metric: str | Callable = "accuracy"
    name: str = "custom"
    output_fn: Callable[[Any], Any] | None = None
    search_space: str | None = None  # default search-space file for this task
    meta: dict = field(default_factory=dict)

    def check(self) -> "Task":
        """Refuse what cannot be searched, and fold BatchNorm into convolutions (``mpsearch.model.fold``):
        ``self.model`` becomes the folded copy, the deployable model that is scored and exported."""
        if not isinstance(self.name, str) or not self.name:
            raise TaskError(f"a task's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.model, nn.Module):
            raise TaskError(f"task {self.name!r}: model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not (isinstance(self.metric, str) or callable(self.metric)):
            raise TaskError(f"task {self.name!r}: metric must be a metric name or a callable, got {self.metric!r}")
        if self.output_fn is not None and not callable(self.output_fn):
            raise TaskError(f"task {self.name!r}: output_fn must be callable, got {self.output_fn!r}")
        if self.search_space is not None and not isinstance(self.search_space, str):
            raise TaskError(f"task {self.name!r}: search_space must be a file name, got {self.search_space!r}")
        for split in ("calibration", "validation"):
            batches = getattr(self, split)
            if not isinstance(batches, (list, tuple)) or not batches:
                raise TaskError(f"task {self.name!r}: {split} must be a non-empty list of (inputs, targets) batches")
            for b in batches:
                if not (isinstance(b, (list, tuple)) and len(b) == 2):
                    raise TaskError(f"task {self.name!r}: each {split} batch must be a pair (inputs, targets)")
        has = [b[1] is not None for b in list(self.calibration) + list(self.validation)]
        if any(has) and not all(has):
            raise TaskError(f"task {self.name!r}: targets must be given for every batch or for none")
        from ..model.fold import fold_batchnorm

        self.model, folded = fold_batchnorm(self.model.eval())
        if folded:
            self.meta["folded_batchnorm"] = self.meta.get("folded_batchnorm", []) + folded
        return self

    @property
    def has_targets(self) -> bool:
        return self.calibration[0][1] is not None
