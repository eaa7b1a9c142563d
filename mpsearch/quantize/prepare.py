"""One layer at one setting, quantized once, and kept on disk when that was costly.

``prepare`` dispatches a setting to its method. Methods that use the calibration inputs (gptq,
gradient) cost seconds per layer, so their results are cached on disk, keyed by a hash of the
weight's values, the inputs' second moment, the setting and the storage layout: a second search
on the same model and data pays nothing, and any change to one of them misses the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..core.qconfig import DATA_METHODS, FLOAT16_BITS, UNQUANTIZED_BITS, QuantizerConfig, Setting
from .gguf_weight import GGMLWeight
from .grids import QuantizedWeight
from .methods import quantize_setting

CACHE_VERSION = "mpsearch-prepared-2"  # change it when a method's arithmetic changes
CACHE_ENV = "MPSEARCH_CACHE_DIR"


def default_cache_dir() -> Path | None:
    """``$MPSEARCH_CACHE_DIR`` (empty: no disk cache), else ~/.cache/mpsearch/prepared."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return Path(env) if env else None
    return Path.home() / ".cache" / "mpsearch" / "prepared"


class PreparedCache:
    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.hits = 0

    def key(self, w: torch.Tensor, setting: Setting, cfg: QuantizerConfig, hessian: torch.Tensor | None) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([CACHE_VERSION, setting.label(), cfg.to_dict(), list(w.shape)]).encode())
        h.update(w.detach().float().contiguous().numpy().tobytes())
        if hessian is not None:
            h.update(hessian.contiguous().numpy().tobytes())
        return h.hexdigest()

    def load(self, key: str) -> QuantizedWeight | None:
        if self.root is None:
            return None
        path = self.root / key[:2] / f"{key}.pt"
        try:
            d = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, ValueError):
            return None
        self.hits += 1
        return QuantizedWeight(int(d["bits"]), tuple(d["shape"]), d["codes"].to(torch.int32), d["scales"].float(),
                               None if d["zero_points"] is None else d["zero_points"].to(torch.int32),
                               d["group_size"], d["mask"])

    def save(self, key: str, q: QuantizedWeight) -> None:
        if self.root is None:
            return
        path = self.root / key[:2] / f"{key}.pt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            torch.save({"bits": q.bits, "shape": list(q.shape), "codes": q.codes.to(torch.int16),
                        "scales": q.scales.to(torch.float16), "group_size": q.group_size,
                        "zero_points": None if q.zero_points is None else q.zero_points.to(torch.int16),
                        "mask": q.mask}, tmp)
            os.replace(tmp, path)
        except OSError:  # a cache that cannot be written is only slower
            pass


def prepare(w: torch.Tensor, setting: Setting, cfg: QuantizerConfig, hessian: torch.Tensor | None = None,
            groups: int = 1, cache: PreparedCache | None = None) -> QuantizedWeight | GGMLWeight:
    """The ``QuantizedWeight`` of ``w`` at an integer ``setting`` (a ``GGMLWeight`` at a GGML type); costly
    methods go through ``cache``."""
    if setting.bits >= FLOAT16_BITS or setting.bits >= UNQUANTIZED_BITS:
        raise ValueError(f"prepare() quantizes to integers; {setting.bits} bits is a float width")
    if setting.ggml:
        return GGMLWeight.quantize(w, setting.method)
    costly = setting.method in DATA_METHODS and hessian is not None and cache is not None
    key = cache.key(w, setting, cfg, hessian) if costly else None
    if key is not None:
        hit = cache.load(key)
        if hit is not None:
            return hit
    q = quantize_setting(w, setting, cfg, hessian, groups)
    if key is not None:
        cache.save(key, q)
    return q
