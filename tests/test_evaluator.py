"""The evaluator: restore is exact, memo costs no forward, cached weights give what a naive re-quantization gives."""
from __future__ import annotations

import copy

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mpsearch.evaluator as evaluator_mod
from mpsearch.errors import MPSearchWarning
from mpsearch.evaluator import Evaluator
from mpsearch.model import build_space
from mpsearch.tasks.task import Task
from mpsearch.metrics import cosine
from mpsearch.tasks.digits import load_model as load_digits_model
from mpsearch.quantize import fake_quantize as quantize_weight


def _fresh_candidate(ev, rng):
    for _ in range(1000):
        c = ev.space.random(rng)
        if not ev.is_memoized(c):
            return c
    raise AssertionError("no unevaluated candidate found")


def _naive_outputs(model, space, candidate, batches):
    """Quantize a private copy layer by layer and run it: what the evaluator must reproduce."""
    m = copy.deepcopy(model)
    named = dict(m.named_modules())
    with torch.no_grad():
        for layer, bits in space.layer_choices(candidate).items():
            w = named[layer].weight
            w.copy_(quantize_weight(w.detach().clone(), bits, space.quantizer))
    with torch.inference_mode():
        outs = []
        for x, _ in batches:
            out = m(**x) if isinstance(x, dict) else m(x)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs)


# ---- apply / restore --------------------------------------------------------------------------
def test_digits_restore_is_bit_identical_to_the_shipped_weights(digits_evaluator):
    ev = digits_evaluator
    pristine = load_digits_model().state_dict()
    rng = np.random.default_rng(0)
    for _ in range(5):
        ev.apply(ev.space.random(rng))
    # the weights really changed
    state = ev.model.state_dict()
    for layer in ev.space.layers:
        assert not torch.equal(state[f"{layer}.weight"], pristine[f"{layer}.weight"]), layer
    ev.evaluate(ev.space.uniform(2))
    ev.validation_metric(ev.space.random(rng))
    state = ev.model.state_dict()  # evaluations swap weights in only while their layer runs
    for k, v in pristine.items():
        assert torch.equal(state[k], v), k
    ev.apply(ev.space.uniform(3))
    ev.restore()
    state = ev.model.state_dict()
    assert state.keys() == pristine.keys()
    for k, v in pristine.items():
        assert torch.equal(state[k], v), k


def test_minilm_restore_is_bit_identical(minilm_evaluator):
    ev = minilm_evaluator
    ev.restore()
    before = {k: v.detach().clone() for k, v in ev.model.state_dict().items()}
    rng = np.random.default_rng(1)
    ev.apply(ev.space.lowest())
    changed = [n for n in ev.space.layers if not torch.equal(ev.model.state_dict()[f"{n}.weight"], before[f"{n}.weight"])]
    assert len(changed) == len(ev.space.layers)
    ev.apply(ev.space.random(rng))
    ev.evaluate(_fresh_candidate(ev, rng))
    ev.restore()
    after = ev.model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_apply_swaps_only_layers_whose_bits_change(digits_small_evaluator):
    ev = digits_small_evaluator
    space = ev.space
    params = {n: dict(ev.model.named_modules())[n].weight for n in space.layers}
    c1 = space.uniform(4)
    ev.apply(c1)
    ptr1 = {n: p.data_ptr() for n, p in params.items()}
    c2 = (8,) + c1[1:]
    ev.apply(c2)
    ptr2 = {n: p.data_ptr() for n, p in params.items()}
    first = space.decisions[0].layers
    assert all(ptr2[n] != ptr1[n] for n in first)
    assert all(ptr2[n] == ptr1[n] for n in params if n not in first)
    assert torch.equal(params[first[0]].data, quantize_weight(ev.quantized_weight(first[0], 32), 8, space.quantizer))
    ev.restore()


# ---- memo --------------------------------------------------------------------------------------
def test_memoized_score_costs_no_forward(digits_small_evaluator):
    ev = digits_small_evaluator
    c = _fresh_candidate(ev, np.random.default_rng(2))
    n0 = ev.n_forward
    first = ev.evaluate(c)
    assert ev.n_forward == n0 + 1 and not first.cached
    assert ev.is_memoized(c)
    again = ev.evaluate(list(c))
    assert ev.n_forward == n0 + 1
    assert again.cached
    assert (again.candidate, again.metric, again.size_bytes, again.avg_bits, again.wall_s) == (
        first.candidate, first.metric, first.size_bytes, first.avg_bits, first.wall_s)
    # the validation split is memoized separately
    v1 = ev.validation_metric(c)
    assert ev.n_forward == n0 + 2
    assert ev.validation_metric(c) == v1
    assert ev.n_forward == n0 + 2


