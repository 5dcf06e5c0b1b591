"""The Flax runner: a Linen or NNX twin behind one pure function, forward + VJP jitted once,
optionally with every submodule call recorded. The only place parity runs the Flax side.

Variables are always linen-style ``{collection: nested dict}`` ("params", "batch_stats", ...):
a Linen twin's own, or for an NNX twin the values of its nnx Variables grouped by type
(weight_port.nnx), so the port's plan, the per-layer analysis and training treat both alike.
Inputs and outputs are pytrees in Flax layout; outputs come back flattened to {path: array}
with the same paths as the torch side (parity.runtime.tree).
"""
from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from parity.runtime.tree import flatten, keystr, map_with_path
from weight_port import TrainModeError, call_kwargs

# Attributes NNX layers read for their mode (nnx.Dropout, nnx.BatchNorm); Module.train()/eval()
# set the same ones.
_NNX_MODE_ATTRS = ("deterministic", "use_running_average")


def is_nnx(module) -> bool:
    from flax import nnx

    return isinstance(module, nnx.Module)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _key(path) -> tuple[str, ...]:
    # nnx.State path -> linen-style path: dict keys and list indices, without the ".value" attribute.
    return tuple(str(k.key) if hasattr(k, "key") else str(k.idx) for k in path
                 if not isinstance(k, jax.tree_util.GetAttrKey))


def call_key(path: tuple[str, ...], call: int) -> str:
    """How a recorded call is named: flax module path joined by '/', then '#<call index>'."""
    return f"{'/'.join(path)}#{call}"


class _Slot:
    """Where a recorded array argument was (None would be confused with a None argument)."""

    def __repr__(self) -> str:
        return "<array>"


_SLOT = _Slot()


@dataclass
class FlaxCall:
    """One recorded submodule call: enough to run that submodule again on other inputs."""

    path: tuple[str, ...]
    call: int
    module: Any  # Linen: an unbound clone (runnable with .apply); NNX: the module's class name
    args: tuple  # positional args with arrays replaced by _SLOT (arrays travel in the aux output)
    kwargs: dict
    input_names: list[str]  # names of array leaves of (args, kwargs): args[0], kwargs['mask']
    # When the call began and ended on the recorder's clock: a call nests the calls that began
    # after it and ended before it (what the per-layer pairing reads to tell which Flax module
    # holds which layers; module paths cannot: an inline nn.Sequential's layers sit beside it).
    start: int = 0
    end: int = 0


class _Recorder:
    """Collects per-call input and output arrays during one trace, and adds a zero perturbation
    to every recorded float output so that one VJP also yields the cotangent at every layer."""

    def __init__(self, perts: Mapping | None):
        self.perts = perts
        self.counts: dict[tuple[str, ...], int] = defaultdict(int)
        self.calls: dict[str, FlaxCall] = {}
        self.inputs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.clock = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def record(self, path: tuple[str, ...], module_for_rerun, run: Callable, args: tuple, kwargs: dict):
        call = self.counts[path]
        self.counts[path] += 1
        key = call_key(path, call)
        start = self.tick()
        out = run(*args, **kwargs)
        end = self.tick()
        pert = (self.perts or {}).get(key)
        if pert:
            out = map_with_path(lambda p, o: o + pert[p] if p in pert else o, out)
        flat_in = jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]
        names, arrays = [], []
        for (head, *rest), leaf in flat_in:
            if _is_array(leaf):
                names.append(keystr(rest, "args" if head.idx == 0 else "kwargs"))
                arrays.append(leaf)
        if key not in self.calls:
            strip = lambda x: _SLOT if _is_array(x) else x  # noqa: E731
            module = module_for_rerun() if callable(module_for_rerun) else module_for_rerun
            self.calls[key] = FlaxCall(path, call, module,
                                       jax.tree_util.tree_map(strip, tuple(args)),
                                       jax.tree_util.tree_map(strip, dict(kwargs)), names, start, end)
        self.inputs[key] = dict(zip(names, arrays))
        self.outputs[key] = {p: o for p, o in flatten(out).items() if _is_array(o)}
        return out

    def linen_interceptor(self, next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        mod = ctx.module
        return self.record(tuple(mod.path), lambda: mod.clone(parent=None, _deep_clone=True),
                           next_fun, args, kwargs)

    def install_nnx(self, model) -> None:
        """Swap every submodule's class for a recording subclass (inside the traced function only:
        the model there is a fresh nnx.merge, so nothing outside sees the swap)."""
        from flax import nnx

        for path, node in list(nnx.iter_graph(model)):
            if isinstance(node, nnx.Module):
                object.__setattr__(node, "_parity_path", tuple(str(p) for p in path))
                object.__setattr__(node, "__class__", _recording_class(type(node)))


_ACTIVE: list[_Recorder] = []  # the recorder of the trace in progress (NNX recording classes read it)
_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    if cls in _RECORDING_CLASSES.values():
        return cls
    if cls not in _RECORDING_CLASSES:
        original = cls.__call__

        def __call__(self, *args, **kwargs):
            rec = _ACTIVE[-1] if _ACTIVE else None
            if rec is None:
                return original(self, *args, **kwargs)
            return rec.record(self._parity_path, type(self).__mro__[1].__name__,
                              lambda *a, **k: original(self, *a, **k), args, kwargs)

        _RECORDING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__,
                                                              "__module__": cls.__module__})
    return _RECORDING_CLASSES[cls]


