"""A weight stored in one of llama.cpp's GGML types: the bytes a GGUF holds, and the floats ggml computes with."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.qconfig import GGML_BITS
from . import ggml


@dataclass(frozen=True)
class GGMLWeight:
    """``data``: the tensor's bytes in ``gtype`` (ggml's block structs, as a GGUF stores them) for a weight of
    ``shape`` with its output channels first; each row of ``prod(shape[1:])`` weights is one ggml row (``ne[0]``).
    The evaluator computes with ``dequantize()``, the GGUF exporter writes ``data`` unchanged."""

    gtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8

    @classmethod
    def quantize(cls, w: torch.Tensor, gtype: str) -> "GGMLWeight":
        rows = w.detach().float().reshape(w.shape[0], -1).cpu().numpy()
        raw = ggml.quantize_rows(rows, gtype)
        return cls(gtype, tuple(w.shape), np.frombuffer(raw, dtype=np.uint8))

    @property
    def bits(self) -> int:
        return GGML_BITS[self.gtype]

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = (self.shape[0], math.prod(self.shape[1:]))
        w = torch.from_numpy(ggml.dequantize_rows(self.data, self.gtype, rows)).reshape(self.shape)
        if out is not None:
            return out.copy_(w.reshape(out.shape))
        return w.to(dtype)

    def compact(self) -> "GGMLWeight":
        return self
