"""QuantizationPlan: the per-layer bit-widths a search chose, as versioned plain JSON.

A plan is what users carry to deployment tools, so it is self-describing (quantizer
settings, every quantized layer, every tensor left alone, predicted size and quality,
provenance) and refuses to be applied to a model it was not made for.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .core.qconfig import FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig
from .core.sizes import SizeTable, layer_bytes
from .core.space import LayerSpec, SearchSpace
from .errors import PlanError
from .schemas import PlanDocument, parse
from .files import finite_json, json_text, read_text, write_atomic
from .model.fold import fold_batchnorm
from .model.walk import build_space, model_fingerprint
from .quantize import fake_quantize

PLAN_FORMAT = "mpsearch-plan"
PLAN_VERSION = 1


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
        chosen = space.layer_bits(candidate)
        for name, spec in space.layers.items():  # network order
            bits = chosen[name]
            if bits >= UNQUANTIZED_BITS:
                unquantized.append(spec.weight_name)
                float_layers.append(name)
                continue
            entry = {"bits": int(bits), "kind": spec.kind, "shape": list(spec.shape), "n_params": spec.n_params}
            if space.quantizer.granularity == "per-group" and bits < FLOAT16_BITS:
                entry["group_size"] = space.quantizer.group_size
            if spec.aliases:
                entry["aliases"] = list(spec.aliases)
            if sensitivity and name in sensitivity:
                entry["sensitivity"] = float(sensitivity[name])
            layers[name] = entry
        predicted = {
            "size_bytes": size.size_bytes,
            "avg_bits": round(size.avg_bits, 6),
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
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: unsupported plan version {d.get('version')!r} (this mpsearch reads version {PLAN_VERSION})")
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
        cfg = QuantizerConfig.from_dict(self.quantizer)
        g = self.layers.get(layer, {}).get("group_size") if layer else None
        if g is not None and g != cfg.group_size:
            cfg = replace(cfg, granularity="per-group", group_size=g)
        return cfg

    def bits(self) -> dict[str, int]:
        return {n: int(e["bits"]) for n, e in self.layers.items()}

    def check_model(self, model: nn.Module) -> None:
        fp = model_fingerprint(model)
        if fp != self.model["fingerprint"]:
            raise PlanError(
                f"plan is for model {self.model.get('name')!r} with fingerprint {self.model['fingerprint']}, "
                f"but this model's fingerprint is {fp}"
            )
        modules = dict(model.named_modules(remove_duplicate=False))
        for name in self.layers:
            if getattr(modules.get(name), "weight", None) is None:
                raise PlanError(f"plan names layer {name!r}, which the model does not have")


def apply(plan: QuantizationPlan, model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with its weights fake-quantized as the plan says: a copy, or ``model`` itself with ``inplace``.

    A model with BatchNorm after convolutions is folded first (as it was when the plan was searched),
    which makes a copy: ``inplace`` is refused for it."""
    folded, bns = fold_batchnorm(model)
    if bns and inplace:
        raise PlanError("this model folds BatchNorm into its convolutions before quantization, which makes a copy; "
                        "apply the plan with inplace=False")
    plan.check_model(folded)
    model = folded if bns else (model if inplace else copy.deepcopy(model))
    modules = dict(model.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for name, entry in plan.layers.items():
            w = modules[name].weight
            w.data = fake_quantize(w.data, int(entry["bits"]), plan.quantizer_config(name))
    return model


def layer_table(plan: QuantizationPlan) -> list[dict]:
    """One row per quantized layer: name, kind, parameters, bits, bytes (with scales), sensitivity."""
    rows = []
    for name, e in plan.layers.items():
        spec = LayerSpec(name, e.get("kind", "?"), f"{name}.weight", tuple(e["shape"]), (e["bits"],))
        rows.append({"layer": name, "kind": e.get("kind", ""), "params": spec.n_params, "bits": e["bits"],
                     "bytes": layer_bytes(spec, e["bits"], plan.quantizer_config(name)),
                     "sensitivity": e.get("sensitivity")})
    return rows


def pinned_space(plan: QuantizationPlan, model: nn.Module) -> SearchSpace:
    """A space with no decisions, every planned layer pinned: its size model measures the plan."""
    plan.check_model(model)
    cfg = QuantizerConfig.from_dict(plan.quantizer)
    names = list(plan.layers)
    pins = {re.escape(n): int(e["bits"]) for n, e in plan.layers.items()}
    layer_choices = {re.escape(n): [int(e["bits"])] for n, e in plan.layers.items()}
    return build_space(model, choices=sorted({int(e["bits"]) for e in plan.layers.values()}) or [8],
                                  include=[re.escape(n) for n in names], pin=pins, layer_choices=layer_choices,
                                  quantizer=cfg, model_name=plan.model.get("name", "model"))


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
    with Evaluator(task, space) as evaluator:  # reference outputs from the full-precision model, before apply
        apply(plan, task.model, inplace=True)
        metric = evaluator.score_model("validation")
        calibration = evaluator.score_model("calibration")
    pred = plan.predicted
    return {
        "model": plan.model.get("name"),
        "size_bytes": size.size_bytes,
        "avg_bits": round(size.avg_bits, 6),
        "compression_ratio": round(size.compression_ratio, 6),
        "metric_name": evaluator.metric.name,
        "metric": metric,
        "calibration_metric": calibration,
        "reference_metric": evaluator.reference_validation_metric,
        "predicted_size_bytes": pred.get("size_bytes"),
        "predicted_metric": pred.get("validation_metric", pred.get("metric")),
        "predicted_calibration_metric": pred.get("metric"),
    }
