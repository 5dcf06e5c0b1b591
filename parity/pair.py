"""The prepared pair: a torch module and its Flax twin made ready once (private copy, port plan,
variables, inputs in both layouts) and handed to every consumer; the check's options as one
frozen value.

A PreparedPair in another dtype (``pair.cast("float64")``: the judge's reference run) reuses the
plan, the twin, the layouts and the output map: no second port, no second trace.
"""
from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity.options import Options
from parity.runtime import (FlaxTwin, TorchRun, as_args, flax_inputs, input_layouts, run_torch, torch_inputs,
                            train_mode_matters)
from parity.runtime.layouts import LayoutSpec
from weight_port import AS_IS, Inputs, PortPlan, bind_keywords, build_plan

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def dtype_name(dtype) -> str:
    """"float32" / "bfloat16" / ... for a torch dtype, numpy dtype, string or None (float32)."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def devices(device: str | None) -> tuple[str, object]:
    """(torch device, JAX device) for "cpu" / "cuda" (alias "gpu"); None means CPU. The JAX device
    is this process's first (in a jax.distributed job jax.devices() lists every process's, and
    process 0's are not this one's to run on)."""
    if device in (None, "cpu"):
        return "cpu", jax.local_devices(backend="cpu")[0]
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
        try:
            return "cuda", jax.local_devices(backend="gpu")[0]
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} requested but JAX has no GPU backend ({exc})") from None
    raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


@dataclass(frozen=True)
class CheckOptions(Options):
    """What ``parity.check`` runs and how it judges (the fields are check()'s keywords; see its
    docstring). Frozen: one value travels from the CLI or the caller to every consumer;
    ``CheckOptions.of(options, **keywords)`` merges keywords into it (parity.options)."""

    what = "check option"

    dtype: str = "float32"
    grads: bool = True
    layers: bool = True
    rtol: float | None = None
    atol: float | None = None
    train: bool = False
    train_kwarg: str | None = None
    input_layout: LayoutSpec = None
    output_layout: LayoutSpec = None
    rename: object = None
    precision: str = "highest"
    tf32: bool | None = None
    reference: str | None = None
    device: str | None = None
    seed: int = 0
    data_parallel: int | None = None
    lint: bool = True
    strict: bool = False
    # Output leaves that are logits (class axis last): a path or paths (``out.logits``, ``logits``);
    # None infers them (a leaf whose path ends in ``logits``), () declares none (parity._logits).
    logits: str | tuple[str, ...] | None = None
    # a low-precision check's torch parameter gradients (its checked run's and its float64
    # reference's) kept in files between the judge's reads of them (parity._spill, in TMPDIR):
    # None when the float64 ones are 1 GiB or more, True always, False never.
    spill: bool | None = None

    def __post_init__(self):
        if self.logits is not None and not isinstance(self.logits, str):
            object.__setattr__(self, "logits", tuple(self.logits))
        name = dtype_name(self.dtype)
        if name not in TORCH_DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(TORCH_DTYPES)}")
        object.__setattr__(self, "dtype", name)
        if self.reference not in (None, "float64"):
            raise ValueError(f"reference must be None or 'float64', got {self.reference!r}")
        if self.reference and self.override:
            raise ValueError("rtol/atol replace the measured-noise judge; they do not combine with "
                             "reference='float64'")

    @property
    def override(self) -> bool:
        """The caller's rtol/atol decide instead of the measured noise (torch.testing semantics)."""
        return self.rtol is not None or self.atol is not None


