"""A task is what a user hands mpsearch: a model, calibration and validation batches, and a metric."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
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


def shipped_weights(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the weights a built-in task ships (an npz of its state dict), in eval mode."""
    with np.load(path) as data:
        model.load_state_dict({k: torch.from_numpy(data[k].copy()) for k in data.files})
    return model.eval()


def classification_task(model: nn.Module, calibration: tuple, validation: tuple, batch: int, name: str,
                        search_space: str | None = None, meta: dict | None = None) -> Task:
    """A built-in classifier's task: (inputs, labels) tensors cut into batches, scored by accuracy."""

    def batches(x: torch.Tensor, y: torch.Tensor) -> list:
        return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]

    return Task(model=model, calibration=batches(*calibration), validation=batches(*validation), metric="accuracy",
                name=name, search_space=search_space, meta=meta or {})


def fit_epoch(model: nn.Module, opt, sched, batches, loss_fn, clip: float | None = None) -> float:
    """One training epoch of a built-in task's model over ``(inputs, labels)`` batches; the summed loss."""
    model.train()
    total = 0.0
    for xb, yb in batches:
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        total += loss.item() * len(yb)
    return total
