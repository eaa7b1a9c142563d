"""Weights beyond Linear/Conv/Embedding: Conv3d, transposed convolutions, recurrent and attention weights,
GPT-2's Conv1D and any parameter named under ``params:``. Each is found, sized exactly, quantized along its
output-channel axis, swapped in and out bit-identically, and planned and applied as it was scored."""
from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mpsearch.core.qconfig import QuantizerConfig, Setting
from mpsearch.core.sizes import layer_bytes
from mpsearch.errors import MPSearchError, MPSearchWarning
from mpsearch.evaluator import Evaluator
from mpsearch.exporters import export
from mpsearch.metrics import get_metric
from mpsearch.model import build_space
from mpsearch.plan import QuantizationPlan, apply
from mpsearch.quantize import quantize
from mpsearch.tasks.task import Task


class Mixed(nn.Module):
    """One of every new kind, in a forward that uses them all."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv3d(1, 4, 3, padding=1)
        self.up = nn.ConvTranspose1d(4, 6, 3, stride=2)
        self.gru = nn.GRU(6, 8, num_layers=2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True, bidirectional=True)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)
        self.c1d = Conv1D(12, 16)  # (in 16, out 12), GPT-2 layout
        self.pos = nn.Parameter(torch.randn(5, 12) * 0.1)  # a bare weight no kind covers
        self.head = nn.Linear(12, 3)

    def forward(self, x):  # x: (batch, 1, 5, 4, 4)
        h = self.conv3(x).mean(dim=(3, 4))  # (batch, 4, 5)
        h = self.up(h)[..., :5].transpose(1, 2)  # (batch, 5, 6)
        h, _ = self.gru(h)
        h, _ = self.lstm(h)  # (batch, 5, 16)
        h = self.enc(h)
        h = self.c1d(h) + self.pos
        return self.head(h.mean(1))


def _task(seed: int = 0) -> Task:
    torch.manual_seed(seed)
    model = Mixed().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 5, 4, 4, generator=g)
    return Task(model=model, calibration=[(x[:16], None)], validation=[(x[16:], None)], metric="cosine", name="mixed")


@pytest.fixture(scope="module")
def task():
    return _task()


def _cosine(out, ref) -> float:
    return float(get_metric("cosine", False)(out.float(), ref.float()))


def _space(task, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MPSearchWarning)
        return build_space(task.model, **kw)


def test_every_kind_is_found_with_its_axis(task):
    space = _space(task)
    got = {n: (l.kind, l.axis, l.module) for n, l in space.layers.items()}
    assert got["conv3"] == ("Conv3d", 0, None)
    assert got["up"] == ("ConvTranspose1d", 1, None)
    assert got["c1d"] == ("Conv1D", 1, None)
    for name in ("gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l1", "gru.weight_hh_l1"):
        assert got[name] == ("GRU", 0, "gru")
    for name in ("lstm.weight_ih_l0", "lstm.weight_hh_l0_reverse"):
        assert got[name] == ("LSTM", 0, "lstm")
    assert got["enc.layers.0.self_attn.in_proj_weight"] == ("MultiheadAttention", 0, "enc.layers.0.self_attn")
    # the attention reads out_proj's weight itself, never calling out_proj: swapped in around the attention
    assert got["enc.layers.0.self_attn.out_proj"] == ("Linear", 0, "enc.layers.0.self_attn")
    assert got["enc.layers.0.linear1"] == ("Linear", 0, None)
    assert space.layers["up"].rows_shape == (6, 4, 3)
    assert space.layers["c1d"].rows_shape == (12, 16)
    assert "pos" not in space.layers and "gru.bias_ih_l0" not in space.layers


def test_unsearched_weights_are_named_in_a_warning(task):
    total = sum(t.numel() * t.element_size() for t in task.model.state_dict().values())
    with pytest.warns(MPSearchWarning, match=r"1 weight\(s\) .* stay in float, ([0-9.]+)% .*: pos ") as rec:
        build_space(task.model)
    share = float(str(rec[0].message).split("float, ")[1].split("%")[0])
    assert share == pytest.approx(100 * 5 * 12 * 4 / total, abs=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MPSearchWarning)  # named under params: searched, no warning
        space = build_space(task.model, params={"pos": 1})
    assert space.layers["pos"].kind == "param" and space.layers["pos"].axis == 1
    assert space.layers["pos"].hook_modules == ("",)  # the root module reads it
    # types narrows the kinds, and what it leaves out is reported too
    with pytest.warns(MPSearchWarning, match="gru.weight_ih_l0"):
        build_space(task.model, types=["Linear"])


def test_every_kind_is_a_valid_types_entry():
    from mpsearch.model import KINDS
    from mpsearch.schemas import SpaceSpec, parse

    for kind in KINDS:
        if kind != "param":  # params: names those
            assert parse(SpaceSpec, {"types": [kind]}, "space", MPSearchError).types == [kind]


def test_params_patterns_are_checked(task):
    with pytest.raises(MPSearchError, match="matches no parameter"):
        _space(task, params=["nope"])
    with pytest.raises(MPSearchError, match="matches no parameter of 2 or more dimensions"):
        _space(task, params=["head.bias"])
    # a broad pattern skips norms and biases; what it names, it names instead of a module rule
    layers = _space(task, params=[r"pos|head\..*"]).layers
    assert {"pos", "head.weight"} <= set(layers) and "head" not in layers and "head.bias" not in layers
    with pytest.raises(MPSearchError, match="axis 3 is outside"):
        _space(task, params={"pos": 3})


def test_sizes_by_hand(task):
    """4 bits, float16 scales: packed integers plus one scale per output channel (or per group)."""
    space = _space(task)
    cfg = QuantizerConfig()
    s4 = Setting(4)
    # GRU weight_ih_l0: (3 x 8 gate rows, 6 inputs): 144 weights x 4 bits = 72 B, 24 scales = 48 B
    assert layer_bytes(space.layers["gru.weight_ih_l0"], s4, cfg) == 72 + 48
    # ConvTranspose1d weight (in 4, out 6, k 3): 72 weights = 36 B, 6 output channels = 12 B of scales
    assert layer_bytes(space.layers["up"], s4, cfg) == 36 + 12
    # Conv1D (in 16, out 12): 192 weights = 96 B, 12 scales = 24 B
    assert layer_bytes(space.layers["c1d"], s4, cfg) == 96 + 24
    # in_proj_weight (48, 16) in groups of 8: 768 weights = 384 B, 48 x 2 groups = 96 scales = 192 B
    grouped = QuantizerConfig(granularity="per-group", group_size=8)
    assert layer_bytes(space.layers["enc.layers.0.self_attn.in_proj_weight"], s4, grouped) == 384 + 192
    # Conv3d (4, 1, 3, 3, 3), 3 bits: 108 weights x 3 = 324 bits = 41 B, 4 scales = 8 B
    assert layer_bytes(space.layers["conv3"], Setting(3), cfg) == 41 + 8


def test_swapped_in_while_scored_and_restored_bit_identically(task):
    space = _space(task, choices=[2, 8, 16])
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    with Evaluator(replace(task, metric="neg_mse"), space, cache_dir=None) as ev:
        ref = ev.evaluate(space.highest()).metric
        for d in space.decisions:  # each weight alone at 2 bits changes what the model computes
            cand = tuple(c if e is not d else 2 for e, c in zip(space.decisions, space.highest()))
            # output error (neg_mse) at least 10 x the float16 model's
            assert ev.evaluate(cand).metric < 10 * ref < 0, d.name
        ev.apply(space.lowest())
        changed = [k for k, v in task.model.state_dict().items() if not torch.equal(v, before[k])]
        assert {space.layers[n].weight_name for n in space.layers} <= set(changed)
        ev.restore()
        assert all(torch.equal(v, before[k]) for k, v in task.model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in task.model.state_dict().items())


def test_error_falls_with_bits_on_every_new_kind(task):
    space = _space(task, choices=[1, 2, 3, 4, 5, 6, 8], params=["pos"])
    with Evaluator(task, space, cache_dir=None) as ev:
        for name in space.layers:
            errs = [ev.layer_error(name, b)["mse"] for b in (1, 2, 3, 4, 5, 6, 8)]
            assert all(a > b for a, b in zip(errs, errs[1:])), (name, errs)


def test_transformer_encoder_in_proj_is_searched_in_eval_mode():
    """The packed in_proj_weight is searched per layer and scored as the applied plan computes it (PyTorch
    skips its fused encoder kernel, which reads weights directly, while the evaluator's hooks are on)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                                                2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(64, 4)).eval()
    x = torch.randn(12, 4, 16)
    task = Task(model=model, calibration=[(x[:8], None)], validation=[(x[8:], None)], metric="cosine", name="tenc")
    space = _space(task, choices=[2, 16], include=[r".*in_proj_weight"])
    assert [d.name for d in space.decisions] == ["0.layers.0.self_attn.in_proj_weight",
                                                 "0.layers.1.self_attn.in_proj_weight"]
    with Evaluator(task, space, cache_dir=None) as ev:
        low = ev.evaluate((2, 2))
        assert low.metric < ev.evaluate((16, 16)).metric
        plan = QuantizationPlan.from_candidate(ev, (2, 2))
    quantized = apply(plan, model)
    with torch.no_grad():  # the applied plan, run on PyTorch's own (fast) path, scores what the search scored
        assert _cosine(quantized(x[:8]), model(x[:8])) == pytest.approx(low.metric, abs=1e-5)


def test_attention_with_separate_q_k_v_weights():
    """kdim/vdim unlike embed_dim: nn.MultiheadAttention keeps q/k/v_proj_weight apart, each a layer."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x[..., :8], x[..., 8:14], x[..., 14:18])[0]

    x = torch.randn(10, 5, 18)
    task = Task(model=Cross().eval(), calibration=[(x[:6], None)], validation=[(x[6:], None)], metric="neg_mse")
    space = _space(task, choices=[2, 16])
    names = {n: (s.kind, s.shape) for n, s in space.layers.items()}
    assert names == {"attn.q_proj_weight": ("MultiheadAttention", (8, 8)),
                     "attn.k_proj_weight": ("MultiheadAttention", (8, 6)),
                     "attn.v_proj_weight": ("MultiheadAttention", (8, 4)),
                     "attn.out_proj": ("Linear", (8, 8))}
    with Evaluator(task, space, cache_dir=None) as ev:
        top = ev.evaluate(space.highest()).metric
        for d in space.decisions:
            cand = tuple(2 if e is d else 16 for e in space.decisions)
            assert ev.evaluate(cand).metric < 10 * top < 0, d.name


def test_attention_at_the_root_and_tied_params_are_swapped_in_everywhere(tmp_path):
    """An nn.MultiheadAttention that is the model itself still gets its out_proj swapped in around it; a
    tied weight named under params: is swapped into every module that reads it; a plan of a params: layer
    that a module rule would also find is verified."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Root(nn.Module):
        def forward(self, x):
            return attn(x, x, x)[0]

    x = torch.randn(6, 4, 8)
    space = _space(Task(model=attn, calibration=[(x, None)], validation=[(x, None)]), choices=[2, 16])
    assert space.layers["out_proj"].hook_modules == ("",)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.emb(ids))))

    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(0))
    task = Task(model=Tied().eval(), calibration=[(ids, None)], validation=[(ids, None)], metric="neg_mse")
    space = _space(task, choices=[2, 16], types=["Linear"], params=[r"head\.weight"])
    assert space.layers["head.weight"].kind == "param" and set(space.layers["head.weight"].hook_modules) == {"head", "emb"}
    assert list(space.layers) == ["head.weight", "mix"]  # the params: hit, not the head's module rule
    with Evaluator(task, space, cache_dir=None) as ev:
        cand = (2, 16)
        ev.apply(cand)  # what the model computes with that weight at 2 bits, in both modules
        with torch.no_grad():
            expected = task.model(ids)
        ev.restore()
        with torch.no_grad():
            ref = task.model(ids)
        assert ev.evaluate(cand).metric == pytest.approx(-float(((expected - ref) ** 2).mean()), rel=1e-5)
        plan = QuantizationPlan.from_candidate(ev, cand)
    from mpsearch.plan import verify

    assert verify(plan, task)["size_bytes"] == plan.predicted["size_bytes"]


