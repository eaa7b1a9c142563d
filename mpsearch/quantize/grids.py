"""Uniform integer grids, per output channel or per group: the record every quantizer returns, and rounding.

Every quantizer returns a ``QuantizedWeight``: the integer codes, the scales, the zero-points and
the sparsity mask a runtime stores. The evaluator dequantizes them, exporters write them, and the
size tables count exactly them (``mpsearch.core.qconfig``).

Grids (``QuantizerConfig.grid``):

* ``full`` (symmetric): b-bit codes in [-2^(b-1), 2^(b-1) - 1], all 2^b levels, with torchao's
  ``MappingType.SYMMETRIC`` rule: scale = amax / (2^(b-1) - 0.5) stored as float16, codes
  round(w x (1 / scale)) with the reciprocal taken in float16, as ``IntxWeightOnlyConfig(...,
  scale_dtype=torch.float16)`` computes them: the same integers and scales, dead rows included
  (tests/test_export_torchao_onnx.py). A clipping ratio shrinks amax.
* ``narrow`` (symmetric): scale = amax / (2^(b-1) - 1), codes round(w / scale), so the codes span
  [-(2^(b-1) - 1), 2^(b-1) - 1] (3 levels at 2 bits): mpsearch's grid before plan version 2, kept so
  earlier plans reproduce.
* asymmetric: [0, 2^b - 1] with a zero-point, the range spanning min and max (and 0).
* 1 bit (symmetric, either grid): +-1 times the row's mean magnitude (binary weights).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.qconfig import QuantizerConfig

# Clipping ratios tried by the MSE clipping search, largest first (1.0 = no clipping); down to 0.3 for
# heavy-tailed rows (a word embedding's best 2-bit range is about a third of its largest weight).
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(15))
CHUNK_ELEMENTS = 1 << 18  # the clipping search works on this many weights at a time


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as stored: ``codes`` (int32, shape ``(out, inner)``: the weight flattened past dim 0),
    ``scales`` and ``zero_points`` (shape ``(out, groups per row)``; zero-points None when symmetric),
    ``mask`` (bool, like ``codes``; None when dense: a pruned weight holds the code of zero, 0 or its
    zero-point, so it dequantizes to exactly 0 by the runtime's formula too).

    Symmetric codes are signed; asymmetric codes and zero-points unsigned; 1-bit codes are +-1.
    Scales are float32 tensors holding float16 values, as stored. ``dequantize()`` is what the
    model computes with.
    """

    bits: int
    shape: tuple[int, ...]
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    group_size: int | None = None  # None: one scale per output channel
    mask: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weights, in ``dtype``; ``out``: a tensor of the weight's shape to write them into (no new memory
        when the record is symmetric, dense, and per channel or in whole groups)."""
        rows = self.codes.shape[0]
        g = self.group_size or self.codes.shape[1]
        if self.zero_points is None and self.mask is None and self.codes.shape[1] % g == 0 and \
                (out is None or out.is_contiguous()):  # one pass, into memory of the weight's own
            out = torch.empty(self.shape, dtype=dtype) if out is None else out
            torch.mul(self.codes.reshape(rows, -1, g), self.scales.reshape(rows, -1, 1), out=out.view(rows, -1, g))
            return out
        if out is not None:
            out.copy_(self.dequantize(dtype).reshape(out.shape))
            return out
        q = self.codes.float()
        if self.zero_points is not None:
            q = q - self.per_element(self.zero_points.float())
        w = q * self.per_element(self.scales)
        if self.mask is not None:
            w = torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))
        return w.reshape(self.shape).to(dtype).contiguous()

    def compact(self) -> "QuantizedWeight":
        """The record in the fewest bytes that dequantize to the same values: codes of 8 bits or fewer
        in one byte, no mask (pruned weights already hold the code of zero)."""
        signed = self.zero_points is None
        dtype = (torch.int8 if signed else torch.uint8) if self.bits <= 8 else (torch.int16 if signed else torch.int32)
        codes = self.codes.to(dtype)
        return replace(self, codes=codes, mask=None)

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.zero_points, self.mask)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def per_element(self, per_group: torch.Tensor) -> torch.Tensor:
        """A per-channel or per-group tensor broadcast to the codes' shape."""
        if self.group_size is None:
            return per_group.reshape(-1, 1)
        inner = self.codes.shape[1]
        return per_group.repeat_interleave(self.group_size, dim=1)[:, :inner]


