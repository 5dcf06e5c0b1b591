"""Per-layer speed profile: every paired layer timed alone in torch and in JAX ("first slowdown").

Each leaf layer runs on the very inputs the parity check captures for it (torch's input to that
layer, and torch's output cotangent for the backward), forward and forward + backward, in both
frameworks: torch eagerly, the Flax layer jitted on its own. The whole model is timed the same
way (it is the root "layer"), so the sum of the per-layer times beside the whole-model time
shows what fusion (XLA, or torch's fewer launches) wins or loses, plus the glue that is no layer
(concatenations, crops, functional activations).

Running the layers is the parity engine's job, not this module's: ``captured_layers`` is the one
adapter onto it (today parity.layers' capture_torch / capture_flax and its isolated-layer jobs),
so switching to another engine is a change in that function only.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity.benchmark.devices import Device
from parity.benchmark.timing import measure
from parity.numerics import pinned

FRAMEWORKS = ("torch", "jax")
PHASES = ("forward", "fwd+bwd")
KEYS = tuple(f"{fw} {ph}" for fw in FRAMEWORKS for ph in PHASES)


@dataclass(frozen=True)
class ProfileSettings:
    """How long each (layer, framework, phase) is timed; the first call and warm-up are untimed."""

    warmup: int = 2
    min_rounds: int = 5
    max_rounds: int = 100
    min_time_s: float = 0.1

    @classmethod
    def quick(cls) -> "ProfileSettings":
        return cls(warmup=1, min_rounds=2, max_rounds=2, min_time_s=0.0)


@dataclass
class CapturedLayer:
    """One module call as the parity engine captured it, runnable alone on both sides.

    torch_args: torch's inputs to this call ([N, C, H, W] where channels-first), on the torch
    device; torch_cots: torch's cotangents at its outputs (None where an output has none).
    flax_forward(params, *floats) / flax_fwd_bwd(params, floats, cots): the Flax layer alone on
    the same inputs in Flax layout ([N, H, W, C]); flax_fwd_bwd is None when nothing flows back.
    """

    name: str
    torch_type: str
    flax_path: str | None
    is_root: bool
    is_leaf: bool
    torch_module: torch.nn.Module
    torch_args: tuple
    torch_cots: list
    flax_forward: Callable | None = None
    flax_fwd_bwd: Callable | None = None
    flax_args: tuple = ()
    flax_bwd_args: tuple = ()
    check: Callable | None = None  # Flax forward output -> Comparison against torch's output
    note: str = ""


def captured_layers(torch_module: torch.nn.Module, flax_module: Any, example_input, *, layout: str,
                    dtype: str, device: Device, seed: int = 0) -> list[CapturedLayer]:
    """THE adapter onto the parity engine: every module call of one forward + backward, in
    execution order, with what it takes to run each alone on both sides.

    example_input: the torch-layout input (array or tensor, or a tuple of them). The torch module
    is copied and cast to ``dtype``; the Flax variables are ported from that copy.
    """
    from parity import layers as engine
    from parity.benchmark.workloads import _TORCH_DTYPES
    from parity.tolerances import FORWARD, tolerance_for
    from weight_port.flax_tree import call_kwargs
    from weight_port.layout import AS_IS, to_flax_layout
    from weight_port.plan import build_plan
    from weight_port.tensors import numpy_to_torch, to_numpy

    tdt = _TORCH_DTYPES[dtype]
    tm = copy.deepcopy(torch_module).to(device=device.torch_device, dtype=tdt).eval()
    raw = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    inputs = []
    for x in raw:
        t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        t = t.to(device.torch_device)
        inputs.append(t.to(tdt).requires_grad_(True) if t.is_floating_point() else t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parity check reports port warnings; timing does not
        plan = build_plan(tm, flax_module, [x.detach().cpu() for x in inputs], input_layout=layout,
                          check_attributes="warn")
    variables = plan.to_flax(tm.state_dict())
    flax_inputs = [jnp.asarray(to_flax_layout(to_numpy(x.detach()), layout)) for x in inputs]
    with torch.no_grad():
        outs = engine._leaves(tm(*inputs))
    rng = np.random.default_rng(seed + 1)
    cots = [rng.standard_normal(tuple(o.shape)) for o in outs]
    t_calls = engine.capture_torch(tm, inputs, cots, train=False)
    f_cots = [to_flax_layout(c, layout if np.ndim(c) >= 3 else AS_IS) for c in cots]
    forward_tol = tolerance_for(dtype, FORWARD)
    f_calls = engine.capture_flax(flax_module, variables, flax_inputs, f_cots,
                                  call_kwargs(flax_module, False), False)[0]

    layers = []
    for tc in t_calls:
        fpath = engine._flax_path_of(tc.path, plan)
        row = engine.LayerRow(tc.path, "/".join(fpath), type(tc.module).__name__, tc.call)
        t_cots = [None if tc.out_grads.get(i) is None else  # numpy_to_torch: bf16 numpy too
                  numpy_to_torch(tc.out_grads[i]).to(device=device.torch_device, dtype=tc.outputs[i].dtype)
                  for i in range(len(tc.outputs))]
        layer = CapturedLayer(
            name=row.name, torch_type=row.torch_type, flax_path=None, is_root=tc.path == "",
            is_leaf=tc.path != "" and next(iter(tc.module.children()), None) is None,
            torch_module=tc.module, torch_args=tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                     for a in tc.args),
            torch_cots=t_cots)
        layers.append(layer)
        key = (tuple(fpath), tc.call)
        if key not in f_calls:
            layer.note = "no Flax module at this path (parameter-free layer inlined as a function?)"
            continue
        job = engine._prepare(row, tc, f_calls[key], variables, tuple(fpath), [], True, layout,
                              engine._input_layout(tc.path, plan, layout), False)
        if job is None:
            layer.note = "; ".join(row.notes) or "the Flax layer cannot run alone"
            continue
        layer.flax_path = row.flax_path
        layer.flax_forward = job.run
        t_out = [to_numpy(o.detach()) if isinstance(o, torch.Tensor) else None for o in tc.outputs]
        layer.check = lambda out, name=row.name, t_out=t_out, lay=job.in_layout.layout: engine._compare_leaves(
            name, [np.asarray(o) for o in engine._leaves(out)], t_out, forward_tol, lay)
        layer.flax_args = (job.params, *job.floats)
        if job.cots is not None:
            layer.flax_fwd_bwd = lambda p, f, c, job=job: engine._one(job, p, f, c)
            layer.flax_bwd_args = (job.params, job.floats, job.cots)
    return layers


@dataclass
class LayerTime:
    """Median seconds per call of one layer alone; keys of ``times`` are KEYS ("jax fwd+bwd")."""

    name: str
    torch_type: str
    flax_path: str | None
    times: dict[str, float | None] = field(default_factory=dict)
    share: dict[str, float | None] = field(default_factory=dict)  # of the sum over paired layers
    parity: str = ""  # the Flax layer's first output vs torch's: "ok" or what missed
    note: str = ""

    @property
    def paired(self) -> bool:
        return self.flax_path is not None

    def ratio(self, phase: str) -> float | None:
        """JAX time / torch time for ``phase`` (> 1: JAX is slower on this layer)."""
        j, t = self.times.get(f"jax {phase}"), self.times.get(f"torch {phase}")
        return j / t if j and t else None

    def to_dict(self) -> dict:
        return {"name": self.name, "torch_type": self.torch_type, "flax_path": self.flax_path,
                "times_s": dict(self.times), "share": dict(self.share),
                "ratio_jax_over_torch": {ph: self.ratio(ph) for ph in PHASES}, "parity": self.parity,
                "note": self.note}


@dataclass
class LayerProfile:
    """The profile of one model: its paired leaf layers, the unpaired ones, the whole model."""

    model: str
    dtype: str
    device: str
    layers: list[LayerTime]
    unpaired: list[LayerTime]
    whole: LayerTime
    env: dict = field(default_factory=dict)

    def layer_sum(self, key: str) -> float | None:
        """Sum of one column over the paired layers (None when any of them has no time)."""
        values = [layer.times.get(key) for layer in self.layers]
        return float(sum(values)) if values and all(v is not None for v in values) else None

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "device": self.device,
                "whole_model_s": dict(self.whole.times),
                "sum_of_layers_s": {k: self.layer_sum(k) for k in KEYS},
                "layers": [layer.to_dict() for layer in self.layers],
                "unpaired": [layer.to_dict() for layer in self.unpaired],
                "environment": self.env}


def _torch_timers(layer: CapturedLayer, device: Device) -> dict[str, Callable[[], None]]:
    """forward (no autograd) and forward + backward (autograd.grad of <outputs, cotangents> with
    respect to the float inputs and the layer's parameters, like JAX's VJP: nothing accumulates)."""
    module, args = layer.torch_module, layer.torch_args
    sync = device.sync_torch

    def forward() -> None:
        with torch.no_grad():
            module(*args)
        sync()

    wrt_args = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args]
    wrt = [a for a in wrt_args if isinstance(a, torch.Tensor) and a.requires_grad]
    wrt += [p for p in module.parameters() if p.requires_grad]
    timers = {"forward": forward}
    if any(c is not None for c in layer.torch_cots) and wrt:
        def fwd_bwd() -> None:
            outs = module(*wrt_args)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            pairs = [(o, c) for o, c in zip(outs, layer.torch_cots)
                     if c is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True)
            sync()

        timers["fwd+bwd"] = fwd_bwd
    return timers


def _jax_timers(layer: CapturedLayer, first: list) -> dict[str, Callable[[], None]]:
    """The engine's layer functions, jitted per layer; each call blocks until the device is done.
    The forward's first output is appended to ``first`` (the parity check of the timed layer)."""
    timers = {}
    if layer.flax_forward is not None:
        fwd, args = jax.jit(layer.flax_forward), layer.flax_args

        def forward() -> None:
            out = jax.block_until_ready(fwd(*args))
            if not first:
                first.append(out)

        timers["forward"] = forward
    if layer.flax_fwd_bwd is not None:
        fb, bargs = jax.jit(layer.flax_fwd_bwd), layer.flax_bwd_args
        timers["fwd+bwd"] = lambda: jax.block_until_ready(fb(*bargs))
    return timers


