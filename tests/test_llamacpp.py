"""What mpsearch scores is what llama.cpp runs: GGML types in the search, the GGUF written from the plan,
llama-quantize's reading of the tensor-type file, and the plan measured inside llama.cpp.

llama.cpp here is the one llama-cpp-python 0.3.36 vendors (its converter and llama-quantize, installed by
``make llamacpp``) and the prebuilt xllamacpp wheel (the ``llamacpp`` extra) for embeddings.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpsearch.cli import main
from mpsearch.core.qconfig import GGML_BITS
from mpsearch.core.sizes import SizeTable
from mpsearch.errors import MPSearchError, SpaceError
from mpsearch.evaluator import Evaluator
from mpsearch.exporters import export
from mpsearch.exporters import llama_runtime as lr
from mpsearch.model import build_space
from mpsearch.plan import QuantizationPlan
from mpsearch.quantize import ggml

pytestmark = [pytest.mark.minilm, pytest.mark.export]

K_WIDE = "bert.encoder.layer.{}.output.dense"  # FFN down: 1536-wide rows, the only ones K-quants fit
KQUANTS = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}


@pytest.fixture(scope="module")
def ggml_evaluator(minilm_task, minilm_ggml_space):
    ev = Evaluator(minilm_task, minilm_ggml_space, cache_dir=None)
    yield ev
    ev.close()


@pytest.fixture(scope="module")
def mixed_plan(ggml_evaluator, minilm_ggml_space):
    """A plan that uses every type the space offers: each decision cycles through its own choices."""
    space = minilm_ggml_space
    cand = tuple(d.choices[(5 * i + 1) % d.n_choices] for i, d in enumerate(space.decisions))
    ev = ggml_evaluator
    plan = QuantizationPlan.from_candidate(ev, cand, validation_metric=ev.evaluate(cand, "validation").metric)
    labels = {plan.setting(n).label() for n in plan.layers}
    assert len(KQUANTS & labels) >= 3 and {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "float16"} <= labels
    return plan


@pytest.fixture(scope="module")
def mixed_gguf(mixed_plan, minilm_task, minilm_f32_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "minilm-mixed.gguf"
    res = export(mixed_plan, "gguf", out, minilm_task, options={"base_gguf": minilm_f32_gguf})
    return out, res


# ---- the space ---------------------------------------------------------------------------------

def test_ggml_space_offers_only_types_llama_cpp_keeps(minilm_ggml_space):
    space = minilm_ggml_space
    assert space.quantizer.format == "ggml" and len(space.decisions) == 37
    assert "bert.embeddings.position_embeddings" in space.excluded  # llama.cpp never quantizes it
    for d in space.decisions:
        (layer,) = d.layers
        cols = space.layers[layer].rows_shape[-1]
        kquants = [c for c in d.choices if c.endswith("_k")]
        assert bool(kquants) == (cols % 256 == 0), layer
        assert {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "float16"} <= set(d.choices)
    assert set(space.decisions[-1].choices) >= {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}  # layer 5's FFN down


@pytest.mark.filterwarnings("ignore::mpsearch.errors.MPSearchWarning")  # the embeddings left out on purpose
def test_ggml_space_files_say_what_is_wrong(minilm_task):
    model = minilm_task.model
    with pytest.raises(SpaceError, match="'q4_k' is not a bit-width.*format: ggml"):
        build_space(model, choices=["q4_k"])
    with pytest.raises(SpaceError, match="'q7_0' is not a GGML type"):
        build_space(model, choices=["q7_0"], quantizer={"format": "ggml"})
    with pytest.raises(SpaceError, match="drop methods and sparsity"):
        build_space(model, choices=["q4_0"], methods=["gptq"], quantizer={"format": "ggml"})
    with pytest.raises(SpaceError, match="would store q5_0"):
        build_space(model, choices=["q4_0", "f16"], pin={r"bert\.encoder\.layer\.0\.attention\.self\.query": "q4_k"},
                    quantizer={"format": "ggml"}, types=["Linear"])
    with pytest.raises(SpaceError, match="fit none of the GGML types"):
        build_space(model, choices=["q6_k"], quantizer={"format": "ggml"}, types=["Linear"])
    with pytest.raises(SpaceError, match="'q4_0' is a GGML type, which needs quantizer"):
        build_space(model, choices=[4, 8], pin={r"bert\.encoder\.layer\.0\.attention\.self\.query": "q4_0"})
    with pytest.raises(SpaceError, match="quantizer.scheme does not apply to format ggml"):
        build_space(model, choices=["q4_0"], quantizer={"format": "ggml", "scheme": "asymmetric"})


def test_ggml_sizes_are_gguf_bytes_and_bpw(minilm_ggml_space):
    space, sizes = minilm_ggml_space, SizeTable(minilm_ggml_space)
    layer = space.layers[K_WIDE.format(5)]
    assert layer.rows_shape == (384, 1536)
    for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q8_0"):
        x = space.setting(t)
        assert sizes.byte_table[-1][space.decisions[-1].choices.index(t)] == ggml.tensor_bytes(t, 384, 1536)
        assert x.label() == t and x.bits == int(t[1])
    # average bits are over every tensor of the model (biases, norms, the float32 embeddings included)
    q4 = space.uniform("q4_0")
    total = sum(n for n, _ in space.tensors.values())
    assert sizes.avg_bits(q4) == pytest.approx(8 * sizes.size_bytes(q4) / total, rel=1e-12)


def test_ggml_evaluator_computes_with_ggml_floats(ggml_evaluator, minilm_task):
    ev = ggml_evaluator
    for name, t in ((K_WIDE.format(2), "q3_k"), ("bert.encoder.layer.1.attention.self.value", "q5_1")):
        w = ev.quantized_weight(name, t)
        orig = ev._original[name]
        assert torch.equal(w, torch.from_numpy(ggml.quantize_dequantize(orig.numpy(), t)))


# ---- the GGUF and llama-quantize ------------------------------------------------------------------

def test_gguf_export_writes_the_predicted_bytes(mixed_plan, mixed_gguf, minilm_f32_gguf):
    path, res = mixed_gguf
    n_bytes, n_el, bpw = lr.gguf_size(path)
    assert n_bytes == mixed_plan.predicted["size_bytes"] == res.details["tensor_bytes"]
    assert bpw == pytest.approx(mixed_plan.predicted["avg_bits"], abs=1e-6)
    tensors, base = lr.gguf_tensors(path), lr.gguf_tensors(minilm_f32_gguf)
    assert set(tensors) == set(base)
    assert tensors["blk.0.attn_q.weight"]["type"] == mixed_plan.setting("bert.encoder.layer.0.attention.self.query").label()
    assert tensors["position_embd.weight"]["type"] == "f32" and tensors["blk.0.attn_q.bias"]["type"] == "f32"


def test_tensor_type_file_through_llama_quantize_gives_the_same_file(mixed_plan, mixed_gguf, minilm_f32_gguf, tmp_path):
    """llama-quantize, told the plan's types by the exported file, writes the gguf exporter's tensors byte for
    byte: same types, same sizes, same blocks (ggml's quantizers and mpsearch's agree for every type used)."""
    import gguf

    txt = tmp_path / "types.txt"
    res = export(mixed_plan, "llama-cpp", txt)
    base = res.details["base_type"]
    assert base.startswith("Q") and "#" not in txt.read_text()
    out = tmp_path / "lq.gguf"
    lr.llama_quantize(minilm_f32_gguf, out, base, tensor_type_file=txt)
    ours, theirs = gguf.GGUFReader(mixed_gguf[0]), gguf.GGUFReader(out)
    a = {t.name: t for t in ours.tensors}
    b = {t.name: t for t in theirs.tensors}
    assert set(a) == set(b)
    types = set()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name
        types.add(a[name].tensor_type.name.lower())
    assert len(types & KQUANTS) >= 3 and {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "f32"} <= types


@pytest.mark.filterwarnings("ignore::mpsearch.errors.MPSearchWarning")  # the embeddings left out on purpose
def test_tensor_type_file_keeps_unsearched_weights_float(minilm_task, minilm_f32_gguf, tmp_path):
    """A weight the space does not search stays float32 in llama-quantize's file too (its own rule), so both
    routes still give the same tensors."""
    space = build_space(minilm_task.model, choices=["q4_0", "q8_0"], quantizer={"format": "ggml"}, types=["Linear"],
                        model_name="minilm")
    with Evaluator(minilm_task, space, cache_dir=None) as ev:
        plan = QuantizationPlan.from_candidate(ev, space.uniform("q4_0"), metric=0.0)
    txt = tmp_path / "types.txt"
    res = export(plan, "llama-cpp", txt)
    assert res.details["tensors"]["token_embd.weight"]["type"] == "f32"
    assert "position_embd" not in txt.read_text()
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export(plan, "gguf", ours, minilm_task, options={"base_gguf": minilm_f32_gguf})
    lr.llama_quantize(minilm_f32_gguf, theirs, res.details["base_type"], tensor_type_file=txt)
    a, b = lr.gguf_tensors(ours), lr.gguf_tensors(theirs)
    assert a == b and a["token_embd.weight"]["type"] == "f32" and lr.gguf_size(ours)[0] == plan.predicted["size_bytes"]


def test_llama_quantize_file_semantics(minilm_f32_gguf, tmp_path):
    """Why the file looks as it does: a # line stops llama-quantize, an F16 base ignores every rule, the first
    match wins, and llama.cpp substitutes a type whose block does not divide the rows."""
    bad = tmp_path / "comment.txt"
    bad.write_text("# a comment\n^token_embd\\.weight$=q8_0\n")
    with pytest.raises(MPSearchError):
        lr.llama_quantize(minilm_f32_gguf, tmp_path / "x.gguf", "Q8_0", tensor_type_file=bad)
    rules = tmp_path / "rules.txt"
    rules.write_text("attn_q=q5_0\n^blk\\.0\\.attn_q\\.weight$=q8_0\n^blk\\.1\\.attn_k\\.weight$=q4_k\n")
    out = tmp_path / "first.gguf"
    lr.llama_quantize(minilm_f32_gguf, out, "Q4_0", tensor_type_file=rules)
    t = lr.gguf_tensors(out)
    assert t["blk.0.attn_q.weight"]["type"] == "q5_0"  # the unanchored rule came first and won
    assert t["blk.1.attn_k.weight"]["type"] == "q5_0"  # q4_k on 384-wide rows falls back
    assert t["position_embd.weight"]["type"] == "f32"
    f16 = tmp_path / "f16.gguf"
    lr.llama_quantize(minilm_f32_gguf, f16, "F16", tensor_type_file=rules)
    assert lr.gguf_tensors(f16)["blk.0.attn_q.weight"]["type"] == "f16"  # rules ignored


def test_size_model_predicts_llama_quantize_presets(minilm_f32_gguf, minilm_ggml_space, tmp_path):
    """The size table, read at the types llama-quantize chose for its own Q4_K_M preset, is that file's size."""
    from mpsearch.exporters.llama_cpp import name_mapper

    space = minilm_ggml_space
    out = tmp_path / "q4_k_m.gguf"
    lr.llama_quantize(minilm_f32_gguf, out, "Q4_K_M")
    tensors = lr.gguf_tensors(out)
    to_gguf = name_mapper("BERT", list(space.tensors))
    chosen = {n: {"f16": "float16"}.get(t, t) for n in space.layers
              for t in [tensors[to_gguf(space.layers[n].weight_name)]["type"]]}
    assert {"q4_k", "q5_0", "q6_k", "q8_0"} <= set(chosen.values())
    cand = space.candidate_from_layer_choices(chosen)
    n_bytes, _, bpw = lr.gguf_size(out)
    sizes = SizeTable(space)
    assert sizes.size_bytes(cand) == n_bytes
    assert sizes.avg_bits(cand) == pytest.approx(bpw, abs=1e-9)


