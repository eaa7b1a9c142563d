"""Quantizer methods (gptq, gradient), pruning, honest bit counts and version 2 plans, on toy layers with known answers."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.core import QuantizerConfig, SizeTable
from mpsearch.core.qconfig import Setting, stored_bits
from mpsearch.model import build_space
from mpsearch.quantize import PreparedCache, fake_quantize, quantize
from mpsearch.quantize.grids import dequant_rows, fit, round_to_grid
from mpsearch.quantize.inputs import _patches, input_moments
from mpsearch.quantize.methods import adaround, gptq, magnitude_mask

CFG = QuantizerConfig()


def _layer(seed=0, out=4, inner=8, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inner, generator=g) @ torch.randn(inner, inner, generator=g)  # correlated inputs
    w = torch.randn(out, inner, generator=g)
    return w.double(), x.double()


def _output_error(w, q, x) -> float:
    return float(((x @ (w - q).T) ** 2).sum())


def test_gptq_is_sequential_least_squares():
    """Without damping, gptq quantizes each column at the least-squares optimum of what is left (OBQ's rule):
    after columns :j are fixed, the remaining weights minimise ||X (W - Q)^T|| over the free columns."""
    w, x = _layer()
    h = x.T @ x
    got = gptq(w.float(), 3, CFG, h, damp=0.0, block=3).dequantize().double()
    _, s, _ = fit(w, 3, CFG, clip_search=True)  # gptq's scales: the least-error range of the original rows
    ref = w.clone()
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j:j + 1] = dequant_rows(round_to_grid(ref[:, j:j + 1], s, None, 3, CFG), s, None)
        if j + 1 < w.shape[1]:  # least squares for the free columns, given the fixed ones
            target = x @ w.T - x[:, :j + 1] @ q[:, :j + 1].T
            ref[:, j + 1:] = torch.linalg.lstsq(x[:, j + 1:], target).solution.T
    assert torch.allclose(got, q, atol=1e-6)
    rtn = quantize(w.float(), 3, CFG).dequantize().double()
    assert _output_error(w, got, x) < _output_error(w, rtn, x)


def test_gptq_per_group_and_asymmetric_stay_on_their_grid():
    w, x = _layer(1, out=6, inner=32)
    for cfg in (QuantizerConfig(granularity="per-group", group_size=8), QuantizerConfig(scheme="asymmetric")):
        q = gptq(w.float(), 4, cfg, x.T @ x)
        lo, hi = (0, 15) if cfg.scheme == "asymmetric" else (-8, 7)
        assert lo <= int(q.codes.min()) and int(q.codes.max()) <= hi
        assert q.scales.shape == ((6, 4) if cfg.granularity == "per-group" else (6, 1))
        rtn = quantize(w.float(), 4, cfg).dequantize().double()
        assert _output_error(w, q.dequantize().double(), x) < _output_error(w, rtn, x)


def test_gptq_act_order_is_never_worse_and_helps_where_inputs_are_uneven():
    """act_order adds a pass over the columns by decreasing input energy (static groups) and keeps the
    better of the two on the layer's output error; with uneven input scales it wins on some layers."""
    from dataclasses import replace

    wins = 0
    for seed in range(6):
        w, x = _layer(seed, out=8, inner=32, n=256)
        x = x * torch.logspace(-1, 1, 32, dtype=x.dtype)[torch.randperm(32, generator=torch.Generator().manual_seed(seed))]
        for cfg in (CFG, QuantizerConfig(granularity="per-group", group_size=8)):
            plain = gptq(w.float(), 3, cfg, x.T @ x)
            act = gptq(w.float(), 3, replace(cfg, act_order=True), x.T @ x)
            e_plain = _output_error(w, plain.dequantize().double(), x)
            e_act = _output_error(w, act.dequantize().double(), x)
            assert e_act <= e_plain
            wins += e_act < e_plain
            assert act.scales.shape == plain.scales.shape and -4 <= int(act.codes.min()) <= int(act.codes.max()) <= 3
    assert wins >= 3


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gradient_is_never_worse_than_rtn_on_its_objective(bits):
    for seed in range(3):
        w, x = _layer(seed, out=8, inner=16)
        h = (x.T @ x).float()
        got = adaround(w.float(), bits, CFG, h, iters=60)
        rtn = quantize(w.float(), bits, CFG)
        e_got = _output_error(w, got.dequantize().double(), x)
        e_rtn = _output_error(w, rtn.dequantize().double(), x)
        assert e_got <= e_rtn * (1 + 1e-6)
        again = adaround(w.float(), bits, CFG, h, iters=60)
        assert torch.equal(again.codes, got.codes)  # deterministic


def test_magnitude_masks():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.2, 0.8, -0.05, 0.0, 0.4]])
    assert magnitude_mask(w, 0.5).tolist() == [[False, True, True, False, True, False, False, True]]
    assert magnitude_mask(w, "2:4").tolist() == [[False, True, True, False, True, False, False, True]]
    assert magnitude_mask(w, 0.1) is None  # floor(8 x 0.1) = 0 pruned
    q = quantize(w, Setting(4, "rtn", 0.5), CFG)
    assert q.mask is not None and torch.all(q.dequantize()[~q.mask] == 0)
    asym = quantize(w, Setting(4, "rtn", "2:4"), QuantizerConfig(scheme="asymmetric"))
    assert torch.all(asym.codes[~asym.mask] == asym.zero_points[0, 0])  # the code of zero
    # gptq compensates what pruning removes
    w2, x = _layer(2, out=6, inner=16)
    h = x.T @ x
    pruned = gptq(w2.float(), 8, CFG, h, mask=magnitude_mask(w2.float(), 0.5)).dequantize().double()
    plain = quantize(w2.float(), Setting(8, "rtn", 0.5), CFG).dequantize().double()
    assert _output_error(w2, pruned, x) < _output_error(w2, plain, x)


