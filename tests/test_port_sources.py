"""Checkpoint sources (safetensors lazily, .pt with weights_only, shards, directories), ports
without a torch module, dtypes without a float32 round trip, NaN/Inf, corrupt files, zero-copy."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import weight_port as wp
from weight_port.sources import SafetensorsState, ShardedState, load_state

X = torch.randn(2, 3, 4, 4)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.up = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.ln = torch.nn.LayerNorm(2)

    def forward(self, x):
        return self.ln(self.up(self.bn(self.conv(x))).permute(0, 2, 3, 1))


class FlaxNet(nn.Module):
    """Explicit names; the sourceless port reads layer types (Conv, BatchNorm, ...) off these."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        x = nn.ConvTranspose(2, (2, 2), strides=(2, 2), padding="VALID", name="up")(x)
        return nn.LayerNorm(epsilon=1e-5, name="ln")(x)


def _bits(a) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(a))
    return a.view({2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize])


def _flat(v) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(v)


def _assert_same(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.dtype(fa[k].dtype) == np.dtype(fb[k].dtype), k
        np.testing.assert_array_equal(_bits(fa[k]), _bits(fb[k]), err_msg=str(k))


@pytest.fixture
def model():
    t = TorchNet()
    with torch.no_grad():
        t.bn.running_mean.uniform_(-1, 1)
        t.bn.running_var.uniform_(0.5, 2)
    return t


@pytest.fixture
def reference(model):
    return wp.torch_to_flax(model, FlaxNet(), X)


def test_safetensors_is_lazy_and_matches(model, reference, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    assert isinstance(load_state(path), SafetensorsState)
    _assert_same(wp.torch_to_flax(path, FlaxNet(), X, torch_module=TorchNet()), reference)
    # without a torch module: layer types from the Flax twin (Conv, BatchNorm, ConvTranspose...)
    _assert_same(wp.torch_to_flax(path, FlaxNet(), X), reference)
    _assert_same(wp.torch_to_flax(tmp_path, FlaxNet(), X), reference)  # a directory holding it


def test_pt_weights_only_and_unsafe_pickle(model, reference, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    _assert_same(wp.torch_to_flax(path, FlaxNet(), X, torch_module=TorchNet()), reference)
    bad = tmp_path / "whole_model.pth"
    torch.save(model, bad)  # a pickled module: loading it would run arbitrary code
    with pytest.raises(wp.UnsafeCheckpointError, match="whole_model.pth"):
        wp.torch_to_flax(bad, FlaxNet(), X, torch_module=TorchNet())


def test_sharded_index(model, reference, tmp_path):
    sd = model.state_dict()
    keys = list(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    assert isinstance(load_state(index), ShardedState)
    _assert_same(wp.torch_to_flax(index, FlaxNet(), X, torch_module=TorchNet()), reference)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(wp.CheckpointError, match="b.safetensors is missing"):
        load_state(index)


def test_truncated_and_corrupt_safetensors(model, tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(model.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(wp.CheckpointError, match="cut.safetensors.*truncated"):
        wp.torch_to_flax(path, FlaxNet(), X)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(wp.CheckpointError, match="junk.safetensors"):
        load_state(junk)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_kept_bit_exact(model, dtype, tmp_path):
    m = model.to(dtype)
    path = tmp_path / "m.safetensors"
    save_file(m.state_dict(), str(path))
    with jax.enable_x64(dtype == torch.float64):
        v = wp.torch_to_flax(path, FlaxNet(), X.to(dtype), torch_module=TorchNet())
        k = np.asarray(v["params"]["conv"]["kernel"])
    ref = wp.tensors.to_numpy(m.conv.weight).transpose(2, 3, 1, 0)
    assert k.dtype == ref.dtype
    np.testing.assert_array_equal(_bits(k), _bits(ref))
    back = wp.flax_to_torch(v, m)
    assert all(torch.equal(back[key], val) for key, val in m.state_dict().items())


def test_target_dtype_cast_once(model):
    v = wp.torch_to_flax(model, FlaxNet(), X, dtype=ml_dtypes.bfloat16)
    k = np.asarray(v["params"]["conv"]["kernel"])
    assert k.dtype == np.dtype(ml_dtypes.bfloat16)
    ref = wp.tensors.to_numpy(model.conv.weight.detach().to(torch.bfloat16)).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(_bits(k), _bits(ref))


def test_nonfinite_weights_flagged(model):
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
        model.ln.bias[0] = float("inf")
    with pytest.raises(wp.NonFiniteWeightError, match=r"conv.weight, ln.bias"):
        wp.torch_to_flax(model, FlaxNet(), X)
    v = wp.torch_to_flax(model, FlaxNet(), X, allow_nonfinite=True)
    assert np.isnan(np.asarray(v["params"]["conv"]["kernel"])).any()


def test_non_contiguous_tensors(model, reference):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # same values, exotic strides: a transposed-back copy and a strided slice of a larger tensor
    sd["conv.weight"] = sd["conv.weight"].permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    sd["ln.weight"] = torch.stack([sd["ln.weight"], sd["ln.weight"]], dim=1)[:, 0]
    assert not sd["conv.weight"].is_contiguous() and not sd["ln.weight"].is_contiguous()
    _assert_same(wp.torch_to_flax(sd, FlaxNet(), X, torch_module=TorchNet()), reference)


def test_zero_copy_for_unchanged_layout(model, tmp_path):
    # Zero-copy is opt-in for live tensors (copy=False): the caller may still mutate them.
    v = wp.torch_to_flax(model, FlaxNet(), X, copy=False)
    bias = v["params"]["ln"]["bias"]
    assert bias.unsafe_buffer_pointer() == model.ln.bias.data_ptr()  # same memory, no copy
    kernel = v["params"]["conv"]["kernel"]
    assert kernel.unsafe_buffer_pointer() != model.conv.weight.data_ptr()  # transposed: one copy
    copied = wp.torch_to_flax(model, FlaxNet(), X)  # the default for a module: a private copy
    assert copied["params"]["ln"]["bias"].unsafe_buffer_pointer() != model.ln.bias.data_ptr()
