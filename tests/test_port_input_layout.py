"""The port reads each undeclared input's layout off the layer that receives it, never off its
number of dimensions, and that search neither runs the whole forward nor touches the model."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import weight_port
from parity.runtime import input_layouts
from weight_port.layout import AS_IS, CHANNELS_FIRST, LayoutError


class TokenMlp(torch.nn.Module):
    """[N, T, D] float tokens into a Linear: a 3-D float input that is not an image."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


class FlaxTokenMlp(nn.Module):
    @nn.compact
    def __call__(self, x):  # [N, T, D]
        return nn.Dense(4, name="fc")(x)


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class FlaxConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # [N, H, W, C]
        return nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)


def _flax_out(flax_module, variables, x_flax):
    return np.asarray(flax_module.apply(variables, jnp.asarray(x_flax)))


@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_token_tensor_ports_as_is_without_a_declared_layout(source):
    # T=5 != D=8: read as [N, C, L] the twin would be traced on [2, 8, 5] and get a [5, 4] kernel
    torch.manual_seed(0)
    model = TokenMlp().eval()
    x = torch.randn(2, 5, 8)
    src = model if source == "module" else model.state_dict()
    variables = weight_port.torch_to_flax(src, FlaxTokenMlp(), x)
    np.testing.assert_allclose(_flax_out(FlaxTokenMlp(), variables, x.numpy()),
                               model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_image_ports_channels_first_from_the_conv_that_receives_it(source):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 7, 6)
    src = model if source == "module" else model.state_dict()
    variables = weight_port.torch_to_flax(src, FlaxConvNet(), x)
    want = model(x).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_flax_out(FlaxConvNet(), variables, x.numpy().transpose(0, 2, 3, 1)),
                               want, rtol=1e-5, atol=1e-6)


class ChannelCheck(nn.Module):
    """A twin that validates its input before any layer sees it (as HF's Flax ViT does)."""

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != 3:
            raise ValueError("channel dimension must be 3")
        return nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)


def test_undecidable_input_without_a_torch_module_names_the_input_and_the_flag():
    sd = ConvNet().state_dict()
    with pytest.raises(LayoutError, match=r"input 0 \(2, 3, 7, 6\).*input_layout="):
        weight_port.torch_to_flax(sd, ChannelCheck(), torch.randn(2, 3, 7, 6))
    # declared, the same port works
    weight_port.torch_to_flax(sd, ChannelCheck(), torch.randn(2, 3, 7, 6), input_layout=CHANNELS_FIRST)


class Counting(torch.nn.Module):
    """Conv first, then a layer that counts its calls and a train-mode BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.calls = 0

    def forward(self, x):
        y = self.bn(self.conv(x))
        self.calls += 1
        return y


def test_consumer_search_stops_at_the_consumer_and_leaves_the_model_alone():
    model = Counting().train()
    x = torch.randn(2, 3, 5, 5) * 10 + 3
    layouts = input_layouts(model, (x,))
    assert layouts == {"input[0]": CHANNELS_FIRST}
    assert model.calls == 0  # stopped before the forward finished
    assert model.training and model.bn.training  # modes restored
    assert torch.equal(model.bn.running_mean, torch.zeros(3))


class BnFirst(torch.nn.Module):
    """The input goes through a BatchNorm1d (no layout of its own) before any known consumer."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(12)
        self.fc = torch.nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(self.bn(x.flatten(1)))


def test_failed_search_runs_in_eval_mode_so_running_statistics_do_not_move():
    model = BnFirst().train()
    x = torch.randn(4, 3, 2, 2) * 5 + 2
    with pytest.raises(LayoutError, match=r"input\[0\].*input_layout="):
        input_layouts(model, (x,))
    assert torch.equal(model.bn.running_mean, torch.zeros(12))
    assert model.training and model.bn.training
    assert input_layouts(model, (x,), CHANNELS_FIRST) == {"input[0]": CHANNELS_FIRST}
    assert input_layouts(model, (x,), AS_IS) == {"input[0]": AS_IS}


def test_nnx_twin_decides_an_undeclared_input_when_porting_a_state_dict():
    from flax import nnx

    class NnxTokenMlp(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(8, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):  # [N, T, D]
            return self.fc(x)

    class NnxConvNet(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 4, (3, 3), padding="VALID", rngs=nnx.Rngs(0))

        def __call__(self, x):  # [N, H, W, C]
            return self.conv(x)

    torch.manual_seed(0)
    tokens, conv = TokenMlp().eval(), ConvNet().eval()
    x_tok, x_img = torch.randn(2, 5, 8), torch.randn(2, 3, 7, 6)
    twin = NnxTokenMlp()
    weight_port.torch_to_flax(tokens.state_dict(), twin, x_tok)  # T=5 != D=8: as-is or it fails
    state = weight_port.torch_to_flax(tokens.state_dict(), twin, x_tok)
    nnx.update(twin, state)
    np.testing.assert_allclose(np.asarray(twin(jnp.asarray(x_tok.numpy()))), tokens(x_tok).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    img_twin = NnxConvNet()
    nnx.update(img_twin, weight_port.torch_to_flax(conv.state_dict(), img_twin, x_img))
    np.testing.assert_allclose(np.asarray(img_twin(jnp.asarray(x_img.numpy().transpose(0, 2, 3, 1)))),
                               conv(x_img).detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


# -- a twin that takes torch's layout: the shape error says which layout fits ------------------------
class TorchConvs(torch.nn.Module):
    def __init__(self, out: int = 3):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, out, 3, padding=1)

    def forward(self, x):
        return self.conv_out(self.conv_in(x))


class FlaxTakesNCHW(nn.Module):
    """Like diffusers' Flax UNet: takes [N, C, H, W] and transposes inside."""

    out: int = 3

    @nn.compact
    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1))
        x = nn.Conv(self.out, (3, 3), padding=1, name="conv_out")(nn.Conv(8, (3, 3), padding=1, name="conv_in")(x))
        return jnp.transpose(x, (0, 3, 1, 2))


IMG16 = torch.randn(2, 3, 16, 16)


def test_shape_error_that_the_other_layout_fixes_names_the_flag():
    with pytest.raises(weight_port.ShapeMismatchError) as err:
        weight_port.torch_to_flax(TorchConvs(), FlaxTakesNCHW(), IMG16)
    msg = str(err.value)
    assert "conv_in.weight" in msg and "flax expects (3, 3, 16, 8)" in msg
    assert "traced as 'as_is' instead of the inferred 'NC...'" in err.value.hint
    assert "input_layout='as_is'" in msg and "--layout as_is" in msg
    variables = weight_port.torch_to_flax(TorchConvs(), FlaxTakesNCHW(), IMG16, input_layout=AS_IS)
    assert variables["params"]["conv_in"]["kernel"].shape == (3, 3, 3, 8)


def test_shape_error_no_layout_fixes_has_no_hint():
    """A twin of another width: no layout makes the shapes agree, so no layout is suggested."""
    with pytest.raises(weight_port.ShapeMismatchError) as err:
        weight_port.torch_to_flax(TorchConvs(out=3), FlaxTakesNCHW(out=4), IMG16, input_layout=AS_IS)
    assert err.value.hint == "" and "hint" not in str(err.value)