def test_sparse_sizes_by_hand():
    model = nn.Sequential(nn.Linear(10, 6, bias=False))  # 60 weights, 6 rows of 10
    space = build_space(model, [4], sparsity=[0.5, "2:4"], types=["Linear"])
    sizes = SizeTable(space)
    by_label = dict(zip(space.decisions[0].choices, sizes.byte_table[0]))
    # 50%: 5 kept per row -> 30 x 4 bits = 15 bytes; 6 float16 scales = 12; mask 60 bits -> 8 bytes
    assert by_label["4/rtn/50%"] == 15 + 12 + 8
    assert "4/rtn/2:4" not in by_label  # rows of 10 are not a multiple of 4
    m24 = build_space(nn.Sequential(nn.Linear(8, 6, bias=False)), [4], sparsity=["2:4"], types=["Linear"])
    # 2:4: 4 kept of 8 per row -> 24 x 4 bits = 12 bytes; 12 scale bytes; 48-bit mask = 6 bytes
    assert SizeTable(m24).byte_table[0].tolist() == [12 + 12 + 6]
    # average bits count every stored bit: (24 x 4 + 6 x 16 + 48) / 48
    assert SizeTable(m24).avg_bits(("4/rtn/2:4",)) == pytest.approx((24 * 4 + 6 * 16 + 48) / 48)
    assert SizeTable(m24).weight_bits(("4/rtn/2:4",)) == 4.0
    assert stored_bits((6, 8), Setting(16), CFG) == 48 * 16


def test_honest_bits_count_scales_and_zero_points():
    model = nn.Sequential(nn.Linear(32, 4, bias=False))
    for cfg, extra in ((QuantizerConfig(), 4 * 16), (QuantizerConfig(scheme="asymmetric"), 4 * (16 + 8)),
                       (QuantizerConfig(granularity="per-group", group_size=8), 16 * 16)):
        sizes = SizeTable(build_space(model, [3], quantizer=cfg.to_dict()))
        assert sizes.avg_bits((3,)) == pytest.approx((128 * 3 + extra) / 128)
        assert sizes.weight_bits((3,)) == 3.0


def test_conv_patches_match_unfold():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 9, generator=g)
    for conv in (nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, groups=3, dilation=2),
                 nn.Conv2d(6, 4, (2, 3), padding="same")):
        rows = _patches(conv, x)  # (groups, n, inner)
        xp = x if not isinstance(conv.padding, str) else F.pad(x, (1, 1, 0, 1))
        pad = conv.padding if not isinstance(conv.padding, str) else 0
        ref = F.unfold(xp, conv.kernel_size, conv.dilation, pad, conv.stride)  # (N, C*k, L)
        ref = ref.transpose(1, 2).reshape(-1, ref.shape[1])
        per = ref.shape[1] // conv.groups
        for gi in range(conv.groups):
            assert torch.allclose(rows[gi], ref[:, gi * per:(gi + 1) * per], atol=1e-6)
        # the layer's output is the patches times the weight: what gptq's H is made of
        out = conv(x).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
        w = conv.weight.reshape(conv.out_channels, -1)
        rows_g = conv.out_channels // conv.groups
        for gi in range(conv.groups):
            mine = rows[gi] @ w[gi * rows_g:(gi + 1) * rows_g].T + conv.bias[gi * rows_g:(gi + 1) * rows_g]
            assert torch.allclose(mine, out[:, gi * rows_g:(gi + 1) * rows_g], atol=1e-5)


