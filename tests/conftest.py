"""Numerics pinned for the whole suite: seeds, JAX matmul precision 'highest', TF32 off.

float64 checks turn x64 on only inside parity.check (jax.enable_x64 context) or the ``x64``
fixture below, so float32 tests never run with x64 silently on.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from run_dir import start_run  # noqa: E402

start_run()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from parity.numerics import numerics_env, pin_numerics  # noqa: E402

pytest_plugins = ["pytester"]

pin_numerics(precision="highest", tf32=False)
# The test processes have ONE CPU device (multi-device cases run in child processes with
# XLA_FLAGS set), and tests rely on it ("this process's JAX has one device: exit 2"). JAX picks
# its device count when the backend first starts, and an in-process `parity ... --data-parallel 2`
# asks for 2 devices if it gets there first: start the backend now, whichever test a worker runs
# first.
jax.devices()
# torch's intra-op threads: this process's share of the cores (at most 2). Under xdist each
# worker is one of PYTEST_XDIST_WORKER_COUNT processes on the same cores; torch's OpenMP threads
# spin-wait between the tiny ops of these models, so 2 workers x 2 threads on 2 cores burn CPU
# fighting over them (a tiny model gains nothing from a second thread). One thread per worker:
# the same float32 check of a tiny mBART, 17 s -> 11 s of CPU on the 2-core machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_report_header(config):
    env = numerics_env()
    return (f"numerics: jax matmul precision={env['jax_default_matmul_precision']}, "
            f"x64 default={env['jax_enable_x64']}, torch tf32={env['torch_matmul_allow_tf32']}, "
            f"versions={env['versions']}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def x64():
    """Enable JAX float64 for one test, restored afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
