"""Reading the user's files and writing ours: one clear error for an unreadable input, and outputs
written to a temporary name and renamed, so a crash never leaves half a file."""
from __future__ import annotations

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