def test_input_moments_of_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    batches = [(torch.randn(7, 5), None), (torch.randn(4, 5), None)]
    h = input_moments(model, batches, {"0": ("0",), "2": ("2",)}, lambda m, x: m(x))
    xs = torch.cat([b[0] for b in batches]).double()
    assert torch.allclose(h["0"][0], xs.T @ xs / 11)
    assert h["2"].shape == (1, 3, 3)


def test_prepared_weights_are_cached_on_disk(tmp_path):
    w, x = _layer(3, out=4, inner=16)
    h = (x.T @ x).unsqueeze(0)
    cache = PreparedCache(tmp_path)
    first = quantize(w.float(), Setting(3, "gptq"), CFG, h, cache=cache)
    again = quantize(w.float(), Setting(3, "gptq"), CFG, h, cache=PreparedCache(tmp_path))
    assert torch.equal(first.codes, again.codes) and torch.equal(first.scales, again.scales)
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    other = PreparedCache(tmp_path)
    quantize(w.float() * 1.01, Setting(3, "gptq"), CFG, h, cache=other)  # other weights: a miss
    assert other.hits == 0 and len(list(tmp_path.rglob("*.pt"))) == 2


# ---- plans -----------------------------------------------------------------------------------------
def test_plans_with_methods_and_sparsity_round_trip(tmp_path):
    import mpsearch

    space = {"choices": [2, 4], "methods": ["rtn", "gptq"], "sparsity": [0, 0.5]}
    res = mpsearch.optimize("digits", space=space, strategy="random", budget=mpsearch.Budget(max_avg_bits=3.5),
                            max_evals=12)
    assert [t.error for t in res.evaluated if t.error] == []  # gptq's inputs are captured mid-search, safely
    plan = res.plan()
    assert {e["method"] for e in plan.layers.values()} <= {"rtn", "gptq"}
    plan.save(tmp_path / "plan.json")
    again = mpsearch.QuantizationPlan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict() and again.to_dict()["version"] == 2
    from mpsearch.plan import verify

    task = mpsearch.load_task("digits")
    r = verify(again, task)
    assert r["size_bytes"] == plan.predicted["size_bytes"]
    assert r["metric"] == pytest.approx(plan.predicted["validation_metric"], abs=1e-9)


def test_version_1_plans_still_apply_exactly(tmp_path):
    """A plan written before methods and grids (narrow grid, round to nearest) loads and applies as it did."""
    import mpsearch
    from mpsearch.plan import apply, verify

    task = mpsearch.load_task("digits")
    space = build_space(task.model, [2, 3, 4, 8], quantizer={"grid": "narrow"}, model_name="digits")
    v1_layers = {n: {"bits": b, "kind": s.kind, "shape": list(s.shape), "n_params": s.n_params}
                 for (n, s), b in zip(space.layers.items(), (2, 3, 4, 8, 3, 2))}
    sizes = SizeTable(space)
    cand = (2, 3, 4, 8, 3, 2)
    doc = {"format": "mpsearch-plan", "version": 1,
           "model": {"name": "digits", "fingerprint": space.fingerprint},
           "quantizer": {"scheme": "symmetric", "granularity": "per-channel", "group_size": None,
                         "clip_search": False, "scale_bits": 16, "zero_point_bits": 8},
           "layers": v1_layers, "unquantized": sizes.unquantized_tensors,
           "predicted": {"size_bytes": sizes.size_bytes(cand), "metric_name": "accuracy", "metric": 0.9},
           "provenance": {}}
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    plan = mpsearch.QuantizationPlan.load(tmp_path / "v1.json")
    assert {e["grid"] for e in plan.layers.values()} == {"narrow"}
    q = apply(plan, task.model)
    for (name, spec), b in zip(space.layers.items(), cand):
        w = dict(task.model.named_modules())[name].weight
        old = fake_quantize(w, b, QuantizerConfig(grid="narrow"))  # the version 1 arithmetic
        assert torch.equal(dict(q.named_modules())[name].weight, old), name
    assert verify(plan, task)["size_bytes"] == doc["predicted"]["size_bytes"]
    assert math.isfinite(verify(plan, task)["metric"])
