"""Built-in tasks and the loader for user tasks (``module:function`` or ``path.py:function``)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import TaskError
from .task import Task


# name -> the module (in this package) whose load_task() builds it; imported only when asked for
BUILTIN: dict[str, str] = {"digits": "digits", "minilm": "minilm", "speech": "speech", "video": "video"}
DEFAULT = "digits"


def _resolve(spec: str):
    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise TaskError(f"unknown model {spec!r}: use a built-in name ({', '.join(BUILTIN)}), hf:DIR, module:function "
                        "or path/to/file.py:function")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise TaskError(f"model file {target} does not exist")
        name = f"_mpsearch_user_{abs(hash(str(path.resolve())))}"
        modspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(modspec)
        sys.modules[name] = module
        try:
            modspec.loader.exec_module(module)
        except Exception as exc:  # the user's file failed to import: say why in one line
            raise TaskError(f"cannot import {target}: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise TaskError(f"cannot import module {target!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise TaskError(f"{target} has no function {func!r}")
    return fn


def load_task(spec: str, text: str | None = None) -> Task:
    """A built-in task by name, a local Hugging Face directory (``hf:PATH``, calibrated on ``text``),
    or the Task returned by a user's function."""
    if not isinstance(spec, str) or not spec:
        raise TaskError(f"a model spec must be a non-empty string, got {spec!r}")
    if spec.startswith("hf:"):
        from .causal_lm import load_hf_task

        return load_hf_task(spec[3:], text).check()
    if text is not None:
        raise TaskError("a text file calibrates hf: models only; a built-in or user task brings its own data")
    if spec in BUILTIN:
        return importlib.import_module(f"{__name__}.{BUILTIN[spec]}").load_task().check()
    fn = _resolve(spec)
    try:
        task = fn()
    except TaskError:
        raise
    except Exception as exc:
        raise TaskError(f"{spec} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(task, Task):
        raise TaskError(f"{spec} must return mpsearch.Task, got {type(task).__name__}")
    if task.name == "custom":
        task.name = spec
    return task.check()
