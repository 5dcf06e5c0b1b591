"""Single-layer parity of every ported layer type over a grid of configs (float64, tiny shapes)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import weight_port
from flax_impl.layers import torch_conv_transpose_padding
from layer_helpers import layer_report
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for
from weight_port import GroupedConvTranspose
from weight_port.layout import AS_IS, CHANNELS_FIRST, to_flax_layout


def _x(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape)


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class TorchGrid(torch.nn.Module):
    """Many single layers, each on its own input: one parity check (one compile) for a grid."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, xs):
        return tuple(layer(x) for layer, x in zip(self.layers, xs))


def _fixed_arity(layers: list[torch.nn.Module]) -> torch.nn.Module:
    """TorchGrid with forward(x0, ..., xn): torch.fx cannot trace *args (it would fall back to
    the much slower torch.export)."""
    names = ", ".join(f"x{i}" for i in range(len(layers)))
    namespace: dict = {"TorchGrid": TorchGrid}
    exec(f"def forward(self, {names}):\n    return TorchGrid.forward(self, ({names},))", namespace)
    cls = type("TorchGrid", (TorchGrid,), {"forward": namespace["forward"]})
    return cls(list(layers))


class FlaxGrid(nn.Module):
    """The twin: ``self.layers = [...]`` in setup names them layers_0, layers_1 (torch layers.0)."""

    makers: tuple

    def setup(self) -> None:
        self.layers = [make() for make in self.makers]

    def __call__(self, *xs, train: bool = False):
        return tuple(
            layer(x, use_running_average=not train) if isinstance(layer, nn.BatchNorm) else layer(x)
            for layer, x in zip(self.layers, xs)
        )


def grid_report(torch_layers, makers, inputs, *, train: bool = False, layout: str = CHANNELS_FIRST):
    """Forward parity of a whole grid in float64, the Flax side under one jax.jit.

    parity.check runs JAX eagerly (one XLA compile per primitive and shape), which for a grid
    of a dozen layers costs ~10 s; one jit of the grid is a fraction of that. Same port, same
    comparison helper and tolerance table as parity.check; gradients are covered by the
    parity.check tests below and the round trips of test_port_roundtrip.py.
    """
    torch_model = _fixed_arity(list(torch_layers)).double().train(train)
    flax_model = FlaxGrid(tuple(makers))
    t_inputs = [torch.as_tensor(x) for x in inputs]
    with jax.enable_x64(True):
        variables = weight_port.torch_to_flax(torch_model, flax_model, t_inputs, input_layout=layout, copy=True)
        f_inputs = [jnp.asarray(to_flax_layout(x, layout)) for x in inputs]

        def forward(v, *xs):
            if train and "batch_stats" in v:
                return flax_model.apply(v, *xs, train=True, mutable=["batch_stats"])[0]
            return flax_model.apply(v, *xs, train=train)

        f_outs = jax.jit(forward)(variables, *f_inputs)
        with torch.no_grad():
            t_outs = torch_model(*t_inputs)
        tol = tolerance_for("float64", FORWARD)
        return [judge(f"output[{i}] ({type(m).__name__})", np.asarray(f), t.numpy(), tol, layout=layout)
                for i, (f, t, m) in enumerate(zip(f_outs, t_outs, torch_layers))]


def _ok(report) -> None:
    if isinstance(report, list):
        bad = [c for c in report if not c.ok]
        assert not bad, "\n".join(str(c) for c in bad)
        return
    assert report.ok, "\n" + str(report)


def test_linear_and_embedding():
    ids = np.array([[0, 3, 5], [2, 2, 1]])
    layers = [torch.nn.Linear(5, 3), torch.nn.Linear(5, 3, bias=False), torch.nn.Embedding(6, 4)]
    makers = [lambda: nn.Dense(3), lambda: nn.Dense(3, use_bias=False), lambda: nn.Embed(6, 4)]
    _ok(grid_report(layers, makers, [_x(2, 5), _x(2, 5), ids], layout=AS_IS))


