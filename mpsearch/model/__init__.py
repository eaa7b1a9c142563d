"""The torch side of the search space: walking a module into a ``SearchSpace`` and reading space files."""
from .space_files import load_space_file, resolve_space_file, space_for
from .walk import KINDS, build_space, model_fingerprint, space_from_spec

__all__ = ["KINDS", "build_space", "load_space_file", "model_fingerprint", "resolve_space_file", "space_for",
           "space_from_spec"]
