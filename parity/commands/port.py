"""``parity port``: torch weights -> an orbax Flax checkpoint, for a built-in pair or your own.

    parity port SOURCE --model NAME --out DIR
    parity port [SOURCE] --torch MODULE:FACTORY --flax MODULE:FACTORY
                (--example-input MODULE:FN | --input-shape N,C,H,W) --out DIR [--plan]

Without SOURCE, your pair's torch model is the source (its factory's weights). ``--plan`` prints
the port as a table (torch name, Flax path, rule, layout change, how each pair was matched);
pairings not made by name are always printed. Nothing heavy is imported at module level, so the
argument definitions can be built for ``--help`` without torch or jax.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path



def _target_dtype(dtype: str | None):
    import ml_dtypes
    import numpy as np

    if dtype is None:
        return None
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def write_orbax(variables, out: str | os.PathLike) -> None:
    """Write ``variables`` as an orbax checkpoint at ``out``, atomically.

    The checkpoint is written to a temporary directory next to ``out`` and renamed into place only
    when everything succeeded, so a failure never leaves a partial ``out`` behind.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        ckpt = tmp / "ckpt"
        with ocp.StandardCheckpointer() as saver:
            saver.save(ckpt, jax.tree.map(np.asarray, variables))
        os.rename(ckpt, out)  # atomic on one filesystem: out appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def port_pair(source, torch_model, flax_model, example_input, out: str | os.PathLike, *,
              input_layout: str, rename=None, dtype: str | None = None,
              allow_nonfinite: bool = False, show_plan: bool = False, say=print):
    """Port ``source`` (None: ``torch_model``'s own weights) into an orbax checkpoint at ``out``;
    returns the Flax variables (an nnx.State for an NNX twin). ``say`` prints the plan (with
    ``show_plan``) or, always, the pairings not made by name. A sharded source (*.index.json) is
    streamed a shard at a time into a streamed checkpoint (restore it with
    ``weight_port.load_streamed``) and None is returned: the model is never whole in memory."""
    import weight_port
    from weight_port import is_nnx
    from weight_port import ShardedState
    from weight_port import write_streamed

    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"output {out} already exists; remove it or choose another --out")
    plan = weight_port.build_plan(torch_model, flax_model, example_input, input_layout=input_layout,
                                  rename=rename)
    if show_plan:
        say(plan.describe())
    else:
        for note in plan.pairing_notes + plan.flatten_notes + plan.notes:
            say(f"note: {note}")
    state = weight_port.load_state(torch_model if source is None else source)
    if isinstance(state, ShardedState):
        # Streamed: one shard converted and written at a time (weight_port.streaming); the model
        # is never whole in host memory, so nothing is returned to hold it.
        parts = write_streamed(plan, state, out, dtype=_target_dtype(dtype), allow_nonfinite=allow_nonfinite)
        say(f"streamed {len(parts)} parts, one per shard of {state.path.name}")
        return None
    variables = plan.to_flax(state, dtype=_target_dtype(dtype), allow_nonfinite=allow_nonfinite, copy=True)
    write_orbax(variables, out)  # linen-style {collection: tree}, also for an NNX twin
    if is_nnx(flax_model):
        from flax import nnx

        from weight_port import update_nnx

        return update_nnx(nnx.clone(flax_model), variables)
    return variables


def port_checkpoint(source: str | os.PathLike, model: str, out: str | os.PathLike, *,
                    size: str = "tiny", dtype: str | None = None, allow_nonfinite: bool = False,
                    show_plan: bool = False):
    """Port ``source`` into an orbax checkpoint at ``out`` for registry pair ``model``."""
    from parity.registry import select

    pairs = select(model)
    if len(pairs) != 1:
        raise ValueError(f"--model must name one pair, {model!r} selects {', '.join(p.name for p in pairs)}")
    pair = pairs[0]
    config = pair.config(size)
    torch_model, flax_model = pair.build(config)
    x = pair.example_input(config, batch=1)
    return port_pair(source, torch_model, flax_model, x, out, input_layout=pair.layout, dtype=dtype,
                     allow_nonfinite=allow_nonfinite, show_plan=show_plan)


def _own_pair(args: argparse.Namespace):
    """(torch model, Flax model, example input, input layouts, rename) from --torch/--flax/...:
    the same factories, checks and messages as ``parity check``'s own pair. Input layouts are
    declared (--layout) or inferred from the layer that consumes each input, never from ndim."""
    from parity.commands.check import own_pair
    from parity.runtime import as_args, input_layouts

    import numpy as np
    import torch

    own = own_pair(args)
    torch_model, flax_model, x = own.torch_model, own.flax_model, own.example_input
    if isinstance(x, np.ndarray):  # --input-shape: random float64 values; the port reads shapes
        x = torch.as_tensor(x, dtype=torch.float32)
    args_tuple = as_args(x)
    layouts = list(input_layouts(torch_model, args_tuple, args.layout).values())
    return torch_model, flax_model, x, layouts, own.rename


def _no_architecture(source: str | None) -> str:
    """What to say when neither --model nor --torch/--flax tells the port the architecture."""
    if source is None:
        return "give --model NAME with a SOURCE checkpoint, or your own pair with --torch and --flax"
    if not Path(source).exists():  # ``parity port mlp``: a pair name where SOURCE goes
        return (f"SOURCE {source!r} is not a file or directory; for a built-in pair give --model "
                f"{source} and a SOURCE checkpoint, for your own pair --torch and --flax")
    return (f"SOURCE {source!r} needs its architecture: --model NAME (a built-in pair) or "
            "--torch and --flax (your own pair)")


def run(args: argparse.Namespace) -> int:
    import jax

    from parity.commands.check import SetupError, own_pair_flags, refuse_models_with_own_pair
    from parity.errors import UsageError

    try:
        refuse_models_with_own_pair(args, args.model, "--model", "--model")
        if not args.model and not own_pair_flags(args):
            raise SetupError(_no_architecture(args.source))
        if args.model:
            if args.source is None:
                raise SetupError("--model needs a SOURCE checkpoint")
            variables = port_checkpoint(args.source, args.model, args.out, size=args.size, dtype=args.dtype,
                                        allow_nonfinite=args.allow_nonfinite, show_plan=args.plan)
            what = f"model {args.model}, {args.size}"
        else:
            torch_model, flax_model, x, layout, rename = _own_pair(args)
            variables = port_pair(args.source, torch_model, flax_model, x, args.out, input_layout=layout,
                                  rename=rename, dtype=args.dtype, allow_nonfinite=args.allow_nonfinite,
                                  show_plan=args.plan)
            what = f"{type(torch_model).__name__} -> {type(flax_model).__name__}"
    except SetupError as exc:
        raise UsageError(str(exc)) from None
    if variables is None:  # streamed: read the counts off the manifest, not a model in memory
        import json

        parts = json.loads((Path(args.out) / "streamed.json").read_text())["parts"]
        print(f"ported {sum(len(p['leaves']) for p in parts)} tensors from {args.source} into {args.out} "
              f"streamed, {len(parts)} parts ({what}); restore with weight_port.load_streamed")
        return 0
    leaves = jax.tree.leaves(variables)
    n = sum(int(v.size) for v in leaves)
    print(f"ported {len(leaves)} tensors ({n:,} values) from {args.source or 'the torch model'} "
          f"into {args.out} ({what})")
    return 0
