"""The search space: which layers are searched, which bit-widths each may take, pins and ties.

After construction a space holds no reference to the model, only names, shapes and
byte counts, so strategies that receive it cannot touch the model.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .errors import SpaceError
from .quantize import FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
LAYER_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}
SPACE_KEYS = {"choices", "include", "exclude", "types", "pin", "tie", "limits", "layer_choices", "quantizer", "description"}

Candidate = tuple  # bits per decision, in decision order


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable weight; ``aliases`` are other modules that share it (counted once)."""

    name: str
    kind: str
    weight_name: str
    shape: tuple[int, ...]
    choices: tuple[int, ...]
    element_size: int = 4
    aliases: tuple[str, ...] = ()

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Decision:
    """One searched bit-width, shared by every layer in ``layers`` (a tied group or a single layer)."""

    name: str
    layers: tuple[str, ...]
    choices: tuple[int, ...]

    @property
    def n_choices(self) -> int:
        return len(self.choices)


def _check_bits(bits: Iterable[int], where: str) -> tuple[int, ...]:
    out = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise SpaceError(f"{where}: bit-width {b!r} is not an integer")
        b = int(b)
        if not (1 <= b <= FLOAT16_BITS or b == UNQUANTIZED_BITS):
            raise SpaceError(f"{where}: bit-width {b} is outside 1-16 (32 means unquantized)")
        out.append(b)
    if not out:
        raise SpaceError(f"{where}: no bit-width choices")
    return tuple(sorted(set(out)))


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


