"""What gets timed: one inference forward or one training step, per framework variant.

Every Step runs on fresh weights ported from the same torch module, so all variants start from
identical parameters, and every call ends by waiting for the device (``block_until_ready`` /
``torch.cuda.synchronize``) so a timer around it reads finished work, not queued dispatch.

Training step, identical on both sides: MSE loss (mean) of the model output against a fixed
random target, backward, then SGD with heavy-ball momentum. torch.optim.SGD(lr, momentum=m)
does buf = m * buf + g; p -= lr * buf, which is optax.sgd(lr, momentum=m) (trace then scale),
so the two optimizers take the same step.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from parity.benchmark.devices import Device
from parity.benchmark.names import PHASES, VARIANTS
from parity.runtime import FlaxTwin, value_and_grad_fn
from weight_port.layout import to_flax_layout, to_torch_layout
from weight_port.plan import build_plan

LR, MOMENTUM = 1e-3, 0.9
TORCH_COMPILE_MODE = "default"

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class VariantUnavailable(Exception):
    """This variant cannot run for this model/device (reported as n/a with the reason, not a failure)."""


@dataclass
class Prepared:
    """One model at one batch size and dtype, ready to make Steps from.

    x and target are float64 numpy arrays in torch layout ([N, C, H, W] or [N, F]); variables is
    the ported Flax tree as numpy (each Step copies it onto the device, since jit donates it).
    """

    pair: Any
    config: Any
    batch: int
    dtype: str
    device: Device
    torch_module: torch.nn.Module
    flax_module: Any
    variables: dict
    x: np.ndarray
    target: np.ndarray
    _torch_flops: dict = field(default_factory=dict)

    def torch_flops(self, phase: str) -> int | None:
        """FlopCounterMode count of one eager step (matmul/conv family only; same for all torch variants)."""
        if phase not in self._torch_flops:
            self._torch_flops[phase] = _count_torch_flops(self, phase)
        return self._torch_flops[phase]


def prepare(pair, config, batch: int, device: Device, *, dtype: str = "float32", seed: int = 0) -> Prepared:
    """Build both twins from ``config``, port the torch weights, make the input and a fixed target."""
    torch_module, flax_module = pair.build(config, seed=seed)
    x = pair.example_input(config, batch=batch, seed=seed)
    # Port at float32 (the port's tested path), then cast both sides to the benchmark dtype.
    # plan.to_flax gives linen-style variables for Linen and NNX twins alike (parity.runtime).
    plan = build_plan(torch_module, flax_module, (torch.as_tensor(x, dtype=torch.float32),),
                      input_layout=[pair.input_layout])
    variables = plan.to_flax(torch_module.state_dict())
    variables = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), variables)
    torch_module = torch_module.to(_TORCH_DTYPES[dtype])
    with torch.no_grad():
        out_shape = tuple(torch_module.eval()(torch.as_tensor(x[:1], dtype=_TORCH_DTYPES[dtype])).shape)
    target = np.random.default_rng(seed + 7).standard_normal((batch, *out_shape[1:]))
    return Prepared(pair, config, batch, dtype, device, torch_module, flax_module, variables, x, target)


@dataclass
class Step:
    """One benchmark step: ``step()`` runs it and waits for the device; ``first_value()`` is the
    first call's result as numpy in torch layout (the forward output, or the train step's loss
    at the initial weights, which every variant shares)."""

    variant: str
    phase: str
    run: Callable[[], Any]
    sync: Callable[[Any], None]
    to_numpy: Callable[[Any], np.ndarray]
    flops: Callable[[], tuple[int | None, str]]
    peak_bytes: Callable[[], tuple[int | None, str]]
    reset_peak: Callable[[], None] = lambda: None
    note: str = ""
    first: Any = None

    def __call__(self) -> None:
        out = self.run()
        self.sync(out)
        if self.first is None:
            self.first = out

    def first_value(self) -> np.ndarray:
        if self.first is None:
            raise RuntimeError("the step has not run yet")
        return self.to_numpy(self.first)


def make_step(prep: Prepared, variant: str, phase: str) -> Step:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    return _jax_step(prep, phase) if variant == "jax-jit" else _torch_step(prep, variant, phase)


# ----------------------------------------------------------------------------------- torch


def _torch_step(prep: Prepared, variant: str, phase: str) -> Step:
    dev = prep.device
    if dev.torch_device is None:
        raise VariantUnavailable(f"torch on {dev.kind}: {dev.torch_missing}")
    tdt = _TORCH_DTYPES[prep.dtype]
    model = copy.deepcopy(prep.torch_module).to(dev.torch_device)
    x = torch.as_tensor(prep.x, dtype=tdt, device=dev.torch_device)
    y = torch.as_tensor(prep.target, dtype=tdt, device=dev.torch_device)
    if variant == "torch-channels_last":
        if x.ndim != 4:
            raise VariantUnavailable(f"channels_last needs a 4-D [N, C, H, W] input; {prep.pair.name} takes {list(x.shape)}")
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fn = _torch_forward(model, x) if phase == "forward" else _torch_train(model, x, y)
    note = ""
    if variant == "torch-compile":
        # Default mode (no CUDA graphs, no max-autotune). For the train step dynamo graph-breaks
        # at backward(): forward+loss is one graph (AOTAutograd compiles its backward), and
        # optimizer.step() another, recompiled once when the momentum buffers appear.
        # A fresh dynamo cache per Step: otherwise this closure's code object collects guards
        # across models and batch sizes, recompiles with dynamic shapes, and past the cache
        # size limit silently runs eager. (Inductor's on-disk cache may still shorten the
        # first call; TORCHINDUCTOR_FX_GRAPH_CACHE=0 gives cold compile times.)
        torch._dynamo.reset()
        fn = torch.compile(fn, mode=TORCH_COMPILE_MODE)
        note = f"torch.compile(mode={TORCH_COMPILE_MODE!r})"
    cuda = dev.kind == "cuda"
    return Step(
        variant=variant, phase=phase, run=fn,
        sync=lambda out: dev.sync_torch(),
        to_numpy=lambda out: out.detach().to(torch.float64).cpu().numpy(),
        flops=lambda: _flops_or_reason(prep.torch_flops(phase), "torch.utils.flop_counter.FlopCounterMode"),
        peak_bytes=(lambda: (torch.cuda.max_memory_allocated(dev.torch_device), "torch.cuda.max_memory_allocated"))
        if cuda else (lambda: (None, f"torch reports no peak memory on {dev.kind}")),
        reset_peak=(lambda: torch.cuda.reset_peak_memory_stats(dev.torch_device)) if cuda else (lambda: None),
        note=note,
    )


def _torch_forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    model.eval()

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return forward


def _torch_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    model.train()  # BatchNorm: batch statistics and running-stat updates, like Flax train=True
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def train_step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step


def _count_torch_flops(prep: Prepared, phase: str) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    dev = prep.device
    if dev.torch_device is None:
        return None
    tdt = _TORCH_DTYPES[prep.dtype]
    model = copy.deepcopy(prep.torch_module).to(dev.torch_device)
    x = torch.as_tensor(prep.x, dtype=tdt, device=dev.torch_device)
    y = torch.as_tensor(prep.target, dtype=tdt, device=dev.torch_device)
    fn = _torch_forward(model, x) if phase == "forward" else _torch_train(model, x, y)
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------- jax


def _jax_step(prep: Prepared, phase: str) -> Step:
    """The Flax twin through the parity engine's runner (parity.runtime.FlaxTwin: Linen or NNX),
    jitted; input and target converted by the registry's declared layouts."""
    dev = prep.device.jax_device
    jdt = _JAX_DTYPES[prep.dtype]
    pair = prep.pair

    def put(a):
        # jnp.array copies, so donating a Step's buffers never touches prep.variables.
        return jax.device_put(jnp.array(a, dtype=jdt), dev)

    x = put(to_flax_layout(prep.x, pair.input_layout, f"{pair.name} benchmark input"))
    variables = jax.tree.map(put, prep.variables)
    compiled: dict[str, Any] = {}

    if phase == "forward":
        twin = FlaxTwin(prep.flax_module, train=False, train_kwarg=pair.train_kwarg)
        fn = jax.jit(lambda v, x: twin.apply(v, (x,))[0])
        args = [variables, x]

        def run():
            return _aot(compiled, fn, args)(*args)

        def to_numpy(out) -> np.ndarray:
            return np.asarray(to_torch_layout(np.asarray(out, dtype=np.float64), pair.out_layout(),
                                              f"{pair.name} output"))
    else:
        y = put(to_flax_layout(prep.target, pair.out_layout(), f"{pair.name} benchmark target"))
        twin = FlaxTwin(prep.flax_module, train=True, train_kwarg=pair.train_kwarg,
                        train_mode_matters=pair.train_matters(prep.config))
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}
        tx = optax.sgd(LR, momentum=MOMENTUM)
        fn = jax.jit(_flax_train_step(twin, tx), donate_argnums=(0, 1, 2))
        state = [params, tx.init(params), rest]

        def run():
            step = _aot(compiled, fn, [*state, x, y])
            state[0], state[1], state[2], loss = step(*state, x, y)
            return loss

        def to_numpy(out) -> np.ndarray:  # the loss: a scalar, no layout
            return np.asarray(out, dtype=np.float64)

    def flops():
        # The LOWERED module's count, not the compiled one's: on GPU the compiled module's
        # convolutions and matmuls are cuDNN/cuBLAS custom calls, which XLA's cost analysis
        # counts as 0 FLOPs (seen on an H200: 0.047 GFLOP for a UNet step of 814 GFLOP).
        return jax_flops(compiled.get("lowered"), dev.platform)

    def peak():
        # The executable's own footprint (arguments + outputs + temporaries, less donated
        # buffers): JAX has no way to reset memory_stats()'s peak, which is process-wide and
        # so carries the largest earlier model into every later row.
        return jax_peak_bytes(compiled.get("exe"), dev)

    return Step(
        variant="jax-jit", phase=phase, run=run, sync=jax.block_until_ready, to_numpy=to_numpy,
        flops=flops, peak_bytes=peak,
        note="jax.jit" + (", donate_argnums=(params, opt_state, batch_stats)" if phase == "train" else ""),
    )


