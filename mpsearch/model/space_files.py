"""Search-space files: finding them (shipped with the package, or the user's) and reading them."""
from __future__ import annotations

from pathlib import Path

from ..core.space import SearchSpace
from ..errors import SpaceError
from ..files import read_text

# The repository's search_spaces/ ships inside the wheel as mpsearch/search_spaces (pyproject maps the
# folder there); a source checkout, installed editable or not, reads the folder at its top.
_INSTALLED_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
_CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


def shipped_dir() -> Path:
    return _INSTALLED_DIR if _INSTALLED_DIR.is_dir() else _CHECKOUT_DIR


def resolve_space_file(name: str | Path) -> Path:
    """A path as given, or a name looked up in ./search_spaces and in the shipped spaces."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = shipped_dir()
    for base in (Path.cwd() / "search_spaces", shipped):
        for cand in (base / p, base / f"{p}.yaml"):
            if cand.is_file():
                return cand
    raise SpaceError(f"search space {str(name)!r} not found (looked in ./search_spaces and {shipped})")


def load_space_file(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    text = read_text(p, "search space", SpaceError)
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpaceError(f"malformed YAML in {p}{where}: {getattr(exc, 'problem', None) or exc}") from None
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise SpaceError(f"{p}: a search space file must be a YAML mapping")
    return spec


def space_for(task, search_space: str | Path | dict | None = None) -> SearchSpace:
    """The space from ``search_space`` (a file, a name or a parsed mapping), else the task's own, else the default."""
    from .walk import space_from_spec

    if isinstance(search_space, dict):
        return space_from_spec(search_space, task.model, model_name=task.name)
    path = resolve_space_file(search_space or task.search_space or "default.yaml")
    return space_from_spec(load_space_file(path), task.model, model_name=task.name, source=str(path))
