"""Where the model runs and with how many threads.

torch's default intra-op threads equal the cores it sees, busy or not; on a loaded 2-core machine
that oversubscribes (a digits forward measured 1.15 s against 0.03 s on one thread). The default
here is the cores actually free: the cores this process may use minus the load average.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import MPSearchError

if TYPE_CHECKING:
    import torch


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cores() -> int:
    """Cores not already busy (cores minus the 1-minute load average), at least one."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(usable_cores(), int(usable_cores() - load + 0.5)))


def set_threads(threads: int | str | None = None) -> tuple[int, str]:
    """torch's intra-op threads and where the number came from: ``None`` leaves torch's setting alone,
    an integer sets it, ``"auto"`` sets OMP_NUM_THREADS when given, else the cores free now."""
    import torch

    if threads is None:
        return torch.get_num_threads(), "torch's setting"
    if threads == "auto":
        env = os.environ.get("OMP_NUM_THREADS", "")
        if env.isdigit() and int(env) > 0:
            n, why = int(env), "OMP_NUM_THREADS"
        else:
            n, why = free_cores(), f"free cores of {usable_cores()}"
    elif isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        n, why = threads, "asked"
    else:
        raise MPSearchError(f"threads must be a positive integer or 'auto', got {threads!r}")
    torch.set_num_threads(n)
    return n, why


def resolve_device(device) -> "torch.device":
    """A torch device that exists here, or a one-line error naming what does."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MPSearchError(f"unknown device {device!r}; use cpu or cuda (cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MPSearchError(f"device {device!r}: this torch build or machine has no CUDA device "
                                f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MPSearchError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps"):
        raise MPSearchError(f"device {device!r} is not supported; use cpu or cuda")
    return dev
