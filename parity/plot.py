"""Per-layer error plot of a Report: isolated and accumulated error per layer, log scale, PNG.

The y axis is error over allowance (Comparison.score: the worst of |a - b| / (atol + rtol |b|)
and rel_norm / rel_norm_tol), so one "tolerance" line at 1 is right for every dtype's entry.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines, and no GUI event loop

import matplotlib.pyplot as plt  # noqa: E402

from parity.report import Report  # noqa: E402

# Exact zeros (bit-identical layers) cannot sit on a log axis; draw them at this floor.
_FLOOR = 1e-12


def plot_layers(report: Report, path: str | os.PathLike) -> str:
    """Write the per-layer plot of ``report`` to ``path`` (PNG) and return the path.

    Forward isolated and accumulated error, and backward isolated error when gradients were
    checked, in execution order; the first divergence is marked. Raises ValueError when the
    report has no per-layer rows (check(..., layers=False)).
    """
    rows = report.layers
    if not rows:
        raise ValueError("the report has no per-layer rows; run check(..., layers=True)")
    xs = list(range(len(rows)))

    def series(attr: str) -> list[float]:
        out = []
        for row in rows:
            comp = getattr(row, attr)
            out.append(max(comp.score, _FLOOR) if comp is not None else float("nan"))
        return out

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2.0), 4.5), dpi=100)
    ax.plot(xs, series("accumulated"), "o-", color="tab:blue", label="forward, accumulated")
    ax.plot(xs, series("isolated"), "s--", color="tab:orange", label="forward, isolated")
    if any(row.grad_isolated is not None for row in rows):
        ax.plot(xs, series("grad_isolated"), "^:", color="tab:green", label="backward, isolated")
    tol = next((row.isolated.tolerance for row in rows if row.isolated is not None), "")
    ax.axhline(1.0, color="tab:red", linewidth=1.2, label=f"tolerance ({tol})" if tol else "tolerance")
    if report.first_divergence is not None:
        i = next(i for i, row in enumerate(rows) if row.name == report.first_divergence)
        ax.axvline(i, color="tab:red", linestyle=":", linewidth=1)
        ax.annotate(f"first divergence: {report.first_divergence}", (i, 1.0), xytext=(4, 8),
                    textcoords="offset points", color="tab:red", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([row.name for row in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("error / tolerance (<= 1 passes)")
    verdict = "PASS" if report.ok else "FAIL"
    ax.set_title(f"{report.model} [{report.dtype}, {report.mode}]: {verdict}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    plt.close(fig)
    return os.fspath(path)
