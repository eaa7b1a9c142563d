"""The torchao and onnxruntime exporters, checked by loading their output into the real tools."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from mpsearch.errors import MPSearchError
from mpsearch.exporters import export
from mpsearch.exporters.onnxruntime import container
from mpsearch.core.qconfig import Setting
from mpsearch.quantize import quantize
from mpsearch.plan import QuantizationPlan
from mpsearch.core import QuantizerConfig
from mpsearch.quantize import fake_quantize as quantize_weight

pytestmark = pytest.mark.export

DIGITS_TOL = 0.01  # one accuracy point
MINILM_TOL = 0.01  # cosine


# ---- plans and fresh models ------------------------------------------------------------------------
def _plan(space, evaluator, candidate):
    try:
        return QuantizationPlan.from_candidate(evaluator, candidate, provenance={"strategy": "test"},
                                               validation_metric=evaluator.validation_metric(candidate))
    finally:
        evaluator.restore()


@pytest.fixture(scope="module")
def digits_plan(digits_space, digits_evaluator):
    names = [d.name for d in digits_space.decisions]
    assert names == ["features.0", "features.2", "features.5", "classifier.1", "classifier.3", "classifier.5"]
    return _plan(digits_space, digits_evaluator, (8, 4, 3, 5, 2, 6))


@pytest.fixture(scope="module")
def minilm_plan(request):
    space = request.getfixturevalue("minilm_space")
    evaluator = request.getfixturevalue("minilm_evaluator")

    def bits(name):
        if "embeddings" in name:
            return 4
        if "attention.self" in name:
            return 6
        if "attention.output" in name:
            return 5
        if "intermediate" in name:
            return 8
        return 4  # FFN output

    return _plan(space, evaluator, tuple(bits(d.name) for d in space.decisions))


@pytest.fixture(scope="module")
def fresh_digits():
    """A task whose model nobody else touches (exporters trace and quantize models in place)."""
    from mpsearch.tasks import load_task

    return load_task("digits")


@pytest.fixture(scope="module")
def fresh_minilm():
    from mpsearch.tasks import load_task

    return load_task("minilm")


def _task_copy(task):
    return dataclasses.replace(task, model=copy.deepcopy(task.model))


def _outputs(model, batches):
    outs = []
    with torch.inference_mode():
        for x, _ in batches:
            outs.append(model(**x) if isinstance(x, dict) else model(x))
    return torch.cat(outs)


def _score(evaluator, outputs):
    """The evaluator's validation metric for these outputs (targets, or full-precision outputs)."""
    if evaluator.metric.uses_targets:
        targets = torch.cat([y for _, y in evaluator.validation])
    else:
        targets = evaluator.reference_outputs["validation"]
    return float(evaluator.metric(outputs, targets))


def _predicted(plan):
    return plan.predicted["validation_metric"]


# ---- the plan's integers, shared by both exporters -----------------------------------------------------
@pytest.mark.parametrize("cfg,method", [
    (QuantizerConfig(), "rtn"),
    (QuantizerConfig(grid="narrow"), "rtn"),
    (QuantizerConfig(scheme="asymmetric"), "rtn"),
    (QuantizerConfig(granularity="per-group", group_size=16), "rtn"),
    (QuantizerConfig(scheme="asymmetric", granularity="per-group", group_size=32), "mse-clip"),
    (QuantizerConfig(), "mse-clip"),
])
def test_quantized_integers_reproduce_the_weights(fresh_digits, cfg, method):
    """The codes, scales and zero-points exporters write dequantize, by the runtime's formula, to what was scored."""
    for name, p in fresh_digits.model.named_parameters():
        if not name.endswith("weight"):
            continue
        choices = (1, 2, 3, 5, 8) if cfg.scheme == "symmetric" else (2, 3, 8)
        for bits in choices if method == "rtn" else (3, 8):
            qw = quantize(p, Setting(bits, method), cfg)
            q, scale = qw.codes, qw.scales
            zp = torch.zeros_like(scale, dtype=torch.int32) if qw.zero_points is None else qw.zero_points
            if cfg.scheme == "symmetric" and bits > 1:
                assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
            elif cfg.scheme == "asymmetric":
                assert q.min() >= 0 and q.max() <= 2**bits - 1
            g = q.shape[1] if cfg.granularity == "per-channel" else cfg.group_size
            zp_w, scale_w = (t.repeat_interleave(g, 1)[:, : q.shape[1]] for t in (zp, scale))
            deq = ((q - zp_w).float() * scale_w).reshape(p.shape)
            assert torch.equal(deq, quantize_weight(p, Setting(bits, method), cfg)), (name, bits)


