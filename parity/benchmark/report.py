"""Write a benchmark run as JSON, a markdown table and a PNG bar chart, named by device and versions.

File stem: ``<device>_<dtype>_torch-<v>_jax-<v>_flax-<v>`` (+ ``_quick``; on CPU the device part
is ``cpu-<N>threads``), so results from
different hardware or library versions never overwrite each other (timm's convention).
"""
from __future__ import annotations

import json
from pathlib import Path

from parity.benchmark.runner import BenchResult, GateResult

ROW_KEY = ("model", "phase", "batch")


def file_stem(env: dict, dtype: str, quick: bool = False) -> str:
    v = env["versions"]
    # CPU numbers depend on the thread count as much as on the chip, so it is part of the name.
    device = f"cpu-{env['threads']['torch_intra_op']}threads" if env["device"]["kind"] == "cpu" else _device_label(env)
    stem = f"{device}_{dtype}_torch-{v['torch']}_jax-{v['jax']}_flax-{v['flax']}"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem) + ("_quick" if quick else "")


def device_file_stem(kind: str, label: str) -> str:
    """file_stem for output that is not one benchmark run (a check, a profile): ``label`` takes
    the dtype's place, e.g. ``cuda-NVIDIA-H100-80GB-HBM3_float32-tf32-off_torch-..._flax-...``."""
    from parity.benchmark.devices import select_device
    from parity.benchmark.runner import BenchConfig, environment

    return file_stem(environment(select_device(kind), BenchConfig()), label)


def _device_label(env: dict) -> str:
    d = env["device"]
    return f"{d['kind']}-{d.get('torch_device_name') or d.get('jax_device_kind') or ''}".rstrip("-")


def _rows(results: list[BenchResult]) -> dict[tuple, dict[str, BenchResult]]:
    rows: dict[tuple, dict[str, BenchResult]] = {}
    for r in results:
        rows.setdefault((r.model, r.phase, r.batch), {})[r.variant] = r
    return rows


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}" if s * 1e3 < 100 else f"{s * 1e3:.0f}"


