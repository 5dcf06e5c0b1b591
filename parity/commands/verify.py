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


def _sharding(args: argparse.Namespace):
    """--mesh/--shard-style/--shard-rule as parity.sharding.ShardOptions (None without --mesh); asks
    for the mesh's CPU devices before anything initialises JAX (as check --data-parallel does)."""
    if not args.mesh:
        if args.shard_rule or args.shard_style != "fsdp+tp":
            raise SetupError("--shard-style and --shard-rule need --mesh")
        return None
    from parity.data_parallel import request_cpu_devices
    from parity.sharding import ShardOptions, mesh_devices

    if not args.coordinator:  # a process of a job gets its devices from its launcher or its host
        request_cpu_devices(mesh_devices(args.mesh))
    return ShardOptions(style=args.shard_style, rules=tuple(args.shard_rule))


def _launch(args: argparse.Namespace) -> int:
    """--processes N: this command again as N processes of one jax.distributed job (localhost)."""
    if not args.mesh:
        raise SetupError("--processes needs --mesh (the mesh spans the processes' devices)")
    from parity.sharding import launch, mesh_devices

    return launch(args.argv, args.processes, mesh_devices(args.mesh))


def run(args: argparse.Namespace) -> int:
    try:
        if args.processes is not None and args.processes > 1:
            return _launch(args)
        if args.coordinator:  # before anything initialises JAX's backends
            from parity.sharding import join

            join(args.coordinator, args.num_processes, args.process_id)
        shard = _sharding(args)  # first: it asks for the mesh's CPU devices before JAX initialises
        flax_model, train_kwarg = _twin(args)
        from parity.golden import VerifyOptions, verify

        options = VerifyOptions(input_layout=parse_layout(args.layout, "--layout"), layers=not args.no_layers,
                                train_kwarg=args.train_kwarg or train_kwarg, logits=logits_option(args.logits),
                                mesh=args.mesh, shard=shard)
    except (SetupError, UsageError, KeyError) as exc:
        return fail(exc.args[0] if isinstance(exc, KeyError) else str(exc))

    start = time.perf_counter()

    def say(msg: str) -> None:
        if not args.quiet and not args.process_id:
            print(f"verify {args.bundle}: {msg} ({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)

    try:
        report = verify(args.bundle, flax_model, options, progress=say)
    except UsageError as exc:
        return fail(str(exc))
    if args.process_id:  # one report: process 0's (every process computed the same one)
        return _EXIT[report.verdict]
    print(summary_line(report, time.perf_counter() - start))
    if args.full or report.verdict != "PASS":
        print()
        print(report)
    if args.json:
        write_atomic(args.json, report.to_json())
    return _EXIT[report.verdict]
