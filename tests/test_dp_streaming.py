"""Streaming ports: a sharded checkpoint ported a shard at a time, bit-exact, in bounded memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import weight_port as wp
from parity.cli import main
from parity.registry import PAIRS

ROOT = Path(__file__).resolve().parents[1]
# Memory bound of a streamed port, beyond the shards themselves: orbax/tensorstore's first save
# (its thread pools and write buffers) costs ~110 MiB of RSS on the CPU box whatever the model
# size; later parts add a few MiB each (allocator arenas). A whole-model port of the same
# checkpoint grows by ~4.5x the model (290 MiB here), so the bound still separates the two.
STREAM_OVERHEAD_BYTES = 128 << 20


def _shard(state: dict, names: list[list[str]], d: Path) -> Path:
    """Write ``state`` as one safetensors file per key list plus the HF-style index."""
    weight_map = {}
    for i, keys in enumerate(names):
        name = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys}, str(d / name))
        weight_map.update({k: name for k in keys})
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.fixture(scope="module")
def bn_unet(tmp_path_factory):
    pair = PAIRS["unet-same-bn"]
    torch_model, flax_model = pair.build(pair.config("tiny"), seed=5)
    sd = torch_model.state_dict()
    keys = list(sd)
    # three shards; the cut falls inside a layer (its weight and bias in different shards)
    cuts = [keys[:3], keys[3:len(keys) // 2 + 1], keys[len(keys) // 2 + 1:]]
    index = _shard(sd, cuts, tmp_path_factory.mktemp("sharded"))
    reference = wp.torch_to_flax(torch_model, flax_model, pair.example_input(batch=1), input_layout=pair.layout)
    return pair, torch_model, flax_model, index, reference


def _assert_bit_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=str(k))


def test_cli_streams_sharded_checkpoint_bit_exact(bn_unet, tmp_path, capsys):
    pair, _, _, index, reference = bn_unet
    out = tmp_path / "streamed"
    assert main(["port", str(index), "--model", "unet-same-bn", "--out", str(out)]) == 0
    assert "streamed, 3 parts" in capsys.readouterr().out
    manifest = json.loads((out / wp.streaming.MANIFEST).read_text())
    assert [p["source"] for p in manifest["parts"]] == sorted({p["source"] for p in manifest["parts"]})
    _assert_bit_equal(wp.load_streamed(out), reference)
    assert "batch_stats" in wp.load_streamed(out)  # every collection, not only params


def test_load_streamed_reads_plain_checkpoint(bn_unet, tmp_path):
    pair, torch_model, _, _, reference = bn_unet
    src = tmp_path / "whole.safetensors"
    save_file(torch_model.state_dict(), str(src))
    out = tmp_path / "plain"
    assert main(["port", str(src), "--model", "unet-same-bn", "--out", str(out)]) == 0
    assert not wp.streaming.is_streamed(out)
    _assert_bit_equal(wp.load_streamed(out), reference)


def test_streamed_missing_key_fails_before_writing(bn_unet, tmp_path):
    pair, torch_model, _, _, _ = bn_unet
    sd = dict(torch_model.state_dict())
    dropped = [k for k in sd if k.endswith("weight")][-1]  # a key of the LAST shard's layer
    del sd[dropped]
    keys = list(sd)
    index = _shard(sd, [keys[: len(keys) // 2], keys[len(keys) // 2:]], tmp_path)
    out = tmp_path / "out"
    with pytest.raises(wp.KeyMismatchError, match=dropped.replace(".", r"\.")):
        wp.write_streamed(wp.build_plan(*pair.build(pair.config("tiny")),
                                        pair.example_input(batch=1), input_layout=pair.layout),
                          wp.load_state(index), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_torch_to_flax_places_on_sharding(bn_unet):
    pair, torch_model, flax_model, index, reference = bn_unet
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = pair.example_input(batch=1)
    by_fn = wp.torch_to_flax(index, flax_model, x, torch_module=torch_model, input_layout=pair.layout,
                             sharding=lambda leaf: replicated)
    _assert_bit_equal(by_fn, reference)
    assert all(v.sharding == replicated for v in jax.tree.leaves(by_fn))
    tree = jax.tree.map(lambda _: replicated, reference)
    by_tree = wp.torch_to_flax(torch_model, flax_model, x, input_layout=pair.layout, sharding=tree)
    _assert_bit_equal(by_tree, reference)
    partial_tree = {"params": tree["params"]}  # batch_stats missing: named, not guessed
    with pytest.raises(KeyError, match="batch_stats"):
        wp.torch_to_flax(torch_model, flax_model, x, input_layout=pair.layout, sharding=partial_tree)


def test_streamed_port_peak_memory_bounded_by_shard(tmp_path):
    width, layers, per_shard = 1024, 16, 4
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(0, layers, per_shard):
        name = f"model-{s // per_shard:05d}.safetensors"
        tensors = {}
        for i in range(s, s + per_shard):
            tensors[f"layers.{i}.weight"] = rng.standard_normal((width, width), dtype=np.float32)
            tensors[f"layers.{i}.bias"] = rng.standard_normal((width,), dtype=np.float32)
        save_numpy(tensors, str(tmp_path / name))
        weight_map.update({k: name for k in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shard_bytes = max((tmp_path / n).stat().st_size for n in set(weight_map.values()))
    model_bytes = layers * (width * width + width) * 4
    assert model_bytes >= 4 * shard_bytes - 4096 * layers  # the premise: the model is >= 4 shards
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "stream_memory_child.py"), str(tmp_path),
         str(tmp_path / "out"), str(width), str(layers), "streamed"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])["peak_growth"]
    bound = 2 * shard_bytes + STREAM_OVERHEAD_BYTES
    assert growth < bound, (f"peak RSS grew {growth >> 20} MiB porting a {model_bytes >> 20} MiB model "
                            f"in {shard_bytes >> 20} MiB shards; bound {bound >> 20} MiB")