def _module_computing_in(module, dtype: str, checked: str):
    """A Linen module computing in ``dtype`` where it was built for the ``checked`` dtype: a
    ``dtype`` / ``param_dtype`` field equal to ``checked`` (HF's Flax modules say dtype=float32 by
    default and hand it to their submodules) is cloned with ``dtype``, so a float64 run is float64
    throughout (cast variables alone would be computed in float32 again by every Dense). A field
    holding another dtype is kept: a twin that computes below the checked dtype must show it in
    every run. The module itself when nothing changes (or it cannot be cloned)."""
    if dtype == checked or not hasattr(module, "clone"):
        return module
    updates = {}
    for name in ("dtype", "param_dtype"):
        value = getattr(module, name, None)
        try:
            if value is not None and jnp.dtype(value) == jnp.dtype(checked):
                updates[name] = jnp.dtype(dtype).type
        except TypeError:  # not a dtype (a field of the same name meaning something else)
            continue
    return module.clone(**updates) if updates else module


class FlaxTwin:
    """A Flax twin (Linen Module or nnx.Module) as one pure function of linen-style variables.

    train: the mode every call runs in; the keyword comes from ``__call__``'s signature
    (weight_port.flax_tree.TRAIN_KWARGS) or ``train_kwarg``. An NNX twin without one is switched by
    its layers' ``deterministic`` / ``use_running_average`` attributes (what nnx's train() sets).
    train=True with neither is a TrainModeError, never a silent eval run.
    """

    def __init__(self, module, *, train: bool = False, train_kwarg: str | None = None,
                 train_mode_matters: bool = True, dropout: bool | None = None):
        self.module, self.train = module, train
        # NNX: dropout on or off separately from BatchNorm (training parity holds dropout off:
        # no Flax RNG can reproduce torch's masks); None: as ``train``.
        self._attrs = {"use_running_average": not train,
                       "deterministic": not (train if dropout is None else dropout)}
        self.nnx = is_nnx(module)
        self.kwargs = call_kwargs(module, train, train_kwarg)
        self._mode_attrs = False
        if self.nnx:
            from flax import nnx

            self._graphdef, self._state = nnx.split(module)
            self._mode_attrs = any(hasattr(m, a) for _, m in nnx.iter_graph(module)
                                   if isinstance(m, nnx.Module) for a in _NNX_MODE_ATTRS)
        if train and train_mode_matters and not self.kwargs and not self._mode_attrs:
            raise TrainModeError(
                f"train=True but {type(module).__name__}.__call__ takes no train-mode keyword "
                f"({', '.join(k for k in ('train', 'training', 'deterministic', 'use_running_average'))}); "
                "pass train_kwarg= (CLI --train-kwarg) naming the one it uses, or run in eval mode")

    def computing_in(self, dtype: str, checked: str) -> FlaxTwin:
        """This twin computing in ``dtype`` where it was built for the ``checked`` dtype
        (``_module_computing_in``, on the top module). parity.check (PreparedPair.twin_in) and
        parity.verify both call this."""
        if self.nnx:
            return self
        module = _module_computing_in(self.module, dtype, checked)
        if module is self.module:
            return self
        twin = copy.copy(self)
        twin.module = module
        return twin

    # --- variables -------------------------------------------------------------------------------
    def initial_variables(self) -> dict:
        """NNX: the module's current variable values (linen-style). Linen: nothing to read."""
        if not self.nnx:
            raise TypeError("a Linen twin carries no variables; pass them (or port them)")
        from weight_port import nnx_variables

        return nnx_variables(self.module)

    # --- the pure function -------------------------------------------------------------------------
    def apply(self, variables: Mapping, args: tuple, recorder: _Recorder | None = None):
        """(output pytree, new variables): a pure, jittable call of the twin on ``args`` (Flax
        layout). New variables differ from ``variables`` only in train mode (BatchNorm statistics)."""
        if self.nnx:
            return self._apply_nnx(variables, args, recorder)
        mutable = [c for c in variables if c != "params"] if self.train else False
        ctx = nn.intercept_methods(recorder.linen_interceptor) if recorder else contextlib.nullcontext()
        with ctx:
            if mutable:
                out, new = self.module.apply(dict(variables), *args, mutable=mutable, **self.kwargs)
                return out, {**variables, **new}
            return self.module.apply(dict(variables), *args, **self.kwargs), variables

    def _merged(self, variables: Mapping, graphdef=None, state=None):
        from flax import nnx

        by_path = {k[1:]: v for k, v in traverse_util.flatten_dict(dict(variables)).items()}
        state = self._state if state is None else state
        # Values from ``variables`` wherever it has them (the differentiable ones are tracers here),
        # the module's own elsewhere (RNG counters of a Dropout, say).
        fresh = jax.tree_util.tree_map_with_path(lambda p, leaf: by_path.get(_key(p), leaf), state)
        model = nnx.merge(self._graphdef if graphdef is None else graphdef, fresh)
        if self._mode_attrs:
            model.set_attributes(**self._attrs, raise_if_not_found=False)
        return model

    def _apply_nnx(self, variables, args, recorder):
        from weight_port import nnx_variables

        model = self._merged(variables)
        if recorder is not None:
            recorder.install_nnx(model)
            _ACTIVE.append(recorder)
        try:
            out = model(*args, **self.kwargs)
        finally:
            if recorder is not None:
                _ACTIVE.pop()
        return out, (nnx_variables(model) if self.train else variables)

    # --- one layer alone ----------------------------------------------------------------------
    def layer_fn(self, fc: FlaxCall, sub_variables: Mapping, *,
                 computing: tuple[str, str] | None = None) -> Callable | None:
        """run(params, arrays) -> output of the recorded submodule alone, with ``arrays`` (by
        FlaxCall.input_names) in place of the recorded array arguments. computing=(dtype,
        checked): the submodule cloned to compute in ``dtype`` (Linen; None for NNX or where
        nothing changes), as ``computing_in`` does the whole twin."""
        if computing is not None:
            if self.nnx:
                return None
            module = _module_computing_in(fc.module, *computing)
            if module is fc.module:
                return None
            fc = replace(fc, module=module)
        rest = {k: v for k, v in sub_variables.items() if k != "params"}

        def fill(arrays: Mapping):
            names = iter(fc.input_names)
            # Rebuild (args, kwargs) with the arrays at their recorded places.
            def put(x):
                return arrays[next(names)] if x is _SLOT else x
            return jax.tree_util.tree_map(put, (fc.args, fc.kwargs))

        if self.nnx:
            from flax import nnx

            sub = submodule(self.module, fc.path)
            graphdef, state = nnx.split(sub)
            mode = self._mode_attrs

            def run(params, arrays):
                args, kwargs = fill(arrays)
                by_path = {k[1:]: v for k, v in traverse_util.flatten_dict({"params": params, **rest}).items()}
                fresh = jax.tree_util.tree_map_with_path(lambda p, leaf: by_path.get(_key(p), leaf), state)
                model = nnx.merge(graphdef, fresh)
                if mode:
                    model.set_attributes(**self._attrs, raise_if_not_found=False)
                return model(*args, **kwargs)
            return run

        module = fc.module

        def run(params, arrays):
            args, kwargs = fill(arrays)
            v = {"params": params, **rest} if params else dict(rest)
            if self.train and rest:
                out, _ = module.apply(v, *args, mutable=list(rest), **kwargs)
                return out
            return module.apply(v, *args, **kwargs)
        return run


