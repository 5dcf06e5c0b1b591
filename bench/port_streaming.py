"""Peak RSS of a streamed port against model size and largest shard (synthetic sharded MLP).

    python bench/port_streaming.py [--width 1024] [--layers 16 32 64] [--per-shard 4]

For each model size: writes a sharded safetensors checkpoint (``--per-shard`` Linear layers per
shard, so the model is layers/per_shard times its largest shard), then ports it in a fresh
process twice, streamed (``weight_port.write_streamed``, ``parity port``'s path for *.index.json)
and whole (convert everything, then write), and prints each run's peak RSS growth over the
process's state after building the plan. Peak RSS is ru_maxrss (Linux, KiB). CPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(d: Path, width: int, layers: int, per_shard: int) -> int:
    """A sharded ExplicitMLP checkpoint in ``d``; returns the largest shard's bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(0, layers, per_shard):
        name = f"model-{s // per_shard:05d}.safetensors"
        t = {}
        for i in range(s, min(s + per_shard, layers)):
            t[f"layers.{i}.weight"] = rng.standard_normal((width, width), dtype=np.float32)
            t[f"layers.{i}.bias"] = rng.standard_normal((width,), dtype=np.float32)
        save_file(t, str(d / name))
        weight_map.update({k: name for k in t})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return max((d / n).stat().st_size for n in set(weight_map.values()))


def child(ckpt: str, out: str, width: int, layers: int, mode: str) -> None:
    import numpy as np

    import weight_port as wp
    from flax_impl.mlp import ExplicitMLP
    from parity.commands.port import write_orbax
    from model_configs import MLPConfig

    state = wp.load_state(ckpt)
    plan = wp.build_plan(None, ExplicitMLP(MLPConfig(in_features=width, features=(width,) * layers)),
                         np.zeros((1, width), np.float32), state=state)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mode == "streamed":
        wp.write_streamed(plan, state, out)
    else:
        write_orbax(plan.to_flax(state, copy=True), out)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth": after - before}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        c = args.child
        return child(c[0], c[1], int(c[2]), int(c[3]), c[4])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    print(f"{'model MiB':>10} {'shard MiB':>10} {'mode':>9} {'peak RSS growth MiB':>20}")
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            shard = make_checkpoint(d, args.width, layers, args.per_shard)
            model = layers * (args.width ** 2 + args.width) * 4
            for mode in ("streamed", "whole"):
                out = d / f"out_{mode}"
                r = subprocess.run([sys.executable, __file__, "--child", str(d), str(out), str(args.width),
                                    str(layers), mode], capture_output=True, text=True, env=env, check=True)
                growth = json.loads(r.stdout.strip().splitlines()[-1])["peak_growth"]
                print(f"{model / 2**20:>10.0f} {shard / 2**20:>10.0f} {mode:>9} {growth / 2**20:>20.0f}")


if __name__ == "__main__":
    main()
