"""ONNX Runtime: the model as a weight-only QDQ ONNX graph (opset 21) with the plan's bit-widths.

The model is exported with ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``,
which is several times faster than the dynamo exporter here; the dynamo exporter is the
fallback), then every planned weight initializer ``W`` is replaced by

    W_q (INT4/UINT4 or INT8/UINT8 initializer) -> DequantizeLinear(scale, [zero_point], axis, [block_size])
      [-> Reshape (Conv weights, stored as (out, in*kh*kw))] [-> Transpose (MatMul weights, stored as W^T)]

whose output keeps ``W``'s name, so every consumer (Gemm, MatMul, Conv, Gather) is unchanged
and activations stay float: exactly weight-only quantization, computed by ONNX Runtime's CPU
provider. The integers, scales and zero-points are mpsearch's own (``mpsearch.quantize.quantize``), so the
ONNX model computes the plan's weights to the last bit (scales are float32 initializers
holding the plan's float16 values: a float16 scale would make DequantizeLinear's output float16).

Why not ``quantize_static``: its QDQ format also quantizes the activations (Q/DQ pairs on
every quantized op's inputs, calibrated on the data), which is not what a weight-only plan
measured, and its ``TensorQuantOverrides`` use ORT's own scale rule (``max/((qmax-qmin)/2)``),
not mpsearch's ``amax/(2^(b-1)-1)``; it also has no 2/3/5/6/7-bit types. The graph built here
is what ``quantize_static`` emits for the weights, without the activation pairs.

Containers: 1-4 bits -> INT4 (UINT4 for asymmetric plans), 5-8 bits -> INT8 (UINT8), with the
values restricted to the planned range; 16 bits -> a FLOAT16 initializer and a Cast.
Initializers are matched to modules by value (``W`` or ``W^T``), so names that differ between
exporters do not matter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.qconfig import FLOAT16_BITS
from ..errors import MPSearchError
from ..plan import QuantizationPlan, plan_weights
from . import ExportResult, dense_storage_note, file_size, register

OPSET = 21
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


# ---- containers ----------------------------------------------------------------------------------
def container(bits: int, scheme: str) -> str:
    """ONNX element type that holds ``bits``-bit integers of this scheme."""
    if bits >= FLOAT16_BITS:
        return "FLOAT16"
    wide = "8" if bits > 4 else "4"
    return ("INT" if scheme == "symmetric" else "UINT") + wide


# ---- export ---------------------------------------------------------------------------------------
def _example(task) -> tuple[tuple, dict, list[str]]:
    x = task.calibration[0][0]
    if isinstance(x, dict):
        names = [k for k in INPUT_ORDER if k in x] + [k for k in x if k not in INPUT_ORDER]
        return (), {k: x[k] for k in names}, names
    if isinstance(x, (tuple, list)):
        return tuple(x), {}, [f"input_{i}" for i in range(len(x))]
    return (x,), {}, ["input"]


def export_float_onnx(model: nn.Module, task, path: Path, *, dynamo: bool = False) -> Any:
    """Export the (float) model to ``path`` and return the loaded ``onnx.ModelProto`` at opset 21."""
    import onnx
    from onnx import version_converter

    args, kwargs, names = _example(task)
    dyn = {n: ({0: "batch", 1: "seq"} if kwargs else {0: "batch"}) for n in names}
    model = model.eval()
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if not dynamo:
            try:
                torch.onnx.export(model, args, str(path), kwargs=kwargs or None, input_names=names,
                                  output_names=["output"], dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
            except Exception:  # the TorchScript exporter is deprecated: fall back to dynamo
                dynamo = True
        if dynamo:
            shapes = {n: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} if kwargs else {0: torch.export.Dim.AUTO}
                      for n in names}
            torch.onnx.export(model, args, str(path), kwargs=kwargs or None, input_names=names, output_names=["output"],
                              dynamic_shapes=shapes if kwargs else tuple(shapes.values()), opset_version=OPSET,
                              dynamo=True, external_data=False)
    proto = onnx.load(str(path))
    if proto.opset_import and max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) < OPSET:
        proto = version_converter.convert_version(proto, OPSET)
    proto.ir_version = max(proto.ir_version, 10)  # INT4 needs IR 10
    return proto


def _match_initializers(proto, plan: QuantizationPlan, model: nn.Module) -> dict[str, tuple[str, str]]:
    """Initializer name -> (planned layer, layout 'same' or 'transposed'), matched by value.

    A tied weight (``aliases`` in the plan) may appear several times, e.g. as ``W`` for a Gather
    and as ``W^T`` for a MatMul: every copy is matched.
    """
    from onnx import numpy_helper

    by_shape: dict[tuple, list] = {}
    for init in proto.graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    arrays: dict[str, np.ndarray] = {}
    found: dict[str, tuple[str, str]] = {}
    for name, entry in plan.layers.items():
        w = plan.weight(model, name).detach().float().numpy()
        hits = []
        for layout, arr in (("same", w), ("transposed", w.T if w.ndim == 2 else None)):
            if arr is None:
                continue
            for init in by_shape.get(tuple(arr.shape), []):
                if init.name in found or any(h[0] == init.name for h in hits):
                    continue
                if init.name not in arrays:
                    arrays[init.name] = numpy_helper.to_array(init)
                if np.array_equal(arrays[init.name], arr):
                    hits.append((init.name, layout))
                    if not entry.get("aliases"):
                        break
            if hits and not entry.get("aliases"):
                break
        if not hits:
            raise MPSearchError(f"onnxruntime export: no ONNX initializer holds the weight of {name!r} "
                                "(folded into another constant by the exporter?)")
        for iname, layout in hits:
            found[iname] = (name, layout)
    return found


def quantize_onnx(proto, plan: QuantizationPlan, model: nn.Module, weights: dict) -> dict[str, dict]:
    """Rewrite ``proto`` in place: each planned weight initializer becomes weight-only QDQ holding the
    integers in ``weights`` (``plan.plan_weights``). Returns details."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    np_types = {"INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4, "INT8": np.int8, "UINT8": np.uint8}
    matches = _match_initializers(proto, plan, model)
    inits = {i.name: i for i in proto.graph.initializer}
    new_inits, new_nodes, details = [], [], {}
    for iname, (layer, layout) in matches.items():
        bits = int(plan.layers[layer]["bits"])
        cfg = plan.quantizer_config(layer)
        w = plan.weight(model, layer).detach().float()
        axis = plan.layer_spec(layer).axis
        ctype = container(bits, cfg.scheme)
        details[iname] = {"layer": layer, "bits": bits, "container": ctype, "layout": layout}
        proto.graph.initializer.remove(inits[iname])
        if bits >= FLOAT16_BITS:
            arr = numpy_helper.to_array(inits[iname]).astype(np.float16)
            new_inits.append(numpy_helper.from_array(arr, iname + "_fp16"))
            new_nodes.append(helper.make_node("Cast", [iname + "_fp16"], [iname], to=TensorProto.FLOAT,
                                              name=iname + "_cast"))
            continue
        qw = weights[layer]
        q, scale, zp = qw.codes, qw.scales, qw.zero_points
        if cfg.scheme == "symmetric" and bits > 1:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            assert int(q.min()) >= lo and int(q.max()) <= hi
        out_ch, inner = q.shape
        q_name, s_name, z_name = iname + "_quantized", iname + "_scale", iname + "_zero_point"
        new_inits.append(numpy_helper.from_array(q.numpy().astype(np_types[ctype]), q_name))
        attrs: dict = {}
        if cfg.granularity == "per-group":
            attrs = {"axis": 1, "block_size": int(cfg.group_size)}
            s_arr, z_arr = scale.numpy(), None if zp is None else zp.numpy()
        else:
            attrs = {"axis": 0}
            s_arr, z_arr = scale.reshape(-1).numpy(), None if zp is None else zp.reshape(-1).numpy()
        new_inits.append(numpy_helper.from_array(s_arr.astype(np.float32), s_name))
        dq_inputs = [q_name, s_name]
        if cfg.scheme != "symmetric":
            new_inits.append(numpy_helper.from_array(z_arr.astype(np_types[ctype]), z_name))
            dq_inputs.append(z_name)
        # the codes are rows (output channel first); the initializer is the torch weight, or its transpose
        if w.dim() == 2:
            steps = [("Transpose", [1, 0])] if (axis == 0) == (layout == "transposed") else []
        else:
            rows = plan.layer_spec(layer).rows_shape
            steps = [("Reshape", list(rows))]
            if axis:  # back from output-channel-first to the layout of a transposed convolution
                steps.append(("Transpose", [*range(1, axis + 1), 0, *range(axis + 1, w.dim())]))
        cur = iname if not steps else iname + "_dq"
        new_nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [cur], name=iname + "_DequantizeLinear", **attrs))
        for i, (op, arg) in enumerate(steps):
            nxt = iname if i == len(steps) - 1 else f"{iname}_{op.lower()}{i}"
            if op == "Reshape":
                shape_name = iname + "_shape"
                new_inits.append(numpy_helper.from_array(np.array(arg, dtype=np.int64), shape_name))
                new_nodes.append(helper.make_node("Reshape", [cur, shape_name], [nxt], name=iname + "_reshape"))
            else:
                new_nodes.append(helper.make_node("Transpose", [cur], [nxt], perm=arg, name=iname + "_transpose"))
            cur = nxt
        details[iname].update({"shape": [out_ch, inner], "n_scales": int(scale.numel()), **attrs})
    proto.graph.initializer.extend(new_inits)
    old = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes + old)
    for inp in list(proto.graph.input):  # older exporters may list initializers as inputs
        if inp.name in details:
            proto.graph.input.remove(inp)
    return details