def grouped(w: torch.Tensor, cfg: QuantizerConfig) -> tuple[torch.Tensor, int]:
    """View the weight as (n_groups, group_len) rows, zero-padding a ragged last group; return padding."""
    rows = w.reshape(w.shape[0], -1)
    if cfg.granularity == "per-channel":
        return rows, 0
    g = cfg.group_size
    pad = (-rows.shape[1]) % g
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(-1, g), pad


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16, as they are stored, so the evaluator sees the deployed weights."""
    fp16 = torch.finfo(torch.float16)
    return scale.clamp(fp16.tiny, fp16.max).to(torch.float16).to(scale.dtype)


def limits(bits: int, cfg: QuantizerConfig) -> tuple[int, int]:
    """The smallest and largest code of the grid."""
    if cfg.scheme == "asymmetric":
        return 0, 2**bits - 1
    if bits == 1:
        return -1, 1
    # both grids clamp to [-2^(b-1), 2^(b-1) - 1]; the narrow grid's scale (amax / (2^(b-1) - 1)) leaves
    # -2^(b-1) unused but for a rare rounding of the float16 scale, as before version 2 plans
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def params(rows: torch.Tensor, bits: int, cfg: QuantizerConfig, ratio: float = 1.0, weight=None):
    """(scale, zero_point) of each row (a channel or a group) for its values; ``ratio`` shrinks the range.
    ``weight`` (same shape, >= 0): only where it is positive do values count (pruned weights do not)."""
    if weight is not None:
        big = rows.abs().masked_fill(weight <= 0, 0.0)
    else:
        big = rows.abs()
    if cfg.scheme == "symmetric":
        if bits == 1:
            count = rows.shape[1] if weight is None else (weight > 0).sum(dim=1, keepdim=True).clamp_min(1)
            return stored_scale(big.sum(dim=1, keepdim=True) / count), None
        amax = big.amax(dim=1, keepdim=True) * ratio
        if cfg.grid == "full":  # torchao's arithmetic to the letter: float32 floor, then float16 (subnormals too)
            scale = (amax / (2 ** (bits - 1) - 0.5)).clamp_min(torch.finfo(torch.float32).smallest_normal)
            return scale.clamp_max(torch.finfo(torch.float16).max).to(torch.float16).to(rows.dtype), None
        return stored_scale((amax / (2 ** (bits - 1) - 1.0)).clamp_min(torch.finfo(rows.dtype).tiny)), None
    src = rows if weight is None else rows.masked_fill(weight <= 0, 0.0)
    lo = torch.minimum(src.amin(dim=1, keepdim=True) * ratio, torch.zeros(1))
    hi = torch.maximum(src.amax(dim=1, keepdim=True) * ratio, torch.zeros(1))
    qmax = 2**bits - 1
    scale = stored_scale(((hi - lo) / qmax).clamp_min(torch.finfo(rows.dtype).tiny))
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def round_to_grid(rows: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int,
                  cfg: QuantizerConfig) -> torch.Tensor:
    """Codes (as floats) of ``rows`` at the given scale and zero-point."""
    lo, hi = limits(bits, cfg)
    if cfg.scheme == "symmetric" and bits == 1:
        return torch.where(rows >= 0, 1.0, -1.0)
    if cfg.scheme == "symmetric" and cfg.grid == "full":
        # torchao takes the reciprocal of the float16 scale; a row whose scale underflowed to 0 gets +-inf
        # codes clamped to the ends, and 0 x inf = NaN becomes code 0, as its int8 conversion does.
        # One new tensor, rewritten in place: a miss of a large layer is a handful of passes over it.
        inv = (1.0 / scale.to(torch.float16)).to(rows.dtype)
        q = torch.mul(rows, inv).round_().clamp_(lo, hi)
        return torch.nan_to_num(q, nan=0.0, out=q)
    q = torch.div(rows, scale).round_()
    if zp is not None:
        q += zp
    return q.clamp_(lo, hi)


def dequant_rows(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    return (q - zp) * scale if zp is not None else q * scale


def rtn(w: torch.Tensor, bits: int, cfg: QuantizerConfig, mask: torch.Tensor | None = None,
        clip_search: bool = False) -> QuantizedWeight:
    """Round to nearest on the grid; with ``clip_search``, per channel or group the clipping ratio of
    least squared error (``CLIP_RATIOS``). ``mask`` (bool, ``(out, inner)``): weights kept after pruning."""
    with torch.no_grad():
        src = w.detach().float()
        out = src.shape[0]
        if mask is not None:
            src = src.reshape(out, -1).masked_fill(~mask, 0.0).reshape(src.shape)
        rows, pad = grouped(src, cfg)
        keep = None if mask is None else grouped(mask.float().reshape(src.shape), cfg)[0]
        q, s, z = fit(rows, bits, cfg, keep, clip_search)
        return finish(q, s, z, bits, w.shape, cfg, pad, mask)


def fit(rows: torch.Tensor, bits: int, cfg: QuantizerConfig, keep: torch.Tensor | None = None,
        clip_search: bool = False):
    """(codes, scale, zero_point) of each row; with ``clip_search`` the range of least squared error."""
    s, z = params(rows, bits, cfg, 1.0, keep)
    q = round_to_grid(rows, s, z, bits, cfg)
    if clip_search and bits > 1:
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])  # rows are independent: chunks that stay in cache
        parts = [_clip_search(rows[i:i + step], q[i:i + step], s[i:i + step], None if z is None else z[i:i + step],
                              None if keep is None else keep[i:i + step], bits, cfg)
                 for i in range(0, rows.shape[0], step)]
        q, s = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        z = None if z is None else torch.cat([p[2] for p in parts])
    return q, s, z


def _clip_search(rows, q, s, z, keep, bits, cfg):
    """Per row, the codes of the clipping ratio (or, at 2 bits, the binary scale) of least squared error."""
    best_err = _err(rows, q, s, z, keep)
    tries = [params(rows, bits, cfg, ratio, keep) for ratio in CLIP_RATIOS[1:]]
    if bits == 2 and cfg.scheme == "symmetric":  # the binary scale: 2 bits then never loses to 1 bit
        tries.append(params(rows, 1, cfg, 1.0, keep))
    for s2, z2 in tries:
        q2 = round_to_grid(rows, s2, z2, bits, cfg)
        err = _err(rows, q2, s2, z2, keep)
        better = err < best_err
        q, s = torch.where(better, q2, q), torch.where(better, s2, s)
        z = torch.where(better, z2, z) if z is not None else None
        best_err = torch.where(better, err, best_err)
    return q, s, z


def _err(rows, q, s, z, keep):
    e = (dequant_rows(q, s, z) - rows).pow(2)
    return (e if keep is None else e * keep).sum(dim=1, keepdim=True)


def finish(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, shape: tuple, cfg: QuantizerConfig,
           pad: int, mask: torch.Tensor | None) -> QuantizedWeight:
    """The record from grouped rows of codes and their per-row scale and zero-point."""
    out = shape[0]
    q = q.reshape(out, -1)
    if pad:
        q = q[:, : q.shape[1] - pad]
    group = cfg.group_size if cfg.granularity == "per-group" else None
    qw = QuantizedWeight(bits, tuple(shape), q.to(torch.int32).contiguous(), s.reshape(out, -1).contiguous(),
                         None if z is None else z.reshape(out, -1).to(torch.int32).contiguous(), group,
                         None if mask is None else mask.contiguous())
    return with_pruned_zero(qw)


def with_pruned_zero(qw: QuantizedWeight) -> QuantizedWeight:
    """The record with every pruned weight at the code of zero (0, or its zero-point)."""
    if qw.mask is None:
        return qw
    zero = torch.zeros_like(qw.codes) if qw.zero_points is None else qw.per_element(qw.zero_points).to(qw.codes.dtype)
    return replace(qw, codes=torch.where(qw.mask, qw.codes, zero))


def mse(w: torch.Tensor, q: torch.Tensor) -> float:
    return float((w.double() - q.double()).pow(2).mean())


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    noise = float((w.double() - q.double()).pow(2).sum())
    signal = float(w.double().pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
