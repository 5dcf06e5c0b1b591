"""Peak RSS growth of one region of a process, and one benchmark run per fresh process.

A figure is the region's own: the kernel's peak-RSS mark (VmHWM) is reset to the current RSS
through /proc/self/clear_refs at the start of the region (Linux >= 4.0), so what the imports, the
backend start and the model build took before it does not count. Used by ``parity bench
--check-cost`` and ``--golden-cost``.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """This process's resident set now (MiB)."""
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """This process's peak resident set since the last ``reset_peak`` (MiB)."""
    return _status_mib("VmHWM")


def reset_peak() -> None:
    """Reset the peak RSS mark (VmHWM) to the current RSS; a no-op where the kernel refuses."""
    try:  # "5" resets VmHWM (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measured(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn(), wall seconds, peak RSS growth in MiB over the RSS at the start)."""
    reset_peak()
    base = rss_mib()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    return out, wall, peak_mib() - base


def in_fresh_process(module: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module --child *args`` and return the JSON object on its last stdout line
    (the child prints its figures there); RuntimeError with the child's stderr tail if it fails."""
    res = subprocess.run([sys.executable, "-m", module, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    if res.returncode != 0:
        how = (f"killed by signal {-res.returncode}" + (" (SIGKILL: the OOM killer?)" if res.returncode == -9 else "")
               if res.returncode < 0 else f"exit status {res.returncode}")
        raise RuntimeError(f"{module} child {' '.join(args)} failed, {how}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


__all__ = ["in_fresh_process", "measured", "peak_mib", "reset_peak", "rss_mib"]
