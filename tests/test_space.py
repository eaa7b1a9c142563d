"""Search space: pins, ties, limits and clear errors for bad specs, on the real small models."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from torch import nn

from mpsearch.errors import SpaceError
from mpsearch.tasks.digits import load_model as load_digits_model
from mpsearch.core import SearchSpace
from mpsearch.model import build_space, load_space_file, space_from_spec


def from_yaml(path, model):
    return space_from_spec(load_space_file(path), model)

QKV_TIE = r"bert\.encoder\.layer\.(\d+)\.attention\.self\.(?:query|key|value)"
WORD_EMB = "bert.embeddings.word_embeddings"
DIGITS_LAYERS = ["features.0", "features.2", "features.5", "classifier.1", "classifier.3", "classifier.5"]


@pytest.fixture(scope="module")
def digits_model():
    return load_digits_model()


@pytest.fixture(scope="module")
def minilm_tied_space(minilm_task):
    """Built in Python: q/k/v tied per block, word embeddings pinned, limits on FFN outputs and the last block."""
    return build_space(
        minilm_task.model,
        choices=[2, 3, 4, 5, 6, 8],
        types=["Linear", "Embedding"],
        tie=[QKV_TIE],
        pin={re.escape(WORD_EMB): 8},
        limits={
            r"bert\.encoder\.layer\.\d+\.output\.dense": {"min": 4},
            r"bert\.encoder\.layer\.5\..*": {"max": 5},
        },
    )


def _candidates(space: SearchSpace, rng: np.random.Generator, n_random: int = 200):
    """Every way the space hands out candidates: random, enumerate, uniform, decode, lowest/highest."""
    for _ in range(n_random):
        yield space.random(rng)
    yield from itertools.islice(space.enumerate(), 50)
    for b in range(1, 33):
        c = space.uniform(b)
        if c is not None:
            yield c
    for _ in range(50):
        yield space.decode([int(rng.integers(k)) for k in space.n_choices])
    yield space.decode([0] * space.n_decisions)
    yield space.decode([k - 1 for k in space.n_choices])
    yield space.lowest()
    yield space.highest()


# ---- structure of the shipped spaces --------------------------------------------------------
def test_digits_space_has_every_layer_as_its_own_decision(digits_space):
    assert list(digits_space.layers) == DIGITS_LAYERS
    assert [d.layers for d in digits_space.decisions] == [(n,) for n in DIGITS_LAYERS]
    assert all(d.choices == (2, 3, 4, 5, 6, 8) for d in digits_space.decisions)
    assert digits_space.cardinality == 6 ** 6
    assert digits_space.layers["features.2"].shape == (32, 16, 3, 3)
    assert digits_space.layers["classifier.1"].kind == "Linear"


def test_digits_small_space_is_enumerable(digits_small_space):
    cands = list(digits_small_space.enumerate())
    assert len(cands) == 4 ** 6 == digits_small_space.cardinality
    assert len(set(cands)) == len(cands)
    assert all(set(c) <= {2, 3, 4, 8} for c in cands)


def test_minilm_space_counts(minilm_space):
    kinds = [l.kind for l in minilm_space.layers.values()]
    # 6 blocks x (q, k, v, attention out, intermediate, output) + word/position/token-type embeddings
    assert kinds.count("Linear") == 36 and kinds.count("Embedding") == 3
    assert minilm_space.n_decisions == 39


def test_encode_decode_round_trip(digits_space):
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = digits_space.random(rng)
        assert digits_space.decode(digits_space.encode(c)) == c
    with pytest.raises(ValueError):
        digits_space.check_candidate((7,) * 6)
    with pytest.raises(ValueError):
        digits_space.check_candidate((8,) * 5)


# ---- pins, ties and limits hold in every candidate -------------------------------------------
def test_minilm_ties_and_pins_structure(minilm_tied_space):
    space = minilm_tied_space
    tied = [d for d in space.decisions if len(d.layers) > 1]
    assert len(tied) == 6
    for d in tied:
        blocks = {re.fullmatch(QKV_TIE, n).group(1) for n in d.layers}
        assert len(blocks) == 1, d.layers
        assert sorted(n.rsplit(".", 1)[1] for n in d.layers) == ["key", "query", "value"]
    assert space.pinned == {WORD_EMB: 8}
    assert space.layers[WORD_EMB].choices == (8,)
    assert all(WORD_EMB not in d.layers for d in space.decisions)
    # 39 layers - 1 pinned - 18 tied + 6 tie groups
    assert space.n_decisions == 26
    # every searched layer is in exactly one decision
    in_decisions = [n for d in space.decisions for n in d.layers]
    assert sorted(in_decisions + [WORD_EMB]) == sorted(space.layers)


def test_minilm_pins_ties_limits_hold_in_every_candidate(minilm_tied_space):
    space = minilm_tied_space
    rng = np.random.default_rng(1)
    n = 0
    for cand in _candidates(space, rng):
        space.check_candidate(cand)
        bits = space.layer_choices(cand)
        assert set(bits) == set(space.layers)
        assert bits[WORD_EMB] == 8
        for block in range(6):
            qkv = {bits[f"bert.encoder.layer.{block}.attention.self.{p}"] for p in ("query", "key", "value")}
            assert len(qkv) == 1, (block, qkv)
            assert bits[f"bert.encoder.layer.{block}.output.dense"] >= 4
        for name, b in bits.items():
            if name.startswith("bert.encoder.layer.5."):
                assert b <= 5, (name, b)
            assert b in space.layers[name].choices
        n += 1
    assert n > 300


def test_limits_shape_the_choices(minilm_tied_space):
    space = minilm_tied_space
    assert space.layers["bert.encoder.layer.0.output.dense"].choices == (4, 5, 6, 8)
    assert space.layers["bert.encoder.layer.5.output.dense"].choices == (4, 5)
    assert space.layers["bert.encoder.layer.5.intermediate.dense"].choices == (2, 3, 4, 5)
    assert space.layers["bert.encoder.layer.0.intermediate.dense"].choices == (2, 3, 4, 5, 6, 8)
    # a tied group takes the intersection of its members' choices
    last = next(d for d in space.decisions if "bert.encoder.layer.5.attention.self.query" in d.layers)
    assert last.choices == (2, 3, 4, 5)
    assert space.uniform(8) is None and space.uniform(4) is not None


def test_min_max_bits_keywords(digits_model):
    space = build_space(digits_model, [2, 3, 4, 5, 6, 8], min_bits=3, max_bits=6)
    assert all(d.choices == (3, 4, 5, 6) for d in space.decisions)
    with pytest.raises(SpaceError):
        build_space(digits_model, [2, 3], min_bits=4)


def test_digits_tie_list_and_pin_enumerate_everything(digits_model):
    space = build_space(
        digits_model, [2, 3, 4, 8],
        tie=[[r"features\.0", r"features\.2"]],
        pin={r"classifier\.5": 6},
        limits={r"classifier\.1": {"max": 4}},
    )
    assert space.n_decisions == 4
    assert space.cardinality == 4 * 4 * 3 * 4
    seen = 0
    for cand in _candidates(space, np.random.default_rng(2), n_random=50):
        bits = space.layer_choices(cand)
        assert bits["features.0"] == bits["features.2"]
        assert bits["classifier.5"] == 6
        assert bits["classifier.1"] <= 4
        seen += 1
    full = [space.layer_choices(c) for c in space.enumerate()]
    assert len(full) == space.cardinality
    assert all(b["features.0"] == b["features.2"] and b["classifier.5"] == 6 for b in full)


def test_candidate_from_layer_choices_rejects_split_ties(digits_model):
    space = build_space(digits_model, [2, 4, 8], tie=[[r"features\.0", r"features\.2"]])
    bits = space.layer_choices(space.uniform(4))
    assert space.candidate_from_layer_choices(bits) == space.uniform(4)
    bits["features.2"] = 8
    with pytest.raises(ValueError):
        space.candidate_from_layer_choices(bits)


def test_pin_inside_a_tied_group_keeps_the_tie(minilm_task):
    """Tying q/k/v of a block and pinning its query must not let key/value drift away from the pin.

    Either the pin carries over to the whole tied group, or the conflicting spec is refused.
    """
    try:
        space = build_space(
            minilm_task.model, [2, 4, 8], types=["Linear", "Embedding"],
            tie=[QKV_TIE], pin={r"bert\.encoder\.layer\.0\.attention\.self\.query": 8},
        )
    except SpaceError:
        return
    rng = np.random.default_rng(3)
    for cand in _candidates(space, rng, n_random=50):
        bits = space.layer_choices(cand)
        qkv = {bits[f"bert.encoder.layer.0.attention.self.{p}"] for p in ("query", "key", "value")}
        assert qkv == {8}, qkv


# ---- tied parameters -------------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_shared_parameter_is_one_layer_with_an_alias():
    space = build_space(TiedLM(), [4, 8])
    assert list(space.layers) == ["emb", "mid"]
    assert space.layers["emb"].aliases == ("head",)
    assert space.n_decisions == 2
    # the shared tensor is listed once among the state tensors
    assert set(space.tensors) == {"emb.weight", "mid.weight", "mid.bias"}


# ---- bad specs -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {"include": [r"features\.9"]},
    {"exclude": [r"nothing\.here"]},
    {"pin": {r"classifier\.7": 8}},
    {"tie": [r"conv(\d+)"]},
    {"tie": [[r"features\.0", r"missing"]]},
    {"layer_choices": {r"features\.7": [4, 8]}},
    {"limits": {r"classifier\.9": {"min": 4}}},
])
def test_pattern_that_matches_nothing_is_an_error(digits_model, kw):
    with pytest.raises(SpaceError, match="matches no"):
        build_space(digits_model, [2, 4, 8], **kw)


@pytest.mark.parametrize("kw", [
    {"include": ["features.(0"]},
    {"pin": {"[": 8}},
    {"tie": ["(("]},
    {"limits": {"(": {"min": 2}}},
])
def test_invalid_regex_is_a_space_error(digits_model, kw):
    with pytest.raises(SpaceError):
        build_space(digits_model, [2, 4, 8], **kw)


@pytest.mark.parametrize("choices", [[], [0], [17], [2, 4, 17], [0, 8], [-3], [2.5], ["4"], [True]])
def test_bad_choices_are_errors(digits_model, choices):
    with pytest.raises(SpaceError):
        build_space(digits_model, choices)


@pytest.mark.parametrize("spec", [
    {"choices": []},
    {"choices": [0, 4]},
    {"choices": [17]},
    {"choices": 4},
    {"pin": {r"features\.0": 0}},
    {"pin": {r"features\.0": 17}},
    {"layer_choices": {r"features\.0": []}},
    {"layer_choices": {r"features\.0": [20]}},
    {"limits": {r"features\.0": {"min": 9}}},
    {"limits": {r"features\.0": {"lo": 2}}},
    {"types": ["Linear", "Transformer"]},
    {"params": ["nothing\\.matches"]},
    {"params": {"features\\.0\\.weight": 9}},
    {"quantizer": {"scheme": "ternary"}},
    {"quantizer": {"granularity": "per-group"}},
    {"unknown_key": 1},
    {"choice": [2, 4]},
])
def test_bad_spec_is_a_space_error(digits_model, spec):
    with pytest.raises(SpaceError):
        space_from_spec(spec, digits_model)


def test_unknown_quantizer_key_is_a_space_error(digits_model):
    """A typo inside `quantizer:` must not silently fall back to the default quantizer."""
    with pytest.raises(SpaceError):
        space_from_spec({"quantizer": {"schem": "asymmetric"}}, digits_model)


def test_unknown_key_error_names_the_key(digits_model):
    with pytest.raises(SpaceError, match="bitz"):
        space_from_spec({"bitz": [2, 4]}, digits_model)


def test_yaml_files(tmp_path, digits_model):
    good = tmp_path / "good.yaml"
    good.write_text(
        "choices: [2, 4, 8]\n"
        "pin: {'classifier\\.5': 8}\n"
        "tie:\n  - ['features\\.0', 'features\\.2']\n"
        "quantizer: {scheme: asymmetric, granularity: per-group, group_size: 16}\n"
    )
    space = space_from_spec(load_space_file(good), digits_model)
    assert space.pinned == {"classifier.5": 8}
    assert space.n_decisions == 4
    assert space.quantizer.scheme == "asymmetric" and space.quantizer.group_size == 16

    bad = tmp_path / "bad.yaml"
    bad.write_text("choices: [2, 4\npin: {a: 1\n")
    with pytest.raises(SpaceError, match="malformed YAML"):
        from_yaml(bad, digits_model)

    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 2\n- 4\n")
    with pytest.raises(SpaceError):
        from_yaml(notmap, digits_model)

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("choices: [2, 4]\nbits: [3]\n")
    with pytest.raises(SpaceError, match="bits"):
        from_yaml(unknown, digits_model)

    with pytest.raises(SpaceError):
        from_yaml(tmp_path / "missing.yaml", digits_model)


def test_empty_yaml_is_the_default_space(tmp_path, digits_model):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    space = from_yaml(empty, digits_model)
    assert space.n_decisions == 6
    assert space.decisions[0].choices == (2, 3, 4, 5, 6, 8)


def test_model_without_quantizable_layer_is_an_error():
    with pytest.raises(SpaceError):
        build_space(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), [4, 8])


def test_space_holds_no_model_reference(digits_space):
    for value in vars(digits_space).values():
        assert not isinstance(value, (nn.Module, torch.Tensor))
