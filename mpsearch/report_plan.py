"""The plan figure: bits per layer along the depth of the network, with each layer's share of the size.

matplotlib is imported, and the Agg backend chosen, only when a figure is drawn.
"""
from __future__ import annotations

import re
from pathlib import Path

from .plan import QuantizationPlan, layer_table
from .report import fmt_metric, save_figure

# long Hugging Face / torch name parts -> short labels
_ABBREV = {
    "attention": "attn", "self_attn": "attn", "self": "", "query": "q", "key": "k", "value": "v",
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "output": "out", "dense": "",
    "intermediate": "up", "embeddings": "emb", "word_embeddings": "word", "position_embeddings": "pos",
    "token_type_embeddings": "type", "features": "f", "classifier": "cls", "encoder": "", "decoder": "dec", "bert": "", "model": "", "mlp": "mlp",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}
_BLOCKS = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block|blk)\.(\d+)(?=\.|$)")


def short_names(names: list[str]) -> list[str]:
    """Readable, still distinct labels: common leading parts dropped, block indices as ``L3``, parts abbreviated."""
    if not names:
        return []
    parts = [n.split(".") for n in names]
    common = 0
    while (len(names) > 1 and all(len(p) > common + 1 for p in parts)
           and len({p[common] for p in parts}) == 1):
        common += 1
    out = []
    for name, p in zip(names, parts):
        s = _BLOCKS.sub(lambda m: f".L{m.group(1)}", ".".join(p[common:])).lstrip(".")
        pieces = [_ABBREV.get(x, x) for x in s.split(".")]
        out.append(".".join(x for x in pieces if x) or name)
    if len(set(out)) != len(out):  # abbreviation collided: fall back to the unabbreviated tails
        out = [".".join(p[common:]) for p in parts]
    return out


def plot_plan(plan: QuantizationPlan, path: str | Path) -> Path:
    """Bars of bits per layer in plan order; a line on the right axis gives each layer's share of the plan's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_table(plan)
    path = Path(path)
    n = len(rows)
    total = max(int(plan.predicted.get("size_bytes", 0)), 1)
    bits = [r["bits"] for r in rows]
    share = [100.0 * r["bytes"] / total for r in rows]
    labels = short_names([r["layer"] for r in rows])

    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * n + 2.0), 4.8), layout="constrained")
    x = list(range(n))
    ax.bar(x, bits, width=0.8, label="bits", color="tab:blue", alpha=0.85, edgecolor="black", linewidth=0.4, zorder=2)
    used = sorted(set(bits))
    ax.set_yticks(used)
    ax.set_ylim(0, (max(used) if used else 8) + 1)
    ax.set_ylabel("bits")
    ax.set_xlabel("layer (network order)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90 if n > 8 else 30, ha="center" if n > 8 else "right",
                       fontsize=8 if n <= 24 else 7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    avg = plan.predicted.get("avg_bits")
    if avg is not None:
        ax.axhline(avg, color="tab:red", linestyle="--", linewidth=1, zorder=3, label=f"average {avg:.2f} bits")

    ax2 = ax.twinx()
    ax2.plot(x, share, color="tab:orange", marker="o", markersize=3, linewidth=1.2, label="share of size")
    ax2.set_ylabel("share of plan size (%)")
    ax2.set_ylim(0, max(share, default=1.0) * 1.15 or 1.0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, framealpha=0.9)

    p = plan.predicted
    title = f"{plan.model.get('name', 'model')}: {n} layers, {p.get('size_bytes', 0):,} bytes"
    if "metric" in p:
        title += f", {p.get('metric_name', 'metric')} {fmt_metric(p['metric'])}"
    ax.set_title(title, fontsize=10)
    save_figure(plt, fig, path, dpi=120)
    return path
