"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize``.

What llama-quantize (the llama.cpp that llama-cpp-python 0.3.36 vendors) does with the file:

* it reads whitespace-separated ``regex=type`` tokens, lowercases each regex, and stops on any
  token without ``=`` (a ``#`` comment line is "malformed");
* for each tensor it tries the patterns in order with ``std::regex_search`` (unanchored): the first
  match wins;
* only tensors it would quantize anyway are touched: 2-D (or 3-D) weights whose name ends in
  ``weight``, not norms, not ``position_embd``/``token_types``;
* rules apply only when the base type on its command line is a quantized type (with F16 or F32
  every rule is ignored);
* a type whose block does not divide a tensor's rows is replaced (``tensor_type_fallback``: Q4_K ->
  Q5_0 on MiniLM's 384-wide rows).

So the file holds one fully anchored pattern per tensor (they cannot shadow each other), rules only
for tensors llama-quantize touches, types that do not fall back for that tensor, and no comments;
the note gives a quantized base type. For a plan of GGML types (``quantizer: {format: ggml}``) the
rules are the plan's types, and llama-quantize writes the same tensors, byte for byte, as the
``gguf`` exporter. For a plan of integer grids each width goes to the smallest type that holds it
and fits the rows; llama.cpp then computes its own integers, not the plan's.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..core.ggml_types import BITS_PER_WEIGHT, BLOCK_SIZE, effective_type, tensor_bytes
from ..core.qconfig import FLOAT16_BITS, GGML_BITS
from ..errors import MPSearchError
from ..plan import QuantizationPlan
from . import ExportResult, file_size, register, runtime_quantizes

UNQUANTIZED_TYPE = "f32"
# integer plans: the types a width may go to, cheapest first (equal bits per weight: the K-quant)
_BY_COST = sorted(GGML_BITS, key=lambda t: (BITS_PER_WEIGHT[t], not t.endswith("_k"), t))
# tensors llama-quantize never quantizes, whatever the file says (tensor_allows_quantization)
NEVER_QUANTIZED = ("position_embd.weight", "token_types.weight")
# llama-quantize's ftype argument for a file that is mostly of one type (a quantized base type)
BASE_TYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
             "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K"}

# model name -> gguf MODEL_ARCH member; extend as tasks are added
ARCH_BY_MODEL = {"minilm": "BERT"}
# when the model name is unknown: a layer name matching one of these selects the architecture
ARCH_BY_LAYER = [
    (re.compile(r"(?:^|\.)encoder\.layer\.\d+\.attention\.self\.(?:query|key|value)$"), "BERT"),
    (re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?:q|k|v)_proj$"), "LLAMA"),
]
# prefixes that wrappers put in front of the Hugging Face names (SentenceEncoder.bert, DDP's module.)
WRAPPER_PREFIXES = ("module.", "bert.", "model.", "transformer.")


def ggml_type(bits: int, ncols: int | None = None) -> str:
    """For an integer plan's bit-width: the cheapest GGML type of at least that many bits whose block divides
    the rows (``ncols``; None: any); f16 above 8 bits, f32 above 16."""
    if bits > FLOAT16_BITS:
        return UNQUANTIZED_TYPE
    for t in _BY_COST:
        if GGML_BITS[t] >= bits and (not ncols or ncols % BLOCK_SIZE[t] == 0):
            return t
    return "f16"


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
    """One row per tensor llama-quantize will be told about: layer, GGUF name, bits, ggml type, its bytes.
    A plan's layer that llama-quantize never quantizes gets no row."""
    return _rows(plan)[0]


