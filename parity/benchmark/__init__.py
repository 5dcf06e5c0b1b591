"""Benchmark core shared by ``parity bench`` and the bench/ pytest-benchmark suite.

Public API: select_device/Device, prepare/prepare_own/Prepared, make_step/Step, measure/Timing,
run_benchmarks/run_own_benchmark/BenchResult, write_report, profile_layers/LayerProfile. bench/ imports this
package; tests/ may too, but nothing here imports bench/. Names resolve lazily, so the CLI can
read parity.benchmark.names without importing torch or jax.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "Device": "parity.benchmark.devices",
    "DeviceError": "parity.benchmark.devices",
    "select_device": "parity.benchmark.devices",
    "set_cpu_threads": "parity.benchmark.devices",
    "BenchConfig": "parity.benchmark.runner",
    "BenchResult": "parity.benchmark.runner",
    "check_first_value": "parity.benchmark.runner",
    "cpu_config": "parity.benchmark.sizes",
    "gpu_config": "parity.benchmark.sizes",
    "peak_tflops": "parity.benchmark.peaks",
    "gate": "parity.benchmark.runner",
    "run_benchmarks": "parity.benchmark.runner",
    "run_own_benchmark": "parity.benchmark.runner",
    "sized_config": "parity.benchmark.sizes",
    "Timing": "parity.benchmark.timing",
    "measure": "parity.benchmark.timing",
    "summarize": "parity.benchmark.timing",
    "PHASES": "parity.benchmark.names",
    "VARIANTS": "parity.benchmark.names",
    "Prepared": "parity.benchmark.workloads",
    "Step": "parity.benchmark.workloads",
    "make_step": "parity.benchmark.workloads",
    "prepare": "parity.benchmark.workloads",
    "prepare_own": "parity.benchmark.workloads",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parity.benchmark' has no attribute {name!r}")
