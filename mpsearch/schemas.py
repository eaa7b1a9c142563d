"""One schema per input file, checked at the edge: search spaces (YAML) and plans (JSON).

Each violation becomes one line that names the file, the key path and what was expected,
raised as the caller's ``MPSearchError`` subclass (exit code 2 from the CLI). Types are
strict: ``include: "features.*"`` is not a list of regexes, ``clip_search: "yes"`` is not a
boolean. The plan's JSON Schema (``plan_json_schema()``) is generated from the same model,
for tools that import plans.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .core.qconfig import GGML_BITS
from .errors import MPSearchError

Bits = int  # 1-16 or 32, checked by the space builder with a message of its own
LAYER_KINDS = ("Linear", "Conv1d", "Conv2d", "Embedding")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Method = Literal["rtn", "mse-clip", "gradient", "gptq"]
GGMLType = Literal["q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"]
Choice = int | str  # bits; in a ggml space a GGML type (q4_k, f16, f32), checked by the space builder


class QuantizerSpec(_Strict):
    """How integer weights are stored; scales are float16 (what the quantizer rounds them to)."""

    scheme: Literal["symmetric", "asymmetric"] = "symmetric"
    granularity: Literal["per-channel", "per-group"] = "per-channel"
    group_size: int | None = Field(default=None, ge=1)
    scale_bits: Literal[16] = Field(default=16, description="scales are stored as float16")
    zero_point_bits: int = Field(default=8, ge=1, le=16)
    grid: Literal["full", "narrow"] = "full"
    act_order: bool = Field(default=False, description="gptq: also try columns by decreasing input energy")
    format: Literal["integer", "ggml"] = Field(
        default="integer", description="integer: the grids above; ggml: every layer takes one of llama.cpp's GGML types")


class SpaceQuantizerSpec(QuantizerSpec):
    """A space file's quantizer: the storage layout, and the method of every layer when ``methods`` is absent
    (``clip_search: true`` is the older spelling of ``method: mse-clip``)."""

    method: Method | None = None
    clip_search: bool = False

    @model_validator(mode="after")
    def _groups(self):
        if self.granularity == "per-group" and self.group_size is None:
            raise ValueError("per-group quantization needs group_size")
        if self.granularity == "per-channel" and self.group_size is not None:
            raise ValueError("group_size is only meaningful with granularity per-group")
        return self


class LimitSpec(_Strict):
    min: int | None = None
    max: int | None = None


class SpaceSpec(_Strict):
    """A search-space file; ``search_spaces/default.yaml`` documents every key."""

    description: str | None = None
    choices: list[Choice] = Field(default=[2, 3, 4, 5, 6, 8], min_length=1)
    include: list[str] | None = None
    exclude: list[str] | None = None
    types: list[Literal["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                        "ConvTranspose3d", "Embedding", "RNN", "GRU", "LSTM", "MultiheadAttention", "Conv1D"]] | None = \
        Field(default=None, min_length=1)
    params: list[str] | dict[str, int | None] | None = Field(
        default=None, description="regexes of parameter names searched as weights; {regex: output-channel axis}")
    pin: dict[str, Choice] | None = None
    tie: list[str | list[str]] | None = None
    limits: dict[str, LimitSpec] | None = None
    layer_choices: dict[str, list[Choice]] | None = None
    methods: list[Method] | None = Field(default=None, min_length=1)
    sparsity: list[float | Literal["2:4"]] | None = Field(default=None, min_length=1)
    quantizer: SpaceQuantizerSpec | None = None
    blocks: str | None = Field(default=None, description="regex of the block sequence for prefix reuse; '' for none")

    @field_validator("sparsity")
    @classmethod
    def _shares(cls, v):
        if v is not None and any(not isinstance(x, str) and not 0.0 <= x < 1.0 for x in v):
            raise ValueError("each sparsity is a share in [0, 1) or \"2:4\"")
        return None if v is None else [x if isinstance(x, str) else float(x) for x in v]


class PlanLayer(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    bits: int = Field(ge=1, le=16)
    method: Method | GGMLType | Literal["float16"] = "rtn"
    sparsity: float | Literal["2:4"] = 0.0
    grid: Literal["full", "narrow"] = "full"
    shape: list[int] = Field(min_length=1)
    kind: str | None = None
    n_params: int | None = Field(default=None, ge=0)
    group_size: int | None = Field(default=None, ge=1)
    aliases: list[str] | None = None
    sensitivity: float | None = None
    weight: str | None = None  # the parameter's state-dict name, when not "<layer>.weight"
    axis: int | None = Field(default=None, ge=0)  # output-channel axis, when not 0
    module: str | None = None  # the module that owns the weight, when the layer is named by the parameter

    @field_validator("shape")
    @classmethod
    def _positive(cls, v):
        if any(d < 1 for d in v):
            raise ValueError("every dimension must be a positive integer")
        return v

    @model_validator(mode="after")
    def _count(self):
        if self.n_params is not None and self.n_params != math.prod(self.shape):
            raise ValueError(f"n_params {self.n_params} is not the product of shape {self.shape}")
        if not isinstance(self.sparsity, str) and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity {self.sparsity} is not a share in [0, 1) or \"2:4\"")
        if self.method in GGML_BITS and (self.bits != GGML_BITS[self.method] or self.sparsity != 0.0):
            raise ValueError(f"GGML type {self.method} is {GGML_BITS[self.method]}-bit and dense, "
                             f"not {self.bits}-bit at sparsity {self.sparsity}")
        return self


class PlanModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str
    fingerprint: str
    n_params: int | None = Field(default=None, ge=0)


class Predicted(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    size_bytes: int = Field(ge=0)
    metric_name: str
    metric: float | None  # null: not a finite number (e.g. sqnr of an exact model)
    avg_bits: float | None = None
    validation_metric: float | None = None


class PlanDocument(BaseModel):
    """``plan.json``, format ``mpsearch-plan``, version 2: per layer bits, method, sparsity and grid."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["mpsearch-plan"]
    version: Literal[2]
    model: PlanModel
    quantizer: QuantizerSpec
    layers: dict[str, PlanLayer]
    unquantized: list[str]
    float_layers: list[str] | None = None  # quantizable modules the plan leaves in float (v1 plans may lack it)
    predicted: Predicted
    provenance: dict[str, Any]

    @model_validator(mode="after")
    def _format(self):
        fmt = getattr(self.quantizer, "format", "integer")  # version 1 plans have integers only
        ggml = fmt == "ggml"
        for name, e in self.layers.items():
            if e.bits < 16 and (e.method in GGML_BITS) != ggml:
                raise ValueError(f"layer {name}: method {e.method} does not belong to quantizer format "
                                 f"{fmt}")
        return self