def test_semi_structured_sparsity_runs_along_the_rows_of_transposed_weights():
    """2:4 needs rows that are a multiple of 4 long, counted along the output-channel layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose1d(6, 8, 1), nn.ConvTranspose1d(8, 4, 1)).eval()
    x = torch.randn(5, 6, 7)
    task = Task(model=model, calibration=[(x, None)], validation=[(x, None)], metric="cosine")
    space = _space(task, choices=[4], sparsity=[0, "2:4"])
    # rows of layer 0 hold 6 weights (not a multiple of 4), of layer 1 eight
    assert [len(d.choices) for d in space.decisions] == [1, 2]
    with Evaluator(task, space, cache_dir=None) as ev:
        e = ev.evaluate(space.lowest())
        assert e.error is None and e.metric < 1.0


def test_multiply_accumulates_of_every_kind_by_hand():
    """BOPs (bits x activation bits x MACs) count each weight's multiply-accumulates per sample."""

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(4, 6, 3)  # (batch, 4, 5) -> (batch, 6, 7)
            self.gru = nn.GRU(6, 8, batch_first=True)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.c1d = Conv1D(3, 8)

        def forward(self, x):
            h = self.up(x).transpose(1, 2)[:, :5]  # (batch, 5, 6)
            h, _ = self.gru(h)  # (batch, 5, 8)
            h = self.attn(h, h[:, :3], h[:, :3])[0]  # 5 queries, 3 keys and values
            return self.c1d(h.contiguous())  # (batch, 5, 3)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 5)
    task = Task(model=Small().eval(), calibration=[(x, None)], validation=[(x, None)], metric="cosine")
    space = _space(task, choices=[4, 8])
    with Evaluator(task, space, cache_dir=None) as ev:
        macs = ev.sizes.macs
    assert macs["up"] == 4 * 5 * (6 * 3)  # every input value meets out x kernel weights
    assert macs["gru.weight_ih_l0"] == 24 * 6 * 5 and macs["gru.weight_hh_l0"] == 24 * 8 * 5  # per time step
    assert macs["attn.in_proj_weight"] == 8 * 8 * (5 + 3 + 3)  # q over 5 tokens, k and v over 3
    assert macs["attn.out_proj"] == 8 * 8 * 5
    assert macs["c1d"] == 5 * 3 * 8


