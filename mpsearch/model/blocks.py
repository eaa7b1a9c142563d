"""The sequence of blocks a model's forward runs through, for reusing what a prefix of them computed.

Transformers (HF ``encoder.layer``, ``model.layers``) and many CNNs run a list of repeated blocks,
each taking the previous one's output. A candidate that changes no searched layer before block k
makes blocks 0..k-1 compute exactly what they computed for an earlier candidate with the same
prefix, so the evaluator keeps their outputs and skips them (``ReusePlan``); the same holds for
the modules inside a block (attention, MLP).
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

MIN_INNER_SHARE = 1 / 6  # an inner reuse point must save at least this share of its block's work alone


def find_blocks(model: nn.Module, layers: list[str], pattern: str | None = None) -> list[str]:
    """Module names of the block sequence, in order: those matching ``pattern``, or else the children of the
    ModuleList/Sequential of repeated (same-class, non-leaf) modules holding the most searched layers."""
    if pattern is not None:
        rx = re.compile(pattern)
        return [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
    best, best_count = [], 0
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        kids = [(f"{name}.{k}" if name else k, m) for k, m in mod.named_children()]
        kinds = {type(m) for _, m in kids}
        if len(kids) < 2 or len(kinds) != 1 or not any(True for _ in kids[0][1].children()):
            continue
        count = sum(1 for layer in layers for k, _ in kids if layer.startswith(k + "."))
        if count > best_count:
            best, best_count = [k for k, _ in kids], count
    return best


class ReusePlan:
    """Where outputs can be kept, and what each one depends on, from the order one forward pass runs modules.

    Reuse points: the blocks, every module inside a block that holds a searched layer (attention,
    MLP), so a change in a block's MLP still reuses its attention, and the stem before the first block
    (embeddings); kept only where some decision starts after the point ends and before the point around
    it ends, and, inside a block, only where the point alone saves a real share of the block's work.
    A point's output depends on the decisions with a layer (or alias) whose first call starts before the
    point's call ends: ``keys[i]``, the decisions of point ``points[i]``'s cache key. This follows the
    order the forward really ran, so a weight tied or shared across blocks counts from its first use on,
    and reuse stops before it. A point called more than once per forward (a shared module) is not a point.
    ``inside[i]``: the points nested in point i. ``order``: the decisions by first call, the order in which candidates sharing prefixes are sorted.
    ``point_bytes``: the points' outputs on the planning batch. ``lead_points``/``lead_keys``/``lead_span``/
    ``lead_bytes``: modules inside a block kept for one candidate per batch only (see below).
    """

    def __init__(self, model: nn.Module, blocks: list[str], decisions: list[tuple[str, ...]], run: Callable[[], None],
                 work: dict[str, float] | None = None):
        modules = dict(model.named_modules(remove_duplicate=False))
        searched = {n for layers in decisions for n in layers}
        # modules inside a block around a searched layer (attention, MLP); not the searched layers themselves,
        # whose outputs would cost as much memory as a sub-block's and save one matrix product
        inner = [n for n in modules if any(n.startswith(b + ".") for b in blocks)
                 and any(s.startswith(n + ".") for s in searched)]
        # the stem: modules outside the blocks around a searched layer, run before the first block (a
        # transformer's embeddings), so a candidate that changes only blocks skips them too
        stem = [n for n in modules if n and not any(n == b or n.startswith(b + ".") or b.startswith(n + ".") for b in blocks)
                and any(s.startswith(n + ".") for s in searched)]
        watched = sorted(set(blocks) | set(inner) | set(stem) | (searched & set(modules)))
        events: list[tuple[str, str]] = []
        nbytes: dict[str, int] = {}
        hooks = []

        def ended(m, a, out, n):  # returns None: a forward hook's return value would replace the output
            events.append(("end", n))
            nbytes[n] = output_bytes(out)

        for n in watched:
            hooks.append(modules[n].register_forward_pre_hook(lambda m, a, n=n: events.append(("start", n))))
            hooks.append(modules[n].register_forward_hook(lambda m, a, o, n=n: ended(m, a, o, n)))
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
        first, end, calls = {}, {}, {}
        for i, (kind, n) in enumerate(events):
            if kind == "start":
                first.setdefault(n, i)
                calls[n] = calls.get(n, 0) + 1
            else:
                end[n] = i
        block_calls = [n for kind, n in events if kind == "start" and n in set(blocks)]
        self.usable = bool(blocks) and block_calls == blocks  # each block once, in order
        self.blocks = blocks
        stem = [n for n in stem if calls.get(n) == 1 and blocks and end[n] < first.get(blocks[0], -1)]
        stem = [n for n in stem if not any(n.startswith(m + ".") for m in stem)]  # the outermost: one per stage
        candidates = [n for n in watched if n in set(blocks) | set(inner) | set(stem) and calls.get(n) == 1] \
            if self.usable else []
        candidates.sort(key=lambda n: first[n])
        starts = [min((first[m] for m in layers if m in first), default=len(events)) for layers in decisions]

        def enclosing(n: str) -> str | None:
            outer = [p for p in candidates if n.startswith(p + ".")]
            return max(outer, key=len) if outer else None

        def block_of(n: str) -> str:  # the stem's own cost is measured against the first block's
            return next((b for b in blocks if n == b or n.startswith(b + ".")), blocks[0] if blocks else n)

        def useful(n: str) -> bool:
            # a point saves work only if some decision starts after it ends but before the point around it
            # ends: otherwise every candidate that misses the outer point misses this one too. An inner
            # output wider than its block's (an MLP's expansion) costs more memory than the little it saves.
            outer = enclosing(n)
            limit = end[outer] if outer is not None else len(events)
            if n not in blocks and nbytes.get(n, 0) > nbytes.get(block_of(n), 0):
                return False
            return any(end[n] < s < limit for s in starts)

        def worth_its_memory(n: str) -> bool:
            # an inner output costs as much memory as its block's; unless what it alone saves (the work of the
            # searched modules inside it and in no point nested in it) is a real share of its block's work,
            # the memory serves better holding more candidates' block outputs. ``work``: MACs per searched module.
            if work is None or n in blocks or n in stem:
                return True
            total = sum(w for m, w in work.items() if m.startswith(block_of(n) + "."))
            nested = [q for q in candidates if q.startswith(n + ".") and useful(q)]
            alone = sum(w for m, w in work.items() if m.startswith(n + ".") and not any(m.startswith(q + ".") for q in nested))
            return total <= 0 or alone >= MIN_INNER_SHARE * total

        def key_of(n: str) -> tuple[int, ...]:  # the decisions whose first call starts before n's call ends
            return tuple(d for d, s in enumerate(starts) if s < end[n])

        candidates = [n for n in candidates if worth_its_memory(n)]
        self.points = [n for n in candidates if useful(n)]
        self.keys = [key_of(p) for p in self.points]
        self.inside = [[i for i, q in enumerate(self.points) if q.startswith(p + ".")] for p in self.points]
        self.order = sorted(range(len(decisions)), key=lambda d: starts[d])
        self.point_bytes = sum(nbytes.get(p, 0) for p in self.points)

        # Lead points: inside a block, the outputs of modules called once (searched layers included) that a later
        # decision in the same block could use. Kept for one candidate per batch only (``Evaluator.prefix_order``'s
        # lead), so their memory is one forward's, and a batch of one-decision moves from it (greedy's
        # sensitivity pass) skips, in the changed block, what comes before the changed layer.
        regular = set(self.points)
        inner_all = [n for n in watched if calls.get(n) == 1 and n not in regular and n not in blocks
                     and any(n.startswith(b + ".") for b in blocks)] if self.usable else []

        def limit_of(n: str) -> int:  # the end of the innermost regular point around n: beyond, that point stands in
            outer = [p for p in self.points if n.startswith(p + ".")]
            return end[max(outer, key=len)] if outer else len(events)

        leads, limits = [], []
        for n in sorted(inner_all, key=lambda n: first[n]):
            limit = limit_of(n)
            if not any(end[n] < s < limit for s in starts):
                continue
            # an enclosing module with the same key ends later and saves more: it stands in for n
            if any(n.startswith(m + ".") and key_of(m) == key_of(n) for m in inner_all):
                continue
            leads.append(n)
            limits.append(limit)
        self.lead_points = leads
        self.lead_keys = [key_of(n) for n in leads]
        self.lead_bytes = [nbytes.get(n, 0) for n in leads]
        # a candidate that first departs from the lead at position k of ``order`` uses lead point j when
        # a <= k < b: it agrees on everything j depends on, and not on the key of the regular point around j
        rank = {d: k for k, d in enumerate(self.order)}
        self.lead_span = [(max((rank[d] + 1 for d in key), default=0), sum(1 for s in starts if s < limit))
                          for key, limit in zip(self.lead_keys, limits)]


def tensor_versions(out) -> tuple:
    """The version counters of the tensors in a block's output (a tensor, or tuples/lists/dicts of them).
    The evaluator keeps outputs without copying them; an in-place change by a later module bumps a
    counter, and a kept output whose counters moved is computed again instead of reused."""
    if isinstance(out, torch.Tensor):
        return (out._version,)
    if isinstance(out, (tuple, list)):
        return tuple(v for o in out for v in tensor_versions(o))
    if isinstance(out, dict):
        return tuple(v for o in out.values() for v in tensor_versions(o))
    return ()


def output_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(output_bytes(o) for o in out)
    if isinstance(out, dict):
        return sum(output_bytes(v) for v in out.values())
    return 0
