"""(c) Proxy validity: does the additive sensitivity proxy (what greedy and ilp optimise) rank real candidates?

For each task: measure the phase-1 sensitivities (every decision lowered alone from the top
choice), then evaluate random candidates for real and compare the proxy's predicted quality
loss with the measured loss: Kendall's tau and Spearman's rho, and a scatter plot.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from scipy import stats

from common import RESULTS, Timer, setup, write_table
from mpsearch.strategies.sensitivity import Sensitivity

OUT = RESULTS / "proxy"


def measure(model: str, n: int, seed: int = 0):
    task, space, ev = setup(model)
    sens = Sensitivity(space, ev.sizes)
    sens.record([ev.evaluate(c) for c in sens.plan])
    rng = np.random.default_rng(seed)
    seen, cands = set(), []
    while len(cands) < n:
        c = space.random(rng)
        if c not in seen:
            seen.add(c)
            cands.append(c)
    top = ev.evaluate(sens.top).metric
    rows = [{"model": model, "avg_bits": ev.sizes.avg_bits(c), "predicted_loss": sens.proxy(c),
             "measured_loss": top - ev.evaluate(c).metric} for c in cands]
    ev.restore()
    return pd.DataFrame(rows), len(sens.plan)


def main(n: int) -> None:
    with Timer() as total:
        frames, summary = [], []
        for model in ("digits", "minilm"):
            df, n_sens = measure(model, n)
            frames.append(df)
            tau = stats.kendalltau(df.predicted_loss, df.measured_loss)
            rho = stats.spearmanr(df.predicted_loss, df.measured_loss)
            summary.append({"model": model, "candidates": len(df), "sensitivity_evals": n_sens,
                            "kendall_tau": round(float(tau.statistic), 4), "kendall_p": float(f"{tau.pvalue:.3g}"),
                            "spearman_rho": round(float(rho.statistic), 4), "spearman_p": float(f"{rho.pvalue:.3g}")})
        OUT.mkdir(parents=True, exist_ok=True)
        pd.concat(frames).to_csv(OUT / "points.csv", index=False)
        _scatter(frames, summary, OUT / "proxy_scatter.png")
    write_table(pd.DataFrame(summary), OUT, "summary", "Proxy validity: additive sensitivity proxy vs real evaluation",
                f"{n} random candidates per task (uniform over each space: search_spaces/digits.yaml, minilm.yaml). "
                "predicted loss = sum of the per-decision losses measured with every other decision at its top "
                "choice; measured loss = metric(top candidate) - metric(candidate), on the calibration set.", total.s)
    print(pd.DataFrame(summary).to_string(index=False))


def _scatter(frames, summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frames), figsize=(10, 4))
    for ax, df, s in zip(np.atleast_1d(axes), frames, summary):
        ax.scatter(df.predicted_loss, df.measured_loss, s=8, c=df.avg_bits, cmap="viridis")
        lim = [0, max(df.predicted_loss.max(), df.measured_loss.max()) * 1.05]
        ax.plot(lim, lim, ls=":", c="k", lw=0.8)
        ax.set_title(f"{s['model']}: tau {s['kendall_tau']:.2f}, rho {s['spearman_rho']:.2f}")
        ax.set_xlabel("predicted loss (additive proxy)")
        ax.set_ylabel("measured loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200)
    main(p.parse_args().n)
