"""One directory and one XLA compilation cache per test run, for the unit suite and the battery.

Called by tests/conftest.py and tests_external/conftest.py before JAX is imported.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def start_run() -> None:
    """Make the run's directory and point JAX's compilation cache into it (once per run)."""
    # One directory per test run, made by its first process (the xdist controller, or the only
    # process) and inherited by the xdist workers and every child process through the environment;
    # removed at the end by the process that made it. Fresh per run, so a run's timing is a cold run's.
    if "PARITY_TESTrun_dir" not in os.environ:
        run_dir = tempfile.mkdtemp(prefix="parity_test_run_")
        atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
        os.environ["PARITY_TESTrun_dir"] = run_dir
        # One XLA compilation cache for the run: a program compiled once (the same model, dtype and
        # shapes checked by several tests, the same Flax step judged twice, in a worker or a child)
        # is loaded instead of recompiled. Compilation is most of the suite's CPU time; a hit returns
        # the executable XLA built for the identical program, options and flags (all in the key), so
        # no test checks anything different. Set JAX_COMPILATION_CACHE_DIR to keep one across runs.
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(run_dir, "xla_cache"))
        # Every program, the tiny ones too (the eager casts and reductions of the judge, a layer run
        # alone): loading one costs a few ms against tens of ms to compile. Measured on test_models,
        # test_checker_planted and test_cli_check in one process: 179 s of CPU with a 0.1 s minimum,
        # 144 s with none.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        # A size limit turns on JAX's file lock around cache reads and writes, so a worker never
        # reads an entry another process is still writing (4 GiB: never reached by this suite).
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
