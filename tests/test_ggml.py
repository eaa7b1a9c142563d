"""mpsearch.quantize.ggml is byte-for-byte llama.cpp.

References:
* ggml itself: ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL)`` and
  ``dequantize_row_*`` from the shared library of the prebuilt ``xllamacpp`` wheel (the
  ``llamacpp`` extra), called through ctypes. That is the call llama-quantize makes per tensor.
* gguf-py's NumPy quantizer (``gguf.quants.quantize``) for the legacy types, and its
  ``gguf.quants.dequantize`` for every type.

Data: real weights (MiniLM and the digits CNN, every shape kind: embeddings, square and
rectangular projections, the 1536-wide FFN-down rows K-quants take as they are, conv kernels)
plus random matrices with awkward values.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mpsearch.quantize import ggml

# gguf-py's quantizer warns about the overflowing and subnormal test matrices; ggml is silent
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf")

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


# ---------------------------------------------------------------------------------------------
# ggml through ctypes
# ---------------------------------------------------------------------------------------------

class _Ggml:
    def __init__(self):
        spec = importlib.util.find_spec("xllamacpp")
        assert spec is not None, "xllamacpp is not installed: pip install -e '.[llamacpp]'"
        folder = Path(next(iter(spec.submodule_search_locations)))
        libs = sorted(folder.glob("xllamacpp*.so")) + sorted(folder.glob("xllamacpp*.pyd"))
        assert libs, f"no xllamacpp shared library in {folder}"
        lib = ctypes.CDLL(str(libs[0]))
        # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start,
        #                            int64_t nrows, int64_t n_per_row, const float * imatrix)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_fp16_to_fp32_row.restype = None
        lib.ggml_fp16_to_fp32_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self.lib = lib

    def quantize(self, w: np.ndarray, t: str) -> bytes:
        w = np.ascontiguousarray(w, dtype=np.float32)
        n_rows, n_cols = w.shape
        tid = ggml.GGML_TYPE_ID[t]
        size = self.lib.ggml_row_size(tid, n_cols) * n_rows
        out = np.zeros(size, dtype=np.uint8)
        written = self.lib.ggml_quantize_chunk(tid, w.ctypes.data, out.ctypes.data, 0, n_rows, n_cols, None)
        assert written == size
        return out.tobytes()

    def dequantize(self, data: bytes, t: str, shape) -> np.ndarray:
        buf = np.frombuffer(data, dtype=np.uint8).copy()
        out = np.empty(shape, dtype=np.float32)
        if t == "f32":
            return buf.view(np.float32).reshape(shape).copy()
        if t == "f16":
            fn = self.lib.ggml_fp16_to_fp32_row
        else:  # void dequantize_row_q4_K(const block_q4_K * x, float * y, int64_t k)
            fn = getattr(self.lib, "dequantize_row_" + t.replace("_k", "_K"))
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn(buf.ctypes.data, out.ctypes.data, out.size)
        return out


@pytest.fixture(scope="module")
def ref():
    return _Ggml()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def _awkward() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    shape = (6, 512)
    w = {
        "randn": rng.standard_normal(shape),
        "zero_rows": rng.standard_normal(shape) * (np.arange(6) % 2 == 0)[:, None],  # with -0.0 entries
        "zero_blocks": np.where(np.arange(512) // 32 % 3 == 0, 0.0, rng.standard_normal(shape)),
        "all_zero": np.zeros((2, 512)),
        "huge": rng.standard_normal(shape) * 3e4,
        "fp16_overflow": rng.standard_normal((2, 512)) * 1e6,
        "small": rng.standard_normal(shape) * 1e-6,
        "subnormal": rng.standard_normal((2, 512)) * 1e-40,
        "negative_max": -np.abs(rng.standard_normal(shape)) * 2.0,
        "positive_offset": np.abs(rng.standard_normal(shape)) + 5.0,
        "constant": np.full((2, 512), -0.37),
        "mixed_scale": rng.standard_normal(shape) * 10.0 ** rng.integers(-5, 4, shape),
        "halfway": np.round(rng.standard_normal(shape) * 16) / 32,  # exact ties for the roundings
        "sparse": rng.standard_normal(shape) * (rng.random(shape) < 0.05),
        "ternary": rng.choice([-1.0, 0.0, 1.0], shape),
        "cauchy": rng.standard_cauchy(shape),
    }
    return {k: v.astype(np.float32) for k, v in w.items()}


@pytest.fixture(scope="module")
def real_weights(minilm_task, digits_task):
    """Real tensors, one of every shape kind, trimmed to keep the file fast."""
    mp = dict(minilm_task.model.named_parameters())
    dp = dict(digits_task.model.named_parameters())

    def get(params, name, rows=None):
        w = params[name].detach().float().numpy()
        return np.ascontiguousarray(w[:rows] if rows else w)

    return {
        "minilm.word_embeddings[:1024]": get(mp, "bert.embeddings.word_embeddings.weight", 1024),
        "minilm.position_embeddings": get(mp, "bert.embeddings.position_embeddings.weight"),
        "minilm.token_type_embeddings": get(mp, "bert.embeddings.token_type_embeddings.weight"),
        "minilm.L0.query": get(mp, "bert.encoder.layer.0.attention.self.query.weight"),
        "minilm.L3.value": get(mp, "bert.encoder.layer.3.attention.self.value.weight"),
        "minilm.L5.attn_out": get(mp, "bert.encoder.layer.5.attention.output.dense.weight"),
        "minilm.L1.ffn_up": get(mp, "bert.encoder.layer.1.intermediate.dense.weight"),
        "minilm.L2.ffn_down": get(mp, "bert.encoder.layer.2.output.dense.weight"),  # (384, 1536)
        "digits.conv2": get(dp, "features.2.weight"),  # (32, 16, 3, 3)
        "digits.fc1": get(dp, "classifier.1.weight"),  # (128, 128)
        "digits.fc2": get(dp, "classifier.3.weight"),  # (64, 128)
        "digits.fc3": get(dp, "classifier.5.weight"),  # (10, 64)
    }


def _as_rows(w: np.ndarray, block: int) -> np.ndarray | None:
    """The tensor as llama.cpp rows when its last dimension fits the block, else its values re-cut
    into rows of 256 (still real data); None when that is impossible too."""
    w2 = w.reshape(-1, w.shape[-1])
    if w2.shape[1] % block == 0:
        return w2
    if w.size % 256 == 0:
        return w.reshape(-1, 256)
    return None


def _cases(real: dict, block: int):
    for name, w in {**real, **_awkward()}.items():
        rows = _as_rows(w, block)
        if rows is not None:
            yield name, rows


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# byte exactness
# ---------------------------------------------------------------------------------------------

def _same_up_to_zero_sign(a: bytes, b: bytes) -> bool:
    """Equal, or differing only in fp16 fields that are +0.0 (0x0000) in one and -0.0 (0x8000) in
    the other: gguf-py finds a block's max/min with NumPy, which does not keep ggml's choice
    between -0.0 and +0.0 (an all-zero block whose first entry is -0.0 gets d = -0.0 in ggml)."""
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    if x.shape != y.shape:
        return False
    diff = np.nonzero(x != y)[0]
    return bool(np.all(np.isin(x[diff], (0x00, 0x80)) & np.isin(y[diff], (0x00, 0x80)) & (x[diff - 1] == 0)))


@pytest.mark.minilm
@pytest.mark.parametrize("gtype", LEGACY)
def test_legacy_types_match_gguf_py_and_ggml(gtype, real_weights, ref):
    qtype = gguf.GGMLQuantizationType[gtype.upper()]
    n = 0
    for name, w in _cases(real_weights, 32):
        mine = ggml.quantize_rows(w, gtype)
        theirs = gguf.quants.quantize(w, qtype).tobytes()
        if name in real_weights:
            assert mine == theirs, f"{gtype} {name}: differs from gguf-py"
        else:
            assert _same_up_to_zero_sign(mine, theirs), f"{gtype} {name}: differs from gguf-py"
        assert mine == ref.quantize(w, gtype), f"{gtype} {name}: differs from ggml_quantize_chunk"
        deq = ggml.dequantize_rows(mine, gtype, w.shape)
        assert _same_floats(deq, ref.dequantize(mine, gtype, w.shape)), f"{gtype} {name}: dequantize_row differs"
        n += 1
    assert n >= 25


@pytest.mark.minilm
@pytest.mark.parametrize("gtype", KQUANTS)
def test_k_quants_match_ggml_quantize_chunk(gtype, real_weights, ref):
    qtype = gguf.GGMLQuantizationType[gtype.upper()]
    n = 0
    for name, w in _cases(real_weights, 256):
        mine = ggml.quantize_rows(w, gtype)
        theirs = ref.quantize(w, gtype)
        if mine != theirs:
            a, b = np.frombuffer(mine, np.uint8), np.frombuffer(theirs, np.uint8)
            pytest.fail(f"{gtype} {name} {w.shape}: {int((a != b).sum())} of {a.size} bytes differ from ggml")
        deq = ggml.dequantize_rows(mine, gtype, w.shape)
        assert _same_floats(deq, ref.dequantize(mine, gtype, w.shape)), f"{gtype} {name}: dequantize_row differs"
        assert _same_floats(deq, gguf.quants.dequantize(np.frombuffer(mine, np.uint8).reshape(w.shape[0], -1),
                                                        qtype).astype(np.float32))
        n += 1
    assert n >= 25


@pytest.mark.parametrize("gtype", ["f32", "f16"])
def test_float_types_match_ggml(gtype, ref):
    for name, w in _awkward().items():
        mine = ggml.quantize_rows(w, gtype)
        assert mine == ref.quantize(w, gtype), name
        assert _same_floats(ggml.dequantize_rows(mine, gtype, w.shape), ref.dequantize(mine, gtype, w.shape)), name
    w = np.array([[1.0, 65519.0, 65520.0, 1e-8, -2.0 ** -25, 2.0 ** -25 + 2.0 ** -40, np.inf, np.nan]], np.float32)
    assert ggml.quantize_rows(w, "f16") == ref.quantize(w, "f16")


def test_quantize_dequantize_is_what_ggml_computes_with(ref):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 512)).astype(np.float32)
    for gtype in ggml.GGML_TYPES:
        out = ggml.quantize_dequantize(w, gtype)
        assert out.dtype == np.float32 and out.shape == w.shape
        assert _same_floats(out, ref.dequantize(ref.quantize(w, gtype), gtype, w.shape)), gtype
    # torch tensors and 1-D rows are accepted
    t = torch.from_numpy(w[0])
    assert _same_floats(ggml.quantize_dequantize(t, "Q4_K"), ggml.quantize_dequantize(w[:1], "q4_k")[0])


def test_error_shrinks_with_bits():
    w = np.random.default_rng(3).standard_normal((16, 1024)).astype(np.float32)
    err = {t: float(np.mean((ggml.quantize_dequantize(w, t) - w) ** 2)) for t in ggml.GGML_TYPES}
    for lo, hi in [("q2_k", "q3_k"), ("q3_k", "q4_k"), ("q4_k", "q5_k"), ("q5_k", "q6_k"), ("q6_k", "q8_0"),
                   ("q4_0", "q5_0"), ("q4_1", "q5_1"), ("q5_0", "q8_0"), ("q8_0", "f16")]:
        assert err[hi] < err[lo], (lo, hi, err)
    assert err["f32"] == 0.0


# ---------------------------------------------------------------------------------------------
# sizes and the shape fallback
# ---------------------------------------------------------------------------------------------

def test_tensor_bytes_and_bits_per_weight(ref):
    expected_bpw = {"f32": 32.0, "f16": 16.0, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5,
                    "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
    assert ggml.BITS_PER_WEIGHT == expected_bpw
    rng = np.random.default_rng(0)
    for gtype in ggml.GGML_TYPES:
        tid = ggml.GGML_TYPE_ID[gtype]
        assert ref.lib.ggml_type_name(tid).decode().lower() == gtype
        assert ref.lib.ggml_blck_size(tid) == ggml.BLOCK_SIZE[gtype]
        assert ref.lib.ggml_type_size(tid) == ggml.BLOCK_BYTES[gtype]
        for n_rows, n_cols in [(1, 256), (3, 512), (384, 1536), (7, 768)]:
            size = ggml.tensor_bytes(gtype, n_rows, n_cols)
            assert size == ref.lib.ggml_row_size(tid, n_cols) * n_rows
            assert size * 8 == ggml.BITS_PER_WEIGHT[gtype] * n_rows * n_cols
            if n_rows * n_cols <= 4096:
                w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
                assert len(ggml.quantize_rows(w, gtype)) == size
    assert ggml.tensor_bytes("q4_0", 1, 32) == 18
    with pytest.raises(ValueError):
        ggml.tensor_bytes("q4_k", 4, 384)


def test_effective_type_follows_llama_quantize():
    # MiniLM: 384-wide rows (every projection, the embeddings) and 1536-wide rows (FFN down)
    fb = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
    for t in KQUANTS:
        assert ggml.effective_type(t, 384) == fb[t]
        assert ggml.effective_type(t, 1536) == t
        assert ggml.effective_type(t, 256) == t
        assert ggml.effective_type(t, 512) == t
        assert ggml.effective_type(t.upper(), 48) == "f16"  # 48 % 32 != 0: F16, "unusual shape"
        assert ggml.effective_type(t, 3) == "f16"  # a 3x3 conv kernel's rows
    for t in LEGACY + ["f16", "f32"]:
        for n in (384, 1536, 256, 512):
            assert ggml.effective_type(t, n) == t
    for t in LEGACY:  # a block-32 type keeps itself, then "must use F16 due to unusual shape"
        assert ggml.effective_type(t, 48) == "f16"
    assert ggml.effective_type("f16", 3) == "f16"


def test_bad_inputs():
    w = np.zeros((2, 384), np.float32)
    with pytest.raises(ValueError, match="block size"):
        ggml.quantize_rows(w, "q4_k")
    with pytest.raises(ValueError, match="unsupported"):
        ggml.quantize_rows(w, "iq4_nl")
    with pytest.raises(ValueError, match="bytes"):
        ggml.dequantize_rows(b"\0" * 10, "q4_0", (2, 384))
    with pytest.raises(ValueError):
        ggml.quantize_rows(np.zeros((2, 2, 32), np.float32), "q4_0")
