"""Exporters: a plan written for a deployment tool, registered by format name.

Each exporter is ``fn(plan, out, task) -> ExportResult``; ``task`` is None for
exporters that need only the plan (``needs_model=False``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import MPSearchError
from ..plan import QuantizationPlan


@dataclass
class ExportResult:
    format: str
    paths: list[Path]
    size_bytes: int  # on disk, all paths together
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Exporter:
    name: str
    fn: Callable
    needs_model: bool
    suffix: str
    description: str


REGISTRY: dict[str, Exporter] = {}
_MODULES = ("tables", "torchao", "onnxruntime", "llama_cpp", "gptqmodel")


def register(name: str, *, needs_model: bool, suffix: str, description: str):
    def deco(fn):
        REGISTRY[name] = Exporter(name, fn, needs_model, suffix, description)
        return fn

    return deco


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


def formats() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def export(plan: QuantizationPlan, fmt: str, out: str | Path, task=None) -> ExportResult:
    _load_all()
    if fmt not in REGISTRY:
        raise MPSearchError(f"unknown export format {fmt!r}; choose one of {', '.join(sorted(REGISTRY))}")
    ex = REGISTRY[fmt]
    if ex.needs_model and task is None:
        raise MPSearchError(f"export format {fmt!r} needs the model: pass --model")
    if ex.needs_model:
        plan.check_model(task.model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return ex.fn(plan, out, task)


def file_size(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)
