"""Fake-quantization: hand-worked values, error falling with bits on every real layer, level counts, clipping."""
from __future__ import annotations

import pytest
import torch

from mpsearch.core import QuantizerConfig
from mpsearch.core.qconfig import Setting
from mpsearch.quantize import fake_quantize as quantize_weight, mse, quantize, sqnr_db

SYM = QuantizerConfig()
NARROW = QuantizerConfig(grid="narrow")
ASYM = QuantizerConfig(scheme="asymmetric")
SYM_G = QuantizerConfig(granularity="per-group", group_size=32)
ASYM_G = QuantizerConfig(scheme="asymmetric", granularity="per-group", group_size=48)
VARIANTS = {"sym": SYM, "asym": ASYM, "sym-g32": SYM_G, "asym-g48": ASYM_G}
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
# minilm layers for the (more expensive) variant checks: one block, the small embeddings
MINILM_SUBSET = [
    "bert.embeddings.position_embeddings",
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.0.attention.output.dense",
    "bert.encoder.layer.3.intermediate.dense",
    "bert.encoder.layer.5.output.dense",
]


def fp16(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float16))


def _original(evaluator, layer):
    return evaluator.quantized_weight(layer, 32)  # 32 = the untouched original


def _distinct_per_group(q: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    """Distinct values in each set of weights that shares one scale: a row per output channel, or
    column chunks of group_size within each row (the last one ragged)."""
    rows = q.reshape(q.shape[0], -1)
    if cfg.granularity == "per-channel":
        chunks = [rows]
    else:
        chunks = [rows[:, i:i + cfg.group_size] for i in range(0, rows.shape[1], cfg.group_size)]
    out = []
    for c in chunks:
        srt = c.sort(dim=1).values
        out.append(1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1))
    return torch.cat(out)


# ---- hand-worked values ---------------------------------------------------------------------
def test_full_grid_three_bits_by_hand():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]])
    # codes -4..3; scale = amax / 3.5 as float16 (0.28564); codes round(w x (1/scale)): -3.5 -> -4 (half to even),
    # -1.75 -> -2, 0, 0.875 -> 1, 3.5 -> 4 clamped to 3: all 8 levels are in reach, as torchao's SYMMETRIC has them
    s = fp16(1 / 3.5)
    inv = fp16(1 / s)
    codes = torch.clamp(torch.round(w * inv), -4, 3)
    assert codes.tolist() == [[-4, -2, 0, 1, 3]]
    assert torch.equal(quantize_weight(w, 3, SYM), codes * s)


def test_two_bit_grid_has_four_levels():
    w = torch.tensor([[-1.0, -0.4, 0.1, 0.35, 1.0]])
    q = quantize(w, 2, SYM)
    assert sorted(set(q.codes[0].tolist())) == [-2, -1, 0, 1]  # 4 levels
    assert sorted(set(quantize(w, 2, NARROW).codes[0].tolist())) == [-1, 0, 1]  # the old grid: 3


def test_narrow_grid_three_bits_by_hand():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]])
    # qmax = 3, scale = 1/3 stored as float16; codes round(w / scale) = -3, -2 (-1.5004), 0, 1 (0.7502), 3
    s = fp16(1 / 3)
    expected = torch.tensor([[-3, -2, 0, 1, 3]], dtype=torch.float32) * s
    assert torch.equal(quantize_weight(w, 3, NARROW), expected)


def test_asymmetric_two_bits_by_hand():
    w = torch.tensor([[0.0, 0.1, 0.2, 0.3], [-0.6, -0.2, 0.0, 0.3]])
    # row 0: lo 0, hi 0.3, scale 0.1, zero-point 0 -> codes 0, 1, 2, 3
    s0 = fp16(0.3 / 3)
    # row 1: lo -0.6, hi 0.3, scale 0.3, zero-point 2 -> codes 0, 1 (-0.667 + 2 -> 1), 2, 3
    s1 = fp16(0.9 / 3)
    expected = torch.tensor([[0 * s0, 1 * s0, 2 * s0, 3 * s0], [-2 * s1, -1 * s1, 0.0, 1 * s1]])
    assert torch.allclose(quantize_weight(w, 2, ASYM), expected, rtol=0, atol=1e-7)


def test_per_group_uses_its_own_scale_per_group():
    # one row, group size 2: groups (4, -4), (0.5, 0.25), ragged (1,)
    w = torch.tensor([[4.0, -4.0, 0.5, 0.25, 1.0]])
    cfg = QuantizerConfig(granularity="per-group", group_size=2, grid="narrow")
    q = quantize_weight(w, 3, cfg)  # qmax 3
    s1, s2, s3 = fp16(4 / 3), fp16(0.5 / 3), fp16(1 / 3)
    expected = torch.tensor([[3 * s1, -3 * s1, 3 * s2, round(0.25 / s2) * s2, 3 * s3]])
    assert torch.allclose(q, expected, rtol=0, atol=1e-6)
    # per-channel would give the small values a 4/3 step: 0.5 and 0.25 -> 0
    qc = quantize_weight(w, 3, NARROW)
    assert qc[0, 2] == 0 and qc[0, 3] == 0


