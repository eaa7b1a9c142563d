"""The evaluator: at most one forward pass per new candidate, less when a prefix was computed before.

* Weights: a candidate's quantized weights enter the model one layer at a time, while that layer
  runs (forward hooks swap ``param.data`` in and back, no copy), so only the model itself stays in
  float. Quantized weights are kept in a least-recently-used cache bounded by ``cache_mb``; one
  evicted is recomputed (cheap methods) or read back from the disk cache (gptq, gradient).
* Prefixes: for a model that runs a sequence of blocks (``model.blocks``), each block's output on
  each calibration batch is kept, keyed by the choices of every searched layer at or before it, in
  a cache bounded by ``activation_cache_mb``. A candidate that first differs from an earlier one in
  block k skips blocks 0..k-1: their outputs are the same tensors, so scores are identical. Outputs are
  kept without a copy; one that a later module changed in place (its version counter moved) is
  computed again. Inside the changed block, the lead points (``ReusePlan.lead_points``: the layers and
  sub-modules before the changed one) are kept for one candidate per batch, the lead that
  ``prefix_order`` puts first, so its one-decision neighbours skip those too.
* Scores are memoized by candidate, so a strategy that asks again pays nothing and a shared
  evaluator makes every strategy pay the same price per evaluation.
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import replace
from typing import Any, Sequence

import torch

from .core.qconfig import DATA_METHODS, FLOAT16_BITS, UNQUANTIZED_BITS
from .core.records import Evaluation
from .core.sizes import SizeTable
from .core.space import Candidate, SearchSpace, as_choice
from .device import resolve_device, set_threads
from .errors import MPSearchError, TaskError
from .metrics import Metric, get_metric
from .model.blocks import ReusePlan, find_blocks, output_bytes, tensor_versions
from .model.walk import model_fingerprint
from .model.weights import from_rows, get_weight, macs_rule, takes_inputs, to_rows
from .quantize import PreparedCache, QuantizedWeight, default_cache_dir, mse, quantize, sqnr_db
from .quantize.inputs import input_moments
from .tasks.task import Task

MB = 1 << 20
# block outputs used again (a parent's prefix) keep this share of their cache from one-off candidates' outputs
ACTIVATION_PROTECTED = 0.25
# an embedding table whose looked-up rows are at most this share of it is dequantized only at those rows
LOOKUP_ROWS_SHARE = 0.5
# the default activation cache holds the block outputs of this many candidates, where memory allows
KEPT_CANDIDATES = 32
# a batch's lead keeps its lead points' outputs in at most this share of the activation cache
LEAD_SHARE = 0.25


def _call(model: torch.nn.Module, inputs: Any):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def task_output(task: Task, out: Any):
    """What the task scores of a forward's result: ``output_fn``'s pick, or the first of a tuple, on the CPU
    (bfloat16/float16 models are scored in float32). Runtimes' outputs go through it too."""
    if task.output_fn is not None:
        out = task.output_fn(out)
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return out
    out = out.detach().cpu()
    return out.float() if out.is_floating_point() else out


