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
        # Programs that took 0.1 s or more to compile (a model's forward+backward, the per-layer
        # batch: the costly ones). Caching the many tiny ones too was measured worse: the whole
        # suite on the idle 2-core VM took 8:48 (user 859 s, sys 116 s) with no minimum against
        # 6:28 (707 s, 41 s) with 0.1 s: two workers and their children locking and writing every
        # small entry cost more than recompiling it (one process alone gains, 179 -> 144 s).
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
        # A size limit turns on JAX's file lock around cache reads and writes, so a worker never
        # reads an entry another process is still writing (4 GiB: never reached by this suite).
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
