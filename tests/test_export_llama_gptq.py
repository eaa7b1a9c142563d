"""llama.cpp and GPTQModel exports (plan only) and the plan figure."""
from __future__ import annotations

import json
import re

import pytest

from mpsearch.core import ggml_types
from mpsearch.errors import MPSearchError
from mpsearch.plan import QuantizationPlan

K_TYPES = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0", 16: "f16"}


def _mixed_plan(space, evaluator, metric=None):
    """A plan whose layers use every bit-width of the space."""
    cand = tuple(d.choices[i % d.n_choices] for i, d in enumerate(space.decisions))
    try:
        plan = QuantizationPlan.from_candidate(evaluator, cand, metric=metric,
                                               provenance={"strategy": "test", "seed": 0, "n_evals": 1})
    finally:
        evaluator.restore()
    assert {e["bits"] for e in plan.layers.values()} == {b for d in space.decisions for b in d.choices}
    return plan


def _copy(plan: QuantizationPlan) -> QuantizationPlan:
    return QuantizationPlan.from_dict(json.loads(plan.to_json()))


@pytest.fixture(scope="module")
def digits_plan(digits_space, digits_evaluator):
    return _mixed_plan(digits_space, digits_evaluator)


@pytest.fixture(scope="module")
def minilm_plan(request):
    space = request.getfixturevalue("minilm_space")
    evaluator = request.getfixturevalue("minilm_evaluator")
    # the exports never read the metric: skip a forward pass of the encoder
    return _mixed_plan(space, evaluator, metric=evaluator.reference_metric)


@pytest.fixture(scope="module")
def minilm_state_names(request):
    return list(request.getfixturevalue("minilm_task").model.state_dict())


# ---- llama.cpp -------------------------------------------------------------------------------------

def _tokens(text: str) -> list[tuple[str, str]]:
    """As llama-quantize's parse_tensor_type_file: whitespace-separated regex=type, the regex lowercased."""
    out = []
    for tok in text.split():
        pat, sep, typ = tok.partition("=")
        assert sep and pat and typ, tok
        out.append((pat.lower(), typ))
    return out


def _first_match(tokens, name):
    """std::regex_search semantics (unanchored), first match wins; also how many patterns match."""
    hits = [typ for pat, typ in tokens if re.search(pat, name)]
    return (hits[0] if hits else None), len(hits)


@pytest.mark.minilm
@pytest.mark.export
def test_llama_cpp_minilm_every_tensor_one_anchored_pattern(minilm_plan, minilm_state_names, tmp_path):
    from mpsearch.exporters import REGISTRY
    from mpsearch.exporters.llama_cpp import name_mapper, to_llama_cpp

    assert REGISTRY["llama-cpp"].needs_model is False and REGISTRY["llama-cpp"].suffix == ".txt"
    out = tmp_path / "types.txt"
    res = to_llama_cpp(minilm_plan, out)
    text = out.read_text()
    assert res.paths == [out] and res.size_bytes == out.stat().st_size > 0
    tokens = _tokens(text)
    for pat, typ in tokens:
        assert pat.startswith("^") and pat.endswith("$"), pat
        assert re.sub(r"\\.", "", pat) == re.sub(r"\\.", "", pat).lower(), pat
        assert not re.search(r"\\[A-Z]", pat), pat  # no \D, \S, \W: lowercasing would change their meaning
        assert not re.search(r"(?<!\\)\.", pat), pat  # every dot escaped
        assert typ in ggml_types.GGML_TYPES

    # every GGUF tensor of the model: state names mapped the way convert_hf_to_gguf does
    to_gguf = name_mapper("BERT", minilm_state_names)
    gguf_names = {n: to_gguf(n) for n in minilm_state_names}
    assert None not in gguf_names.values()
    assert gguf_names["bert.embeddings.word_embeddings.weight"] == "token_embd.weight"
    assert gguf_names["bert.encoder.layer.5.output.dense.weight"] == "blk.5.ffn_down.weight"
    assert gguf_names["bert.encoder.layer.0.attention.self.query.bias"] == "blk.0.attn_q.bias"

    # each width gets the cheapest type holding it that llama-quantize keeps for the tensor's rows (no fallback);
    # position_embd and token_types are never quantized by llama-quantize: no rule
    never = {"position_embd.weight", "token_types.weight"}
    planned = {}
    for layer, e in minilm_plan.layers.items():
        g, ncols = gguf_names[f"{layer}.weight"], e["shape"][-1]
        if g in never:
            continue
        cheapest = min((t for t in ggml_types.GGML_TYPES if t not in ("f32", "f16") and
                        int(t[1]) >= e["bits"] and ncols % ggml_types.BLOCK_SIZE[t] == 0),
                       key=lambda t: (ggml_types.BITS_PER_WEIGHT[t], not t.endswith("_k")), default="f16")
        planned[g] = "f16" if e["bits"] == 16 else cheapest
        assert ggml_types.effective_type(planned[g], ncols) == planned[g]
        if ncols == 384:
            assert not planned[g].endswith("_k"), g  # a K-quant would fall back on 384-wide rows
    assert len(minilm_plan.layers) == 39 and len(planned) == 37
    for g in gguf_names.values():
        typ, n = _first_match(tokens, g)
        if g in planned:
            assert (typ, n) == (planned[g], 1), g
        else:  # biases, layer norms: not in the plan's quantized layers
            assert n == 0, g
    assert len(tokens) == len(planned)
    assert _first_match(tokens, "blk.0.attn_q.bias")[1] == 0
    assert _first_match(tokens, "blk.10.attn_q.weight")[1] == 0  # blk.1 must not match blk.10
    assert res.details["architecture"] == "bert" and res.details["base_type"].startswith("Q")
    assert any("never quantizes position_embd.weight, token_types.weight" in n for n in res.notes)


