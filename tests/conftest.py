"""Numerics pinned for the whole suite: seeds, JAX matmul precision 'highest', TF32 off.

float64 checks turn x64 on only inside parity.check (jax.enable_x64 context) or the ``x64``
fixture below, so float32 tests never run with x64 silently on.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from parity.numerics import numerics_env, pin_numerics  # noqa: E402

pytest_plugins = ["pytester"]

pin_numerics(precision="highest", tf32=False)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
