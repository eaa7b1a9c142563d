"""(methods) One-off preparation cost of each quantizer method on MiniLM, cold and from the disk cache.

For each method at one bit-width (4 bits, per channel): the time to quantize every searched layer of
MiniLM once (inputs captured once for gptq and gradient, included), with an empty disk cache, then
again in a new evaluator reading the disk cache the first one filled. Evaluations pay none of this:
it is reported apart as preparation.

    python experiments/bench_methods.py [--bits 4] [--methods rtn,mse-clip,gptq,gradient] [--json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import RESULTS, environment
from mpsearch.evaluator import Evaluator
from mpsearch.model import space_for
from mpsearch.tasks import load_task


def prepare_s(task, spec: dict, cache_dir) -> tuple[float, float, float]:
    """(wall seconds to prepare every (layer, setting), of which capturing inputs, slowest layer)."""
    space = space_for(task, spec)
    with Evaluator(task, space, cache_dir=cache_dir) as ev:
        t0 = time.perf_counter()
        ev.prepare()
        wall = time.perf_counter() - t0
        capture = ev.prep_s - sum(ev.prep_log.values())
        return wall, capture, max(ev.prep_log.values(), default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--methods", default="rtn,mse-clip,gptq,gradient")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    task = load_task("minilm")
    rows = []
    for method in a.methods.split(","):
        spec = {"choices": [a.bits], "types": ["Linear", "Embedding"], "methods": [method]}
        with tempfile.TemporaryDirectory() as d:
            cold, capture, slowest = prepare_s(task, spec, d)
            warm, _, _ = prepare_s(task, spec, d)
        rows.append({"model": "minilm", "bits": a.bits, "method": method, "cold_s": round(cold, 2),
                     "of_which_input_capture_s": round(capture, 2), "slowest_layer_s": round(slowest, 3),
                     "from_disk_cache_s": round(warm, 2)})
        print(json.dumps(rows[-1]), flush=True)
    out = RESULTS / "methods" / "preparation.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    from mpsearch.report import markdown_table
    import pandas as pd

    out.write_text("# One-off preparation per method (MiniLM, every searched layer at one bit-width)\n\n"
                   "cold_s: an empty disk cache; from_disk_cache_s: a second evaluator on the same model reading "
                   "the cache the first one wrote. Evaluations never include this time.\n\n"
                   f"{markdown_table(pd.DataFrame(rows))}\n_{environment()}; regenerate with "
                   "`python experiments/bench_methods.py`._\n")
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
