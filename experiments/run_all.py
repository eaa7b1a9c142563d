"""Regenerate everything under results/: `make results` (a few hours on 2 cores: exp_methods and bench_scale's
1.2B-parameter models take most of it).

Each experiment also runs alone: python experiments/exp_digits.py, exp_minilm.py, exp_tasks.py, exp_llamacpp.py, exp_proxy.py,
exp_cost.py, exp_methods.py, bench_methods.py, bench_scale.py.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENTS = ["exp_digits.py", "exp_proxy.py", "exp_minilm.py", "exp_tasks.py", "exp_llamacpp.py", "exp_cost.py", "exp_methods.py", "bench_methods.py", "bench_scale.py"]

if __name__ == "__main__":
    t0 = time.perf_counter()
    for name in EXPERIMENTS:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], check=True, cwd=HERE)
        print(f"== {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print(f"all results regenerated in {time.perf_counter() - t0:.0f} s")
