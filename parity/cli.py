"""The ``parity`` command line: argument parsing and printing only; the work is importable.

Exit codes: 0 pass, 1 parity mismatch, 2 usage or setup error (one readable line, no traceback;
PARITY_DEBUG=1 prints the traceback first), 3 no verdict (``parity check``: NaN on both sides
made the check INVALID), 4 INCONCLUSIVE (a pass that only the table's atol explains, with no
measured noise behind it).
Parsing imports nothing heavy (argument definitions live in parity.commands.arguments), so
``parity --help`` answers at once; a command's module, and torch and jax with it, is imported
only when that command runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from parity.commands import arguments
from parity.errors import UsageError

# name -> (module with run(args) -> int, its argument definitions, one-line help).
COMMANDS = {
    "check": ("parity.commands.check", arguments.add_check_arguments,
              "check built-in or your own model pairs for parity"),
    "port": ("parity.commands.port", arguments.add_port_arguments,
             "convert a torch checkpoint into a Flax checkpoint"),
    "bench": ("parity.commands.bench", arguments.add_bench_arguments,
              "benchmark torch vs jax.jit on the built-in models, or profile one model per layer"),
    "train": ("parity.commands.train", arguments.add_train_arguments,
              "train both twins side by side and compare per step"),
    "record": ("parity.commands.record", arguments.add_record_arguments,
               "run a torch model once and write a golden bundle (weights, inputs, outputs, gradients)"),
    "verify": ("parity.commands.verify", arguments.add_verify_arguments,
               "judge a Flax twin against a golden bundle, without torch"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"parity: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser; builds without importing torch, jax or flax."""
    parser = _Parser(prog="parity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (_, add_arguments, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _run(args: argparse.Namespace) -> int:
    module_name = COMMANDS[args.command][0]
    return int(importlib.import_module(module_name).run(args))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])  # KeyError's str() adds quotes around the message
    return text if isinstance(exc, UsageError) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: --processes relaunches it
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from weight_port import PortError

        # Expected failures (bad input, bad files, a port that cannot be made) are one line.
        # Anything else is a bug in this tool and keeps its traceback.
        if isinstance(exc, (UsageError, PortError, KeyError, ValueError, TypeError, OSError,
                            ImportError, AttributeError)):
            if os.environ.get("PARITY_DEBUG"):  # the promised traceback, then the one line
                traceback.print_exc()
            print(f"parity: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
