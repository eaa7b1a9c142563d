"""What a deployment runtime measures for a plan, next to what the plan predicts.

``verify_runtime`` runs the task's validation split through the runtime itself and scores its
outputs with the task's metric against the full-precision PyTorch model, as the evaluator scored
the plan:

* ``onnxruntime``: the plan's ONNX export (its own integers) in an ONNX Runtime CPU session;
* ``torchao``: the model quantized by torchao's ``quantize_`` from the plan's bit-widths, with
  torchao's own scales and rounding (they are mpsearch's on the full grid with rtn);
* ``llama-cpp``: a GGUF (``mpsearch export --format gguf``) loaded in llama.cpp, whose embeddings of
  the validation sentences are the outputs (sentence-encoder tasks, such as ``minilm``).
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from ..errors import MPSearchError
from ..evaluator import Evaluator, _call, _concat, task_output
from ..metrics import get_metric
from ..plan import QuantizationPlan
from . import check_format

RUNTIMES = ("onnxruntime", "torchao", "llama-cpp")


def _outputs(task, model: torch.nn.Module, batches: list):
    """The model's outputs over ``batches``, as the evaluator takes them (``task_output``)."""
    with torch.no_grad():
        return _concat([task_output(task, _call(model, x)) for x, _ in batches])


def _llama_cpp(plan: QuantizationPlan, task, gguf: str | Path | None) -> tuple[torch.Tensor, dict]:
    from .llama_runtime import embeddings, gguf_size, gguf_tensors

    if gguf is None:
        raise MPSearchError("--runtime llama-cpp needs --gguf FILE: the GGUF `mpsearch export --format gguf` wrote")
    texts = (task.meta.get("texts") or {}).get("validation")
    if not texts or task.metric != "cosine":
        raise MPSearchError(f"--runtime llama-cpp measures sentence embeddings; task {task.name!r} has no validation "
                            "sentences with a cosine metric (minilm has)")
    if plan.quantizer.get("format") != "ggml":
        raise MPSearchError("--runtime llama-cpp checks a plan of GGML types (search with quantizer: {format: ggml}, "
                            "e.g. search_spaces/minilm_ggml.yaml) exported with --format gguf")
    from .gguf import planned_tensors

    tensors = gguf_tensors(gguf)  # reads the file once: names, types and sizes
    names = planned_tensors(plan, tensors)
    wrong = [g for g, layer in names.items() if tensors[g]["type"] != _gguf_type(plan, layer)]
    if wrong:
        g = wrong[0]
        raise MPSearchError(f"{gguf} is not this plan's GGUF: tensor {g} is {tensors[g]['type']}, the plan says "
                            f"{_gguf_type(plan, names[g])} ({len(wrong)} tensor(s) differ)")
    n_bytes, _, bpw = gguf_size(tensors)
    out = torch.from_numpy(embeddings(gguf, texts, n_threads=1))
    return out, {"size_bytes": n_bytes, "avg_bits": round(bpw, 6), "gguf": str(gguf)}


def _gguf_type(plan: QuantizationPlan, layer: str) -> str:
    x = plan.setting(layer)
    return x.method if x.ggml else "f16" if x.bits == 16 else "f32"


def _onnxruntime(plan: QuantizationPlan, task) -> tuple[torch.Tensor, dict]:
    from .onnxruntime import export_quantized_onnx, run_onnx, session

    with tempfile.TemporaryDirectory(prefix="mpsearch-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_quantized_onnx(plan, task.model, task, path)
        sess = session(path)
        out = run_onnx(sess, task.validation)
        del sess
    return out.float(), {"size_bytes": None}  # the graph's one output is the model's first: the task's already


def _torchao(plan: QuantizationPlan, task) -> tuple[torch.Tensor, dict]:
    from .torchao import quantize_with_torchao

    model = quantize_with_torchao(plan, copy.deepcopy(task.model).eval(), qparams="torchao")
    return _outputs(task, model, task.validation), {"size_bytes": None}


def verify_runtime(plan: QuantizationPlan, task, runtime: str, gguf: str | Path | None = None) -> dict:
    """The plan measured inside ``runtime`` on the task's validation split, next to the plan's prediction."""
    if runtime not in RUNTIMES:
        raise MPSearchError(f"unknown runtime {runtime!r}; choose one of pytorch, {', '.join(RUNTIMES)}")
    if runtime != "llama-cpp":
        check_format(plan, runtime)
        if gguf is not None:
            raise MPSearchError("--gguf is for --runtime llama-cpp")
    plan.check_model(task.model)
    task.model.eval()
    reference = _outputs(task, task.model, task.validation)
    t0 = time.perf_counter()
    if runtime == "llama-cpp":
        out, extra = _llama_cpp(plan, task, gguf)
    elif runtime == "onnxruntime":
        out, extra = _onnxruntime(plan, task)
    else:
        out, extra = _torchao(plan, task)
    run_s = time.perf_counter() - t0
    metric = get_metric(task.metric, task.has_targets)
    targets = Evaluator._targets_of(task.validation) if metric.uses_targets else reference
    if getattr(out, "shape", None) != getattr(reference, "shape", None):
        raise MPSearchError(f"{runtime} returned outputs of shape {list(getattr(out, 'shape', []))}, the model "
                            f"{list(getattr(reference, 'shape', []))}")
    measured = float(metric(out, targets))
    pred = plan.predicted
    predicted = pred.get("validation_metric", pred.get("metric"))
    return {
        "model": plan.model.get("name"),
        "runtime": runtime,
        "metric_name": metric.name,
        "metric": measured,
        "predicted_metric": predicted,
        "difference": None if predicted is None else measured - float(predicted),
        "reference_metric": float(metric(reference, targets)),
        "size_bytes": extra.get("size_bytes"),
        "predicted_size_bytes": pred.get("size_bytes"),
        "avg_bits": extra.get("avg_bits"),
        "predicted_avg_bits": pred.get("avg_bits"),
        "runtime_s": round(run_s, 3),
        **({"gguf": extra["gguf"]} if "gguf" in extra else {}),
    }
