"""GPTQModel / vLLM: a ``quantize_config.json`` with per-module overrides in ``dynamic``.

GPTQModel (``dynamic_get``) tries the ``dynamic`` keys in order with ``re.match``
(anchored at the start only) against full module names; the first match wins.
``"+:<regex>": {"bits": b, "group_size": g}`` overrides the top-level settings and
``"-:<regex>": {}`` leaves the module unquantized. Every key we write is anchored at
both ends and names one module, so the keys are disjoint and their order does not matter.
Layers at the top-level bits and group size get no key: the default covers them.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ..plan import QuantizationPlan
from ..core.qconfig import FLOAT16_BITS
from . import ExportResult, file_size, register, runtime_quantizes

GPTQ_BITS = (2, 3, 4, 8)
# wrapper attributes in front of the Hugging Face module names (SentenceEncoder.bert, DDP's module.):
# the keys accept the name with or without them
OPTIONAL_PREFIXES = ("module.", "bert.")
# unquantized tensors whose module is a normalization: no GPTQ tool quantizes those, so no key
_NORM = re.compile(r"(?:^|[._])(?:layer_?norm|rms_?norm|batch_?norm|group_?norm|norm\w*|ln\w*|bn\d*)$", re.IGNORECASE)


def gptq_bits(bits: int) -> int | None:
    """The GPTQ container for a plan's bit-width: the next supported width, None (unquantized) above 8."""
    if bits > max(GPTQ_BITS):
        return None
    return min(b for b in GPTQ_BITS if b >= bits)


def module_pattern(module: str) -> str:
    """``^...$`` matching ``module``, with its wrapper prefixes optional."""
    head = ""
    rest = module
    while True:
        p = next((p for p in OPTIONAL_PREFIXES if rest.startswith(p)), None)
        if p is None:
            break
        head += f"(?:{re.escape(p)})?"
        rest = rest[len(p):]
    return "^" + head + re.escape(rest) + "$"


def _linear_like_unquantized(plan: QuantizationPlan) -> list[str]:
    """Quantizable modules the plan leaves in float: its ``float_layers``; for plans written before
    they were recorded, unquantized weights that are not normalizations (a heuristic)."""
    if plan.float_layers is not None:
        return [n for n in plan.float_layers if n not in plan.layers]
    out = []
    for t in plan.unquantized:
        if not t.endswith(".weight"):
            continue
        module = t[:-len(".weight")]
        if module in plan.layers or _NORM.search(module.rsplit(".", 1)[-1]):
            continue
        out.append(module)
    return out


def quantize_config(plan: QuantizationPlan) -> tuple[dict, dict]:
    """The config and a details dict (per-module container bits, what was rounded up)."""
    q = plan.quantizer
    default_group = int(q["group_size"]) if q.get("granularity") == "per-group" else -1
    modules: dict[str, tuple[int | None, int]] = {}
    for name, e in plan.layers.items():
        cb = gptq_bits(int(e["bits"]))
        g = int(e["group_size"]) if cb is not None and e.get("group_size") is not None else default_group
        modules[name] = (cb, g)
    quantized = [(n, cb) for n, (cb, _) in modules.items() if cb is not None]
    if quantized:
        counts = Counter(cb for _, cb in quantized)
        params = Counter()
        for n, cb in quantized:
            params[cb] += int(plan.layers[n].get("n_params", 0))
        default_bits = max(counts, key=lambda b: (counts[b], params[b], b))
    else:
        default_bits = 8
    dynamic: dict[str, dict] = {}
    for name, (cb, g) in modules.items():
        if cb is None:
            dynamic["-:" + module_pattern(name)] = {}
        elif (cb, g) != (default_bits, default_group):
            dynamic["+:" + module_pattern(name)] = {"bits": cb, "group_size": g}
    skipped = _linear_like_unquantized(plan)
    for name in skipped:
        dynamic["-:" + module_pattern(name)] = {}
    from .. import __version__

    cfg = {
        "bits": default_bits,
        "group_size": default_group,
        "desc_act": bool(q.get("act_order", False)),  # GPTQModel reorders by activation when asked
        "sym": q.get("scheme", "symmetric") == "symmetric",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "dynamic": dynamic,
        "meta": {"quantizer": [f"mpsearch:{__version__}"],
                 "mpsearch_plan": {"model": plan.model.get("name"), "fingerprint": plan.model.get("fingerprint")}},
    }
    details = {
        "default_bits": default_bits,
        "default_group_size": default_group,
        "modules": {n: {"planned_bits": int(plan.layers[n]["bits"]), "bits": cb, "group_size": g if cb else None}
                    for n, (cb, g) in modules.items()},
        "unquantized_modules": [n for n, (cb, _) in modules.items() if cb is None] + skipped,
    }
    return cfg, details


@register("gptqmodel", needs_model=False, suffix=".json",
          description="GPTQModel / vLLM: quantize_config.json with per-module 'dynamic' overrides",
          kinds=("Linear", "Conv1D", "Embedding"))
def to_gptqmodel(plan: QuantizationPlan, out: Path, task=None) -> ExportResult:
    notes = runtime_quantizes(plan, "gptqmodel")
    cfg, details = quantize_config(plan)
    out.write_text(json.dumps(cfg, indent=2) + "\n")
    rounded = Counter((d["planned_bits"], d["bits"]) for d in details["modules"].values()
                      if d["bits"] is not None and d["bits"] != d["planned_bits"])
    if rounded:
        notes.append("GPTQModel supports 2, 3, 4 and 8 bits: "
                     + ", ".join(f"{n} layer(s) at {a} bits written as {b}" for (a, b), n in sorted(rounded.items())))
    wide = sorted({d["planned_bits"] for d in details["modules"].values() if d["bits"] is None})
    if wide:
        notes.append("layers at " + ", ".join(map(str, wide)) + " bits are left unquantized ('-:' keys)"
                     + ("" if wide == [FLOAT16_BITS] else "; GPTQ has no width between 8 and 16"))
    emb = [n for n, e in plan.layers.items() if e.get("kind") == "Embedding"]
    if emb:
        notes.append(f"{len(emb)} embedding layer(s) carry keys, but GPTQModel quantizes only the Linear-like "
                     "modules of its model definition: embeddings stay in float")
    if not plan.quantizer.get("granularity") == "per-group":
        notes.append("per-channel plan: group_size -1 (one scale per output channel)")
    return ExportResult("gptqmodel", [out], file_size([out]), notes, details)
