"""Flatten order found by torch.fx, by torch.export when fx fails, the override and the single
warning when nothing traces; and Flax NNX twins as port targets (both directions)."""
from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import weight_port as wp
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for
from weight_port.plan import build_plan

X = torch.randn(2, 3, 4, 4)


class Base(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(2)
        self.fc = torch.nn.Linear(2 * 4 * 4, 5)


class Traceable(Base):
    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x)).flatten(1)))


class ShapeBranch(Base):
    """Python control flow on a shape: torch.fx fails, torch.export specializes and succeeds."""

    def forward(self, x):
        if x.dim() == 4:
            x = self.bn(self.conv(x))
        return self.fc(x.reshape(x.shape[0], -1))


class Untraceable(Base):
    """Leaves torch for numpy mid-forward: neither fx nor export can follow it."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = torch.from_numpy(y.detach().numpy().copy())
        return self.fc(torch.relu(y.flatten(1)))


class FlaxTwin(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 2, (3, 3), padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(2, momentum=0.9, epsilon=1e-5, use_running_average=True, rngs=rngs)
        self.fc = nnx.Linear(2 * 4 * 4, 5, rngs=rngs)

    def __call__(self, x):
        y = self.bn(self.conv(x))
        return self.fc(nnx.relu(y.reshape(y.shape[0], -1)))  # channels-last flatten: (H, W, C) order


def _flatten_of(plan) -> dict:
    return {layer.info.torch_path: layer.info.flatten for layer in plan.layers if layer.info.flatten}


@pytest.mark.parametrize("cls", [Traceable, ShapeBranch], ids=["fx", "export"])
def test_flatten_detected(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error", wp.FlattenTraceWarning)
        plan = build_plan(cls(), FlaxTwin(nnx.Rngs(0)), X)
    assert _flatten_of(plan) == {"fc": (2, 4, 4)}


def test_untraceable_torch_model_decided_by_flax_jaxpr():
    """torch cannot be traced, but the twin's jaxpr shows the flatten of a conv output."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", wp.FlattenTraceWarning)
        plan = build_plan(Untraceable(), FlaxTwin(nnx.Rngs(0)), X)
    assert _flatten_of(plan) == {"fc": (2, 4, 4)}


def test_untraceable_without_flax_module_warns_once_naming_override():
    from weight_port.nnx import nnx_variables

    variables = nnx_variables(FlaxTwin(nnx.Rngs(0)))
    with pytest.warns(wp.FlattenTraceWarning) as record:
        plan = build_plan(Untraceable(), variables=variables)
    flatten_warnings = [r for r in record if issubclass(r.category, wp.FlattenTraceWarning)]
    assert len(flatten_warnings) == 1
    assert "flatten={" in str(flatten_warnings[0].message)
    assert _flatten_of(plan) == {}
    plan = build_plan(Untraceable(), variables=variables, flatten={"fc": (2, 4, 4)})
    assert _flatten_of(plan) == {"fc": (2, 4, 4)}


def _torch_model(cls=Traceable):
    t = cls().eval()
    with torch.no_grad():
        t.bn.running_mean.uniform_(-1, 1)
        t.bn.running_var.uniform_(0.5, 2)
    return t


@pytest.mark.parametrize("cls,override", [(Traceable, None), (Untraceable, {"fc": (2, 4, 4)})],
                         ids=["traced", "override"])
def test_nnx_twin_forward_and_round_trip(cls, override):
    t = _torch_model(cls)
    model = FlaxTwin(nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wp.FlattenTraceWarning)
        state = wp.torch_to_flax(t, model, X, flatten=override)
    assert isinstance(state, nnx.State)
    nnx.update(model, state)
    y = model(jnp.asarray(X.numpy().transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = t(X)
    c = judge("output", np.asarray(y), ref.numpy(), tolerance_for("float32", FORWARD), layout=wp.AS_IS)
    assert c.ok, str(c)
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), t.bn.running_mean.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wp.FlattenTraceWarning)
        back = wp.flax_to_torch(model, t, flatten=override)
    assert back.keys() == t.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())
    back_from_state = wp.flax_to_torch(nnx.state(model), _torch_model(Traceable), model)
    assert all(torch.equal(back_from_state[k], v) for k, v in t.state_dict().items())