class QuantizerSpecV1(_Strict):
    scheme: Literal["symmetric", "asymmetric"] = "symmetric"
    granularity: Literal["per-channel", "per-group"] = "per-channel"
    group_size: int | None = Field(default=None, ge=1)
    clip_search: bool = False
    scale_bits: Literal[16] = 16
    zero_point_bits: int = Field(default=8, ge=1, le=16)


class PlanDocumentV1(PlanDocument):
    """Version 1: bits per layer; round to nearest (or the clipping search) on the narrow grid."""

    version: Literal[1]
    quantizer: QuantizerSpecV1


def _where(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p.startswith("literal")))]
    return ".".join(parts) or "(top level)"


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def one_line(exc: ValidationError, source: str) -> str:
    """The first violation (a union's alternatives merged), as ``source: key.path: expected ..., got ...``."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = _where(first["loc"])
    same = [e for e in errors if _where(e["loc"]) == where]
    msgs = []
    for e in same:
        m = e["msg"].removeprefix("Value error, ")
        if m not in msgs:
            msgs.append(m)
    if first["type"] == "extra_forbidden":
        text = "unknown key"
    elif first["type"] == "missing":
        text = "missing"
    else:
        text = " or ".join(msgs) + (f", got {_got(first['input'])}" if "input" in first else "")
    more = len({_where(e["loc"]) for e in errors}) - 1
    return f"{source}: {where}: {text}" + (f" (and {more} more problem(s))" if more > 0 else "")


def parse(model: type[BaseModel], data: Any, source: str, error: type[MPSearchError]):
    """``data`` validated by ``model``, or ``error`` with one line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(one_line(exc, source)) from None


def plan_json_schema() -> dict:
    return PlanDocument.model_json_schema()
