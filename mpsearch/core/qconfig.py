"""How integer weights are laid out: plain data shared by the size tables and the quantizer.

The size tables count what this config says is stored and the quantizer produces exactly
that, so what is measured is what is counted. No torch here: strategies read sizes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

FLOAT16_BITS = 16
UNQUANTIZED_BITS = 32
SCHEMES = ("symmetric", "asymmetric")
GRANULARITIES = ("per-channel", "per-group")


@dataclass(frozen=True)
class QuantizerConfig:
    """Scales are stored at ``scale_bits``, zero-points (asymmetric only) at ``zero_point_bits``."""

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


def n_groups(shape: tuple[int, ...], cfg: QuantizerConfig) -> int:
    """Number of (scale, zero-point) pairs stored for a weight of this shape."""
    out = shape[0]
    inner = 1
    for s in shape[1:]:
        inner *= s
    if cfg.granularity == "per-channel":
        return out
    return out * -(-inner // cfg.group_size)
