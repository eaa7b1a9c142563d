"""Per-layer tables of a plan: name, kind, parameters, bits, bytes and measured sensitivity."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..plan import QuantizationPlan, layer_table
from ..report import fmt_metric
from . import ExportResult, file_size, register


def plan_frame(plan: QuantizationPlan) -> pd.DataFrame:
    df = pd.DataFrame(layer_table(plan), columns=["layer", "kind", "params", "bits", "setting", "bytes", "sensitivity"])
    df["share_of_size"] = df["bytes"] / max(int(plan.predicted["size_bytes"]), 1)
    return df


@register("csv", needs_model=False, suffix=".csv", description="per-layer table, CSV", formats=("integer", "ggml"))
def to_csv(plan: QuantizationPlan, out: Path, task=None) -> ExportResult:
    plan_frame(plan).to_csv(out, index=False)
    return ExportResult("csv", [out], file_size([out]))


@register("markdown", needs_model=False, suffix=".md", description="per-layer table, Markdown",
          formats=("integer", "ggml"))
def to_markdown(plan: QuantizationPlan, out: Path, task=None) -> ExportResult:
    df = plan_frame(plan)
    p = plan.predicted
    head = (f"# Quantization plan for {plan.model.get('name')}\n\n"
            f"{p['size_bytes']:,} bytes, {fmt_metric(p.get('avg_bits'), 3)} average bits, "
            f"{p['metric_name']} {fmt_metric(p['metric'])} (full precision {fmt_metric(p.get('reference_metric'))})\n\n")
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = []
        for c, v in zip(cols, row):
            if c == "share_of_size":
                cells.append(f"{v:.1%}")
            elif c == "sensitivity":
                cells.append("" if v is None or v != v else f"{v:.4g}")
            elif isinstance(v, int):
                cells.append(f"{v:,}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    out.write_text(head + "\n".join(lines) + "\n")
    return ExportResult("markdown", [out], file_size([out]))
