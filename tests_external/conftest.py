"""The Hugging Face battery's numerics, pinned as the suite's (tests/conftest.py): CPU, JAX matmul
precision 'highest', TF32 off, seeds; hf_pairs importable from here."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from parity.numerics import pin_numerics  # noqa: E402

pin_numerics(precision="highest", tf32=False)
# torch's intra-op threads: this process's share of the cores (at most 2). Under xdist each
# worker is one of PYTEST_XDIST_WORKER_COUNT processes on the same cores; torch's OpenMP threads
# spin-wait between the tiny ops of these models, so 2 workers x 2 threads on 2 cores burn CPU
# fighting over them (a tiny model gains nothing from a second thread). One thread per worker:
# the same float32 check of a tiny mBART, 17 s -> 11 s of CPU on the 2-core machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
