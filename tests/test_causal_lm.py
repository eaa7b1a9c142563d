"""Causal language models: a small Llama-architecture model built from a config (random weights), saved with
save_pretrained, searched end to end through ``hf:DIR`` and exported to every format that applies.
transformers and tokenizers come with the ``minilm`` extra, which ``make test`` installs: nothing here skips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpsearch.cli import main as cli
from mpsearch.evaluator import Evaluator
from mpsearch.model import space_for
from mpsearch.tasks import load_task
from mpsearch.tasks.causal_lm import SHIPPED_TEXT

LAYERS = 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 3-block Llama (GQA, tied embeddings) and a word-level tokenizer trained on the shipped sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(SHIPPED_TEXT)], trainers.WordLevelTrainer(vocab_size=512, special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=1, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_space_rules_for_llms(llama_dir):
    task = load_task(f"hf:{llama_dir}")
    space = space_for(task)
    names = {d.name: d for d in space.decisions}
    # tied input and output embeddings: one weight, one decision
    embed = space.layers["model.embed_tokens"]
    assert "lm_head" in embed.aliases and "lm_head" not in space.layers
    # q/k/v share one decision per block; o, gate, up, down are their own
    for i in range(LAYERS):
        qkv = next(d for d in space.decisions if f"model.layers.{i}.self_attn.q_proj" in d.layers)
        assert sorted(qkv.layers) == [f"model.layers.{i}.self_attn.{x}_proj" for x in "kqv"]
    assert len(names) == 1 + LAYERS * 5
    assert task.metric == "token_kl"


def test_reuse_and_scores_on_a_llama_equal_full_forwards(llama_dir):
    task = load_task(f"hf:{llama_dir}")
    space = space_for(task)
    rng = np.random.default_rng(0)
    cands = []
    for _ in range(3):
        base = list(space.random(rng))
        cands.append(tuple(base))
        for d in rng.choice(len(base), size=4, replace=False):
            c = list(base)
            c[d] = space.decisions[d].choices[0]
            cands.append(tuple(c))
    with Evaluator(task, space, cache_dir=None, blocks="") as plain:
        want = [plain.evaluate(c).metric for c in cands]
    with Evaluator(task, space, cache_dir=None) as ev:
        assert ev.prefix is not None and "model.layers.0" in ev.prefix.points
        got = [ev.evaluate(c).metric for c in cands]
        assert ev.points_reused > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert all(v <= 0 for v in got)  # -KL: at most 0, the full-precision model's own value


def test_perplexity_metric_and_bfloat16(llama_dir):
    from mpsearch.tasks.causal_lm import load_hf_task

    task = load_hf_task(llama_dir, metric="perplexity", dtype="bfloat16").check()
    assert next(task.model.parameters()).dtype == torch.bfloat16
    space = space_for(task)
    with Evaluator(task, space, cache_dir=None) as ev:
        assert ev.metric_name == "neg_perplexity"
        vocab = task.model.config.vocab_size
        assert -3 * vocab < ev.reference_metric < -1  # a random model: perplexity near the vocabulary's size
        w = ev.quantized_weight("model.layers.0.mlp.up_proj", space.decisions[0].choices[0])
        assert w.dtype == torch.bfloat16
        low = ev.evaluate(space.uniform(2)).metric
        high = ev.evaluate(space.uniform(8)).metric
        assert np.isfinite(low) and np.isfinite(high)
        assert abs(high - ev.reference_metric) < abs(low - ev.reference_metric)


def test_hf_model_end_to_end_cli(llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(SHIPPED_TEXT.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    out = tmp_path / "run"
    code = cli(["search", "--model", f"hf:{llama_dir}", "--text", str(text), "--strategy", "greedy", "--max-evals", "40",
                "--avg-bits", "4.5", "--out", str(out), "--no-progress", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "1 thread(s) (asked)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_name"] == "neg_token_kl"
    assert summary["best"]["avg_bits"] <= 4.5
    assert summary["memory"]["peak_rss_mb"] > 0
    plan = out / "plan.json"
    for fmt, name in (("gptqmodel", "q.json"), ("llama-cpp", "types.txt"), ("torchao", "ao.json"),
                      ("onnxruntime", "m.onnx"), ("csv", "p.csv")):
        code = cli(["export", str(plan), "--format", fmt, "--out", str(tmp_path / name), "--model", f"hf:{llama_dir}",
                    "--text", str(text)])
        assert code == 0, (fmt, capsys.readouterr())
        assert (tmp_path / name).stat().st_size > 0
    code = cli(["verify", str(plan), "--model", f"hf:{llama_dir}", "--text", str(text), "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert r["metric"] == pytest.approx(r["predicted_metric"], abs=1e-6)
    for runtime in ("torchao", "onnxruntime"):  # the model's output is a ModelOutput: the task picks the logits
        code = cli(["verify", str(plan), "--model", f"hf:{llama_dir}", "--text", str(text), "--runtime", runtime, "--json"])
        captured = capsys.readouterr()
        assert code == 0, (runtime, captured.err)
        r = json.loads(captured.out.strip().splitlines()[-1])
        assert r["runtime"] == runtime and abs(r["difference"]) < 1e-3, r
    code = cli(["export", str(plan), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--model", f"hf:{llama_dir}",
                "--text", str(text)])
    err = capsys.readouterr().err  # an integer plan: llama.cpp gets a --tensor-type-file, never a GGUF of other integers
    assert code == 2 and "integer grids, which gguf cannot carry" in err and err.count("\n") == 1


def test_hf_errors_are_one_line(tmp_path, capsys):
    assert cli(["search", "--model", f"hf:{tmp_path}", "--out", str(tmp_path / "r")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli(["search", "--model", "digits", "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "hf: models only" in capsys.readouterr().err


def test_threads_default_and_device_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["search", "--model", "digits", "--strategy", "random", "--max-evals", "3", "--no-progress"]
    assert cli(args + ["--out", str(tmp_path / "a")]) == 0
    assert "1 thread(s) (OMP_NUM_THREADS)" in capsys.readouterr().out
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cli(args + ["--out", str(tmp_path / "b")]) == 0
    assert "free cores of" in capsys.readouterr().out
    assert cli(args + ["--out", str(tmp_path / "c"), "--threads", "0"]) == 2
    assert cli(args + ["--out", str(tmp_path / "d"), "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(args + ["--out", str(tmp_path / "e"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    torch.set_num_threads(1)


@pytest.mark.parametrize("strategy", ["greedy", "bayes"])
def test_searches_with_reuse_ask_and_score_what_full_forwards_do(llama_dir, strategy):
    """Reuse changes what an evaluation costs, never its score: the same seed asks the same candidates and gets
    the same scores with prefix and lead points on and off (within a batch, in the order that shares most)."""
    from mpsearch.core import Budget
    from mpsearch.search import Termination, search

    task = load_task(f"hf:{llama_dir}")
    space = space_for(task)
    runs = []
    for blocks in ("", None):
        with Evaluator(task, space, cache_dir=None, blocks=blocks) as ev:
            res = search(ev, strategy, Termination(max_evals=40), seed=3, budget=Budget(max_avg_bits=4.0))
            runs.append((sorted((tuple(t.candidate), t.metric) for t in res.trials), ev.memory()))
    (plain, _), (reused, memory) = runs
    assert len(plain) == 40 and [c for c, _ in reused] == [c for c, _ in plain]
    np.testing.assert_allclose([m for _, m in reused], [m for _, m in plain], rtol=0, atol=1e-6)
    assert memory["points_reused"] > 0
    if strategy == "greedy":  # its sensitivity batch: one-decision moves from the top, the lead
        assert memory["lead_points"] > 0 and memory["leads_reused"] > 0
