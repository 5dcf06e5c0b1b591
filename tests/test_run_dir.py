"""The suite's shared run directory and XLA flags (tests/run_dir.py, tests/child_process.py), and
parity's one XLA_FLAGS editor: a child's device count never drops the flags already set."""
from __future__ import annotations

import os
import uuid

from parity._xla_flags import FORCE_DEVICES, with_cpu_devices, without_cpu_devices
from child_process import once_per_run


def test_once_per_run_computes_once_and_shares_the_result():
    # Every xdist worker and child of one run sees the directory tests/run_dir.py made; a
    # misspelt variable made each caller compute again (the 8-device children ran 3 times).
    assert os.path.isdir(os.environ["PARITY_TEST_RUN_DIR"])
    name, calls = f"probe_{uuid.uuid4().hex}", []

    def compute(directory):
        calls.append(directory)
        return {"n": len(calls)}

    assert once_per_run(name, compute) == {"n": 1}
    assert once_per_run(name, compute) == {"n": 1}
    assert len(calls) == 1


def test_suite_compiles_at_backend_level_0_and_without_fusion_emitters_unless_told():
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_backend_optimization_level=0" in flags
    assert "--xla_cpu_use_fusion_emitters=false" in flags


def test_device_count_keeps_the_other_flags():
    flags = "--xla_backend_optimization_level=0 --xla_dump_to=/tmp/d"
    assert with_cpu_devices(flags, 4).split() == [*flags.split(), f"{FORCE_DEVICES}=4"]
    assert with_cpu_devices(f"{FORCE_DEVICES}=8 --a", 2).split() == ["--a", f"{FORCE_DEVICES}=2"]
    assert with_cpu_devices(f"{FORCE_DEVICES}=8 --a", 2, replace=False) == f"{FORCE_DEVICES}=8 --a"
    assert with_cpu_devices("", 3) == f"{FORCE_DEVICES}=3"


def test_dropping_the_device_count_keeps_the_other_flags():
    assert without_cpu_devices(f"--a {FORCE_DEVICES}=8 --b").split() == ["--a", "--b"]
    assert without_cpu_devices("--a") == "--a" and without_cpu_devices("") == ""
