"""The calibration inputs of each layer, as the second moment H = mean of x x^T that gptq and gradient use.

Captured once, with forward hooks on the full-precision model over the calibration batches. A
convolution's inputs are its unfolded patches, one H per convolution group (a depthwise conv has
one per channel); a weight shared by several modules sums what every one of them sees.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.weights import is_hf_conv1d

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _patches(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(groups, n, inner) input rows of a Linear (one group) or a convolution (unfolded patches)."""
    if isinstance(mod, nn.Linear) or is_hf_conv1d(mod):
        return x.reshape(1, -1, x.shape[-1])
    nd = x.dim() - 2
    k, d, st = mod.kernel_size, mod.dilation, mod.stride
    if isinstance(mod.padding, str):
        total = [0] * nd if mod.padding == "valid" else [dd * (kk - 1) for dd, kk in zip(d, k)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in mod.padding]
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        x = F.pad(x, flat, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
    for dim in range(nd):  # sliding windows along each spatial dimension
        x = x.unfold(2 + dim, d[dim] * (k[dim] - 1) + 1, st[dim])
        if d[dim] > 1:
            x = x[..., :: d[dim]]
    # x: (N, C, L1..Lnd, k1..knd) -> rows (N * L, C * k1..knd), channel-major like the weight's layout
    n, c = x.shape[:2]
    spatial = x.shape[2:2 + nd]
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)).reshape(n * math.prod(spatial), c, -1)
    g = mod.groups
    return x.reshape(x.shape[0], g, (c // g) * x.shape[-1]).transpose(0, 1)


def input_moments(model: nn.Module, batches: Iterable, layers: dict[str, tuple[str, ...]],
                  call: Callable) -> dict[str, torch.Tensor]:
    """``{layer: H}`` with H of shape (groups, inner, inner), float64, for every layer in ``layers`` (name ->
    its module names, aliases included) that takes inputs (Linear, Conv); ``call(model, inputs)`` runs a batch."""
    modules = dict(model.named_modules(remove_duplicate=False))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for layer, names in layers.items():
        for name in names:
            mod = modules.get(name)
            if not isinstance(mod, (nn.Linear, *CONVS)) and not is_hf_conv1d(mod):
                continue

            def hook(m, inp, out, layer=layer):
                rows = _patches(m, inp[0].detach().float())
                h = torch.einsum("gni,gnj->gij", rows, rows).double()
                sums[layer] = sums[layer] + h if layer in sums else h
                counts[layer] = counts.get(layer, 0) + rows.shape[1]

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for x, _ in batches:
                call(model, x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v / max(counts[k], 1) for k, v in sums.items()}
