"""Run a test's child script in its own Python process and read the JSON line it prints last.

Multi-device tests need XLA_FLAGS set before JAX initialises, and memory tests need a process of
their own, so both run a script under tests/ this way. ``once_per_run`` shares such a child's
result between the xdist workers of one test run.
"""
from __future__ import annotations

import fcntl
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from parity._xla_flags import with_cpu_devices

ROOT = Path(__file__).resolve().parents[1]


def run_json_child(script: str, *args: str, devices: int | None = None, timeout: int = 300) -> dict:
    """``python tests/<script> *args`` on CPU (with ``devices`` simulated host devices); its last
    stdout line parsed as JSON. A failing child fails the calling test with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    if devices is not None:
        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), devices)  # beside the suite's flags
    done = subprocess.run([sys.executable, str(ROOT / "tests" / script), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def once_per_run(name: str, compute: Callable[[Path], dict]) -> dict:
    """``compute(directory)`` once per test run; its JSON result is shared by every xdist worker.

    For a module-scoped fixture whose work is expensive (a child process that runs every DDP
    case): xdist may send a module's tests to both workers, and a module fixture then runs once
    per worker. Here the first worker to ask computes (a second one waits on the lock; it would
    otherwise compete for the same cores doing the same work) and writes the result, with any
    files ``compute`` wrote into ``directory``, under the run directory that tests/conftest.py
    makes; later callers read it. The tests assert on the same values as if they had all run in
    one process. A failing ``compute`` stores nothing: the next caller runs it again and fails too.
    """
    run_dir = os.environ.get("PARITY_TEST_RUN_DIR")
    if not run_dir:  # imported outside this suite's pytest run: nothing to share with
        return compute(Path(tempfile.mkdtemp(prefix=f"{name}_")))
    base = Path(run_dir) / "once" / name
    base.mkdir(parents=True, exist_ok=True)
    result = base / "result.json"
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not result.exists():
            work = base / "work"
            work.mkdir(exist_ok=True)
            value = compute(work)
            partial = base / "result.json.partial"
            partial.write_text(json.dumps(value))
            partial.replace(result)
    return json.loads(result.read_text())


def one_line_error(proc) -> str:
    """The one ``parity: error:`` line of a CLI run that must exit 2 without a traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("parity: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def cli_in_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``parity *args`` run by parity.cli.main in this process, from ``cwd``: its exit code, stdout
    and stderr, as a subprocess would give them. The CLI is main(); a child process only adds the
    imports (3 s each), so the suite starts one only where the process itself is under test (the
    ``python -m parity.cli`` entry, a run without torch, simulated devices)."""
    from parity.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    # the CLI finds MODULE:FACTORY's module in its working directory ("." on sys.path, as
    # `python -m` does): forget what the import system cached of another test's "."
    importlib.invalidate_caches()
    sys.path_importer_cache.pop(".", None)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["parity", *args], code, out.getvalue(), err.getvalue())
