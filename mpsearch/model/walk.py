"""Walking a ``torch.nn.Module`` into a ``SearchSpace``: which weights are searched, with what choices.

The space that comes out is plain data (``mpsearch.core.space``); this module is the only
place that looks at the model to build it.
"""
from __future__ import annotations

import hashlib
import math
import re
import warnings
from typing import Sequence

from torch import nn

from ..core.ggml_types import effective_type
from ..core.qconfig import (DATA_METHODS, GGML_BITS, GGML_FLOATS, METHODS, SEMI_STRUCTURED, QuantizerConfig, Setting,
                            ggml_fits, is_integer_bits)
from ..core.sizes import layer_bytes
from ..core.space import Decision, LayerSpec, SearchSpace, check_bits
from ..errors import MPSearchWarning, SpaceError
from ..schemas import SpaceSpec, parse
from .weights import KINDS, get_weight, module_weights, param_axis, takes_inputs

DEFAULT_KINDS = tuple(k for k in KINDS if k != "param")


def _matching(patterns: Sequence[str], names: Sequence[str], what: str) -> list[str]:
    """Names that fully match any pattern; a pattern that matches nothing is an error."""
    hits: list[str] = []
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as exc:
            raise SpaceError(f"{what}: invalid pattern {pat!r}: {exc}") from None
        found = [n for n in names if rx.fullmatch(n)]
        if not found:
            raise SpaceError(f"{what}: pattern {pat!r} matches no layer")
        hits.extend(n for n in found if n not in hits)
    return hits


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the state's tensor names, shapes and dtypes: stable across processes, blind to values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return "sha256:" + h.hexdigest()


