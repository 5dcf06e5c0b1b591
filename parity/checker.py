"""parity.check: run a torch module and its Flax twin on the same input, compare outputs and grads.

Gradients are of <output, cotangent> with one seeded random cotangent shared by both sides (a
plain sum would hide sign and permutation errors that cancel).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity.compare import Comparison, compare, compare_to_reference, worst_of
from parity.layers import LayerRow, analyze_layers, capture_flax, first_divergence
from parity.numerics import jax_precision, numerics_env, pinned, precision_warnings
from parity.report import Report
from parity.tolerances import FORWARD, GRAD, REFERENCE, tolerance_for
from weight_port.flax_tree import call_kwargs
from weight_port.layout import AS_IS, CHANNELS_FIRST, to_flax_layout
from weight_port.plan import PortPlan, build_plan
from weight_port.tensors import to_numpy

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return np.dtype(dtype).name if not isinstance(dtype, str) else dtype


def _as_list(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _torch_inputs(example_input, tdtype) -> list[torch.Tensor]:
    out = []
    for x in _as_list(example_input):
        t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if t.is_floating_point():
            t = t.to(tdtype).requires_grad_(True)
        out.append(t)
    return out


def run_torch(module: torch.nn.Module, inputs: list[torch.Tensor], cotangent_seed: int, train: bool):
    """Forward + backward of <out, cot>. Returns (outs, cots, input grads, param grads), numpy."""
    module.train(train)
    outs = _as_list(module(*inputs))
    rng = np.random.default_rng(cotangent_seed)
    cots = [rng.standard_normal(tuple(o.shape)) for o in outs]
    loss = sum((o * torch.as_tensor(c, dtype=o.dtype, device=o.device)).sum() for o, c in zip(outs, cots))
    loss.backward()
    in_grads = [to_numpy(x.grad) if x.grad is not None else np.zeros(tuple(x.shape)) for x in inputs if x.is_floating_point()]
    p_grads = {n: (to_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape)))
               for n, p in module.named_parameters()}
    return [to_numpy(o.detach()) for o in outs], cots, in_grads, p_grads


def run_flax(module: nn.Module, variables: Mapping, flax_inputs: list, cots: list, train: bool):
    """Forward + VJP with the same cotangents (given in Flax layout). Returns numpy/pytrees."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    kwargs = call_kwargs(module, train)
    float_idx = [i for i, x in enumerate(flax_inputs) if jnp.issubdtype(x.dtype, jnp.floating)]

    def forward(params, *float_inputs):
        xs = list(flax_inputs)
        for i, x in zip(float_idx, float_inputs):
            xs[i] = x
        v = {"params": params, **rest}
        if train and "batch_stats" in rest:
            out, _ = module.apply(v, *xs, mutable=["batch_stats"], **kwargs)
        else:
            out = module.apply(v, *xs, **kwargs)
        return out

    def forward_backward(params, float_inputs, cots):
        outs, vjp = jax.vjp(forward, params, *float_inputs)
        flat = _as_list(outs)
        cot_tree = (type(outs)(c.astype(o.dtype) for c, o in zip(cots, flat))
                    if isinstance(outs, (tuple, list)) else cots[0].astype(outs.dtype))
        return flat, vjp(cot_tree)

    # One jitted program: XLA compiles it once, where running eagerly compiles every primitive
    # separately (several times slower on CPU for a first call). Numerics are the same ops.
    flat_outs, grads = jax.jit(forward_backward)(
        params, [flax_inputs[i] for i in float_idx], [jnp.asarray(c) for c in cots])
    return [np.asarray(o) for o in flat_outs], [np.asarray(g) for g in grads[1:]], grads[0]


@dataclass
class _Run:
    """Raw results of one forward + backward on both sides (numpy; torch values in torch layout)."""

    plan: PortPlan
    variables: Mapping
    torch_inputs: list[torch.Tensor]
    flax_inputs: list
    cots: list[np.ndarray]
    t_outs: list[np.ndarray]
    f_outs: list[np.ndarray]
    t_in_grads: list[np.ndarray]
    f_in_grads: list[np.ndarray]
    t_p_grads: dict[str, np.ndarray]
    f_p_grads: dict[str, np.ndarray]
    torch_module: torch.nn.Module
    port_notes: list[str]
    flax_capture: tuple | None = None  # parity.layers.capture_flax's result, when layers=True


