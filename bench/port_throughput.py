"""Weight-port throughput and memory, on a synthetic state_dict and on a real HF model.

Synthetic: a ViT-Large-size fp32 state_dict (~1.1 GiB; ``--quick``: a tiny ViT) ported three ways
-- the numpy round trip (a transposed numpy copy, then jnp.asarray), numpy's lazy transpose view
handed to jnp.asarray, and PortPlan.to_flax (plan built outside the timed region).

Real (``--real``; needs transformers): HF ``ViTModel`` at ViT-Large size (random init from a
config, 1.13 GiB fp32) as the source module and ``FlaxViTModule`` as the target. Timed is
everything the user waits for: ``weight_port.torch_to_flax(module, flax_module, x)`` = planning,
tracing, conversion and arrays on the device, in a fresh process (cold caches, like a user's first
call); against transformers' ``convert_pytorch_state_dict_to_flax`` in the same run (its mandatory
random Flax init is not timed). ``--before DIR`` also times the weight_port of another checkout
(e.g. the main branch) in the same run.

Every approach runs in its own subprocess per repetition, so one's memory never pollutes
another's peak RSS; medians are reported. Usage:
    python bench/port_throughput.py [--quick] [--repeat N] [--real [--before DIR] [--phases]]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
if os.environ.get("PORT_BENCH_CODE"):  # --before: this worker times another checkout's port
    sys.path.insert(0, os.environ["PORT_BENCH_CODE"])

GIB = 1024**3
VIT_L = dict(dim=1024, depth=24, mlp=4096, patch=16, image=224, classes=1000)
TINY = dict(dim=64, depth=2, mlp=256, patch=16, image=64, classes=10)


# -- the model: a timm-style ViT state_dict and its Flax twin (names mirror torch's) -------------
def vit_state(cfg: dict, seed: int = 0) -> dict:
    """fp32 tensors named like timm's ViT: patch_embed.proj, blocks.i.attn.qkv, ... ([out, in])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d, m, p, n = cfg["dim"], cfg["mlp"], cfg["patch"], (cfg["image"] // cfg["patch"]) ** 2 + 1

    def t(*shape):
        return torch.empty(*shape).uniform_(-0.02, 0.02, generator=g)

    sd = {"cls_token": t(1, 1, d), "pos_embed": t(1, n, d),
          "patch_embed.proj.weight": t(d, 3, p, p), "patch_embed.proj.bias": t(d)}
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": t(d), b + "norm1.bias": t(d),
                   b + "attn.qkv.weight": t(3 * d, d), b + "attn.qkv.bias": t(3 * d),
                   b + "attn.proj.weight": t(d, d), b + "attn.proj.bias": t(d),
                   b + "norm2.weight": t(d), b + "norm2.bias": t(d),
                   b + "mlp.fc1.weight": t(m, d), b + "mlp.fc1.bias": t(m),
                   b + "mlp.fc2.weight": t(d, m), b + "mlp.fc2.bias": t(d)})
    sd.update({"norm.weight": t(d), "norm.bias": t(d),
               "head.weight": t(cfg["classes"], d), "head.bias": t(cfg["classes"])})
    return sd