def submodule(model, path: tuple[str, ...]):
    """The NNX submodule at a linen-style path (attribute names, list indices as strings)."""
    sub = model
    for p in path:
        sub = getattr(sub, p) if hasattr(sub, p) else sub[int(p) if p.isdigit() else p]
    return sub



@dataclass
class FlaxRun:
    """Results of forward_backward, numpy in Flax layout. Recorded calls by call_key."""

    outputs: dict[str, np.ndarray]
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)  # float input leaves only
    param_grads: Mapping = field(default_factory=dict)  # the "params" tree
    new_variables: Mapping | None = None
    calls: dict[str, FlaxCall] = field(default_factory=dict)
    call_inputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    call_outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    call_output_cots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    args: tuple = ()  # the inputs it ran on (Flax layout), so a consumer can run it again


def _split_floats(args: tuple):
    leaves, tree = jax.tree_util.tree_flatten(tuple(args))
    paths = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tuple(args))[0]]
    float_idx = [i for i, x in enumerate(leaves) if _is_array(x) and _is_float(x)]

    def rebuild(floats):
        xs = list(leaves)
        for i, x in zip(float_idx, floats):
            xs[i] = x
        return jax.tree_util.tree_unflatten(tree, xs)

    return [leaves[i] for i in float_idx], [paths[i] for i in float_idx], rebuild