@pytest.mark.export
def test_llama_cpp_refuses_digits(digits_plan, tmp_path):
    from mpsearch.exporters.llama_cpp import to_llama_cpp

    with pytest.raises(MPSearchError) as exc:
        to_llama_cpp(digits_plan, tmp_path / "d.txt")
    msg = str(exc.value)
    assert "\n" not in msg and "'features.0'" in msg
    assert not (tmp_path / "d.txt").exists()


@pytest.mark.minilm
@pytest.mark.export
def test_llama_cpp_odd_bits_and_unmappable_layer(minilm_plan, tmp_path):
    from mpsearch.exporters.llama_cpp import ggml_type, to_llama_cpp

    assert [ggml_type(b) for b in (1, 7, 9, 15, 16)] == ["q2_k", "q8_0", "f16", "f16", "f16"]
    assert [ggml_type(b, 384) for b in (2, 3, 4, 5, 6)] == ["q4_0", "q4_0", "q4_0", "q5_0", "q8_0"]
    assert [ggml_type(b, 1536) for b in (2, 3, 4, 5, 6)] == ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
    plan = _copy(minilm_plan)
    plan.layers["bert.encoder.layer.2.output.dense"]["bits"] = 7
    plan.layers["bert.encoder.layer.3.output.dense"]["bits"] = 1
    res = to_llama_cpp(plan, tmp_path / "odd.txt")
    toks = _tokens((tmp_path / "odd.txt").read_text())
    assert _first_match(toks, "blk.2.ffn_down.weight") == ("q8_0", 1)
    assert _first_match(toks, "blk.3.ffn_down.weight") == ("q2_k", 1)
    assert any("1 bits -> q2_k" in n and "7 bits -> q8_0" in n for n in res.notes)

    plan = _copy(minilm_plan)
    plan.layers = {"bert.mystery.proj": {"bits": 4, "shape": [4, 4], "n_params": 16}, **plan.layers}
    with pytest.raises(MPSearchError, match=r"'bert\.mystery\.proj'"):
        to_llama_cpp(plan, tmp_path / "bad.txt")


# ---- GPTQModel -------------------------------------------------------------------------------------

def _gptq_lookup(dynamic: dict, module: str):
    """GPTQModel's dynamic_get: keys in order, re.match, first match wins; '-:' -> skip (None)."""
    for key, overrides in dynamic.items():
        if key.startswith("-:"):
            if re.match(key[2:], module):
                return None
        elif re.match(key.removeprefix("+:"), module):
            return overrides
    return {}


def _n_keys(dynamic: dict, module: str) -> int:
    return sum(bool(re.match(k[2:] if k[:2] in ("+:", "-:") else k, module)) for k in dynamic)


def _container(bits: int):
    return None if bits > 8 else min(b for b in (2, 3, 4, 8) if b >= bits)


def _check_gptq(plan, cfg):
    assert cfg["bits"] in (2, 3, 4, 8) and cfg["desc_act"] is False
    assert cfg["sym"] is (plan.quantizer["scheme"] == "symmetric")
    for key in cfg["dynamic"]:
        assert key[:2] in ("+:", "-:") and key.endswith("$") and key[2] == "^", key
        assert not re.search(r"(?<!\\)\.", key), key
    for module, e in plan.layers.items():
        want = _container(int(e["bits"]))
        got = _gptq_lookup(cfg["dynamic"], module)
        assert _n_keys(cfg["dynamic"], module) <= 1, module
        if want is None:
            assert got is None, module
        else:
            assert got is not None, module
            assert got.get("bits", cfg["bits"]) == want, module
            assert got.get("group_size", cfg["group_size"]) == e.get("group_size", cfg["group_size"]), module
            assert (got == {}) == (want == cfg["bits"]), module  # only layers that differ carry a key