def _to(x: Any, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _concat(parts: list) -> Any:
    return torch.cat(parts, dim=0) if parts and isinstance(parts[0], torch.Tensor) else parts


def _usable(value: float) -> bool:
    """A metric value candidates can be ranked by: a number, +inf included (sqnr of an exact model)."""
    return not (math.isnan(value) or value == -math.inf)


def _check_finite_weights(task: Task) -> None:
    for name, t in task.model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise TaskError(f"task {task.name!r}: tensor {name} holds {bad} NaN or infinite value(s); "
                            "mpsearch quantizes finite weights only")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def available_mb() -> float:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MB
    except (ValueError, OSError, AttributeError):
        return 4096.0


def _libc_trim():
    """glibc's malloc_trim: hands freed heap pages back to the system. Weights evicted from the bounded
    caches free tensors in the middle of the heap, which glibc otherwise keeps (measured: 1.1 GB kept on a
    0.1B model after 30 evaluations); None where there is no glibc."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()
_EVICTED_REFS = 3  # references to an evicted weight nobody else holds: LRUCache.put's, _recycle's argument, getrefcount's
# tensors on one memory block: the weight's own, plus the probe's (torch's private counter; absent: no recycling)
_STORAGE_USES = getattr(torch._C, "_storage_Use_Count", None)
_UNSHARED_STORAGE = 2


def _unchanged(entry) -> bool:
    """A kept (output, versions) that no later module changed in place: still this point's output."""
    return tensor_versions(entry[0]) == entry[1]


class LRUCache:
    """Tensors (or block outputs) by key, least recently used evicted first beyond ``cap_bytes``.

    ``protected_share`` > 0 makes it scan-resistant (a segmented LRU): a new entry waits on probation, and
    only one used again joins the protected segment (at most that share of the cap, its least recent sent
    back to probation). Evictions take probation's least recent first, so a run of entries used once (a
    search's one-off candidates) pushes out each other, not what is used over and over."""

    def __init__(self, cap_bytes: int, size=lambda entry: output_bytes(entry[0]), on_evict=None,
                 protected_share: float = 0.0):
        self.cap = int(cap_bytes)
        self.size = size
        self.on_evict = on_evict
        self.used = 0
        self.items: OrderedDict = OrderedDict()  # probation (all entries when nothing is protected)
        self.protected: OrderedDict = OrderedDict()
        self.protected_share = protected_share
        self.protected_cap = int(self.cap * protected_share)
        self.protected_used = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key) -> bool:
        return key in self.items or key in self.protected

    def get(self, key, valid=None, promote: bool = True):
        """The entry, or None; one that ``valid(entry)`` rejects is dropped and counts as a miss. ``promote``
        False: a hit on probation stays there (an entry known to be short-lived)."""
        protected = key in self.protected
        v = (self.protected if protected else self.items).get(key)
        if v is not None and valid is not None and not valid(v):
            self.drop(key)
            v = None
        if v is None:
            self.misses += 1
            return None
        if protected:
            self.protected.move_to_end(key)
        elif promote:
            self._promote(key)
        self.hits += 1
        return v

    def _promote(self, key) -> None:
        if not self.protected_cap:
            self.items.move_to_end(key)
            return
        v = self.items.pop(key)
        n = self.size(v)
        if n > self.protected_cap:
            self.items[key] = v
            return
        self.protected[key] = v
        self.protected_used += n
        self._demote(self.protected_cap)

    def _demote(self, limit: int) -> None:
        """The protected segment's least recent back to probation, as its newest, until it holds ``limit``."""
        while self.protected and self.protected_used > limit:
            k, old = self.protected.popitem(last=False)
            self.protected_used -= self.size(old)
            self.items[k] = old

    def drop(self, key) -> None:
        v = self.protected.pop(key, None)
        if v is not None:
            self.protected_used -= self.size(v)
        else:
            v = self.items.pop(key, None)
        if v is not None:
            self.used -= self.size(v)

    def touch(self, key) -> None:
        """Mark as just used without counting a hit (entries whose use a hit above them stood in for)."""
        if key in self.protected:
            self.protected.move_to_end(key)
        elif key in self.items:
            self._promote(key)

    def put(self, key, value) -> None:
        n = self.size(value)
        if n > self.cap or key in self:
            return
        self._demote(self.cap - n)  # room the new entry can take: evictions then never reach it or protected
        self.items[key] = value
        self.used += n
        self._evict()

    def resize(self, cap_bytes: int) -> None:
        """A new cap (the protected segment keeps its share), evicting down to it at once."""
        self.cap = int(cap_bytes)
        self.protected_cap = int(self.cap * self.protected_share)
        self._demote(self.protected_cap)
        self._evict()

    def _evict(self) -> None:
        while self.used > self.cap and self.items:
            _, old = self.items.popitem(last=False)
            self.used -= self.size(old)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(old)
            del old

    def clear(self) -> None:
        self.items.clear()
        self.protected.clear()
        self.used = self.protected_used = 0


