"""``parity verify DIR (MODEL | --flax M:F)``: judge a Flax twin against a golden bundle, without torch.

Exit codes as ``parity check``: 0 PASS, 1 FAIL, 3 INVALID, 4 INCONCLUSIVE, 2 usage error or a bundle
that is refused (corrupt, truncated, hashes that do not match, recorded from another model).
"""
from __future__ import annotations

import argparse
import sys
import time

from parity.commands.check import (SetupError, call_factory, fail, load_factory, logits_option, parse_layout,
                                   summary_line, write_atomic)
from parity.errors import UsageError

_EXIT = {"PASS": 0, "FAIL": 1, "INVALID": 3, "INCONCLUSIVE": 4}


def _twin(args: argparse.Namespace):
    if args.model and args.flax:
        raise SetupError(f"MODEL {args.model!r} names a built-in pair: give either MODEL or --flax, not both")
    if args.model:
        from parity.registry import select

        pair = select([args.model])[0]
        return pair.flax_cls()(pair.tiny()), pair.train_kwarg
    if not args.flax:
        raise SetupError("give MODEL (a registry pair) or --flax MODULE:FACTORY")
    return call_factory(load_factory(args.flax, "--flax"), args.flax, "--flax"), None


def run(args: argparse.Namespace) -> int:
    try:
        flax_model, train_kwarg = _twin(args)
        layout = parse_layout(args.layout, "--layout")
    except (SetupError, KeyError) as exc:
        return fail(exc.args[0] if isinstance(exc, KeyError) else str(exc))
    from parity.golden import verify

    start = time.perf_counter()

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"verify {args.bundle}: {msg} ({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)

    try:
        report = verify(args.bundle, flax_model, input_layout=layout, layers=not args.no_layers,
                        train_kwarg=args.train_kwarg or train_kwarg, logits=logits_option(args.logits),
                        progress=say)
    except UsageError as exc:
        return fail(str(exc))
    print(summary_line(report, time.perf_counter() - start))
    if args.full or report.verdict != "PASS":
        print()
        print(report)
    if args.json:
        write_atomic(args.json, report.to_json())
    return _EXIT[report.verdict]