def test_gptqmodel_digits(digits_plan, tmp_path):
    from mpsearch.exporters import REGISTRY
    from mpsearch.exporters.gptqmodel import to_gptqmodel

    assert REGISTRY["gptqmodel"].needs_model is False and REGISTRY["gptqmodel"].suffix == ".json"
    out = tmp_path / "quantize_config.json"
    res = to_gptqmodel(digits_plan, out)
    cfg = json.loads(out.read_text())
    assert res.size_bytes == out.stat().st_size
    assert cfg["group_size"] == -1 and cfg["sym"] is True
    _check_gptq(digits_plan, cfg)
    assert json.loads(json.dumps(cfg)) == cfg
    assert any("5 bits written as 8" in n for n in res.notes)


def test_gptqmodel_unquantized_and_per_group(digits_plan, tmp_path):
    from mpsearch.exporters.gptqmodel import to_gptqmodel

    plan = _copy(digits_plan)
    plan.layers["classifier.5"]["bits"] = 16
    plan.layers["features.0"]["bits"] = 1
    plan.unquantized = plan.unquantized + ["head.proj.weight", "head.norm.weight"]
    plan.quantizer = {**plan.quantizer, "granularity": "per-group", "group_size": 32}
    plan.layers["features.2"]["group_size"] = 64
    plan.float_layers = ["head.proj"]  # the quantizable module the plan leaves in float (head.norm is not one)
    out = tmp_path / "q.json"
    to_gptqmodel(plan, out)
    cfg = json.loads(out.read_text())
    plan.float_layers = None  # a plan written before float_layers: the name heuristic gives the same keys
    to_gptqmodel(plan, tmp_path / "old.json")
    assert json.loads((tmp_path / "old.json").read_text())["dynamic"] == cfg["dynamic"]
    assert cfg["group_size"] == 32
    _check_gptq(plan, cfg)
    assert _gptq_lookup(cfg["dynamic"], "classifier.5") is None
    assert _gptq_lookup(cfg["dynamic"], "head.proj") is None  # excluded Linear-like module: '-:'
    assert _gptq_lookup(cfg["dynamic"], "head.norm") == {}  # a norm: no key
    assert _gptq_lookup(cfg["dynamic"], "features.0")["bits"] == 2
    assert _gptq_lookup(cfg["dynamic"], "features.2")["group_size"] == 64
    assert _gptq_lookup(cfg["dynamic"], "features.00") == {}  # anchored at the end too


@pytest.mark.minilm
def test_gptqmodel_minilm(minilm_plan, tmp_path):
    from mpsearch.exporters.gptqmodel import to_gptqmodel

    out = tmp_path / "quantize_config.json"
    res = to_gptqmodel(minilm_plan, out)
    cfg = json.loads(out.read_text())
    _check_gptq(minilm_plan, cfg)
    # the keys also match the Hugging Face names without the SentenceEncoder's 'bert.' prefix
    for module, e in minilm_plan.layers.items():
        got = _gptq_lookup(cfg["dynamic"], module.removeprefix("bert."))
        assert got.get("bits", cfg["bits"]) == _container(e["bits"]), module
    norms = {t.rsplit(".", 1)[0] for t in minilm_plan.unquantized} - set(minilm_plan.layers)
    assert norms and all("LayerNorm" in m for m in norms)
    for module in norms:  # LayerNorms: no GPTQ tool quantizes them, so no key
        assert _n_keys(cfg["dynamic"], module) == 0, module
    assert res.size_bytes == out.stat().st_size


# ---- figure ----------------------------------------------------------------------------------------

def test_plot_plan_digits(digits_plan, tmp_path):
    from mpsearch.report_plan import plot_plan

    p = plot_plan(digits_plan, tmp_path / "plan.png")
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.minilm
def test_plot_plan_minilm_39_layers(minilm_plan, tmp_path):
    from mpsearch.report_plan import plot_plan, short_names

    labels = short_names(list(minilm_plan.layers))
    assert len(set(labels)) == len(labels) == 39 and max(map(len, labels)) <= 16
    p = plot_plan(minilm_plan, tmp_path / "plan.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