def test_one_bit_is_sign_times_mean_magnitude():
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0]])
    assert torch.equal(quantize_weight(w, 1, SYM), torch.tensor([[2.0, -2.0, 2.0, -2.0]]))


def test_float16_and_unquantized():
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quantize_weight(w, 16, SYM), w.half().float())
    assert torch.equal(quantize_weight(w, 32, SYM), w)
    for bad in (0, 17, -1):
        with pytest.raises(ValueError):
            quantize_weight(w, bad, SYM)


def test_shape_dtype_and_input_untouched():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    before = w.clone()
    for cfg in VARIANTS.values():
        q = quantize_weight(w, 4, cfg)
        assert q.shape == w.shape and q.dtype == w.dtype and q.is_contiguous()
    assert torch.equal(w, before)


def test_exact_zeros_stay_zero():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    w[:, ::3] = 0.0
    for cfg in VARIANTS.values():
        for bits in (2, 3, 4, 8):
            q = quantize_weight(w, bits, cfg)
            assert torch.all(q[:, ::3] == 0), (cfg, bits)


def test_bad_quantizer_configs():
    for kw in ({"scheme": "ternary"}, {"granularity": "per-tensor"}, {"granularity": "per-group"},
               {"granularity": "per-group", "group_size": 0}, {"group_size": 32}):
        with pytest.raises(ValueError):
            QuantizerConfig(**kw)


# ---- error falls as bits rise, on every real layer ------------------------------------------
def _mse32(w: torch.Tensor, q: torch.Tensor) -> float:
    return float((w - q).pow(2).mean())  # float32 is plenty to order errors a factor ~4 apart


def _assert_error_falls(w: torch.Tensor, cfg: QuantizerConfig, where: str):
    """With the scale chosen to minimise error (mse-clip), error falls from 1 to 8 bits (and 16)."""
    errs = [_mse32(w, quantize_weight(w, Setting(b, "mse-clip") if b < 16 else b, cfg)) for b in BITS]
    for (b0, e0), (b1, e1) in zip(zip(BITS, errs), zip(BITS[1:], errs[1:])):
        assert e1 < e0, f"{where}: MSE {e1:.3g} at {b1} bits is not below {e0:.3g} at {b0} bits"
    assert errs[-1] > 0
    assert mse(w, quantize_weight(w, 32, cfg)) == 0.0


