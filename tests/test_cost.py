"""The size model is exact: every expected byte count below is worked out by hand.

Layout being counted: one packed bit-stream per weight tensor (ceil(n * bits / 8) bytes), one scale per
channel or group at ``scale_bits`` (16), one zero-point per channel or group at ``zero_point_bits`` (8)
for the asymmetric scheme; float16 = 2 bytes per weight; 32 = the tensor as it ships; every other
tensor (biases, norms, persistent buffers) at its own element size.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from mpsearch.errors import SpaceError
import torch
from torch import nn

from mpsearch.core import SizeTable, layer_bytes
from mpsearch.core.qconfig import Setting
from mpsearch.tasks.digits import load_model as load_digits_model
from mpsearch.core import QuantizerConfig
from mpsearch.model import build_space

# DigitsCNN weights by hand: conv 1->16 3x3, conv 16->32 3x3, conv 32->32 3x3, linear 128->128, 128->64, 64->10
DIGITS_WEIGHTS = {
    "features.0": (16, 1 * 9),
    "features.2": (32, 16 * 9),
    "features.5": (32, 32 * 9),
    "classifier.1": (128, 128),
    "classifier.3": (64, 128),
    "classifier.5": (10, 64),
}
DIGITS_BIAS = 16 + 32 + 32 + 128 + 64 + 10
DIGITS_PARAMS = sum(o * i for o, i in DIGITS_WEIGHTS.values()) + DIGITS_BIAS  # 39,466


def ceil8(bits: int) -> int:
    return math.ceil(bits / 8)


class OneLinear(nn.Module):
    def __init__(self, i=10, o=6, bias=True):
        super().__init__()
        self.fc = nn.Linear(i, o, bias=bias)


# ---- single layers ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12, 15])
def test_per_channel_symmetric_linear_with_bias(bits):
    space = build_space(OneLinear(10, 6), [bits])
    sm = SizeTable(space)
    # 60 weights packed + 6 float16 scales + 6 float32 biases
    expected = ceil8(60 * bits) + 6 * 2 + 6 * 4
    assert sm.size_bytes((bits,)) == expected


def test_per_channel_asymmetric_counts_zero_points():
    space = build_space(OneLinear(10, 6), [3], quantizer={"scheme": "asymmetric"})
    # 180 bits -> 23 bytes, 6 scales x 2 bytes, 6 zero-points x 1 byte, bias 24 bytes
    assert SizeTable(space).size_bytes((3,)) == 23 + 12 + 6 + 24 == 65


def test_per_group_with_ragged_last_group():
    sym = build_space(OneLinear(10, 6), [3], quantizer={"granularity": "per-group", "group_size": 4})
    asym = build_space(
        OneLinear(10, 6), [3], quantizer={"scheme": "asymmetric", "granularity": "per-group", "group_size": 4}
    )
    # each row of 10 -> groups of 4, 4, 2 (ragged): 18 groups
    assert SizeTable(sym).size_bytes((3,)) == 23 + 18 * 2 + 24 == 83
    assert SizeTable(asym).size_bytes((3,)) == 23 + 18 * 2 + 18 * 1 + 24 == 101


def test_per_group_conv_groups_run_over_in_channels_and_kernel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))  # weight (4, 3, 3, 3): 27 per output channel, bias 4
    space = build_space(model, [4], quantizer={"granularity": "per-group", "group_size": 8})
    # 27 -> 8, 8, 8, 3: 4 groups per channel, 16 groups; 108 weights x 4 bits = 54 bytes
    assert SizeTable(space).size_bytes((4,)) == 54 + 16 * 2 + 4 * 4
    # a group size that divides the row exactly: 27 / 9 = 3 groups per channel
    space9 = build_space(model, [4], quantizer={"granularity": "per-group", "group_size": 9})
    assert SizeTable(space9).size_bytes((4,)) == 54 + 12 * 2 + 4 * 4


def test_zero_point_bits_are_configurable_and_scale_bits_are_what_is_stored():
    cfg = {"scheme": "asymmetric", "zero_point_bits": 5}
    space = build_space(OneLinear(10, 6), [5], quantizer=cfg)
    # 300 bits -> 38 bytes; 6 float16 scales = 12 bytes; 6 zero-points x 5 bits = 30 bits -> 4 bytes; bias 24
    assert SizeTable(space).size_bytes((5,)) == 38 + 12 + 4 + 24
    with pytest.raises(SpaceError, match="scale_bits"):  # scales are stored as float16: no other count is true
        build_space(OneLinear(10, 6), [5], quantizer={"scale_bits": 32})
    with pytest.raises(SpaceError, match="zero_point_bits"):  # 4 bits cannot hold a 5-bit zero-point
        build_space(OneLinear(10, 6), [5], quantizer={"scheme": "asymmetric", "zero_point_bits": 4})


def test_float16_and_unquantized():
    space = build_space(OneLinear(10, 6), [4, 16, 32])
    sm = SizeTable(space)
    assert sm.size_bytes((16,)) == 60 * 2 + 24  # no scales for float16
    assert sm.size_bytes((32,)) == 60 * 4 + 24
    assert sm.size_bytes((4,)) == 30 + 12 + 24


def test_layer_bytes_directly():
    space = build_space(OneLinear(7, 3, bias=False), [2])
    layer = space.layers["fc"]
    cfg = QuantizerConfig()
    assert layer_bytes(layer, Setting(2), cfg) == ceil8(21 * 2) + 3 * 2 == 12
    assert layer_bytes(layer, Setting(16), cfg) == 42
    assert layer_bytes(layer, Setting(32), cfg) == 84


def test_packing_is_one_bitstream_per_tensor_not_per_row():
    space = build_space(OneLinear(7, 3, bias=False), [3])
    # 21 weights x 3 bits = 63 bits -> 8 bytes (padding each row of 7 would give 3 x ceil(21/8) = 9)
    assert SizeTable(space).size_bytes((3,)) == 8 + 3 * 2


# ---- several layers, pins ------------------------------------------------------------------
def test_digits_mixed_candidate_by_hand():
    model = load_digits_model()
    space = build_space(model, [2, 3, 4, 5, 6, 8, 16, 32], pin={r"classifier\.5": 8})
    sm = SizeTable(space)
    cand = (2, 3, 4, 16, 32)  # features.0, features.2, features.5, classifier.1, classifier.3
    expected = (
        ceil8(144 * 2) + 16 * 2
        + ceil8(4608 * 3) + 32 * 2
        + ceil8(9216 * 4) + 32 * 2
        + 16384 * 2
        + 8192 * 4
        + ceil8(640 * 8) + 10 * 2
        + DIGITS_BIAS * 4
    )
    assert sm.size_bytes(cand) == expected


def test_digits_uniform_size_matches_every_layer_by_hand(digits_space):
    sm = SizeTable(digits_space)
    for bits in (2, 3, 4, 5, 6, 8):
        expected = sum(ceil8(o * i * bits) + o * 2 for o, i in DIGITS_WEIGHTS.values()) + DIGITS_BIAS * 4
        assert sm.size_bytes(digits_space.uniform(bits)) == expected


# ---- nothing quantized: the model's real bytes -----------------------------------------------
def _real_bytes(model: nn.Module) -> int:
    """Unique parameters plus persistent buffers, straight from the model."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    persistent = set(model.state_dict().keys())
    bufs = {id(b): b for name, b in model.named_buffers() if name in persistent}
    return total + sum(b.numel() * b.element_size() for b in bufs.values())