def _device(device: str | None) -> tuple[str, object]:
    """(torch device, JAX device) for "cpu" / "cuda" (alias "gpu"); None means CPU."""
    if device in (None, "cpu"):
        return "cpu", jax.devices("cpu")[0]
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
        try:
            return "cuda", jax.devices("gpu")[0]
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} requested but JAX has no GPU backend ({exc})") from None
    raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


def _run(torch_module, flax_module, example_input, variables, dname, train, input_layout, seed,
         grads, tdev, say, layers) -> _Run:
    tdtype = _DTYPES[dname]
    tm = copy.deepcopy(torch_module).to(device=tdev, dtype=tdtype)
    inputs = [x.to(tdev) for x in _torch_inputs(example_input, tdtype)]
    say("porting weights")
    # A Flax hyperparameter that differs from torch's (LayerNorm eps) is something this check
    # should measure and locate, not refuse: ask the port to warn, and keep its words.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = build_plan(tm, flax_module, [x.detach().cpu() for x in inputs], input_layout=input_layout,
                          check_attributes="warn")
    port_notes = [f"weight port: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    if variables is None:
        variables = plan.to_flax(tm.state_dict())
    flax_inputs = [jnp.asarray(to_flax_layout(to_numpy(x.detach()), input_layout)) for x in inputs]
    say("torch forward/backward")
    t_outs, cots, t_in_grads, t_p_grads = run_torch(tm, inputs, seed + 1, train)
    f_cots = [to_flax_layout(c, input_layout if np.ndim(c) >= 3 else AS_IS) for c in cots]
    capture = None
    if layers:
        # The per-layer capture is a full forward + VJP too: one Flax pass (one compile) serves both.
        say("flax forward/vjp with every layer recorded")
        capture = capture_flax(flax_module, variables, flax_inputs, f_cots, call_kwargs(flax_module, train), train)
        f_outs, f_in_grads, f_p_grads = capture[4]
    else:
        say("flax forward/vjp")
        f_outs, f_in_grads, f_p_grads = run_flax(flax_module, variables, flax_inputs, f_cots, train)
    f_named = plan.to_torch({"params": f_p_grads}, collections=("params",)) if grads else {}
    return _Run(plan, variables, inputs, flax_inputs, cots, t_outs, f_outs, t_in_grads, f_in_grads,
                t_p_grads, f_named, tm, port_notes, capture)


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}[{i}]" for i in range(n)]


def _dtype_warnings(run: _Run, dname: str, user_variables: bool) -> list[str]:
    out = []
    for i, f in enumerate(run.f_outs):
        if np.issubdtype(f.dtype, np.floating) and f.dtype.name != dname:
            out.append(f"Flax output[{i}] is {f.dtype.name} but the check runs in {dname}: the Flax "
                       "module computes at a different precision (its dtype/param_dtype?)")
    if user_variables:
        leaves = jax.tree_util.tree_leaves(run.variables.get("params", {}))
        kinds = sorted({np.dtype(x.dtype).name for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)})
        if kinds and kinds != [dname]:
            out.append(f"the given Flax variables are {', '.join(kinds)} but the check runs in {dname}")
    return out


