"""torch -> flax -> torch is bit-exact for every rule, over hypothesis-drawn layer configs.

Pure numpy/torch (no JAX compile per example): the rules are layout permutations, applied to the
real torch layer's tensors with a LayerInfo built the way the plan builds it.
"""
from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weight_port.rules import LayerInfo, rule_for
from weight_port.tensors import numpy_to_torch, to_jax, to_numpy

FAST = settings(deadline=None, max_examples=60)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


def _round_trip(layer: torch.nn.Module, flatten=None, flax_module=None, info: LayerInfo | None = None) -> None:
    rule = rule_for(type(layer))
    info = info or LayerInfo("layer", ("layer",), type(layer), layer, flax_module, flatten)
    state = layer.state_dict()
    for tmap in rule.tensors:
        if tmap.torch_name not in state:
            continue
        src = state[tmap.torch_name]
        flax = tmap.to_flax(to_numpy(src), info)
        back = numpy_to_torch(tmap.to_torch(np.asarray(flax), info))
        assert back.dtype == src.dtype and back.shape == src.shape, tmap.torch_name
        # compare bits, so -0.0, NaN payloads and bfloat16 all count
        assert torch.equal(back.view(torch.int8 if src.element_size() == 1 else
                                     {2: torch.int16, 4: torch.int32, 8: torch.int64}[src.element_size()]),
                           src.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[src.element_size()])), tmap.torch_name


@FAST
@given(i=st.integers(1, 6), o=st.integers(1, 6), bias=st.booleans(), dtype=DTYPES,
       flat=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))))
def test_linear(i, o, bias, dtype, flat):
    if flat is not None:
        i = int(np.prod(flat))
    _round_trip(torch.nn.Linear(i, o, bias=bias).to(dtype), flatten=flat)


@FAST
@given(nd=st.integers(1, 3), g=st.integers(1, 3), cin=st.integers(1, 3), cout=st.integers(1, 3),
       k=st.lists(st.integers(1, 3), min_size=3, max_size=3), bias=st.booleans(), dtype=DTYPES,
       transpose=st.booleans())
def test_conv_and_transpose(nd, g, cin, cout, k, bias, dtype, transpose):
    cls = {(1, False): torch.nn.Conv1d, (2, False): torch.nn.Conv2d, (3, False): torch.nn.Conv3d,
           (1, True): torch.nn.ConvTranspose1d, (2, True): torch.nn.ConvTranspose2d,
           (3, True): torch.nn.ConvTranspose3d}[(nd, transpose)]
    _round_trip(cls(cin * g, cout * g, tuple(k[:nd]), groups=g, bias=bias).to(dtype))


class _FlaxTransposeKernel:
    transpose_kernel = True


@FAST
@given(nd=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 4),
       k=st.lists(st.integers(1, 3), min_size=3, max_size=3))
def test_conv_transpose_flax_transposes_kernel(nd, cin, cout, k):
    cls = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[nd]
    _round_trip(cls(cin, cout, tuple(k[:nd])), flax_module=_FlaxTransposeKernel())


@FAST
@given(kind=st.sampled_from(["bn1", "bn2", "bn3", "ln", "gn", "in1", "in2", "in3", "emb"]),
       c=st.integers(1, 6), affine=st.booleans(), dtype=DTYPES)
def test_norms_and_embedding(kind, c, affine, dtype):
    layer = {
        "bn1": lambda: torch.nn.BatchNorm1d(c, affine=affine),
        "bn2": lambda: torch.nn.BatchNorm2d(c, affine=affine),
        "bn3": lambda: torch.nn.BatchNorm3d(c, affine=affine),
        "ln": lambda: torch.nn.LayerNorm(c, elementwise_affine=affine),
        "gn": lambda: torch.nn.GroupNorm(1, c, affine=affine),
        "in1": lambda: torch.nn.InstanceNorm1d(c, affine=affine),
        "in2": lambda: torch.nn.InstanceNorm2d(c, affine=affine),
        "in3": lambda: torch.nn.InstanceNorm3d(c, affine=affine),
        "emb": lambda: torch.nn.Embedding(c, 3),
    }[kind]().to(dtype)
    with torch.no_grad():
        for t in layer.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape))
    _round_trip(layer)


@settings(deadline=None, max_examples=80)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), dtype=DTYPES,
       transpose=st.booleans(), step=st.integers(1, 2))
def test_to_jax_keeps_dtype_and_bits(shape, dtype, transpose, step):
    """Non-contiguous (transposed, strided) and bfloat16 tensors cross into JAX bit-exactly."""
    t = torch.randn(*shape).to(dtype)
    if transpose and t.ndim >= 2:
        t = t.transpose(0, -1)
    t = t[..., ::step]
    a = to_numpy(t)
    with jax.enable_x64(True):  # without x64 JAX narrows float64 (its rule, not the port's)
        j = to_jax(a)
    assert np.dtype(j.dtype) == a.dtype
    assert np.array_equal(np.asarray(j).view(np.uint8), np.ascontiguousarray(a).view(np.uint8))


def test_example_count_is_a_few_hundred():
    # 5 hypothesis tests x (60 or 80) examples = 320 drawn configurations per run
    assert FAST.max_examples * 4 + 80 >= 300
    assert np.dtype(ml_dtypes.bfloat16).itemsize == 2
