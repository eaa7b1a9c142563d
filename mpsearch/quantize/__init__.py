"""Quantizers: each returns a ``QuantizedWeight`` (integer codes, scales, zero-points)."""
from .grids import CLIP_RATIOS, QuantizedWeight, fake_quantize, mse, quantize, sqnr_db, stored_scale

__all__ = ["CLIP_RATIOS", "QuantizedWeight", "fake_quantize", "mse", "quantize", "sqnr_db", "stored_scale"]
