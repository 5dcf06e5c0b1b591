"""The ``parity`` command line: argument parsing and printing only; the work is importable.

Exit codes: 0 pass, 1 parity mismatch, 2 usage or setup error (one readable line, no traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from parity.errors import UsageError

# name -> (module, one-line help). Each module: add_arguments(parser), run(args) -> int.
COMMANDS = {
    "check": ("parity.commands.check", "check built-in or your own model pairs for parity"),
    "port": ("parity.commands.port", "convert a torch checkpoint into a Flax checkpoint"),
    "bench": ("parity.commands.bench", "benchmark torch vs jax.jit on the built-in models"),
    "train": ("parity.commands.train", "train both twins side by side and compare per step"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"parity: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="parity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])  # KeyError's str() adds quotes around the message
    return text if isinstance(exc, UsageError) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from weight_port.errors import PortError

        # Expected failures (bad input, bad files, a port that cannot be made) are one line.
        # Anything else is a bug in this tool and keeps its traceback.
        if isinstance(exc, (UsageError, PortError, KeyError, ValueError, TypeError, OSError,
                            ImportError, AttributeError)):
            print(f"parity: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
