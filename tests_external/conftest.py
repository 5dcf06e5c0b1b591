"""The Hugging Face battery's numerics, pinned as the suite's (tests/conftest.py): CPU, JAX matmul
precision 'highest', TF32 off, seeds; hf_pairs importable from here."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from run_dir import start_run  # noqa: E402

# The unit suite's run directory and XLA compilation cache (tests/run_dir.py): the battery checks
# each tiny model several times (float32, float64, with rows, planted), the same programs each time.
start_run()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from parity.numerics import pin_numerics  # noqa: E402

pin_numerics(precision="highest", tf32=False)
# torch's intra-op threads: this worker's share of the cores (at most 2), as in the unit suite
# (tests/conftest.py: 2 workers x 2 spinning OpenMP threads on 2 cores fight over them). Verdicts
# do not depend on it: ControlNet's mid_block.resnets.0 row FAILed at 1 thread while its rows
# counted no twin's own noise (parity.layers._own_run); they count it now.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