def flax_vit(cfg: dict):
    """The Flax twin (only its variable structure matters here: it is abstract-initialised)."""
    import flax.linen as nn
    import jax.numpy as jnp

    d, m, p = cfg["dim"], cfg["mlp"], cfg["patch"]

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(d, name="proj")(nn.Dense(3 * d, name="qkv")(x)[..., :d])

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(m, name="fc1")(x)))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + Attn(name="attn")(nn.LayerNorm(epsilon=1e-5, name="norm1")(x))
            return x + Mlp(name="mlp")(nn.LayerNorm(epsilon=1e-5, name="norm2")(x))

    class PatchEmbed(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="proj")(x)
            return x.reshape(x.shape[0], -1, d)

    class ViT(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = PatchEmbed(name="patch_embed")(x)
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
            x = x + self.param("pos_embed", nn.initializers.zeros, (1, x.shape[1], d))
            for i in range(cfg["depth"]):
                x = Block(name=f"blocks_{i}")(x)
            return nn.Dense(cfg["classes"], name="head")(nn.LayerNorm(epsilon=1e-5, name="norm")(x[:, 0]))

    return ViT()


# -- memory ---------------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:  # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# -- the two approaches -----------------------------------------------------------------------------
def _layout(k: str, a):
    """The per-tensor layout change, decided here by key and ndim (fine for this fixed model)."""
    import numpy as np

    if k.endswith(".weight") and a.ndim == 4:
        return np.transpose(a, (2, 3, 1, 0))  # conv OIHW -> HWIO
    if k.endswith(".weight") and a.ndim == 2:
        return a.T  # linear [out, in] -> [in, out]
    return a


def _numpy_round_trip(sd: dict) -> dict:
    """The issue's baseline: per tensor, .numpy(), a transposed numpy copy, then jnp.asarray."""
    import jax.numpy as jnp
    import numpy as np

    return {k: jnp.asarray(np.ascontiguousarray(_layout(k, v.numpy()))) for k, v in sd.items()}


def _plain(sd: dict) -> dict:
    """numpy's lazy transpose view handed to jnp.asarray (JAX does the strided copy itself)."""
    import jax.numpy as jnp

    return {k: jnp.asarray(_layout(k, v.numpy())) for k, v in sd.items()}


APPROACHES = {"numpy_round_trip": _numpy_round_trip, "plain": _plain}
PHASES = ("phases", "floor_memcpy", "floor_transpose")


def worker(approach: str, cfg: dict, repeat: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    jnp.zeros(1).block_until_ready()  # backend up before the memory baseline
    sd = vit_state(cfg)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    plan = None
    if approach == "weight_port":
        from weight_port.plan import build_plan

        t0 = time.perf_counter()
        x = np.zeros((1, 3, cfg["image"], cfg["image"]), np.float32)
        plan = build_plan(None, flax_vit(cfg), x, state=sd)
        plan_s = time.perf_counter() - t0
        convert = lambda: plan.to_flax(sd, copy=False)  # zero-copy: what a checkpoint load does
    else:
        plan_s = 0.0
        convert = lambda: APPROACHES[approach](sd)
    small = dict(list(sd.items())[:6])  # warm-up outside the timed region
    jax.block_until_ready(plan.to_flax(small, collections=()) if plan else APPROACHES[approach](small))
    times, peak = [], 0
    out = None
    for _ in range(repeat):
        out = None  # free the previous result before measuring the next
        base = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        out = convert()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        peak = max(peak, _status("VmHWM") - base)
    result = dict(approach=approach, bytes=nbytes, seconds=min(times), gib_s=nbytes / GIB / min(times),
                  peak_rss_growth=peak, plan_seconds=plan_s, tensors=len(sd))
    if plan is not None:
        # parity: every leaf equals the plain approach's (recomputed per tensor, cheap)
        from flax import traverse_util

        flat = traverse_util.flatten_dict(out)
        unchanged = zero_copy = 0
        for layer in plan.layers:
            for tmap in layer.rule.tensors:
                key = layer.torch_key(tmap.torch_name)
                leaf = flat[layer.flax_leaf(tmap.collection, tmap.flax_name)]
                ref = _plain({key: sd[key]})[key]
                assert np.array_equal(np.asarray(leaf), np.asarray(ref)), f"{key} differs from the plain port"
                if tmap.to_flax.__name__ == "_identity":
                    unchanged += 1
                    zero_copy += leaf.unsafe_buffer_pointer() == sd[key].data_ptr()
        result.update(layout_unchanged=unchanged, zero_copy=zero_copy, parity="ok")
    return result


# -- the real-model workload: HF ViT-Large -------------------------------------------------------
def _hf_vit_config():
    from transformers import ViTConfig

    return ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, image_size=224, patch_size=16)


def _hf_vit_torch(cfg):
    """ViTModel with random weights, built on the meta device and filled in place: HF's own
    truncated-normal init of 300M parameters takes ~20 s and is not what is measured."""
    import torch
    from transformers import ViTModel

    with torch.device("meta"):
        model = ViTModel(cfg)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.normal_(0.0, 0.02, generator=g) if t.is_floating_point() else t.zero_()
    return model


def real_worker(approach: str) -> dict:
    """One cold port of HF ViT-L in this (fresh) process; returns seconds and peak RSS growth."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    jnp.zeros(1).block_until_ready()  # backend up before the memory baseline
    cfg = _hf_vit_config()
    model = _hf_vit_torch(cfg)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    from transformers.models.vit.modeling_flax_vit import FlaxViTModule

    if approach == "hf_convert":
        from transformers import FlaxViTModel
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

        from types import SimpleNamespace

        # The converter reads only flax_model.base_model_prefix and the shapes of
        # flax_model.params. Zeros stand in for HF's random init (9 s, untimed either way);
        # np.zeros is lazily mapped, so it adds no resident memory.
        shapes = jax.eval_shape(FlaxViTModule(cfg).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        flax_model = SimpleNamespace(base_model_prefix=FlaxViTModel.base_model_prefix,
                                     params=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)["params"])
        sd = dict(model.state_dict())
        run = lambda: convert_pytorch_state_dict_to_flax(sd, flax_model)
    else:
        import weight_port

        x = torch.zeros(1, 3, 224, 224)
        run = lambda: weight_port.torch_to_flax(model, FlaxViTModule(cfg), x)
    base = _status("VmRSS")
    _reset_peak()
    c0, t0 = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(run())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status("VmHWM") - base
    if approach != "hf_convert":  # parity: every leaf equals HF's own converter's
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # noqa: F401
        from flax import traverse_util

        flat = traverse_util.flatten_dict(out["params"])
        q = model.encoder.layer[0].attention.attention.query.weight.detach().numpy()
        ok = np.array_equal(np.asarray(flat[("encoder", "layer", "0", "attention", "attention", "query",
                                             "kernel")]), q.T)
        assert ok, "query kernel differs from the torch weight transposed"
    return dict(approach=approach, bytes=nbytes, seconds=seconds, gib_s=nbytes / GIB / seconds,
                cpu_seconds=cpu, peak_rss_growth=peak, tensors=len(model.state_dict()))


def phases_worker(which: str) -> dict:
    """Where a cold HF ViT-L port's time goes, in this (fresh) process.

    which="phases": build_plan alone (the twin's abstract trace, pairing, flatten decision), cold
    as in a user's first call, then PortPlan.to_flax alone (one thread, no overlap).
    The floor any converter pays on this machine for the same bytes, each in its own process
    (freed memory is reused without page faults, so one floor would flatter the next):
    which="floor_memcpy": every tensor copied once into fresh memory (memcpy plus first-touch page
    faults); which="floor_transpose": the same with the Linear weights transposed (torch's blocked
    transpose, as the port does), then once more into the now-mapped memory (no page faults).
    All single-threaded.
    """
    import jax
    import jax.numpy as jnp
    import torch

    from weight_port.plan import build_plan
    from weight_port.tensors import single_threaded_torch

    jnp.zeros(1).block_until_ready()
    cfg = _hf_vit_config()
    model = _hf_vit_torch(cfg)
    from transformers.models.vit.modeling_flax_vit import FlaxViTModule

    sd = dict(model.state_dict())
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    linear = {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {}

    def timed(name, fn):
        c0, t0 = time.process_time(), time.perf_counter()
        result = jax.block_until_ready(fn())
        out[name] = (time.perf_counter() - t0, time.process_time() - c0)
        return result

    if which == "phases":
        plan = timed("plan", lambda: build_plan(model, FlaxViTModule(cfg), torch.zeros(1, 3, 224, 224)))
        timed("convert", lambda: plan.to_flax(sd))
    with single_threaded_torch():
        if which == "floor_memcpy":
            timed("memcpy_fresh", lambda: [t.clone() for t in sd.values()])
        if which == "floor_transpose":
            dst = [torch.empty(t.shape[::-1] if k in linear else t.shape) for k, t in sd.items()]
            pairs = [(d, t.t() if k in linear else t) for d, (k, t) in zip(dst, sd.items())]
            timed("transpose_fresh", lambda: [d.copy_(t) for d, t in pairs])
            timed("transpose_warm", lambda: [d.copy_(t) for d, t in pairs])
    return dict(approach=which, bytes=nbytes, phases=out)


def _run_worker(approach: str, size: str, repeat: int, code: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", approach, "--size", size,
           "--repeat", str(repeat)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if code is not None:  # import weight_port from another checkout (before/after in one run)
        env["PORT_BENCH_CODE"] = code
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{approach} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> str:
    import jax
    import numpy
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python "
            f"{platform.python_version()}, torch {torch.__version__}, jax {jax.__version__} "
            f"({jax.default_backend()}), numpy {numpy.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny ViT (seconds), for smoke runs")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions per approach (best of)")
    p.add_argument("--real", action="store_true",
                   help="also port HF ViTModel (ViT-L) into FlaxViTModule, against HF's converter")
    p.add_argument("--before", metavar="DIR", default=None,
                   help="with --real: also time the weight_port of this other checkout (same run)")
    p.add_argument("--phases", action="store_true",
                   help="with --real: also break one cold weight_port port into phases, beside the "
                        "machine's fresh-memory copy floor")
    p.add_argument("--worker", choices=("weight_port", "hf_convert", *PHASES, *APPROACHES),
                   help=argparse.SUPPRESS)
    p.add_argument("--size", choices=("vit-l", "tiny", "hf-vit-l"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "vit-l")
    repeat = args.repeat or (3 if size == "tiny" else 2)
    if args.worker:
        if size == "hf-vit-l":
            print(json.dumps(phases_worker(args.worker) if args.worker in PHASES else real_worker(args.worker)))
        else:
            print(json.dumps(worker(args.worker, TINY if size == "tiny" else VIT_L, repeat)))
        return 0
    if args.real:
        return real_main(repeat, args.before, args.phases)
    print(f"port throughput, {size} fp32 state_dict; {_env()}")
    base = _run_worker("numpy_round_trip", size, repeat)
    plain = _run_worker("plain", size, repeat)
    ours = _run_worker("weight_port", size, repeat)
    mib = 1024**2
    print(f"model: {ours['tensors']} tensors, {ours['bytes'] / GIB:.3f} GiB; "
          f"parity vs plain: {ours['parity']} (every tensor bit-equal)")
    print(f"{'approach':<52} {'GiB/s':>7} {'seconds':>8} {'peak RSS growth':>16}")
    for name, r in (("numpy round trip (transposed numpy copy, jnp.asarray)", base),
                    ("numpy transpose view, jnp.asarray", plain),
                    ("weight_port (PortPlan.to_flax, incl. NaN/Inf check)", ours)):
        print(f"{name:<52} {r['gib_s']:7.2f} {r['seconds']:8.3f} {r['peak_rss_growth'] / mib:12.0f} MiB")
    print(f"throughput weight_port / numpy round trip: {ours['gib_s'] / base['gib_s']:.2f}x (target >= 3x); "
          f"weight_port / transpose view + jnp.asarray: {ours['gib_s'] / plain['gib_s']:.2f}x")
    print(f"plan build (abstract init, matching), once per model: {ours['plan_seconds']:.2f} s")
    print(f"peak RSS growth {ours['peak_rss_growth'] / mib:.0f} MiB vs model {ours['bytes'] / mib:.0f} MiB "
          f"(target <= model bytes): {'met' if ours['peak_rss_growth'] <= ours['bytes'] else 'NOT met'}")
    print(f"zero-copy: {ours['zero_copy']}/{ours['layout_unchanged']} layout-unchanged tensors share the "
          "source's memory")
    print(f"machine load average at the end: {os.getloadavg()[0]:.1f} (other processes skew timings)")
    return 0


def _median(rows: list[dict], key: str) -> float:
    import statistics

    return statistics.median(r[key] for r in rows)


def real_main(repeat: int, before: str | None, phases: bool = False) -> int:
    import importlib.util

    mib = 1024**2
    print(f"port throughput, HF ViTModel ViT-L (1.13 GiB fp32) -> FlaxViTModule, cold process per run; {_env()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    approaches = [("weight_port (this checkout)", "weight_port", None)]
    if before:
        approaches.append((f"weight_port ({before})", "weight_port", before))
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: nothing to measure")
        return 0
    approaches.append(("transformers convert_pytorch_state_dict_to_flax", "hf_convert", None))
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in approaches}
    for _ in range(repeat):  # interleaved, so a load spike hits every approach alike
        for name, approach, code in approaches:
            rows[name].append(_run_worker(approach, "hf-vit-l", 1, code))
    hf = _median(rows["transformers convert_pytorch_state_dict_to_flax"], "seconds")
    nbytes = rows[approaches[0][0]][0]["bytes"]
    hf_cpu = _median(rows["transformers convert_pytorch_state_dict_to_flax"], "cpu_seconds")
    print(f"{'approach':<50} {'median s':>9} {'GiB/s':>7} {'vs HF':>6} {'cpu s':>6} {'vs HF':>6} "
          f"{'peak RSS growth':>16} {'x model':>8}")
    for name, _, _ in approaches:
        sec, peak = _median(rows[name], "seconds"), _median(rows[name], "peak_rss_growth")
        cpu = _median(rows[name], "cpu_seconds")
        print(f"{name:<50} {sec:9.2f} {nbytes / GIB / sec:7.2f} {hf / sec:5.2f}x {cpu:6.2f} {hf_cpu / cpu:5.2f}x "
              f"{peak / mib:12.0f} MiB {peak / nbytes:7.2f}x")
    for n, rs in rows.items():
        print(f"  {n}: " + ", ".join(f"{r['seconds']:.2f}" for r in rs) + " s wall, "
              + ", ".join(f"{r['cpu_seconds']:.2f}" for r in rs) + " s cpu")
    print("(cpu s: process CPU time, all threads; less skewed by other processes than wall time)")
    if phases:
        ph = {k: v for which in PHASES for k, v in _run_worker(which, "hf-vit-l", 1)["phases"].items()}
        names = {"plan": "build_plan (abstract trace of the twin, pairing)",
                 "convert": "PortPlan.to_flax (one thread, no overlap)",
                 "memcpy_fresh": "floor: every tensor copied into fresh memory",
                 "transpose_fresh": "floor: same, Linear weights transposed",
                 "transpose_warm": "those transposes again, memory already mapped"}
        print("phases of one cold port (own process), beside this machine's copy floor:")
        print(f"  {'phase':<50} {'wall s':>7} {'cpu s':>6} {'GiB/s':>6}")
        for key, label in names.items():
            wall, cpu = ph[key]
            print(f"  {label:<50} {wall:7.2f} {cpu:6.2f} {nbytes / GIB / wall:6.2f}")
    print("targets: >= 3x HF's throughput; peak RSS growth <= 1.0x the model's bytes")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes skew timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
