"""``parity check [mlp|cnn|unet|all]``: the built-in pairs on random inputs, one table."""
from __future__ import annotations

import argparse
import time

from parity.registry import PAIRS, select


def add_arguments(p: argparse.ArgumentParser) -> None:
    families = sorted({pair.family for pair in PAIRS.values()})
    p.add_argument("models", nargs="*", default=["all"], metavar="MODEL",
                   help=f"all, a family ({', '.join(families)}) or a pair name ({', '.join(PAIRS)})")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="model config: tiny (seconds) or full (paper sizes; minutes on CPU)")
    p.add_argument("--dtype", action="append", choices=("float32", "float64"),
                   help="repeatable; default: float32 and float64")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from parity.checker import check

    pairs = select(args.models)
    dtypes = args.dtype or ["float32", "float64"]
    header = (f"{'model':<18} {'dtype':<8} {'mode':<5} {'out max_abs':>11} {'out rel':>9} "
              f"{'grad max_abs':>12} {'grad rel':>9} {'time':>6}  result")
    print(header)
    print("-" * len(header))
    failed = 0
    for pair in pairs:
        config = pair.config(args.size)
        for dtype in dtypes:
            for train in ([False, True] if pair.has_batch_norm(config) else [False]):
                start = time.perf_counter()
                torch_model, flax_model = pair.build(config, seed=args.seed)
                x = pair.example_input(config, batch=args.batch, seed=args.seed)
                r = check(torch_model, flax_model, x, dtype=dtype, train=train,
                          input_layout=pair.layout, seed=args.seed, name=pair.name)
                out = r.worst(r.outputs)
                grad = r.worst(r.grads)
                failed += not r.ok
                print(f"{pair.name:<18} {dtype:<8} {r.mode:<5} {out.max_abs:11.2e} {out.rel_norm:9.2e} "
                      f"{grad.max_abs:12.2e} {grad.rel_norm:9.2e} {time.perf_counter() - start:5.1f}s  "
                      f"{'PASS' if r.ok else 'FAIL (' + ', '.join(c.name for c in r.outputs + r.grads if not c.ok)[:60] + ')'}",
                      flush=True)
    print(f"\n{'all pass' if not failed else f'{failed} FAILED'} (rel = ||flax - torch|| / ||torch||; "
          "JAX matmul precision 'highest', TF32 off)")
    return 1 if failed else 0
