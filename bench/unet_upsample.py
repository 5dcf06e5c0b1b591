"""UNet twin on CPU: stock nn.ConvTranspose vs sub-pixel up-sampling vs the torch variants.

Times forward and train step (parity.benchmark's workloads: MSE + SGD-momentum) at the
benchmark's CPU sizes (parity.benchmark.runner.cpu_config) for each UNet pair and batch, for
jax.jit with UNetConfig.upsample="conv_transpose" and ="subpixel", and torch eager /
channels_last / torch.compile. Each jax result is checked against torch eager's first result
(forward output, or the first train step's loss) with the tolerance table before its time counts.
Steps alternate (every variant once per round) so load that comes and goes on a shared machine
hits all variants alike; the table gives each variant's median step time.

    python bench/unet_upsample.py [--models unet-same unet-same-bn] [--batches 2 8] [--rounds 3]
    python bench/unet_upsample.py --ops [--batches 8]   # every conv of unet-same alone, per op

--ops times each convolution of the cpu-size unet-same alone, forward and forward + backward
(input and weight gradients), jax.jit vs torch eager channels_last: the per-op view that says
which kernels make up the remaining gap.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

JAX_VARIANTS = {"jax-jit conv_transpose": "conv_transpose", "jax-jit subpixel": "subpixel"}
TORCH_VARIANTS = ("torch-eager", "torch-channels_last", "torch-compile")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["unet-same", "unet-same-bn"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--phases", nargs="+", default=["forward", "train"])
    ap.add_argument("--rounds", type=int, default=15, help="timed steps per variant, alternating")
    ap.add_argument("--ops", action="store_true", help="time each conv of unet-same alone instead")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both frameworks (default: their own); 1 is the fairest "
                         "comparison on a shared machine, where a busy core stalls a 2-thread "
                         "torch op at every barrier")
    args = ap.parse_args(argv)
    if args.threads is not None:
        from parity.benchmark.devices import set_cpu_threads

        set_cpu_threads(args.threads)  # before JAX starts its CPU backend
    if args.ops:
        return time_ops(args.batches, args.rounds)

    import jax
    import torch

    from parity.benchmark.devices import select_device
    from parity.benchmark.runner import TIMED_PRECISION, check_first_value, cpu_config
    from parity.benchmark.workloads import make_step, prepare
    from parity.numerics import pinned
    from parity.registry import select

    device = select_device("cpu")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}, "
          f"{os.cpu_count()} cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    with pinned(precision=TIMED_PRECISION["jax_default_matmul_precision"],
                tf32=TIMED_PRECISION["torch_allow_tf32"]), jax.default_device(device.jax_device):
        for pair in select(args.models):
            base = cpu_config(pair)
            for batch in args.batches:
                for phase in args.phases:
                    steps = {}
                    for variant in TORCH_VARIANTS:
                        prep = prepare(pair, base, batch, device)
                        steps[variant] = make_step(prep, variant, phase)
                    for variant, up in JAX_VARIANTS.items():
                        prep = prepare(pair, dataclasses.replace(base, upsample=up), batch, device)
                        steps[variant] = make_step(prep, "jax-jit", phase)
                    for step in steps.values():
                        step()  # first call: compile, and the value the check below reads
                    ref = steps["torch-eager"].first_value()
                    checks = {v: check_first_value(steps[v].first_value(), ref, "float32") for v in JAX_VARIANTS}
                    for v, (ok, text) in checks.items():
                        print(f"[check] {pair.name} b{batch} {phase} {v}: {'PASS' if ok else 'FAIL'} "
                              f"{text.replace('vs jax-jit', 'vs torch-eager')}")
                        if not ok:
                            return 1
                    for step in steps.values():
                        step()  # warm-up
                    # One step of every variant per round, alternating: load that comes and goes
                    # on a shared machine hits every variant alike; the median drops the spikes.
                    samples = {v: [] for v in steps}
                    for _ in range(args.rounds):
                        for v, step in steps.items():
                            start = time.perf_counter()
                            step()
                            samples[v].append(time.perf_counter() - start)
                    med = {v: statistics.median(ts) * 1e3 for v, ts in samples.items()}
                    rows.append((pair.name, phase, batch, med))
                    print(f"{pair.name} {phase} b{batch}: " + ", ".join(f"{v} {ms:.1f}" for v, ms in med.items()),
                          flush=True)
    cols = [*TORCH_VARIANTS, *JAX_VARIANTS]
    print(f"\nuptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("\nMedian ms per step (median over rounds); ratio = jax time / best torch time\n")
    print("| model | phase | batch | " + " | ".join(cols) + " | subpixel / best torch | conv_transpose / best torch |")
    print("|---|---|---:|" + "---:|" * (len(cols) + 2))
    for name, phase, batch, med in rows:
        best = min(med[v] for v in TORCH_VARIANTS)
        print(f"| {name} | {phase} | {batch} | " + " | ".join(f"{med[c]:.1f}" for c in cols)
              + f" | {med['jax-jit subpixel'] / best:.2f}x | {med['jax-jit conv_transpose'] / best:.2f}x |")
    return 0


def _unet_convs(cfg) -> list[tuple[str, int, int, int, str]]:
    """(name, spatial size, in, out, kind) for every conv of the UNet, kind '3x3' or 'up'."""
    out, size, cin = [], cfg.image_size, cfg.in_channels
    for i, c in enumerate(cfg.channels):
        out += [(f"down.{i}.conv1", size, cin, c, "3x3"), (f"down.{i}.conv2", size, c, c, "3x3")]
        cin = c
        if i < len(cfg.channels) - 1:
            size //= 2
    rev = cfg.channels[::-1]
    for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
        out.append((f"up.{i}", size, a, b, "up"))
        size *= 2
        out += [(f"up_conv.{i}.conv1", size, 2 * b, b, "3x3"), (f"up_conv.{i}.conv2", size, b, b, "3x3")]
    return out


def time_ops(batches: list[int], rounds: int) -> int:
    """Each conv of the cpu-size unet-same alone: ms forward and forward + backward (dx, dw)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from flax_impl.layers import torch_conv_transpose_padding
    from flax_impl.subpixel import SubpixelConvTranspose
    from parity.benchmark.runner import cpu_config
    from parity.numerics import pinned
    from parity.registry import select

    cfg = cpu_config(select("unet-same")[0])
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("\n| batch | layer | HxW | in->out | jax fwd | torch_cl fwd | jax fwd+bwd | torch_cl fwd+bwd |")
    print("|---:|---|---:|---|---:|---:|---:|---:|")
    totals: dict = {}
    with pinned(precision="highest", tf32=False):
        for batch in batches:
            for name, size, cin, cout, kind in _unet_convs(cfg):
                rng = np.random.default_rng(0)
                x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
                if kind == "3x3":
                    layers = {"jax": nn.Conv(cout, (3, 3), padding="SAME")}
                    t_layer = torch.nn.Conv2d(cin, cout, 3, padding=1)
                else:
                    pad = torch_conv_transpose_padding((3, 3), (1, 1), (1, 1))
                    layers = {"jax conv_transpose": nn.ConvTranspose(cout, (3, 3), strides=(2, 2), padding=pad),
                              "jax subpixel": SubpixelConvTranspose(cout, (3, 3), strides=(2, 2), padding=pad)}
                    t_layer = torch.nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
                steps = {}
                for label, layer in layers.items():
                    xj = jnp.asarray(x)
                    v = layer.init(jax.random.key(0), xj)
                    fwd = jax.jit(layer.apply)
                    # forward + backward: the cotangent of sum(y) gives both dx and dw
                    grad = jax.jit(jax.grad(lambda v, x, layer=layer: jnp.sum(layer.apply(v, x)), argnums=(0, 1)))
                    steps[f"{label} fwd"] = lambda f=fwd, v=v, xj=xj: f(v, xj).block_until_ready()
                    steps[f"{label} fwd+bwd"] = lambda g=grad, v=v, xj=xj: jax.block_until_ready(g(v, xj))
                t_layer = t_layer.to(memory_format=torch.channels_last)
                xt = torch.from_numpy(np.moveaxis(x, -1, 1)).contiguous(memory_format=torch.channels_last)
                xg = xt.clone().requires_grad_(True)

                def t_fwd():
                    with torch.no_grad():
                        t_layer(xt)

                def t_bwd():
                    t_layer.zero_grad(set_to_none=True)
                    t_layer(xg).sum().backward()

                steps["torch fwd"], steps["torch fwd+bwd"] = t_fwd, t_bwd
                per = {k: [] for k in steps}
                for f in steps.values():
                    f()  # compile / warm up
                # Short blocks per op, alternating: one call between torch and JAX steps would
                # time the hand-over of the cores (XLA's pool still spinning when torch's OpenMP
                # threads start), not the op; the first call of each block is dropped.
                for _ in range(rounds):
                    for k, f in steps.items():
                        for i in range(4):
                            start = time.perf_counter()
                            f()
                            if i:
                                per[k].append((time.perf_counter() - start) * 1e3)
                med = {k: statistics.median(v) for k, v in per.items()}
                for label in layers:
                    for k in ("fwd", "fwd+bwd"):
                        totals[(batch, label, k)] = totals.get((batch, label, k), 0.0) + med[f"{label} {k}"]
                        totals[(batch, "torch", k, kind)] = totals.get((batch, "torch", k, kind), 0.0)
                    print(f"| {batch} | {name} ({label}) | {size} | {cin}->{cout} | {med[f'{label} fwd']:.2f} | "
                          f"{med['torch fwd']:.2f} | {med[f'{label} fwd+bwd']:.2f} | {med['torch fwd+bwd']:.2f} |",
                          flush=True)
                for k in ("fwd", "fwd+bwd"):
                    totals[(batch, "torch", k)] = totals.get((batch, "torch", k), 0.0) + med[f"torch {k}"]
    print("\nsums over the layers (ms):")
    for key, value in totals.items():
        if len(key) == 3:
            print(f"  batch {key[0]} {key[1]} {key[2]}: {value:.1f}")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