# ---- llama.cpp runs the plan ----------------------------------------------------------------------

def test_verify_in_llama_cpp_agrees_with_the_plan(mixed_plan, mixed_gguf, minilm_task, tmp_path):
    from mpsearch.exporters.runtimes import verify_runtime

    r = verify_runtime(mixed_plan, minilm_task, "llama-cpp", gguf=mixed_gguf[0])
    assert r["size_bytes"] == r["predicted_size_bytes"] == mixed_plan.predicted["size_bytes"]
    assert abs(r["metric"] - r["predicted_metric"]) < 1e-3
    assert r["predicted_metric"] < 0.999  # the plan loses fidelity: agreement is not trivial
    with pytest.raises(MPSearchError, match="not this plan's GGUF"):
        other = QuantizationPlan.from_dict(json.loads(mixed_plan.to_json()))
        name = "bert.encoder.layer.0.attention.self.query"
        other.layers[name]["method"] = "q8_0" if other.layers[name]["method"] != "q8_0" else "q4_0"
        other.layers[name]["bits"] = GGML_BITS[other.layers[name]["method"]]
        verify_runtime(other, minilm_task, "llama-cpp", gguf=mixed_gguf[0])


def test_cli_search_export_verify_in_llama_cpp(minilm_f32_gguf, tmp_path, capsys, monkeypatch):
    """The user's path: a budget search over GGML types, the GGUF, the check inside llama.cpp."""
    monkeypatch.setenv("MPSEARCH_CACHE_DIR", "")
    out = tmp_path / "run"
    assert main(["search", "--model", "minilm", "--search-space", "minilm_ggml", "--strategy", "greedy",
                 "--max-evals", "12", "--avg-bits", "5", "--out", str(out), "--no-progress"]) == 0
    plan = QuantizationPlan.load(out / "plan.json")
    assert plan.quantizer == {"format": "ggml"} and plan.predicted["avg_bits"] <= 5.0
    gguf_path = tmp_path / "m.gguf"
    assert main(["export", str(out / "plan.json"), "--format", "gguf", "--gguf", str(minilm_f32_gguf),
                 "--out", str(gguf_path)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out / "plan.json"), "--runtime", "llama-cpp", "--gguf", str(gguf_path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["size_bytes"] == plan.predicted["size_bytes"] and abs(got["difference"]) < 1e-3
    assert got["avg_bits"] == pytest.approx(plan.predicted["avg_bits"], abs=1e-6)
    # bad input: one line, exit 2
    assert main(["verify", str(out / "plan.json"), "--runtime", "llama-cpp"]) == 2
    err = capsys.readouterr().err
    assert "needs --gguf" in err and err.count("\n") == 1
    assert main(["export", str(out / "plan.json"), "--format", "onnxruntime", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "GGML types" in err and err.count("\n") == 1 and not (tmp_path / "m.onnx").exists()


def test_integer_plans_verify_in_onnxruntime_and_torchao(minilm_task, minilm_evaluator, minilm_space):
    """The same one command for the other runtimes: both reproduce an rtn plan on the full grid exactly."""
    from mpsearch.exporters.runtimes import verify_runtime

    cand = tuple(d.choices[i % d.n_choices] for i, d in enumerate(minilm_space.decisions))
    ev = minilm_evaluator
    try:
        plan = QuantizationPlan.from_candidate(ev, cand, validation_metric=ev.evaluate(cand, "validation").metric)
    finally:
        ev.restore()
    for runtime in ("onnxruntime", "torchao"):
        r = verify_runtime(plan, minilm_task, runtime)
        assert abs(r["difference"]) < 1e-4, (runtime, r)
        assert r["predicted_metric"] < 0.999
    with pytest.raises(MPSearchError, match="needs --gguf"):
        verify_runtime(plan, minilm_task, "llama-cpp")