def output_shapes(twin: FlaxTwin, variables: Mapping, args: tuple) -> dict[str, jax.ShapeDtypeStruct]:
    """{output path: ShapeDtypeStruct} without running anything (jax.eval_shape)."""
    return jax.eval_shape(lambda v, a: flatten(twin.apply(v, a)[0]), dict(variables), tuple(args))


def to_host(tree):
    """jax.device_get, also of arrays that span other processes' devices (a mesh over several
    processes, jax.distributed): those are all-gathered first (a collective every process of the
    job makes, in the same order, as an SPMD program does), so every process gets whole values."""
    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.device_get(jax.tree_util.tree_map(whole, tree))


def forward_backward(twin: FlaxTwin, variables: Mapping, args: tuple,
                     cotangents: Mapping[str, np.ndarray] | None, *, capture: bool = False,
                     offsets: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                     param_grads: Callable[[tuple[str, ...]], bool] | None = None) -> FlaxRun:
    """Forward, and with ``cotangents`` (by output path, Flax layout) the VJP with respect to the
    params and the float input leaves, as ONE jitted program (XLA compiles it once; eager JAX
    would compile every primitive separately). capture: record every submodule call, and the
    cotangent at every recorded float output (zero perturbations, differentiated). offsets (with
    capture): {call key: {output path: array}} added to those recorded outputs, so the rest of the
    model runs on another value there (the per-layer analysis hands one layer torch's output).
    param_grads(path): whether the gradient of the param at ``path`` (its keys in the "params"
    tree) is wanted (default: all); the others are left out of the program's results, so XLA
    never computes or holds them (a float64 own-noise run wants a few of a model's)."""
    variables = dict(variables)
    params = variables.get("params", {})
    rest = {k: v for k, v in variables.items() if k != "params"}
    floats, float_paths, rebuild = _split_floats(args)
    recorders: list[_Recorder] = []

    layouts: list[tuple] = []  # per trace of fn: (tree of the recorded arrays, index of each leaf)

    def fn(params, floats, perts):
        rec = _Recorder(perts) if capture else None
        out, new = twin.apply({"params": params, **rest}, rebuild(floats), rec)
        if rec is not None:
            recorders.append(rec)
        # Each distinct recorded array once: a layer's output is the next one's input and a block
        # hands its input down to its children (BERT: the same value recorded 3-6 times). The
        # program returns it once; the host gets one numpy array, shared by every place.
        leaves, tree = jax.tree_util.tree_flatten((rec.inputs, rec.outputs) if rec else ({}, {}))
        unique = list({id(leaf): leaf for leaf in leaves}.values())
        position = {id(leaf): i for i, leaf in enumerate(unique)}
        layouts.append((tree, [position[id(leaf)] for leaf in leaves]))
        return flatten(out), (unique, {k: v for k, v in new.items() if k != "params"})

    def recorded(unique) -> tuple:
        tree, index = layouts[-1]
        return jax.tree_util.tree_unflatten(tree, [unique[i] for i in index])

    perts = None
    if capture and (cotangents is not None or offsets):
        _, (unique_shapes, _) = jax.eval_shape(fn, params, floats, None)
        _, shapes = recorded(unique_shapes)
        given = offsets or {}
        perts = {k: {p: (jnp.asarray(given[k][p], s.dtype) if p in given.get(k, {}) else jnp.zeros(s.shape, s.dtype))
                     for p, s in v.items() if jnp.issubdtype(s.dtype, jnp.floating)}
                 for k, v in shapes.items()}
        recorders.clear()

    def run(params, floats, perts, cots):
        if cots is None:
            out, aux = fn(params, floats, perts)
            return out, aux, None
        out, vjp, aux = jax.vjp(fn, params, floats, perts, has_aux=True)
        ct = {p: (cots[p].astype(o.dtype) if p in cots and jnp.issubdtype(o.dtype, jnp.floating)
                  else np.zeros(o.shape, jax.dtypes.float0)) for p, o in out.items()}
        grads = vjp(ct)
        if param_grads is not None and isinstance(grads[0], Mapping):
            grads = (wanted_grads(grads[0], param_grads), *grads[1:])
        return out, aux, grads

    cots = None if cotangents is None else {p: jnp.asarray(c) for p, c in cotangents.items()}
    out, (unique, new_rest), grads = to_host(jax.jit(run)(params, floats, perts, cots))
    c_in, c_out = recorded(unique)
    result = FlaxRun({p: np.asarray(o) for p, o in out.items()},
                     new_variables={"params": params, **new_rest}, args=tuple(args))
    if grads is not None:
        p_grads, in_grads, pert_grads = grads
        result.param_grads = p_grads
        result.input_grads = {p: np.asarray(g) for p, g in zip(float_paths, in_grads)}
        result.call_output_cots = pert_grads or {}
    if recorders:
        result.calls = recorders[-1].calls
        result.call_inputs, result.call_outputs = c_in, c_out
    return result