def markdown(results: list[BenchResult], env: dict, variants: list[str]) -> str:
    """Rows model x phase x batch; columns the variants: median ms (IQR) and ratio to the row's fastest."""
    d = env["device"]
    th = env["threads"]
    lines = [
        f"Device: {d['kind']} (torch: {d['torch_device']} {d.get('torch_device_name') or ''}; "
        f"jax: {d['jax_device']} {d.get('jax_device_kind', '')}). dtype {env['config']['dtype']}, "
        f"JAX matmul precision '{env['timed_precision']['jax_default_matmul_precision']}', torch TF32 "
        f"{'on' if env['timed_precision']['torch_allow_tf32'] else 'off'} while timing. torch threads {th['torch_intra_op']} "
        f"intra / {th['torch_inter_op']} inter-op, {env['cpu_count']} visible cores. Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        "Median time per step in ms (IQR in parentheses) and the ratio to the fastest variant in the "
        "row (1.00x = fastest, **bold**). Train step = forward + MSE loss + backward + SGD-momentum update.",
        "",
        "| model | phase | batch | " + " | ".join(variants) + " |",
        "|---|---|---:|" + "---:|" * len(variants),
    ]
    for (model, phase, batch), by_variant in _rows(results).items():
        ok = [r.median_s for r in by_variant.values() if r.status == "ok"]
        fastest = min(ok) if ok else None
        cells = []
        for v in variants:
            r = by_variant.get(v)
            if r is None:
                cells.append("-")
            elif r.status != "ok":
                cells.append(r.status)
            else:
                text = f"{_ms(r.median_s)} ({_ms(r.timing.iqr_s)}) {r.median_s / fastest:.2f}x"
                cells.append(f"**{text}**" if r.median_s == fastest else text)
        lines.append(f"| {model} | {phase} | {batch} | " + " | ".join(cells) + " |")
    notes = sorted({f"{r.variant}: {r.status}: {r.reason}" for r in results if r.status != "ok"})
    if notes:
        lines += ["", "Not timed:", ""] + [f"- {n}" for n in notes]
    lines += ["", "Details (FLOPs per step from each framework's own counter: XLA cost_analysis counts "
              "every op, torch FlopCounterMode only matmul/conv-family ops, so compare TFLOP/s within a "
              "framework; first call = tracing + compilation + one step):", "",
              "| model | phase | batch | variant | samples/s | first call s | GFLOP/step | TFLOP/s | MFU | peak MiB |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.status != "ok":
            continue
        gflop = f"{r.flops / 1e9:.3g}" if r.flops else "n/a"
        tfs = f"{r.tflops_per_s:.3g}" if r.tflops_per_s else "n/a"
        peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes else "n/a"
        util = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        lines.append(f"| {r.model} | {r.phase} | {r.batch} | {r.variant} | {r.samples_per_s:.4g} | "
                     f"{r.timing.first_call_s:.2f} | {gflop} | {tfs} | {util} | {peak} |")
    pk = env.get("peak") or {}
    lines += ["", (f"MFU = model FLOPs per step (torch FlopCounterMode's matmul/conv count, the same for "
                   f"every variant of a row; XLA's where torch has none) / median time / peak "
                   f"{pk['tflops']:g} TFLOP/s ({pk['source']})." if pk.get("tflops")
                   else f"MFU n/a: {pk.get('source', 'no peak recorded')}.")]
    peaks = sorted({r.peak_source for r in results if r.status == "ok" and r.peak_bytes is None})
    if peaks:
        lines += ["", "Peak memory n/a: " + "; ".join(peaks) + "."]
    return "\n".join(lines) + "\n"


def chart(results: list[BenchResult], env: dict, variants: list[str], path: Path) -> None:
    """Grouped bars: median ms per row (log scale) with IQR whiskers, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = _rows(results)
    labels = [f"{m}\n{p} b{b}" for (m, p, b) in rows]
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows) + 2), 5))
    for i, v in enumerate(variants):
        med, lo, hi = [], [], []
        for by_variant in rows.values():
            r = by_variant.get(v)
            ok = r is not None and r.status == "ok"
            med.append(r.timing.median_s * 1e3 if ok else np.nan)
            lo.append((r.timing.median_s - r.timing.q1_s) * 1e3 if ok else 0)
            hi.append((r.timing.q3_s - r.timing.median_s) * 1e3 if ok else 0)
        x = np.arange(len(rows)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, med, width, yerr=[lo, hi], capsize=2, label=v)
    ax.set_yscale("log")
    ax.set_ylabel("median ms per step (log; whiskers = IQR)")
    ax.set_xticks(np.arange(len(rows)), labels, fontsize=7)
    v = env["versions"]
    ax.set_title(f"{env['device']['kind']} ({env['device'].get('torch_device_name') or env['device']['jax_device']}), "
                 f"{env['config']['dtype']}, {env['threads']['torch_intra_op']} torch thread(s): torch {v['torch']}, "
                 f"jax {v['jax']}, flax {v['flax']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[BenchResult], gates: list[GateResult], env: dict, out_dir: Path,
                 *, quick: bool = False, prefix: str = "") -> dict[str, Path]:
    """Write <prefix><stem>.json, .md and .png under out_dir; returns the paths. prefix: your own
    pair's name (``BertModel_``), so its files never overwrite the registry grid's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = prefix + file_stem(env, env["config"]["dtype"], quick)
    variants = [v for v in env["config"]["variants"] if any(r.variant == v for r in results)]
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "chart": out_dir / f"{stem}.png"}
    payload = {
        "environment": env,
        "parity_gates": [g.__dict__ for g in gates],
        "results": [r.to_dict() for r in results],
    }
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(results, env, variants))
    chart(results, env, variants, paths["chart"])
    return paths