def test_containers():
    assert [container(b, "symmetric") for b in (2, 3, 4, 5, 6, 7, 8, 16)] == \
        ["INT4"] * 3 + ["INT8"] * 4 + ["FLOAT16"]
    assert container(3, "asymmetric") == "UINT4" and container(6, "asymmetric") == "UINT8"


# ---- torchao -----------------------------------------------------------------------------------------
def _check_torchao_weights(model, plan):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    modules = dict(model.named_modules())
    for name, e in plan.layers.items():
        w = modules[name].weight
        assert isinstance(w, IntxUnpackedToInt8Tensor), name
        assert w.target_dtype == getattr(torch, f"int{e['bits']}"), name
        assert w.scale.dtype == torch.float16
        assert w.scale.numel() == e["shape"][0]  # per output channel, as planned
        lo, hi = -(2 ** (e["bits"] - 1)), 2 ** (e["bits"] - 1) - 1
        assert lo <= int(w.qdata.min()) and int(w.qdata.max()) <= hi


def test_torchao_digits(digits_plan, digits_evaluator, fresh_digits):
    from torchao.core.config import config_from_dict, config_to_dict
    from torchao.quantization import quantize_

    from mpsearch.exporters.torchao import quantize_with_torchao, torchao_config

    pred = _predicted(digits_plan)
    exact = quantize_with_torchao(digits_plan, copy.deepcopy(fresh_digits.model), qparams="plan")
    _check_torchao_weights(exact, digits_plan)
    assert abs(_score(digits_evaluator, _outputs(exact, digits_evaluator.validation)) - pred) <= DIGITS_TOL

    # torchao's own quantizer through quantize_(FqnToConfig) computes exactly the plan's integers and scales:
    # mpsearch's full grid rounds as torchao's MappingType.SYMMETRIC does
    own = quantize_with_torchao(digits_plan, copy.deepcopy(fresh_digits.model), qparams="torchao")
    _check_torchao_weights(own, digits_plan)
    for name in ("classifier.1", "classifier.3", "classifier.5"):
        a, b = dict(own.named_modules())[name].weight, dict(exact.named_modules())[name].weight
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale), name
        assert torch.equal(a.dequantize(), b.dequantize()), name
    assert abs(_score(digits_evaluator, _outputs(own, digits_evaluator.validation)) - pred) <= 1e-9

    # the serialised config is what quantize_ applied
    cfg = config_from_dict(json.loads(json.dumps(config_to_dict(torchao_config(digits_plan)))))
    again = copy.deepcopy(fresh_digits.model)
    quantize_(again, cfg, filter_fn=None)
    for name in ("classifier.1", "classifier.3", "classifier.5"):
        a, b = dict(again.named_modules())[name].weight, dict(own.named_modules())[name].weight
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


def test_torchao_export_files(digits_plan, digits_evaluator, fresh_digits, tmp_path):
    from torchao.core.config import config_from_dict

    task = _task_copy(fresh_digits)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    res = export(digits_plan, "torchao", tmp_path / "digits.json", task)
    after = task.model.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(before[k], after[k]) for k in before)  # untouched
    assert [p.name for p in res.paths] == ["digits.json", "digits.pt"]
    assert res.size_bytes == sum(p.stat().st_size for p in res.paths) > 0
    doc = json.loads((tmp_path / "digits.json").read_text())
    cfg = config_from_dict(doc)
    assert set(cfg.fqn_to_config) == {"classifier.1", "classifier.3", "classifier.5"}
    assert doc["_mpsearch"]["conv2d_per_output_channel"] == ["features.0", "features.2", "features.5"]
    assert {n: v["target_dtype"] for n, v in res.details["weights"].items()} == \
        {n: f"int{e['bits']}" for n, e in digits_plan.layers.items()}
    model = copy.deepcopy(fresh_digits.model)
    model.load_state_dict(torch.load(tmp_path / "digits.pt", weights_only=True), assign=True)
    _check_torchao_weights(model, digits_plan)
    assert abs(_score(digits_evaluator, _outputs(model, digits_evaluator.validation)) - _predicted(digits_plan)) <= DIGITS_TOL


