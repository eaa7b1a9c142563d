"""Bit-exact NumPy ports of llama.cpp's GGML weight formats (what a GGUF file stores).

Types: ``f32``, ``f16``, the legacy block-32 types ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``,
``q8_0`` and the K-quants ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k`` (super-blocks of 256).

What is reproduced is ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL)``,
the call llama-quantize makes for each tensor when it runs without ``--imatrix``. With no
importance matrix ggml's ``quantize_qX_K`` hands the whole tensor to ``quantize_row_qX_K_ref``
and ``quantize_qX_Y`` to ``quantize_row_qX_Y_ref`` (ggml/src/ggml-quants.c), so those reference
routines are what is ported here, operation by operation (read in ggml-org/llama.cpp,
ggml/src/ggml-quants.c at commit 01243c58, the generation xllamacpp 2026.10.11549 ships):

* every intermediate is float32 and every expression keeps C's evaluation order
  (``w*x*l`` is ``(w*x)*l``); sums that C accumulates one element at a time are accumulated
  one element at a time here too (``_seq_sum``), never with NumPy's pairwise ``sum``;
* ``nearest_int`` is the same bit trick (add 1.5*2**23, read the mantissa bits), which rounds
  half to even and reproduces its output even outside its asserted range;
* C's float-to-int casts (``(int8_t)(x + 8.5f)``) truncate as x86's ``cvttss2si`` does, and
  narrowing stores (``uint8_t``/``int8_t``) wrap modulo 256;
* ``GGML_FP32_TO_FP16`` is IEEE round-to-nearest-even (NaN becomes sign|0x7E00), and the
  quantizers re-read the rounded half where ggml does (``GGML_FP16_TO_FP32(y[i].d)``);
* ``roundf`` (q8_0) rounds half away from zero.

No FMA contraction: the reference routines in the prebuilt library (xllamacpp, which is what
the tests compare against) contain no ``vfmadd`` instruction, so every product and sum is
rounded separately, as NumPy does.

Everything is vectorised over blocks: the Python loops run over the 16/32 positions of a
(sub-)block, over the fixed trial scales ggml tries, and over chunks of ~128k weights (so the
working vectors stay in cache), never over single blocks.

Tensor layout: a torch weight of shape ``(out, in)`` is a ggml tensor with ``ne[0] = in``; each
row of ``in`` values is cut into blocks, so ``in`` (the last torch dimension, ``n_cols`` here)
must be a multiple of the block size. ``effective_type`` gives the type llama-quantize
substitutes when it is not.
"""
from __future__ import annotations

import numpy as np

from ..core.ggml_types import (  # noqa: F401  (re-exported: the public names of this module)
    BITS_PER_WEIGHT, BLOCK_BYTES, BLOCK_SIZE, GGML_TYPE_ID, GGML_TYPES, effective_type,
    normalize_type, tensor_bytes,
)

__all__ = [
    "BITS_PER_WEIGHT",
    "BLOCK_BYTES",
    "BLOCK_SIZE",
    "GGML_TYPE_ID",
    "GGML_TYPES",
    "dequantize_rows",
    "effective_type",
    "normalize_type",
    "quantize_dequantize",
    "quantize_rows",
    "tensor_bytes",
]

_F32 = np.float32

_GROUP_MAX_EPS = _F32(1e-15)

# rows of blocks handled per NumPy pass: big enough to amortise the per-call overhead, small
# enough for the per-position vectors to stay in cache
_CHUNK_ELEMS = 1 << 17


# ---------------------------------------------------------------------------------------------
# scalar helpers, elementwise over arrays
# ---------------------------------------------------------------------------------------------

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: ``fval + 12582912.f`` then the low 23 bits, minus 0x400000."""
    val = np.asarray(v, dtype=_F32) + _F32(12582912.0)
    return (val.view(np.int32) & 0x007FFFFF) - 0x00400000


def _trunc_i32(v: np.ndarray) -> np.ndarray:
    """C's float -> int conversion as x86 ``cvttss2si`` does it (INT_MIN when out of range/NaN)."""
    t = np.trunc(v)
    ok = np.abs(t) < _F32(2147483648.0)  # False for NaN too
    return np.where(ok, np.where(ok, t, 0).astype(np.int64), -2147483648)


