"""Decoder language models from a local Hugging Face directory: ``--model hf:PATH``.

Loaded offline (``local_files_only``) with transformers' ``AutoModelForCausalLM`` (``AutoModel``
when the directory holds no LM head), the tokenizer from the same directory. Calibration text comes
from ``text`` (a file), else the sentences shipped with mpsearch; it is tokenized as one stream and
cut into sequences of ``seq_len`` tokens, every third one calibrating and the others validating.

Metrics (higher is better): ``token_kl`` (default: minus the mean KL of each next-token distribution
to the full-precision model's) and ``perplexity`` (minus the perplexity of the text).
The key-value cache is off: a forward scores whole sequences and keeps no state between candidates.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TaskError
from .hf import offline_transformers
from .task import Task

SHIPPED_TEXT = Path(__file__).parent / "data" / "sentences.txt"
SEARCH_SPACE = "causal_lm.yaml"


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def load_hf_model(path: str | Path, dtype: str | None = None):
    """(model, tokenizer) from a local directory, offline; a one-line error for anything else."""
    transformers = offline_transformers("hf: models need transformers: pip install 'mpsearch[minilm]'")
    AutoModel, AutoModelForCausalLM, AutoTokenizer = (transformers.AutoModel, transformers.AutoModelForCausalLM,
                                                      transformers.AutoTokenizer)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise TaskError(f"hf:{path}: not a Hugging Face model directory (no config.json); mpsearch loads local "
                        "directories only and downloads nothing")
    torch_dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtype:
        raise TaskError(f"dtype {dtype!r}: choose float32, bfloat16 or float16")
    kwargs = {"local_files_only": True}
    if torch_dtype[dtype] is not None:
        kwargs["dtype"] = torch_dtype[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise TaskError(f"hf:{path}: cannot load its tokenizer: {type(exc).__name__}: {str(exc)[:300]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ValueError:  # no causal-LM head for this architecture: the bare model's hidden states
        try:
            model = AutoModel.from_pretrained(str(path), **kwargs)
        except Exception as exc:
            raise TaskError(f"hf:{path}: cannot load the model: {type(exc).__name__}: {str(exc)[:300]}") from None
    except Exception as exc:
        raise TaskError(f"hf:{path}: cannot load the model: {type(exc).__name__}: {str(exc)[:300]}") from None
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model.eval(), tokenizer


def token_batches(tokenizer, text: str, seq_len: int, batch_size: int) -> tuple[list, list]:
    """(calibration, validation) batches of ``seq_len``-token sequences; inputs are the token ids and so
    are the targets (perplexity predicts each next one)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    if n < 2:
        raise TaskError(f"the calibration text has {ids.numel()} tokens: at least {2 * seq_len} are needed for "
                        f"two sequences of {seq_len} (one calibrating, one validating)")
    seqs = ids[: n * seq_len].reshape(n, seq_len)
    cal = seqs[0::3]
    val = torch.cat([seqs[i:i + 1] for i in range(n) if i % 3]) if n > 1 else seqs[:0]

    def batches(x):
        return [({"input_ids": x[i:i + batch_size]}, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]

    return batches(cal), batches(val)


def load_hf_task(path: str | Path, text: str | Path | None = None, *, seq_len: int = 64, max_sequences: int = 48,
                 batch_size: int = 8, metric: str = "token_kl", dtype: str | None = None) -> Task:
    """A causal LM task from a local directory; ``max_sequences`` caps how much text is used (a third calibrates)."""
    model, tokenizer = load_hf_model(path, dtype)
    if text is None:
        source = SHIPPED_TEXT
    else:
        source = Path(text)
        if not source.is_file():
            raise TaskError(f"text file {source} does not exist")
    try:
        body = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read text file {source}: {exc}") from None
    ids_needed = seq_len * max_sequences
    # the text is cut to what max_sequences need (characters overestimate tokens, so this keeps enough)
    cal, val = token_batches(tokenizer, body[: ids_needed * 8], seq_len, batch_size)
    cal_n = sum(len(b[1]) for b in cal)
    keep = max(1, max_sequences // 3)
    while cal_n > keep and len(cal) > 1:
        cal_n -= len(cal.pop()[1])
    val_keep = max(1, max_sequences - keep)
    val_n = sum(len(b[1]) for b in val)
    while val_n > val_keep and len(val) > 1:
        val_n -= len(val.pop()[1])
    name = f"hf:{Path(path).name}"
    return Task(model=model, calibration=cal, validation=val, metric=metric, name=name, output_fn=_logits,
                search_space=SEARCH_SPACE, meta={"path": str(path), "text": str(source), "seq_len": seq_len})
