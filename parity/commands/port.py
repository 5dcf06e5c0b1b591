"""``parity port SOURCE --model NAME --out DIR``: a torch checkpoint -> an orbax Flax checkpoint."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from parity.registry import PAIRS, select


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help=".safetensors, .pt/.pth (loaded with weights_only=True), a sharded "
                        "*.index.json, or a directory holding one")
    p.add_argument("--model", required=True, metavar="NAME",
                   help=f"registry pair whose architecture the checkpoint has ({', '.join(PAIRS)})")
    p.add_argument("--out", required=True, metavar="DIR", help="orbax checkpoint directory to create")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="model config of the pair")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default=None,
                   help="target dtype (default: keep the checkpoint's)")
    p.add_argument("--allow-nonfinite", action="store_true", help="port NaN/Inf weights instead of failing")


def port_checkpoint(source: str | os.PathLike, model: str, out: str | os.PathLike, *,
                    size: str = "tiny", dtype: str | None = None, allow_nonfinite: bool = False) -> dict:
    """Port ``source`` into an orbax checkpoint at ``out``; returns the Flax variables.

    The checkpoint is written to a temporary directory next to ``out`` and renamed into place
    only when everything succeeded, so a failure never leaves a partial ``out`` behind.
    """
    import jax
    import ml_dtypes
    import numpy as np
    import orbax.checkpoint as ocp

    import weight_port

    pairs = select(model)
    if len(pairs) != 1:
        raise ValueError(f"--model must name one pair, {model!r} selects {', '.join(p.name for p in pairs)}")
    pair = pairs[0]
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"output {out} already exists; remove it or choose another --out")
    config = pair.config(size)
    torch_model, flax_model = pair.build(config)
    x = pair.example_input(config, batch=1)
    target = None if dtype is None else (np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype))
    variables = weight_port.torch_to_flax(
        source, flax_model, x, torch_module=torch_model, input_layout=pair.layout,
        dtype=target, allow_nonfinite=allow_nonfinite, copy=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        ckpt = tmp / "ckpt"
        with ocp.StandardCheckpointer() as saver:
            saver.save(ckpt, jax.tree.map(np.asarray, variables))
        os.rename(ckpt, out)  # atomic on one filesystem: out appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return variables


def run(args: argparse.Namespace) -> int:
    variables = port_checkpoint(args.source, args.model, args.out, size=args.size, dtype=args.dtype,
                                allow_nonfinite=args.allow_nonfinite)
    import jax

    leaves = jax.tree.leaves(variables)
    n = sum(int(v.size) for v in leaves)
    print(f"ported {len(leaves)} tensors ({n:,} values) from {args.source} into {args.out} "
          f"(model {args.model}, {args.size})")
    return 0
