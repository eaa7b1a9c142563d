"""Quality metrics, all oriented so that higher is better.

Fidelity metrics compare with the full-precision model's outputs; ``normalize`` maps
a value to [0, 1] with 1 = full precision, so hypervolumes compare across runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .core.pareto import normalize
from .errors import TaskError


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], float]
    uses_targets: bool  # True: compares with task targets; False: with reference outputs

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float(self.fn(outputs, targets))

    def normalize(self, value: float, reference: float) -> float:
        return normalize(self.name, value, reference)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(dim=-1) == targets).float().mean().item()


def neg_kl(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """-KL(reference || outputs) over the last dimension, averaged over samples."""
    logp = F.log_softmax(outputs.float(), dim=-1)
    logq = F.log_softmax(reference.float(), dim=-1)
    return -F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1).mean().item()


def neg_perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """-perplexity of the token sequences: logits (N, T, V) at position t predict token t + 1."""
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1).long())
    return -math.exp(nll.item())


def cosine(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return F.cosine_similarity(_rows(outputs), _rows(reference), dim=1).mean().item()


def neg_mse(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return -F.mse_loss(outputs.float(), reference.float()).item()


def sqnr(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    noise = (outputs.float() - reference.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)


BUILTIN = {
    "accuracy": Metric("accuracy", accuracy, True),
    "neg_kl": Metric("neg_kl", neg_kl, False),
    # language models: -KL of every next-token distribution to the full-precision one's, averaged over tokens
    "neg_token_kl": Metric("neg_token_kl", neg_kl, False),
    "neg_perplexity": Metric("neg_perplexity", neg_perplexity, True),
    "cosine": Metric("cosine", cosine, False),
    "neg_mse": Metric("neg_mse", neg_mse, False),
    "sqnr": Metric("sqnr", sqnr, False),
}
# the values are -KL, -MSE and -perplexity: higher is better
ALIASES = {"kl": "neg_kl", "mse": "neg_mse", "token_kl": "neg_token_kl", "perplexity": "neg_perplexity"}


def get_metric(metric: str | Callable | Metric, has_targets: bool) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric, has_targets)
    metric = ALIASES.get(metric, metric) if isinstance(metric, str) else metric
    if metric not in BUILTIN:
        raise TaskError(f"unknown metric {metric!r}; choose one of {', '.join(BUILTIN)} or pass a callable")
    m = BUILTIN[metric]
    if m.uses_targets and not has_targets:
        raise TaskError(f"metric {metric!r} needs targets, but the task's batches have none")
    return m
