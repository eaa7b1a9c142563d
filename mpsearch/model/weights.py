"""Which weights of a module a deployment quantizes, where each lives, and its output-channel axis.

Most layers hold one ``weight`` whose first axis is the output channel (Linear, Conv, Embedding).
The others differ in one of two ways, handled here once for the space, the evaluator, plans and
exporters alike:

- several searched weights in one module (a GRU's ``weight_ih_l0``/``weight_hh_l0``, a multi-head
  attention's packed ``in_proj_weight``): each is its own layer, named by the parameter's full name;
- the output channel on another axis (transposed convolutions store (in, out/groups, k...); GPT-2's
  ``Conv1D`` stores (in, out)): the weight is quantized with that axis moved first, so scales are
  per output channel (per gate row for recurrent weights), and moved back after.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# kind -> module class; Conv1D is matched by name (transformers is an optional dependency)
MODULE_TYPES: dict[str, type] = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d, "ConvTranspose2d": nn.ConvTranspose2d,
    "ConvTranspose3d": nn.ConvTranspose3d, "Embedding": nn.Embedding,
    "RNN": nn.RNN, "GRU": nn.GRU, "LSTM": nn.LSTM, "MultiheadAttention": nn.MultiheadAttention,
}
KINDS = (*MODULE_TYPES, "Conv1D", "param")
# kinds whose weight sees the layer's inputs as rows (gptq and gradient can use them)
INPUT_KINDS = frozenset({"Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D"})
_RECURRENT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")
_ATTENTION = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class FoundWeight:
    """A searchable weight: ``name`` (the layer's name), its module, the attribute, the kind and the axis."""

    name: str
    module: str
    attr: str
    kind: str
    axis: int


def takes_inputs(spec) -> bool:
    """Whether a layer's inputs can be captured as rows of its weight (for gptq and gradient): a Linear,
    Conv or Conv1D whose own forward runs (not one that an attention module reads directly)."""
    return spec.kind in INPUT_KINDS and spec.module is None


def is_hf_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and kin): a Linear whose weight is stored transposed, (in, out)."""
    w = getattr(mod, "weight", None)
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def module_kind(mod: nn.Module) -> str | None:
    if is_hf_conv1d(mod):
        return "Conv1D"
    for kind, cls in MODULE_TYPES.items():
        if type(mod) is cls:
            return kind
    for kind, cls in MODULE_TYPES.items():  # subclasses (out_proj's NonDynamicallyQuantizableLinear)
        if isinstance(mod, cls):
            return kind
    return None


def module_weights(name: str, mod: nn.Module, kinds) -> list[FoundWeight]:
    """The searchable weights that ``mod`` itself owns (not its children's), if its kind is in ``kinds``."""
    kind = module_kind(mod)
    if kind is None or kind not in kinds:
        return []
    own = dict(mod.named_parameters(recurse=False))
    if kind in ("RNN", "GRU", "LSTM"):
        return [FoundWeight(_join(name, p), name, p, kind, 0) for p in own if _RECURRENT.fullmatch(p)]
    if kind == "MultiheadAttention":
        return [FoundWeight(_join(name, p), name, p, kind, 0) for p in _ATTENTION if own.get(p) is not None]
    if own.get("weight") is None:
        return []
    axis = 1 if kind == "Conv1D" or kind.startswith("ConvTranspose") else 0
    return [FoundWeight(name, name, "weight", kind, axis)]


def param_axis(model: nn.Module, module: str, attr: str) -> int:
    """The output-channel axis of a parameter named by a ``params:`` pattern: its module's rule, else 0."""
    mod = model.get_submodule(module)
    for f in module_weights(module, mod, KINDS):
        if f.attr == attr:
            return f.axis
    return 0


def _join(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def get_weight(model: nn.Module, weight_name: str) -> torch.Tensor:
    """The parameter (or buffer) a layer's ``weight_name`` names; KeyError when the model has none."""
    module, _, attr = weight_name.rpartition(".")
    try:
        mod = model.get_submodule(module)
    except AttributeError:
        raise KeyError(weight_name) from None
    t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        raise KeyError(weight_name)
    return t


def to_rows(w: torch.Tensor, axis: int) -> torch.Tensor:
    """The weight with its output-channel axis first (a view when ``axis`` is 0)."""
    return w if axis == 0 else w.movedim(axis, 0).contiguous()


def from_rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t if axis == 0 else t.movedim(0, axis).contiguous()



def macs_rule(spec, module: nn.Module):
    """``fn(args, kwargs, output) -> int``: the multiply-accumulates a forward of ``module`` (where ``spec``'s
    weight is swapped in) spends on that weight; None where it spends none (an Embedding looks rows up) or
    the kind is unknown (``params:``)."""
    inner = 1
    for d in spec.rows_shape[1:]:
        inner *= d
    numel = inner * spec.rows_shape[0]
    first = lambda out: out[0] if isinstance(out, (tuple, list)) else out  # noqa: E731

    def tokens(t: torch.Tensor) -> int:  # rows of a (..., features) tensor
        return t.numel() // max(t.shape[-1], 1)

    here = module_kind(module) or ""  # a tied weight may be an Embedding's here and a Linear's there
    if here.startswith("ConvTranspose"):  # weight (in, out/groups, k...): each input value meets out/groups x k
        fan_out = numel // spec.shape[0]
        return lambda args, kwargs, out: args[0].numel() * fan_out
    if here == "Embedding":
        return None
    if here in INPUT_KINDS or spec.kind in INPUT_KINDS:  # Linear, Conv, Conv1D; out_proj inside its attention
        return lambda args, kwargs, out: first(out).numel() * inner
    if spec.kind in ("RNN", "GRU", "LSTM"):
        return lambda args, kwargs, out: numel * tokens(first(out)) if isinstance(first(out), torch.Tensor) else 0
    if spec.kind == "MultiheadAttention":
        attr = spec.name.rpartition(".")[2]
        which = {"q_proj_weight": (0,), "k_proj_weight": (1,), "v_proj_weight": (2,), "in_proj_weight": (0, 1, 2)}[attr]
        names = ("query", "key", "value")

        def attention(args, kwargs, out):
            inputs = [args[i] if i < len(args) else kwargs[names[i]] for i in which]
            return numel // len(which) * sum(tokens(t) for t in inputs)

        return attention
    return None
