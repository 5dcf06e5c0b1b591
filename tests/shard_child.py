"""Child process for test_golden_sharded: parity.verify with mesh= on 8 simulated CPU devices.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX initialises (the
parent test process has one CPU device). argv: a directory holding the bundles mlp/ and cnn/
(recorded by the parent, batch 8). Prints one JSON object of what the tests assert; runs no torch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np


def _report(r) -> dict:
    return {"verdict": r.verdict, "first_divergence": r.first_divergence, "dtype": r.dtype,
            "comparisons": [{"name": c.name, "ok": c.ok, "max_abs": c.max_abs, "rel_norm": c.rel_norm,
                             "expected_at_worst": c.expected_at_worst, "grad": c in r.grads}
                            for c in r.outputs + r.grads],
            "layers": {row.name: bool(row.ok) for row in r.layers},
            "sharding": r.env.get("sharding"), "warnings": r.warnings}


def _placed(bundle: Path, twin) -> dict:
    """The mlp's weights ported straight into data=2,model=4: what each device really holds."""
    import weight_port
    from parity.golden import read_bundle
    from parity.sharding import Placement

    b = read_bundle(bundle)
    weights = b.tensors("weights.safetensors")
    x = b.group("run.safetensors", "main", "input")["input[0]"]
    plan = weight_port.build_plan(None, twin, (x,), state=weights, input_layout=[weight_port.AS_IS])
    placement = Placement("data=2,model=4")
    placed = jax.tree_util.tree_leaves_with_path(placement.port(plan, weights))
    plain = dict(jax.tree_util.tree_leaves_with_path(plan.to_flax(weights)))
    out = {}
    for path, arr in placed:
        out[jax.tree_util.keystr(path)] = {
            "shape": list(arr.shape), "spec": [None if d is None else d for d in arr.sharding.spec],
            "devices": len(arr.sharding.device_set),
            "shard_shapes": sorted({tuple(s.data.shape) for s in arr.addressable_shards}),
            "bytes_on_devices": int(sum(s.data.nbytes for s in arr.addressable_shards)),
            "bytes": int(arr.nbytes), "equal": bool(np.array_equal(np.asarray(arr), np.asarray(plain[path])))}
    return out


def _planted(bundle: Path, twin):
    """The mlp's correct variables with layers_1's kernel off by 0.1% (on the host, unsharded)."""
    import weight_port
    from parity.golden import read_bundle

    b = read_bundle(bundle)
    weights = b.tensors("weights.safetensors")
    x = b.group("run.safetensors", "main", "input")["input[0]"]
    variables = weight_port.build_plan(None, twin, (x,), state=weights, input_layout=[weight_port.AS_IS]).to_flax(weights)
    params = dict(variables["params"])
    params["layers_1"] = {**params["layers_1"], "kernel": params["layers_1"]["kernel"] * 1.001}
    return {**variables, "params": params}


def _error(fn) -> str:
    from parity.sharding import ShardingError

    try:
        fn()
    except ShardingError as exc:
        return f"ShardingError: {exc}"
    return "no error"


def main() -> None:
    import parity
    from parity.registry import select
    from parity.sharding import Placement, ShardOptions, make_mesh

    root = Path(sys.argv[1])
    out: dict = {"devices": len(jax.devices()), "torch_loaded": "torch" in sys.modules}
    for name in ("mlp", "cnn"):
        pair = select([name])[0]
        twin = pair.flax_cls()(pair.tiny())
        out[name] = {"unsharded": _report(parity.verify(root / name, twin))}
        for mesh in ("data=2,model=4", "data=8"):
            out[name][mesh] = _report(parity.verify(root / name, twin, mesh=mesh))
    pair = select(["mlp"])[0]
    twin = pair.flax_cls()(pair.tiny())
    mlp = root / "mlp"
    out["mlp_tp_model8"] = _report(parity.verify(mlp, twin, mesh=make_mesh("model=8"), shard=ShardOptions("tp")))
    out["mlp_rule"] = _report(parity.verify(mlp, twin, mesh="data=2,model=4", layers=False, shard=ShardOptions(
        rules=("params/layers_0/kernel=model,data", ".*/bias=model"))))
    out["placed"] = _placed(mlp, twin)
    odd = Placement("data=2,model=4")  # a batch of 3 does not split over data=2
    placed = odd.inputs((np.zeros((3, 4), np.float32), {"mask": np.ones((3,), np.float32)}))
    out["odd_batch"] = {"specs": odd.input_specs, "notes": [n.text for n in odd.notes],
                        "replicated": [bool(a.sharding.is_fully_replicated) for a in jax.tree_util.tree_leaves(placed)]}
    out["planted"] = _report(parity.verify(mlp, twin, mesh="data=2,model=4", variables=_planted(mlp, twin)))
    out["errors"] = {
        "too_many_devices": _error(lambda: parity.verify(mlp, twin, mesh="data=4,model=4")),
        "bad_mesh": _error(lambda: parity.verify(mlp, twin, mesh="data=2,model")),
        "rule_matches_nothing": _error(lambda: parity.verify(mlp, twin, mesh="data=8", shard=ShardOptions(
            rules=(".*/attention/kernel=data",)))),
        "rule_too_long": _error(lambda: parity.verify(mlp, twin, mesh="data=8", shard=ShardOptions(
            rules=("params/layers_0/bias=data,None",)))),
        "rule_unknown_axis": _error(lambda: parity.verify(mlp, twin, mesh="data=8", shard=ShardOptions(
            rules=(".*/kernel=None,model",)))),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