def _rows(plan: QuantizationPlan) -> tuple[list[dict], list[str]]:
    arch = detect_arch(plan)
    names = list(plan.layers) + list(plan.unquantized)
    if arch is None:
        first = next(iter(plan.layers), "(none)")
        raise MPSearchError(
            f"llama-cpp export: model {plan.model.get('name')!r} is not an architecture gguf-py can name "
            f"(known: {', '.join(sorted(ARCH_BY_MODEL))}); first layer that could not be mapped: {first!r}")
    to_gguf = name_mapper(arch, names)
    ggml = plan.quantizer.get("format") == "ggml"
    rows, skipped = [], []
    for layer, entry in plan.layers.items():
        g = to_gguf(plan.layer_spec(layer).weight_name)
        if g is None:
            raise MPSearchError(f"llama-cpp export: gguf-py has no {arch.lower()} tensor name for layer {layer!r} "
                                f"(the first layer that could not be mapped)")
        x = plan.setting(layer)
        if not _would_quantize(g):
            if ggml and x.quantized:
                raise MPSearchError(f"llama-cpp export: llama.cpp keeps {g} in float; the plan quantizes it (layer "
                                    f"{layer!r}): exclude it from the space, as search_spaces/minilm_ggml.yaml does")
            skipped.append(g)
            continue
        shape = plan.layer_spec(layer).rows_shape
        ncols = shape[-1] if len(shape) == 2 else None
        gtype = x.method if x.ggml else ("f16" if x.bits == FLOAT16_BITS else ggml_type(x.bits, ncols))
        if ggml and ncols is not None and effective_type(gtype, ncols) != gtype:
            raise MPSearchError(f"llama-cpp export: layer {layer!r} is {gtype}, which llama-quantize would store as "
                                f"{effective_type(gtype, ncols)} (rows of {ncols})")
        rows.append({"layer": layer, "gguf": g, "bits": int(entry["bits"]), "type": gtype,
                     "n_params": int(entry.get("n_params", 0)),
                     "bytes": tensor_bytes(gtype, shape[0], ncols) if ncols else None})
    # weights the plan leaves in float32: every unquantized ".weight" and every quantizable layer it left in float
    loose = dict.fromkeys([t for t in plan.unquantized if t.endswith(".weight")]
                          + [f"{n}.weight" for n in (plan.float_layers or [])])
    for tensor in loose:
        g = to_gguf(tensor)
        if g is None or not _would_quantize(g) or tensor[:-len(".weight")] in plan.layers:
            continue  # norms, biases and tensors llama-quantize leaves alone need no pattern
        rows.append({"layer": tensor[:-len(".weight")], "gguf": g, "bits": 32, "type": UNQUANTIZED_TYPE,
                     "n_params": 0, "bytes": None})
    seen = Counter(r["gguf"] for r in rows)
    dup = [g for g, c in seen.items() if c > 1]
    if dup:
        raise MPSearchError(f"llama-cpp export: several layers map to the GGUF tensor {dup[0]!r}")
    return rows, skipped


@register("llama-cpp", needs_model=False, suffix=".txt", formats=("integer", "ggml"),
          description="llama.cpp: --tensor-type-file for llama-quantize (one anchored regex=type per tensor)",
          kinds=("Linear", "Conv1D", "Embedding"))
def to_llama_cpp(plan: QuantizationPlan, out: Path, task=None) -> ExportResult:
    ggml = plan.quantizer.get("format") == "ggml"
    requant = [] if ggml else runtime_quantizes(plan, "llama-cpp")
    rows, skipped = _rows(plan)
    out.write_text("".join(f"{pattern(r['gguf'])}={r['type']}\n" for r in rows))
    counts = Counter(r["type"] for r in rows if r["type"] in BASE_TYPE)
    base = BASE_TYPE[max(counts, key=lambda t: (counts[t], t))] if counts else "Q8_0"
    notes = [f"run: llama-quantize --tensor-type-file {out.name} MODEL-F32.gguf OUT.gguf {base} (the base type must be "
             "quantized, or llama-quantize ignores the file)"]
    if ggml:
        notes.append("the types are the plan's GGML types; llama-quantize computes the same blocks the search scored "
                     "(export --format gguf writes that file directly)")
    else:
        notes += requant
        notes.append("integer grids have no GGML equivalent: each width goes to the cheapest GGML type that holds it "
                     "and fits the tensor's rows, quantized by llama.cpp's own arithmetic; for an exact match search "
                     "with quantizer: {format: ggml} and export --format gguf")
        wider = sorted({(r["bits"], r["type"]) for r in rows if r["bits"] < FLOAT16_BITS and GGML_BITS.get(r["type"]) != r["bits"]})
        if wider:
            notes.append("stored wider than planned: " + ", ".join(f"{b} bits -> {t}" for b, t in wider))
    if skipped:
        notes.append(f"llama-quantize never quantizes {', '.join(skipped)}: no rule is written, they keep the "
                     "converted type")
    details = {
        "architecture": detect_arch(plan).lower(),
        "base_type": base,
        "tensors": {r["gguf"]: {"layer": r["layer"], "bits": r["bits"], "type": r["type"]} for r in rows},
        "types": dict(Counter(r["type"] for r in rows)),
        "quantized_bytes": sum(r["bytes"] for r in rows if r["bytes"] is not None),
    }
    return ExportResult("llama-cpp", [out], file_size([out]), notes, details)