@dataclass
class PreparedPair:
    """One torch module and its Flax twin, ready to run in one dtype.

    torch_module: a private copy cast to ``dtype`` (keyword inputs bound; never the caller's
    module, though with ``shares_weights`` its parameters keep the caller's storage).
    torch_args: the inputs as given (torch layout, ``dtype``), kept pristine: every run gets a
    fresh copy (a torch model may change its inputs in place: XGLM adds its offset to
    position_ids with +=). flax_args: the same inputs in Flax layout ([N, H, W, C] for "NC..."
    leaves). in_layouts: the layout of every float input leaf, by path (``input[0]``).
    output_map / out_layouts: Flax output path -> torch output path, and each torch output's
    layout; set by the first run that sees both output structures (parity.checker), shared by
    every cast.
    """

    torch_module: torch.nn.Module
    flax_module: object
    twin: FlaxTwin
    plan: PortPlan
    variables: Mapping
    torch_args: tuple
    flax_args: tuple
    in_layouts: dict[str, str]
    dtype: str
    device: str
    train: bool
    notes: list[str] = field(default_factory=list)
    user_variables: bool = False
    output_map: dict[str, str] | None = None
    out_layouts: dict[str, str] | None = None
    # The copy's parameters keep the caller's storage (prepare(share_weights=True)): a run that
    # nudges them moves them back (run_torch), and nothing changes them in place otherwise.
    shares_weights: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def inputs(self, grads: bool) -> tuple:
        """A fresh copy of the inputs for one torch run (float leaves require grad with ``grads``)."""
        return torch_inputs(self.torch_args, self.torch_dtype, self.device, grads)

    def run_torch(self, *, grads: bool, capture: bool = False, cotangents: Mapping | None = None,
                  cotangent_seed: int = 1, watch: bool = False, ops: bool = False,
                  perturb: int | None = None, restore: bool = True, free_weights: bool = False,
                  param_grad_sink: Callable[[str, np.ndarray], None] | None = None) -> tuple[TorchRun, tuple]:
        """One torch forward (and backward with ``grads``) of the private copy on fresh inputs:
        (the run, the inputs it was given). The copy is left as it was: train-mode BatchNorm
        statistics are restored and the parameter .grad fields freed (the run holds its own
        numpy gradients; keeping both would double the memory).

        perturb (a seed): first move a random half of every non-integer weight, buffer and input
        one ulp toward zero (a noise probe: rounding-sized changes of everything that carries
        rounding, so a structure that cancels exactly in one precision shows the noise it has in
        another), and move the weights back afterwards, bit for bit. Integer values (0, 1, an
        index kept in a float buffer, a mask's finfo.min) carry no rounding and are left alone:
        XGLM turns such a float into an index, and a nudged 3.0 is index 2. restore=False leaves
        the weights nudged: for a copy nothing runs again (its caller frees or drops it); not for
        a pair that shares the caller's weights (``shares_weights``), whose weights always go back.
        free_weights: each parameter's storage is freed as autograd finishes its gradient
        (parity.runtime.run_torch): for a copy nothing runs again, whose caller then frees the
        rest (free_torch_weights). param_grad_sink(name, grad): each parameter's gradient handed
        over as autograd finishes it, never all held (parity.runtime.run_torch)."""
        tm = self.torch_module
        args = self.inputs(grads)
        restore = restore or self.shares_weights  # the caller's own weights: never left nudged
        saved = {n: b.detach().clone() for n, b in tm.named_buffers()} if self.train else {}
        flips: list[tuple[torch.Tensor, list[np.ndarray]]] = []
        if perturb is not None:
            gen = torch.Generator().manual_seed(perturb)
            with torch.no_grad():
                for tensor in list(tm.parameters()) + list(tm.buffers()):
                    if tensor.is_floating_point():
                        masks = _nudge(tensor, gen, keep=restore)
                        if restore:
                            flips.append((tensor, masks))
            args = jax.tree_util.tree_map(
                lambda a: _nudged(a, gen) if isinstance(a, torch.Tensor) and a.is_floating_point() else a, args)
        try:
            run = run_torch(tm, args, train=self.train, grads=grads, cotangents=cotangents,
                            cotangent_seed=cotangent_seed, capture=capture,
                            watch_precision=self.torch_dtype if watch else None, ops=ops,
                            free_weights=free_weights, param_grad_sink=param_grad_sink)
        finally:
            tm.zero_grad(set_to_none=True)
            with torch.no_grad():
                for tensor, masks in flips:  # one ulp back, away from zero: exact
                    for part, bits in zip(_chunks(tensor), masks):
                        away = torch.copysign(part.new_tensor(float("inf")), part)
                        part.copy_(torch.where(_unpacked(bits, part), torch.nextafter(part, away), part))
                buffers = dict(tm.named_buffers())
                for n, b in saved.items():
                    buffers[n].copy_(b)
        return run, args

    def free_torch_weights(self) -> None:
        """Free the torch copy's parameter and buffer storage once nothing will run it again (a
        cast's float64 copy after its one run): every tensor becomes empty in place, so the memory
        goes even where the recorded calls and their autograd graph still hold the module. A
        parameter that shares the caller's storage (``shares_weights``) is only let go: the
        copy's Parameter is rebound, the caller's tensor is untouched."""
        with torch.no_grad():
            for t in list(self.torch_module.parameters()) + list(self.torch_module.buffers()):
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    def twin_in(self, dtype: str) -> FlaxTwin:
        """The twin computing in ``dtype`` (FlaxTwin.computing_in: a Linen ``dtype`` field equal to
        this pair's dtype is cloned with ``dtype``)."""
        return self.twin.computing_in(dtype, self.dtype)

    def cast(self, dtype: str, *, flax: bool = True) -> PreparedPair:
        """The same pair in ``dtype``: the torch copy, the inputs and (with ``flax``; else they
        stay this pair's) the variables cast (values already rounded to this pair's dtype stay
        so: a reference then differs by its arithmetic only); the plan, twin, layouts and output
        map shared; the twin too, as declared (the per-layer rows of a twin declared float32 keep
        its float32 parts, as torch's upcasts keep theirs: parity.checker judges those by float32
        noise). Call under jax.enable_x64 for float64 variables."""
        tdt = TORCH_DTYPES[dtype]
        tm, _ = _copy_in(self.torch_module, tdt, self.device)
        args = torch_inputs(self.torch_args, tdt, self.device, False)
        out = replace(self, torch_module=tm, torch_args=args, flax_args=flax_inputs(args, self.in_layouts),
                      dtype=dtype, notes=[], shares_weights=False)
        if flax:
            out.cast_variables()
        return out

    def release_variables(self) -> bool:
        """Free the twin's ported variables until ``port_variables`` makes them again (the port
        is exact: the same values): for a check whose twin runs next in another dtype only (a
        low-precision check's float64 own-noise and rows runs), so the checked-dtype copy is not
        held through torch's float64 run. The caller's own variables (``user_variables``) cannot
        be made again and are kept: False then."""
        if self.user_variables:
            return False
        self.variables = None
        return True

    def port_variables(self, dtype: str | None = None) -> dict:
        """The twin's variables ported again from this pair's torch copy (its weights as they are
        now), cast to ``dtype`` (default: the pair's) leaf by leaf as they are made: bit for bit
        the port's values cast. Call under jax.enable_x64 for float64."""
        return self.plan.to_flax(self.torch_module.state_dict(), dtype=jnp.dtype(dtype or self.dtype))

    def cast_variables(self) -> None:
        """Make the variables this pair's dtype, in place: a cast made with ``flax=False`` (whose
        variables are still its source's) before its twin's side runs. A low-precision check's
        float64 rows make theirs only after torch's float64 run: the model's size in float64
        is not held through that run, beside torch's float64 weights and gradients (GPT-2-medium:
        2.8 GB off the check's peak). Call under jax.enable_x64 for float64."""
        jdt = jnp.dtype(self.dtype)
        self.variables = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jdt) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
            self.variables)


