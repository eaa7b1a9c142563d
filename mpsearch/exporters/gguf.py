"""llama.cpp: the mixed-precision GGUF itself, written from a plan of GGML types.

The plan's tensors are quantized by ``mpsearch.quantize.ggml`` (bit-exact with ggml), so the file
holds exactly the blocks the search scored. Everything else (metadata, tokenizer, the tensors the
plan leaves in float) comes unchanged from a full-precision GGUF of the same model made by
llama.cpp's own converter::

    python convert_hf_to_gguf.py MODEL_DIR --outtype f32 --outfile model-f32.gguf
    mpsearch export plan.json --format gguf --gguf model-f32.gguf --out model-mixed.gguf

The base must be float32, so that its tensors are the model's weights bit for bit (checked) and
the tensors left in float are stored as the plan counts them.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import MPSearchError
from ..model.weights import to_rows
from ..plan import QuantizationPlan, plan_weights
from . import ExportResult, file_size, register
from .llama_cpp import NEVER_QUANTIZED, detect_arch, name_mapper

# llama.cpp's ``enum llama_ftype`` for a file whose tensors are mostly of one type (general.file_type)
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 12,
             "q4_k": 15, "q5_k": 17, "q6_k": 18}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, which llama-quantize writes as general.quantization_version


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MPSearchError("the gguf export needs gguf-py: pip install 'mpsearch[export]' (or pip install gguf)") from None
    return gguf


def read_base(path: str | Path):
    """The base GGUF, opened read-only; a one-line error when it is missing or not a GGUF."""
    gguf = _gguf()
    p = Path(path)
    if not p.is_file():
        raise MPSearchError(f"base GGUF {p} does not exist (make one with llama.cpp's convert_hf_to_gguf.py --outtype f32)")
    try:
        return gguf.GGUFReader(p)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise MPSearchError(f"{p} is not a readable GGUF file: {exc}") from None


def planned_tensors(plan: QuantizationPlan, present) -> dict[str, str]:
    """``{GGUF tensor name: plan layer}`` for every planned layer, checked against ``present``, the names of a
    GGUF's tensors."""
    arch = detect_arch(plan)
    if arch is None:
        raise MPSearchError(f"gguf export: model {plan.model.get('name')!r} is not an architecture gguf-py can name")
    if arch != "BERT":  # llama.cpp's converter reorders LLaMA's q/k rows (rope), which this writer does not yet
        raise MPSearchError(f"gguf export: {arch.lower()} models are not supported yet (BERT encoders such as minilm "
                            "are); export a --tensor-type-file with --format llama-cpp instead")
    to_gguf = name_mapper(arch, list(plan.layers) + list(plan.unquantized))
    present = set(present)
    out: dict[str, str] = {}
    for layer in plan.layers:
        g = to_gguf(plan.layer_spec(layer).weight_name)
        if g is None or g not in present:
            raise MPSearchError(f"gguf export: layer {layer!r} has no tensor in the base GGUF"
                                + (f" (expected {g!r})" if g else ""))
        if g in out:
            raise MPSearchError(f"gguf export: layers {out[g]!r} and {layer!r} both map to the GGUF tensor {g!r}")
        if g in NEVER_QUANTIZED and plan.setting(layer).quantized:
            raise MPSearchError(f"gguf export: llama.cpp keeps {g} in float; the plan quantizes it (layer {layer!r}): "
                                "exclude it from the space, as search_spaces/minilm_ggml.yaml does")
        out[g] = layer
    return out


def _copy_metadata(reader, writer, file_type: int) -> None:
    gguf = _gguf()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type", "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
    writer.add_uint32("general.file_type", file_type)


def write_gguf(plan: QuantizationPlan, task, base: str | Path, out: str | Path) -> dict:
    """Write the plan's GGUF at ``out`` from ``base``; returns what it wrote (types, tensor bytes, bpw)."""
    gguf = _gguf()
    reader = read_base(base)
    names = planned_tensors(plan, [t.name for t in reader.tensors])
    weights = plan_weights(plan, task)
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise MPSearchError(f"{base} has no general.architecture: not a model GGUF")
    writer = gguf.GGUFWriter(str(out), arch_field.contents())
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    types: dict[str, str] = {}
    total = elements = 0
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]  # torch order: ggml's ne reversed
        layer = names.get(t.name)
        if layer is None:
            data, gtype = t.data, t.tensor_type.name.lower()
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        else:
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise MPSearchError(f"base GGUF {base}: tensor {t.name} is {t.tensor_type.name}, not F32; convert the "
                                    "model with convert_hf_to_gguf.py --outtype f32")
            axis = plan.layer_spec(layer).axis
            model_w = to_rows(plan.weight(task.model, layer).detach().float(), axis).reshape(shape).cpu().numpy()
            if not np.array_equal(np.asarray(t.data, dtype=np.float32).reshape(shape), model_w):
                raise MPSearchError(f"base GGUF {base}: tensor {t.name} is not the weight of layer {layer!r}: the GGUF "
                                    "was converted from another model (or another layout)")
            q = weights[layer]
            x = plan.setting(layer)
            if x.ggml:
                gtype = x.method
                data = q.data.reshape(shape[0], -1)
                writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType[gtype.upper()])
            elif x.bits == 16:
                gtype = "f16"
                data = to_rows(q.detach(), axis).float().cpu().numpy().astype(np.float16).reshape(shape)
                writer.add_tensor(t.name, data)
            else:
                raise MPSearchError(f"gguf export: layer {layer!r} is {x.label()}, not a GGML type")
        types[t.name] = gtype
        total += int(np.asarray(data).nbytes)
        elements += int(np.prod(shape))
    counts = Counter(types[g] for g in names)
    main = max((c for c in counts if c in FILE_TYPE and c not in ("f32", "f16")), key=lambda c: counts[c], default="f16")
    _copy_metadata(reader, writer, FILE_TYPE[main])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_bytes": total, "n_elements": elements, "bits_per_weight": 8 * total / max(elements, 1),
            "types": dict(Counter(types.values())), "tensors": types, "file_type": main}


@register("gguf", needs_model=True, suffix=".gguf", formats=("ggml",), options=("base_gguf",),
          description="llama.cpp: the mixed-precision GGUF, written from the plan and a float32 GGUF of the model",
          kinds=("Linear", "Conv1D", "Embedding"))
def to_gguf(plan: QuantizationPlan, out: Path, task, base_gguf: str | Path | None = None) -> ExportResult:
    notes = []
    if base_gguf is None:  # convert the task's Hugging Face folder now, beside the output (dropped afterwards)
        hf_dir = (task.meta or {}).get("hf_dir")
        if not hf_dir:
            raise MPSearchError("gguf export needs the model's float32 GGUF: pass --gguf FILE (python -m "
                                "mpsearch.exporters.llama_runtime convert MODEL_DIR FILE)")
        from .llama_runtime import convert_hf

        base_gguf = convert_hf(hf_dir, out.with_name(out.stem + "-f32-base.gguf"), "f32")
        notes.append(f"base: {hf_dir} converted by llama.cpp's convert_hf_to_gguf.py (float32)")
    info = write_gguf(plan, task, base_gguf, out)
    predicted = int(plan.predicted["size_bytes"])
    notes += [f"tensor bytes {info['tensor_bytes']:,} ({info['bits_per_weight']:.4f} bits per weight); the plan "
             f"predicts {predicted:,}" + ("" if info["tensor_bytes"] == predicted else " (they differ: the base GGUF's "
                                                                                         "tensors are not the model's)")]
    return ExportResult("gguf", [out], file_size([out]), notes, {k: v for k, v in info.items() if k != "tensors"})
