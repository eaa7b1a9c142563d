"""Quantizer methods: how a layer's integers are computed, given its bits, its grid and its sparsity.

* ``rtn``: round to nearest (``grids.rtn``).
* ``mse-clip``: round to nearest with the clipping ratio of least squared error, per channel or group.
* ``gptq``: second-order error compensation (Frantar et al., 2023). With H = sum of x x^T over the
  layer's calibration inputs, columns are quantized in order and each one's error is spread over
  the columns not yet quantized through the Cholesky factor of H^-1 (damped by ``DAMP`` of its mean
  diagonal), so the layer's output error ||X (W - Q)^T|| stays small. Scales are the least-error
  (mse-clip) ones: per channel from the whole row, per group when a group starts, from the weights
  as the updates left them. Pruned weights are quantized to
  0 and their error is compensated the same way (SparseGPT's rule, on a magnitude mask).
* ``gradient``: learned rounding (AdaRound, Nagel et al., 2020) on the mse-clip grid: each weight
  chooses to round down or up through a rectified sigmoid trained with Adam on the same output error
  plus a regulariser that pushes it to 0 or 1; the iteration budget is fixed and everything is
  deterministic. The result is whichever of rtn, mse-clip and the learned rounding has the least
  output error, so it is never worse than ``rtn`` on that error.

Methods that use H fall back to ``mse-clip`` for layers with no inputs to compensate over (an
Embedding's input is one-hot: its H is the identity, where the least-error scale and rounding to
nearest are what compensation can achieve).
Pruning (``sparsity``) is by magnitude, per output row (2:4: the two largest of every four).
"""
from __future__ import annotations

import math

import torch

from ..core.qconfig import SEMI_STRUCTURED, QuantizerConfig, Setting
from .grids import QuantizedWeight, dequant_rows, fit, limits, round_to_grid, rtn, with_pruned_zero