def _copy_in(module: torch.nn.Module, dtype: torch.dtype, device: str = "cpu", *,
             share: bool = False) -> tuple[torch.nn.Module, bool]:
    """A deep copy of ``module`` with its floating parameters and buffers made in ``dtype`` on
    ``device`` directly (``deepcopy(...).to(dtype)`` would copy every weight twice: a float64 copy
    of BERT-base is 0.9 GB, the first copy 0.4 GB more, each written once more), and whether it
    shares weights with ``module``. share: a parameter already in ``dtype`` on ``device`` keeps
    the caller's storage under a Parameter object of the copy's own (its ``.grad``, its
    ``requires_grad``, its ``.data`` rebinding are the copy's), so a check of a float32 model in
    float32 holds its weights once, not twice (GPT-2-medium: 1.4 GB); buffers (BatchNorm
    statistics a train-mode run updates) are always the copy's own."""
    memo: dict[int, object] = {}
    shared = False
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in memo or not t.is_floating_point():
            continue
        made = t.detach().to(device=device, dtype=dtype)
        if t.numel() and made.data_ptr() == t.data_ptr():  # .to made nothing: the caller's storage
            if share and type(t) is torch.nn.Parameter:
                shared = True
            else:
                made = made.clone()
        memo[id(t)] = torch.nn.Parameter(made, t.requires_grad) if isinstance(t, torch.nn.Parameter) else made
    # .to: what the memo left (complex), as Module.to does
    return copy.deepcopy(module, memo).to(device=device, dtype=dtype), shared