def export_quantized_onnx(plan: QuantizationPlan, model: nn.Module, task, path: str | Path) -> dict[str, dict]:
    """Write the weight-only QDQ ONNX model for ``plan`` to ``path``; return per-initializer details."""
    import onnx

    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        raise MPSearchError("the onnxruntime exporter needs onnx and onnxruntime: pip install 'mpsearch[export]'") from None
    path = Path(path)
    weights = plan_weights(plan, task)
    proto = export_float_onnx(model, task, path)
    details = quantize_onnx(proto, plan, model, weights)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return details


MATMULNBITS_ACCURACY = "session.qdq_matmulnbits_accuracy_level"


def session(path: str | Path, accuracy_level: int | None = 1):
    """An ONNX Runtime CPU session for ``path``.

    ONNX Runtime fuses ``DequantizeLinear -> MatMul`` into its ``MatMulNBits`` kernel; by default
    (accuracy level 4) that kernel also quantizes the activations to int8 per block, which the
    weight-only plan did not measure. ``accuracy_level=1`` (the default here) keeps float32
    activations, so the session computes the plan exactly; ``None`` leaves ORT's default.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if accuracy_level is not None:
        opts.add_session_config_entry(MATMULNBITS_ACCURACY, str(int(accuracy_level)))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, batches: list) -> torch.Tensor:
    """Concatenated first outputs of ``sess`` over ``(inputs, targets)`` batches."""
    names = [i.name for i in sess.get_inputs()]
    outs = []
    for x, _ in batches:
        if isinstance(x, dict):
            feed = {k: x[k].numpy() for k in names}
        elif isinstance(x, (tuple, list)):
            feed = {k: v.numpy() for k, v in zip(names, x)}
        else:
            feed = {names[0]: x.numpy()}
        outs.append(torch.from_numpy(sess.run(None, feed)[0]))
    return torch.cat(outs, dim=0)


@register("onnxruntime", needs_model=True, suffix=".onnx",
          description="ONNX model, weight-only QDQ (INT4/INT8 DequantizeLinear), opset 21, for ONNX Runtime",
          kinds=("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                 "Conv1D", "Embedding"))
def to_onnxruntime(plan: QuantizationPlan, out: Path, task) -> ExportResult:
    details = export_quantized_onnx(plan, task.model, task, out)
    sess = session(out)  # it loads on ONNX Runtime's CPU provider
    del sess
    counts: dict[str, int] = {}
    for d in details.values():
        counts[d["container"]] = counts.get(d["container"], 0) + 1
    notes = [f"{n} initializer(s) as {c}" for c, n in sorted(counts.items())]
    odd = sorted({d["bits"] for d in details.values() if d["bits"] not in (4, 8, FLOAT16_BITS)})
    if odd:
        notes.append(f"{odd}-bit weights are held in the next wider container, restricted to their planned range")
    notes.append("scales are float32 initializers holding the plan's float16 values")
    notes += dense_storage_note(plan)
    notes.append(f"ONNX Runtime fuses DequantizeLinear+MatMul into MatMulNBits, which by default quantizes activations "
                 f"to int8; set the session option {MATMULNBITS_ACCURACY}=1 to run the plan's float activations")
    return ExportResult("onnxruntime", [out], file_size([out]), notes,
                        {"opset": OPSET, "initializers": details})