def _time(layer: CapturedLayer, device: Device, settings: ProfileSettings) -> LayerTime:
    out = LayerTime(layer.name, layer.torch_type, layer.flax_path, note=layer.note)
    first: list = []
    for fw, timers in (("torch", _torch_timers(layer, device)), ("jax", _jax_timers(layer, first))):
        for phase in PHASES:
            step = timers.get(phase)
            if step is None:
                out.times[f"{fw} {phase}"] = None
                continue
            try:  # first call (compile) and warm-up are outside the timed samples
                t = measure(step, warmup=settings.warmup, min_rounds=settings.min_rounds,
                            max_rounds=settings.max_rounds, min_time_s=settings.min_time_s)
                out.times[f"{fw} {phase}"] = t.median_s
            except Exception as exc:  # noqa: BLE001 - one layer that cannot run is a note, not a crash
                out.times[f"{fw} {phase}"] = None
                out.note = f"{fw} {phase}: {type(exc).__name__}: {' '.join(str(exc).split())[:150]}"
    if first and layer.check is not None:
        # A benchmark checks parity before its numbers count: a wrong layer's time means nothing.
        c = layer.check(first[0])
        out.parity = "ok" if c is None or c.ok else f"FAIL: max_abs {c.max_abs:.2e}, rel_norm {c.rel_norm:.2e} ({c.tolerance})"
    return out


