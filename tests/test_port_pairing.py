"""Structural pairing in execution order (not registration order), the notes it leaves, the
readable plan, and the named refusal when two candidates stay ambiguous."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import weight_port as wp
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for
from weight_port.nnx import nnx_variables
from weight_port.plan import build_plan

X = torch.randn(3, 4)


class RegisteredBackwards(torch.nn.Module):
    """A correct twin of the Flax models below whose __init__ registers the layers in the reverse
    of the order forward runs them; all three have the same shape."""

    def __init__(self):
        super().__init__()
        self.last = torch.nn.Linear(4, 4)
        self.middle = torch.nn.Linear(4, 4)
        self.first = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.last(torch.tanh(self.middle(torch.relu(self.first(x)))))


class LinenAuto(nn.Module):
    @nn.compact
    def __call__(self, x):  # auto-named Dense_0, Dense_1, Dense_2 in call order
        h = nn.Dense(4)(x)
        h = nn.Dense(4)(nn.relu(h))
        return nn.Dense(4)(jnp.tanh(h))


class NNXDefinedOutOfOrder(nnx.Module):
    """Attributes defined, and named alphabetically, in the reverse of the order they are called
    (nnx lists variables by attribute name); names unlike torch's."""

    def __init__(self, rngs: nnx.Rngs):
        self.x = nnx.Linear(4, 4, rngs=rngs)
        self.y = nnx.Linear(4, 4, rngs=rngs)
        self.z = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, h):
        return self.x(jnp.tanh(self.y(nnx.relu(self.z(h)))))


def _assert_forward_close(flax_out, torch_module) -> None:
    with torch.no_grad():
        ref = torch_module(X).numpy()
    c = judge("output", np.asarray(flax_out), ref, tolerance_for("float32", FORWARD), layout=wp.AS_IS)
    assert c.ok, str(c)


def _paths(plan) -> dict[str, str]:
    return {layer.info.torch_path: "/".join(layer.info.flax_path) for layer in plan.layers}


def test_linen_twin_paired_in_execution_order():
    t = RegisteredBackwards()
    plan = build_plan(t, LinenAuto(), X, input_layout=wp.AS_IS)
    assert _paths(plan) == {"first": "Dense_0", "middle": "Dense_1", "last": "Dense_2"}
    variables = plan.to_flax(t.state_dict())
    _assert_forward_close(LinenAuto().apply(variables, X.numpy()), t)
    # every structural pairing is recorded, one readable line each
    assert len(plan.pairing_notes) == 3
    assert any(n.startswith("torch first -> flax Dense_0: execution order") for n in plan.pairing_notes)
    text = str(plan)
    for row in ("first.weight", "Dense_0/kernel", "linear", "[out, in] -> [in, out]", "execution order"):
        assert row in text


def test_nnx_twin_paired_in_execution_order():
    t = RegisteredBackwards()
    model = NNXDefinedOutOfOrder(nnx.Rngs(0))
    state = wp.torch_to_flax(t, model, X, input_layout=wp.AS_IS)
    nnx.update(model, state)
    _assert_forward_close(model(jnp.asarray(X.numpy())), t)
    back = wp.flax_to_torch(model, t, model, X, input_layout=wp.AS_IS)
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())


def test_untraced_ambiguity_is_refused_naming_both():
    """Without an example input neither side can be traced: three same-shaped Dense fit."""
    variables = LinenAuto().init(jax.random.key(0), X.numpy())
    with pytest.raises(wp.AmbiguousPairingError) as err:
        build_plan(RegisteredBackwards(), variables=variables)
    assert len(err.value.candidates) == 2 and all(c.startswith("Dense_") for c in err.value.candidates)
    assert all(c in str(err.value) for c in err.value.candidates)
    assert "torch last" in str(err.value)  # registration order's first torch layer, the one refused


def test_nnx_without_example_input_is_ambiguous_not_guessed():
    with pytest.raises(wp.AmbiguousPairingError):
        wp.torch_to_flax(RegisteredBackwards(), NNXDefinedOutOfOrder(nnx.Rngs(0)))


def test_rename_still_decides_over_structure():
    t = RegisteredBackwards()
    model = NNXDefinedOutOfOrder(nnx.Rngs(0))
    plan = build_plan(t, model, rename=[("first", "z"), ("middle", "y"), ("last", "x")])
    assert _paths(plan) == {"first": "z", "middle": "y", "last": "x"}
    assert {layer.matched for layer in plan.layers} == {"rename"}
    assert plan.pairing_notes == []
    assert set(nnx_variables(model)["params"]) == {"x", "y", "z"}
