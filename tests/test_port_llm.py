"""LLM-style layers: transformers' Conv1D, torch.nn.RMSNorm, tied parameters (a tiny tied LM and
an HF GPT-2 pair built from a config): single-layer parity over a grid, bit-exact round trips,
strict loads."""
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
from test_port_layers import _ok, grid_report
from test_port_roundtrip import _round_trip
from weight_port.plan import build_plan
from weight_port.rules import LayerInfo

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _x(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape)


def _randomized(layer: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    return layer


# -- Conv1D -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flax_kind", ["dense", "hf_conv1d"])
def test_conv1d_grid(flax_kind):
    """Conv1D(nf=out, nx=in) against a Dense ([in, out], no transpose) or HF's FlaxConv1D
    ([out, in], transposed), over in/out sizes including in == out."""
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D

    sizes = [(3, 5), (5, 3), (4, 4)]
    layers = [_randomized(Conv1D(o, i)) for i, o in sizes]
    make = (lambda o: nn.Dense(o)) if flax_kind == "dense" else (lambda o: FlaxConv1D(o, dtype=jnp.float64))
    makers = [lambda o=o: make(o) for _, o in sizes]
    _ok(grid_report(layers, makers, [_x(2, 3, i) for i, _ in sizes], layout=wp.AS_IS))


@pytest.mark.parametrize("out_in", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_conv1d_round_trip_bit_exact(out_in, dtype):
    for i, o in [(3, 5), (4, 4), (1, 7)]:
        layer = _randomized(Conv1D(o, i)).to(dtype)
        info = LayerInfo("layer", ("layer",), Conv1D, layer, None, None, transpose_kernel=out_in)
        _round_trip(layer, info=info)


def test_conv1d_without_flax_module_decided_by_shape_or_refused():
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D

    class Wrap(torch.nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.proj = _randomized(Conv1D(o, i))

        def forward(self, x):
            return self.proj(x)

    class FlaxWrap(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            return FlaxConv1D(self.features, name="proj")(x)

    t = Wrap(3, 5)
    v = wp.torch_to_flax(t, FlaxWrap(5), torch.zeros(2, 3), input_layout=wp.AS_IS)
    assert v["params"]["proj"]["kernel"].shape == (5, 3)
    back = wp.flax_to_torch(v, t)  # no Flax module: [5, 3] can only be [out, in]
    assert all(torch.equal(back[k], x) for k, x in t.state_dict().items())
    square = Wrap(4, 4)
    v = wp.torch_to_flax(square, FlaxWrap(4), torch.zeros(2, 4), input_layout=wp.AS_IS)
    with pytest.raises(wp.KernelLayoutError, match="proj"):
        wp.flax_to_torch(v, square)
    back = wp.flax_to_torch(v, square, FlaxWrap(4), torch.zeros(2, 4), input_layout=wp.AS_IS)
    assert all(torch.equal(back[k], x) for k, x in square.state_dict().items())


# -- RMSNorm ----------------------------------------------------------------------------------
def test_rms_norm_grid():
    layers = [_randomized(torch.nn.RMSNorm(6, eps=1e-5)), torch.nn.RMSNorm(6, elementwise_affine=False),
              _randomized(torch.nn.RMSNorm((3, 6), eps=1e-3)), _randomized(torch.nn.RMSNorm(6))]
    makers = [lambda: nn.RMSNorm(epsilon=1e-5),
              lambda: nn.RMSNorm(epsilon=torch.finfo(torch.float64).eps, use_scale=False),
              lambda: nn.RMSNorm(epsilon=1e-3, reduction_axes=(-2, -1), feature_axes=(-2, -1)),
              # eps=None is finfo(input dtype).eps at run time: the grid runs in float64
              lambda: nn.RMSNorm(epsilon=torch.finfo(torch.float64).eps)]
    _ok(grid_report(layers, makers, [_x(2, 3, 6)] * 4, layout=wp.AS_IS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_round_trip_bit_exact(dtype):
    _round_trip(_randomized(torch.nn.RMSNorm(5)).to(dtype))


@pytest.mark.parametrize("torch_eps", [None, 1e-5])
def test_rms_norm_eps_checked(torch_eps):
    """Flax's default epsilon=1e-6 against torch's eps (None: finfo(float32).eps = 1.19e-07)."""
    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(4, eps=torch_eps)

    class F(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.RMSNorm(4, rngs=rngs)

    with pytest.raises(wp.AttributeMismatchError, match="norm.*eps"):
        wp.torch_to_flax(T(), F(nnx.Rngs(0)))


# -- tied parameters --------------------------------------------------------------------------
V, D = 11, 6
IDS = torch.tensor([[1, 4, 2, 9], [0, 3, 10, 5]])


class TiedLM(torch.nn.Module):
    """An LM head sharing the embedding's storage (state_dict lists it twice)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


class FlaxTiedLM(nn.Module):
    """One leaf for both: the head is ``embed.attend`` (logits = h @ embedding.T)."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, name="embed")
        return embed.attend(nn.LayerNorm(epsilon=1e-5, name="norm")(embed(ids)))


class FlaxUntiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(nn.Embed(V, D, name="embed")(ids))
        return nn.Dense(V, use_bias=False, name="head")(h)


def _logits_close(flax_logits, torch_model) -> None:
    with torch.no_grad():
        ref = torch_model(IDS).numpy()
    c = judge("logits", np.asarray(flax_logits), ref, tolerance_for("float32", FORWARD), layout=wp.AS_IS)
    assert c.ok, str(c)


@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_tied_lm_ported_once_refilled_under_every_name(source):
    t = TiedLM()
    sd = t.state_dict()
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()  # torch lists both
    plan = (build_plan(t, FlaxTiedLM(), IDS, input_layout=wp.AS_IS) if source == "module"
            else build_plan(None, FlaxTiedLM(), IDS, input_layout=wp.AS_IS, state=sd))
    assert plan.tied == {"head.weight": "embed.weight"}
    assert "head.weight" in str(plan) and "tied" in str(plan)
    variables = plan.to_flax(sd)
    assert set(variables["params"]) == {"embed", "norm"}
    _logits_close(FlaxTiedLM().apply(variables, IDS.numpy()), t)
    back = {k: wp.tensors.numpy_to_torch(v) for k, v in plan.to_torch(variables).items()}
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    fresh = TiedLM()
    fresh.load_state_dict(back, strict=True)
    assert fresh.head.weight is fresh.embed.weight
    _logits_close(FlaxTiedLM().apply(variables, IDS.numpy()), fresh)


def test_tied_torch_into_untied_twin_ports_both():
    t = TiedLM()
    plan = build_plan(t, FlaxUntiedLM(), IDS, input_layout=wp.AS_IS)
    assert plan.tied == {}
    variables = plan.to_flax(t.state_dict())
    _logits_close(FlaxUntiedLM().apply(variables, IDS.numpy()), t)


# -- HF GPT-2 ---------------------------------------------------------------------------------
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval(), FlaxGPT2LMHeadModule(config)


def test_hf_gpt2_zero_config_port_round_trip_strict_load():
    t, f = _gpt2()
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    inputs = (ids, mask, pos)
    plan = build_plan(t, f, inputs, input_layout=wp.AS_IS)
    assert plan.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert plan.pairing_notes == []  # every layer paired by name
    variables = plan.to_flax(t.state_dict())
    logits = f.apply(variables, *(x.numpy() for x in inputs)).logits
    with torch.no_grad():
        ref = t(ids).logits.numpy()
    c = judge("logits", np.asarray(logits), ref, tolerance_for("float32", FORWARD), layout=wp.AS_IS)
    assert c.ok, str(c)
    back = wp.flax_to_torch(variables, t, plan=plan)
    sd = t.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    fresh, _ = _gpt2()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(back, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(f.init, jax.random.key(0), *(x.numpy() for x in inputs)))