def test_conv1d_scales_match_a_transposed_linear():
    torch.manual_seed(0)
    conv = Conv1D(12, 16)
    nn.init.normal_(conv.weight)
    lin = nn.Linear(16, 12, bias=False)
    lin.weight.data = conv.weight.data.T.contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MPSearchWarning)
        sc = build_space(nn.Sequential(conv), choices=[3])
        sl = build_space(nn.Sequential(lin), choices=[3])
    assert sc.layers["0"].rows_shape == sl.layers["0"].shape == (12, 16)
    x = torch.randn(20, 16)
    tc = Task(model=nn.Sequential(conv), calibration=[(x, None)], validation=[(x, None)], metric="cosine")
    tl = Task(model=nn.Sequential(lin), calibration=[(x, None)], validation=[(x, None)], metric="cosine")
    with Evaluator(tc, sc, cache_dir=None) as ec, Evaluator(tl, sl, cache_dir=None) as el:
        qc, ql = ec.quantized_weight("0", 3), el.quantized_weight("0", 3)
        assert qc.shape == (16, 12) and torch.equal(qc.T, ql)
        assert ec.evaluate((3,)).metric == pytest.approx(el.evaluate((3,)).metric, abs=1e-6)
    cfg = QuantizerConfig()
    per_channel = quantize(lin.weight.detach(), Setting(3), cfg).scales.flatten()
    assert per_channel.numel() == 12  # one scale per output channel, as the Linear has


