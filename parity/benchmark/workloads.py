"""What gets timed: one inference forward or one training step, per framework variant.

Every Step runs on fresh weights ported from the same torch module, so all variants start from
identical parameters, and every call ends by waiting for the device (``block_until_ready`` /
``torch.cuda.synchronize``) so a timer around it reads finished work, not queued dispatch.

A workload is a pytree: the torch module's positional inputs (float images, [N, T, D] tokens,
integer token ids and masks, tuples with None, dicts) and any output pytree (a tensor, a tuple,
an HF ModelOutput). A registry pair is the special case of one input and one output. Layouts
come from the parity engine (parity.runtime: declared, or inferred from the consuming/producing
layer), never from ndim; inputs are converted by its ``torch_inputs`` / ``flax_inputs``.

Training step, identical on both sides: loss = sum over the float output leaves of
mean((out - target)^2), a fixed random target per leaf (the same numbers on both sides, each in
its side's layout; one leaf: F.mse_loss), backward, then SGD with heavy-ball momentum.
torch.optim.SGD(lr, momentum=m) does buf = m * buf + g; p -= lr * buf, which is
optax.sgd(lr, momentum=m) (trace then scale), so the two optimizers take the same step.
Train mode: BatchNorm uses batch statistics (train_mode); dropout is held OFF on both sides, as
in parity.training (torch Dropout modules in eval mode, the Flax twin deterministic), because no
Flax RNG can draw torch's masks: with dropout on, the two sides would compute different things.
A pair without BatchNorm-like layers (a transformer) therefore runs its train step in eval mode.
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
from parity.pair import TORCH_DTYPES, CheckOptions
from parity.pair import prepare as prepare_pair
from parity.runtime import (CHANNELS_FIRST, FlaxTwin, as_args, flatten, flax_inputs, to_flax_layout,
                            to_torch_layout, torch_inputs)
from parity.training import flax_train_step
from weight_port import to_numpy

LR, MOMENTUM = 1e-3, 0.9
TORCH_COMPILE_MODE = "default"


class VariantUnavailable(Exception):
    """This variant cannot run for this model/device (reported as n/a with the reason, not a failure)."""


@dataclass
class Prepared:
    """One model pair at one batch size and dtype, ready to make Steps from.

    args: the torch module's positional inputs, a pytree with numpy leaves in torch layout
    (images [N, C, H, W], features [N, F], token ids [N, T] int, ...). in_layouts / out_layouts:
    every input / output leaf's layout by path (``input[0]``, ``out.logits``), from the engine.
    targets: one fixed random target per float output leaf, torch layout, by torch output path;
    flax_paths: torch output path -> the twin's path for the same leaf (``out['logits']``).
    variables: the ported Flax tree as numpy float32 (each Step copies it onto the device, since
    jit donates it). train_mode: the train step runs in train mode (BatchNorm batch statistics);
    train_matters: train and eval differ for the twin. modes: the train flags the parity gate
    checks; check_kwargs: the layout / train-keyword / rename arguments parity.check gets.
    """

    name: str
    batch: int
    dtype: str
    device: Device
    torch_module: torch.nn.Module
    flax_module: Any
    variables: dict
    args: tuple
    in_layouts: dict[str, str]
    out_layouts: dict[str, str]
    targets: dict[str, np.ndarray]
    flax_paths: dict[str, str]
    train_mode: bool = True
    train_matters: bool = True
    modes: tuple[bool, ...] = (False,)
    check_kwargs: dict = field(default_factory=dict)
    _torch_flops: dict = field(default_factory=dict)

    def torch_flops(self, phase: str) -> int | None:
        """FlopCounterMode count of one eager step (matmul/conv family only; same for all torch variants)."""
        if phase not in self._torch_flops:
            self._torch_flops[phase] = _count_torch_flops(self, phase)
        return self._torch_flops[phase]

    def channels_last_input(self) -> str | None:
        """None when torch's channels_last applies (one 4-D input declared [N, C, H, W]), else why not."""
        leaves = [x for x in jax.tree.leaves(self.args) if hasattr(x, "shape")]
        if (len(leaves) == 1 and leaves[0].ndim == 4
                and self.in_layouts.get("input[0]") == CHANNELS_FIRST):
            return None
        shapes = ", ".join(str(list(x.shape)) for x in leaves)
        return f"channels_last needs one 4-D [N, C, H, W] input; {self.name} takes {shapes}"


