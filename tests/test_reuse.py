"""Prefix reuse: block outputs kept and reused give the scores a full forward gives, and reuse really happens."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mpsearch.evaluator import Evaluator
from mpsearch.model import build_space
from mpsearch.model.blocks import find_blocks
from mpsearch.tasks.task import Task


def _walk(space, rng, n_random=6, n_steps=12):
    """Candidates as strategies ask them: random ones, and single-decision moves from the last one."""
    out = []
    for _ in range(n_random):
        base = list(space.random(rng))
        out.append(tuple(base))
        for _ in range(n_steps // n_random):
            d = int(rng.integers(len(base)))
            choices = space.decisions[d].choices
            base[d] = choices[int(rng.integers(len(choices)))]
            out.append(tuple(base))
    return out


def _compare(task, space, candidates, **kwargs):
    with Evaluator(task, space, cache_dir=None, blocks="", **kwargs) as plain:
        want = [plain.evaluate(c).metric for c in candidates]
        want_val = plain.validation_metric(candidates[-1])
    with Evaluator(task, space, cache_dir=None, **kwargs) as reusing:
        assert reusing.prefix is not None, "the block sequence was not found"
        got = [reusing.evaluate(c).metric for c in candidates]
        got_val = reusing.validation_metric(candidates[-1])
        stats = (reusing.points_run, reusing.points_reused, reusing.memory())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got_val == pytest.approx(want_val, abs=1e-6)
    return stats


def test_minilm_scores_with_reuse_equal_full_forwards(minilm_task):
    from mpsearch.model import space_for

    space = space_for(minilm_task)
    blocks = find_blocks(minilm_task.model, list(space.layers))
    assert len(blocks) == 6 and blocks[0].endswith("layer.0")
    run, reused, memory = _compare(minilm_task, space, _walk(space, np.random.default_rng(0)))
    assert reused > 0, "no block output was reused"
    assert memory["reuse_points"] > 6, "points inside blocks (attention, MLP) are reused too"


def test_minilm_points_the_stem_and_only_inner_points_worth_their_memory(minilm_task):
    """The embeddings (the stem before block 0) are a point, so a change inside the encoder does not look words
    up again; `attention` (self-attention plus one 384x384 projection) saves too little of its block to hold memory."""
    from mpsearch.model import space_for

    space = space_for(minilm_task)
    with Evaluator(minilm_task, space, cache_dir=None) as ev:
        points = ev.prefix.points
        assert points[0] == "bert.embeddings"
        assert not any(p.endswith(".attention") for p in points)
        assert sum(p.endswith(".attention.self") for p in points) == 6
        lookups = []
        emb = dict(ev.model.named_modules())["bert.embeddings.word_embeddings"]
        h = emb.register_forward_hook(lambda *a: lookups.append(1))
        top = space.uniform(max(space.uniform_choices()))
        ev.evaluate(top)
        n = len(lookups)
        moved = list(top)
        moved[-1] = space.decisions[-1].choices[0]  # the last decision: inside the last block
        ev.evaluate(tuple(moved))
        h.remove()
        assert n == len(ev.calibration) and len(lookups) == n, "the encoder-only change looked the words up again"


def test_lru_cache_protects_what_is_used_again_from_a_scan():
    from mpsearch.evaluator import LRUCache

    size = lambda v: v  # noqa: E731
    for share, survives in ((0.0, False), (0.25, True)):
        c = LRUCache(10, size=size, protected_share=share)
        c.put("parent", 2)
        assert c.get("parent") == 2  # used again: protected
        for i in range(20):  # a run of one-off entries, each used once
            c.put(i, 2)
            assert c.used <= 10
        assert ("parent" in c) is survives
        if survives:
            assert c.get("parent") == 2 and c.protected_used == 2
            c.drop("parent")
            assert c.used == sum(c.items.values()) and c.protected_used == 0


def test_activation_cache_is_bounded(minilm_task):
    from mpsearch.model import space_for

    space = space_for(minilm_task)
    cands = _walk(space, np.random.default_rng(1), n_random=3, n_steps=9)
    with Evaluator(minilm_task, space, cache_dir=None, activation_cache_mb=1.0, cache_mb=40) as ev:
        for c in cands:
            ev.evaluate(c)
        assert ev.activations.used <= 1 << 20
        # one budget for both weight tiers: the records at most half, dequantized weights what they leave
        assert ev.weights.used + ev.stored.used <= ev.memory()["weight_cache_cap_mb"] * (1 << 20)
        assert ev.stored.used <= ev.stored.cap == 20 << 20
        assert ev.weights.evictions > 0, "a 40 MB weight cache must evict on minilm"


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return x + self.out(torch.tanh(self.fc(x)))


class Stack(nn.Module):
    """Four blocks; block 2 calls block 0's ``fc`` (one module, two places), so a change to it
    changes blocks 0 and 2 and nothing before block 0 can be reused for it."""

    def __init__(self, d=16, n=4, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.blocks[2].fc = self.blocks[0].fc
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _stack_task():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 8, generator=g), None) for _ in range(3)]
    return Task(Stack(), batches[:2], batches[2:], metric="cosine", name="stack")


def test_a_weight_shared_across_blocks_is_one_decision_and_reuse_stays_exact():
    task = _stack_task()
    space = build_space(task.model, [2, 3, 4, 8])
    shared = space.layers["blocks.0.fc"]
    assert "blocks.2.fc" in shared.aliases
    ev = Evaluator(task, space, cache_dir=None)
    plan = ev.prefix
    d_shared = next(i for i, d in enumerate(space.decisions) if "blocks.0.fc" in d.layers)
    for point, key in zip(plan.points, plan.keys):
        if point.startswith("blocks.") and point.split(".")[1] in ("1", "2", "3"):
            assert d_shared in key, f"{point}'s output depends on the shared fc but its key omits it"
    ev.close()
    rng = np.random.default_rng(3)
    cands = []
    base = list(space.uniform(8))
    for _ in range(3):
        for d in range(len(base)):  # every decision changed alone, the shared one included
            for c in (2, 4):
                cands.append(tuple(base[:d] + [c] + base[d + 1:]))
        base = list(space.random(rng))
    run, reused, _ = _compare(task, space, cands)
    assert reused > 0


def test_blocks_named_in_the_space_file_and_off():
    task = _stack_task()
    space = build_space(task.model, [2, 4, 8])
    assert find_blocks(task.model, list(space.layers), r"blocks\.[01]") == ["blocks.0", "blocks.1"]
    with Evaluator(task, space, cache_dir=None, blocks="") as ev:
        assert ev.prefix is None
        assert ev.memory()["reuse_points"] == 0


class InPlaceStack(Stack):
    """Adds to each block's output in place, after the block returned it: a kept output must not be the
    modified tensor."""

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
            h += 0.25
            h.mul_(0.9)
        return self.head(h)


def test_outputs_changed_in_place_after_a_block_are_not_reused_stale():
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 8, generator=g), None) for _ in range(3)]
    task = Task(InPlaceStack(), batches[:2], batches[2:], metric="neg_mse", name="inplace")
    space = build_space(task.model, [2, 4, 8])
    base = list(space.uniform(8))
    cands = [tuple(base)] + [tuple(base[:d] + [2] + base[d + 1:]) for d in range(len(base))] * 2
    _compare(task, space, cands)


def test_lru_cache_makes_room_for_a_large_entry_and_drops_stale_ones():
    from mpsearch.evaluator import LRUCache

    c = LRUCache(8, size=lambda v: v, protected_share=0.5)
    c.put("a", 4)
    assert c.get("a") == 4 and c.protected_used == 4
    c.put("big", 8)  # takes the whole cap: the protected entry goes back to probation and out, not the new one
    assert "big" in c and "a" not in c and c.used == 8 and c.protected_used == 0
    c.put("x", 1)
    assert c.get("x", valid=lambda v: False) is None  # rejected (changed in place): dropped, a miss
    assert "x" not in c and c.used == 0 and c.misses == 1 and c.hits == 1


def test_lru_cache_shrinks_to_a_new_cap():
    from mpsearch.evaluator import LRUCache

    evicted = []
    c = LRUCache(10, size=lambda v: v, on_evict=evicted.append, protected_share=0.5)
    c.put("a", 3)
    c.get("a")  # protected
    c.put("b", 3)
    c.put("c", 3)
    c.resize(4)  # probation goes first, oldest first
    assert evicted == [3, 3] and "a" in c and c.used == 3
    c.resize(2)  # the protected segment shrinks with the cap: its entry goes back to probation, then out
    assert evicted == [3, 3, 3] and c.used == 0 and c.protected_used == 0 and c.protected_cap == 1


def _moves(space, base, bits):
    """One-decision moves from ``base``: a batch as greedy's sensitivity pass asks it."""
    return [tuple(base[:d] + [bits] + base[d + 1:]) for d in range(len(base)) if base[d] != bits]