def test_plan_round_trip_and_apply_match_the_evaluator(task, tmp_path):
    space = _space(task, choices=[3, 4, 8], params={"pos": 1})
    cand = tuple(space.decisions[i].choices[i % 3] for i in range(space.n_decisions))
    with Evaluator(task, space, cache_dir=None) as ev:
        score = ev.evaluate(cand, "validation").metric
        plan = QuantizationPlan.from_candidate(ev, cand)
    assert plan.layers["pos"]["kind"] == "param" and plan.layers["pos"]["axis"] == 1
    assert plan.layers["gru.weight_hh_l1"]["weight"] == "gru.weight_hh_l1"
    assert plan.layers["gru.weight_hh_l1"]["module"] == "gru"
    plan.save(tmp_path / "plan.json")
    again = QuantizationPlan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    quantized = apply(again, task.model)
    x = task.validation[0][0]
    with torch.no_grad():
        assert _cosine(quantized(x), task.model(x)) == pytest.approx(score, abs=1e-5)
    from mpsearch.plan import verify

    got = verify(again, task)
    assert got["size_bytes"] == plan.predicted["size_bytes"]
    assert got["metric"] == pytest.approx(score, abs=1e-6)


class Deconv(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2)
        self.up1 = nn.ConvTranspose1d(4, 5, 3, groups=1)
        self.c1d = Conv1D(6, 5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: (batch, 3, 4, 4)
        h = self.up(x).flatten(2)  # (batch, 4, 81)
        h = self.up1(h).mean(-1)  # (batch, 5)
        return self.head(torch.tanh(self.c1d(h)))


@pytest.mark.parametrize("quantizer", [{}, {"granularity": "per-group", "group_size": 4}])
def test_transposed_layouts_run_in_onnxruntime(tmp_path, quantizer):
    """ConvTranspose and Conv1D keep their output channel on axis 1: ONNX Runtime gets the plan's integers
    as rows and the graph moves them back, computing what the evaluator scored."""
    from mpsearch.exporters.onnxruntime import run_onnx, session

    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4)
    task = Task(model=Deconv().eval(), calibration=[(x[:6], None)], validation=[(x[6:], None)], metric="cosine")
    space = _space(task, choices=[3, 4, 16], quantizer=quantizer)
    cand = (3, 4, 3, 16)
    with Evaluator(task, space, cache_dir=None) as ev:
        plan = QuantizationPlan.from_candidate(ev, cand)
        ev.apply(cand)
        with torch.no_grad():
            expected = task.model(x[6:])
        ev.restore()
    res = export(plan, "onnxruntime", tmp_path / "deconv.onnx", task)
    layers = {d["layer"] for d in res.details["initializers"].values()}
    assert layers == {"up", "up1", "c1d", "head"}
    got = run_onnx(session(tmp_path / "deconv.onnx"), task.validation)
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad():  # the quantized weights, not the float ones: far from the float model's outputs
        assert (got - task.model(x[6:])).abs().max() > 20 * (got - expected).abs().max()


def test_exporters_refuse_kinds_they_cannot_carry(task, tmp_path):
    space = _space(task, choices=[4, 8])
    with Evaluator(task, space, cache_dir=None) as ev:
        plan = QuantizationPlan.from_candidate(ev, space.highest())
    with pytest.raises(MPSearchError, match=r"^onnxruntime export: layer 'gru.weight_ih_l0' is a GRU weight") as exc:
        export(plan, "onnxruntime", tmp_path / "m.onnx", task)
    assert "\n" not in str(exc.value)
    with pytest.raises(MPSearchError, match="gptqmodel export: layer 'conv3' is a Conv3d weight"):
        export(plan, "gptqmodel", tmp_path / "q.json")
    export(plan, "csv", tmp_path / "plan.csv")  # a table carries every kind
    assert "gru.weight_ih_l0" in (tmp_path / "plan.csv").read_text()