# gptq: damping, as a share of the mean diagonal of H. The reference implementation's 1% assumes
# hundreds of thousands of calibration tokens; with a few thousand (minilm: 67 sentences) H is far
# from full rank and 1% overfits the calibration set (validation cosine at 3 bits: 0.773 with 1%,
# 0.816 with 10%, experiments/exp_methods.py).
DAMP = 0.1
GPTQ_BLOCK = 128  # gptq: columns per lazy batch update
ADAROUND_ITERS = 100
ADAROUND_LR = 1e-2
ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def magnitude_mask(w2d: torch.Tensor, sparsity: float | str) -> torch.Tensor | None:
    """Which weights survive: per row the largest |w| (2:4: two of every four along the row); None when dense."""
    out, inner = w2d.shape
    a = w2d.detach().abs()
    if sparsity == SEMI_STRUCTURED:
        blocks = a.reshape(out, inner // 4, 4)
        order = torch.argsort(blocks, dim=2, descending=True, stable=True)
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, order[:, :, :2], True)
        return keep.reshape(out, inner)
    k = math.floor(inner * float(sparsity))
    if k == 0:
        return None
    order = torch.argsort(a, dim=1, stable=True)  # smallest first; ties: the earlier column goes
    keep = torch.ones_like(a, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def quantize_setting(w: torch.Tensor, setting: Setting, cfg: QuantizerConfig, hessian: torch.Tensor | None = None,
                     groups: int = 1) -> QuantizedWeight:
    """The integers of ``w`` at an integer ``setting``. ``hessian``: (groups, inner, inner) sums of x x^T of the
    layer's inputs, one per convolution group (None: no inputs to compensate over)."""
    w2d = w.detach().float().reshape(w.shape[0], -1)
    mask = magnitude_mask(w2d, setting.sparsity) if setting.sparse else None
    if setting.method == "rtn":
        return rtn(w, setting.bits, cfg, mask)
    if setting.method == "mse-clip" or hessian is None:  # no inputs to compensate over: the least-error scale
        return rtn(w, setting.bits, cfg, mask, clip_search=True)
    if setting.method == "gptq":
        return _per_group(gptq, w, setting.bits, cfg, hessian, groups, mask)
    if setting.method == "gradient":
        return _per_group(adaround, w, setting.bits, cfg, hessian, groups, mask)
    raise ValueError(f"unknown quantizer method {setting.method!r}")


def _per_group(fn, w, bits, cfg, hessian, groups, mask) -> QuantizedWeight:
    """Run ``fn`` on each convolution group's rows with that group's H, and join the records."""
    if groups == 1:
        return fn(w, bits, cfg, hessian[0], mask)
    rows = w.shape[0] // groups
    parts = [fn(w[g * rows:(g + 1) * rows], bits, cfg, hessian[g], None if mask is None else mask[g * rows:(g + 1) * rows])
             for g in range(groups)]
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    p = parts[0]
    return QuantizedWeight(bits, tuple(w.shape), torch.cat([x.codes for x in parts]), torch.cat([x.scales for x in parts]),
                           cat([x.zero_points for x in parts]), p.group_size, cat([x.mask for x in parts]))


def _objective(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Output error of a weight error ``e`` (out x inner): trace(e H e^T) = sum over samples of ||x e^T||^2."""
    return ((e @ h) * e).sum()


def gptq(w: torch.Tensor, bits: int, cfg: QuantizerConfig, h: torch.Tensor, mask: torch.Tensor | None = None,
         damp: float = DAMP, block: int = GPTQ_BLOCK) -> QuantizedWeight:
    """Frantar et al.'s GPTQ in column order; with ``cfg.act_order``, also in act order (below), keeping
    whichever has the lower output error trace(E H E^T) on this layer."""
    q = _gptq_in_order(w, bits, cfg, h, mask, damp, block)
    if not cfg.act_order or mask is not None:
        return q
    a = _gptq_act_order(w, bits, cfg, h, damp)
    src = w.detach().double().reshape(w.shape[0], -1)
    err = lambda x: float(_objective(src - x.dequantize().double().reshape(src.shape), h.double()))  # noqa: E731
    return a if err(a) < err(q) else q


def _damped(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's starting point in float64: the weight as rows, columns no input ever reaches zeroed (their H
    diagonal set to 1), and H damped by ``damp`` of its mean diagonal."""
    W = w.detach().double().reshape(w.shape[0], -1).clone()
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if damp:
        H += damp * torch.diag(H).mean() * torch.eye(W.shape[1], dtype=H.dtype)
    return W, H


def _gptq_act_order(w: torch.Tensor, bits: int, cfg: QuantizerConfig, h: torch.Tensor, damp: float) -> QuantizedWeight:
    """GPTQ over the columns in decreasing order of H's diagonal (the inputs with the most energy first, while
    the most columns remain to absorb their error), with "static groups": every group's scale is fitted on the
    unquantized weights first, so a group's columns may come in any order. Dense weights only."""
    with torch.no_grad():
        W, H = _damped(w, h, damp)
        inner = W.shape[1]
        group = cfg.group_size if cfg.granularity == "per-group" else inner
        n_g = -(-inner // group)
        fits = [fit(W[:, g * group:(g + 1) * group], bits, cfg, None, clip_search=True) for g in range(n_g)]
        scales = torch.cat([f[1] for f in fits], dim=1)
        zps = None if fits[0][2] is None else torch.cat([f[2] for f in fits], dim=1)
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        Wp, Hp = W[:, perm].clone(), H[perm][:, perm]
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
        codes = torch.zeros_like(Wp)
        for j in range(inner):
            g = int(perm[j]) // group
            s_c, z_c = scales[:, g:g + 1], None if zps is None else zps[:, g:g + 1]
            wc = Wp[:, j:j + 1]
            q = round_to_grid(wc, s_c, z_c, bits, cfg)
            codes[:, j:j + 1] = q
            e = (wc - dequant_rows(q, s_c, z_c)) / hinv[j, j]
            Wp[:, j:] -= e @ hinv[j:j + 1, j:]
        codes = codes[:, torch.argsort(perm)]
        return QuantizedWeight(bits, tuple(w.shape), codes.to(torch.int32), scales.float().contiguous(),
                               None if zps is None else zps.to(torch.int32), cfg.group_size
                               if cfg.granularity == "per-group" else None, None)


def _gptq_in_order(w: torch.Tensor, bits: int, cfg: QuantizerConfig, h: torch.Tensor, mask: torch.Tensor | None,
                   damp: float, block: int) -> QuantizedWeight:
    with torch.no_grad():
        shape, out = tuple(w.shape), w.shape[0]
        W, H = _damped(w, h, damp)
        inner = W.shape[1]
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        group = cfg.group_size if cfg.granularity == "per-group" else None
        if group is not None:
            block = max(block // group, 1) * group  # a group never straddles two blocks
        keep = None if mask is None else mask.double()
        codes = torch.zeros_like(W)
        if group is None:
            _, s, z = fit(W, bits, cfg, keep, clip_search=True)
            scales, zps = s.expand(out, 1), None if z is None else z.expand(out, 1)
        else:
            n_g = -(-inner // group)
            scales = torch.zeros(out, n_g, dtype=W.dtype)
            zps = torch.zeros(out, n_g, dtype=W.dtype) if cfg.scheme == "asymmetric" else None
        for i1 in range(0, inner, block):
            i2 = min(i1 + block, inner)
            W1, err1, h1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=W.dtype), hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if group is not None and col % group == 0:
                    g = col // group
                    kg = None if keep is None else keep[:, col:col + group]
                    _, s_g, z_g = fit(W1[:, i:i + group], bits, cfg, kg, clip_search=True)
                    scales[:, g:g + 1] = s_g
                    if zps is not None:
                        zps[:, g:g + 1] = z_g
                g = 0 if group is None else col // group
                s_c = scales[:, g:g + 1]
                z_c = None if zps is None else zps[:, g:g + 1]
                wc = W1[:, i:i + 1]
                q = round_to_grid(wc, s_c, z_c, bits, cfg)
                dq = dequant_rows(q, s_c, z_c)
                if keep is not None:
                    pruned = keep[:, col:col + 1] == 0
                    q, dq = q.masked_fill(pruned, 0.0), dq.masked_fill(pruned, 0.0)
                codes[:, col:col + 1] = q
                e = (wc - dq) / h1[i, i]
                W1[:, i:] -= e @ h1[i:i + 1, i:]
                err1[:, i:i + 1] = e
            W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        lo, hi = limits(bits, cfg)
        assert float(codes.min()) >= lo and float(codes.max()) <= hi
        zp_out = None if zps is None else zps.reshape(out, -1).to(torch.int32)
        return with_pruned_zero(QuantizedWeight(bits, shape, codes.to(torch.int32),
                                                scales.float().reshape(out, -1).contiguous(), zp_out, group, mask))


def adaround(w: torch.Tensor, bits: int, cfg: QuantizerConfig, h: torch.Tensor, mask: torch.Tensor | None = None,
             iters: int = ADAROUND_ITERS, lr: float = ADAROUND_LR, reg: float = 0.01) -> QuantizedWeight:
    """Learned rounding on the least-error (mse-clip) grid; the result is whichever of rtn, mse-clip and the
    learned rounding has the least output error, so it is never worse than rtn on that objective."""
    plain = rtn(w, bits, cfg, mask)
    if bits == 1:  # signs: nothing to round
        return plain
    src = w.detach().float().reshape(w.shape[0], -1)
    if mask is not None:
        src = src.masked_fill(~mask, 0.0)
    H = (h / h.diagonal().mean().clamp_min(1e-12)).float()

    def error(q: QuantizedWeight) -> float:
        return float(_objective(src - q.dequantize().reshape(src.shape), H))

    start = rtn(w, bits, cfg, mask, clip_search=True)
    learned = _learn_rounding(start, src, H, bits, cfg, mask, iters, lr, reg)
    return min((plain, start, learned), key=error)


def _learn_rounding(start: QuantizedWeight, src, H, bits, cfg, mask, iters, lr, reg) -> QuantizedWeight:
    scale = start.per_element(start.scales)
    zp = None if start.zero_points is None else start.per_element(start.zero_points.float())
    lo, hi = limits(bits, cfg)
    live = scale > 0  # a row whose float16 scale underflowed keeps its codes (they all dequantize to 0)
    safe = torch.where(live, scale, torch.ones_like(scale))
    base = torch.where(live, torch.floor(src / safe) + (zp if zp is not None else 0.0), start.codes.float())
    rest = torch.where(live, src / safe + (zp if zp is not None else 0.0) - base, 0.0).clamp(1e-4, 1 - 1e-4)
    v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    keep = None if mask is None else mask.float()
    norm = float(_objective(src, H).clamp_min(1e-12))

    def weights(codes: torch.Tensor) -> torch.Tensor:
        out = (codes.clamp(lo, hi) - (zp if zp is not None else 0.0)) * scale
        return out if keep is None else out * keep

    def hard(vv: torch.Tensor) -> torch.Tensor:
        return base + (torch.sigmoid(vv) * (ZETA - GAMMA) + GAMMA >= 0.5).float()

    with torch.no_grad():
        best_codes = start.codes.float()
        best = float(_objective(src - weights(best_codes), H))
    with torch.enable_grad():  # callers quantize under no_grad
        best_codes = _adaround_loop(v, base, src, H, norm, weights, hard, lo, hi, iters, lr, reg, best_codes, best)
    codes = best_codes.clamp(lo, hi)
    return with_pruned_zero(QuantizedWeight(bits, start.shape, codes.to(torch.int32), start.scales,
                                            start.zero_points, start.group_size, mask))


def _adaround_loop(v, base, src, H, norm, weights, hard, lo, hi, iters, lr, reg, best_codes, best):
    """Adam on the rounding variables; the best hard rounding seen (the start's included) is kept."""
    v = v.detach().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    warm = int(0.2 * iters)
    for it in range(iters):
        soft = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        rec = _objective(src - weights(base + soft), H) / norm
        if it >= warm:
            beta = 20.0 - (20.0 - 2.0) * (it - warm) / max(iters - warm, 1)
            rec = rec + reg * (1.0 - (2.0 * soft - 1.0).abs().pow(beta)).sum() / soft.numel()
        opt.zero_grad()
        rec.backward()
        opt.step()
        if (it + 1) % 25 == 0 or it == iters - 1:
            with torch.no_grad():
                codes = hard(v).clamp(lo, hi)
                obj = float(_objective(src - weights(codes), H))
                if obj < best:
                    best, best_codes = obj, codes
    return best_codes