@dataclass
class SearchSpace:
    layers: dict[str, LayerSpec]
    decisions: list[Decision]
    pinned: dict[str, int] = field(default_factory=dict)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    tensors: dict[str, tuple[int, int]] = field(default_factory=dict)
    fingerprint: str = ""
    model_name: str = "model"

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        choices: Sequence[int] = DEFAULT_BITS,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
        pin: dict[str, int] | None = None,
        tie: Sequence[str | Sequence[str]] | None = None,
        limits: dict[str, dict] | None = None,
        layer_choices: dict[str, Sequence[int]] | None = None,
        min_bits: int | None = None,
        max_bits: int | None = None,
        quantizer: QuantizerConfig | dict | None = None,
        model_name: str = "model",
    ) -> "SearchSpace":
        base_choices = _check_bits(choices, "choices")
        types = list(types or LAYER_TYPES)
        unknown = [t for t in types if t not in LAYER_TYPES]
        if unknown:
            raise SpaceError(f"types: unknown layer type(s) {unknown}; known: {', '.join(LAYER_TYPES)}")
        classes = tuple(LAYER_TYPES[t] for t in types)
        if isinstance(quantizer, dict):
            try:
                quantizer = QuantizerConfig.from_dict(quantizer)
            except (TypeError, ValueError) as exc:
                raise SpaceError(f"quantizer: {exc}") from None
        quantizer = quantizer or QuantizerConfig()

        found: dict[str, LayerSpec] = {}
        by_param: dict[int, str] = {}
        # A shared weight appears once in the size model, under the state-dict key kept first.
        state_key: dict[int, str] = {}
        for key, t in model.state_dict(keep_vars=True).items():
            state_key.setdefault(id(t), key)
        for name, mod in model.named_modules(remove_duplicate=False):
            if not isinstance(mod, classes) or getattr(mod, "weight", None) is None:
                continue
            w = mod.weight
            if id(w) in by_param:
                first = by_param[id(w)]
                spec = found[first]
                if name != first and name not in spec.aliases:
                    found[first] = LayerSpec(**{**spec.__dict__, "aliases": spec.aliases + (name,)})
                continue
            by_param[id(w)] = name
            kind = next(t for t in types if isinstance(mod, LAYER_TYPES[t]))
            found[name] = LayerSpec(name, kind, state_key.get(id(w), f"{name}.weight"), tuple(w.shape), base_choices,
                                    w.element_size())
        if not found:
            raise SpaceError("the model has no quantizable layer (Linear, Conv1d, Conv2d, Embedding)")

        names = list(found)
        selected = _matching(include, names, "include") if include else list(names)
        if exclude:
            dropped = set(_matching(exclude, names, "exclude"))
            selected = [n for n in selected if n not in dropped]
        if not selected:
            raise SpaceError("include/exclude leave no layer to quantize")

        per_layer = {n: base_choices for n in selected}
        for pat, ch in (layer_choices or {}).items():
            ch = _check_bits(ch, f"layer_choices[{pat}]")
            for n in _matching([pat], selected, "layer_choices"):
                per_layer[n] = ch
        lims = dict(limits or {})
        for pat in lims:
            _matching([pat], selected, "limits")
        for n in selected:
            lo, hi = min_bits, max_bits
            for pat, lim in lims.items():
                if re.fullmatch(pat, n):
                    if not isinstance(lim, dict) or set(lim) - {"min", "max"}:
                        raise SpaceError(f"limits[{pat}]: expected a mapping with 'min' and/or 'max'")
                    lo = lim.get("min", lo)
                    hi = lim.get("max", hi)
            ch = tuple(b for b in per_layer[n] if (lo is None or b >= lo) and (hi is None or b <= hi))
            if not ch:
                raise SpaceError(f"layer {n}: no bit-width left between min {lo} and max {hi}")
            per_layer[n] = ch

        pinned: dict[str, int] = {}
        for pat, bits in (pin or {}).items():
            (b,) = _check_bits([bits], f"pin[{pat}]")
            for n in _matching([pat], selected, "pin"):
                pinned[n] = b

        groups = _tie_groups(tie or [], selected)
        for g in groups:
            pins = {pinned[n] for n in g if n in pinned}
            if len(pins) > 1:
                raise SpaceError(f"tied group {list(g)} has layers pinned at different bit-widths {sorted(pins)}")
            if pins:
                (b,) = pins
                pinned.update({n: b for n in g})
        groups = [g for g in groups if g[0] not in pinned]
        layers = {n: LayerSpec(**{**found[n].__dict__, "choices": (pinned[n],) if n in pinned else per_layer[n]}) for n in selected}
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
                raise SpaceError(f"tied group {list(g)}: its layers share no bit-width")
            decisions.append(Decision("+".join(g), tuple(g), tuple(sorted(common))))
        order = {n: i for i, n in enumerate(names)}
        decisions.sort(key=lambda d: order[d.layers[0]])
        return cls(
            layers=layers,
            decisions=decisions,
            pinned=pinned,
            quantizer=quantizer,
            tensors=unique_state_tensors(model),
            fingerprint=model_fingerprint(model),
            model_name=model_name,
        )

    @classmethod
    def from_yaml(cls, path: str | Path, model: nn.Module, model_name: str = "model") -> "SearchSpace":
        return cls.from_spec(load_space_file(path), model, model_name=model_name)

    @classmethod
    def from_spec(cls, spec: dict, model: nn.Module, model_name: str = "model") -> "SearchSpace":
        unknown = set(spec) - SPACE_KEYS
        if unknown:
            raise SpaceError(f"unknown search-space key(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(SPACE_KEYS))}")
        kw = {k: v for k, v in spec.items() if k != "description"}
        if "choices" in kw and not isinstance(kw["choices"], (list, tuple)):
            raise SpaceError("choices: expected a list of bit-widths")
        if "choices" not in kw:
            kw["choices"] = DEFAULT_BITS
        return cls.from_model(model, model_name=model_name, **kw)

    # ---- candidates -----------------------------------------------------------------
    @property
    def n_decisions(self) -> int:
        return len(self.decisions)

    @property
    def n_choices(self) -> list[int]:
        return [d.n_choices for d in self.decisions]

    @property
    def cardinality(self) -> int:
        return math.prod(self.n_choices)

    def decode(self, indices: Sequence[int]) -> Candidate:
        """Choice indices (ordered low to high bits) -> bits per decision."""
        if len(indices) != self.n_decisions:
            raise ValueError(f"expected {self.n_decisions} indices, got {len(indices)}")
        return tuple(d.choices[int(i)] for d, i in zip(self.decisions, indices))

    def encode(self, candidate: Sequence[int]) -> tuple[int, ...]:
        self.validate(candidate)
        return tuple(d.choices.index(int(b)) for d, b in zip(self.decisions, candidate))

    def validate(self, candidate: Sequence[int]) -> Candidate:
        if len(candidate) != self.n_decisions:
            raise ValueError(f"candidate has {len(candidate)} entries, the space has {self.n_decisions} decisions")
        for d, b in zip(self.decisions, candidate):
            if int(b) not in d.choices:
                raise ValueError(f"decision {d.name}: {b} bits is not among its choices {list(d.choices)}")
        return tuple(int(b) for b in candidate)

    def layer_bits(self, candidate: Sequence[int]) -> dict[str, int]:
        """Bits of every layer in the space (pinned ones included) for a candidate."""
        bits = dict(self.pinned)
        for d, b in zip(self.decisions, candidate):
            for n in d.layers:
                bits[n] = int(b)
        return bits

    def candidate_from_layer_bits(self, layer_bits: dict[str, int]) -> Candidate:
        cand = []
        for d in self.decisions:
            vals = {int(layer_bits[n]) for n in d.layers if n in layer_bits}
            if len(vals) != 1:
                raise ValueError(f"decision {d.name}: expected one bit-width for its layers, got {sorted(vals) or 'none'}")
            cand.append(vals.pop())
        return self.validate(cand)

    def uniform(self, bits: int) -> Candidate | None:
        """Every decision at ``bits``; None when some decision cannot take it."""
        if any(bits not in d.choices for d in self.decisions):
            return None
        return tuple(bits for _ in self.decisions)

    def uniform_bits(self) -> list[int]:
        """Bit-widths that every decision allows (the uniform baselines)."""
        common = set(self.decisions[0].choices) if self.decisions else set()
        for d in self.decisions[1:]:
            common &= set(d.choices)
        return sorted(common)

    def highest(self) -> Candidate:
        return tuple(d.choices[-1] for d in self.decisions)

    def lowest(self) -> Candidate:
        return tuple(d.choices[0] for d in self.decisions)

    def random(self, rng: np.random.Generator) -> Candidate:
        return tuple(d.choices[int(rng.integers(d.n_choices))] for d in self.decisions)

    def enumerate(self) -> Iterator[Candidate]:
        return itertools.product(*(d.choices for d in self.decisions))

    def summary(self) -> str:
        return (
            f"{len(self.layers)} layers, {self.n_decisions} decisions, {len(self.pinned)} pinned, "
            f"{self.cardinality:.3g} candidates"
        )


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


def load_space_file(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpaceError(f"cannot read search space {p}: {exc.strerror or exc}") from None
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpaceError(f"malformed YAML in {p}{where}: {getattr(exc, 'problem', None) or exc}") from None
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise SpaceError(f"{p}: a search space file must be a YAML mapping")
    return spec
