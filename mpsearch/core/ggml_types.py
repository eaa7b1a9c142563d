"""llama.cpp's GGML weight types as storage: block sizes, bytes, and the types llama-quantize substitutes.

Plain tables, no NumPy or torch: the size model (``core.sizes``) and the space builder read them,
``mpsearch.quantize.ggml`` computes the bytes they count.
"""
from __future__ import annotations

QK_K = 256

#: ggml's ``enum ggml_type`` values (ggml/include/ggml.h; the same numbers are gguf-py's
#: ``GGMLQuantizationType`` and what a GGUF tensor-info record stores).
GGML_TYPE_ID: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
    "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14,
}
GGML_TYPES: tuple[str, ...] = tuple(GGML_TYPE_ID)

#: Weights per block (``ggml_blck_size``).
BLOCK_SIZE: dict[str, int] = {
    "f32": 1, "f16": 1, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
    "q2_k": QK_K, "q3_k": QK_K, "q4_k": QK_K, "q5_k": QK_K, "q6_k": QK_K,
}

#: Bytes per block (``ggml_type_size``, i.e. ``sizeof(block_xxx)`` in ggml-common.h).
BLOCK_BYTES: dict[str, int] = {
    "f32": 4, "f16": 2,
    "q4_0": 2 + 16,            # d, qs[16]
    "q4_1": 2 + 2 + 16,        # d, m, qs[16]
    "q5_0": 2 + 4 + 16,        # d, qh[4], qs[16]
    "q5_1": 2 + 2 + 4 + 16,    # d, m, qh[4], qs[16]
    "q8_0": 2 + 32,            # d, qs[32]
    "q2_k": 16 + 64 + 2 + 2,   # scales[16], qs[64], d, dmin
    "q3_k": 32 + 64 + 12 + 2,  # hmask[32], qs[64], scales[12], d
    "q4_k": 2 + 2 + 12 + 128,  # d, dmin, scales[12], qs[128]
    "q5_k": 2 + 2 + 12 + 32 + 128,  # d, dmin, scales[12], qh[32], qs[128]
    "q6_k": 128 + 64 + 16 + 2,  # ql[128], qh[64], scales[16], d
}

#: Storage cost in bits per weight, block layout included (q4_0: 18 bytes / 32 weights = 4.5).
BITS_PER_WEIGHT: dict[str, float] = {t: BLOCK_BYTES[t] * 8 / BLOCK_SIZE[t] for t in GGML_TYPES}

# llama-quantize's substitutes for a type whose block does not divide the row length.
_FALLBACK: dict[str, str] = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def normalize_type(gtype: str) -> str:
    """Canonical lower-case name (``"Q4_K"`` -> ``"q4_k"``); ValueError for unsupported types."""
    name = str(gtype).strip().lower()
    if name not in GGML_TYPE_ID:
        raise ValueError(f"unsupported GGML type {gtype!r}; supported: {', '.join(GGML_TYPES)}")
    return name


def tensor_bytes(gtype: str, n_rows: int, n_cols: int) -> int:
    """Size of the tensor's data in a GGUF: ``n_rows * ggml_row_size(type, n_cols)``."""
    t = normalize_type(gtype)
    if n_cols % BLOCK_SIZE[t]:
        raise ValueError(f"{t}: row length {n_cols} is not a multiple of its block size {BLOCK_SIZE[t]}")
    return int(n_rows) * (int(n_cols) // BLOCK_SIZE[t]) * BLOCK_BYTES[t]


def effective_type(gtype: str, n_cols: int) -> str:
    """The type llama-quantize actually writes for a tensor whose rows hold ``n_cols`` weights.

    Ported from ``tensor_type_fallback`` in llama.cpp's src/llama-quant.cpp (the llama.cpp that
    llama-cpp-python 0.3.36 vendors): when ``ne[0] % ggml_blck_size(type) != 0`` it substitutes
    Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0 (IQ types -> IQ4_NL, not
    supported here); a block-32 type keeps itself; and if the result's block still does not
    divide ``ne[0]`` it writes F16. ``ne[0]`` is the last torch dimension (``in_features`` of a
    Linear, the embedding width of an Embedding).
    """
    t = normalize_type(gtype)
    n = int(n_cols)
    if n % BLOCK_SIZE[t] == 0:
        return t
    fb = _FALLBACK.get(t, t)
    return fb if n % BLOCK_SIZE[fb] == 0 else "f16"
