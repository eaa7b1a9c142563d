"""The package works once installed: a wheel in a fresh virtualenv runs the main job from an unrelated folder."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mpsearch").rglob("__init__.py")}
    assert found | {"mpsearch.search_spaces"} == listed


def test_wheel_in_a_fresh_venv_runs_a_search(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next(wheels.glob("mpsearch-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # the project's installed dependencies, reused as a plain path: the source tree's editable install
    # (a .pth finder in that folder) is not processed, so mpsearch comes from the wheel alone
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    venv_site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                             text=True).strip())
    (venv_site / "project_deps.pth").write_text("\n".join(deps) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    where = subprocess.check_output([str(py), "-c", "import mpsearch, mpsearch.model.space_files as f; "
                                     "print(mpsearch.__file__); print(f.shipped_dir())"], text=True, cwd=work, env=env)
    module_file, spaces = where.split()
    assert Path(module_file).parent == venv_site / "mpsearch", where
    assert Path(spaces) == venv_site / "mpsearch" / "search_spaces", where
    r = subprocess.run([str(venv / "bin" / "mpsearch"), "search", "--model", "digits", "--strategy", "greedy",
                        "--max-evals", "25", "--avg-bits", "3", "--out", "run", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=work, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["best"]["avg_bits"] <= 3.0 + 1e-9 and (work / "run" / "plan.json").is_file()
