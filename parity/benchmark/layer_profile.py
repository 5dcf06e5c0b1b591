"""Per-layer speed profile: every paired layer timed alone in torch and in JAX ("first slowdown").

Each leaf layer runs on the very inputs the parity check captures for it (torch's input to that
layer, and torch's output cotangent for the backward), forward and forward + backward, in both
frameworks: torch eagerly, the Flax layer jitted on its own. The whole model is timed the same
way (it is the root "layer"), so the sum of the per-layer times beside the whole-model time
shows what fusion (XLA, or torch's fewer launches) wins or loses, plus the glue that is no layer
(concatenations, crops, functional activations).

Running the layers is the parity engine's job, not this module's: ``captured_layers`` is the one
adapter onto it (parity.checker.capture, the checker's recorded run on parity.runtime, and
parity.layers.isolated_layers, the very pairing and isolated layers of the per-layer analysis),
so the layers timed alone are exactly the layers ``parity check`` runs alone.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import torch

from parity.benchmark.devices import Device
from parity.benchmark.timing import measure
from parity.numerics import pinned

if TYPE_CHECKING:
    from parity.layers import IsolatedLayer
    from parity.tolerances import Tolerance

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

    torch_args / torch_kwargs: torch's inputs to this call (torch layout, [N, C, H, W] where
    channels-first) on the torch device, or None when they cannot be rebuilt (nested inputs);
    torch_cots: torch's cotangents at its outputs, by output path. flax: the Flax layer alone on
    the same inputs in Flax layout ([N, H, W, C]) as parity.layers runs it
    (parity.layers.IsolatedLayer: ``forward``, ``fwd_bwd``, ``check``), None when it cannot run
    alone (``note`` says why, in the per-layer analysis' words). forward_tol: what ``check`` of
    the Flax layer's output against torch's applies.
    """

    name: str
    torch_type: str
    is_root: bool
    is_leaf: bool
    torch_module: torch.nn.Module
    torch_args: tuple | None
    torch_kwargs: dict
    torch_cots: dict
    forward_tol: Tolerance
    flax: IsolatedLayer | None = None
    note: str = ""

    @property
    def flax_path(self) -> str | None:
        """The Flax layer's path when it runs alone (None: unpaired in the profile)."""
        return self.flax.row.flax_path if self.flax is not None else None


_ARG = re.compile(r"^args\[(\d+)\]$")
_KWARG = re.compile(r"^kwargs\['(\w+)'\]$")


def _call_args(inputs: dict) -> tuple[tuple | None, dict]:
    """Rebuild (args, kwargs) of a recorded torch call from its tensor leaves (named args[i] /
    kwargs['k'] by the torch runner); (None, {}) when that is not possible (nested inputs, or
    positional arguments that were not tensors)."""
    args, kwargs = {}, {}
    for name, t in inputs.items():
        if m := _ARG.match(name):
            args[int(m.group(1))] = t.detach()
        elif m := _KWARG.match(name):
            kwargs[m.group(1)] = t.detach()
        else:
            return None, {}
    if sorted(args) != list(range(len(args))):
        return None, {}
    return tuple(args[i] for i in range(len(args))), kwargs