def value_and_grad_fn(twin: FlaxTwin, loss: Callable) -> Callable:
    """A pure, jittable training-step core: fn(variables, args, target) ->
    (loss value, grads of the "params" tree, new non-param variables (BatchNorm statistics)).

    loss(output pytree, target) -> scalar, in Flax layout. Wrap in jax.jit (and optax) yourself:
    this is the one definition of "differentiate the twin" that training and benchmarks share."""

    def f(params, rest, args, target):
        out, new = twin.apply({"params": params, **rest}, args)
        return loss(out, target), {k: v for k, v in new.items() if k != "params"}

    def fn(variables: Mapping, args: tuple, target):
        params = variables["params"]
        rest = {k: v for k, v in variables.items() if k != "params"}
        (value, new_rest), grads = jax.value_and_grad(f, has_aux=True)(params, rest, tuple(args), target)
        return value, grads, new_rest

    return fn


def flax_inputs(args: tuple, layouts: Mapping[str, str], dtype=None) -> tuple:
    """Torch-layout input pytree -> Flax-layout jax arrays, per leaf layout (by input path);
    float leaves cast to ``dtype`` when given, integer leaves untouched."""
    from weight_port.layout import to_flax_layout
    from weight_port import to_numpy

    flat, tree = jax.tree_util.tree_flatten_with_path(tuple(args))
    out = []
    for path, leaf in flat:
        if not hasattr(leaf, "shape"):
            out.append(leaf)
            continue
        name = keystr(path)
        x = to_flax_layout(np.asarray(to_numpy(getattr(leaf, "detach", lambda: leaf)())), layouts[name], name)
        x = jnp.asarray(x)
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(tree, out)


__all__ = ["FlaxCall", "FlaxRun", "FlaxTwin", "call_key", "flax_inputs", "forward_backward",
           "is_nnx", "output_shapes", "submodule", "value_and_grad_fn"]


def wanted_grads(p_grads: Mapping, wanted: Callable[[tuple[str, ...]], bool], prefix: tuple[str, ...] = ()) -> dict:
    """The gradients of ``p_grads`` (the "params" tree, or a layer's subtree at ``prefix``) whose
    path in the "params" tree ``wanted`` keeps. Inside a jitted program XLA then leaves out the
    others' work (forward_backward(param_grads=...), a per-layer row's own-noise run)."""
    flat = traverse_util.flatten_dict(dict(p_grads)) if p_grads else {}
    return traverse_util.unflatten_dict({k: g for k, g in flat.items() if wanted((*prefix, *k))})


def param_grads_for(plan, keys) -> tuple[Any, Callable[[tuple[str, ...]], bool]]:
    """The port plan cut to the layers holding the parameters ``keys`` name (judge keys
    ``param:<torch name>``; a tied parameter's partner with it), and the predicate
    ``forward_backward(param_grads=...)`` takes for their Flax leaves: a run that needs some
    parameters' gradients (the twin's own-noise run of the tensors that need it) computes and
    converts those alone (XLA drops the rest of the weight-gradient work)."""
    names = {k.removeprefix("param:") for k in keys if k.startswith("param:")}
    names |= {plan.tied[n] for n in names if n in getattr(plan, "tied", {})}
    plan = replace(plan, layers=[layer for layer in plan.layers if any(
        t.collection == "params" and layer.torch_key(t.torch_name) in names for t in layer.rule.tensors)])
    wanted = {layer.flax_leaf("params", t.flax_name)[1:] for layer in plan.layers for t in layer.rule.tensors
              if t.collection == "params"}
    return plan, lambda path: tuple(map(str, path)) in wanted

