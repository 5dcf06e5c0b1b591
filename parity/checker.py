"""parity.check: run a torch module and its Flax twin on the same input, compare outputs and grads.

Gradients are of <output, cotangent> with one seeded random cotangent shared by both sides (a
plain sum would hide sign and permutation errors that cancel).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity.compare import Comparison, compare
from parity.numerics import jax_precision, numerics_env, pinned
from parity.report import Report
from parity.tolerances import FORWARD, GRAD, tolerance_for
from weight_port.flax_tree import call_kwargs
from weight_port.layout import AS_IS, CHANNELS_FIRST, to_flax_layout
from weight_port.plan import build_plan
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
    loss = sum((o * torch.as_tensor(c, dtype=o.dtype)).sum() for o, c in zip(outs, cots))
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

    outs, vjp = jax.vjp(forward, params, *[flax_inputs[i] for i in float_idx])
    flat_outs = _as_list(outs)
    cot_tree = type(outs)(c.astype(o.dtype) for c, o in zip(cots, flat_outs)) if isinstance(outs, (tuple, list)) \
        else jnp.asarray(cots[0], dtype=outs.dtype)
    grads = vjp(cot_tree)
    return [np.asarray(o) for o in flat_outs], [np.asarray(g) for g in grads[1:]], grads[0]


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
    seed: int = 0,
    name: str | None = None,
) -> Report:
    """Compare ``torch_module`` and its Flax twin on ``example_input`` (torch layout, [N, C, H, W]).

    variables: Flax variables to use (default: ported from the torch module after casting it to
    ``dtype``). train: BatchNorm uses batch statistics on both sides. The torch module is copied,
    never mutated. Runs under pinned numerics (JAX matmul ``precision``, TF32 off) and, for
    float64, with x64 enabled for the duration of the call only.
    """
    dname = _dtype_name(dtype)
    tdtype = _DTYPES[dname]
    x64 = jax.enable_x64(True) if dname == "float64" else contextlib.nullcontext()
    with x64, pinned(precision=precision, tf32=False):
        tm = copy.deepcopy(torch_module).to(tdtype)
        inputs = _torch_inputs(example_input, tdtype)
        plan = build_plan(tm, flax_module, [x.detach() for x in inputs], input_layout=input_layout)
        if variables is None:
            variables = plan.to_flax(tm.state_dict())
        flax_inputs = [jnp.asarray(to_flax_layout(to_numpy(x.detach()), input_layout)) for x in inputs]
        t_outs, cots, t_in_grads, t_p_grads = run_torch(tm, inputs, seed + 1, train)
        f_cots = [to_flax_layout(c, input_layout if np.ndim(c) >= 3 else AS_IS) for c in cots]
        f_outs, f_in_grads, f_p_grads = run_flax(flax_module, variables, flax_inputs, f_cots, train)

        fwd = tolerance_for(dname, FORWARD, jax_precision()).override(rtol, atol)
        grd = tolerance_for(dname, GRAD, jax_precision()).override(rtol, atol)
        names = ["output"] if len(t_outs) == 1 else [f"output[{i}]" for i in range(len(t_outs))]
        outputs = [compare(n, f, t, fwd, layout=input_layout) for n, f, t in zip(names, f_outs, t_outs)]
        in_comps: list[Comparison] = []
        p_comps: list[Comparison] = []
        if grads:
            in_names = ["grad input"] if len(t_in_grads) == 1 else [f"grad input[{i}]" for i in range(len(t_in_grads))]
            in_comps = [compare(n, f, t, grd, layout=input_layout)
                        for n, f, t in zip(in_names, f_in_grads, t_in_grads)]
            f_named = plan.to_torch({"params": f_p_grads}, collections=("params",))
            p_comps = [compare(f"grad {n}", f_named[n], g, grd) for n, g in t_p_grads.items()]
        return Report(
            model=name or type(torch_module).__name__,
            dtype=dname,
            mode="train" if train else "eval",
            outputs=outputs,
            input_grads=in_comps,
            param_grads=p_comps,
            env=numerics_env(),
        )


def assert_parity(*args, **kwargs) -> Report:
    """check(...) that raises AssertionError carrying the report table when parity fails."""
    report = check(*args, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
