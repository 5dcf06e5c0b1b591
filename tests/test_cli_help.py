"""`parity --help` and every subcommand's --help build without importing torch, jax or flax.

No timing here (speed targets live in benchmarks): what makes help slow is importing the
frameworks, so that is what is asserted, in a fresh interpreter.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import textwrap

import pytest

from parity.cli import COMMANDS, build_parser

HEAVY = ("torch", "jax", "flax")


def _modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it left in sys.modules."""
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import sys
        print("LOADED:" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("LOADED:"), out.stdout
    return [m for m in line[len("LOADED:"):].split(",") if m]


@pytest.mark.parametrize("argv", [[]] + [[name] for name in COMMANDS], ids=lambda a: " ".join(a) or "parity")
def test_help_imports_no_framework(argv):
    loaded = _modules_after(f"""
        import contextlib, io
        from parity.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main({argv + ['--help']!r})
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        assert "usage: parity" in out.getvalue(), out.getvalue()
    """)
    assert loaded == [], f"`parity {' '.join(argv)} --help` imported {loaded}"


def test_parser_builds_without_frameworks():
    assert _modules_after("from parity.cli import build_parser; build_parser()") == []


def test_light_choice_lists_match_the_modules_that_use_them():
    from parity.commands import arguments
    from parity.training import optim

    assert arguments.OPTIMIZERS == optim.OPTIMIZERS
    assert arguments.SCHEDULES == optim.SCHEDULES


def _options(add_arguments) -> set[str]:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return {s for a in p._actions for s in (a.option_strings or [a.dest])}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_modules_declare_no_other_arguments(name):
    """A command module that still has its own add_arguments must not drift from the parser the
    CLI really uses (parity.commands.arguments): new options belong there."""
    module_name, add_arguments, _ = COMMANDS[name]
    own = getattr(importlib.import_module(module_name), "add_arguments", None)
    if own is None:
        return
    assert _options(own) == _options(add_arguments), (
        f"{module_name}.add_arguments differs from parity.commands.arguments; move the options there")


def test_every_command_parses_and_dispatches_to_its_module(monkeypatch):
    seen = []
    for name, (module_name, _, _) in COMMANDS.items():
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "run", lambda args, name=name: seen.append(args.command) or 0)
    from parity.cli import main

    argv = {"check": ["check", "mlp"], "port": ["port", "x.pt", "--model", "mlp", "--out", "o"],
            "bench": ["bench", "--quick"], "train": ["train", "mlp"], "record": ["record", "mlp", "--out", "o"],
            "verify": ["verify", "o", "mlp"]}
    for name in COMMANDS:
        assert main(argv[name]) == 0
    assert seen == list(COMMANDS)
    assert isinstance(build_parser(), argparse.ArgumentParser)