def _in_prefix_order(ev, batch):
    return [ev.evaluate(batch[i]).metric for i in ev.prefix_order(batch)]


def test_minilm_lead_points_skip_the_changed_block_up_to_the_changed_layer(minilm_task, minilm_space):
    """Inside the block a move changes, the lead's query, key, attention and MLP-expansion outputs stand in: per
    block and batch, 2 for a change to value, 1 to key, 1 to the MLP expansion and 2 to its contraction."""
    space = minilm_space
    base = list(space.uniform(8))
    batch = _moves(space, base, 4) + [tuple(base)]  # the base last: prefix_order puts it first, as the lead
    with Evaluator(minilm_task, space, cache_dir=None, blocks="") as plain:
        want = {c: plain.evaluate(c).metric for c in batch}
    with Evaluator(minilm_task, space, cache_dir=None) as ev:
        assert ev.memory()["lead_points"] == 24
        order = ev.prefix_order(batch)
        assert batch[order[0]] == tuple(base)
        got = {batch[i]: ev.evaluate(batch[i]).metric for i in order}
        assert ev.leads_reused == 6 * 6 * len(ev.calibration)
        assert ev._lead_stored, "the lead kept its outputs"
        ev.prefix_order([tuple(base), tuple(base)])  # a new batch: the last lead's outputs go
        assert not any(k[1] >= len(ev.prefix.points) for k in ev.activations.items)
    np.testing.assert_allclose([got[c] for c in batch], [want[c] for c in batch], rtol=0, atol=1e-6)