def test_memo_hit_does_not_touch_the_model(digits_small_evaluator):
    ev = digits_small_evaluator
    rng = np.random.default_rng(3)
    a = _fresh_candidate(ev, rng)
    ev.evaluate(a)
    b = _fresh_candidate(ev, rng)
    ev.evaluate(b)
    ptrs = [p.data_ptr() for p in ev.model.parameters()]
    n = ev.n_forward
    ev.evaluate(a)
    assert ev.n_forward == n
    assert [p.data_ptr() for p in ev.model.parameters()] == ptrs
    ev.restore()


def test_remember_seeds_the_memo(digits_small_evaluator):
    ev = digits_small_evaluator
    c = _fresh_candidate(ev, np.random.default_rng(4))
    fake = evaluator_mod.Evaluation(c, 123, 4.0, 0.5, 0.01)
    ev.remember(fake)
    n = ev.n_forward
    got = ev.evaluate(c)
    assert ev.n_forward == n and got.metric == 0.5 and got.cached


# ---- the quantized-weight cache ------------------------------------------------------------
def test_warm_cache_then_new_candidates_quantize_nothing(digits_small_evaluator, monkeypatch):
    ev = digits_small_evaluator
    ev.prepare()
    for d in ev.space.decisions:
        for n in d.layers:
            for b in d.choices:
                assert ev.quantized_weight(n, b) is ev.quantized_weight(n, b)
    calls = []

    real = evaluator_mod.quantize

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator_mod, "quantize", counting)
    rng = np.random.default_rng(5)
    for _ in range(3):
        ev.evaluate(_fresh_candidate(ev, rng))
    assert calls == []
    ev.restore()


def test_evaluate_matches_naive_requantization_digits(digits_evaluator, digits_task):
    ev = digits_evaluator
    ev.restore()
    pristine = load_digits_model()
    targets = torch.cat([y for _, y in ev.calibration])
    rng = np.random.default_rng(6)
    for c in [ev.space.lowest(), ev.space.uniform(4)] + [ev.space.random(rng) for _ in range(4)]:
        logits = _naive_outputs(pristine, ev.space, c, ev.calibration)
        acc = (logits.argmax(-1) == targets).float().mean().item()
        got = ev.evaluate(c)
        assert got.metric == acc
        assert got.size_bytes == ev.sizes.size_bytes(c)
        assert got.avg_bits == pytest.approx(ev.sizes.avg_bits(c))
    ev.restore()


def test_evicted_weights_are_written_over_only_when_nobody_holds_them(digits_task):
    """A weight cache a fraction of the space: misses dequantize into evicted weights' memory, scores stay
    those of a naive re-quantization, and a weight someone still holds is never written over."""
    from mpsearch.evaluator import Evaluator
    from mpsearch.model import space_for

    space = space_for(digits_task)
    pristine = load_digits_model()
    targets = torch.cat([y for _, y in digits_task.calibration])
    with Evaluator(digits_task, space, cache_dir=None, cache_mb=0.3, activation_cache_mb=0) as ev:
        held = ev.quantized_weight("classifier.1", 2)
        kept = held.clone()
        rng = np.random.default_rng(3)
        for _ in range(12):
            c = space.random(rng)
            got = ev.evaluate(c).metric
            logits = _naive_outputs(pristine, space, c, ev.calibration)
            assert got == (logits.argmax(-1) == targets).float().mean().item()
        assert ev.weights.evictions > 0 and ev.recycled > 0
        assert torch.equal(held, kept)
        # nor memory another tensor shares: a view, or state_dict() taken while a candidate was applied
        view = ev.quantized_weight("classifier.3", 3).t()
        kept_view = view.clone()
        ev.apply(space.lowest())
        snap = digits_task.model.state_dict()
        copies = {k: v.clone() for k, v in snap.items()}
        ev.restore()
        recycled = ev.recycled
        for _ in range(8):
            ev.evaluate(space.random(rng))
        assert ev.recycled > recycled
        assert torch.equal(view, kept_view) and all(torch.equal(snap[k], copies[k]) for k in snap)


def test_weights_in_another_memory_layout_are_not_reused_as_buffers(digits_task):
    """A float16 setting keeps a channels_last weight's strides: such a tensor is never a buffer to write into."""
    from dataclasses import replace

    from mpsearch.evaluator import Evaluator
    from mpsearch.model import build_space

    model = load_digits_model().to(memory_format=torch.channels_last)
    task = replace(digits_task, model=model)
    space = build_space(model, choices=[2, 4, 16])
    with Evaluator(task, space, cache_dir=None, cache_mb=0.3, activation_cache_mb=0) as ev:
        rng = np.random.default_rng(0)
        for _ in range(10):
            e = ev.evaluate(space.random(rng))
            assert e.error is None, e.error


