"""Per-layer parity: every module's output and cotangent on both sides, isolated and inherited error.

Torch side: forward pre/post hooks on every module record its inputs and outputs in execution
order, and tensor hooks record the gradient of the loss with respect to both. Flax side: a method
interceptor records every ``__call__`` under the module path that the port's name rule gives
(``down.0.conv1`` <-> ``down_0/conv1``), and adds a zero "perturbation" to each output so that
one ``jax.vjp`` also yields the cotangent at every layer output.

Two errors per layer:
  accumulated  the Flax model's own intermediate vs torch's: includes everything inherited from
               upstream layers.
  isolated     the Flax layer run alone on *torch's* input for that layer (converted to Flax
               layout) with that layer's variables: non-zero only if this layer itself differs.
Backward likewise: "isolated" is the Flax layer's VJP at torch's input with torch's output
cotangent, compared against torch's input cotangent and the layer's parameter gradients, so a
bug that only exists in gradients (stop_gradient, a wrong custom_vjp) is pinned to its layer.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from parity.compare import Comparison, compare, failed_comparison, worst_of
from parity.tolerances import Tolerance
from weight_port.layout import AS_IS, to_flax_layout, to_torch_layout
from weight_port.naming import flax_path_str, torch_to_flax_path
from weight_port.plan import PortPlan
from weight_port.tensors import to_numpy

ROOT = "<root>"  # how the report names the top-level module (its torch path is "")

Key = tuple[tuple[str, ...], int]  # (flax module path, call index)


@dataclass
class LayerRow:
    """One module call, in execution order (a module finishes after all of its children).

    isolated / accumulated: forward error of the output (see the module docstring).
    grad_isolated: worst of the input cotangents and the parameter gradients of this layer's
    subtree from the Flax layer's VJP at torch's input with torch's output cotangent.
    grad_accumulated: cotangent at this layer's output, full Flax backward vs full torch backward.
    """

    torch_path: str
    flax_path: str
    torch_type: str
    call: int = 0
    isolated: Comparison | None = None
    accumulated: Comparison | None = None
    grad_isolated: Comparison | None = None
    grad_accumulated: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    backward_order: int = 0  # position in the backward pass (children before their parent)

    @property
    def name(self) -> str:
        base = self.torch_path or ROOT
        return f"{base}#{self.call}" if self.call else base

    @property
    def forward_ok(self) -> bool:
        return self.isolated is None or self.isolated.ok

    @property
    def backward_ok(self) -> bool:
        return self.grad_isolated is None or self.grad_isolated.ok

    @property
    def ok(self) -> bool:
        """A layer is out of tolerance when its *isolated* error is: inherited error is judged
        where it ends up (the model outputs and gradients), never charged to an innocent layer."""
        return self.forward_ok and self.backward_ok

    def to_dict(self) -> dict:
        def d(c):
            return c.to_dict() if c is not None else None

        return {
            "name": self.name,
            "torch_path": self.torch_path,
            "flax_path": self.flax_path,
            "torch_type": self.torch_type,
            "call": self.call,
            "ok": self.ok,
            "isolated": d(self.isolated),
            "accumulated": d(self.accumulated),
            "grad_isolated": d(self.grad_isolated),
            "grad_accumulated": d(self.grad_accumulated),
            "notes": list(self.notes),
        }


def first_divergence(rows: Sequence[LayerRow]) -> tuple[str | None, str | None]:
    """(layer name, "forward" | "backward") of the first layer whose isolated error is out.

    Forward wins: a layer that computes the wrong value also back-propagates wrongly. Backward
    divergences are searched in backward-pass order (the first place the cotangent goes wrong).
    """
    for row in rows:
        if not row.forward_ok:
            return row.name, "forward"
    for row in sorted(rows, key=lambda r: r.backward_order):
        if not row.backward_ok:
            return row.name, "backward"
    return None, None


# --- torch capture -------------------------------------------------------------------------------
@dataclass
class _TorchCall:
    path: str
    call: int
    module: torch.nn.Module
    start: int
    args: tuple = ()
    outputs: list = field(default_factory=list)
    arg_grads: dict[int, np.ndarray] = field(default_factory=dict)
    out_grads: dict[int, np.ndarray] = field(default_factory=dict)


def _leaves(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def capture_torch(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], cots: Sequence[np.ndarray] | None, train: bool
) -> list[_TorchCall]:
    """Run forward (and backward of <outputs, cots> when cots is given) with every module hooked.

    Returns the calls in completion order. The pre-hook hands each module a ``view_as`` of its
    float inputs, so the gradient hook on that view sees exactly this module's share of the
    input cotangent even when the same tensor feeds several modules (a UNet skip).
    """
    module.train(train)
    calls: list[_TorchCall] = []
    open_calls: dict[int, list[_TorchCall]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    starts = [0]
    names = {id(m): p for p, m in module.named_modules()}
    handles = []

    def pre(mod, args):
        path = names[id(mod)]
        call = _TorchCall(path, counts[path], mod, starts[0])
        counts[path] += 1
        starts[0] += 1
        new_args = []
        for i, a in enumerate(args):
            if cots is not None and isinstance(a, torch.Tensor) and a.requires_grad:
                a = a.view_as(a)
                a.register_hook(lambda g, i=i, c=call: c.arg_grads.__setitem__(i, to_numpy(g).copy()))
            new_args.append(a)
        call.args = tuple(new_args)
        open_calls[id(mod)].append(call)
        return tuple(new_args)

    def post(mod, args, output):
        call = open_calls[id(mod)].pop()
        call.outputs = _leaves(output)
        for i, o in enumerate(call.outputs):
            if cots is not None and isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(lambda g, i=i, c=call: c.out_grads.__setitem__(i, to_numpy(g).copy()))
        calls.append(call)

    try:
        for mod in dict((id(m), m) for _, m in module.named_modules()).values():
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
        outs = _leaves(module(*inputs))
        if cots is not None:
            loss = sum((o * torch.as_tensor(c, dtype=o.dtype, device=o.device)).sum() for o, c in zip(outs, cots))
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return calls


# --- flax capture --------------------------------------------------------------------------------
@dataclass
class _FlaxCall:
    module: nn.Module  # an unbound clone, runnable on its own with .apply
    args: tuple  # positional args with arrays replaced by None (arrays travel in aux)
    kwargs: dict
    array_pos: list[int]  # positions of array arguments


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _subtree(variables: Mapping, path: tuple[str, ...]) -> dict:
    out = {}
    for col, tree in variables.items():
        node = tree
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                node = None
                break
            node = node[p]
        if node is not None:
            out[col] = node
    return out


def capture_flax(
    module: nn.Module,
    variables: Mapping,
    flax_inputs: Sequence,
    cots: Sequence | None,
    call_kwargs: Mapping,
    train: bool,
) -> tuple:
    """Run the Flax model with every ``__call__`` recorded.

    Returns (calls, args, outputs, output cotangents, model) with the middle three keyed by
    (module path, call index), numpy in Flax layout; cotangents are empty when cots is None.
    model: (outputs, input grads, param grads) of the whole model, as parity.checker.run_flax
    returns them (None without cots), so a check with layers needs only this one Flax pass.
    """
    params = variables.get("params", {})
    rest = {k: v for k, v in variables.items() if k != "params"}
    calls: dict[Key, _FlaxCall] = {}
    float_idx = [i for i, x in enumerate(flax_inputs) if _is_float(x)]

    def make_fn():
        def fn(params, float_inputs, perts_in):
            counts: dict[tuple[str, ...], int] = defaultdict(int)
            aux_args: dict[Key, list] = {}
            aux_outs: dict[Key, list] = {}

            def intercept(next_fun, args, kwargs, ctx):
                if ctx.method_name != "__call__":
                    return next_fun(*args, **kwargs)
                path = tuple(ctx.module.path)
                key = (path, counts[path])
                counts[path] += 1
                out = next_fun(*args, **kwargs)
                leaves = _leaves(out)
                if perts_in is not None and key in perts_in:
                    leaves = [o + p if p is not None else o for o, p in zip(leaves, perts_in[key])]
                    out = type(out)(leaves) if isinstance(out, (tuple, list)) else leaves[0]
                array_pos = [i for i, a in enumerate(args) if _is_array(a)]
                if key not in calls:
                    calls[key] = _FlaxCall(
                        module=ctx.module.clone(parent=None, _deep_clone=True),
                        args=tuple(None if i in array_pos else a for i, a in enumerate(args)),
                        kwargs={k: v for k, v in kwargs.items()},
                        array_pos=array_pos,
                    )
                aux_args[key] = [args[i] for i in array_pos]
                aux_outs[key] = [o for o in leaves if _is_array(o)]
                return out

            xs = list(flax_inputs)
            for i, x in zip(float_idx, float_inputs):
                xs[i] = x
            v = {"params": params, **rest}
            with nn.intercept_methods(intercept):
                if train and rest:
                    out, _ = module.apply(v, *xs, mutable=list(rest), **call_kwargs)
                else:
                    out = module.apply(v, *xs, **call_kwargs)
            return out, (aux_args, aux_outs)

        return fn

    float_inputs = [flax_inputs[i] for i in float_idx]
    if cots is None:
        out, (aux_args, aux_outs) = make_fn()(params, float_inputs, None)
        return calls, _np(aux_args), _np(aux_outs), {}, None
    # Zero perturbations on every float output: their gradient is the cotangent at that output.
    _, (_, shapes) = jax.eval_shape(make_fn(), params, float_inputs, None)
    calls.clear()
    perts = {k: [jnp.zeros(s.shape, s.dtype) if jnp.issubdtype(s.dtype, jnp.floating) else None for s in v]
             for k, v in shapes.items()}
    def forward_backward(params, float_inputs, perts, cots):
        out, vjp, aux = jax.vjp(make_fn(), params, float_inputs, perts, has_aux=True)
        flat_out = _leaves(out)
        cot_tree = (type(out)(c.astype(o.dtype) for c, o in zip(cots, flat_out))
                    if isinstance(out, (tuple, list)) else cots[0].astype(out.dtype))
        return flat_out, aux, vjp(cot_tree)

    # Jitted: one compile for the whole model (see parity.checker.run_flax).
    flat_out, (aux_args, aux_outs), (p_grads, in_grads, pert_grads) = jax.jit(forward_backward)(
        params, float_inputs, perts, [jnp.asarray(c) for c in cots])
    model = ([np.asarray(o) for o in flat_out], [np.asarray(g) for g in in_grads], p_grads)
    return calls, _np(aux_args), _np(aux_outs), _np(pert_grads), model


def _np(tree: Mapping[Key, list]) -> dict[Key, list]:
    return {k: [None if a is None else np.asarray(a) for a in v] for k, v in tree.items()}


# --- pairing and comparison ----------------------------------------------------------------------
def _flax_path_of(torch_path: str, plan: PortPlan) -> tuple[str, ...]:
    # Layers that own tensors: exactly the port's pairing. Containers and parameter-free layers
    # (not in the plan): the port's own name rule, so both agree by construction.
    for layer in plan.layers:
        if layer.info.torch_path == torch_path:
            return tuple(layer.info.flax_path)
    return torch_to_flax_path(torch_path)


@dataclass(frozen=True)
class _InputLayout:
    """How torch's input to one layer becomes the Flax layer's input, and its cotangent back.

    Activations move channels-first <-> channels-last by ``layout``. A Linear right after a
    flatten of [N, C, *S] is different: torch's features are ordered (C, *S) and the Flax twin's
    (*S, C) (the port permutes that Linear's kernel), so its 2-D input is permuted instead.
    """

    layout: str
    flatten: tuple[int, ...] | None = None

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if self.flatten is not None and x.ndim == 2:
            n = x.shape[0]
            return np.moveaxis(x.reshape(n, *self.flatten), 1, -1).reshape(n, -1)
        return to_flax_layout(x, self.layout)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        if self.flatten is not None and x.ndim == 2:
            n, (c, *spatial) = x.shape[0], self.flatten
            return np.moveaxis(x.reshape(n, *spatial, c), -1, 1).reshape(n, -1)
        return to_torch_layout(x, self.layout)


def _input_layout(torch_path: str, plan: PortPlan, layout: str) -> _InputLayout:
    for layer in plan.layers:
        if layer.info.torch_path == torch_path:
            flatten = getattr(layer.info, "flatten", None)
            return _InputLayout(layout, tuple(flatten) if flatten else None)
    return _InputLayout(layout)


def _compare_leaves(name: str, flax_vals: Sequence, torch_vals: Sequence, tol: Tolerance, layout: str
                    ) -> Comparison | None:
    comps = []
    pairs = [(f, t) for f, t in zip(flax_vals, torch_vals) if f is not None and t is not None]
    if len(flax_vals) != len(torch_vals):
        return failed_comparison(name, f"flax returns {len(flax_vals)} arrays, torch {len(torch_vals)}", tol)
    for i, (f, t) in enumerate(pairs):
        leaf_name = name if len(pairs) == 1 else f"{name}[{i}]"
        try:
            comps.append(compare(leaf_name, f, t, tol, layout=layout))
        except ValueError as exc:
            comps.append(failed_comparison(leaf_name, str(exc), tol))
    return worst_of(comps)


def analyze_layers(
    torch_module: torch.nn.Module,
    flax_module: nn.Module,
    variables: Mapping,
    plan: PortPlan,
    torch_inputs: Sequence[torch.Tensor],
    flax_inputs: Sequence,
    cots: Sequence[np.ndarray] | None,
    *,
    call_kwargs: Mapping,
    train: bool,
    layout: str,
    forward_tol: Tolerance,
    grad_tol: Tolerance,
    progress: Callable[[str], None] | None = None,
    root: tuple[Comparison | None, Comparison | None] | None = None,
    flax_capture: tuple | None = None,
) -> list[LayerRow]:
    """Per-layer rows in execution order. cots (torch layout) = None skips the backward columns.

    torch_module must be a private copy (hooks are attached and removed, grads accumulate).
    root: the top module's isolated (forward, backward) verdicts when the caller already has
    them: the top module alone on torch's input *is* the whole-model check, so it is not rerun.
    flax_capture: capture_flax's result when the caller already ran it (same inputs and cots).
    """
    say = progress or (lambda msg: None)
    torch_module.zero_grad(set_to_none=True)
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point() and cots is not None) for x in torch_inputs]
    say("per-layer: torch forward/backward with hooks")
    t_calls = capture_torch(torch_module, inputs, cots, train)
    t_param_grads = {n: (to_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape)))
                     for n, p in torch_module.named_parameters()}
    say("per-layer: flax forward/backward with interceptors")
    f_cots = None
    if cots is not None:
        f_cots = [to_flax_layout(c, layout) for c in cots]
    if flax_capture is None:
        flax_capture = capture_flax(flax_module, variables, flax_inputs, f_cots, call_kwargs, train)
    f_calls, f_args, f_outs, f_out_cots, _ = flax_capture

    # Backward order: a module's backward finishes after its children's, and later modules'
    # backward runs first, so sort by forward *start* descending.
    by_start = sorted(t_calls, key=lambda c: -c.start)
    bwd_pos = {(c.path, c.call): i for i, c in enumerate(by_start)}
    zero_params = jax.tree_util.tree_map(np.zeros_like, dict(variables.get("params", {})))

    rows: list[LayerRow] = []
    jobs: list[_IsoJob] = []
    for tc in t_calls:
        fpath = _flax_path_of(tc.path, plan)
        key = (fpath, tc.call)
        row = LayerRow(tc.path, flax_path_str(fpath), type(tc.module).__name__, tc.call,
                       backward_order=bwd_pos[(tc.path, tc.call)])
        rows.append(row)
        if key not in f_calls:
            row.notes.append("no Flax module at this path (parameter-free layer inlined as a function?)")
            continue
        t_out = [to_numpy(o.detach()) if isinstance(o, torch.Tensor) else None for o in tc.outputs]
        row.accumulated = _compare_leaves(row.name, f_outs[key], t_out, forward_tol, layout)
        if cots is not None:
            t_g = [tc.out_grads.get(i) for i in range(len(tc.outputs))]
            f_g = f_out_cots.get(key, [])
            if any(g is not None for g in t_g) and len(f_g) == len(t_g):
                row.grad_accumulated = _compare_leaves(
                    f"d/d {row.name}", [f if t is not None else None for f, t in zip(f_g, t_g)],
                    t_g, grad_tol, layout)
        if root is not None and tc.path == "" and tc.call == 0:
            row.isolated, row.grad_isolated = root
            continue
        job = _prepare(row, tc, f_calls[key], variables, fpath, t_out, cots is not None, layout,
                       _input_layout(tc.path, plan, layout), train)
        if job is not None:
            jobs.append(job)

    say(f"per-layer: {len(jobs)} layers alone on torch's inputs")
    results = _run_jobs(jobs)
    for job, result in zip(jobs, results):
        if isinstance(result, Exception):  # a layer that cannot run alone is reported, not fatal
            job.row.notes.append(f"could not run the Flax layer alone: {type(result).__name__}: {result}"[:200])
            continue
        _judge(job, result, plan, zero_params, t_param_grads, forward_tol, grad_tol)
    return rows


@dataclass
class _IsoJob:
    """One Flax layer to run alone: ``run(params, *float_inputs)`` on torch's input."""

    row: LayerRow
    tc: _TorchCall
    fpath: tuple[str, ...]
    run: Callable
    params: Mapping
    floats: list
    cots: list | None  # torch's output cotangents in Flax layout (None: forward only)
    t_out: list
    in_layout: _InputLayout


def _prepare(row: LayerRow, tc: _TorchCall, fc: _FlaxCall, variables: Mapping, fpath: tuple[str, ...],
             t_out: list, grads: bool, layout: str, in_layout: _InputLayout, train: bool) -> _IsoJob | None:
    t_arrays = [a for a in tc.args if isinstance(a, torch.Tensor)]
    if len(t_arrays) != len(fc.array_pos):
        row.notes.append(f"inputs differ: torch {len(t_arrays)} tensors, flax {len(fc.array_pos)} arrays")
        return None
    # torch's own input to this layer, in Flax layout (and its cotangent back, in _judge).
    x_in = [jnp.asarray(in_layout.to_flax(to_numpy(a.detach()))) for a in t_arrays]
    sub = _subtree(variables, fpath)
    rest = {k: v for k, v in sub.items() if k != "params"}
    float_pos = [i for i, x in enumerate(x_in) if _is_float(x)]

    def run(p, *floats):
        xs = list(x_in)
        for i, x in zip(float_pos, floats):
            xs[i] = x
        args = list(fc.args)
        for pos, x in zip(fc.array_pos, xs):
            args[pos] = x
        v = {"params": p, **rest} if "params" in sub else dict(rest)
        if train and rest:
            out, _ = fc.module.apply(v, *args, mutable=list(rest), **fc.kwargs)
        else:
            out = fc.module.apply(v, *args, **fc.kwargs)
        return out

    t_g = [tc.out_grads.get(i) for i in range(len(tc.outputs))]
    cots = None
    if grads and any(g is not None for g in t_g):
        cots = [None if g is None else jnp.asarray(to_flax_layout(g, layout)) for g in t_g]
    return _IsoJob(row, tc, fpath, run, sub.get("params", {}), [x_in[i] for i in float_pos], cots,
                   t_out, in_layout)


def _one(job: _IsoJob, params, floats, cots):
    """Output, and (param grads, input grads) from the VJP with torch's output cotangent."""
    out, vjp = jax.vjp(job.run, params, *floats)
    leaves, tree = jax.tree_util.tree_flatten(out)
    if cots is None or len(cots) != len(leaves) or any(
            c is not None and c.shape != o.shape for c, o in zip(cots, leaves)):
        return out, None  # wrong output shape: the forward comparison says so
    cot = [jnp.zeros_like(o) if c is None else c.astype(o.dtype) for c, o in zip(cots, leaves)]
    p_grads, *in_grads = vjp(jax.tree_util.tree_unflatten(tree, cot))
    return out, (p_grads, in_grads)


def _run_jobs(jobs: list[_IsoJob]) -> list:
    """All isolated runs as one jitted program: one XLA compile instead of one per primitive
    per layer (the dominant cost on CPU). Falls back to one layer at a time, so a layer that
    cannot run alone costs only its own row."""
    if not jobs:
        return []
    args = [(j.params, j.floats, j.cots) for j in jobs]
    try:
        batched = jax.jit(lambda a: [_one(j, *x) for j, x in zip(jobs, a)])
        return jax.device_get(batched(args))
    except Exception:
        pass
    results = []
    for j, a in zip(jobs, args):
        try:
            results.append(jax.device_get(_one(j, *a)))
        except Exception as exc:
            results.append(exc)
    return results


def _judge(job: _IsoJob, result, plan: PortPlan, zero_params, t_param_grads: Mapping[str, np.ndarray],
           forward_tol: Tolerance, grad_tol: Tolerance) -> None:
    row, tc = job.row, job.tc
    out, grads = result
    layout = job.in_layout.layout
    row.isolated = _compare_leaves(row.name, [np.asarray(o) for o in _leaves(out)], job.t_out,
                                   forward_tol, layout)
    if grads is None:
        return
    p_grads, in_grads = grads
    comps = []
    t_in = [tc.arg_grads.get(i) for i, a in enumerate(tc.args) if isinstance(a, torch.Tensor)]
    t_in_float = [g for g, a in zip(t_in, [a for a in tc.args if isinstance(a, torch.Tensor)])
                  if a.is_floating_point()]
    for j, (g, t) in enumerate(zip(in_grads, t_in_float)):
        if t is not None:
            comps.append(_compare_leaves(f"d/d input[{j}] of {row.name}",
                                         [job.in_layout.to_torch(np.asarray(g))], [t], grad_tol, AS_IS))
    if job.params and tc.call == 0:
        comps.extend(_param_grad_comps(row, p_grads, job.fpath, plan, zero_params, t_param_grads, grad_tol))
    row.grad_isolated = worst_of([c for c in comps if c is not None])


def _param_grad_comps(row: LayerRow, p_grads, fpath, plan: PortPlan, zero_params,
                      t_param_grads: Mapping[str, np.ndarray], grad_tol: Tolerance) -> list[Comparison]:
    # Put the subtree's gradients into a zero tree of the whole model so the port's own
    # flax -> torch mapping (kernel transposes, flips, flatten permutations) names and lays them out.
    flat = traverse_util.flatten_dict(zero_params)
    for k, v in traverse_util.flatten_dict(dict(p_grads)).items():
        flat[(*fpath, *k)] = np.asarray(v)
    named = plan.to_torch({"params": traverse_util.unflatten_dict(flat)}, collections=("params",))
    prefix = f"{row.torch_path}." if row.torch_path else ""
    return [compare(f"grad {name} (isolated)", value, t_param_grads[name], grad_tol)
            for name, value in named.items() if name.startswith(prefix) and name in t_param_grads]

