"""Benchmark core shared by ``parity bench`` and the bench/ pytest-benchmark suite.

Public API: select_device/Device, prepare/Prepared, make_step/Step, measure/Timing,
run_benchmarks/BenchResult, write_report. bench/ imports this package; tests/ may too, but
nothing here imports bench/.
"""
from __future__ import annotations

from parity.benchmark.devices import Device, DeviceError, select_device, set_cpu_threads
from parity.benchmark.runner import (BenchConfig, BenchResult, check_first_value, cpu_config, gate,
                                     run_benchmarks, sized_config)
from parity.benchmark.timing import Timing, measure, summarize
from parity.benchmark.workloads import PHASES, VARIANTS, Prepared, Step, make_step, prepare

__all__ = [
    "PHASES",
    "VARIANTS",
    "BenchConfig",
    "BenchResult",
    "Device",
    "DeviceError",
    "Prepared",
    "Step",
    "Timing",
    "check_first_value",
    "cpu_config",
    "gate",
    "make_step",
    "measure",
    "prepare",
    "run_benchmarks",
    "select_device",
    "set_cpu_threads",
    "sized_config",
    "summarize",
]