def _i8(v: np.ndarray) -> np.ndarray:
    """Store into ``int8_t`` (wraps modulo 256)."""
    return (np.asarray(v).astype(np.int64) & 0xFF).astype(np.uint8).view(np.int8).astype(np.int32)


def _u8(v: np.ndarray) -> np.ndarray:
    """Store into ``uint8_t`` (wraps modulo 256)."""
    return (np.asarray(v).astype(np.int64) & 0xFF).astype(np.int32)


def _fp16_bits(v: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16``: round to nearest even, overflow to inf, NaN -> sign|0x7E00."""
    v = np.asarray(v, dtype=_F32)
    h = v.astype(np.float16).view(np.uint16)
    nan = np.isnan(v)
    if nan.any():
        sign = (v.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
        h = np.where(nan, sign | np.uint16(0x7E00), h)
    return h


def _fp16_to_f32(h: np.ndarray) -> np.ndarray:
    return np.asarray(h, dtype=np.uint16).view(np.float16).astype(_F32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """``float s = 0; for (i...) s += terms[i];`` over axis 0, in float32, in order."""
    s = np.zeros(terms.shape[1:], dtype=_F32)
    for t in terms:
        np.add(s, t, out=s)
    return s


def _first_absmax(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` from amax = max = 0 (axis 0)."""
    amax = np.zeros(xt.shape[1:], dtype=_F32)
    mx = np.zeros(xt.shape[1:], dtype=_F32)
    for v in xt:
        a = np.abs(v)
        upd = amax < a
        amax = np.where(upd, a, amax)
        mx = np.where(upd, v, mx)
    return amax, mx


def _running_max_pos(vals: np.ndarray) -> np.ndarray:
    """``float m = 0; for (...) if (v > m) m = v;`` over axis 0."""
    m = np.zeros(vals.shape[1:], dtype=_F32)
    for v in vals:
        m = np.where(v > m, v, m)
    return m


def _le_bytes(*fields: np.ndarray) -> np.ndarray:
    """Concatenate per-block fields (each (nb, k) uint8) into (nb, sum k) block records."""
    return np.concatenate([np.ascontiguousarray(f, dtype=np.uint8) for f in fields], axis=1)


def _h16_bytes(h: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(h.astype("<u2")).view(np.uint8).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# legacy block-32 types: quantize_row_q{4_0,4_1,5_0,5_1,8_0}_ref
# ---------------------------------------------------------------------------------------------

def _q_legacy(x: np.ndarray, t: str) -> np.ndarray:
    """x: (nb, 32) float32 -> (nb, BLOCK_BYTES[t]) uint8."""
    xt = np.ascontiguousarray(x.T)  # (32, nb): xt[j] is position j of every block
    if t in ("q4_0", "q5_0"):
        _, mx = _first_absmax(xt)
        d = mx / _F32(-8.0 if t == "q4_0" else -16.0)
        id_ = np.where(d != 0, _F32(1.0) / d, _F32(0.0)).astype(_F32)
        dh = _fp16_bits(d)
        v = xt * id_ + _F32(8.5 if t == "q4_0" else 16.5)
        xi = _u8(np.minimum(15 if t == "q4_0" else 31, _i8(_trunc_i32(v))))
        if t == "q4_0":  # qs[j] = xi0; qs[j] |= xi1 << 4 (no nibble mask in ggml)
            return _le_bytes(_h16_bytes(dh), _u8(xi[:16] | (xi[16:] << 4)).T)
        qs = ((xi[:16] & 0x0F) | ((xi[16:] & 0x0F) << 4)).T
        qh = np.zeros(x.shape[0], dtype=np.uint32)
        for j in range(32):
            qh |= ((xi[j].astype(np.uint32) & 0x10) >> 4) << j
        return _le_bytes(_h16_bytes(dh), qh.astype("<u4").view(np.uint8).reshape(-1, 4), qs)
    if t in ("q4_1", "q5_1"):
        mn = np.full(x.shape[0], np.finfo(_F32).max, dtype=_F32)
        mx = np.full(x.shape[0], -np.finfo(_F32).max, dtype=_F32)
        for v in xt:
            mn = np.where(v < mn, v, mn)
            mx = np.where(v > mx, v, mx)
        d = (mx - mn) / _F32(15.0 if t == "q4_1" else 31.0)
        id_ = np.where(d != 0, _F32(1.0) / d, _F32(0.0)).astype(_F32)
        v = (xt - mn) * id_ + _F32(0.5)
        if t == "q4_1":
            xi = _u8(np.minimum(15, _i8(_trunc_i32(v))))
            qs = _u8(xi[:16] | (xi[16:] << 4)).T  # unmasked, as in ggml
        else:
            xi = _u8(_trunc_i32(v))
            qs = ((xi[:16] & 0x0F) | ((xi[16:] & 0x0F) << 4)).T
        head = [_h16_bytes(_fp16_bits(d)), _h16_bytes(_fp16_bits(mn))]
        if t == "q4_1":
            return _le_bytes(*head, qs)
        qh = np.zeros(x.shape[0], dtype=np.uint32)
        for j in range(32):
            qh |= ((xi[j].astype(np.uint32) & 0x10) >> 4) << j
        return _le_bytes(*head, qh.astype("<u4").view(np.uint8).reshape(-1, 4), qs)
    if t == "q8_0":
        amax = np.zeros(x.shape[0], dtype=_F32)
        for v in xt:
            a = np.abs(v)
            amax = np.where(amax > a, amax, a)  # MAX(amax, fabsf(v))
        d = amax / _F32(127.0)
        id_ = np.where(d != 0, _F32(1.0) / d, _F32(0.0)).astype(_F32)
        v = xt * id_
        r = np.trunc(v)  # roundf: half away from zero
        r = np.where(np.abs(v - r) >= _F32(0.5), r + np.sign(v), r).astype(_F32)
        qs = _u8(_trunc_i32(r)).T
        return _le_bytes(_h16_bytes(_fp16_bits(d)), qs)
    raise AssertionError(t)


def _dq_legacy(b: np.ndarray, t: str) -> np.ndarray:
    """b: (nb, BLOCK_BYTES[t]) uint8 -> (nb, 32) float32, as dequantize_row_* computes it."""
    d = _fp16_to_f32(b[:, 0:2].copy().view("<u2")[:, 0])[:, None]
    if t == "q8_0":
        q = b[:, 2:34].view(np.int8).astype(_F32)
        return q * d
    if t in ("q4_1", "q5_1"):
        m = _fp16_to_f32(b[:, 2:4].copy().view("<u2")[:, 0])[:, None]
        off = 4
    else:
        off = 2
    if t in ("q5_0", "q5_1"):
        qh = b[:, off:off + 4].copy().view("<u4")[:, 0].astype(np.int64)
        off += 4
        bits = ((qh[:, None] >> np.arange(32)) & 1) << 4
    else:
        bits = 0
    qs = b[:, off:off + 16].astype(np.int64)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | bits
    if t in ("q4_0", "q5_0"):
        return (q - (8 if t == "q4_0" else 16)).astype(_F32) * d
    return q.astype(_F32) * d + m


# ---------------------------------------------------------------------------------------------
# K-quant helpers: make_qkx2_quants, make_q3_quants, make_qx_quants (rmse_type 1, no weights)
# ---------------------------------------------------------------------------------------------

def _make_qkx2_quants(xt, wt, nmax, rmin, rdelta, nstep, use_mad):
    """Vectorised ``make_qkx2_quants`` over sub-blocks. xt, wt: (n, m) float32 (position, sub-block).

    Returns (L (n, m) int32, scale (m,), the_min (m,))."""
    n = xt.shape[0]
    mn = xt[0].copy()
    mx = xt[0].copy()
    sum_w = wt[0].copy()
    sum_x = sum_w * xt[0]
    for i in range(1, n):
        mn = np.where(xt[i] < mn, xt[i], mn)
        mx = np.where(xt[i] > mx, xt[i], mx)
        np.add(sum_w, wt[i], out=sum_w)
        np.add(sum_x, wt[i] * xt[i], out=sum_x)
    mn = np.where(mn > 0, _F32(0.0), mn).astype(_F32)
    flat = mx == mn
    flat_min = mn.copy()
    iscale = _F32(nmax) / (mx - mn)
    scale = _F32(1.0) / iscale
    L = np.clip(_nearest_int(iscale * (xt - mn)), 0, nmax)
    diff = (scale * L.astype(_F32) + mn) - xt
    diff = np.abs(diff) if use_mad else diff * diff
    best_error = _seq_sum(wt * diff)
    for step in range(nstep + 1):
        iscale = ((_F32(rmin) + _F32(rdelta) * _F32(step)) + _F32(nmax)) / (mx - mn)
        laux = np.clip(_nearest_int(iscale * (xt - mn)), 0, nmax)
        lf = laux.astype(_F32)
        wl = wt * lf
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * lf)
        sum_xl = _seq_sum(wl * xt)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, _F32(0.0), this_min).astype(_F32)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(_F32)
        diff = (this_scale * lf + this_min) - xt
        diff = np.abs(diff) if use_mad else diff * diff
        cur_error = _seq_sum(wt * diff)
        upd = (D > 0) & (cur_error < best_error)
        L = np.where(upd, laux, L)
        best_error = np.where(upd, cur_error, best_error)
        scale = np.where(upd, this_scale, scale)
        mn = np.where(upd, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, _F32(0.0), scale).astype(_F32)
    the_min = -np.where(flat, flat_min, mn).astype(_F32)
    return L, scale, the_min