class HalfWeight:
    """A float16 setting's stored record."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.nbytes = w.numel() * 2

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.w.to(dtype) if out is None else out.copy_(self.w)


class Evaluator:
    """Scores candidates on the task's model; the model gets its own weights back when a forward ends.

    ``cache_mb``: quantized weights kept in memory (stored records at most half, embedding tables' looked-up
    rows set aside, dequantized weights the rest); ``activation_cache_mb``: block outputs kept for prefix
    reuse. Defaults: half the model's bytes plus 768 MB, at most a quarter of the free memory, split in
    two: block outputs get half, at most 512 MB, or on the CPU up to ``KEPT_CANDIDATES`` candidates' block
    outputs where a quarter of the free memory beyond the weight cache allows; the weights the rest.
    ``blocks``: a regex naming the block sequence (default: found automatically; "" turns reuse off);
    ``device``: where the model runs (its outputs are scored on the CPU).
    Use it as a context manager, or call ``close()``: hooks come off and the model is as it was.
    """

    def __init__(self, task: Task, space: SearchSpace, activation_bits: int = 32, cache_dir="default",
                 cache_mb: float | None = None, activation_cache_mb: float | None = None, blocks: str | None = None,
                 device: str | torch.device = "cpu", threads: int | str | None = None):
        self.threads, self.threads_source = set_threads(threads)
        task.check()
        _check_finite_weights(task)
        if space.fingerprint and model_fingerprint(task.model) != space.fingerprint:
            raise MPSearchError(f"the search space was built for another model than task {task.name!r}'s "
                                f"(fingerprint {space.fingerprint[:19]}...); build the space from this task's model")
        self.task = task
        self.space = space
        self.device = resolve_device(device)
        self._home = next(task.model.parameters()).device
        self.model = task.model.eval().to(self.device)
        self.metric: Metric = get_metric(task.metric, task.has_targets)
        # batches live where the model runs; outputs and targets are scored on the CPU
        self.calibration = [(_to(x, self.device), t) for x, t in task.calibration]
        self.validation = [(_to(x, self.device), t) for x, t in task.validation]
        named = dict(self.model.named_modules(remove_duplicate=False))
        self._params = {n: get_weight(self.model, spec.weight_name) for n, spec in space.layers.items()}
        self._original = {n: p.data for n, p in self._params.items()}
        self._groups = {n: getattr(named[spec.hook_modules[0]], "groups", 1) if takes_inputs(spec) else 1
                        for n, spec in space.layers.items()}
        self._moments: dict[str, torch.Tensor] | None = None
        self.prepared = PreparedCache(default_cache_dir() if cache_dir == "default" else cache_dir)
        # Default memory beside the model: half the model's bytes plus 768 MB, at most a quarter of the free
        # memory; half of it (at most 512 MB) for block outputs, the rest for quantized weights. Block outputs
        # may get more once the plan knows their size (below).
        model_mb = sum(t.numel() * t.element_size() for t in self.model.state_dict().values()) / MB
        extra = min(0.5 * model_mb + 768.0, 0.25 * available_mb())
        default_activations = activation_cache_mb is None
        if default_activations:
            activation_cache_mb = min(512.0, extra / 2)
        if cache_mb is None:
            cache_mb = max(64.0, extra - activation_cache_mb)
        # the compact records take at most half; dequantized weights ready to swap in, the rest
        self._weight_budget = int(cache_mb * MB)
        self.weights = LRUCache(self._weight_budget // 2, size=lambda t: t.numel() * t.element_size(),
                                on_evict=self._recycle)
        self._table_bytes = 0  # embedding tables' working copies and looked-up rows (``_recording_lookups``)
        self._spare: dict[tuple, torch.Tensor] = {}  # evicted dequantized weights, one per shape, written over
        self.recycled = 0  # misses dequantized into a spare
        self.stored = LRUCache(self._weight_budget // 2, size=lambda r: r.nbytes)
        self.prep_s = 0.0  # one-off preparation: inputs captured, weights quantized the first time
        self.requant_s = 0.0  # recomputing weights the bounded cache had evicted (part of evaluations)
        self.prep_log: dict[tuple, float] = {}
        self._memo: dict[tuple[str, Candidate], Evaluation] = {}
        self.n_forward = 0  # forward passes over a split, for tests and benchmarks
        self._current: dict[str, Any] | None = None  # layer -> choice while a candidate runs
        self._hooks = self._install_weight_hooks(named)
        macs = self._count_macs()
        self.sizes = SizeTable(space, macs=macs, activation_bits=activation_bits)
        self._targets = {
            "calibration": self._targets_of(self.calibration),
            "validation": self._targets_of(self.validation),
        }
        # the reference forwards also find the rows each embedding table is read at; a table takes that path
        # while its working copy and its rows at every quantized choice fit in half the weight cache, which
        # then holds that much less
        with self._recording_lookups(named) as looked_up:
            self.reference_outputs = {"calibration": self._forward(self.calibration),
                                      "validation": self._forward(self.validation)}
        self._rows = {}
        for layer, idx in looked_up.items():
            w = self._original[layer]
            n = sum(self.space.setting(c).bits < UNQUANTIZED_BITS for c in self.space.layers[layer].choices)
            need = w.numel() * w.element_size() * (1 + n * idx.numel() / w.shape[0])
            if self._table_bytes + need <= self.weights.cap / 2:
                self._rows[layer] = idx
                self._table_bytes += int(need)
        self._fit_weights()
        # one working copy per table, with the choice whose rows it holds
        self._tables = {layer: (self._original[layer].clone(), None) for layer in self._rows}
        self._row_values: dict[tuple, torch.Tensor] = {}
        for split, out in self.reference_outputs.items():
            if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
                raise TaskError(f"task {task.name!r}: the full-precision model's {split} outputs are not finite "
                                "(NaN or infinity): there is nothing to compare candidates with")
        if not self.metric.uses_targets:
            self._targets = dict(self.reference_outputs)
        self.reference_metric = self._score("calibration", self.reference_outputs["calibration"])
        self.reference_validation_metric = self._score("validation", self.reference_outputs["validation"])
        for name, v in (("calibration", self.reference_metric), ("validation", self.reference_validation_metric)):
            if not _usable(v):
                raise TaskError(f"task {task.name!r}: the metric of the full-precision model on the {name} split "
                                f"is {v}, not a number to rank by")
        self._batch: tuple | None = None  # (split, batch index) while a batch runs
        self._prefix_keys: list[tuple] = []
        self.points_run = self.points_reused = 0  # reuse points computed / answered from the cache
        self.leads_reused = 0  # lead points answered from the cache
        self._keep_outputs: deque = deque(maxlen=32)  # whether each recent evaluation reused something
        self._storing = True
        self._evicted = 0
        self.prefix = self._plan_prefix(blocks if blocks is not None else space.blocks)
        self._points = [named[n] for n in self.prefix.points + self.prefix.lead_points] if self.prefix is not None else []
        self._point_keys = self.prefix.keys + self.prefix.lead_keys if self.prefix is not None else []
        self._lead: Candidate | None = None  # the candidate whose lead points are kept (``prefix_order``)
        self._lead_wanted: frozenset = frozenset()
        self._leading = False
        self._lead_stored: list[tuple] = []
        if default_activations and self.prefix is not None and self.device.type == "cpu":
            # room for the block outputs of KEPT_CANDIDATES candidates, where a quarter of the free memory beyond
            # the weight cache allows: a bigger default only where the model's activations are small beside it
            # (host memory: on an accelerator the cap stays as it was)
            room = 0.25 * available_mb() - cache_mb
            want = KEPT_CANDIDATES * self.prefix.point_bytes * len(self.calibration) / MB
            activation_cache_mb = max(activation_cache_mb, min(want, room))
        self.activations = LRUCache(int(activation_cache_mb * MB), protected_share=ACTIVATION_PROTECTED)

    # ---- forward passes -----------------------------------------------------------------
    @staticmethod
    def _targets_of(batches: list):
        ts = [b[1] for b in batches]
        return None if ts[0] is None else _concat(list(ts))

    def _output(self, out: Any):
        return task_output(self.task, out)

    def _forward(self, batches: list, split: str | None = None):
        outs = []
        # no_grad, not inference_mode: kept block outputs need version counters (``_reusing_prefixes``)
        with torch.no_grad():
            for i, (x, _) in enumerate(batches):
                self._batch = None if split is None else (split, i)
                outs.append(self._output(_call(self.model, _to(x, self.device))))
        self._batch = None
        self.n_forward += 1
        return _concat(outs)

    def _score(self, split: str, outputs) -> float:
        with torch.inference_mode():
            return float(self.metric(outputs, self._targets[split]))

    def _count_macs(self) -> dict[str, int]:
        """Multiply-accumulates per sample spent on each searched weight, from one calibration batch
        (``model.weights.macs_rule``: Linear, Conv, transposed Conv, Conv1D, recurrent and attention weights)."""
        counts: dict[str, int] = {}
        hooks = []
        named = dict(self.model.named_modules(remove_duplicate=False))
        for name, spec in self.space.layers.items():
            for m in spec.hook_modules:
                rule = macs_rule(spec, named[m])
                if rule is None:
                    continue

                def hook(mod, args, kwargs, out, name=name, rule=rule):
                    counts[name] = counts.get(name, 0) + int(rule(args, kwargs, out))

                hooks.append(named[m].register_forward_hook(hook, with_kwargs=True))
        try:
            x = self.calibration[0][0]
            with torch.inference_mode():
                out = self._output(_call(self.model, _to(x, self.device)))
            n = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() > 0 else 1
        finally:
            for h in hooks:
                h.remove()
        return {k: v // max(n, 1) for k, v in counts.items()}

    # ---- weights: swapped in while their layer runs ------------------------------------------
    def _install_weight_hooks(self, named: dict) -> list:
        by_module: dict[str, list[str]] = {}
        for layer, spec in self.space.layers.items():
            for m in spec.hook_modules:
                by_module.setdefault(m, []).append(layer)
        hooks = []
        for m, layers in by_module.items():
            hooks.append(named[m].register_forward_pre_hook(lambda mod, args, layers=layers: self._swap_in(layers)))
            hooks.append(named[m].register_forward_hook(lambda mod, args, out, layers=layers: self._swap_out(layers)))
        return hooks

    def _swap_in(self, layers: list[str]) -> None:
        if self._current is None:
            return
        for layer in layers:
            choice = self._current[layer]
            self._swap(layer, self._table(layer, choice) if layer in self._rows else self.quantized_weight(layer, choice))

    def _swap_out(self, layers: list[str]) -> None:
        if self._current is None:
            return
        for layer in layers:
            self._swap(layer, self._original[layer])

    def input_moments(self) -> dict[str, torch.Tensor]:
        """H of every layer that some choice quantizes with a method that uses its inputs: captured once,
        on the full-precision model (``quantize.inputs``)."""
        if self._moments is None:
            t0 = time.perf_counter()
            wanted = {}
            for name, spec in self.space.layers.items():
                if takes_inputs(spec) and any(self.space.setting(c).method in DATA_METHODS for c in spec.choices):
                    wanted[name] = spec.hook_modules
            # may be first needed while a candidate runs: capture on the model's own weights all the same
            current, batch, self._current, self._batch = self._current, self._batch, None, None
            try:
                self.restore()
                self._moments = input_moments(self.model, self.calibration, wanted, _call) if wanted else {}
            finally:
                self._current, self._batch = current, batch
            self._moments = {k: v.cpu() for k, v in self._moments.items()}
            self.prep_s += time.perf_counter() - t0
        return self._moments

    def quantized_weight(self, layer: str, choice) -> torch.Tensor:
        """The weight the model computes with at ``choice``, in the model's dtype.

        Two bounded tiers: dequantized weights ready to swap in, and below them the stored records
        (one-byte codes and scales, a quarter of float32). The first quantization of a (layer, choice)
        is preparation (``prep_log``); quantizing again one both tiers evicted is ``requant_s``, and
        dequantizing is part of the evaluation that needs it."""
        setting = self.space.setting(choice)
        if setting.bits >= UNQUANTIZED_BITS:
            return self._original[layer]
        key = (layer, choice)
        w = self.weights.get(key)
        if w is not None:
            return w
        w = self._dequantized(layer, choice)
        self.weights.put(key, w)
        return w

    def _dequantized(self, layer: str, choice) -> torch.Tensor:
        """A (layer, quantized choice)'s weight computed from its stored record, which is quantized first if
        neither tier holds it; not cached here."""
        key = (layer, choice)
        setting = self.space.setting(choice)
        stored = self.stored.get(key)
        if stored is None:
            if setting.method in DATA_METHODS:
                self.input_moments()  # timed as preparation of its own
            t0 = time.perf_counter()
            stored = self._quantize(layer, setting)
            self.stored.put(key, stored)
            self._fit_weights()
            dt = time.perf_counter() - t0
            if key in self.prep_log:
                self.requant_s += dt
            else:
                self.prep_log[key] = dt
                self.prep_s += dt
        original, axis = self._original[layer], self.space.layers[layer].axis
        spare = self._spare.pop((original.shape, original.dtype), None) if axis == 0 else None
        w = stored.dequantize(original.dtype, out=spare)
        self.recycled += spare is not None
        if not isinstance(stored, HalfWeight):  # integer and GGML records hold the output channels first
            w = from_rows(w, axis)
        return w.to(self.device)

    def _table(self, layer: str, choice) -> torch.Tensor:
        """An embedding table for the forward at ``choice`` with only the rows the splits look up quantized: a
        lookup reads nothing else, so the scores are those of the whole quantized table, and a candidate pays
        for copying a few rows instead of dequantizing the table (MiniLM: 1,409 of 30,522 rows). The other rows
        of the one working copy per table hold the full-precision weights and are never read."""
        if self.space.setting(choice).bits >= UNQUANTIZED_BITS:
            return self._original[layer]
        table, current = self._tables[layer]
        if current != choice:
            rows = self._table_rows(layer, choice)
            table.index_copy_(0, self._rows[layer], rows)
            self._tables[layer] = (table, choice)
        return table

    def _table_rows(self, layer: str, choice) -> torch.Tensor:
        """A table's looked-up rows at a quantized choice: kept for the evaluator's life (their memory is set
        aside from the weight cache's), since a miss would dequantize the whole table."""
        key = (layer, choice)
        rows = self._row_values.get(key)
        if rows is None:
            full = self.weights.get(key)
            rows = (full if full is not None else self._dequantized(layer, choice)).index_select(0, self._rows[layer])
            self._row_values[key] = rows
        return rows

    @contextlib.contextmanager
    def _recording_lookups(self, named: dict):
        """While the block runs, records the rows each searched embedding table is read at; yields a dict that
        then holds them for the tables that only their own ``nn.Embedding`` reads (not tied to an output layer,
        not renormalized in place) and where those rows are at most ``LOOKUP_ROWS_SHARE`` of the table."""
        counts = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        tables = {}
        for layer, spec in self.space.layers.items():
            mods = [named[m] for m in spec.hook_modules]
            if len(mods) == 1 and type(mods[0]) is torch.nn.Embedding and mods[0].max_norm is None and \
                    counts[id(self._params[layer])] == 1 and spec.weight_name.endswith("weight"):
                tables[layer] = mods[0]
        seen: dict[str, list] = {layer: [] for layer in tables}

        def looked_up(mod, args, kwargs, layer):
            ids = args[0] if args else kwargs.get("input")
            seen[layer].append(torch.unique(ids) if isinstance(ids, torch.Tensor) else None)

        hooks = [m.register_forward_pre_hook(lambda mod, a, k, layer=layer: looked_up(mod, a, k, layer), with_kwargs=True)
                 for layer, m in tables.items()]
        rows: dict[str, torch.Tensor] = {}
        try:
            yield rows
        finally:
            for h in hooks:
                h.remove()
        for layer, parts in seen.items():
            if not parts or any(p is None for p in parts):
                continue
            idx = torch.unique(torch.cat([p.reshape(-1).long() for p in parts]))
            if idx.numel() <= LOOKUP_ROWS_SHARE * self._original[layer].shape[0]:
                rows[layer] = idx.to(self.device)

    def _fit_weights(self) -> None:
        """Dequantized weights get what the records and the embedding tables leave of the weight budget."""
        self.weights.resize(self._weight_budget - self._table_bytes - self.stored.used)

    def _recycle(self, w: torch.Tensor) -> None:
        """Keep a dequantized weight the cache let go, to write the next miss of its shape into: a random
        candidate then costs the arithmetic of dequantizing, not fresh memory (page faults, heap trims).
        Only one nobody holds: no Python reference but the eviction's, and no other tensor on its memory (a
        view, a ``state_dict()`` entry, a parameter's data after ``apply``)."""
        if w.device.type != "cpu" or w.device != self.device or not w.is_contiguous() or _STORAGE_USES is None:
            return
        if sys.getrefcount(w) > _EVICTED_REFS or _STORAGE_USES(w.untyped_storage()._cdata) > _UNSHARED_STORAGE:
            return
        self._spare.setdefault((w.shape, w.dtype), w)

    def _quantize(self, layer: str, setting) -> "QuantizedWeight | HalfWeight":
        """A layer's stored record at an integer or float16 setting; quantized in float32 whatever the model's
        dtype. Methods that use inputs (gptq, gradient) read their H, and the disk cache, on the way."""
        w = self._original[layer].detach().to("cpu", torch.float32)
        if setting.bits == FLOAT16_BITS:
            return HalfWeight(w.to(torch.float16))
        hessian = self.input_moments().get(layer) if setting.method in DATA_METHODS else None
        w = to_rows(w, self.space.layers[layer].axis)
        with torch.no_grad():
            return quantize(w, setting, self.space.quantizer, hessian, self._groups[layer], self.prepared).compact()

    def layer_error(self, layer: str, choice) -> dict[str, float]:
        w, q = self._original[layer], self.quantized_weight(layer, choice)
        return {"mse": mse(w, q), "sqnr_db": sqnr_db(w, q)}

    def prepare(self, progress: bool = False) -> None:
        """Quantize every (layer, choice) of the space now instead of when a candidate first needs it."""
        work = [(n, c) for d in self.space.decisions for n in d.layers for c in d.choices]
        work += list(self.space.pinned.items())
        if progress:
            from tqdm.auto import tqdm

            work = tqdm(work, desc="preparing quantized weights", unit="weight", leave=False)
        for n, c in work:
            if n in self._rows and self.space.setting(c).bits < UNQUANTIZED_BITS:
                self._table_rows(n, c)
            else:
                self.quantized_weight(n, c)

    def apply(self, candidate: Sequence) -> None:
        """Put all the candidate's weights in the model at once (for using the model outside ``evaluate``);
        ``restore()`` takes them out."""
        for layer, choice in self.space.layer_choices(candidate).items():
            self._swap(layer, self.quantized_weight(layer, choice))

    def restore(self) -> None:
        for layer in self._params:
            self._swap(layer, self._original[layer])

    def close(self) -> None:
        """The model as it was: its own weights, no hooks, back where it lived."""
        self.restore()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.weights.clear()
        self._tables, self._rows, self._row_values = {}, {}, {}
        self._spare.clear()
        self.stored.clear()
        self.activations.clear()
        self.model.to(self._home)

    def _swap(self, layer: str, weight: torch.Tensor) -> None:
        p = self._params[layer]
        if p.data_ptr() != weight.data_ptr():
            p.data = weight

    # ---- prefixes: block outputs kept and reused ---------------------------------------------
    def _plan_prefix(self, pattern: str | None) -> ReusePlan | None:
        if pattern == "":
            return None
        blocks = find_blocks(self.model, list(self.space.layers), pattern)
        if len(blocks) < 2:
            return None
        decisions = [tuple(x for n in d.layers for x in self.space.layers[n].hook_modules) for d in self.space.decisions]
        work = {m: float(self.sizes.macs.get(n, 0)) for n, spec in self.space.layers.items() for m in spec.hook_modules}
        plan = ReusePlan(self.model, blocks, decisions, lambda: self._forward(self.calibration[:1]), work)
        return plan if plan.points else None

    @contextlib.contextmanager
    def _reusing_prefixes(self):
        """Forwards of the reuse points that look their output up first, only while one evaluation runs, so
        the model outside ``evaluate`` (copies of it included) is the user's own."""
        if self.prefix is None:
            yield
            return
        saved = []
        n_points = len(self.prefix.points)
        for j, module in enumerate(self._points):
            own = module.__dict__.get("forward")
            orig = module.forward

            def forward(*args, _orig=orig, _j=j, **kwargs):
                if self._batch is None or self._current is None:
                    return _orig(*args, **kwargs)
                key = (self._batch, _j, self._prefix_keys[_j])
                hit = self.activations.get(key, valid=_unchanged)
                if hit is not None:
                    self.points_reused += 1
                    for i in self.prefix.inside[_j]:  # kept as fresh as the output that stood in for them
                        self.activations.touch((self._batch, i, self._prefix_keys[i]))
                    return hit[0]
                self.points_run += 1
                out = _orig(*args, **kwargs)
                if self._storing:
                    self.activations.put(key, (out, tensor_versions(out)))
                return out

            def lead_forward(*args, _orig=orig, _j=j, **kwargs):
                # kept only while the batch's lead runs, and only where a later candidate of the batch can use it
                if self._batch is None or self._current is None or _j not in self._lead_wanted:
                    return _orig(*args, **kwargs)
                key = (self._batch, _j, self._prefix_keys[_j])
                if not self._leading:  # serves this batch only: a hit does not join the protected segment
                    hit = self.activations.get(key, valid=_unchanged, promote=False)
                    if hit is not None:
                        self.leads_reused += 1
                        return hit[0]
                    return _orig(*args, **kwargs)
                out = _orig(*args, **kwargs)
                self.activations.put(key, (out, tensor_versions(out)))
                self._lead_stored.append(key)
                return out

            module.forward = forward if j < n_points else lead_forward
            saved.append((module, own))
        try:
            yield
        finally:
            for module, own in reversed(saved):  # an aliased module gets its own forward back last
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    def prefix_order(self, candidates: Sequence[Candidate]) -> list[int]:
        """Indices of ``candidates`` in the order that reuses the most: the batch's common candidate (its most
        frequent choice per decision) first, then the others by how late in the forward they first depart from
        it, latest first. Each one then finds the common prefix it needs freshly used, while the outputs it
        passes over, which no later candidate in the batch needs, are the ones the bounded cache drops first.

        It also makes the first candidate still to compute the batch's lead, whose lead points the others use
        (the last batch's lead outputs are dropped): call it once per batch, then evaluate in its order."""
        for key in self._lead_stored:  # the last batch's lead outputs: no later candidate shares that lead
            self.activations.drop(key)
        self._lead_stored, self._lead, self._lead_wanted = [], None, frozenset()
        if self.prefix is None or len(candidates) < 2:
            return list(range(len(candidates)))
        try:
            checked = [self.space.check_candidate(c) for c in candidates]
        except MPSearchError:  # evaluate says what is wrong with it, after the valid ones before it are scored
            return list(range(len(candidates)))
        order = self.prefix.order
        common = [Counter(c[d] for c in checked).most_common(1)[0][0] for d in range(len(checked[0]))]

        def departs(c, base) -> int:
            return next((k for k, d in enumerate(order) if c[d] != base[d]), len(order))

        ranked = sorted(range(len(checked)), key=lambda i: (-departs(checked[i], common), i))
        # the lead: the first candidate to compute; its lead points are kept where a later one in the batch can
        # use them, the narrowest first, in at most LEAD_SHARE of the activation cache
        fresh = [checked[i] for i in ranked if not self.is_memoized(checked[i])]
        if fresh and self.prefix.lead_points:
            lead, offsets = fresh[0], [departs(c, fresh[0]) for c in fresh[1:]]
            useful = [j for j, (a, b) in enumerate(self.prefix.lead_span) if any(a <= k < b for k in offsets)]
            room = LEAD_SHARE * self.activations.cap / max(1, len(self.calibration))
            wanted = set()
            for j in sorted(useful, key=lambda j: self.prefix.lead_bytes[j]):
                room -= self.prefix.lead_bytes[j]
                if room < 0:
                    break
                wanted.add(len(self.prefix.points) + j)
            if wanted:
                self._lead, self._lead_wanted = lead, frozenset(wanted)
        return ranked

    # ---- scoring ---------------------------------------------------------------------------
    def evaluate(self, candidate: Sequence, split: str = "calibration") -> Evaluation:
        cand = self.space.check_candidate(candidate)
        key = (split, cand)
        hit = self._memo.get(key)
        if hit is not None:
            return replace(hit, cached=True)
        prep0, reused0 = self.prep_s, self.points_reused + self.leads_reused
        # a strategy whose candidates share no prefix (random, pso) pays for keeping outputs and never gains:
        # after 32 evaluations without a hit, only every 8th evaluation keeps its outputs, until one hits
        self._storing = any(self._keep_outputs) or len(self._keep_outputs) < self._keep_outputs.maxlen or \
            len(self._memo) % 8 == 0
        self._leading = split == "calibration" and cand == self._lead
        t0 = time.perf_counter()
        error = None
        self.restore()
        self._current = self.space.layer_choices(cand)
        if self.prefix is not None:
            self._prefix_keys = [tuple(cand[d] for d in k) for k in self._point_keys]
        try:
            batches = self.calibration if split == "calibration" else self.validation
            with self._reusing_prefixes():
                outputs = self._forward(batches, split)
            value = self._score(split, outputs)
            if not _usable(value):
                error = f"the metric is {value}, not a number to rank by"
        except Exception as exc:  # the user's model or metric failed on this candidate: a failed trial, not a crash
            value, error = math.nan, f"{type(exc).__name__}: {exc}".strip()[:2000]
        finally:
            self._current = None
            self._leading = False
            self.restore()
        evicted = self.weights.evictions + self.stored.evictions
        if _TRIM is not None and evicted > self._evicted:  # evicted weights leave holes; block outputs are reused
            _TRIM(0)  # (trimming only once 64 MB were freed kept up to 320 MB more on the 0.1B stacks)
        self._evicted = evicted
        self._keep_outputs.append(self.points_reused + self.leads_reused > reused0)
        prep = self.prep_s - prep0
        wall = time.perf_counter() - t0 - prep  # preparation is one-off work, reported apart
        size = self.sizes.size(cand)
        ev = Evaluation(cand, size.size_bytes, size.avg_bits, value if error is None else math.nan, wall, error=error,
                        prep_s=prep)
        self._memo[key] = ev
        return ev

    def validation_metric(self, candidate: Sequence) -> float:
        """Quality on the validation split: what a chosen plan is reported with (NaN when it failed)."""
        return self.evaluate(candidate, split="validation").metric

    def score_model(self, split: str = "validation") -> float:
        """Quality of the model as it stands now (e.g. after a plan was applied to it)."""
        batches = self.calibration if split == "calibration" else self.validation
        return self._score(split, self._forward(batches))

    def is_memoized(self, candidate: Sequence, split: str = "calibration") -> bool:
        return (split, tuple(as_choice(b) for b in candidate)) in self._memo

    def remember(self, ev: Evaluation, split: str = "calibration") -> None:
        """Seed the memo with a stored evaluation (resume), so it is never computed again."""
        self._memo[(split, tuple(ev.candidate))] = ev

    def memory(self) -> dict:
        """Peak resident memory, the two caches and what prefix reuse saved, for summaries and benchmarks."""
        return {"peak_rss_mb": round(peak_rss_mb(), 1), "device": str(self.device), "threads": self.threads,
                "model_mb": round(sum(t.numel() * t.element_size() for t in self.model.state_dict().values()) / MB, 1),
                "weight_cache_mb": round((self.weights.used + self.stored.used + self._table_bytes) / MB, 1),
                "weight_cache_cap_mb": round(self._weight_budget / MB, 1),
                "activation_cache_mb": round(self.activations.used / MB, 1),
                "activation_cache_cap_mb": round(self.activations.cap / MB, 1),
                "reuse_points": len(self.prefix.points) if self.prefix is not None else 0,
                "lead_points": len(self.prefix.lead_points) if self.prefix is not None else 0,
                "points_reused": self.points_reused, "leads_reused": self.leads_reused,
                **({"peak_device_mb": round(torch.cuda.max_memory_allocated(self.device) / MB, 1)}
                   if self.device.type == "cuda" else {})}

    @property
    def full_precision_bytes(self) -> int:
        return self.sizes.full_precision_bytes

    @property
    def metric_name(self) -> str:
        return self.metric.name

    @property
    def task_name(self) -> str:
        return self.task.name

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
