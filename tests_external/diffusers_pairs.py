"""Tiny diffusers pairs (torch model, diffusers' own Flax model, inputs) built from constructor
arguments only (no hub, no network): the diffusers half of the external battery's registry.

diffusers' Flax models take torch's NCHW inputs and transpose inside, so every pair is checked
with ``input_layout="as_is"``. Their GroupNorms have a fixed 32 groups, hence channels in 32s.

Where diffusers' Flax port computes something else than its torch model (the upstream findings,
named by the battery), ``build()`` makes the torch side compute what the Flax port computes, so
the rest of the pair is tested; ``build(shipped=True)`` leaves the torch model as diffusers builds it:

- Transformer2DModel's GroupNorm has eps=1e-6 in torch, FlaxTransformer2DModel's 1e-5: the weight
  port refuses the shipped pair, naming each such layer.
- GEGLU gates with exact (erf) GELU in torch (``F.gelu(gate)``), FlaxGEGLU with ``nn.gelu``, whose
  default is the tanh approximation: the trap lint names each one (~2e-4 relative at the layer).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def _normal(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).standard_normal(shape), dtype=torch.float32)


def _unet_inputs() -> tuple:
    # (sample [N, C, H, W], integer timesteps [N], encoder_hidden_states [N, T, cross_attention_dim])
    return _normal(2, 4, 8, 8), torch.tensor([3, 50]), _normal(2, 5, 16, seed=1)


def _controlnet_inputs() -> tuple:
    # ... plus the conditioning image, at twice the sample's size (one stride-2 embedding conv here)
    return (*_unet_inputs(), _normal(2, 3, 16, 16, seed=2))


# 64 channels, two per group: with one channel per group (32), GroupNorm removes the time
# embedding's per-channel shift exactly, and every time-embedding gradient is zero in exact
# arithmetic (its float32 value pure rounding noise, which no judge can call right or wrong).
_CROSS_ATTN = dict(in_channels=4, block_out_channels=(64,), layers_per_block=1, cross_attention_dim=16,
                   attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",))


@dataclass(frozen=True)
class DiffusersPair:
    name: str
    torch_cls: str  # diffusers class name
    flax_cls: str
    config: dict  # constructor arguments of both classes
    inputs: Callable[[], tuple]
    misport: str  # torch path of a layer whose weight the mis-port test perturbs
    torch_only: dict = field(default_factory=dict)  # constructor arguments the Flax class lacks
    # ControlNet's output convolutions start at zero (on both sides): every output and gradient
    # would be 0 = 0. Drawn at random in torch before the port, so the check compares something.
    random_zero_init: bool = False
    judged: tuple[str, ...] = ()  # torch paths whose per-layer rows the float32 check must judge

    def build(self, shipped: bool = False):
        """(torch model in eval mode, Flax Linen module, inputs); see the module docstring."""
        import diffusers

        torch.manual_seed(0)
        tm = getattr(diffusers, self.torch_cls)(**self.config, **self.torch_only).eval()
        if self.random_zero_init:
            with torch.no_grad():
                for p in tm.parameters():
                    if not p.any():
                        p.normal_(0.0, 0.1)
        if not shipped:
            as_flax_computes(tm)
        return tm, getattr(diffusers, self.flax_cls)(**self.config), self.inputs()


def as_flax_computes(tm: torch.nn.Module) -> None:
    """Make the torch model compute what diffusers' Flax port computes (the upstream findings)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for m in tm.modules():
        if isinstance(m, Transformer2DModel):
            m.norm.eps = 1e-5  # FlaxTransformer2DModel: nn.GroupNorm(num_groups=32, epsilon=1e-5)
        if isinstance(m, GEGLU):
            m.gelu = lambda gate: F.gelu(gate, approximate="tanh")  # FlaxGEGLU: nn.gelu (tanh default)


def transformer_norms(tm: torch.nn.Module) -> list[str]:
    """Paths of the GroupNorms the shipped Flax port gives another eps (Transformer2DModel.norm)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [f"{p}.norm" for p, m in tm.named_modules() if isinstance(m, Transformer2DModel)]


def geglus(tm: torch.nn.Module) -> list[str]:
    """Paths of the GEGLU layers (exact GELU in torch, tanh in the shipped Flax port)."""
    from diffusers.models.activations import GEGLU

    return [p for p, m in tm.named_modules() if isinstance(m, GEGLU)]


PAIRS: dict[str, DiffusersPair] = {p.name: p for p in [
    # Cross-attention in the mid block only: a CrossAttn down and up block would add 75 layers
    # (and 15 s) of the same kinds, named by the same rule.
    DiffusersPair("unet2d_condition", "UNet2DConditionModel", "FlaxUNet2DConditionModel",
                  dict(_CROSS_ATTN, sample_size=8, out_channels=4, down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",)),
                  _unet_inputs, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
    DiffusersPair("autoencoder_kl", "AutoencoderKL", "FlaxAutoencoderKL",
                  dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                       up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), layers_per_block=1,
                       latent_channels=4, sample_size=8),
                  lambda: (_normal(2, 3, 8, 8),), "decoder.up_blocks.0.resnets.1.conv2"),
    # The Flax ControlNet has no conditioning_channels (its init makes a 3-channel image) and torch's
    # no sample_size (Flax uses it only to init).
    DiffusersPair("controlnet", "ControlNetModel", "FlaxControlNetModel",
                  dict(_CROSS_ATTN, conditioning_embedding_out_channels=(16, 32)), _controlnet_inputs,
                  "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                  torch_only=dict(conditioning_channels=3), random_zero_init=True,
                  # what ControlNet has beyond the UNet's down half: the conditioning image's embedding
                  # and the (zero-initialised) output convolutions, each judged as a layer
                  judged=("controlnet_cond_embedding.conv_in", "controlnet_cond_embedding.conv_out",
                          "controlnet_down_blocks.0", "controlnet_down_blocks.1", "controlnet_mid_block")),
]}

# The pairs whose float32 check (and mis-port check) the battery runs: all three (ControlNet's
# check has 97 per-layer rows, 73 of them judged, its conditioning embedding and output
# convolutions among them).
CHECKED = ("unet2d_condition", "autoencoder_kl", "controlnet")


def misported_variables(pair, tm: torch.nn.Module, fm, inputs) -> dict:
    """The twin's ported variables with ``pair.misport``'s weight scaled by 1 + 1e-3 (a planted bug)."""
    import copy

    from flax import traverse_util

    import weight_port

    plan = weight_port.build_plan(copy.deepcopy(tm), fm, inputs, input_layout="as_is")
    variables = plan.to_flax(tm.state_dict())
    layer = next(lay for lay in plan.layers if lay.info.torch_path == pair.misport)
    leaf = next(t.flax_name for t in layer.rule.tensors if t.torch_name == "weight")
    flat = traverse_util.flatten_dict(variables["params"])
    key = (*layer.info.flax_path, *leaf.split("/"))
    flat[key] = flat[key] * (1 + 1e-3)
    return {**variables, "params": traverse_util.unflatten_dict(flat)}
