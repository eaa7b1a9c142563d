"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize``.

llama-quantize reads the file as whitespace-separated ``regex=type`` tokens, lowercases
the regex, and tries the patterns in order with ``std::regex_search`` (unanchored)
against GGUF tensor names such as ``blk.12.ffn_down.weight``; the first match wins.
We emit one fully anchored, lowercase pattern per planned tensor, so the patterns are
disjoint and order does not matter. GGUF names come from gguf-py's tensor name map,
the same table ``convert_hf_to_gguf.py`` uses.

Use it as::

    llama-quantize --tensor-type-file plan.txt model-f32.gguf model-mixed.gguf Q8_0

The base type (``Q8_0`` above) must be a quantized type, or llama-quantize ignores the
file; tensors the file does not name get the base type's default recipe.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..errors import MPSearchError
from ..plan import QuantizationPlan
from ..core.qconfig import FLOAT16_BITS
from . import ExportResult, file_size, register, runtime_quantizes

# bits -> ggml type; other widths go to the next wider type in this table
GGML_TYPES = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0", 16: "f16"}
UNQUANTIZED_TYPE = "f32"
# block sizes (values per row block) and storage bits per weight, from ggml's type traits
BLOCK = {"q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256,
         "q4_0": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "f16": 1, "f32": 1}
BITS_PER_WEIGHT = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625,
                   "q4_0": 4.5, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "f16": 16.0, "f32": 32.0}
# llama-quantize's tensor_type_fallback() when a row is not a multiple of the type's block
ROW_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# tensors llama-quantize never quantizes, whatever the file says (tensor_allows_quantization)
NEVER_QUANTIZED = ("position_embd.weight", "token_types.weight")

# model name -> gguf MODEL_ARCH member; extend as tasks are added
ARCH_BY_MODEL = {"minilm": "BERT"}
# when the model name is unknown: a layer name matching one of these selects the architecture
ARCH_BY_LAYER = [
    (re.compile(r"(?:^|\.)encoder\.layer\.\d+\.attention\.self\.(?:query|key|value)$"), "BERT"),
    (re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?:q|k|v)_proj$"), "LLAMA"),
]
# prefixes that wrappers put in front of the Hugging Face names (SentenceEncoder.bert, DDP's module.)
WRAPPER_PREFIXES = ("module.", "bert.", "model.", "transformer.")


def ggml_type(bits: int) -> str:
    """The ggml type for a plan's bit-width: the table's, or the next wider one."""
    if bits > FLOAT16_BITS:
        return UNQUANTIZED_TYPE
    return GGML_TYPES[min(b for b in GGML_TYPES if b >= bits)]


def effective_type(gtype: str, ncols: int | None) -> str:
    """What llama-quantize stores for ``gtype`` given the row length (ne[0], the last torch dim)."""
    if not ncols or ncols % BLOCK[gtype] == 0:
        return gtype
    fb = ROW_FALLBACK.get(gtype, "f16")
    return fb if ncols % BLOCK[fb] == 0 else "f16"


def detect_arch(plan: QuantizationPlan) -> str | None:
    name = str(plan.model.get("name", "")).lower()
    if name in ARCH_BY_MODEL:
        return ARCH_BY_MODEL[name]
    for rx, arch in ARCH_BY_LAYER:
        if any(rx.search(n) for n in plan.layers):
            return arch
    return None


def _n_blocks(names) -> int:
    nums = [int(m) for n in names for m in re.findall(r"(?:^|\.)(\d+)(?=\.|$)", n)]
    return max(nums, default=-1) + 1


def name_mapper(arch: str, names):
    """``fn(tensor_name) -> GGUF name or None`` for ``arch``, trying the name and its unwrapped forms."""
    try:
        import gguf
    except ImportError:
        raise MPSearchError("the llama-cpp export needs gguf-py: pip install 'mpsearch[export]' (or pip install gguf)") from None
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), max(_n_blocks(names), 1))

    def gguf_name(tensor: str) -> str | None:
        tries = [tensor]
        for _ in range(3):  # strip up to three wrapper prefixes, e.g. module.bert.
            head = next((p for p in WRAPPER_PREFIXES if tries[-1].startswith(p)), None)
            if head is None:
                break
            tries.append(tries[-1][len(head):])
        for t in tries:
            got = tmap.get_name(t, try_suffixes=(".weight", ".bias"))
            if got is not None:
                return got
        return None

    return gguf_name


def _would_quantize(gguf_name: str) -> bool:
    """Whether llama-quantize would quantize this tensor by default (its name rules; 2-D is assumed)."""
    return (gguf_name.endswith("weight") and "_norm.weight" not in gguf_name
            and gguf_name not in NEVER_QUANTIZED)


