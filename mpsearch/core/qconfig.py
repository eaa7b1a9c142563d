"""How weights are quantized and stored: plain data shared by the size tables, the quantizers and plans.

``QuantizerConfig`` is the storage layout of a space (scheme, granularity, scale and zero-point
widths, integer grid). A ``Setting`` is what one layer takes: its bits, the quantizer method
that computes its integers, and its sparsity. The size tables count exactly what the quantizer
produces, so what is measured is what is counted. No torch here: strategies read sizes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .ggml_types import BLOCK_SIZE, tensor_bytes

FLOAT16_BITS = 16
UNQUANTIZED_BITS = 32
SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per-channel", "per-group")
# "full": b-bit symmetric integers use all 2^b levels, [-2^(b-1), 2^(b-1) - 1], with torchao's
# IntxWeightOnlyConfig rule (MappingType.SYMMETRIC). "narrow": [-(2^(b-1) - 1), 2^(b-1) - 1] (3 levels at
# 2 bits), mpsearch's grid before version 2 plans, kept so earlier plans and results reproduce.
GRIDS = ("full", "narrow")
# Cheapest first; gptq and gradient need the layer's calibration inputs (Linear and Conv layers).
METHODS = ("rtn", "mse-clip", "gradient", "gptq")
DATA_METHODS = ("gptq", "gradient")
# format "ggml": a layer's setting is one of llama.cpp's GGML types, which fixes both its storage layout and its
# arithmetic (``mpsearch.quantize.ggml``, bit-exact with ggml). The setting's method is the type's name, its bits
# the type's nominal width; float16 and float32 are GGUF's f16 and f32.
FORMATS = ("integer", "ggml")
GGML_BITS = {"q2_k": 2, "q3_k": 3, "q4_0": 4, "q4_1": 4, "q4_k": 4, "q5_0": 5, "q5_1": 5, "q5_k": 5, "q6_k": 6,
             "q8_0": 8}
GGML_FLOATS = {"f16": FLOAT16_BITS, "f32": 32}
SEMI_STRUCTURED = "2:4"
FLOAT_LABELS = {FLOAT16_BITS: "float16", UNQUANTIZED_BITS: "float32"}


@dataclass(frozen=True)
class QuantizerConfig:
    """Scales are stored at ``scale_bits`` (float16: the quantizer rounds them so), zero-points
    (asymmetric only) at ``zero_point_bits``."""

    scheme: str = "symmetric"
    granularity: str = "per-channel"
    group_size: int | None = None
    scale_bits: int = 16
    zero_point_bits: int = 8
    grid: str = "full"
    act_order: bool = False  # gptq: also try columns by decreasing input energy, keep the better (``methods.gptq``)
    format: str = "integer"  # "ggml": settings are GGML types, and the fields above do not apply

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantizer format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        if self.granularity == "per-group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError("per-group quantization needs a positive integer group_size")
        elif self.group_size is not None:
            raise ValueError("group_size is only meaningful with granularity 'per-group'")

    def to_dict(self) -> dict:
        if self.format == "ggml":  # every layout field is the GGML type's own
            return {"format": "ggml"}
        d = asdict(self)
        del d["format"]  # integer: plans and cache keys stay as they were before the option existed
        if not d["act_order"]:  # off: likewise
            del d["act_order"]
        return d


@dataclass(frozen=True)
class Setting:
    """What one layer takes: ``bits`` (1-15 integer, 16 float16, 32 unquantized), the ``method`` that
    computes its integers, and ``sparsity`` (a share of weights pruned by magnitude, or "2:4").
    A GGML type (``Setting(4, "q4_k")``, label ``q4_k``) is dense, and its bits are the type's nominal width."""

    bits: int
    method: str = "rtn"
    sparsity: float | str = 0.0

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (
                1 <= self.bits <= FLOAT16_BITS or self.bits == UNQUANTIZED_BITS):
            raise ValueError(f"bits must be 1-16 or 32, got {self.bits!r}")
        if self.method in GGML_BITS:
            if self.bits != GGML_BITS[self.method]:
                raise ValueError(f"GGML type {self.method} is {GGML_BITS[self.method]}-bit, not {self.bits}-bit")
            if self.sparsity not in (0, 0.0):
                raise ValueError(f"GGML type {self.method} stores every weight: it cannot be pruned")
        elif self.method not in METHODS:
            raise ValueError(f"unknown quantizer method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.sparsity != SEMI_STRUCTURED:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not (
                    0.0 <= self.sparsity < 1.0):
                raise ValueError(f"sparsity must be a share in [0, 1) or '2:4', got {self.sparsity!r}")
            object.__setattr__(self, "sparsity", float(self.sparsity))

    @property
    def quantized(self) -> bool:
        return is_integer_bits(self.bits)

    @property
    def ggml(self) -> bool:
        """Whether the setting is a quantized GGML type (its method names the type)."""
        return self.method in GGML_BITS

    @property
    def sparse(self) -> bool:
        return self.sparsity == SEMI_STRUCTURED or (isinstance(self.sparsity, float) and self.sparsity > 0)

    def label(self) -> str:
        """``4/gptq``, ``3/rtn/50%``, ``4/mse-clip/2:4``, ``float16``: how a searched setting is named in candidates
        and files."""
        if not self.quantized:
            return FLOAT_LABELS[self.bits]
        if self.ggml:
            return self.method
        tag = ""
        if self.sparse:
            tag = "/2:4" if self.sparsity == SEMI_STRUCTURED else f"/{round(100 * float(self.sparsity), 4):g}%"
        return f"{self.bits}/{self.method}{tag}"

    @classmethod
    def from_label(cls, label: str) -> "Setting":
        for bits, name in FLOAT_LABELS.items():
            if label == name:
                return cls(bits)
        if label in GGML_FLOATS:
            return cls(GGML_FLOATS[label])
        if label in GGML_BITS:
            return cls(GGML_BITS[label], label)
        parts = str(label).split("/")
        if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in METHODS:
            raise ValueError(f"not a setting label: {label!r} (expected bits/method[/sparsity], e.g. 4/gptq/50%, "
                         "or a GGML type such as q4_k)")
        sparsity: float | str = 0.0
        if len(parts) == 3:
            sparsity = SEMI_STRUCTURED if parts[2] == SEMI_STRUCTURED else float(parts[2].rstrip("%")) / 100
        return cls(int(parts[0]), parts[1], sparsity)


