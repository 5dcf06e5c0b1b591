"""Write a per-layer speed profile as JSON, markdown (two rankings) and a PNG bar chart."""
from __future__ import annotations

import json
from pathlib import Path

from parity.benchmark.layer_profile import KEYS, LayerProfile, LayerTime


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.3g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}x"


def by_share(profile: LayerProfile, key: str = "jax fwd+bwd") -> list[LayerTime]:
    """Paired layers, largest share of ``key`` first (layers without that time last)."""
    return sorted(profile.layers, key=lambda t: -(t.share.get(key) or -1.0))


def by_ratio(profile: LayerProfile, phase: str = "fwd+bwd") -> list[LayerTime]:
    """Paired layers, largest JAX/torch time ratio first."""
    return sorted(profile.layers, key=lambda t: -(t.ratio(phase) or -1.0))


def summary_lines(profile: LayerProfile) -> list[str]:
    """Whole model vs sum of layers, per framework and phase (printed and in the markdown)."""
    lines = []
    for key in KEYS:
        whole, total = profile.whole.times.get(key), profile.layer_sum(key)
        ratio = f"{total / whole:.2f}x" if whole and total is not None else "n/a"
        lines.append(f"{key:<14} whole model {_ms(whole):>8} ms   sum of {len(profile.layers)} layers "
                     f"{_ms(total):>8} ms   sum / whole {ratio}")
    return lines


def markdown(profile: LayerProfile) -> str:
    env = profile.env
    v = env.get("versions", {})
    head = (f"Per-layer profile of **{profile.model}** on {profile.device} "
            f"({env.get('device_name') or ''}), {profile.dtype}, JAX matmul precision 'highest', torch "
            f"TF32 off. torch {v.get('torch')}, jax {v.get('jax')}, flax {v.get('flax')}.")
    lines = [head, "",
             "Each leaf layer runs alone on the input (and output cotangent) that torch gave it in one "
             "forward + backward of the whole model: torch eager, Flax jitted per layer; median per "
             "call, first call and warm-up untimed. fwd+bwd = forward + gradients of the input and "
             "the layer's parameters. Sum of layers / whole model above 1: what fusion (or fewer "
             "launches) wins; below 1: the glue that is no layer (concatenations, crops, functional "
             "activations) costs. Each layer's first JAX output is checked against torch's (forward "
             "tolerance); a failing layer is listed below the tables.",
             "", "```", *summary_lines(profile), "```", "",
             "Ranked by share of the JAX fwd+bwd total:", "",
             "| layer | type | jax fwd+bwd ms | share | torch fwd+bwd ms | share | jax fwd ms | torch fwd ms | JAX/torch fwd+bwd | JAX/torch fwd |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in by_share(profile):
        lines.append(f"| {t.name} | {t.torch_type} | {_ms(t.times.get('jax fwd+bwd'))} | "
                     f"{_pct(t.share.get('jax fwd+bwd'))} | {_ms(t.times.get('torch fwd+bwd'))} | "
                     f"{_pct(t.share.get('torch fwd+bwd'))} | {_ms(t.times.get('jax forward'))} | "
                     f"{_ms(t.times.get('torch forward'))} | {_ratio(t.ratio('fwd+bwd'))} | "
                     f"{_ratio(t.ratio('forward'))} |")
    lines += ["", "Ranked by JAX/torch time ratio (fwd+bwd; > 1: JAX slower on this layer):", "",
              "| layer | type | JAX/torch fwd+bwd | JAX/torch fwd | jax fwd+bwd ms | torch fwd+bwd ms |",
              "|---|---|---:|---:|---:|---:|"]
    for t in by_ratio(profile):
        lines.append(f"| {t.name} | {t.torch_type} | {_ratio(t.ratio('fwd+bwd'))} | "
                     f"{_ratio(t.ratio('forward'))} | {_ms(t.times.get('jax fwd+bwd'))} | "
                     f"{_ms(t.times.get('torch fwd+bwd'))} |")
    failed = [f"- {t.name} ({t.torch_type}): parity {t.parity}" for t in profile.layers if t.parity.startswith("FAIL")]
    if failed:
        lines += ["", "**Layers whose Flax output misses torch's (their times compare different work):**", "", *failed]
    notes = [f"- {t.name} ({t.torch_type}): {t.note}" for t in [*profile.layers, *profile.unpaired] if t.note]
    if notes:
        lines += ["", "Not timed on both sides:", "", *notes]
    return "\n".join(lines) + "\n"


def chart(profile: LayerProfile, path: Path) -> None:
    """Horizontal bars per layer (largest JAX fwd+bwd first): torch and JAX, both phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = by_share(profile)
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(rows) + 1.5)))
    height = 0.8 / len(KEYS)
    for i, key in enumerate(KEYS):
        ax.barh(y + (i - (len(KEYS) - 1) / 2) * height,
                [(t.times.get(key) or 0) * 1e3 for t in rows], height, label=key)
    ax.set_yticks(y, [t.name for t in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms per call, layer alone (log)")
    ax.set_title(f"{profile.model} per layer, {profile.device}, {profile.dtype}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_profile(profile: LayerProfile, out_dir: Path, stem: str) -> dict[str, Path]:
    """<out_dir>/layers_<model>_<stem>.{json,md,png}; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"layers_{profile.model}_{stem}"
    paths = {"json": out_dir / f"{base}.json", "markdown": out_dir / f"{base}.md",
             "chart": out_dir / f"{base}.png"}
    paths["json"].write_text(json.dumps(profile.to_dict(), indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(profile))
    chart(profile, paths["chart"])
    return paths


__all__ = ["by_ratio", "by_share", "chart", "markdown", "summary_lines", "write_profile"]