def test_linear_gradients():
    _ok(layer_report(torch.nn.Linear(5, 3), lambda: nn.Dense(3), _x(2, 5), layout=AS_IS))


CONV_GRID = [
    # (ndim, in, out, kernel, stride, padding, dilation, groups, bias)
    (1, 4, 6, 3, 1, 1, 1, 1, True),
    (1, 4, 4, 3, 2, "valid", 2, 4, True),          # depthwise, dilated, strided
    (2, 4, 6, (3, 2), (2, 1), (1, 0), 1, 2, False),  # non-square kernel, tuples, groups, no bias
    (2, 3, 5, 3, 1, "same", 2, 1, True),            # 'same' with dilation
    (2, 2, 4, (2, 4), 1, "same", 1, 1, True),       # 'same' with even kernels (asymmetric pad)
    (3, 2, 4, (1, 2, 3), 1, (0, 1, 1), 1, 2, True),  # non-cubic kernel
    (3, 2, 2, 2, 2, "valid", 1, 2, False),
]


def _flax_conv_padding(padding, n: int):
    # torch ints are symmetric per dim; Flax takes explicit (low, high) pairs. 'same' and 'valid'
    # agree: both put the odd pixel of an even total padding on the high side.
    if isinstance(padding, str):
        return padding.upper()
    return tuple((p, p) for p in _tuple(padding, n))


def _conv_pair(cfg):
    n, cin, cout, k, s, p, d, g, bias = cfg
    tcls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[n]
    layer = tcls(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias)
    make = lambda: nn.Conv(cout, _tuple(k, n), strides=_tuple(s, n), padding=_flax_conv_padding(p, n),
                           kernel_dilation=_tuple(d, n), feature_group_count=g, use_bias=bias)
    return layer, make, _x(2, cin, *(7,) * n)


def test_conv_grid():
    layers, makers, xs = zip(*(_conv_pair(c) for c in CONV_GRID))
    _ok(grid_report(layers, makers, xs))


CONV_T_GRID = [
    # (ndim, in, out, kernel, stride, padding, output_padding, dilation, groups, bias)
    (1, 4, 6, 3, 2, 1, 1, 1, 1, True),
    (1, 4, 6, 3, 2, 1, 1, 2, 2, True),
    (2, 4, 4, (3, 2), (2, 1), (1, 0), (1, 0), 1, 4, False),  # depthwise, non-square
    (2, 3, 2, 4, 2, 1, 0, 1, 1, True),
    (3, 2, 4, (2, 3, 2), 2, 0, (1, 0, 1), 1, 2, True),
]


def _conv_t_id(c) -> str:
    return f"convT{c[0]}d-k{c[3]}-s{c[4]}-p{c[5]}-op{c[6]}-d{c[7]}-g{c[8]}-b{int(c[9])}"


def _conv_t_pair(cfg):
    n, cin, cout, k, s, p, op, d, g, bias = cfg
    tcls = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[n]
    layer = tcls(cin, cout, k, stride=s, padding=p, output_padding=op, dilation=d, groups=g, bias=bias)
    kk, ss, pp, oo, dd = (_tuple(v, n) for v in (k, s, p, op, d))
    if g == 1:
        # flax's own ConvTranspose (no groups) with torch's padding made explicit
        make = lambda: nn.ConvTranspose(cout, kk, strides=ss, kernel_dilation=dd, use_bias=bias,
                                        padding=torch_conv_transpose_padding(kk, pp, oo, dd))
    else:
        make = lambda: GroupedConvTranspose(cout, kk, strides=ss, padding=pp, output_padding=oo,
                                            dilation=dd, feature_group_count=g, use_bias=bias)
    return layer, make, _x(2, cin, *(4,) * n)


def test_conv_transpose_grid():
    layers, makers, xs = zip(*(_conv_t_pair(c) for c in CONV_T_GRID))
    _ok(grid_report(layers, makers, xs))


