"""``parity record``: run a torch model once and write a golden bundle (parity.golden).

``parity record MODEL --out DIR`` for a registry pair, ``parity record --torch M:F (--example-input
M:FN | --input-shape N,C,H,W) --out DIR`` for your own. Exit 0 written, 2 usage or setup error (one
line; nothing is left at DIR).
"""
from __future__ import annotations

import argparse
import sys
import time

from parity.commands.check import (SetupError, call_factory, fail, load_factory, parse_layout, parse_shape)
from parity.errors import UsageError


def _model(args: argparse.Namespace):
    """(torch model, example input, input layout, output layout, name)."""
    import numpy as np

    if args.model and (args.torch or args.input_shape or args.example_input):
        raise SetupError(f"MODEL {args.model!r} names a built-in pair: give either MODEL or --torch, not both")
    if args.model:
        from parity.registry import select

        pair = select([args.model])[0]
        torch_model, _ = pair.build(seed=args.seed)
        return (torch_model, pair.example_input(seed=args.seed), pair.input_layout, pair.out_layout(), pair.name)
    if not args.torch:
        raise SetupError("give MODEL (a registry pair) or --torch MODULE:FACTORY")
    if bool(args.input_shape) == bool(args.example_input):
        raise SetupError("--torch needs exactly one of --input-shape and --example-input")
    torch_model = call_factory(load_factory(args.torch, "--torch"), args.torch, "--torch")
    if args.example_input:
        x = call_factory(load_factory(args.example_input, "--example-input"), args.example_input, "--example-input")
    else:
        x = np.random.default_rng(args.seed).standard_normal(parse_shape(args.input_shape))
    return (torch_model, x, parse_layout(args.layout, "--layout"), parse_layout(args.output_layout, "--output-layout"),
            args.name or type(torch_model).__name__)


def run(args: argparse.Namespace) -> int:
    try:
        torch_model, x, layout, out_layout, name = _model(args)
    except (SetupError, KeyError) as exc:
        return fail(exc.args[0] if isinstance(exc, KeyError) else str(exc))
    from parity.golden import DEFAULT_MAX_BYTES, record

    start = time.perf_counter()

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"{name}: {msg} ({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)

    try:
        path = record(torch_model, x, args.out, layers=args.layers, dtype=args.dtype, seed=args.seed,
                      train=args.train, input_layout=layout, output_layout=out_layout, name=name,
                      max_bytes=args.max_bytes or DEFAULT_MAX_BYTES, progress=say)
    except UsageError as exc:
        return fail(str(exc))
    print(f"wrote {path} ({name}, {args.dtype}{', with layers' if args.layers else ''})")
    return 0
