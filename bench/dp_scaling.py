"""Data-parallel scaling: train-step throughput at 1..N devices, jax (sharded jit) and torch (DDP).

    python bench/dp_scaling.py [--model mlp] [--size tiny|full] [--devices 1 2 4 8] [--batch 64] [--steps 10]

For each device count k: the Flax train step (value_and_grad_fn + optax SGD) under jit with the
global batch sharded over a k-device mesh, and torch DDP on k local gloo processes with the same
global batch (parity.data_parallel.ddp; its per-step time on rank 0, all-reduce included). Each
reports samples/s (median step) and the efficiency throughput_k / (k * throughput_1). One
data-parallel training-parity step at the largest k runs first (parity before timing); jax
compiles and warms up outside the timed region and blocks before reading the clock.

On CPU the k devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count) and the k
torch processes share the same cores: a functional run, not a scaling number, and the output says
so. On GPUs/TPUs the jax figure is the real one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", help="registry pair (classification loss)")
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=64, help="global batch (a multiple of every device count)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (after 2 warm-up steps)")
    ap.add_argument("--no-torch", action="store_true", help="jax only")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from parity.data_parallel import request_cpu_devices

    request_cpu_devices(max(args.devices))  # before JAX initialises
    import jax
    import numpy as np
    import optax
    import torch

    from parity.data_parallel import data_mesh, shard_batch
    from parity.data_parallel.ddp import ddp_job, run_ddp
    from parity.data_parallel.mesh import replicate
    from parity.data_parallel.train import train_check_data_parallel
    from parity.registry import PAIRS
    from parity.runtime import (FlaxTwin, as_args, flax_inputs, input_layouts, torch_inputs,
                                value_and_grad_fn)
    from parity.training.data import default_loss, synthetic_batches
    from parity.training.loop import _first_leaf, flax_loss
    from parity.training.optim import OptimizerSpec
    from weight_port.plan import build_plan

    pair = PAIRS[args.model]
    config = pair.config(args.size)
    torch_model, flax_model = pair.build(config, seed=0)
    loss = default_loss(pair)
    batches = synthetic_batches(pair, config, torch_model, batch=args.batch, seed=0)
    spec = OptimizerSpec("sgd", lr=0.01)
    platform = jax.devices()[0].platform
    kmax = max(args.devices)
    gate = train_check_data_parallel(torch_model, flax_model, batches, data_parallel=kmax, steps=1,
                                     optimizer=spec, loss=loss, dtype="float32", input_layout=pair.input_layout,
                                     train_kwarg=pair.train_kwarg, name=pair.name)
    print(f"parity gate (1 DDP step vs sharded Flax, data_parallel={kmax}): {'PASS' if gate.ok else 'FAIL'}"
          + ("" if gate.ok else f" -- {'; '.join(gate.findings) or 'see parity train --data-parallel'}"))

    x0 = torch_inputs(as_args(batches[0][0]), torch.float32, grads=False)
    layouts = input_layouts(torch_model, x0, pair.input_layout)
    variables = build_plan(torch_model, flax_model, x0, input_layout=pair.input_layout).to_flax(torch_model.state_dict())
    twin = FlaxTwin(flax_model, train=True, train_kwarg=pair.train_kwarg, dropout=False, train_mode_matters=False)
    grad_fn = value_and_grad_fn(twin, lambda out, y: flax_loss(loss, _first_leaf(out), y))
    tx = optax.sgd(spec.lr)

    def jax_rate(k: int) -> float:
        mesh = data_mesh(k)
        v = replicate(variables, mesh)
        state = replicate(tx.init(v["params"]), mesh)
        x = shard_batch(flax_inputs(x0, layouts), mesh, args.batch)
        y = shard_batch(np.asarray(batches[0][1]), mesh, args.batch, where="labels")

        @jax.jit
        def step(v, state, x, y):
            value, g, rest = grad_fn(v, x, y)
            upd, state = tx.update(g, state, v["params"])
            return {"params": optax.apply_updates(v["params"], upd), **rest}, state, value

        for _ in range(2):  # compile + warm up, untimed
            v, state, value = step(v, state, x, y)
        jax.block_until_ready(value)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            v, state, value = step(v, state, x, y)
            jax.block_until_ready(value)
            times.append(time.perf_counter() - t)
        return args.batch / float(np.median(times))

    def torch_rate(k: int) -> float:
        job = ddp_job(torch_model, batches, world=k, spec=spec, steps=args.steps + 2, loss=loss, dtype=torch.float32)
        records = run_ddp([job], world=k)[0]
        return args.batch / float(np.median([r["seconds"] for r in records[2:]]))

    sides = [("jax", jax_rate)] + ([] if args.no_torch else [("torch", torch_rate)])
    print(f"{pair.name} {args.size}, global batch {args.batch}, {platform}; samples/s (median of "
          f"{args.steps} steps) and efficiency = rate_k / (k * rate_1)")
    print(f"{'side':<6} {'devices':>7} {'samples/s':>11} {'efficiency':>10}")
    for name, rate in sides:
        base = None
        for k in sorted(args.devices):
            r = rate(k)
            base = base or r / k
            print(f"{name:<6} {k:>7} {r:>11.1f} {r / (k * base):>10.2f}", flush=True)
    if platform == "cpu":
        print(f"note: CPU with simulated devices ({os.environ.get('XLA_FLAGS')}); the k devices and the k "
              "torch processes share this machine's cores: a functional run, not a scaling number")


if __name__ == "__main__":
    main()