def prepare(pair, config, batch: int, device: Device, *, dtype: str = "float32", seed: int = 0) -> Prepared:
    """A registry pair: build both twins from ``config``, port the torch weights, make the input
    and a fixed target. One input (the pair's declared layout) and one output."""
    torch_module, flax_module = pair.build(config, seed=seed)
    x = pair.example_input(config, batch=batch, seed=seed)
    # Port at float32 (the port's tested path), then cast both sides to the benchmark dtype.
    # plan.to_flax gives linen-style variables for Linen and NNX twins alike (parity.runtime).
    prepared = prepare_pair(torch_module, flax_module, torch.as_tensor(x, dtype=torch.float32),
                            CheckOptions(input_layout=pair.input_layout, train_kwarg=pair.train_kwarg))
    variables = _numpy_variables(prepared.variables)
    torch_module = prepared.torch_module.to(TORCH_DTYPES[dtype])
    with torch.no_grad():
        out = torch_module.eval()(torch.as_tensor(x[:1], dtype=TORCH_DTYPES[dtype]))
    shapes = {p: (batch, *o.shape[1:]) for p, o in flatten(out).items()}
    return Prepared(
        pair.name, batch, dtype, device, torch_module, flax_module, variables, (x,),
        in_layouts={"input[0]": pair.input_layout}, out_layouts={p: pair.out_layout() for p in shapes},
        targets=_targets(shapes, seed), flax_paths={p: p for p in shapes},
        train_mode=True, train_matters=pair.train_matters(config), modes=tuple(pair.modes(config)),
        check_kwargs=dict(input_layout=pair.input_layout, output_layout=pair.out_layout(),
                          train_kwarg=pair.train_kwarg),
    )


def prepare_own(torch_module: torch.nn.Module, flax_module, example_input, device: Device, *, name: str,
                dtype: str = "float32", seed: int = 0, input_layout=None, output_layout=None,
                train_kwarg: str | None = None, rename=None) -> Prepared:
    """Your own pair (as ``parity check --torch/--flax`` takes it): the torch module, its Flax twin
    (Linen or NNX) and the torch module's positional inputs in torch layout (one array or a
    tuple; pytrees, integer ids and masks allowed). The batch is the example input's.

    The engine's own capture (parity.checker.capture: the port, the input layouts and the output
    layouts, declared or inferred) sets everything up, so the benchmark times exactly what the
    parity gate checks. A twin whose outputs do not line up with torch's gets no targets for
    them; the gate then fails and nothing is timed.
    """
    from parity.checker import capture

    run = capture(torch_module, flax_module, example_input, dtype="float32", grads=False, layers=False,
                  input_layout=input_layout, output_layout=output_layout, train_kwarg=train_kwarg,
                  rename=rename, seed=seed)
    args = jax.tree.map(lambda a: np.array(to_numpy(a.detach() if hasattr(a, "detach") else a)) if
                        hasattr(a, "shape") else a, as_args(example_input))
    torch_shapes = {p: tuple(o.shape) for p, o in run.torch.outputs.items()}
    flax_paths = {t: f for f, t in (run.output_map or {}).items()}
    train_mode = _has_batch_statistics(torch_module)
    return Prepared(
        name, example_batch(args), dtype, device,
        copy.deepcopy(torch_module).to(TORCH_DTYPES[dtype]), flax_module, _numpy_variables(run.variables),
        args, in_layouts=dict(run.in_layouts), out_layouts=dict(run.out_layouts),
        targets=_targets({p: s for p, s in torch_shapes.items() if p in flax_paths
                          and np.issubdtype(run.torch.outputs[p].dtype, np.floating)}, seed),
        flax_paths=flax_paths, train_mode=train_mode, train_matters=train_mode,
        modes=(False, True) if train_mode else (False,),
        check_kwargs=dict(input_layout=input_layout, output_layout=output_layout, train_kwarg=train_kwarg,
                          rename=rename),
    )


