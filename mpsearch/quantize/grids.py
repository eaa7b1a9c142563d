"""Round-to-nearest onto uniform integer grids, per output channel or per group.

Every quantizer returns a ``QuantizedWeight``: the integer codes, the scales and the
zero-points a runtime stores. The evaluator dequantizes them, exporters write them, and
the size tables count exactly them (``mpsearch.core.qconfig``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.qconfig import FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig, is_integer_bits

# Clipping ratios tried by the MSE clipping search, largest first (1.0 = no clipping).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as stored: ``codes`` (int32, shape ``(out, inner)``: the weight flattened past dim 0),
    ``scales`` and ``zero_points`` (shape ``(out, groups per row)``; zero-points None when symmetric).

    Symmetric codes are signed; asymmetric codes and zero-points unsigned; 1-bit codes are +-1
    (sign times a per-row mean magnitude). Scales are float32 tensors holding float16 values,
    as stored. ``dequantize()`` is what the model computes with.
    """

    bits: int
    shape: tuple[int, ...]
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    group_size: int | None = None  # None: one scale per output channel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.codes.float()
        if self.zero_points is not None:
            q = q - self._per_element(self.zero_points.float())
        return (q * self._per_element(self.scales)).reshape(self.shape).to(dtype).contiguous()

    def _per_element(self, per_group: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return per_group.reshape(-1, 1)
        inner = self.codes.shape[1]
        return per_group.repeat_interleave(self.group_size, dim=1)[:, :inner]


def _grouped(w: torch.Tensor, cfg: QuantizerConfig) -> tuple[torch.Tensor, int]:
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


def _rtn(rows: torch.Tensor, bits: int, scheme: str, ratio: float):
    """(codes, scale, zero_point) of each row with its own scale; ``ratio`` shrinks the range (clipping)."""
    if scheme == "symmetric":
        if bits == 1:
            scale = stored_scale(rows.abs().mean(dim=1, keepdim=True))
            return torch.where(rows >= 0, 1.0, -1.0), scale, None
        amax = rows.abs().amax(dim=1, keepdim=True) * ratio
        qmax = 2 ** (bits - 1) - 1
        scale = stored_scale((amax / qmax).clamp_min(torch.finfo(rows.dtype).tiny))
        return torch.clamp(torch.round(rows / scale), -qmax - 1, qmax), scale, None
    lo = torch.minimum(rows.amin(dim=1, keepdim=True) * ratio, torch.zeros(1))
    hi = torch.maximum(rows.amax(dim=1, keepdim=True) * ratio, torch.zeros(1))
    qmax = 2**bits - 1
    scale = stored_scale(((hi - lo) / qmax).clamp_min(torch.finfo(rows.dtype).tiny))
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return torch.clamp(torch.round(rows / scale) + zp, 0, qmax), scale, zp


def _dequant_rows(q, s, z):
    return (q - z) * s if z is not None else q * s


def quantize(w: torch.Tensor, bits: int, cfg: QuantizerConfig) -> QuantizedWeight:
    """``w`` on the ``bits``-bit grid of ``cfg`` (1-15 bits), with the MSE clipping search when asked."""
    if not is_integer_bits(bits):
        raise ValueError(f"integer quantization takes 1-15 bits, got {bits}")
    with torch.no_grad():
        src = w.detach().float()
        rows, pad = _grouped(src, cfg)
        q, s, z = _rtn(rows, bits, cfg.scheme, 1.0)
        if cfg.clip_search and bits > 1:
            best_err = (_dequant_rows(q, s, z) - rows).pow(2).sum(dim=1, keepdim=True)
            for ratio in CLIP_RATIOS[1:]:
                q2, s2, z2 = _rtn(rows, bits, cfg.scheme, ratio)
                err = (_dequant_rows(q2, s2, z2) - rows).pow(2).sum(dim=1, keepdim=True)
                better = err < best_err
                q, s = torch.where(better, q2, q), torch.where(better, s2, s)
                z = torch.where(better, z2, z) if z is not None else None
                best_err = torch.where(better, err, best_err)
        out = src.shape[0]
        q = q.reshape(out, -1)
        if pad:
            q = q[:, : q.shape[1] - pad]
        group = cfg.group_size if cfg.granularity == "per-group" else None
        return QuantizedWeight(bits, tuple(w.shape), q.to(torch.int32).contiguous(), s.reshape(out, -1).contiguous(),
                               None if z is None else z.reshape(out, -1).to(torch.int32).contiguous(), group)


def fake_quantize(w: torch.Tensor, bits: int, cfg: QuantizerConfig) -> torch.Tensor:
    """The weight the model computes with at ``bits``: 1-15 integer, 16 float16, 32 unchanged."""
    if bits >= UNQUANTIZED_BITS:
        return w
    if bits == FLOAT16_BITS:
        return w.detach().to(torch.float16).to(w.dtype)
    return quantize(w, bits, cfg).dequantize(w.dtype)


def mse(w: torch.Tensor, q: torch.Tensor) -> float:
    return float((w.double() - q.double()).pow(2).mean())


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    noise = float((w.double() - q.double()).pow(2).sum())
    signal = float(w.double().pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
