"""Reading the user's files and writing ours: one clear error for an unreadable input, and outputs
written to a temporary name and renamed, so a crash never leaves half a file."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .errors import MPSearchError


def read_text(path: str | Path, what: str, error: type[MPSearchError] = MPSearchError) -> str:
    """The file's text; ``error`` with one line naming ``what`` and the file when it cannot be read as text."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not a text file (not UTF-8)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` next to ``path`` under a temporary name, then rename it over ``path``."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def finite_json(obj):
    """``obj`` with every non-finite float replaced by None: strict JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj) -> str:
    """Strict JSON (non-finite numbers written as null), indented, with a final newline."""
    return json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n"