def _aot(cache: dict, fn, args):
    """Compile ``fn`` for ``args`` on first use (lower + compile, so cost_analysis comes from the
    very executable that is timed); the first call's wall time therefore includes compilation."""
    if "exe" not in cache:
        start = time.perf_counter()
        cache["lowered"] = fn.lower(*args)
        cache["exe"] = cache["lowered"].compile()
        cache["compile_s"] = time.perf_counter() - start
    return cache["exe"]


def jax_flops(lowered, platform: str) -> tuple[int | None, str]:
    """FLOPs of one call of a lowered (not yet compiled) jax function, by XLA's HLO cost
    analysis, and where the number came from."""
    cost = lowered.cost_analysis() if lowered is not None else None
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0] if cost else None
    value = (cost or {}).get("flops")
    if value is None or value <= 0:
        return None, f"jax cost_analysis() has no flops on {platform}"
    return int(value), "jax .lower().cost_analysis()['flops'] (HLO before backend rewrites)"


def jax_peak_bytes(exe, dev) -> tuple[int | None, str]:
    """Device bytes one call of a compiled executable holds at its peak: arguments + outputs +
    temporaries - donated (aliased) buffers, from XLA's memory analysis; else the device's
    process-wide peak, labelled as such."""
    stats = exe.memory_analysis() if exe is not None else None
    if stats is not None:
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
        return int(total), "XLA compiled.memory_analysis(): arguments + outputs + temporaries - aliased"
    mem = dev.memory_stats()
    if not mem or "peak_bytes_in_use" not in mem:
        return None, f"jax reports no memory stats on {dev.platform}"
    return int(mem["peak_bytes_in_use"]), "jax device.memory_stats()['peak_bytes_in_use'] (process-wide peak)"


def _flax_train_step(twin: FlaxTwin, tx):
    """One SGD-momentum step on the MSE loss, differentiated by the engine's value_and_grad_fn
    (the same core parity.training uses); non-param collections (BatchNorm statistics) updated."""
    grad_fn = value_and_grad_fn(twin, lambda out, y: jnp.mean((out - y) ** 2))  # F.mse_loss(mean)

    def train_step(params, opt_state, rest, x, y):
        loss, grads, new_rest = grad_fn({"params": params, **rest}, (x,), y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_rest, loss

    return train_step


def _flops_or_reason(value: int | None, source: str) -> tuple[int | None, str]:
    return (value, source) if value else (None, f"{source} unavailable")