def test_torchao_refuses_ragged_groups(fresh_digits, digits_evaluator):
    from mpsearch.exporters.torchao import quantize_with_torchao

    plan = QuantizationPlan(
        model={"name": "digits", "fingerprint": digits_evaluator.space.fingerprint},
        quantizer=QuantizerConfig(granularity="per-group", group_size=48).to_dict(),
        layers={"classifier.3": {"bits": 4, "kind": "Linear", "shape": [64, 128], "group_size": 48}},
        unquantized=[], predicted={"size_bytes": 1, "metric_name": "accuracy", "metric": 0.0})
    with pytest.raises(MPSearchError, match="ragged"):
        quantize_with_torchao(plan, copy.deepcopy(fresh_digits.model))


@pytest.mark.minilm
def test_torchao_minilm(minilm_plan, minilm_evaluator, fresh_minilm):
    from mpsearch.exporters.torchao import quantize_with_torchao

    pred = _predicted(minilm_plan)
    for qparams in ("plan", "torchao"):
        model = quantize_with_torchao(minilm_plan, copy.deepcopy(fresh_minilm.model), qparams=qparams)
        _check_torchao_weights(model, minilm_plan)
        cos = _score(minilm_evaluator, _outputs(model, minilm_evaluator.validation))
        assert abs(cos - pred) <= MINILM_TOL, (qparams, cos, pred)