# Elements per chunk of the probe's nudge: its temporaries (the random draw, the mask, the nudged
# values) are a chunk, reused by the allocator, never a weight's size (BERT-base's word
# embedding is 23M elements; whole-weight temporaries cost a third of the probe run on a VM).
_NUDGE_CHUNK = 1 << 20


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    """Views of a contiguous ``t``'s elements in C order, _NUDGE_CHUNK at a time; ``[t]`` itself
    otherwise (a strided buffer: whole)."""
    if not t.is_contiguous() or t.numel() <= _NUDGE_CHUNK:
        return [t]
    flat = t.view(-1)
    return [flat[i:i + _NUDGE_CHUNK] for i in range(0, flat.numel(), _NUDGE_CHUNK)]


def _nudge_mask(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random half of ``t``'s finite, non-integer elements (drawn on the CPU generator)."""
    return (torch.rand(t.shape, generator=gen) < 0.5).to(t.device) & torch.isfinite(t) & (t != t.round())


def _nudge(t: torch.Tensor, gen: torch.Generator, *, keep: bool) -> list[np.ndarray]:
    """Move a random half of ``t``'s finite, non-integer elements one ulp toward zero, in place, a
    chunk at a time (the same draws, in the same order, as one draw of the whole: the CPU
    generator's stream does not depend on how it is cut). The mask of each of ``_chunks(t)``
    (``keep``), packed 8 to a byte (a bool per weight is 355 MB on GPT-2-medium; the masks
    cannot be drawn again: a value one ulp from an integer can become that integer), else nothing."""
    masks = []
    zero = t.new_zeros(())
    for part in _chunks(t):
        flip = _nudge_mask(part, gen)
        part.copy_(torch.where(flip, torch.nextafter(part, zero), part))
        if keep:
            masks.append(np.packbits(flip.reshape(-1).cpu().numpy()))
    return masks


def _unpacked(bits: np.ndarray, part: torch.Tensor) -> torch.Tensor:
    """The bool mask ``_nudge`` packed for ``part``, on its device and in its shape."""
    flip = np.unpackbits(bits, count=part.numel()).view(bool)
    return torch.from_numpy(flip).reshape(part.shape).to(part.device)


def _nudged(a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A nudged copy of input ``a`` (``_nudge``), requiring grad as ``a`` does."""
    out = a.detach().clone()
    _nudge(out, gen, keep=False)
    return out.requires_grad_(a.requires_grad)


def _plan_layouts(args: tuple, in_layouts: Mapping[str, str]) -> list[str]:
    # build_plan takes one layout per positional argument (its example input is flat).
    return [in_layouts.get(f"input[{i}]", AS_IS) for i in range(len(args))]


def _port(tm, flax_module, args, in_layouts, rename, check_attributes: str = "warn") -> tuple[PortPlan, list[str]]:
    # A Flax hyperparameter that differs from torch's (LayerNorm eps) is something a check should
    # measure and locate, not refuse: ask the port to warn, and keep its words.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = tuple(x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in args)
        plan = build_plan(tm, flax_module, plain, input_layout=_plan_layouts(args, in_layouts),
                          check_attributes=check_attributes, rename=rename)
    notes = [f"weight port: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    # Pairings the port made by structure rather than by name: a user should see them, since a
    # wrong one shifts every verdict.
    notes += [f"weight port pairing: {n}" for n in plan.pairing_notes or []]
    # What a rule decided about single tensors (a frozen table the twin computes, a look-alike
    # Flax layer ported by its kind's rule)
    notes += grouped_plan_notes(plan.notes or [])
    return plan, notes


def grouped_plan_notes(plan_notes: list[str]) -> list[str]:
    """The port's notes, one line per look-alike Flax class (a UNet has ten BatchNorms of one
    class: one line, not ten) and one per other note."""
    looks: dict[str, list[str]] = {}
    out = []
    for n in plan_notes:
        m = re.match(r"flax (\S+) \((\w+)\) is of no registered class but has exactly (.*?): torch", n)
        if m:
            looks.setdefault(f"{m.group(2)}|{m.group(3)}", []).append(m.group(1))
        else:
            out.append(f"weight port: {n}")
    for key, paths in looks.items():
        cls, kind = key.split("|", 1)
        out.append(f"weight port: {len(paths)} Flax {cls} layer(s) of no registered class have exactly {kind} "
                   f"and are ported by that kind's rule (first: {paths[0]}); weight_port.register_rule names "
                   "the class for good")
    return out


def prepare(torch_module: torch.nn.Module, flax_module, example_input, options: CheckOptions | None = None, *,
            variables: Mapping | None = None, progress: Callable[[str], None] | None = None,
            check_attributes: str = "warn", dropout: bool | None = None,
            share_weights: bool = False) -> PreparedPair:
    """Prepare ``torch_module`` and its Flax twin once: copy and cast torch to ``options.dtype``,
    bind keyword inputs (parity.Inputs), declare or infer every input's layout, port the weights
    (one plan) unless ``variables`` are given.

    example_input: the torch module's positional arguments in torch layout ([N, C, H, W] images,
    [N, T] ids, [N, T, D] tokens), or parity.Inputs(*args, **kwargs). Numerics (pinned
    precision, x64) are the caller's: parity.check prepares inside them.
    check_attributes: the port's policy for a hyperparameter that differs between the sides
    ("warn": a check measures and reports it; training parity passes "ignore" and names the
    BatchNorm ones itself). dropout: the twin's dropout in train mode (None: as ``train``;
    training parity holds it off, as it holds torch's Dropout modules in eval mode).
    share_weights: the private copy keeps the caller's parameter storage where it is already in
    the pair's dtype and device (_copy_in): for a consumer that never changes weights in place
    (a check; not training, whose optimizer steps do).
    """
    o = options or CheckOptions()
    say = progress or (lambda msg: None)
    tdev, _ = devices(o.device)
    tdtype = TORCH_DTYPES[o.dtype]
    tm, shared = _copy_in(torch_module, tdtype, tdev, share=share_weights)
    tm.train(o.train)
    # Keyword inputs are bound into the private torch copy and a rebuilt Flax module: everything
    # after this calls both top modules positionally.
    tm, flax_module, example_input = bind_keywords(tm, flax_module, example_input)
    args = torch_inputs(as_args(example_input), tdtype, tdev, False)
    in_layouts = input_layouts(tm, args, o.input_layout)
    twin = FlaxTwin(flax_module, train=o.train, train_kwarg=o.train_kwarg, dropout=dropout,
                    train_mode_matters=train_mode_matters(tm))
    say("porting weights")
    plan, notes = _port(tm, flax_module, args, in_layouts, o.rename, check_attributes)
    given = variables is not None
    if variables is None:
        variables = plan.to_flax(tm.state_dict())
    return PreparedPair(tm, flax_module, twin, plan, variables, args, flax_inputs(args, in_layouts), in_layouts,
                        o.dtype, tdev, o.train, notes, given, shares_weights=shared)


__all__ = ["CheckOptions", "Inputs", "PreparedPair", "prepare", "dtype_name", "devices", "TORCH_DTYPES"]
