"""QuantizationPlan: the per-layer settings a search chose, as versioned plain JSON.

A plan is what users carry to deployment tools, so it is self-describing (the storage layout,
every quantized layer with its bits, method, sparsity and grid, every tensor left alone, predicted
size and quality, provenance) and refuses to be applied to a model it was not made for.

Version 2 records a method, a sparsity and a grid per layer. Version 1 plans (bits only) still
load and apply exactly as they did: their layers are round-to-nearest (or the MSE clipping search
when their quantizer said ``clip_search``) on the narrow grid that version used.
"""
from __future__ import annotations

import copy
import json
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .core.qconfig import DATA_METHODS, FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig, Setting
from .core.sizes import SizeTable, layer_bytes
from .core.space import LayerSpec, SearchSpace
from .errors import MPSearchWarning, PlanError
from .schemas import PlanDocument, PlanDocumentV1, parse
from .files import finite_json, json_text, read_text, write_atomic
from .model.fold import fold_batchnorm
from .model.walk import build_space, model_fingerprint
from .model.weights import from_rows, get_weight, takes_inputs, to_rows

PLAN_FORMAT = "mpsearch-plan"
PLAN_VERSION = 2


@dataclass
class QuantizationPlan:
    model: dict
    quantizer: dict
    layers: dict[str, dict]
    unquantized: list[str]
    predicted: dict
    provenance: dict = field(default_factory=dict)
    float_layers: list[str] | None = None  # quantizable modules left in float (excluded, or at 32 bits)

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_candidate(cls, evaluator, candidate: Sequence[int], *, provenance: dict | None = None,
                       validation_metric: float | None = None, sensitivity: dict[str, float] | None = None,
                       metric: float | None = None) -> "QuantizationPlan":
        """The plan for ``candidate`` in ``evaluator.space``; ``metric`` defaults to the evaluator's
        (memoized) calibration score."""
        from . import __version__

        space, sizes = evaluator.space, evaluator.sizes
        size = sizes.size(candidate)
        if metric is None:
            metric = evaluator.evaluate(candidate).metric
        layers: dict[str, dict] = {}
        unquantized = list(sizes.unquantized_tensors)
        float_layers = list(space.excluded)
        for name, x in space.layer_settings(candidate).items():  # network order
            spec = space.layers[name]
            if x.bits >= UNQUANTIZED_BITS:
                unquantized.append(spec.weight_name)
                float_layers.append(name)
                continue
            entry = {"bits": x.bits, "method": x.method if x.quantized else "float16", "sparsity": x.sparsity,
                     "grid": space.quantizer.grid, "kind": spec.kind, "shape": list(spec.shape), "n_params": spec.n_params}
            if space.quantizer.format == "ggml":  # the GGML type (the method) is the whole storage layout
                del entry["grid"], entry["sparsity"]
            if space.quantizer.granularity == "per-group" and x.quantized:
                entry["group_size"] = space.quantizer.group_size
            if spec.aliases:
                entry["aliases"] = list(spec.aliases)
            if spec.weight_name != f"{name}.weight":
                entry["weight"] = spec.weight_name
            if spec.axis:
                entry["axis"] = spec.axis
            if spec.module is not None:
                entry["module"] = spec.module
            if sensitivity and name in sensitivity:
                entry["sensitivity"] = float(sensitivity[name])
            layers[name] = entry
        predicted = {
            "size_bytes": size.size_bytes,
            "avg_bits": round(size.avg_bits, 6),
            "weight_bits": round(sizes.weight_bits(candidate), 6),
            "compression_ratio": round(size.compression_ratio, 6),
            "full_precision_bytes": sizes.full_precision_bytes,
            "bops_per_sample": sizes.bops(candidate),
            "metric_name": evaluator.metric_name,
            "metric": metric,
            "reference_metric": evaluator.reference_metric,
        }
        if validation_metric is not None:
            predicted["validation_metric"] = validation_metric
            predicted["reference_validation_metric"] = evaluator.reference_validation_metric
        n_params = sum(n for n, _ in space.tensors.values())
        prov = {"mpsearch": __version__, **(provenance or {})}
        return cls(
            model={"name": space.model_name, "fingerprint": space.fingerprint, "n_params": n_params},
            quantizer=space.quantizer.to_dict(),
            layers=layers,
            unquantized=sorted(unquantized),
            predicted=predicted,
            provenance=prov,
            float_layers=float_layers,
        )

    # ---- file format -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model, "quantizer": self.quantizer,
             "layers": self.layers, "unquantized": self.unquantized}
        if self.float_layers is not None:
            d["float_layers"] = self.float_layers
        d.update({"predicted": self.predicted, "provenance": self.provenance})
        return finite_json(d)

    def to_json(self) -> str:
        return json_text(self.to_dict())

    def save(self, path: str | Path) -> Path:
        self.check()
        if Path(path).is_dir():
            raise PlanError(f"cannot save the plan to {path}: it is a directory")
        return write_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "QuantizationPlan":
        if not isinstance(d, dict):
            raise PlanError(f"{source}: a plan must be a JSON object")
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not an mpsearch plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        if d.get("version") not in (1, PLAN_VERSION):
            raise PlanError(f"{source}: unsupported plan version {d.get('version')!r} (this mpsearch reads versions 1 "
                            f"and {PLAN_VERSION})")
        if d["version"] == 1:
            parse(PlanDocumentV1, d, source, PlanError)
            d = upgrade_v1(d)
        parse(PlanDocument, d, source, PlanError)
        layers = {n: {**e, "n_params": math.prod(e["shape"])} for n, e in d["layers"].items()}  # derivable: filled in
        return cls(d["model"], d["quantizer"], layers, d["unquantized"], d["predicted"], d["provenance"],
                   d.get("float_layers"))

    @classmethod
    def load(cls, path: str | Path) -> "QuantizationPlan":
        p = Path(path)
        text = read_text(p, "plan", PlanError)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"corrupt plan {p}: not valid JSON ({exc})") from None
        return cls.from_dict(d, str(p))

    def check(self, source: str = "plan") -> "QuantizationPlan":
        """Refuse a plan that its own file format would refuse (``PlanDocument``)."""
        parse(PlanDocument, self.to_dict(), source, PlanError)
        return self

    # ---- use -----------------------------------------------------------------------------
    def quantizer_config(self, layer: str | None = None) -> QuantizerConfig:
        cfg = QuantizerConfig(**self.quantizer)
        entry = self.layers.get(layer, {}) if layer else {}
        g = entry.get("group_size")
        if g is not None and g != cfg.group_size:
            cfg = replace(cfg, granularity="per-group", group_size=g)
        if entry.get("grid", cfg.grid) != cfg.grid:
            cfg = replace(cfg, grid=entry["grid"])
        return cfg

    def setting(self, layer: str) -> Setting:
        e = self.layers[layer]
        if e["bits"] >= FLOAT16_BITS:
            return Setting(e["bits"])
        return Setting(e["bits"], e.get("method", "rtn"), e.get("sparsity", 0.0))

    def bits(self) -> dict[str, int]:
        return {n: int(e["bits"]) for n, e in self.layers.items()}

    def needs_data(self) -> bool:
        """Whether some layer's integers depend on the calibration inputs (gptq, gradient)."""
        return any(self.setting(n).method in DATA_METHODS for n in self.layers)

    def layer_spec(self, name: str) -> LayerSpec:
        """A planned layer as the size model and the quantizers see it."""
        e = self.layers[name]
        return LayerSpec(name, e.get("kind") or "?", e.get("weight") or f"{name}.weight", tuple(e["shape"]),
                         (e["bits"],), aliases=tuple(e.get("aliases") or ()), axis=int(e.get("axis") or 0),
                         module=e.get("module"))

    def weight(self, model: nn.Module, name: str) -> torch.Tensor:
        """The model's tensor that layer ``name`` quantizes."""
        try:
            return get_weight(model, self.layer_spec(name).weight_name)
        except KeyError:
            raise PlanError(f"plan names layer {name!r}, which the model does not have") from None

    def check_model(self, model: nn.Module) -> None:
        fp = model_fingerprint(model)
        if fp != self.model["fingerprint"]:
            raise PlanError(
                f"plan is for model {self.model.get('name')!r} with fingerprint {self.model['fingerprint']}, "
                f"but this model's fingerprint is {fp}"
            )
        for name in self.layers:
            w = self.weight(model, name)
            if list(w.shape) != list(self.layers[name]["shape"]):
                raise PlanError(f"plan gives layer {name!r} the shape {self.layers[name]['shape']}, the model "
                                f"{list(w.shape)}")