class EarlyBlock(Block):
    """Changes its first layer's output in place: a kept lead output must not be served changed."""

    def forward(self, x):
        return x + self.out(self.fc(x).tanh_())


class EarlyStack(Stack):
    def __init__(self):
        super().__init__()
        shared = self.blocks[0].fc
        for b in self.blocks:
            b.__class__ = EarlyBlock
        self.blocks[2].fc = shared


@pytest.mark.parametrize("model, leads", [(Stack, True), (EarlyStack, False)])
def test_lead_points_stay_exact_with_a_shared_layer_and_in_place_changes(model, leads):
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(16, 8, generator=g), None) for _ in range(3)]
    task = Task(model(), batches[:2], batches[2:], metric="neg_mse", name="leads")
    space = build_space(task.model, [2, 4, 8])
    base = list(space.uniform(8))
    batch = _moves(space, base, 2)
    with Evaluator(task, space, cache_dir=None, blocks="") as plain:
        want = {c: plain.evaluate(c).metric for c in batch}
    with Evaluator(task, space, cache_dir=None) as ev:
        # block 2's fc is block 0's: called twice, never a lead point
        assert "blocks.1.fc" in ev.prefix.lead_points and "blocks.0.fc" not in ev.prefix.lead_points
        order = ev.prefix_order(batch)
        got = {batch[i]: ev.evaluate(batch[i]).metric for i in order}
        assert (ev.leads_reused > 0) is leads  # changed in place: computed again, never served stale
    np.testing.assert_allclose([got[c] for c in batch], [want[c] for c in batch], rtol=0, atol=1e-6)


def test_a_batch_sharing_nothing_keeps_no_lead_outputs(minilm_task, minilm_space):
    rng = np.random.default_rng(5)
    batch = [tuple(minilm_space.random(rng)) for _ in range(3)]
    with Evaluator(minilm_task, minilm_space, cache_dir=None) as ev:
        _in_prefix_order(ev, batch)
        assert ev._lead is None and ev.leads_reused == 0
        assert not any(k[1] >= len(ev.prefix.points) for k in ev.activations.items)


def test_lead_outputs_take_at_most_their_share_of_the_activation_cache():
    from mpsearch.evaluator import LEAD_SHARE

    task = Task(Stack(), *[[(torch.randn(16, 8, generator=torch.Generator().manual_seed(s)), None)] for s in (6, 7)],
                metric="neg_mse", name="leads")
    space = build_space(task.model, [2, 4, 8])
    batch = [tuple(space.uniform(8))] + _moves(space, list(space.uniform(8)), 2)
    with Evaluator(task, space, cache_dir=None) as ev:
        one = max(ev.prefix.lead_bytes)
    for cap_bytes, keeps in ((0.5 * one / LEAD_SHARE, False), (64 * one / LEAD_SHARE, True)):
        with Evaluator(task, space, cache_dir=None, activation_cache_mb=cap_bytes / (1 << 20)) as ev:
            ev.prefix_order(batch)
            kept = sum(ev.prefix.lead_bytes[j - len(ev.prefix.points)] for j in ev._lead_wanted)
            assert kept <= LEAD_SHARE * ev.activations.cap and bool(kept) is keeps