def pattern(gguf_name: str) -> str:
    """A fully anchored, lowercase regex matching exactly ``gguf_name``."""
    if gguf_name != gguf_name.lower():
        raise MPSearchError(f"GGUF tensor name {gguf_name!r} has uppercase letters; llama-quantize lowercases patterns")
    return "^" + re.escape(gguf_name) + "$"


def tensor_types(plan: QuantizationPlan) -> list[dict]:
    """One row per planned tensor: layer, GGUF name, bits, ggml type, effective type, pattern."""
    arch = detect_arch(plan)
    names = list(plan.layers) + list(plan.unquantized)
    if arch is None:
        first = next(iter(plan.layers), "(none)")
        raise MPSearchError(
            f"llama-cpp export: model {plan.model.get('name')!r} is not an architecture gguf-py can name "
            f"(known: {', '.join(sorted(ARCH_BY_MODEL))}); first layer that could not be mapped: {first!r}")
    to_gguf = name_mapper(arch, names)
    rows = []
    for layer, entry in plan.layers.items():
        g = to_gguf(f"{layer}.weight")
        if g is None:
            raise MPSearchError(f"llama-cpp export: gguf-py has no {arch.lower()} tensor name for layer {layer!r} "
                                f"(the first layer that could not be mapped)")
        bits = int(entry["bits"])
        gtype = ggml_type(bits)
        shape = entry.get("shape") or []
        ncols = int(shape[-1]) if shape else None
        rows.append({"layer": layer, "gguf": g, "bits": bits, "type": gtype,
                     "effective": effective_type(gtype, ncols), "n_params": int(entry.get("n_params", 0))})
    for tensor in plan.unquantized:
        if not tensor.endswith(".weight"):
            continue
        g = to_gguf(tensor)
        if g is None or not _would_quantize(g):
            continue  # norms, biases and tensors llama-quantize leaves alone need no pattern
        rows.append({"layer": tensor[:-len(".weight")], "gguf": g, "bits": 32, "type": UNQUANTIZED_TYPE,
                     "effective": UNQUANTIZED_TYPE, "n_params": 0})
    seen = Counter(r["gguf"] for r in rows)
    dup = [g for g, c in seen.items() if c > 1]
    if dup:
        raise MPSearchError(f"llama-cpp export: several layers map to the GGUF tensor {dup[0]!r}")
    return rows


@register("llama-cpp", needs_model=False, suffix=".txt",
          description="llama.cpp: --tensor-type-file for llama-quantize (regex=type per tensor)",
          kinds=("Linear", "Conv1D", "Embedding"))
def to_llama_cpp(plan: QuantizationPlan, out: Path, task=None) -> ExportResult:
    requant = runtime_quantizes(plan, "llama-cpp")
    rows = tensor_types(plan)
    out.write_text("".join(f"{pattern(r['gguf'])}={r['type']}\n" for r in rows))
    notes = [f"run: llama-quantize --tensor-type-file {out.name} IN.gguf OUT.gguf Q8_0 "
             "(the base type must be quantized or the file is ignored; unnamed tensors get its default recipe)", *requant]
    odd = sorted({r["bits"] for r in rows if r["bits"] not in GGML_TYPES and r["bits"] <= FLOAT16_BITS})
    if odd:
        notes.append("no ggml type for " + ", ".join(f"{b} bits" for b in odd)
                     + ": written as the next wider type (" + ", ".join(f"{b}->{ggml_type(b)}" for b in odd) + ")")
    fallback = [r for r in rows if r["effective"] != r["type"]]
    if fallback:
        pairs = sorted({f"{r['type']}->{r['effective']}" for r in fallback})
        notes.append(f"{len(fallback)} tensor(s) have rows that are not a multiple of the type's block (256 for k-quants): "
                     f"llama-quantize will store them as {', '.join(pairs)}")
    never = [r["gguf"] for r in rows if r["gguf"] in NEVER_QUANTIZED]
    if never:
        notes.append(f"llama-quantize never quantizes {', '.join(never)}: they keep the converted type (f16/f32)")
    eff_bytes = sum(r["n_params"] * BITS_PER_WEIGHT[r["effective"]] / 8 for r in rows
                    if r["gguf"] not in NEVER_QUANTIZED)
    details = {
        "architecture": detect_arch(plan).lower(),
        "tensors": {r["gguf"]: {"layer": r["layer"], "bits": r["bits"], "type": r["type"], "effective": r["effective"]}
                    for r in rows},
        "types": dict(Counter(r["type"] for r in rows)),
        "estimated_quantized_bytes": int(round(eff_bytes)),
    }
    return ExportResult("llama-cpp", [out], file_size([out]), notes, details)
