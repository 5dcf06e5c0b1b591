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
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