def unique_state_tensors(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every tensor that ships with the model (parameters and persistent buffers), shared ones once."""
    seen: dict[int, str] = {}
    out: dict[str, tuple[int, int]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen:
            continue
        seen[key] = name
        out[name] = (t.numel(), t.element_size())
    return out


def build_space(
    model: nn.Module,
    choices: Sequence[int | str] | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[str] | None = None,
    params: Sequence[str] | dict[str, int | None] | None = None,
    pin: dict[str, int] | None = None,
    tie: Sequence[str | Sequence[str]] | None = None,
    limits: dict[str, dict] | None = None,
    layer_choices: dict[str, Sequence[int]] | None = None,
    methods: Sequence[str] | None = None,
    sparsity: Sequence[float | str] | None = None,
    blocks: str | None = None,
    min_bits: int | None = None,
    max_bits: int | None = None,
    quantizer: QuantizerConfig | dict | None = None,
    model_name: str = "model",
    source: str = "search space",
) -> SearchSpace:
    """The space of ``model``'s quantizable weights; every argument is checked by ``SpaceSpec`` first.

    ``types`` limits the kinds searched (default: every kind ``model.weights`` knows); ``params`` adds any
    parameter whose full name a regex matches, as a list of regexes or ``{regex: output-channel axis}``
    (null: the axis its module's rule gives, else 0). Weights of two or more dimensions left outside the
    space by their type get a warning with their share of the model's bytes.

    Each layer's choices are its bit-widths times ``methods`` times ``sparsity`` levels, ordered from
    the smallest to the largest (equal sizes: cheaper method first). Methods that need a layer's
    inputs (gptq, gradient) are offered beside others only where the inputs are captured (``takes_inputs``:
    Linear, Conv, Conv1D); elsewhere they reduce to the clipping search. 2:4 sparsity only where the
    output-channel rows are a multiple of 4 long."""
    if isinstance(quantizer, QuantizerConfig):
        quantizer = quantizer.to_dict()
    raw = {"choices": list(choices) if isinstance(choices, (list, tuple)) else choices, "include": include,
           "exclude": exclude, "types": types, "params": params, "pin": pin, "tie": tie, "limits": limits,
           "layer_choices": layer_choices, "methods": methods, "sparsity": sparsity, "quantizer": quantizer,
           "blocks": blocks}
    spec = parse(SpaceSpec, {k: v for k, v in raw.items() if v is not None}, source, SpaceError)
    kinds = list(spec.types or DEFAULT_KINDS)
    qspec = spec.quantizer.model_dump() if spec.quantizer else {}
    default_method = qspec.pop("method", None) or ("mse-clip" if qspec.pop("clip_search", False) else "rtn")
    qspec.pop("clip_search", None)
    quantizer = QuantizerConfig(**qspec)
    ggml = quantizer.format == "ggml"
    integer_only = sorted((spec.quantizer.model_fields_set if spec.quantizer else set()) - {"format"})
    if ggml and integer_only:
        raise SpaceError(f"{source}: quantizer.{integer_only[0]} does not apply to format ggml: a GGML type fixes its "
                         "own blocks, scales and rounding")
    if ggml and (spec.methods or spec.sparsity):
        raise SpaceError(f"{source}: a ggml space's choices are GGML types, which fix the arithmetic and store every "
                         "weight: drop methods and sparsity")
    if ggml and "choices" not in spec.model_fields_set:
        spec.choices = [c for c in GGML_CHOICES if c != "f32"]
    base_choices = _choice_list(spec.choices, "choices", ggml)
    method_list = list(dict.fromkeys(spec.methods or [default_method]))
    sparsity_list = list(dict.fromkeys(spec.sparsity or [0.0]))
    include, exclude, pin, tie = spec.include, spec.exclude, spec.pin, spec.tie
    limits = {k: v.model_dump(exclude_none=True) for k, v in (spec.limits or {}).items()}
    layer_choices = spec.layer_choices
    blocks = spec.blocks

    found = _find_weights(model, kinds, spec.params, () if ggml else base_choices)
    if not found:
        raise SpaceError(f"the model has no quantizable weight of the types {', '.join(kinds)}")
    _warn_unsearched(model, found, source)

    names = list(found)
    selected = _matching(include, names, "include") if include else list(names)
    if exclude:
        dropped = set(_matching(exclude, names, "exclude"))
        selected = [n for n in selected if n not in dropped]
    if not selected:
        raise SpaceError("include/exclude leave no layer to quantize")

    per_layer = {n: base_choices for n in selected}
    for pat, ch in (layer_choices or {}).items():
        ch = _choice_list(ch, f"layer_choices[{pat}]", ggml)
        for n in _matching([pat], selected, "layer_choices"):
            per_layer[n] = ch
    lims = dict(limits or {})
    for pat in lims:
        _matching([pat], selected, "limits")
    for n in selected:
        lo, hi = min_bits, max_bits
        for pat, lim in lims.items():
            if re.fullmatch(pat, n):
                lo = lim.get("min", lo)
                hi = lim.get("max", hi)
        ch = tuple(b for b in per_layer[n] if (lo is None or _bits(b) >= lo) and (hi is None or _bits(b) <= hi))
        if not ch:
            raise SpaceError(f"layer {n}: no bit-width left between min {lo} and max {hi}")
        per_layer[n] = ch

    offered = {n: (_ggml_settings(found[n], per_layer[n], quantizer) if ggml else
                   _settings(found[n], per_layer[n], method_list, sparsity_list, quantizer)) for n in selected}
    styles = {(x.method, x.sparsity) for sets in offered.values() for x in sets if x.quantized}
    method = next(iter(styles))[0] if len(styles) == 1 else default_method
    pin_settings: dict[str, Setting] = {}
    for pat, value in (pin or {}).items():
        try:
            pin_settings[pat] = (_choice_list([value], f"pin[{pat}]", True)[0] if ggml
                                 else Setting.from_label(value) if isinstance(value, str)
                                 else Setting(check_bits([value], f"pin[{pat}]")[0], method))
            if pin_settings[pat].ggml and not ggml:
                raise ValueError(f"{value!r} is a GGML type, which needs quantizer: {{format: ggml}}")
        except ValueError as exc:
            raise SpaceError(f"pin[{pat}]: {exc}") from None
    styles |= {(x.method, x.sparsity) for x in pin_settings.values() if x.quantized}
    # one method and no pruning anywhere: choices are plain bit-widths; else setting labels ("4/gptq/50%")
    bits_only = len(styles) <= 1 and not any(sp for _, sp in styles) and not ggml
    settings: dict = {}

    def label(x: Setting):
        c = x.bits if bits_only else x.label()
        settings[c] = x
        return c

    pinned: dict[str, int | str] = {}
    for pat, x in pin_settings.items():
        for n in _matching([pat], selected, "pin"):
            if x.ggml and not ggml_fits(x.method, found[n].rows_shape):
                raise SpaceError(f"pin[{pat}]: layer {n}'s rows of {math.prod(found[n].rows_shape[1:])} weights are not "
                                 f"a multiple of {x.method}'s block: llama.cpp would store "
                                 f"{effective_type(x.method, math.prod(found[n].rows_shape[1:]))}")
            pinned[n] = label(x)

    groups = _tie_groups(tie or [], selected)
    for g in groups:
        pins = {pinned[n] for n in g if n in pinned}
        if len(pins) > 1:
            raise SpaceError(f"tied group {list(g)} has layers pinned at different settings {sorted(map(str, pins))}")
        if pins:
            (b,) = pins
            pinned.update({n: b for n in g})
    groups = [g for g in groups if g[0] not in pinned]
    layers = {n: LayerSpec(**{**found[n].__dict__,
                              "choices": (pinned[n],) if n in pinned else tuple(label(x) for x in offered[n])})
              for n in selected}
    tied = {n for g in groups for n in g}
    decisions: list[Decision] = []
    for n in selected:
        if n in pinned or n in tied:
            continue
        decisions.append(Decision(n, (n,), layers[n].choices))
    for g in groups:
        common = set(layers[g[0]].choices)
        for n in g[1:]:
            common &= set(layers[n].choices)
        if not common:
            raise SpaceError(f"tied group {list(g)}: its layers share no setting")
        decisions.append(Decision("+".join(g), tuple(g), tuple(c for c in layers[g[0]].choices if c in common)))
    order = {n: i for i, n in enumerate(names)}
    decisions.sort(key=lambda d: order[d.layers[0]])
    if ggml:
        wide = [n for n in selected if found[n].element_size != 4]
        if wide:
            raise SpaceError(f"{source}: a ggml space needs a float32 model (its GGUF is converted in float32, and the "
                             f"tensors left in float count at 4 bytes); {wide[0]} is not float32")
    if quantizer.scheme == "asymmetric" and not ggml:
        widest = max((x.bits for x in settings.values() if x.quantized), default=0)
        if widest > quantizer.zero_point_bits:
            raise SpaceError(f"{source}: quantizer.zero_point_bits {quantizer.zero_point_bits} cannot hold the "
                             f"zero-points of {widest}-bit weights")
    return SearchSpace(
        layers=layers,
        decisions=decisions,
        pinned=pinned,
        quantizer=quantizer,
        tensors=unique_state_tensors(model),
        fingerprint=model_fingerprint(model),
        model_name=model_name,
        excluded=[n for n in names if n not in layers],
        settings=settings,
        method=method,
        blocks=blocks,
    )


def _settings(layer: LayerSpec, bits: Sequence[int], methods: list[str], sparsities: list, cfg: QuantizerConfig
              ) -> tuple[Setting, ...]:
    """The settings a layer is offered, smallest first (equal sizes: cheaper method, then denser)."""
    inner = math.prod(layer.rows_shape[1:])
    usable = [m for m in methods if takes_inputs(layer) or m not in DATA_METHODS] or methods
    out = []
    for b in bits:
        if not is_integer_bits(b):
            out.append(Setting(b))
            continue
        out += [Setting(b, m, sp) for m in usable for sp in sparsities if not (sp == SEMI_STRUCTURED and inner % 4)]
    rank = {m: i for i, m in enumerate(METHODS)}
    return tuple(sorted(dict.fromkeys(out), key=lambda x: (layer_bytes(layer, x, cfg), rank.get(x.method, 0),
                                                          str(x.sparsity))))


# the choices a ggml space may name; when its file names none, all but f32 (every GGML type mpsearch computes, f16)
GGML_CHOICES = (*sorted(GGML_BITS, key=lambda t: (GGML_BITS[t], t)), *GGML_FLOATS)


def _bits(choice) -> int:
    return choice.bits if isinstance(choice, Setting) else choice


def _choice_list(values, where: str, ggml: bool) -> tuple:
    """Bit-widths (integer format), or the GGML types' settings (ggml format), checked, smallest first."""
    if not ggml:
        if any(isinstance(v, str) for v in values):
            bad = next(v for v in values if isinstance(v, str))
            hint = " (GGML types need quantizer: {format: ggml})" if bad.lower() in GGML_CHOICES else ""
            raise SpaceError(f"{where}: {bad!r} is not a bit-width{hint}")
        return check_bits(values, where)
    out = []
    for v in values:
        name = v.lower() if isinstance(v, str) else v
        if name not in GGML_CHOICES and name not in ("float16", "float32"):
            raise SpaceError(f"{where}: {v!r} is not a GGML type this space can search; choose from "
                             f"{', '.join(GGML_CHOICES)}")
        out.append(Setting.from_label(name))
    return tuple(sorted(dict.fromkeys(out), key=lambda x: (x.bits, x.method)))


def _ggml_settings(layer: LayerSpec, settings: Sequence[Setting], cfg: QuantizerConfig) -> tuple[Setting, ...]:
    """The GGML types a layer is offered, smallest first: only those llama.cpp stores as asked for its rows
    (a K-quant on rows that are not a multiple of 256 would become another type)."""
    fits = [x for x in settings if not x.ggml or ggml_fits(x.method, layer.rows_shape)]
    if not fits:
        inner = math.prod(layer.rows_shape[1:])
        raise SpaceError(f"layer {layer.name}: its rows of {inner} weights fit none of the GGML types offered "
                         f"({', '.join(x.label() for x in settings)}); add f16 or exclude the layer")
    return tuple(sorted(fits, key=lambda x: (layer_bytes(layer, x, cfg), x.method)))


def space_from_spec(spec: dict, model: nn.Module, model_name: str = "model", source: str = "search space") -> SearchSpace:
    """A space from a parsed space file (a mapping of the keys ``search_spaces/default.yaml`` documents)."""
    if not isinstance(spec, dict):
        raise SpaceError(f"{source}: a search space must be a mapping of keys, got {type(spec).__name__}")
    checked = parse(SpaceSpec, spec, source, SpaceError)
    kw = checked.model_dump(exclude_none=True, exclude={"description"})
    if "choices" not in checked.model_fields_set:  # the default depends on the quantizer's format
        del kw["choices"]
    if checked.quantizer is not None:  # only what the file says: a ggml quantizer refuses integer-only keys
        kw["quantizer"] = checked.quantizer.model_dump(exclude_unset=True)
    return build_space(model, model_name=model_name, source=source, **kw)


def _tie_groups(tie: Sequence[str | Sequence[str]], free: list[str]) -> list[tuple[str, ...]]:
    """Tie entries: a list of patterns (one group) or one regex whose capture groups key the groups."""
    groups: list[tuple[str, ...]] = []
    used: set[str] = set()
    for entry in tie:
        if isinstance(entry, str):
            try:
                rx = re.compile(entry)
            except re.error as exc:
                raise SpaceError(f"tie: invalid pattern {entry!r}: {exc}") from None
            keyed: dict[tuple, list[str]] = {}
            for n in free:
                m = rx.fullmatch(n)
                if m:
                    keyed.setdefault(m.groups(), []).append(n)
            if not keyed:
                raise SpaceError(f"tie: pattern {entry!r} matches no searched layer")
            new = [tuple(v) for v in keyed.values()]
        else:
            new = [tuple(_matching(list(entry), free, "tie"))]
        for g in new:
            overlap = used.intersection(g)
            if overlap:
                raise SpaceError(f"tie: layer(s) {sorted(overlap)} belong to two tied groups")
            used.update(g)
            if len(g) > 1:
                groups.append(g)
    return groups


def _find_weights(model: nn.Module, kinds: Sequence[str], params, choices) -> dict[str, LayerSpec]:
    """Every searchable weight, in network order: those ``params`` names first (they take precedence over a
    module rule that would find the same tensor), then the module rules. A weight is found once; every other
    module that owns it is an alias, swapped in too (a shared weight is stored once, under the state-dict key
    kept first)."""
    state_key: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        state_key.setdefault(id(t), key)
    modules = list(model.named_modules(remove_duplicate=False))
    position: dict[str, int] = {}
    owners: dict[int, list[str]] = {}
    for i, (n, m) in enumerate(modules):
        position.setdefault(n, i)
        for _, p in m.named_parameters(recurse=False):
            if n not in owners.setdefault(id(p), []):
                owners[id(p)].append(n)
    attention = [n for n, m in modules if isinstance(m, nn.MultiheadAttention)]

    def reader(module: str) -> str:
        """Where a weight of ``module`` is swapped in: nn.MultiheadAttention reads its out_proj's weight
        itself, never calling out_proj, so that one goes in around the attention."""
        return next((a for a in attention if module != a and (a == "" or module.startswith(a + "."))), module)

    found: dict[str, LayerSpec] = {}
    seen: set[int] = set()

    def add(name: str, module: str, attr: str, kind: str, axis: int) -> None:
        w = getattr(model.get_submodule(module), attr)
        if id(w) in seen:
            return
        seen.add(id(w))
        main = reader(module)
        aliases = tuple(dict.fromkeys(h for h in map(reader, owners.get(id(w), [])) if h != main))
        found[name] = LayerSpec(name, kind, state_key.get(id(w), f"{module}.{attr}" if module else attr),
                                tuple(w.shape), choices, w.element_size(), aliases=aliases, axis=axis,
                                module=None if main == name else main)

    if params:
        patterns = params if isinstance(params, dict) else {p: None for p in params}
        named = list(model.named_parameters(remove_duplicate=False))
        for pat, axis in patterns.items():
            try:
                rx = re.compile(pat)
            except re.error as exc:
                raise SpaceError(f"params: invalid pattern {pat!r}: {exc}") from None
            hits = [(n, p) for n, p in named if rx.fullmatch(n) and p.dim() >= 2]  # norms and biases: not weights
            if not hits:
                raise SpaceError(f"params: pattern {pat!r} matches no parameter of 2 or more dimensions")
            for n, p in hits:
                module, _, attr = n.rpartition(".")
                ax = param_axis(model, module, attr) if axis is None else axis
                if not -p.dim() <= ax < p.dim():
                    raise SpaceError(f"params: axis {ax} is outside {n}'s {p.dim()} dimensions")
                add(n, module, attr, "param", ax % p.dim())
    for name, mod in modules:
        for f in module_weights(name, mod, kinds):
            add(f.name, f.module, f.attr, f.kind, f.axis)
    rank = {n: i for i, n in enumerate(found)}
    first = {n: min(position[h] for h in spec.hook_modules) for n, spec in found.items()}  # its first reader
    return {n: found[n] for n in sorted(found, key=lambda n: (first[n], rank[n]))}


def unsearched_weights(model: nn.Module, found: dict[str, LayerSpec]) -> dict[str, int]:
    """Parameters of two or more dimensions that no layer of ``found`` covers, with their bytes."""
    ids = {id(get_weight(model, spec.weight_name)) for spec in found.values()}
    out = {}
    for n, p in model.named_parameters():
        if p.dim() >= 2 and id(p) not in ids:
            out[n] = p.numel() * p.element_size()
    return out


def _warn_unsearched(model: nn.Module, found: dict[str, LayerSpec], source: str) -> None:
    left = unsearched_weights(model, found)
    if not left:
        return
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values()) or 1
    share = sum(left.values()) / total
    names = ", ".join(list(left)[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    warnings.warn(f"{source}: {len(left)} weight(s) of a type not searched stay in float, {share:.1%} of the model's "
                  f"bytes: {names} (name them under `params:` to search them)", MPSearchWarning, stacklevel=3)
