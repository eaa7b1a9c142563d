"""Shared pieces of the experiments: environment header, runs on a shared evaluator, table writing."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results"

import pandas as pd  # noqa: E402

from mpsearch import optimize  # noqa: E402
from mpsearch.core import Budget  # noqa: E402
from mpsearch.evaluator import Evaluator  # noqa: E402
from mpsearch.model import space_for  # noqa: E402
from mpsearch.tasks import load_task  # noqa: E402

STRATEGIES = ["greedy", "pso", "bayes", "ilp", "random"]


def environment() -> str:
    import numpy
    import optuna
    import pyswarms
    import scipy
    import torch

    import mpsearch

    cpu = platform.processor() or platform.machine()
    return (f"machine: {platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}; python {platform.python_version()}, mpsearch {mpsearch.__version__}, "
            f"torch {torch.__version__}, numpy {numpy.__version__}, optuna {optuna.__version__}, "
            f"pyswarms {pyswarms.__version__}, scipy {scipy.__version__}")


def setup(model: str, search_space: str | None = None):
    task = load_task(model)
    space = space_for(task, search_space)
    return task, space, Evaluator(task, space)


def run(evaluator, strategy: str, seed: int, max_evals: int, budget: Budget | None = None, **options):
    """One ``optimize`` run on the shared evaluator (in-memory storage: these runs are regenerated, not resumed)."""
    return optimize(evaluator.task, evaluator=evaluator, strategy=strategy, options=options, seed=seed,
                    max_evals=max_evals, budget=budget)


def write_table(df: pd.DataFrame, out_dir: Path, name: str, title: str, notes: str, wall_s: float) -> None:
    """CSV plus a Markdown table that states the machine, the library versions and the wall time."""
    from mpsearch.report import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{name}.csv", index=False)
    text = (f"# {title}\n\n{notes}\n\n{markdown_table(df)}\n"
            f"_{environment()}; wall time of this experiment {wall_s:.0f} s; "
            f"regenerate with `python experiments/{Path(sys.argv[0]).name}`._\n")
    (out_dir / f"{name}.md").write_text(text)


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
