"""Exporters: a plan written for a deployment tool, registered by format name.

Each exporter is ``fn(plan, out, task, **options) -> ExportResult``; ``task`` is None for
exporters that need only the plan (``needs_model=False``). ``formats`` are the quantizer formats
whose plans it carries: a plan of GGML types goes to llama.cpp, integer grids everywhere else.
"""
from __future__ import annotations

import importlib
import os
import tempfile
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
    kinds: frozenset | None = None  # the kinds of weight it can carry (None: any)
    formats: frozenset = frozenset({"integer"})  # plan quantizer formats it can carry
    options: tuple = ()  # keyword options it takes (e.g. the gguf exporter's base_gguf)


REGISTRY: dict[str, Exporter] = {}
OPTION_FLAGS = {"base_gguf": "--gguf"}  # exporter options as the command line spells them
_MODULES = ("tables", "torchao", "onnxruntime", "llama_cpp", "gguf", "gptqmodel")


def register(name: str, *, needs_model: bool, suffix: str, description: str, kinds=None, formats=("integer",),
             options=()):
    def deco(fn):
        REGISTRY[name] = Exporter(name, fn, needs_model, suffix, description, None if kinds is None else frozenset(kinds),
                                  frozenset(formats), tuple(options))
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


def export(plan: QuantizationPlan, fmt: str, out: str | Path, task=None, *, plan_path: str | Path | None = None,
           options: dict | None = None) -> ExportResult:
    """Write ``plan`` for ``fmt`` at ``out`` (and, for some formats, files beside it).

    An existing file at ``out`` is replaced; a directory, or the plan's own file (``plan_path``),
    is refused. Everything is written into a temporary folder first and moved into place only
    when the exporter succeeded, so a failed export leaves nothing behind.
    """
    _load_all()
    if fmt not in REGISTRY:
        raise MPSearchError(f"unknown export format {fmt!r}; choose one of {', '.join(sorted(REGISTRY))}")
    ex = REGISTRY[fmt]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(ex.options))
    if unknown:
        flag = lambda o: OPTION_FLAGS.get(o, repr(o))  # noqa: E731
        raise MPSearchError(f"{fmt} export takes no {flag(unknown[0])}"
                            + (f" (it takes {', '.join(map(flag, ex.options))})" if ex.options else ""))
    check_format(plan, fmt)
    if ex.kinds is not None:
        other = [(n, e.get("kind")) for n, e in plan.layers.items() if e.get("kind") is not None and e.get("kind") not in ex.kinds]
        if other:
            raise MPSearchError(f"{fmt} export: layer {other[0][0]!r} is a {other[0][1]} weight "
                                f"({len(other)} such layer(s)); this exporter carries {', '.join(sorted(ex.kinds))} "
                                "weights only: exclude those layers from the space, or export to another format")
    if ex.needs_model and task is None:
        raise MPSearchError(f"export format {fmt!r} needs the model: pass --model")
    if ex.needs_model:
        plan.check_model(task.model)
    out = Path(out)
    if out.is_dir():
        raise MPSearchError(f"--out {out} is a directory; name the file to write")
    if plan_path is not None and out.resolve() == Path(plan_path).resolve():
        raise MPSearchError(f"--out {out} is the plan being exported; writing there would destroy it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".mpsearch-export-", dir=out.parent) as tmp:
            res = ex.fn(plan, Path(tmp) / out.name, task, **options)
            final = [out.parent / p.name for p in res.paths]
            if plan_path is not None and any(f.resolve() == Path(plan_path).resolve() for f in final):
                raise MPSearchError(f"the {fmt} export writes {', '.join(map(str, final))}, which would replace the plan")
            for p, f in zip(res.paths, final):
                if f.is_dir():
                    raise MPSearchError(f"the {fmt} export would replace the directory {f}")
                os.replace(p, f)
    except OSError as exc:
        raise MPSearchError(f"cannot write {out}: {exc.strerror or exc}") from None
    res.paths = final
    return res


def check_format(plan: QuantizationPlan, fmt: str) -> None:
    """Refuse a plan whose quantizer format (integer grids, GGML types) ``fmt`` cannot carry, naming those that can."""
    _load_all()
    plan_format = plan.quantizer.get("format", "integer")
    if plan_format not in REGISTRY[fmt].formats:
        hint = ", ".join(sorted(n for n, e in REGISTRY.items() if plan_format in e.formats and n not in ("csv", "markdown")))
        raise MPSearchError(f"{fmt}: the plan stores {'GGML types' if plan_format == 'ggml' else 'integer grids'}, "
                            f"which {fmt} cannot carry; use {hint}")


def sparse_layers(plan: QuantizationPlan) -> list[str]:
    return [n for n in plan.layers if plan.setting(n).sparse]


def dense_storage_note(plan: QuantizationPlan) -> list[str]:
    """For formats that carry the plan's integers in dense tensors: what pruning costs there."""
    sparse = sparse_layers(plan)
    if not sparse:
        return []
    return [f"{len(sparse)} pruned layer(s) are stored dense, with zero codes where weights were pruned: the "
            "deployed size is the dense one, larger than the plan's sparse count"]


def runtime_quantizes(plan: QuantizationPlan, fmt: str) -> list[str]:
    """For formats that pass settings to a runtime that computes its own integers: refuse what it cannot
    express (sparsity), and say that the plan's own integers do not travel."""
    sparse = sparse_layers(plan)
    if sparse:
        raise MPSearchError(f"{fmt} export: {len(sparse)} layer(s) are pruned (first: {sparse[0]}); {fmt} quantizes "
                            "dense weights itself and cannot carry a sparsity")
    methods = sorted({plan.setting(n).method for n in plan.layers if plan.setting(n).quantized})
    return [f"{fmt} computes the integers itself from the bits given here; the plan's own integers "
            f"({', '.join(methods)}) are not carried, so its quality is the runtime's, not the plan's prediction"]


def file_size(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)
