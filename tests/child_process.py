"""Run a test's child script in its own Python process and read the JSON line it prints last.

Multi-device tests need XLA_FLAGS set before JAX initialises, and memory tests need a process of
their own, so both run a script under tests/ this way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_json_child(script: str, *args: str, devices: int | None = None, timeout: int = 300) -> dict:
    """``python tests/<script> *args`` on CPU (with ``devices`` simulated host devices); its last
    stdout line parsed as JSON. A failing child fails the calling test with its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run([sys.executable, str(ROOT / "tests" / script), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