def test_error_falls_with_bits_every_digits_layer(digits_evaluator, digits_space):
    ev = digits_evaluator
    for layer in digits_space.layers:
        w = _original(ev, layer)
        errs = [(mse(w, q), sqnr_db(w, q)) for q in (quantize_weight(w, Setting(b, "mse-clip") if b < 16 else b, SYM)
                                                    for b in (1, 2, 3, 4, 5, 6, 8, 16))]
        m = [e[0] for e in errs]
        s = [e[1] for e in errs]
        assert all(b < a for a, b in zip(m, m[1:])), (layer, m)
        assert all(b > a for a, b in zip(s, s[1:])), (layer, s)
        # roughly 6 dB per extra bit between 4 and 8 bits
        assert 18 < s[6] - s[3] < 30, (layer, s)
        assert ev.layer_error(layer, 32) == {"mse": 0.0, "sqnr_db": float("inf")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_error_falls_with_bits_digits_variants(digits_evaluator, digits_space, variant):
    for layer in digits_space.layers:
        _assert_error_falls(_original(digits_evaluator, layer), VARIANTS[variant], f"digits {layer} {variant}")


def test_error_falls_with_bits_every_minilm_layer(minilm_evaluator, minilm_space):
    assert len(minilm_space.layers) == 39
    for layer in minilm_space.layers:
        _assert_error_falls(_original(minilm_evaluator, layer), SYM, f"minilm {layer}")


@pytest.mark.parametrize("variant", ["asym", "sym-g32", "asym-g48"])
def test_error_falls_with_bits_minilm_variants(minilm_evaluator, variant):
    for layer in MINILM_SUBSET:
        _assert_error_falls(_original(minilm_evaluator, layer), VARIANTS[variant], f"minilm {layer} {variant}")


def test_finer_groups_reduce_error(digits_evaluator, digits_space):
    """Groups of 8 inside each channel get their own, finer scales: lower error than one scale per channel."""
    cfg8 = QuantizerConfig(granularity="per-group", group_size=8)
    for layer in ("features.5", "classifier.1", "classifier.3"):
        w = _original(digits_evaluator, layer)
        for bits in (3, 4, 6):
            assert mse(w, quantize_weight(w, bits, cfg8)) < mse(w, quantize_weight(w, bits, SYM))


# ---- levels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_most_2_pow_bits_levels_per_group(digits_evaluator, minilm_evaluator, variant):
    cfg = VARIANTS[variant]
    weights = [("digits " + n, _original(digits_evaluator, n)) for n in ("features.0", "features.5", "classifier.3")]
    weights += [("minilm " + n, _original(minilm_evaluator, n)) for n in MINILM_SUBSET[:3]]
    for where, w in weights:
        for bits in (1, 2, 3, 4):
            q = quantize_weight(w, bits, cfg)
            n = _distinct_per_group(q, cfg)
            assert int(n.max()) <= 2 ** bits, (where, variant, bits, int(n.max()))
            # the levels are actually used: rows of 64+ weights at 4 bits take more than 8 distinct values
            if bits == 4 and cfg.granularity == "per-channel" and q[0].numel() >= 64:
                assert (n > 8).float().mean() > 0.5, where
    assert _distinct_per_group(torch.tensor([[1.0, 1.0, 2.0, 3.0, 3.0]]), QuantizerConfig(granularity="per-group", group_size=2)).tolist() == [1, 2, 1]


def test_symmetric_levels_are_a_signed_integer_grid():
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    for bits in (2, 3, 4, 6):
        for cfg, half in ((SYM, 2 ** (bits - 1) - 0.5), (NARROW, 2 ** (bits - 1) - 1)):
            q = quantize_weight(w, bits, cfg)
            scale = torch.tensor([fp16(float(a) / half) for a in w.abs().amax(dim=1)]).unsqueeze(1)
            codes = q / scale
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            assert -(2 ** (bits - 1)) <= codes.round().min() and codes.round().max() <= 2 ** (bits - 1) - 1
            stored = quantize(w, bits, cfg)
            assert torch.equal(stored.dequantize(), q) and torch.equal(stored.scales, scale)


# ---- clipping search ------------------------------------------------------------------------
def test_clip_search_never_increases_error(digits_evaluator, digits_space, minilm_evaluator):
    cases = [(_original(digits_evaluator, n), cfg, (2, 3, 4, 8)) for n in digits_space.layers for cfg in (SYM, ASYM, SYM_G, ASYM_G)]
    q0 = _original(minilm_evaluator, "bert.encoder.layer.0.attention.self.query")
    cases += [(q0, cfg, (2, 3, 4)) for cfg in (SYM, ASYM)]
    improved = 0
    for w, base, bits_list in cases:
        for bits in bits_list:
            plain = quantize_weight(w, bits, base)
            clipped = quantize_weight(w, Setting(bits, "mse-clip"), base)
            # never worse in any channel (the search keeps the unclipped result unless strictly better)
            pe = (w - plain).pow(2).reshape(w.shape[0], -1).sum(1)
            ce = (w - clipped).pow(2).reshape(w.shape[0], -1).sum(1)
            assert torch.all(ce <= pe * (1 + 1e-6) + 1e-12)
            e_plain, e_clip = mse(w, plain), mse(w, clipped)
            assert e_clip <= e_plain * (1 + 1e-9)
            improved += e_clip < e_plain * 0.99
    # on real weights at low bits clipping helps somewhere
    assert improved > 0


def test_clip_search_levels_still_bounded(digits_evaluator):
    w = _original(digits_evaluator, "classifier.1")
    for bits in (2, 3):
        q = quantize_weight(w, Setting(bits, "mse-clip"), SYM)
        assert int(_distinct_per_group(q, SYM).max()) <= 2 ** bits


def test_sqnr_and_mse_helpers():
    w = torch.tensor([1.0, 2.0, 2.0])
    q = torch.tensor([1.0, 2.0, 1.0])
    assert mse(w, q) == pytest.approx(1 / 3)
    assert sqnr_db(w, q) == pytest.approx(10 * torch.log10(torch.tensor(9.0)).item())
    assert sqnr_db(w, w) == float("inf")


@pytest.mark.parametrize("name", ["speech", "video"])
def test_error_falls_with_bits_every_speech_and_video_weight(name):
    """Every 2-D-or-more float weight of the other built-in tasks (searched today or not: GRU and Conv3d weights
    included), flattened to rows per output channel."""
    from mpsearch.tasks import load_task

    task = load_task(name)
    seen = 0
    for pname, p in task.model.named_parameters():
        if p.dim() >= 2 and p.shape[0] > 1:
            _assert_error_falls(p.detach().reshape(p.shape[0], -1).float(), SYM, f"{name} {pname}")
            seen += 1
    assert seen >= 4


@pytest.mark.parametrize("granularity", ["per-channel", "per-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_a_buffer_is_bit_identical(granularity, dtype):
    """The evaluator writes misses into evicted weights' memory: the values must be the ones a fresh
    dequantization gives, in the model's dtype, whether the buffer path applies (whole groups) or not."""
    torch.manual_seed(0)
    for inner in (64, 70):  # 70: a ragged last group takes the copying path
        w = torch.randn(24, inner)
        cfg = QuantizerConfig(granularity=granularity, group_size=16 if granularity == "per-group" else None)
        for bits in (2, 4, 8):
            q = quantize(w, Setting(bits), cfg).compact()
            out = torch.full((24, inner), float("nan"), dtype=dtype)
            got = q.dequantize(dtype, out=out)
            assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
            # the arithmetic spelled out: float32 codes times their scales, then the model's dtype
            reference = (q.codes.float() * q.per_element(q.scales)).reshape(q.shape).to(dtype)
            assert torch.equal(got, reference) and torch.equal(q.dequantize(dtype), reference)