def _make_q3_quants(xt, nmax=4):
    """Vectorised ``make_q3_quants(n, nmax, x, L, do_rmse=true)``. xt: (n, m). Returns (L + nmax, scale)."""
    n = xt.shape[0]
    amax, mx = _first_absmax(xt)
    zero = amax < _GROUP_MAX_EPS
    iscale = _F32(-nmax) / mx
    L = np.clip(_nearest_int(iscale * xt), -nmax, nmax - 1)
    w = xt * xt
    wx = w * xt
    lf = L.astype(_F32)
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum((w * lf) * lf)
    L = [L[i].copy() for i in range(n)]
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            li = L[i].astype(_F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = np.clip(_nearest_int((xt[i] * sl2) / slx), -nmax, nmax - 1)
            cand = (slx > 0) & (new_l != L[i])
            nf = new_l.astype(_F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + (w[i] * nf) * nf
            acc = cand & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            if acc.any():
                L[i] = np.where(acc, new_l, L[i])
                sumlx = np.where(acc, slx, sumlx)
                suml2 = np.where(acc, sl2, suml2)
                n_changed += 1
        # a pass without any change leaves the state unchanged, so every later pass would too:
        # stopping for all blocks at once is the same as C's per-block break
        if not n_changed:
            break
    L = np.stack(L) + nmax
    scale = np.where(suml2 > 0, sumlx / suml2, _F32(0.0)).astype(_F32)
    L = np.where(zero, 0, L)
    scale = np.where(zero, _F32(0.0), scale).astype(_F32)
    return L, scale


def _make_qx_quants_rmse1(xt, nmax):
    """Vectorised ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)``. Returns (L, scale)."""
    amax, mx = _first_absmax(xt)
    zero = amax < _GROUP_MAX_EPS
    w = xt * xt
    wx = w * xt

    def trial(iscale):
        l = np.clip(_nearest_int(iscale * xt), -nmax, nmax - 1)
        lf = l.astype(_F32)
        return l, _seq_sum(wx * lf), _seq_sum((w * lf) * lf)

    l, sumlx, suml2 = trial(_F32(-nmax) / mx)
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0.0)).astype(_F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F32(nmax) + _F32(0.1) * _F32(step)) / mx
        l, sumlx, suml2 = trial(iscale)
        upd = (suml2 > 0) & ((sumlx * sumlx) > (best * suml2))
        L = np.where(upd, l + nmax, L)
        scale = np.where(upd, sumlx / suml2, scale).astype(_F32)
        best = np.where(upd, scale * sumlx, best).astype(_F32)
    L = np.where(zero, 0, L)
    scale = np.where(zero, _F32(0.0), scale).astype(_F32)
    return L, scale


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scales/mins of q4_K/q5_K. ls, lm: (nb, 8) ints in 0..63."""
    sc = np.zeros((ls.shape[0], 12), dtype=np.int64)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return (sc & 0xFF).astype(np.uint8)


def _unpack_scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7. sc: (nb, 12) uint8 -> (nb, 8) scales, (nb, 8) mins."""
    q = sc.astype(np.int64)
    d = np.empty((q.shape[0], 8), dtype=np.int64)
    m = np.empty((q.shape[0], 8), dtype=np.int64)
    d[:, 0:4] = q[:, 0:4] & 63
    m[:, 0:4] = q[:, 4:8] & 63
    d[:, 4:8] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return d, m