def captured_layers(torch_module: torch.nn.Module, flax_module: Any, example_input, *, dtype: str,
                    device: Device, input_layout=None, output_layout=None, rename=None,
                    train_kwarg: str | None = None, seed: int = 0) -> list[CapturedLayer]:
    """THE adapter onto the parity engine (parity.checker.capture, parity.layers.isolated_layers):
    every module call of one eval forward + backward, in execution order, with what it takes to
    run each alone on both sides.

    example_input: the torch-layout input pytree; input_layout / output_layout / rename /
    train_kwarg: as for parity.check. The torch module is copied and cast to ``dtype``; the Flax
    variables are ported from that copy. Call under jax.default_device(device.jax_device).
    """
    from parity.checker import capture
    from parity.layers import isolated_layers
    from parity.tolerances import FORWARD, tolerance_for
    from weight_port import numpy_to_torch

    if device.kind not in ("cpu", "cuda"):
        raise ValueError(f"the per-layer profile runs on cpu or cuda, not {device.kind}")
    run = capture(torch_module, flax_module, example_input, dtype=dtype, device=device.kind, train=False,
                  train_kwarg=train_kwarg, input_layout=input_layout, output_layout=output_layout,
                  rename=rename, seed=seed, grads=True, layers=True)
    if run.flax is None:
        raise ValueError(run.structure_error or "the Flax twin could not be run")
    forward_tol = tolerance_for(dtype, FORWARD)
    layers = []
    for pc in isolated_layers(run.torch.calls, run.flax, run.twin, run.variables, run.plan, run.act_layouts,
                              grads=True):
        tc = pc.torch_call
        args, kwargs = _call_args(tc.inputs)
        cots = {p: numpy_to_torch(g).to(device=device.torch_device, dtype=tc.outputs[p].dtype)
                for p, g in tc.output_grads.items()}  # numpy_to_torch: bf16 numpy too
        layers.append(CapturedLayer(pc.row.name, pc.row.torch_type, tc.path == "",
                                    tc.path != "" and next(iter(tc.module.children()), None) is None,
                                    tc.module, args, kwargs, cots, forward_tol, pc.layer, pc.reason))
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
    from parity.runtime import flatten

    if layer.torch_args is None:
        return {}
    module, args, kwargs, sync = layer.torch_module, layer.torch_args, layer.torch_kwargs, device.sync_torch

    def forward() -> None:
        with torch.no_grad():
            module(*args, **kwargs)
        sync()

    def leaf(a):
        return a.detach().requires_grad_(True) if a.is_floating_point() else a

    g_args, g_kwargs = tuple(leaf(a) for a in args), {k: leaf(a) for k, a in kwargs.items()}
    wrt = [a for a in (*g_args, *g_kwargs.values()) if a.requires_grad]
    wrt += [p for p in module.parameters() if p.requires_grad]
    timers = {"forward": forward}
    if layer.torch_cots and wrt:
        def fwd_bwd() -> None:
            outs = flatten(module(*g_args, **g_kwargs))
            pairs = [(outs[p], c) for p, c in layer.torch_cots.items() if p in outs and outs[p].requires_grad]
            torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True)
            sync()

        timers["fwd+bwd"] = fwd_bwd
    return timers


def _jax_timers(layer: CapturedLayer, first: list) -> dict[str, Callable[[], None]]:
    """The engine's layer functions, jitted per layer; each call blocks until the device is done.
    The forward's first output is appended to ``first`` (the parity check of the timed layer)."""
    timers = {}
    iso = layer.flax
    if iso is not None:
        fwd, args = jax.jit(iso.forward), (iso.params, iso.floats)

        def forward() -> None:
            out = jax.block_until_ready(fwd(*args))
            if not first:
                first.append(out)

        timers["forward"] = forward
    if iso is not None and iso.cots is not None:
        fb, bargs = jax.jit(iso.fwd_bwd), (iso.params, iso.floats, iso.cots)
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
    if first and layer.flax is not None:
        # A benchmark checks parity before its numbers count: a wrong layer's time means nothing.
        c = layer.flax.check(first[0], layer.forward_tol)
        out.parity = "ok" if c is None or c.ok else f"FAIL: max_abs {c.max_abs:.2e}, rel_norm {c.rel_norm:.2e} ({c.tolerance})"
    return out


def profile_layers(torch_module: torch.nn.Module, flax_module: Any, example_input, *, device: Device,
                   dtype: str = "float32", input_layout=None, output_layout=None, rename=None,
                   train_kwarg: str | None = None, name: str | None = None,
                   settings: ProfileSettings | None = None, seed: int = 0,
                   log: Callable[[str], None] = lambda s: None) -> LayerProfile:
    """Time every paired leaf layer alone and the whole model, forward and fwd+bwd, both sides.

    example_input: torch layout ([N, C, H, W] for images), a pytree of positional inputs;
    input_layout / output_layout / rename / train_kwarg: as for parity.check (default: the
    engine infers layouts). Eval mode. Numerics pinned like the benchmark (JAX 'highest', torch
    TF32 off). Shares are each layer's fraction of the sum over paired layers, per column.
    """
    settings = settings or ProfileSettings()
    with pinned(precision="highest", tf32=False), jax.default_device(device.jax_device):
        log("capturing every layer's inputs and cotangents (the parity engine's capture)")
        captured = captured_layers(torch_module, flax_module, example_input, dtype=dtype, device=device,
                                   input_layout=input_layout, output_layout=output_layout, rename=rename,
                                   train_kwarg=train_kwarg, seed=seed)
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
