"""Warnings of a passing parity gate reach the benchmark's console, not only its JSON."""
from __future__ import annotations

from parity.benchmark.devices import select_device
from parity.benchmark.runner import BenchConfig, run_benchmarks


def test_gate_warnings_reach_the_console_on_a_pass():
    """A passing gate used to print only its verdict; the check's warnings stayed in the JSON."""
    cfg = BenchConfig(models=("mlp",), batches=(1,), size="tiny", phases=("forward",),
                      variants=("jax-jit",), warmup=0, min_rounds=1, max_rounds=1, min_time_s=0.0)
    lines: list[str] = []
    _, gates = run_benchmarks(cfg, select_device("cpu"), log=lines.append)
    assert gates[0].ok and any("batch size 1" in w for w in gates[0].warnings)
    assert any(line.startswith("  warning:") and "batch size 1" in line for line in lines), lines