def test_digits_unquantized_is_the_real_parameter_bytes():
    model = load_digits_model()
    space = build_space(model, [32])
    sm = SizeTable(space)
    assert DIGITS_PARAMS == 39466
    assert sm.size_bytes(space.uniform(32)) == DIGITS_PARAMS * 4 == _real_bytes(model)
    assert sm.full_precision_bytes == DIGITS_PARAMS * 4


def test_minilm_unquantized_is_the_real_parameter_bytes(minilm_task):
    model = minilm_task.model
    space = build_space(model, [8, 32], types=["Linear", "Embedding"])
    sm = SizeTable(space)
    real = _real_bytes(model)
    assert sm.size_bytes(space.uniform(32)) == real == sm.full_precision_bytes
    # all-MiniLM-L6-v2 has about 22.7 M float32 parameters
    assert 22_000_000 * 4 < real < 23_500_000 * 4


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)
        self.register_buffer("scratch", torch.zeros(100), persistent=False)
        self.register_buffer("table", torch.zeros(7, dtype=torch.float64))


def test_persistent_buffers_count_and_non_persistent_do_not():
    model = WithBuffers()
    space = build_space(model, [4, 32])
    sm = SizeTable(space)
    # fc 40 + 5, bn weight/bias 10, running mean/var 10 (float32), num_batches_tracked int64, table 7 float64
    other = 5 * 4 + 10 * 4 + 10 * 4 + 8 + 7 * 8
    assert sm.size_bytes((32,)) == 40 * 4 + other == _real_bytes(model)
    assert sm.size_bytes((4,)) == 20 + 5 * 2 + other
    assert "scratch" not in sm.unquantized_tensors
    assert "fc.weight" not in sm.unquantized_tensors and "fc.bias" in sm.unquantized_tensors


# ---- tied weights: one decision, counted once ------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weight_is_one_decision_counted_once():
    model = TiedLM()
    space = build_space(model, [4, 32])
    sm = SizeTable(space)
    assert space.n_decisions == 1
    assert sm.size_bytes((32,)) == 40 * 4 == _real_bytes(model)
    assert sm.size_bytes((4,)) == 20 + 10 * 2


def test_tied_weight_counted_once_when_only_the_linear_is_searched():
    """``types: [Linear]`` on a model whose Linear head shares the embedding's Parameter.

    The evaluator quantizes the one shared tensor, so the model holds it once, quantized.
    """
    model = TiedLM()
    space = build_space(model, [4, 32], types=["Linear"])
    sm = SizeTable(space)
    assert space.n_decisions == 1
    assert sm.size_bytes((32,)) == 40 * 4 == _real_bytes(model)
    assert sm.size_bytes((4,)) == 20 + 10 * 2
    assert sm.full_precision_bytes / sm.size_bytes((4,)) == pytest.approx(160 / 40)


