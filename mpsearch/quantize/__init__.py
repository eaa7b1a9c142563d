"""Quantizers: each returns a ``QuantizedWeight`` (integer codes, scales, zero-points, sparsity mask).

``quantize`` and ``fake_quantize`` take a ``Setting`` (bits, method, sparsity) or plain bits (round to
nearest); methods that use the layer's calibration inputs take ``hessian`` (``inputs.input_moments``).
"""
from __future__ import annotations

import torch

from ..core.qconfig import FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig, Setting
from .grids import CLIP_RATIOS, QuantizedWeight, mse, sqnr_db, stored_scale
from .prepare import PreparedCache, default_cache_dir, prepare


def _setting(setting: Setting | int) -> Setting:
    return setting if isinstance(setting, Setting) else Setting(int(setting))


def quantize(w: torch.Tensor, setting: Setting | int, cfg: QuantizerConfig, hessian: torch.Tensor | None = None,
             groups: int = 1, cache: PreparedCache | None = None) -> QuantizedWeight:
    """``w`` at an integer setting, as stored."""
    return prepare(w, _setting(setting), cfg, hessian, groups, cache)


def fake_quantize(w: torch.Tensor, setting: Setting | int, cfg: QuantizerConfig, hessian: torch.Tensor | None = None,
                  groups: int = 1, cache: PreparedCache | None = None) -> torch.Tensor:
    """The weight the model computes with: integers dequantized, float16 rounded, 32 bits unchanged."""
    s = _setting(setting)
    if s.bits >= UNQUANTIZED_BITS:
        return w
    if s.bits == FLOAT16_BITS:
        return w.detach().to(torch.float16).to(w.dtype)
    return prepare(w, s, cfg, hessian, groups, cache).dequantize(w.dtype)


__all__ = ["CLIP_RATIOS", "PreparedCache", "QuantizedWeight", "default_cache_dir", "fake_quantize", "mse", "prepare",
           "quantize", "sqnr_db", "stored_scale"]