def test_grouped_conv_transpose_gradients():
    """Forward and parameter/input gradients through the grouped kernel rule (parity.check)."""
    layer, make, x = _conv_t_pair((2, 4, 6, (3, 2), 2, 1, 1, 1, 2, True))
    _ok(layer_report(layer, make, x))


def test_conv_transpose_flax_transpose_kernel():
    layer = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
    make = lambda: nn.ConvTranspose(2, (3, 3), strides=(2, 2), transpose_kernel=True,
                                    padding=torch_conv_transpose_padding((3, 3), (1, 1), (1, 1)))
    _ok(layer_report(layer, make, _x(2, 3, 4, 4)))


def _bn(n: int):
    layer = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[n](3, eps=1e-3, momentum=0.2)
    with torch.no_grad():  # non-trivial running stats, so eval mode really uses them
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    # torch momentum 0.2 weights the new batch; flax's momentum weights the old value: 0.8
    make = lambda: nn.BatchNorm(momentum=0.8, epsilon=1e-3, use_fast_variance=False)
    return layer, make, _x(2, 3, *(3,) * n)  # BatchNorm1d on [N, C, L]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_norm_grid(train):
    layers, makers, xs = zip(*(_bn(n) for n in (1, 2, 3)))
    _ok(grid_report(layers, makers, xs, train=train))


def test_batch_norm1d_on_features():
    layer, make, _ = _bn(1)
    _ok(layer_report(layer, make, _x(4, 3), layout=AS_IS, train_kw="use_running_average"))


def _affine(layer):
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    return layer


def test_norm_grid():
    """GroupNorm (1, 2, C groups) and InstanceNorm 1d/2d/3d, affine and not, channels-first."""
    pairs = [
        (_affine(torch.nn.GroupNorm(g, 6)), lambda g=g: nn.GroupNorm(num_groups=g, epsilon=1e-5), _x(2, 6, 3, 3))
        for g in (1, 2, 6)
    ]
    for n, affine in [(1, True), (2, True), (2, False), (3, False)]:
        tcls = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}[n]
        layer = tcls(4, affine=affine)
        pairs.append((
            _affine(layer) if affine else layer,
            lambda a=affine: nn.InstanceNorm(epsilon=1e-5, use_scale=a, use_bias=a, use_fast_variance=False),
            _x(2, 4, *(5,) * n),
        ))
    layers, makers, xs = zip(*pairs)
    _ok(grid_report(layers, makers, xs))


def test_layer_norm_affine_and_not():
    layers = [_affine(torch.nn.LayerNorm(6)), torch.nn.LayerNorm(6, elementwise_affine=False),
              _affine(torch.nn.LayerNorm((3, 6), eps=1e-3))]
    makers = [lambda: nn.LayerNorm(epsilon=1e-5),
              lambda: nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False),
              lambda: nn.LayerNorm(epsilon=1e-3, reduction_axes=(-2, -1), feature_axes=(-2, -1))]
    _ok(grid_report(layers, makers, [_x(2, 3, 6)] * 3, layout=AS_IS))


class _TorchTokens(torch.nn.Module):
    """Parameters registered directly on a module: a class token, a position embedding, a scalar."""

    def __init__(self):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 4))
        self.pos = torch.nn.Parameter(torch.randn(1, 4, 4))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.proj(x) * self.scale


class _FlaxTokens(nn.Module):
    @nn.compact
    def __call__(self, x):
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, 4))
        pos = self.param("pos", nn.initializers.zeros, (1, 4, 4))
        scale = self.param("scale", nn.initializers.ones, ())
        x = jnp_concat(cls, x) + pos
        return nn.Dense(4, name="proj")(x) * scale


def jnp_concat(cls, x):
    import jax.numpy as jnp

    return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cls.shape[-1])), x], axis=1)


def test_direct_parameters_copy_unchanged():
    _ok(parity.check(_TorchTokens(), _FlaxTokens(), _x(2, 3, 4), dtype="float64", input_layout=AS_IS))
