"""No silent mis-port: flatten order found from the Flax twin's jaxpr when the source is a bare
state_dict or file (or refused by name), and a transpose_kernel=True ConvTranspose read back
without its Flax module decided from shapes (or refused by name)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weight_port as wp
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for

X = torch.randn(2, 3, 4, 4)


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.fc = torch.nn.Linear(2 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(2, (3, 3), padding=1, name="conv")(x))
        return nn.Dense(5, name="fc")(y.reshape(y.shape[0], -1))  # channels-last flatten


class FlaxCNNConcat(nn.Module):
    """Flattens a concatenation: the jaxpr cannot tell which side's layout that has."""

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(2, (3, 3), padding=1, name="conv")(x))
        y = jnp.concatenate([y[..., :1], y[..., 1:]], axis=-1)
        return nn.Dense(5, name="fc")(y.reshape(y.shape[0], -1))


def _forward_close(variables, flax_model, torch_model) -> None:
    y = flax_model.apply(variables, X.numpy().transpose(0, 2, 3, 1))
    with torch.no_grad():
        ref = torch_model(X).numpy()
    c = judge("output", np.asarray(y), ref, tolerance_for("float32", FORWARD), layout=wp.AS_IS)
    assert c.ok, str(c)


@pytest.mark.parametrize("source", ["state_dict", "safetensors"])
def test_state_dict_port_permutes_flatten_found_in_flax_jaxpr(source, tmp_path):
    t = TorchCNN()
    src = t.state_dict()
    if source == "safetensors":
        save_file(src, tmp_path / "m.safetensors")
        src = tmp_path / "m.safetensors"
    variables = wp.torch_to_flax(src, FlaxCNN(), X)  # no torch_module
    _forward_close(variables, FlaxCNN(), t)
    plan = wp.build_plan(None, FlaxCNN(), X, state=t.state_dict())
    assert [layer.info.flatten for layer in plan.layers if layer.info.torch_path == "fc"] == [(2, 4, 4)]
    assert any("fc" in n and "conv_general_dilated" in n for n in plan.flatten_notes)
    assert plan.pairing_notes == []  # every layer paired by name


def test_undecidable_flatten_refused_naming_the_fixes():
    t = TorchCNN()
    with pytest.raises(wp.FlattenOrderError) as err:
        wp.torch_to_flax(t.state_dict(), FlaxCNNConcat(), X)
    assert "fc" in str(err.value) and "torch_module=" in str(err.value) and "flatten=" in str(err.value)
    # either fix ports correctly
    for kwargs in ({"torch_module": TorchCNN()}, {"flatten": {"fc": (2, 4, 4)}}):
        variables = wp.torch_to_flax(t.state_dict(), FlaxCNNConcat(), X, **kwargs)
        _forward_close(variables, FlaxCNNConcat(), t)


class TorchUp(torch.nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(cin, cout, 2, stride=2)

    def forward(self, x):
        return self.up(x)


class FlaxUp(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(self.features, (2, 2), strides=(2, 2), transpose_kernel=True, name="up")(x)


def test_transpose_kernel_without_flax_module_decided_from_shapes():
    t = TorchUp(3, 5)
    x = torch.randn(1, 3, 4, 4)
    variables = wp.torch_to_flax(t, FlaxUp(5), x)
    back = wp.flax_to_torch(variables, t)  # no Flax module: kernel [2, 2, 5, 3] is [*k, out, in]
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())
    plan = wp.build_plan(t, variables=variables)
    assert plan.layers[0].info.transpose_kernel is True


def test_transpose_kernel_in_equals_out_refused_without_flax_module():
    t = TorchUp(4, 4)
    x = torch.randn(1, 4, 4, 4)
    variables = wp.torch_to_flax(t, FlaxUp(4), x)
    with pytest.raises(wp.KernelLayoutError, match="up"):
        wp.flax_to_torch(variables, t)
    back = wp.flax_to_torch(variables, t, FlaxUp(4), x)
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())
    assert jax.tree.leaves(variables)  # the forward direction with the module stays fine
