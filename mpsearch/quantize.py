"""Fake-quantization of weights: round-to-nearest uniform integers.

The evaluator only needs dequantized weights (what the model would compute with);
the size model needs to know how many scales and zero-points are stored. Both read
the same ``QuantizerConfig`` so what is measured is what is counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

FLOAT16_BITS = 16
UNQUANTIZED_BITS = 32
SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per-channel", "per-group")
# Clipping ratios tried by the MSE clipping search, largest first (1.0 = no clipping).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))


@dataclass(frozen=True)
class QuantizerConfig:
    """How integer weights are laid out; scales are stored at ``scale_bits``, zero-points at ``zero_point_bits``."""

    scheme: str = "symmetric"
    granularity: str = "per-channel"
    group_size: int | None = None
    clip_search: bool = False
    scale_bits: int = 16
    zero_point_bits: int = 8

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.granularity == "per-group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError("per-group quantization needs a positive integer group_size")
        elif self.group_size is not None:
            raise ValueError("group_size is only meaningful with granularity 'per-group'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizerConfig":
        fields = ("scheme", "granularity", "group_size", "clip_search", "scale_bits", "zero_point_bits")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown quantizer key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        return cls(**d)


def is_integer_bits(bits: int) -> bool:
    return 1 <= bits < FLOAT16_BITS


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


def n_groups(shape: tuple[int, ...], cfg: QuantizerConfig) -> int:
    """Number of (scale, zero-point) pairs stored for a weight of this shape."""
    out = shape[0]
    inner = 1
    for s in shape[1:]:
        inner *= s
    if cfg.granularity == "per-channel":
        return out
    return out * -(-inner // cfg.group_size)


def _rtn(rows: torch.Tensor, bits: int, scheme: str, ratio: torch.Tensor | float) -> torch.Tensor:
    """Round-to-nearest of each row with its own scale; ratio shrinks the range (clipping)."""
    if scheme == "symmetric":
        amax = rows.abs().amax(dim=1, keepdim=True) * ratio
        if bits == 1:
            # One bit, symmetric: sign times the mean magnitude (binary weights).
            scale = rows.abs().mean(dim=1, keepdim=True)
            return torch.where(rows >= 0, scale, -scale)
        qmax = 2 ** (bits - 1) - 1
        scale = (amax / qmax).clamp_min(torch.finfo(rows.dtype).tiny)
        scale = _stored_scale(scale)
        return torch.clamp(torch.round(rows / scale), -qmax - 1, qmax) * scale
    lo = rows.amin(dim=1, keepdim=True) * ratio
    hi = rows.amax(dim=1, keepdim=True) * ratio
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(rows.dtype).tiny)
    scale = _stored_scale(scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return (torch.clamp(torch.round(rows / scale) + zp, 0, qmax) - zp) * scale


def _stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to float16, as they are stored, so the evaluator sees the deployed weights."""
    fp16 = torch.finfo(torch.float16)
    return scale.clamp(fp16.tiny, fp16.max).to(torch.float16).to(scale.dtype)


def quantize_weight(w: torch.Tensor, bits: int, cfg: QuantizerConfig) -> torch.Tensor:
    """Dequantized copy of ``w`` at ``bits``: 1-15 integer, 16 float16, 32 unchanged."""
    if bits >= UNQUANTIZED_BITS:
        return w
    if bits == FLOAT16_BITS:
        return w.detach().to(torch.float16).to(w.dtype)
    if not is_integer_bits(bits):
        raise ValueError(f"bits must be 1-16 or 32, got {bits}")
    with torch.no_grad():
        src = w.detach().float()
        rows, pad = _grouped(src, cfg)
        if cfg.clip_search and bits > 1:
            best = _rtn(rows, bits, cfg.scheme, 1.0)
            best_err = (best - rows).pow(2).sum(dim=1, keepdim=True)
            for ratio in CLIP_RATIOS[1:]:
                q = _rtn(rows, bits, cfg.scheme, ratio)
                err = (q - rows).pow(2).sum(dim=1, keepdim=True)
                better = err < best_err
                best = torch.where(better, q, best)
                best_err = torch.where(better, err, best_err)
            q = best
        else:
            q = _rtn(rows, bits, cfg.scheme, 1.0)
        if cfg.granularity == "per-group":
            q = q.reshape(src.shape[0], -1)
            if pad:
                q = q[:, : q.shape[1] - pad]
        return q.reshape(w.shape).to(w.dtype).contiguous()


def mse(w: torch.Tensor, q: torch.Tensor) -> float:
    return float((w.double() - q.double()).pow(2).mean())


def sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    noise = float((w.double() - q.double()).pow(2).sum())
    signal = float(w.double().pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