# ---- ONNX Runtime --------------------------------------------------------------------------------------
def _check_onnx(path, plan, res):
    import onnx
    from onnx import TensorProto

    from mpsearch.exporters.onnxruntime import session

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {i.name: i for i in proto.graph.initializer}
    dq = {n.output[0].removesuffix("_dq"): n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    details = res.details["initializers"]
    assert sorted(d["layer"] for d in details.values()) == sorted(plan.layers)
    for iname, d in details.items():
        bits = plan.layers[d["layer"]]["bits"]
        assert d["bits"] == bits and d["container"] == container(bits, plan.quantizer["scheme"])
        assert iname not in inits  # the float weight is gone
        if d["container"] == "FLOAT16":
            assert inits[iname + "_fp16"].data_type == TensorProto.FLOAT16
            continue
        q = inits[dq[iname].input[0]]
        assert q.data_type == getattr(TensorProto, d["container"]), iname
        if plan.quantizer["scheme"] == "symmetric":  # the planned range, inside the container
            vals = onnx.numpy_helper.to_array(q).astype("int32")
            assert -(2 ** (bits - 1)) <= vals.min() and vals.max() <= 2 ** (bits - 1) - 1, iname
    assert res.size_bytes == path.stat().st_size
    return session(path)


def test_onnxruntime_digits(digits_plan, digits_evaluator, fresh_digits, tmp_path):
    from mpsearch.exporters.onnxruntime import run_onnx

    path = tmp_path / "digits.onnx"
    res = export(digits_plan, "onnxruntime", path, _task_copy(fresh_digits))
    sess = _check_onnx(path, digits_plan, res)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    acc = _score(digits_evaluator, run_onnx(sess, digits_evaluator.validation))
    assert abs(acc - _predicted(digits_plan)) <= DIGITS_TOL


@pytest.mark.parametrize("quantizer,extra,containers", [
    ({"scheme": "asymmetric", "granularity": "per-group", "group_size": 16, "method": "mse-clip"}, {},
     {"UINT4", "UINT8", "FLOAT16"}),
    ({"method": "gptq"}, {"sparsity": [0.5]}, {"INT4", "INT8", "FLOAT16"}),
    ({"scheme": "asymmetric", "method": "gradient"}, {"sparsity": ["2:4"]}, {"UINT4", "UINT8", "FLOAT16"}),
])
def test_onnxruntime_runs_the_plans_integers(fresh_digits, tmp_path, quantizer, extra, containers):
    """Ragged groups (blocked DequantizeLinear), UINT containers, 16-bit Cast, gptq and gradient integers with
    pruned weights: ORT computes the weights the evaluator scored."""
    from mpsearch.evaluator import Evaluator
    from mpsearch.exporters.onnxruntime import run_onnx, session
    from mpsearch.model import build_space

    task = _task_copy(fresh_digits)
    space = build_space(task.model, choices=[3, 5, 16], model_name="digits", quantizer=quantizer, **extra)
    ev = Evaluator(task, space)
    cand = tuple(d.choices[i % d.n_choices] for i, d in enumerate(space.decisions))
    plan = _plan(space, ev, cand)
    path = tmp_path / "grouped.onnx"
    res = export(plan, "onnxruntime", path, _task_copy(fresh_digits))
    assert {d["container"] for d in res.details["initializers"].values()} == containers
    ev.apply(cand)
    torch_out = _outputs(ev.model, ev.validation)
    ev.restore()
    assert torch.allclose(run_onnx(session(path), ev.validation), torch_out, atol=1e-4)


@pytest.mark.minilm
def test_onnxruntime_minilm(minilm_plan, minilm_evaluator, fresh_minilm, tmp_path):
    from mpsearch.exporters.onnxruntime import run_onnx, session

    path = tmp_path / "minilm.onnx"
    res = export(minilm_plan, "onnxruntime", path, _task_copy(fresh_minilm))
    sess = _check_onnx(path, minilm_plan, res)
    containers = {d["container"] for d in res.details["initializers"].values()}
    assert containers == {"INT4", "INT8"}
    pred = _predicted(minilm_plan)
    cos = _score(minilm_evaluator, run_onnx(sess, minilm_evaluator.validation))
    assert abs(cos - pred) <= 1e-4  # float activations: the plan's weights, computed by ORT's int kernels
    # ORT's default session quantizes activations inside MatMulNBits: still within tolerance
    cos_default = _score(minilm_evaluator, run_onnx(session(path, accuracy_level=None), minilm_evaluator.validation))
    assert abs(cos_default - pred) <= MINILM_TOL


RESNET_TASK = '''
import torch
from torch import nn
from mpsearch import Task
from mpsearch.tasks import digits


class Block(nn.Module):
    """Residual block: depthwise 3x3 conv + BN, pointwise 1x1 conv + BN, skip connection."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.pw(torch.relu(self.bn1(self.dw(x))))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def make_task():
    torch.manual_seed(0)
    s = digits.splits()
    model = TinyResNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = s["train"]
    for _ in range(40):  # a few full-batch steps: BatchNorm statistics and a usable classifier
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    cal, val = s["calibration"], s["validation"]
    return Task(model=model, calibration=[cal], validation=[val], metric="accuracy", name="tinyresnet")
'''


def test_resnet_with_batchnorm_is_searched_and_exported_to_onnxruntime(tmp_path):
    """BatchNorm is folded into the convolutions before the search, so the weights ONNX holds are the scored ones."""
    import mpsearch
    from mpsearch.exporters.onnxruntime import run_onnx, session
    from mpsearch.tasks import load_task

    (tmp_path / "resnet_task.py").write_text(RESNET_TASK)
    spec = f"{tmp_path / 'resnet_task.py'}:make_task"
    task = load_task(spec)
    assert len(task.meta["folded_batchnorm"]) == 5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in task.model.modules())
    # 60: phase 1 (31 measurements) and a phase 2; 30 stops inside phase 1 (validation 0.40 on one thread)
    res = mpsearch.optimize(task, strategy="greedy", budget=mpsearch.Budget(max_avg_bits=4.0), max_evals=60)
    plan = res.plan()
    assert plan.predicted["validation_metric"] > 0.5  # a trained classifier
    path = tmp_path / "resnet.onnx"
    export(plan, "onnxruntime", path, load_task(spec))  # a fresh load folds the same way: the fingerprint matches
    acc = float((run_onnx(session(path), task.validation).argmax(-1) == task.validation[0][1]).float().mean())
    assert acc == pytest.approx(plan.predicted["validation_metric"], abs=1 / 300)  # at most one image of 300
