"""torchao: a plan as ``FqnToConfig({fqn: IntxWeightOnlyConfig(...)})``, applied with ``quantize_``.

The exporter writes two files:

* ``OUT`` (JSON): the ``FqnToConfig`` in torchao's own serialisation
  (``torchao.core.config.config_to_dict``), so a user reloads it with
  ``config_from_dict(json.load(f))`` and runs ``quantize_(model, cfg, filter_fn=None)``.
  An extra ``_mpsearch`` key (ignored by torchao) lists the plan, the layers the config
  cannot express (Conv2d, float16) and how to treat them.
* ``OUT`` with suffix ``.pt``: ``torch.save`` of the quantized model's state dict, whose
  planned weights are torchao ``IntxUnpackedToInt8Tensor`` holding the plan's exact
  integers and float16 scales (``qparams="plan"``). Load it with
  ``model.load_state_dict(torch.load(path, weights_only=True), assign=True)``.

How torchao's quantizer relates to mpsearch's (torchao 0.18):

* symmetric, full grid (the default): mpsearch's round to nearest *is* torchao's
  ``MappingType.SYMMETRIC`` (``scale = amax / (2^(b-1) - 0.5)``, rounded to float16, codes in
  ``[-2^(b-1), 2^(b-1) - 1]`` from the float16 reciprocal), so the exported config reproduces a
  ``rtn`` plan's integers exactly (tests/test_export_torchao_onnx.py checks it). Other methods
  (mse-clip, gptq, gradient) choose other integers: the state dict carries them, the config cannot.
* symmetric, narrow grid (version 1 plans): ``scale = amax / (2^(b-1) - 1)``; torchao's
  ``SYMMETRIC_NO_CLIPPING_ERR`` uses ``max(-min / 2^(b-1), max / (2^(b-1) - 1))``, equal on
  every row whose largest magnitude is positive, so the config uses it.
* asymmetric: ``MappingType.ASYMMETRIC`` is mpsearch's scheme with the integers shifted by
  ``-2^(b-1)`` (signed storage); the zero-point is computed before the scale is rounded to
  float16, so a few integers may differ by one.
* scales are stored as float16 (``scale_dtype=torch.float16``), like mpsearch.
* granularity: ``PerAxis(0)`` is per output channel for Linear and Embedding, as in
  mpsearch. For Conv2d torchao's ``IntxWeightOnlyConfig`` uses blocks ``(1, C_in, 1, 1)``
  (one scale per output channel *and* kernel position) and fails when ``C_in == 1``, so
  Conv2d weights are built with ``IntxUnpackedToInt8Tensor.from_hp`` and block
  ``(1, C_in, kh, kw)``: one scale per output channel, as planned.
* ``PerGroup(g)`` needs ``g`` to divide the row; mpsearch pads a ragged last group, which
  torchao cannot hold, so such plans are refused.
* 16 bits: torchao has no per-module float16 weight config, so those layers stay out of
  the config; ``quantize_with_torchao`` rounds them to float16 values in place (as the plan
  measured) and they stay float32 tensors. 1 bit (mpsearch's sign x mean) is refused.
* pruned weights (sparsity) are zero codes in torchao's dense tensors: the deployed size is
  the dense one.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..core.qconfig import FLOAT16_BITS, QuantizerConfig
from ..errors import MPSearchError
from ..logs import quiet_import_noise
from ..plan import QuantizationPlan, plan_weights
from . import ExportResult, dense_storage_note, file_size, register

QPARAMS = ("torchao", "plan")


def _require_torchao():
    quiet_import_noise()
    try:
        import torchao  # noqa: F401
        from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup, quantize_
    except ImportError:
        raise MPSearchError("the torchao exporter needs torchao: pip install 'mpsearch[export]'") from None
    return FqnToConfig, IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup, quantize_


def _tensor_cls():
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    return IntxUnpackedToInt8Tensor


def _layer_settings(plan: QuantizationPlan, model: nn.Module) -> dict[str, dict]:
    """Per planned layer: module, bits, quantizer config, block size; raises on what torchao cannot hold."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for name, entry in plan.layers.items():
        mod = modules[name]
        bits = int(entry["bits"])
        cfg = plan.quantizer_config(name)
        w = mod.weight
        if bits == 1:
            raise MPSearchError(f"torchao export: layer {name!r} has 1 bit; mpsearch's binary weights "
                                "(sign x mean) have no torchao equivalent")
        item = {"module": mod, "bits": bits, "cfg": cfg, "kind": type(mod).__name__, "block_size": None}
        if bits < FLOAT16_BITS:
            if w.dim() == 2:
                k = w.shape[1]
                g = k if cfg.granularity == "per-channel" else cfg.group_size
                if k % g:
                    raise MPSearchError(f"torchao export: layer {name!r} has rows of {k} weights, not a multiple of "
                                        f"group_size {g}; torchao cannot hold a ragged last group")
                item["block_size"] = (1, g)
            elif w.dim() == 4:
                c, kh, kw = w.shape[1:]
                if cfg.granularity == "per-channel":
                    item["block_size"] = (1, c, kh, kw)
                else:
                    g = cfg.group_size
                    if g % (kh * kw) or c % (g // (kh * kw)):
                        raise MPSearchError(f"torchao export: conv layer {name!r} ({c}x{kh}x{kw} per output channel) "
                                            f"cannot be split into torchao blocks of group_size {g}")
                    item["block_size"] = (1, g // (kh * kw), kh, kw)
            else:
                raise MPSearchError(f"torchao export: layer {name!r} has a {w.dim()}-d weight; torchao's intx "
                                    "weight-only tensors hold 2-d (Linear, Embedding) and 4-d (Conv2d) weights")
        out[name] = item
    return out


def torchao_config(plan: QuantizationPlan, model: nn.Module | None = None):
    """The ``FqnToConfig`` for the plan's Linear/Embedding layers (Conv2d and 16-bit layers are left out)."""
    FqnToConfig, IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup, _ = _require_torchao()
    entries = {}
    for name, e in plan.layers.items():
        bits = int(e["bits"])
        if bits >= FLOAT16_BITS or e.get("kind") == "Conv2d" or len(e.get("shape", [0, 0])) != 2:
            continue
        cfg = plan.quantizer_config(name)
        mapping = _mapping(MappingType, cfg)
        gran = PerAxis(0) if cfg.granularity == "per-channel" else PerGroup(cfg.group_size)
        entries[name] = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=gran,
                                             mapping_type=mapping, scale_dtype=torch.float16)
    return FqnToConfig(entries)


def _mapping(MappingType, cfg: QuantizerConfig):
    """torchao's rule closest to the plan's grid: SYMMETRIC is the full grid exactly; the narrow grid's
    scale is SYMMETRIC_NO_CLIPPING_ERR's whenever a row's largest magnitude is positive."""
    if cfg.scheme == "asymmetric":
        return MappingType.ASYMMETRIC
    return MappingType.SYMMETRIC if cfg.grid == "full" else MappingType.SYMMETRIC_NO_CLIPPING_ERR


def _plan_tensor(w: torch.Tensor, qw, cfg: QuantizerConfig, block_size: tuple[int, ...]):
    """A torchao ``IntxUnpackedToInt8Tensor`` holding mpsearch's exact integers, float16 scales and zero-points."""
    bits = qw.bits
    q, scale = qw.codes, qw.scales  # (out, inner) ints, (out, groups) scales / unsigned zero-points
    zp = torch.zeros_like(scale, dtype=torch.int32) if qw.zero_points is None else qw.zero_points
    if cfg.scheme == "asymmetric":  # unsigned -> torchao's signed domain
        q, zp = q - 2 ** (bits - 1), zp - 2 ** (bits - 1)
    grid = tuple(s // b for s, b in zip(w.shape, block_size))
    # the block grid, in row-major order, is mpsearch's groups in row-major order
    return _tensor_cls()(q.reshape(w.shape).to(torch.int8), scale.reshape(grid).to(torch.float16),
                         zp.reshape(grid).to(torch.int8), getattr(torch, f"int{bits}"), tuple(block_size), w.dtype, None)


def quantize_with_torchao(plan: QuantizationPlan, model: nn.Module, *, qparams: str = "torchao",
                          weights: dict | None = None) -> nn.Module:
    """Quantize ``model`` in place with torchao as the plan says and return it.

    ``qparams="torchao"``: Linear/Embedding through ``quantize_(model, FqnToConfig(...), filter_fn=None)``
    with torchao's own scales (what a user gets from the exported JSON); Conv2d with torchao's
    quantizer per output channel. ``qparams="plan"``: the same torchao tensors, holding mpsearch's
    exact integers and float16 scales, so the model computes exactly what the plan measured.
    Either way every planned integer weight becomes an ``IntxUnpackedToInt8Tensor`` with
    ``target_dtype=torch.int{bits}``; 16-bit weights are rounded to float16 values in place.
    ``weights``: the plan's integers (``plan.plan_weights``; computed from ``model`` when not given,
    which needs no calibration data unless a layer uses gptq or gradient).
    """
    if qparams not in QPARAMS:
        raise MPSearchError(f"qparams must be one of {', '.join(QPARAMS)}, got {qparams!r}")
    _, _, MappingType, _, _, quantize_ = _require_torchao()
    Intx = _tensor_cls()
    plan.check_model(model)
    if qparams == "plan" and weights is None:
        weights = plan_weights(plan, model)
    settings = _layer_settings(plan, model)
    with torch.no_grad():
        for name, s in settings.items():
            mod, bits = s["module"], s["bits"]
            if bits >= FLOAT16_BITS:
                mod.weight.data = mod.weight.data.to(torch.float16).to(mod.weight.dtype)
                continue
            if qparams == "torchao" and s["kind"] != "Conv2d":
                continue  # quantize_ below
            w = mod.weight.detach()
            dtype = getattr(torch, f"int{bits}")
            if qparams == "plan":
                q = _plan_tensor(w, weights[name], s["cfg"], s["block_size"])
            else:
                from torchao.quantization.quant_api import _adjust_scale_dtype_in_intx_unpacked_tensor

                mapping = _mapping(MappingType, s["cfg"])
                q = Intx.from_hp(w, s["block_size"], dtype, mapping_type=mapping)
                _adjust_scale_dtype_in_intx_unpacked_tensor(q, w, torch.float16)
            mod.weight = nn.Parameter(q, requires_grad=False)
        if qparams == "torchao":
            cfg = torchao_config(plan, model)
            if cfg.fqn_to_config:
                quantize_(model, cfg, filter_fn=None)
        modules = dict(model.named_modules(remove_duplicate=False))
        for name, e in plan.layers.items():  # modules that share the weight (tied) share the quantized one
            for alias in e.get("aliases", ()):
                if alias in modules:
                    modules[alias].weight = modules[name].weight
    return model


def weight_summary(model: nn.Module, names) -> dict[str, dict]:
    """Tensor type and bit-width of each named module's weight (for checks and export details)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for n in names:
        w = modules[n].weight
        td = getattr(w, "target_dtype", None)
        out[n] = {"tensor": type(w).__name__, "target_dtype": str(td).replace("torch.", "") if td is not None else str(w.dtype).replace("torch.", ""),
                  "block_size": list(getattr(w, "block_size", []) or [])}
    return out


@register("torchao", needs_model=True, suffix=".json",
          description="torchao FqnToConfig (JSON) + quantized state dict (.pt)",
          kinds=("Linear", "Conv1d", "Conv2d", "Embedding"))
def to_torchao(plan: QuantizationPlan, out: Path, task) -> ExportResult:
    model = copy.deepcopy(task.model)  # the task's own model stays as it is
    cfg = torchao_config(plan, model)  # imports torchao, quietly
    from torchao.core.config import config_to_dict

    weights = plan_weights(plan, task)
    quantize_with_torchao(plan, model, qparams="plan", weights=weights)
    settings = {n: {"bits": int(e["bits"]), "kind": e.get("kind")} for n, e in plan.layers.items()}
    conv = [n for n, e in plan.layers.items() if e.get("kind") == "Conv2d" and int(e["bits"]) < FLOAT16_BITS]
    fp16 = [n for n, e in plan.layers.items() if int(e["bits"]) >= FLOAT16_BITS]
    doc = config_to_dict(cfg)
    state_path = out.with_suffix(".pt")
    doc["_mpsearch"] = {
        "plan_model": plan.model,
        "quantizer": plan.quantizer,
        "layers": settings,
        "conv2d_per_output_channel": conv,
        "float16_rounded": fp16,
        "state_dict": state_path.name,
        "usage": ("cfg = torchao.core.config.config_from_dict(json.load(f)); "
                  "torchao.quantize_(model, cfg, filter_fn=None)  # Linear/Embedding, torchao's own scales; "
                  "or model.load_state_dict(torch.load(STATE, weights_only=True), assign=True)  # the plan's exact integers"),
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    torch.save(model.state_dict(), state_path)
    notes = []
    if conv:
        notes.append(f"{len(conv)} Conv2d layer(s) are not in the FqnToConfig (torchao's IntxWeightOnlyConfig uses one scale "
                     "per output channel and kernel position); the state dict holds them per output channel")
    if fp16:
        notes.append(f"{len(fp16)} 16-bit layer(s) stay float32 holding float16 values (torchao has no per-module float16 config)")
    notes.append("integer weights are stored unpacked, one int8 per weight (IntxUnpackedToInt8Tensor)")
    notes += dense_storage_note(plan)
    paths = [out, state_path]
    return ExportResult("torchao", paths, file_size(paths), notes,
                        {"state_dict_bytes": state_path.stat().st_size, "config_bytes": out.stat().st_size,
                         "weights": weight_summary(model, plan.layers)})