def check(
    torch_module: torch.nn.Module,
    flax_module: nn.Module,
    example_input,
    *,
    variables: Mapping | None = None,
    grads: bool = True,
    layers: bool = True,
    dtype=None,
    rtol: float | None = None,
    atol: float | None = None,
    train: bool = False,
    input_layout: str = CHANNELS_FIRST,
    precision: str = "highest",
    tf32: bool | None = None,
    reference: str | None = None,
    device: str | None = None,
    seed: int = 0,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Compare ``torch_module`` and its Flax twin on ``example_input`` (torch layout, [N, C, H, W]).

    variables: Flax variables to use (default: ported from the torch module after casting it to
    ``dtype``). train: BatchNorm uses batch statistics on both sides. layers: per-layer rows with
    isolated and accumulated error, and ``first_divergence``. rtol/atol: override the table.
    precision: JAX matmul precision; tf32 (default: matching ``precision``) is torch's TF32 flag,
    and the report warns when the two disagree. reference="float64": also run both sides in
    float64 and judge the ``dtype`` run by Flax's error against the torch float64 result relative
    to torch's own (the per-layer analysis then runs in float64, where verdicts are sharp).
    device: "cpu" (default) or "cuda". The torch module is copied, never mutated. Runs under
    pinned numerics and, for float64, with x64 enabled for the duration of the call only.
    progress: called with short status lines (the CLI prints them).
    """
    say = progress or (lambda msg: None)
    dname = _dtype_name(dtype)
    if dname not in _DTYPES:
        raise ValueError(f"unknown dtype {dname!r}; choose from {', '.join(_DTYPES)}")
    if reference not in (None, "float64"):
        raise ValueError(f"reference must be None or 'float64', got {reference!r}")
    if reference and (rtol is not None or atol is not None):
        raise ValueError("rtol/atol override the table; they do not combine with reference='float64'")
    tdev, jdev = _device(device)
    x64 = jax.enable_x64(True) if dname == "float64" else contextlib.nullcontext()
    with jax.default_device(jdev), pinned(precision=precision, tf32=tf32):
        with x64:  # record x64 as it is for the run itself (on only inside float64 checks)
            env = numerics_env(tdev)
        notes = precision_warnings(env)
        with x64:
            run = _run(torch_module, flax_module, example_input, variables, dname, train, input_layout,
                       seed, grads, tdev, say, layers and not reference)
        notes += run.port_notes + _dtype_warnings(run, dname, variables is not None)
        ref = None
        if reference:
            say("float64 reference run")
            with jax.enable_x64(True):
                ref_vars = None
                if variables is not None:
                    ref_vars = jax.tree_util.tree_map(
                        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        variables)
                # Weights rounded to the checked dtype first: the reference then differs from the
                # low-precision runs by their arithmetic only, and user-given low-precision
                # variables upcast to exactly the reference's weights.
                rounded = copy.deepcopy(torch_module).to(_DTYPES[dname])
                ref = _run(rounded, flax_module, example_input, ref_vars, "float64", train,
                           input_layout, seed, grads, tdev, say, layers)
        prec = jax_precision()
        if ref is None:
            fwd = tolerance_for(dname, FORWARD, prec).override(rtol, atol)
            grd = tolerance_for(dname, GRAD, prec).override(rtol, atol)

            def judge(kind, nm, f, t, layout, ref_value):
                return compare(nm, f, t, fwd if kind == FORWARD else grd, layout=layout)
        else:
            ref_tol = tolerance_for(dname, REFERENCE, prec)

            def judge(kind, nm, f, t, layout, ref_value):
                return compare_to_reference(nm, f, t, ref_value, ref_tol, layout=layout)

        outputs = [judge(FORWARD, n, f, t, input_layout, ref.t_outs[i] if ref else None)
                   for i, (n, f, t) in enumerate(zip(_names("output", len(run.t_outs)), run.f_outs, run.t_outs))]
        in_comps: list[Comparison] = []
        p_comps: list[Comparison] = []
        if grads:
            in_comps = [judge(GRAD, n, f, t, input_layout, ref.t_in_grads[i] if ref else None)
                        for i, (n, f, t) in enumerate(zip(_names("grad input", len(run.t_in_grads)),
                                                          run.f_in_grads, run.t_in_grads))]
            p_comps = [judge(GRAD, f"grad {n}", run.f_p_grads[n], g, AS_IS, ref.t_p_grads[n] if ref else None)
                       for n, g in run.t_p_grads.items()]
        rows: list[LayerRow] = []
        divergence, kind = None, None
        if layers:
            # Per-layer verdicts need sharp tolerances: in reference mode they run in float64.
            lr = ref or run
            ldt = "float64" if ref else dname
            with (jax.enable_x64(True) if ldt == "float64" else contextlib.nullcontext()):
                rows = analyze_layers(
                    lr.torch_module, flax_module, lr.variables, lr.plan, lr.torch_inputs, lr.flax_inputs,
                    lr.cots if grads else None, call_kwargs=call_kwargs(flax_module, train), train=train,
                    layout=input_layout,
                    forward_tol=tolerance_for(ldt, FORWARD, prec).override(*((rtol, atol) if not ref else (None, None))),
                    grad_tol=tolerance_for(ldt, GRAD, prec).override(*((rtol, atol) if not ref else (None, None))),
                    progress=say,
                    root=None if ref else (worst_of(outputs), worst_of(in_comps + p_comps)),
                    flax_capture=lr.flax_capture if grads else None,
                )
            divergence, kind = first_divergence(rows)
        say("done")
        return Report(
            model=name or type(torch_module).__name__,
            dtype=dname,
            mode="train" if train else "eval",
            outputs=outputs,
            input_grads=in_comps,
            param_grads=p_comps,
            layers=rows,
            first_divergence=divergence,
            divergence_kind=kind,
            reference=reference,
            env=env,
            warnings=notes,
        )


def assert_parity(*args, **kwargs) -> Report:
    """check(...) that raises AssertionError carrying the report table when parity fails."""
    report = check(*args, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
