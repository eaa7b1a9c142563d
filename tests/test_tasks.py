"""Built-in tasks, user-task loading and metric orientation."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch
from torch import nn

from mpsearch.errors import TaskError
from mpsearch.evaluator import Evaluator
from mpsearch.metrics import BUILTIN, get_metric
from mpsearch.tasks import load_task
from mpsearch.tasks import digits as digits_mod
from mpsearch.tasks.digits import load_model as load_digits_model
from mpsearch.model import build_space
from mpsearch.tasks import Task

USER_TASK = """
import torch
from torch import nn
from mpsearch.tasks import Task


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))), "extra"   # a tuple: the first element is scored


def make_task():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    return Task(model=TwoLayer(), calibration=[(x[:20], None)], validation=[(x[20:], None)], metric="mse")


def wrong_type():
    return {"model": 1}


def broken():
    raise RuntimeError("boom")


NOT_CALLABLE = 3
"""


# ---- digits -------------------------------------------------------------------------------------
def test_digits_task_facts(digits_task, digits_space):
    assert digits_task.name == "digits" and digits_task.metric == "accuracy"
    quantizable = [m for m in digits_task.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(quantizable) >= 6
    assert len(digits_space.layers) >= 6
    n_cal = sum(len(y) for _, y in digits_task.calibration)
    n_val = sum(len(y) for _, y in digits_task.validation)
    assert n_cal >= 64 and n_val >= 64


def test_digits_full_precision_validation_accuracy():
    model = load_digits_model()
    x, y = digits_mod.splits()["validation"]
    with torch.inference_mode():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.97


def test_digits_splits_are_disjoint():
    s = digits_mod.splits()
    rows = {name: {tuple(img.flatten().tolist()) for img in x} for name, (x, _) in s.items()}
    assert not rows["calibration"] & rows["validation"]
    assert not rows["train"] & (rows["calibration"] | rows["validation"])
    assert sum(len(y) for _, y in s.values()) == 1797


def test_digits_weights_file_is_small():
    assert digits_mod.WEIGHTS.stat().st_size <= 300_000


# ---- minilm --------------------------------------------------------------------------------------
def _sentences(batches) -> list[tuple[int, ...]]:
    """The token ids of every sentence, padding stripped."""
    out = []
    for x, target in batches:
        assert target is None
        for ids, mask in zip(x["input_ids"], x["attention_mask"]):
            out.append(tuple(ids[mask.bool()].tolist()))
    return out


def test_minilm_task_facts(minilm_task, minilm_evaluator):
    cal, val = _sentences(minilm_task.calibration), _sentences(minilm_task.validation)
    assert len(cal) >= 64 and len(val) >= 64
    assert len(set(cal)) == len(cal) and len(set(val)) == len(val)
    assert not set(cal) & set(val)
    assert minilm_task.meta["n_calibration"] == len(cal) and minilm_task.meta["n_validation"] == len(val)
    assert minilm_task.metric == "cosine"
    assert minilm_evaluator.metric.name == "cosine" and not minilm_evaluator.metric.uses_targets
    assert minilm_evaluator.reference_metric == pytest.approx(1.0, abs=1e-5)
    assert minilm_evaluator.reference_validation_metric == pytest.approx(1.0, abs=1e-5)
    emb = minilm_evaluator.reference_outputs["calibration"]
    assert emb.shape == (len(cal), 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(cal)), atol=1e-5)


def test_minilm_quality_rises_with_bits(minilm_evaluator):
    ev = minilm_evaluator
    q2 = ev.evaluate(ev.space.uniform(2)).metric
    q8 = ev.evaluate(ev.space.uniform(8)).metric
    assert q2 < q8 < ev.reference_metric + 1e-6
    assert q8 > 0.99
    ev.restore()


# ---- metric orientation ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kl", "mse", "cosine", "sqnr"])
def test_fidelity_metrics_are_higher_is_better(name):
    m = get_metric(name, has_targets=False)
    assert m.name == {"kl": "neg_kl", "mse": "neg_mse"}.get(name, name)  # the name says what the value is
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(32, 10, generator=g)
    small = ref + 0.05 * torch.randn(32, 10, generator=g)
    large = ref + 0.5 * torch.randn(32, 10, generator=g)
    at_ref, s, l = m(ref, ref), m(small, ref), m(large, ref)
    assert at_ref > s > l, (name, at_ref, s, l)
    if name in ("kl", "mse"):
        assert at_ref == pytest.approx(0.0, abs=1e-6)
        assert m.normalize(at_ref, at_ref) == pytest.approx(1.0)
        assert 0 < m.normalize(l, at_ref) < m.normalize(s, at_ref) < 1
    if name == "cosine":
        assert at_ref == pytest.approx(1.0, abs=1e-6)


def test_kl_is_the_kl_divergence_by_hand():
    ref = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> p = (1/4, 3/4)
    out = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert BUILTIN["neg_kl"](out, ref) == pytest.approx(-kl, rel=1e-5)


def test_accuracy_metric_and_targets():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert BUILTIN["accuracy"](logits, torch.tensor([1, 0, 0, 0])) == pytest.approx(0.75)
    with pytest.raises(TaskError):
        get_metric("accuracy", has_targets=False)
    with pytest.raises(TaskError):
        get_metric("top5", has_targets=True)


# ---- user tasks --------------------------------------------------------------------------------
@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_task.py"
    path.write_text(textwrap.dedent(USER_TASK))
    return path


def test_load_task_from_file(user_file):
    spec = f"{user_file}:make_task"
    task = load_task(spec)
    assert isinstance(task, Task) and task.name == spec
    space = build_space(task.model, [2, 4, 8])
    assert list(space.layers) == ["a", "b"]
    ev = Evaluator(task, space)
    # mse metric against the reference: 0 at full precision, below it once quantized
    assert ev.reference_metric == 0.0
    assert ev.evaluate(space.uniform(2)).metric < ev.evaluate(space.uniform(8)).metric < 0.0


def test_load_task_from_module(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    task = load_task("my_task:make_task")
    assert isinstance(task, Task) and task.metric == "mse"
    builtin_like = load_task("mpsearch.tasks.digits:load_task")
    assert builtin_like.name == "digits" and len(builtin_like.calibration) == 3


@pytest.mark.parametrize("suffix, match", [
    (":wrong_type", "must return"),
    (":missing_function", "no function"),
    (":NOT_CALLABLE", "no function"),
    (":broken", "boom"),
])
def test_load_task_errors_from_file(user_file, suffix, match):
    with pytest.raises(TaskError, match=match):
        load_task(f"{user_file}{suffix}")


def test_load_task_errors(tmp_path):
    with pytest.raises(TaskError):
        load_task("no_such_module_for_mpsearch_tests:make")
    with pytest.raises(TaskError):
        load_task(f"{tmp_path}/absent.py:make")
    with pytest.raises(TaskError):
        load_task("not-a-builtin")
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def make(:\n")
    with pytest.raises(TaskError):
        load_task(f"{bad}:make")


def test_task_check_rejects_bad_tasks():
    m = nn.Linear(2, 2)
    x = torch.zeros(1, 2)
    with pytest.raises(TaskError):
        Task(model="not a module", calibration=[(x, None)], validation=[(x, None)]).check()
    with pytest.raises(TaskError):
        Task(model=m, calibration=[], validation=[(x, None)]).check()
    with pytest.raises(TaskError):
        Task(model=m, calibration=[x], validation=[(x, None)]).check()
    with pytest.raises(TaskError):
        Task(model=m, calibration=[(x, torch.zeros(1))], validation=[(x, None)]).check()
