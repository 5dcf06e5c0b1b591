"""Keyword inputs (parity.Inputs): a torch model and a Flax twin whose positional orders differ
(HF GPT-2: torch ``(input_ids, past_key_values, ..., attention_mask)``, Flax ``(input_ids,
attention_mask, position_ids)`` all required) are called with the same keywords, by the checker
and by the weight port; the user's torch module comes back unchanged."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import weight_port as wp


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x, past=None, mask=None, scale=None):
        # ``past`` second, as HF decoders: a positional (x, mask) would put the mask there
        assert past is None
        return self.proj(x) * mask[..., None] * (1.0 if scale is None else scale)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, mask, offset, deterministic: bool = True):  # offset: the Flax side alone
        return nn.Dense(3, name="proj")(x) * mask[..., None] + 0 * offset


def _inputs():
    x = np.random.default_rng(0).standard_normal((2, 5, 4))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return parity.Inputs(x, mask=mask, flax_only=dict(offset=np.zeros(())), torch_only=dict(scale=1.0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_check_with_keyword_inputs_passes(dtype):
    torch.manual_seed(0)
    t = TorchNet()
    r = parity.check(t, FlaxNet(), _inputs(), dtype=dtype, input_layout="as_is")
    assert r.ok, r
    assert [c.name for c in r.input_grads] == ["grad input"]  # one float input; the integer mask gets none
    assert type(t) is TorchNet  # the user's module is untouched


def test_check_with_keyword_inputs_fails_on_a_wrong_twin():
    class Wrong(FlaxNet):
        @nn.compact
        def __call__(self, x, mask, offset, deterministic: bool = True):
            return nn.Dense(3, name="proj")(x) * mask[..., None] * 1.001

    r = parity.check(TorchNet(), Wrong(), _inputs(), dtype="float64", input_layout="as_is")
    assert not r.ok and r.first_divergence == "<root>", r


def test_port_with_keyword_inputs_round_trips_and_restores_the_class():
    t = TorchNet()
    v = wp.torch_to_flax(t, FlaxNet(), _inputs(), input_layout=wp.AS_IS)
    assert type(t) is TorchNet
    assert np.array_equal(v["params"]["proj"]["kernel"], t.proj.weight.detach().numpy().T)
    back = wp.flax_to_torch(v, t, FlaxNet(), _inputs(), input_layout=wp.AS_IS)
    assert type(t) is TorchNet
    assert all(torch.equal(back[k], x) for k, x in t.state_dict().items())


def test_keyword_inputs_refused_for_nnx_with_a_named_error():
    from flax import nnx

    class N(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

        def __call__(self, x, mask):
            return self.proj(x)

    with pytest.raises(TypeError, match="Linen.*NNX"):
        parity.check(TorchNet(), N(), parity.Inputs(np.zeros((2, 5, 4)), mask=torch.ones(2, 5)),
                     dtype="float32", input_layout="as_is")
    assert jnp.float32  # (jnp imported for the Flax twin above)


_VERIFY_WITHOUT_TORCH = """
import sys
import flax.linen as nn
import parity

class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, mask, offset, deterministic: bool = True):
        return nn.Dense(3, name="proj")(x) * mask[..., None] + 0 * offset

report = parity.verify(sys.argv[1], FlaxNet())
print(report.verdict, [c.name for c in report.input_grads])
"""


def test_record_and_verify_keyword_inputs_without_torch(tmp_path):
    """parity.record writes the keyword call (the mask a keyword input, the Flax-only offset a
    recorded constant, the torch-only scale bound into the torch side); parity.verify binds the
    twin with them in a process where torch cannot be imported (weight_port.bind_keywords
    without torch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    bundle = parity.record(TorchNet(), _inputs(), tmp_path / "kw", input_layout="as_is")
    assert parity.verify(bundle, FlaxNet()).verdict == "PASS"

    class Wrong(FlaxNet):
        @nn.compact
        def __call__(self, x, mask, offset, deterministic: bool = True):
            return nn.Dense(3, name="proj")(x) * mask[..., None] * 1.001

    assert parity.verify(bundle, Wrong()).verdict == "FAIL"
    tests = Path(__file__).parent
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tests / "no_torch"), str(tests.parent)])}
    proc = subprocess.run([sys.executable, "-c", _VERIFY_WITHOUT_TORCH, str(bundle)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "PASS ['grad input']"