def ggml_tensor_bytes(gtype: str, rows_shape: tuple[int, ...]) -> int:
    """GGUF bytes of a weight whose output rows are ``rows_shape[0]``, each of ``prod(rows_shape[1:])`` values
    cut into the type's blocks (ggml's ``ne[0]`` is that row length)."""
    return tensor_bytes(gtype, rows_shape[0], math.prod(rows_shape[1:]))


def ggml_fits(gtype: str, rows_shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp stores the type as asked: its rows are a multiple of the block (else it falls back)."""
    return math.prod(rows_shape[1:]) % BLOCK_SIZE[gtype] == 0


def is_integer_bits(bits: int) -> bool:
    return 1 <= bits < FLOAT16_BITS


def n_groups(shape: tuple[int, ...], cfg: QuantizerConfig) -> int:
    """Number of (scale, zero-point) pairs stored for a weight of this shape."""
    out = shape[0]
    inner = math.prod(shape[1:])
    if cfg.granularity == "per-channel":
        return out
    return out * -(-inner // cfg.group_size)


def kept_weights(shape: tuple[int, ...], sparsity: float | str) -> int:
    """Weights that survive pruning: per output row, all but floor(inner x sparsity) (2:4: half of each 4)."""
    out, inner = shape[0], math.prod(shape[1:])
    if sparsity == SEMI_STRUCTURED:
        return out * (inner // 2)
    return out * (inner - math.floor(inner * float(sparsity)))


def stored_bits(shape: tuple[int, ...], setting: Setting, cfg: QuantizerConfig, element_size: int = 4) -> int:
    """Every bit a weight tensor of this shape takes at this setting, as a runtime stores it.

    Integers: the surviving values at ``bits`` each, one scale (and zero-point, asymmetric) per channel
    or group, and, when pruned, a one-bit-per-weight mask (2:4 stores a 2-bit position per kept value,
    the same count). Float16 and unquantized weights: every weight at that width.
    """
    n = math.prod(shape)
    if setting.ggml:  # every byte of the GGUF tensor: blocks of codes with their scales
        return 8 * ggml_tensor_bytes(setting.method, shape)
    if setting.bits >= UNQUANTIZED_BITS:
        return n * element_size * 8
    if setting.bits == FLOAT16_BITS:
        return n * 16
    groups = n_groups(shape, cfg)
    total = kept_weights(shape, setting.sparsity) * setting.bits + groups * cfg.scale_bits
    if cfg.scheme == "asymmetric":
        total += groups * cfg.zero_point_bits
    if setting.sparse:
        total += n
    return total