def example_batch(example_input) -> int:
    """The batch size of an example input: the leading axis of its first array leaf."""
    leaves = [x for x in jax.tree.leaves(as_args(example_input)) if getattr(x, "ndim", 0)]
    if not leaves:
        raise ValueError("the example input has no array with a batch axis")
    return int(leaves[0].shape[0])


def _numpy_variables(variables) -> dict:
    # A copy: on CPU plan.to_flax may hand back arrays sharing the torch tensors' memory.
    return jax.tree.map(lambda a: np.array(a, dtype=np.float32), variables)


def _targets(shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    """One standard-normal target per output leaf (torch layout), drawn in output order from one
    generator, so both sides (and every variant) get the same numbers."""
    rng = np.random.default_rng(seed + 7)
    return {p: rng.standard_normal(s) for p, s in shapes.items()}


def _has_batch_statistics(module: torch.nn.Module) -> bool:
    """Whether train mode changes the math once dropout is held off: a norm layer that uses batch
    statistics in train mode (BatchNorm, or InstanceNorm tracking running statistics)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               or (isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)
               for m in module.modules())


@dataclass
class Step:
    """One benchmark step: ``step()`` runs it and waits for the device; ``first_value()`` is the
    first call's result as {path: numpy array in torch layout}: the forward's float output leaves
    (``out``, ``out.last_hidden_state``), or ``{"loss": ...}``, the train step's loss at the
    initial weights, which every variant shares."""

    variant: str
    phase: str
    run: Callable[[], Any]
    sync: Callable[[Any], None]
    to_numpy: Callable[[Any], dict[str, np.ndarray]]
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

    def first_value(self) -> dict[str, np.ndarray]:
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
    model, args, targets = _torch_setup(prep)
    if variant == "torch-channels_last":
        why_not = prep.channels_last_input()
        if why_not:
            raise VariantUnavailable(why_not)
        model = model.to(memory_format=torch.channels_last)
        args = (args[0].contiguous(memory_format=torch.channels_last),)
    fn = _torch_forward(model, args) if phase == "forward" else _torch_train(model, args, targets, prep.train_mode)
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
        to_numpy=_torch_numpy if phase == "forward" else lambda loss: {"loss": _torch_numpy(loss)["out"]},
        flops=lambda: _flops_or_reason(prep.torch_flops(phase), "torch.utils.flop_counter.FlopCounterMode"),
        peak_bytes=(lambda: (torch.cuda.max_memory_allocated(dev.torch_device), "torch.cuda.max_memory_allocated"))
        if cuda else (lambda: (None, f"torch reports no peak memory on {dev.kind}")),
        reset_peak=(lambda: torch.cuda.reset_peak_memory_stats(dev.torch_device)) if cuda else (lambda: None),
        note=note,
    )


def _torch_setup(prep: Prepared) -> tuple[torch.nn.Module, tuple, dict[str, torch.Tensor]]:
    """A private copy of the module on the device, the inputs (the engine's torch_inputs: float
    leaves in the benchmark dtype, ids and masks as they are) and the targets."""
    dev, tdt = prep.device.torch_device, TORCH_DTYPES[prep.dtype]
    model = copy.deepcopy(prep.torch_module).to(dev)
    args = torch_inputs(prep.args, tdt, dev, grads=False)
    targets = {p: torch.as_tensor(t, dtype=tdt, device=dev) for p, t in prep.targets.items()}
    return model, args, targets


def _torch_numpy(out) -> dict[str, np.ndarray]:
    return {p: o.detach().to(torch.float64).cpu().numpy() for p, o in flatten(out).items()
            if isinstance(o, torch.Tensor) and o.is_floating_point()}


def _torch_forward(model: torch.nn.Module, args: tuple) -> Callable[[], Any]:
    model.eval()

    def forward():
        with torch.no_grad():
            return model(*args)

    return forward


def _torch_train(model: torch.nn.Module, args: tuple, targets: dict[str, torch.Tensor],
                 train_mode: bool) -> Callable[[], torch.Tensor]:
    model.train(train_mode)  # BatchNorm: batch statistics and running-stat updates, like Flax train=True
    for m in model.modules():  # dropout held off (module docstring): Flax cannot draw torch's masks
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def train_step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        out = flatten(model(*args))
        loss = sum(F.mse_loss(out[p], y) for p, y in targets.items())
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step


def _count_torch_flops(prep: Prepared, phase: str) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    if prep.device.torch_device is None:
        return None
    model, args, targets = _torch_setup(prep)
    fn = _torch_forward(model, args) if phase == "forward" else _torch_train(model, args, targets, prep.train_mode)
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------- jax


def _jax_step(prep: Prepared, phase: str) -> Step:
    """The Flax twin through the parity engine's runner (parity.runtime.FlaxTwin: Linen or NNX),
    jitted; inputs by the engine's flax_inputs, targets and outputs converted by the declared or
    inferred layouts (Prepared.in_layouts / out_layouts)."""
    dev = prep.device.jax_device
    jdt = jnp.dtype(prep.dtype)

    def put(a):
        # jnp.array copies, so donating a Step's buffers never touches prep.variables.
        return jax.device_put(jnp.array(a, dtype=jdt), dev)

    args = jax.device_put(flax_inputs(prep.args, prep.in_layouts, dtype=jdt), dev)
    variables = jax.tree.map(put, prep.variables)
    train_kwarg = prep.check_kwargs.get("train_kwarg")
    compiled: dict[str, Any] = {}

    if phase == "forward":
        twin = FlaxTwin(prep.flax_module, train=False, train_kwarg=train_kwarg)
        # The output pytree flattened to {path: array}: the engine's paths (parity.runtime.tree).
        fn = jax.jit(lambda v, a: flatten(twin.apply(v, a)[0]))
        call_args = [variables, args]

        def run():
            return _aot(compiled, fn, call_args)(*call_args)

        def to_numpy(out) -> dict[str, np.ndarray]:
            return {t: np.asarray(to_torch_layout(np.asarray(out[f], dtype=np.float64), prep.out_layouts[t],
                                                  f"{prep.name} output {t}"))
                    for t, f in prep.flax_paths.items() if t in prep.targets}
    else:
        y = {prep.flax_paths[t]: put(to_flax_layout(v, prep.out_layouts[t], f"{prep.name} benchmark target {t}"))
             for t, v in prep.targets.items()}
        twin = FlaxTwin(prep.flax_module, train=prep.train_mode, train_kwarg=train_kwarg,
                        train_mode_matters=prep.train_matters, dropout=False)
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}
        tx = optax.sgd(LR, momentum=MOMENTUM)
        # parity.training's one Flax step, its buffers donated (params, batch statistics, optimizer state)
        fn = jax.jit(flax_train_step(twin, tx, _mse_over_targets, measure=False), donate_argnums=(0, 1, 2))
        state = [params, rest, tx.init(params)]

        def run():
            step = _aot(compiled, fn, [*state, args, y])
            state[0], state[1], state[2], loss = step(*state, args, y)
            return loss

        def to_numpy(out) -> dict[str, np.ndarray]:  # the loss: a scalar, no layout
            return {"loss": np.asarray(out, dtype=np.float64)}

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


def _mse_over_targets(out, y) -> jax.Array:
    """The benchmark's training loss: F.mse_loss (mean) per output leaf with a target, summed.
    y: {Flax output path: target}."""
    out = flatten(out)
    return sum(jnp.mean((out[p] - t) ** 2) for p, t in y.items())


def _flops_or_reason(value: int | None, source: str) -> tuple[int | None, str]:
    return (value, source) if value else (None, f"{source} unavailable")