def upgrade_v1(d: dict) -> dict:
    """A version 1 plan as version 2: the same arithmetic, spelled out per layer."""
    q = dict(d["quantizer"])
    method = "mse-clip" if q.pop("clip_search", False) else "rtn"
    q["grid"] = "narrow"
    layers = {n: {**e, "method": method if e["bits"] < FLOAT16_BITS else "float16", "sparsity": 0.0, "grid": "narrow"}
              for n, e in d["layers"].items()}
    return {**d, "version": PLAN_VERSION, "quantizer": q, "layers": layers}


def plan_weights(plan: QuantizationPlan, task_or_model) -> dict:
    """``{layer: QuantizedWeight or float tensor}``: the integers of every planned layer, computed as the
    search computed them (methods that use calibration inputs need the task, not only its model)."""
    from .evaluator import _call
    from .quantize import quantize
    from .quantize.inputs import input_moments
    from .tasks.task import Task

    task = task_or_model if isinstance(task_or_model, Task) else None
    model = task.model if task is not None else task_or_model
    plan.check_model(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    moments = {}
    if plan.needs_data():
        if task is None:
            raise PlanError("this plan quantizes with gptq or gradient, whose integers depend on the calibration "
                            "data: pass the task, not only its model")
        wanted = {n: plan.layer_spec(n).hook_modules for n, e in plan.layers.items()
                  if plan.setting(n).method in DATA_METHODS and takes_inputs(plan.layer_spec(n))}
        moments = input_moments(model, task.calibration, wanted, _call)
    out = {}
    for name in plan.layers:
        spec = plan.layer_spec(name)
        x, w = plan.setting(name), plan.weight(model, name).detach()
        if not x.quantized:
            out[name] = w.to(torch.float16).to(w.dtype)
            continue
        groups = getattr(modules[spec.hook_modules[0]], "groups", 1) if takes_inputs(spec) else 1
        out[name] = quantize(to_rows(w, spec.axis), x, plan.quantizer_config(name), moments.get(name), groups)
    return out


def apply(plan: QuantizationPlan, model, *, inplace: bool = False) -> nn.Module:
    """The model with its weights fake-quantized as the plan says: a copy, or the model itself with ``inplace``.

    ``model`` may be a task (needed when a layer uses gptq or gradient). A model with BatchNorm after
    convolutions is folded first (as it was when the plan was searched), which makes a copy:
    ``inplace`` is refused for it."""
    from .tasks.task import Task

    target = model.model if isinstance(model, Task) else model
    folded, bns = fold_batchnorm(target)
    if bns and inplace:
        raise PlanError("this model folds BatchNorm into its convolutions before quantization, which makes a copy; "
                        "apply the plan with inplace=False")
    plan.check_model(folded)
    weights = plan_weights(plan, replace(model, model=folded) if isinstance(model, Task) else folded)
    target = folded if bns else (target if inplace else copy.deepcopy(target))
    with torch.no_grad():
        for name, q in weights.items():
            w = plan.weight(target, name)
            w.data = q if isinstance(q, torch.Tensor) else from_rows(q.dequantize(w.dtype), plan.layer_spec(name).axis)
    return target


def layer_table(plan: QuantizationPlan) -> list[dict]:
    """One row per quantized layer: name, kind, parameters, bits, method, sparsity, bytes (with scales), sensitivity."""
    rows = []
    for name, e in plan.layers.items():
        spec = plan.layer_spec(name)
        x = plan.setting(name)
        rows.append({"layer": name, "kind": e.get("kind", ""), "params": spec.n_params, "bits": e["bits"],
                     "setting": x.label(),
                     "method": e.get("method", ""), "sparsity": e.get("sparsity", 0.0),
                     "bytes": layer_bytes(spec, x, plan.quantizer_config(name)), "sensitivity": e.get("sensitivity")})
    return rows


def pinned_space(plan: QuantizationPlan, model: nn.Module) -> SearchSpace:
    """A space with no decisions, every planned layer pinned to its setting: it measures the plan."""
    plan.check_model(model)
    cfg = QuantizerConfig(**plan.quantizer)
    names = list(plan.layers)
    pins = {re.escape(n): plan.setting(n).label() for n in names}
    params = {re.escape(n): plan.layer_spec(n).axis for n, e in plan.layers.items() if e.get("kind") == "param"}
    with warnings.catch_warnings():  # weights the plan leaves out were reported when it was searched
        warnings.simplefilter("ignore", MPSearchWarning)
        choices = ([plan.setting(n).label() for n in names] if cfg.format == "ggml"
                   else sorted({int(e["bits"]) for e in plan.layers.values()}) or [8])
        return build_space(model, choices=choices or None,
                           include=[re.escape(n) for n in names], pin=pins, quantizer=cfg, params=params or None,
                           model_name=plan.model.get("name", "model"))


def verify(plan: QuantizationPlan, task) -> dict:
    """Apply the plan to the task's model and measure size and validation quality next to the prediction."""
    from .evaluator import Evaluator

    space = pinned_space(plan, task.model)
    size = SizeTable(space).size(())
    if size.size_bytes != plan.predicted["size_bytes"]:
        covered = set(plan.unquantized) | {space.layers[n].weight_name for n in plan.layers}
        loose = [n for n in space.tensors if n not in covered]
        raise PlanError(f"the plan predicts {plan.predicted['size_bytes']:,} bytes, but applied to this model it makes "
                        f"{size.size_bytes:,}" + (f": tensor(s) {', '.join(loose[:5])} are neither planned nor listed "
                                                  "as unquantized" if loose else ""))
    with Evaluator(task, space) as evaluator:  # scores the pinned layers exactly as a search would
        metric = evaluator.evaluate((), "validation").metric
        calibration = evaluator.evaluate((), "calibration").metric
    pred = plan.predicted
    return {
        "model": plan.model.get("name"),
        "size_bytes": size.size_bytes,
        "avg_bits": round(size.avg_bits, 6),
        "compression_ratio": round(size.compression_ratio, 6),
        "metric_name": evaluator.metric_name,
        "metric": metric,
        "calibration_metric": calibration,
        "reference_metric": evaluator.reference_validation_metric,
        "predicted_size_bytes": pred.get("size_bytes"),
        "predicted_metric": pred.get("validation_metric", pred.get("metric")),
        "predicted_calibration_metric": pred.get("metric"),
    }