def test_evaluate_matches_naive_requantization_minilm(minilm_evaluator, minilm_task):
    ev = minilm_evaluator
    ev.restore()
    c = _fresh_candidate(ev, np.random.default_rng(7))
    with torch.inference_mode():
        reference = torch.cat([minilm_task.model(**x) for x, _ in ev.calibration])
    assert torch.equal(reference, ev.reference_outputs["calibration"])
    quantized = _naive_outputs(minilm_task.model, ev.space, c, ev.calibration)
    expected = cosine(quantized, reference)
    got = ev.evaluate(c).metric
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0.5 < got < 1.0
    ev.restore()


# ---- quality of the built-in task under uniform quantization ---------------------------------
def test_uniform_8bit_digits_within_half_a_point(digits_evaluator):
    ev = digits_evaluator
    u8 = ev.space.uniform(8)
    assert abs(ev.evaluate(u8).metric - ev.reference_metric) <= 0.005
    assert abs(ev.validation_metric(u8) - ev.reference_validation_metric) <= 0.005
    ev.restore()


def test_reference_metric_is_the_full_precision_accuracy(digits_evaluator):
    model = load_digits_model()
    for split, ref in (("calibration", digits_evaluator.reference_metric),
                       ("validation", digits_evaluator.reference_validation_metric)):
        batches = getattr(digits_evaluator, split)
        with torch.inference_mode():
            pred = torch.cat([model(x).argmax(-1) for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        assert ref == (pred == y).float().mean().item()


def test_layer_error_uses_the_cached_weights(digits_evaluator):
    ev = digits_evaluator
    w = ev.quantized_weight("classifier.1", 32)
    q = ev.quantized_weight("classifier.1", 3)
    expected = float((w.double() - q.double()).pow(2).mean())
    assert ev.layer_error("classifier.1", 3)["mse"] == pytest.approx(expected, rel=1e-12)
    assert ev.layer_error("classifier.1", 3)["mse"] > ev.layer_error("classifier.1", 4)["mse"]


# ---- embedding tables: only the rows the splits read are dequantized --------------------------------
class _Lookup(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(400, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 400, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids)))).mean(1)


def _lookup_evaluator(tied: bool) -> Evaluator:
    torch.manual_seed(0)
    model = _Lookup(tied).eval()
    g = torch.Generator().manual_seed(1)
    cal, val = torch.randint(0, 50, (8, 6), generator=g), torch.randint(30, 80, (8, 6), generator=g)
    task = Task(model=model, calibration=[(cal, None)], validation=[(val, None)], metric="cosine", name="lookup")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MPSearchWarning)
        space = build_space(model)
    return Evaluator(task, space, cache_dir=None), torch.unique(torch.cat([cal.flatten(), val.flatten()]))


def test_an_embedding_table_is_dequantized_only_at_the_rows_looked_up():
    ev, used = _lookup_evaluator(tied=False)
    with ev:
        assert torch.equal(ev._rows["emb"], used)
        rng = np.random.default_rng(3)
        for _ in range(6):
            c = _fresh_candidate(ev, rng)
            for split in ("calibration", "validation"):
                got = ev.evaluate(c, split).metric
                ev.apply(c)  # the whole quantized table, as a plan applies it
                whole = ev.score_model(split)
                ev.restore()
                assert got == whole
        # evaluations keep the rows they read, not whole tables (apply's are dropped first)
        ev.weights.clear()
        ev._row_values.clear()
        held = ev._tables["emb"][1]  # the choice whose rows the working table holds
        c = next(c for c in iter(lambda: _fresh_candidate(ev, rng), None) if ev.space.layer_choices(c)["emb"] != held)
        ev.evaluate(c)
        emb_choice = ev.space.layer_choices(c)["emb"]
        assert ev._row_values[("emb", emb_choice)].shape == (len(used), 16) and ("emb", emb_choice) not in ev.weights
        assert ev.model.emb.weight.data_ptr() == ev._original["emb"].data_ptr()  # restored after the forward
        # the working table and the rows at every setting are set aside from the weight budget
        assert ev._table_bytes == 400 * 16 * 4 * (1 + 6 * len(used) / 400)
        assert ev.weights.cap == ev._weight_budget - ev._table_bytes - ev.stored.used


def test_a_table_tied_to_an_output_layer_is_dequantized_whole():
    ev, _ = _lookup_evaluator(tied=True)
    with ev:
        assert "emb" not in ev._rows
        c = _fresh_candidate(ev, np.random.default_rng(4))
        got = ev.evaluate(c).metric
        ev.apply(c)
        assert got == ev.score_model("calibration")