def profile_layers(torch_module: torch.nn.Module, flax_module: Any, example_input, *, layout: str,
                   device: Device, dtype: str = "float32", name: str | None = None,
                   settings: ProfileSettings | None = None, seed: int = 0,
                   log: Callable[[str], None] = lambda s: None) -> LayerProfile:
    """Time every paired leaf layer alone and the whole model, forward and fwd+bwd, both sides.

    Numerics pinned like the benchmark (JAX 'highest', torch TF32 off). Shares are each layer's
    fraction of the sum over paired layers, per column.
    """
    settings = settings or ProfileSettings()
    with pinned(precision="highest", tf32=False), jax.default_device(device.jax_device):
        log("capturing every layer's inputs and cotangents (the parity engine's capture)")
        captured = captured_layers(torch_module, flax_module, example_input, layout=layout,
                                   dtype=dtype, device=device, seed=seed)
        roots = [c for c in captured if c.is_root]
        if not roots:
            raise ValueError("the parity engine captured no call of the whole model")
        leaves = [c for c in captured if c.is_leaf]
        log(f"timing {len(leaves)} leaf layers and the whole model")
        whole = _time(roots[0], device, settings)
        timed = []
        for c in leaves:
            timed.append(_time(c, device, settings))
            log(f"  {c.name:<28} " + "  ".join(
                f"{k} {v * 1e3:8.3f} ms" if v is not None else f"{k} n/a" for k, v in timed[-1].times.items()))
    paired = [t for t in timed if t.paired]
    profile = LayerProfile(name or type(torch_module).__name__, dtype, device.kind, paired,
                           [t for t in timed if not t.paired], whole)
    for key in KEYS:
        total = profile.layer_sum(key)
        for t in paired:
            t.share[key] = t.times[key] / total if total and t.times.get(key) is not None else None
    return profile