# ---- average bits and compression ratio ------------------------------------------------------
def test_avg_bits_count_every_stored_bit_weight_bits_the_weights_alone(digits_space):
    sm = SizeTable(digits_space)
    n = [o * i for o, i in DIGITS_WEIGHTS.values()]
    scale_bits = 16 * sum(o for o, _ in DIGITS_WEIGHTS.values())  # one float16 scale per output channel
    for bits in (2, 3, 4, 5, 6, 8):
        assert sm.avg_bits(digits_space.uniform(bits)) == pytest.approx(bits + scale_bits / sum(n))
        assert sm.weight_bits(digits_space.uniform(bits)) == pytest.approx(bits)
    cand = (2, 8, 3, 4, 6, 5)
    expected = (sum(k * b for k, b in zip(n, cand)) + scale_bits) / sum(n)
    assert sm.avg_bits(cand) == pytest.approx(expected)
    assert sm.min_avg_bits() == pytest.approx(2.0 + scale_bits / sum(n))


def test_avg_bits_with_pinned_and_float16_layers():
    model = load_digits_model()
    space = build_space(model, [2, 4, 16], pin={r"classifier\.1": 16, r"features\.0": 2})
    sm = SizeTable(space)
    cand = (4, 4, 2, 16)  # features.2, features.5, classifier.3, classifier.5
    weights = 144 * 2 + 4608 * 4 + 9216 * 4 + 16384 * 16 + 8192 * 2 + 640 * 16
    scales = 16 * (16 + 32 + 32 + 64)  # integer layers only: float16 layers store no scales
    count = 144 + 4608 + 9216 + 16384 + 8192 + 640
    assert sm.avg_bits(cand) == pytest.approx((weights + scales) / count)
    assert sm.weight_bits(cand) == pytest.approx(weights / count)


def test_avg_bits_all_unquantized_is_32():
    model = load_digits_model()
    space = build_space(model, [4, 32])
    assert SizeTable(space).avg_bits(space.uniform(32)) == pytest.approx(32.0)


def test_avg_bits_never_falls_when_a_layer_gets_more_bits():
    """Raising one decision's bits (8 -> 16 -> 32) must not lower the average bits.

    With 32 in the choices, an unquantized layer has to count at 32 bits in the average, or a
    --avg-bits budget is met by leaving layers unquantized.
    """
    model = load_digits_model()
    space = build_space(model, [4, 8, 16, 32])
    sm = SizeTable(space)
    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = [int(rng.integers(k)) for k in space.n_choices]
        j = int(rng.integers(space.n_decisions))
        if idx[j] == space.n_choices[j] - 1:
            continue
        lo = space.decode(idx)
        idx[j] += 1
        hi = space.decode(idx)
        assert sm.size_bytes(hi) > sm.size_bytes(lo)
        assert sm.avg_bits(hi) >= sm.avg_bits(lo) - 1e-12, (lo, hi, sm.avg_bits(lo), sm.avg_bits(hi))
    # one layer at 4 bits and every other one unquantized is not a 4-bit model
    c = (4, 32, 32, 32, 32, 32)
    assert sm.avg_bits(c) > 30


def test_compression_ratio_definition(digits_space):
    sm = SizeTable(digits_space)
    fp = DIGITS_PARAMS * 4
    assert sm.full_precision_bytes == fp
    rng = np.random.default_rng(1)
    for _ in range(20):
        c = digits_space.random(rng)
        s = sm.size(c)
        assert s.size_bytes == sm.size_bytes(c)
        assert s.compression_ratio == pytest.approx(fp / s.size_bytes)
        assert s.avg_bits == pytest.approx(sm.avg_bits(c))
    # uniform 8-bit: ratio is fp bytes over the hand-computed 8-bit size
    s8 = sum(o * i + o * 2 for o, i in DIGITS_WEIGHTS.values()) + DIGITS_BIAS * 4
    assert sm.size(digits_space.uniform(8)).compression_ratio == pytest.approx(fp / s8)
    assert sm.min_size_bytes() == sm.size_bytes(digits_space.lowest())


def test_bops_from_macs(digits_evaluator, digits_space):
    sm = digits_evaluator.sizes
    # MACs per sample by hand: conv outputs are 8x8, 8x8, 4x4 (padding 1, pool after the 2nd conv)
    macs = {
        "features.0": 16 * 8 * 8 * 9,
        "features.2": 32 * 8 * 8 * 16 * 9,
        "features.5": 32 * 4 * 4 * 32 * 9,
        "classifier.1": 128 * 128,
        "classifier.3": 128 * 64,
        "classifier.5": 64 * 10,
    }
    assert sm.macs == macs
    c = (2, 3, 4, 5, 6, 8)
    assert sm.bops(c) == sum(macs[n] * b * 32 for n, b in zip(macs, c))
