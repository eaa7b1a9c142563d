"""The search space as plain data: searched layers, their choices, pins and ties.

A space holds names, shapes and byte counts, never the model, so strategies that receive
it cannot touch the model and import no torch. ``mpsearch.model`` builds spaces from a
``torch.nn.Module``; everything here works on the description alone.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import CandidateError, SpaceError
from .qconfig import FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig, Setting

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)

Candidate = tuple  # one choice per decision, in decision order: bits (int), or a setting label such as "4/gptq"
Choice = int | str


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable weight; ``aliases`` are other modules that share it (counted once).

    ``name`` is the module's name when the weight is a module's ``weight`` (Linear, Conv, Embedding), or the
    parameter's full name otherwise (``gru.weight_hh_l0``, ``attn.in_proj_weight``); ``module`` is then the
    module that owns it, where its weight is swapped in. ``axis`` is the output-channel axis: scales are
    per slice along it (1 for transposed convolutions and GPT-2's ``Conv1D``, 0 otherwise)."""

    name: str
    kind: str
    weight_name: str
    shape: tuple[int, ...]
    choices: tuple[Choice, ...]
    element_size: int = 4
    aliases: tuple[str, ...] = ()
    axis: int = 0
    module: str | None = None  # None: the module named ``name``; "" is the root module

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """The shape with the output-channel axis first: the layout scales and groups are counted in."""
        return rows_shape(self.shape, self.axis)

    @property
    def hook_modules(self) -> tuple[str, ...]:
        """Modules whose forward reads the weight."""
        return (self.name if self.module is None else self.module, *self.aliases)


def rows_shape(shape: Sequence[int], axis: int = 0) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape if axis == 0 else (shape[axis], *shape[:axis], *shape[axis + 1:])


@dataclass(frozen=True)
class Decision:
    """One searched setting, shared by every layer in ``layers`` (a tied group or a single layer).

    ``choices`` are ordered from the smallest to the largest (bits, or setting labels when the space
    searches methods or sparsity too)."""

    name: str
    layers: tuple[str, ...]
    choices: tuple[Choice, ...]

    @property
    def n_choices(self) -> int:
        return len(self.choices)


def as_choice(value) -> Choice:
    """A choice as candidates hold it: a setting label stays a string, bits become a plain int."""
    return value if isinstance(value, str) else int(value)


def check_bits(bits: Iterable[int], where: str) -> tuple[int, ...]:
    """Sorted, distinct bit-widths, each 1-16 or 32 (unquantized)."""
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


@dataclass
class SearchSpace:
    layers: dict[str, LayerSpec]
    decisions: list[Decision]
    pinned: dict[str, int] = field(default_factory=dict)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    tensors: dict[str, tuple[int, int]] = field(default_factory=dict)  # every stored tensor: (numel, element size)
    fingerprint: str = ""
    model_name: str = "model"
    excluded: list[str] = field(default_factory=list)  # quantizable layers the space leaves in float
    settings: dict = field(default_factory=dict)  # choice -> Setting, for every choice the space offers
    method: str = "rtn"  # the method of choices given as bits alone
    blocks: str | None = None  # regex naming the model's block sequence (prefix reuse); None: found automatically

    def setting(self, choice: Choice) -> Setting:
        """What a choice means: its bits, method and sparsity."""
        s = self.settings.get(choice)
        if s is not None:
            return s
        if isinstance(choice, str):
            return Setting.from_label(choice)
        return Setting(int(choice), self.method)

    @property
    def n_decisions(self) -> int:
        return len(self.decisions)

    @property
    def n_choices(self) -> list[int]:
        return [d.n_choices for d in self.decisions]

    @property
    def cardinality(self) -> int:
        return math.prod(self.n_choices)

    def signature(self) -> dict:
        """What identifies a space across processes and runs: stored studies are checked against it."""
        return {"fingerprint": self.fingerprint, "decisions": [d.name for d in self.decisions],
                "choices": [list(d.choices) for d in self.decisions]}

    def decode(self, indices: Sequence[int]) -> Candidate:
        """Choice indices (ordered low to high bits) -> bits per decision."""
        if len(indices) != self.n_decisions:
            raise ValueError(f"expected {self.n_decisions} indices, got {len(indices)}")
        return tuple(d.choices[int(i)] for d, i in zip(self.decisions, indices))

    def encode(self, candidate: Sequence[int]) -> tuple[int, ...]:
        return tuple(d.choices.index(b) for d, b in zip(self.decisions, self.check_candidate(candidate)))

    def describe(self, choice: Choice) -> str:
        """A choice in words: "3-bit", or its setting label ("4/gptq/50%")."""
        return choice if isinstance(choice, str) else f"{choice}-bit"

    def check_candidate(self, candidate: Sequence[Choice]) -> Candidate:
        """The candidate as a tuple; refuses a wrong length, a value of the wrong type, or a choice not offered."""
        if isinstance(candidate, (str, bytes)) or not hasattr(candidate, "__len__"):
            raise CandidateError(f"a candidate is a sequence of bit-widths, one per decision; got {candidate!r}")
        if len(candidate) != self.n_decisions:
            raise CandidateError(f"candidate has {len(candidate)} entries, the space has {self.n_decisions} decisions")
        out = []
        for d, b in zip(self.decisions, candidate):
            if isinstance(b, bool) or not isinstance(b, (int, np.integer, str)):
                raise CandidateError(f"decision {d.name}: a choice is bits (an integer) or a setting label, got {b!r}")
            b = b if isinstance(b, str) else int(b)
            if b not in d.choices:
                raise CandidateError(f"decision {d.name}: {b!r} is not among its choices {list(d.choices)}")
            out.append(b)
        return tuple(out)

    def layer_choices(self, candidate: Sequence[Choice]) -> dict[str, Choice]:
        """The choice of every layer in the space (pinned ones included) for a candidate."""
        out = dict(self.pinned)
        for d, b in zip(self.decisions, candidate):
            for n in d.layers:
                out[n] = b
        return out

    def layer_settings(self, candidate: Sequence[Choice]) -> dict[str, Setting]:
        """The setting of every layer in the space (pinned ones included) for a candidate, in network order."""
        chosen = self.layer_choices(candidate)
        return {n: self.setting(chosen[n]) for n in self.layers}

    def candidate_from_layer_choices(self, layer_choices: dict[str, Choice]) -> Candidate:
        cand = []
        for d in self.decisions:
            vals = {layer_choices[n] for n in d.layers if n in layer_choices}
            if len(vals) != 1:
                raise ValueError(f"decision {d.name}: expected one choice for its layers, got {sorted(map(str, vals)) or 'none'}")
            cand.append(vals.pop())
        return self.check_candidate(cand)

    def uniform(self, choice: Choice) -> Candidate | None:
        """Every decision at ``choice``; None when some decision cannot take it."""
        if any(choice not in d.choices for d in self.decisions):
            return None
        return tuple(choice for _ in self.decisions)

    def uniform_choices(self) -> list[Choice]:
        """Choices that every decision allows (the uniform baselines), in the first decision's order."""
        if not self.decisions:
            return []
        common = set(self.decisions[0].choices)
        for d in self.decisions[1:]:
            common &= set(d.choices)
        return [c for c in self.decisions[0].choices if c in common]

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
