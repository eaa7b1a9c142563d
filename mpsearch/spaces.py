"""Finding and loading search-space files for a task."""
from __future__ import annotations

from pathlib import Path

from .errors import SpaceError
from .space import SearchSpace
from .task import Task

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


def resolve_space_file(name: str | Path) -> Path:
    """A path as given, or a name looked up in ./search_spaces and the project's search_spaces/."""
    p = Path(name)
    if p.is_file():
        return p
    for base in (Path.cwd() / "search_spaces", SPACES_DIR):
        for cand in (base / p, base / f"{p}.yaml"):
            if cand.is_file():
                return cand
    raise SpaceError(f"search space {str(name)!r} not found (looked in ./search_spaces and {SPACES_DIR})")


def space_for(task: Task, search_space: str | Path | None = None) -> SearchSpace:
    """The space from ``search_space``, else the task's own file, else the documented default."""
    name = search_space or task.search_space or "default.yaml"
    return SearchSpace.from_yaml(resolve_space_file(name), task.model, model_name=task.name)