def _requant(x, L, d, dm, lo, hi):
    """``if (!d) continue; l = nearest_int((x + dm)/d)`` (dm None: ``x/d``), clamped; keeps L where d == 0.

    x, L: (nb, nsub, k); d, dm: (nb, nsub)."""
    num = x if dm is None else x + dm[..., None]
    l = np.clip(_nearest_int(num / d[..., None]), lo, hi)
    return np.where((d != 0)[..., None], l, L)


# ---------------------------------------------------------------------------------------------
# K-quants: quantize_row_q{2,3,4,5,6}_K_ref
# ---------------------------------------------------------------------------------------------

def _q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb * 16, 16)
    xt = np.ascontiguousarray(xs.T)
    L, scales, mins = _make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    L = L.T.reshape(nb, 16, 16)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    max_scale = _running_max_pos(scales.T)
    max_min = _running_max_pos(mins.T)
    q4scale = _F32(15.0)
    has_s = max_scale > 0
    iscale = np.where(has_s, q4scale / max_scale, _F32(0.0)).astype(_F32)
    sb = np.where(has_s[:, None], _u8(_nearest_int(iscale[:, None] * scales)), 0)
    dh = np.where(has_s, _fp16_bits(max_scale / q4scale), _fp16_bits(_F32(0.0)))
    has_m = max_min > 0
    imin = np.where(has_m, q4scale / max_min, _F32(0.0)).astype(_F32)
    sb = np.where(has_m[:, None], _u8(sb | (_nearest_int(imin[:, None] * mins).astype(np.int64) << 4)), sb)
    dminh = np.where(has_m, _fp16_bits(max_min / q4scale), _fp16_bits(_F32(0.0)))
    d = _fp16_to_f32(dh)[:, None] * (sb & 0xF).astype(_F32)
    dm = _fp16_to_f32(dminh)[:, None] * (sb >> 4).astype(_F32)
    L = _requant(x.reshape(nb, 16, 16), L, d, dm, 0, 3).reshape(nb, 2, 4, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    return _le_bytes(sb, qs, _h16_bytes(dh), _h16_bytes(dminh))


def _sixteen_sub_blocks(x: np.ndarray, make, nmax: int):
    """q3_k and q6_k's first pass: each 16-weight sub-block quantized by ``make``; (nb, L, scales, and the
    first scale of largest |scale| per block with that |scale|)."""
    nb = x.shape[0]
    xt = np.ascontiguousarray(x.reshape(nb * 16, 16).T)
    L, scales = make(xt, nmax)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = _first_absmax(np.ascontiguousarray(scales.T))
    return nb, L.T.reshape(nb, 16, 16), scales, max_abs, max_scale


def _q3_k(x: np.ndarray) -> np.ndarray:
    nb, L, scales, _, max_scale = _sixteen_sub_blocks(x, _make_q3_quants, 4)
    nz = max_scale != 0
    iscale = np.where(nz, _F32(-32.0) / max_scale, _F32(0.0)).astype(_F32)
    l = np.clip(_i8(_nearest_int(iscale[:, None] * scales)), -32, 31) + 32  # (nb, 16), 0..63
    l = np.where(nz[:, None], l, 0)
    sb = np.zeros((nb, 12), dtype=np.int64)
    sb[:, 0:8] = l[:, 0:8] & 0xF
    sb[:, 0:8] |= (l[:, 8:16] & 0xF) << 4
    hi = l >> 4
    for j in range(16):
        sb[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    sb = np.where(nz[:, None], sb, 0)
    dh = np.where(nz, _fp16_bits(_F32(1.0) / iscale), _fp16_bits(_F32(0.0)))
    # decode the stored 6-bit scales as the requantisation loop does
    low = np.concatenate([sb[:, 0:8] & 0xF, sb[:, 0:8] >> 4], axis=1)
    high = np.stack([(sb[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
    sc = _i8((low | (high << 4)) - 32)
    d = _fp16_to_f32(dh)[:, None] * sc.astype(_F32)
    L = _requant(x.reshape(nb, 16, 16), L - 4, d, None, -4, 3) + 4
    L = L.reshape(nb, 256)
    hbit = (L > 3)
    L = np.where(hbit, L - 4, L)
    hm = hbit.reshape(nb, 8, 32).astype(np.int64)
    hmask = np.zeros((nb, 32), dtype=np.int64)
    for b in range(8):
        hmask |= hm[:, b] << b
    L4 = L.reshape(nb, 2, 4, 32)
    qs = (L4[:, :, 0] | (L4[:, :, 1] << 2) | (L4[:, :, 2] << 4) | (L4[:, :, 3] << 6)).reshape(nb, 64)
    return _le_bytes(hmask, qs, sb, _h16_bytes(dh))


def _q45_k(x: np.ndarray, t: str) -> np.ndarray:
    nb = x.shape[0]
    nmax, rmin, nstep = (15, -1.0, 20) if t == "q4_k" else (31, -0.5, 15)
    xt = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, nb*8)
    sum_x2 = _seq_sum(xt * xt)
    av_x = np.sqrt(sum_x2 / _F32(32.0))
    wt = av_x + np.abs(xt)
    L, scales, mins = _make_qkx2_quants(xt, wt, nmax, rmin, 0.1, nstep, False)
    L = L.T.reshape(nb, 8, 32)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = _running_max_pos(scales.T)
    max_min = _running_max_pos(mins.T)
    inv_scale = np.where(max_scale > 0, _F32(63.0) / max_scale, _F32(0.0)).astype(_F32)
    inv_min = np.where(max_min > 0, _F32(63.0) / max_min, _F32(0.0)).astype(_F32)
    ls = np.minimum(63, _u8(_nearest_int(inv_scale[:, None] * scales)))
    lm = np.minimum(63, _u8(_nearest_int(inv_min[:, None] * mins)))
    sb = _pack_scale_min_k4(ls.astype(np.int64), lm.astype(np.int64))
    dh = _fp16_bits(max_scale / _F32(63.0))
    dminh = _fp16_bits(max_min / _F32(63.0))
    sc, m = _unpack_scale_min_k4(sb)
    d = _fp16_to_f32(dh)[:, None] * sc.astype(_F32)
    dm = _fp16_to_f32(dminh)[:, None] * m.astype(_F32)
    L = _requant(x.reshape(nb, 8, 32), L, d, dm, 0, nmax).reshape(nb, 4, 2, 32)
    if t == "q4_k":
        qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
        return _le_bytes(_h16_bytes(dh), _h16_bytes(dminh), sb, qs)
    hi = (L > 15).astype(np.int64)  # (nb, 4 pairs, 2, 32)
    L = L & 0xF
    qh = np.zeros((nb, 32), dtype=np.int64)
    for p in range(4):
        qh |= hi[:, p, 0] << (2 * p)
        qh |= hi[:, p, 1] << (2 * p + 1)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    return _le_bytes(_h16_bytes(dh), _h16_bytes(dminh), sb, qh, qs)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb, L, scales, max_abs, max_scale = _sixteen_sub_blocks(x, _make_qx_quants_rmse1, 32)
    zero = max_abs < _GROUP_MAX_EPS
    iscale = _F32(-128.0) / max_scale
    dh = np.where(zero, np.uint16(0), _fp16_bits(_F32(1.0) / iscale))
    sc = _i8(np.minimum(127, _nearest_int(iscale[:, None] * scales)))
    sc = np.where(zero[:, None], 0, sc)
    d = _fp16_to_f32(dh)[:, None] * sc.astype(_F32)
    L = _requant(x.reshape(nb, 16, 16), L - 32, d, None, -32, 31) + 32
    L = np.where(zero[:, None, None], 0, L).reshape(nb, 2, 4, 32).astype(np.int64)
    lo = L & 0xF
    hi = L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    return _le_bytes(ql, qh, _u8(sc), _h16_bytes(dh))


# ---------------------------------------------------------------------------------------------
# K-quant dequantisation: dequantize_row_q{2,3,4,5,6}_K
# ---------------------------------------------------------------------------------------------

def _dq_k(b: np.ndarray, t: str) -> np.ndarray:
    nb = b.shape[0]
    h16 = lambda off: _fp16_to_f32(b[:, off:off + 2].copy().view("<u2")[:, 0])[:, None]  # noqa: E731
    if t == "q2_k":
        sb = b[:, 0:16].astype(np.int64)
        qs = b[:, 16:80].astype(np.int64).reshape(nb, 2, 1, 32)
        d, dmin = h16(80), h16(82)
        q = ((qs >> (2 * np.arange(4))[None, None, :, None]) & 3).reshape(nb, 16, 16).astype(_F32)
        dl = (d * (sb & 0xF).astype(_F32))[..., None]
        ml = (dmin * (sb >> 4).astype(_F32))[..., None]
        return (dl * q - ml).reshape(nb, 256)
    if t == "q3_k":
        hm = b[:, 0:32].astype(np.int64)
        qs = b[:, 32:96].astype(np.int64).reshape(nb, 2, 1, 32)
        sb = b[:, 96:108].astype(np.int64)
        d_all = h16(108)
        low = np.concatenate([sb[:, 0:8] & 0xF, sb[:, 0:8] >> 4], axis=1)
        high = np.stack([(sb[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
        scales = _i8(low | (high << 4))
        q2 = (qs >> (2 * np.arange(4))[None, None, :, None]) & 3  # (nb, 2, 4, 32)
        hbit = (hm[:, None, None, :] >> np.arange(8).reshape(1, 2, 4, 1)) & 1
        q = (q2 - np.where(hbit != 0, 0, 4)).reshape(nb, 16, 16).astype(_F32)
        dl = (d_all * (scales - 32).astype(_F32))[..., None]
        return (dl * q).reshape(nb, 256)
    if t in ("q4_k", "q5_k"):
        d, dmin = h16(0), h16(2)
        sc, m = _unpack_scale_min_k4(b[:, 4:16])
        d1 = (d * sc.astype(_F32))[..., None]  # (nb, 8, 1)
        m1 = (dmin * m.astype(_F32))[..., None]
        if t == "q4_k":
            qs = b[:, 16:144].astype(np.int64).reshape(nb, 4, 1, 32)
            q = (qs >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 0xF
        else:
            qh = b[:, 16:48].astype(np.int64)
            qs = b[:, 48:176].astype(np.int64).reshape(nb, 4, 1, 32)
            q = (qs >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 0xF
            hbit = (qh[:, None, None, :] >> np.arange(8).reshape(1, 4, 2, 1)) & 1
            q = q + np.where(hbit != 0, 16, 0)
        q = q.reshape(nb, 8, 32).astype(_F32)
        return (d1 * q - m1).reshape(nb, 256)
    if t == "q6_k":
        ql = b[:, 0:128].astype(np.int64).reshape(nb, 2, 2, 32)
        qh = b[:, 128:192].astype(np.int64).reshape(nb, 2, 1, 32)
        sc = b[:, 192:208].view(np.int8).astype(_F32)
        d = h16(208)
        lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        hi = (qh >> (2 * np.arange(4))[None, None, :, None]) & 3
        q = ((lo | (hi << 4)) - 32).reshape(nb, 16, 16).astype(_F32)
        return ((d * sc)[..., None] * q).reshape(nb, 256)
    raise AssertionError(t)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def _as_rows(w) -> np.ndarray:
    if hasattr(w, "detach"):  # a torch tensor
        w = w.detach().cpu().numpy()
    a = np.asarray(w, dtype=_F32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D (n_rows, n_cols) matrix, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _quantize_blocks(x: np.ndarray, t: str) -> np.ndarray:
    if t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        return _q_legacy(x, t)
    if t == "q2_k":
        return _q2_k(x)
    if t == "q3_k":
        return _q3_k(x)
    if t in ("q4_k", "q5_k"):
        return _q45_k(x, t)
    if t == "q6_k":
        return _q6_k(x)
    raise AssertionError(t)


def quantize_rows(w, gtype: str) -> bytes:
    """The tensor data llama.cpp stores for ``w`` (``n_rows`` rows of ``n_cols``) in type ``gtype``.

    Byte-identical to ``ggml_quantize_chunk(type, w, dst, 0, n_rows, n_cols, NULL)``: block
    structs back to back, little endian, fp16 scales. ``n_cols`` must be a multiple of
    ``BLOCK_SIZE[gtype]`` (see ``effective_type``).
    """
    t = normalize_type(gtype)
    a = _as_rows(w)
    n_rows, n_cols = a.shape
    if n_cols % BLOCK_SIZE[t]:
        raise ValueError(f"{t}: row length {n_cols} is not a multiple of its block size {BLOCK_SIZE[t]}; "
                         f"llama-quantize would store {effective_type(t, n_cols)}")
    if t == "f32":
        return a.astype("<f4").tobytes()
    if t == "f16":
        with np.errstate(all="ignore"):  # overflow to inf is what ggml does too
            return _fp16_bits(a).astype("<u2").tobytes()
    qk = BLOCK_SIZE[t]
    blocks = a.reshape(-1, qk)
    step = max(1, _CHUNK_ELEMS // qk)
    out = np.empty((blocks.shape[0], BLOCK_BYTES[t]), dtype=np.uint8)
    with np.errstate(all="ignore"):
        for s in range(0, blocks.shape[0], step):
            out[s:s + step] = _quantize_blocks(blocks[s:s + step], t)
    return out.tobytes()


def dequantize_rows(data, gtype: str, shape) -> np.ndarray:
    """float32 array of ``shape`` (n_rows, n_cols) that ggml's ``dequantize_row_*`` computes from ``data``."""
    t = normalize_type(gtype)
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1]
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    expected = tensor_bytes(t, n_rows, n_cols)
    if isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    else:
        buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    if buf.size != expected:
        raise ValueError(f"{t} {shape}: expected {expected} bytes, got {buf.size}")
    if t == "f32":
        return buf.view("<f4").astype(_F32).reshape(shape)
    if t == "f16":
        return _fp16_to_f32(buf.view("<u2")).reshape(shape)
    b = buf.reshape(-1, BLOCK_BYTES[t])
    qk = BLOCK_SIZE[t]
    out = np.empty((b.shape[0], qk), dtype=_F32)
    step = max(1, _CHUNK_ELEMS // qk)
    with np.errstate(all="ignore"):
        for s in range(0, b.shape[0], step):
            chunk = b[s:s + step]
            out[s:s + step] = _dq_legacy(chunk, t) if qk == 32 else _dq_k(chunk, t)
    return out.reshape(shape)


def quantize_dequantize(w, gtype: str) -> np.ndarray:
    """The float32 weights llama.cpp computes with after storing ``w`` as ``gtype`` (same shape)."""
    a = _as_rows(w)
    return dequantize_rows(quantize_rows(a, gtype), gtype, a.shape).reshape(tuple(np.shape(w)))
