"""The fast path of torch_to_flax (tensors converted on background threads while the plan traces)
gives the same bits as the plain plan, and never reuses a tensor the plan converts differently."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import weight_port as wp
from weight_port import prefetch as prefetch_mod
from weight_port.plan import build_plan
from weight_port.prefetch import Prefetch

X = torch.randn(2, 3, 4, 4)


@pytest.fixture
def two_threads():
    """torch at 2 intra-op threads for the test (an xdist worker runs at 1, tests/conftest.py), so
    that "restored" is not 1 == 1 whether or not the port restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Torch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 6)  # after a channels-first flatten: permuted
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)
        self.up = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)  # plan-dependent rule: not prefetched

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.head(self.norm(self.fc(y.flatten(1)))), self.up(y)


class Flax(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        y = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, name="bn")(
            nn.Conv(4, (3, 3), padding=1, name="conv")(x))
        h = nn.Dense(6, name="fc")(y.reshape(y.shape[0], -1))
        up = nn.ConvTranspose(2, (2, 2), strides=(2, 2), name="up")(y)
        return nn.Dense(3, name="head")(nn.LayerNorm(epsilon=self.eps, name="norm")(h)), up


def _bits(tree) -> dict:
    return {k: np.asarray(v).tobytes() for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("dtype", [None, jax.numpy.bfloat16])
def test_prefetched_equals_plain_bit_for_bit(dtype):
    t = Torch().eval()
    with torch.no_grad():
        t.bn.running_var.uniform_(0.5, 2)
    sd = t.state_dict()
    plan = build_plan(t, Flax(), X)
    plain = plan.to_flax(sd, dtype=dtype)
    pre = Prefetch(t, sd, dtype=dtype, copy=True, check_finite=True).result()
    assert "fc.weight" in pre and "head.weight" in pre and "up.weight" not in pre
    fast = plan.to_flax(sd, dtype=dtype, precomputed=pre)
    assert _bits(fast) == _bits(plain)
    # the flatten-permuted Linear was converted again, not taken from the prefetch
    assert fast["params"]["fc"]["kernel"] is not pre["fc.weight"].value
    assert fast["params"]["head"]["kernel"] is pre["head.weight"].value


def test_torch_to_flax_fast_path_same_as_plan_and_restores_threads(monkeypatch, two_threads):
    monkeypatch.setattr(prefetch_mod, "MIN_BYTES", 0)  # take the fast path on a tiny model
    t = Torch().eval()
    threads = torch.get_num_threads()
    assert threads == 2
    fast = wp.torch_to_flax(t, Flax(), X)
    assert torch.get_num_threads() == threads
    assert _bits(fast) == _bits(build_plan(t, Flax(), X).to_flax(t.state_dict()))
    # copies, not views of the live torch tensors (the default for a module source)
    with torch.no_grad():
        t.head.weight.add_(1.0)
    assert not np.array_equal(np.asarray(fast["params"]["head"]["kernel"]), t.head.weight.detach().numpy().T)


def test_nonfinite_found_on_the_fast_path(monkeypatch):
    monkeypatch.setattr(prefetch_mod, "MIN_BYTES", 0)
    t = Torch()
    with torch.no_grad():
        t.head.weight[0, 0] = float("nan")
    with pytest.raises(wp.NonFiniteWeightError, match="head.weight"):
        wp.torch_to_flax(t, Flax(), X)


def test_failed_plan_stops_the_prefetch(monkeypatch, two_threads):
    monkeypatch.setattr(prefetch_mod, "MIN_BYTES", 0)
    threads = torch.get_num_threads()
    assert threads == 2
    with pytest.raises(wp.AttributeMismatchError):
        wp.torch_to_flax(Torch(), Flax(eps=1e-6), X)  # Flax's default eps: refused by the plan
    assert torch.get_num_threads() == threads


def test_caller_converts_the_queue_itself_same_bits():
    """workers=0: every prefetched tensor is converted by result() on the calling thread (the
    path the caller takes once its plan is built) -- the same bits as the plain plan."""
    t = Torch().eval()
    sd = t.state_dict()
    plan = build_plan(t, Flax(), X)
    pre = Prefetch(t, sd, dtype=None, copy=True, check_finite=True, workers=0)
    assert len(pre._queue) > 0 and not pre.done  # nothing converted before result()
    done = pre.result()
    assert set(done) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                         "bn.running_var", "fc.weight", "fc.bias", "norm.weight", "norm.bias",
                         "head.weight", "head.bias"}
    assert _bits(plan.to_flax(sd, precomputed=done)) == _bits(plan.to_flax(sd))


def test_queue_is_largest_first():
    """The threads share one queue, biggest tensors first: a fixed split of the (weight, bias,
    weight, ...) list gave one worker every weight and the other every bias."""
    t = Torch()
    sd = t.state_dict()
    pre = Prefetch(t, sd, dtype=None, copy=True, check_finite=True, workers=0)
    sizes = [sd[key].numel() for key, *_ in pre._queue]
    pre.cancel()
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == sd["fc.weight"].numel()
