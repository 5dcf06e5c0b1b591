"""The torch runner: forward (and backward of <outputs, cotangents>) of a module on a pytree of
inputs, optionally with every submodule call recorded. The only place parity runs torch.

Inputs are the positional arguments (a pytree: tensors, numpy arrays, tuples/lists/dicts, None).
Float leaves are cast to the run's dtype and get gradients; integer leaves (token ids, masks) are
fed as they are and get none. Outputs may be any pytree (tensors, tuples with None, dicts,
dataclasses, HF ModelOutput): they are flattened to {path: array} (parity.runtime.tree).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections import defaultdict
from dataclasses import dataclass, field

import jax
import numpy as np
import torch

from parity.runtime.torch_ops import OpRecorder, TorchOp
from parity.runtime.tree import flatten, input_paths, keystr, map_with_path
from weight_port import to_numpy


def torch_inputs(args: tuple, dtype: torch.dtype, device: str = "cpu", grads: bool = True) -> tuple:
    """A private copy of the input pytree as torch tensors on ``device``: float leaves in ``dtype``
    (requiring grad when ``grads``), integer and bool leaves as they are."""

    def conv(x):
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            return x
        t = x.detach().clone() if isinstance(x, torch.Tensor) else torch.as_tensor(np.array(x))
        t = t.to(device)
        if t.is_floating_point():
            t = t.to(dtype).requires_grad_(grads)
        return t

    return jax.tree_util.tree_map(conv, tuple(args))


def is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


@dataclass
class TorchCall:
    """One module call, recorded by the hooks. Leaves are named args[i]... / kwargs['k']..."""

    path: str  # torch module path ("" for the root)
    call: int  # how many times this module ran before
    module: torch.nn.Module
    start: int  # forward start order
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor leaves of (args, kwargs)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # flattened outputs
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)
    output_grads: dict[str, np.ndarray] = field(default_factory=dict)
    input_ids: dict[str, int] = field(default_factory=dict)  # id() of the tensor as it arrived
    # Values copied when the hook ran: a later in-place op (``h += residual``, ReLU(inplace=True))
    # would otherwise change what this call is said to have seen and returned.
    input_values: dict[str, np.ndarray] = field(default_factory=dict)
    output_values: dict[str, np.ndarray] = field(default_factory=dict)
    # The views of ``outputs`` handed to the callers (gradient capture): their gradients are what
    # the callers send back, without the layer's own later uses of the same tensor.
    handed: dict[str, torch.Tensor] = field(default_factory=dict)
    # The tensors as they arrived (input_ids are their id()s): held so that no id is freed and
    # reused by a later tensor during the run, which would link unrelated tensors' layouts.
    arrived: dict[str, torch.Tensor] = field(default_factory=dict)
    # The lowest float precision computed inside this call (itself or a child) when lower than the
    # run's dtype ("float32" for an RMS norm's upcast in a float64 run); "" when none.
    lower_precision: str = ""

    @property
    def torch_type(self) -> str:
        """The module's class name (a recorded call, parity.golden, carries the name alone)."""
        return type(self.module).__name__


@dataclass
class TorchRun:
    """Results of run_torch, numpy in torch layout. Paths: outputs ``out...``, inputs ``input[i]...``."""

    outputs: dict[str, np.ndarray]
    cotangents: dict[str, np.ndarray]  # float output leaves only
    input_grads: dict[str, np.ndarray]  # float input leaves only
    param_grads: dict[str, np.ndarray]  # by torch parameter name (a check may swap in a parity._spill.Spill)
    calls: list[TorchCall] | None  # completion order, when capture=True
    raw_outputs: dict[str, torch.Tensor]  # the output tensors themselves (for producer lookup)
    aliases: dict[int, int] = field(default_factory=dict)  # id(view made by a hook) -> id(tensor)
    # run_torch(watch_precision=True): the lowest float precision any forward op computed in
    # when lower than the run's dtype ("" when none), and the innermost module running the first
    # such op ("" for the top module's own code).
    lower_precision: str = ""
    lower_first: str | None = None
    ops: list[TorchOp] | None = None  # every torch function the forward called, when ops=True


def random_cotangents(outputs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """One seeded standard-normal cotangent per float output leaf (a plain sum would hide sign
    and permutation errors that cancel)."""
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(o.shape) for p, o in outputs.items() if jax.numpy.issubdtype(o.dtype, jax.numpy.floating)}  # bf16 too


def _call_leaves(args: tuple, kwargs: dict) -> list[tuple[str, object]]:
    flat = jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]
    out = []
    for path, leaf in flat:
        head, *rest = path
        out.append((keystr(rest, "args" if head.idx == 0 else "kwargs"), leaf))
    return out


class _Recorder:
    """Forward pre/post hooks on every submodule. The pre-hook hands each module a ``view_as`` of
    its float inputs, so a gradient hook on that view sees exactly this module's share of the
    input cotangent even when one tensor feeds several modules (a UNet skip).

    Recorded values are read-only numpy arrays. A CPU tensor this run made (an activation, a
    gradient) is recorded as a view, not a copy (the calls hold the tensors anyway: BERT-base in
    float64 records 714 MiB): ``_Writes`` copies such a value just before an op writes into its
    storage (``h += residual``, ReLU(inplace=True)), and ``changed`` finds any write it did not
    see (an op inside C++), after which run_torch runs again with every value copied
    (``copy_all``). Tensors from before the run (weights, buffers, inputs, cached tables) and
    the gradients of leaf inputs (autograd accumulates into them in place) are always copied.
    A write through numpy or a raw data pointer moves neither the mode nor the version counter:
    no model's forward writes that way, and a recorded view would not see it.
    """

    def __init__(self, module: torch.nn.Module, grads: bool, copy_all: bool = False):
        self.grads, self.calls, self.handles = grads, [], []
        self.aliases: dict[int, int] = {}
        self.open: dict[int, list[TorchCall]] = defaultdict(list)
        self.stack: list[TorchCall] = []  # the calls running now, outermost first
        self.counts: dict[str, int] = defaultdict(int)
        self.names = {id(m): p for p, m in module.named_modules()}
        self.copies: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
        # Uncopied values: storage pointer -> their keys, and where each was put (dict, name).
        self.views: dict[int, list[tuple]] = defaultdict(list)
        self.places: dict[tuple, list[tuple[dict, str]]] = {}
        self.writes = None if copy_all else _Writes(self)
        # The gradient hooks on recorded tensors close over their call, and the call holds the
        # tensor: a cycle through autograd's C++ graph that Python's collector cannot see, so
        # every recorded run stayed in memory for good (BERT-base float64: 1-2 GB a run).
        # remove() takes the hooks off once the backward has run, which breaks it.
        self.tensor_hooks: list = []
        for mod in dict((id(m), m) for _, m in module.named_modules()).values():
            self.handles.append(mod.register_forward_pre_hook(self.pre, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self.post))

    def keep(self, into: dict, name: str, t: torch.Tensor, *, made: bool | None = None) -> None:
        """``into[name]`` = ``t``'s values now, a read-only numpy array made once per distinct
        content: a layer's output is the next one's input, and the same tensor reaches a block,
        its attention and its projections (BERT-base: a third of the values are distinct). The
        key is where the values live and the tensor's version counter, which every in-place op
        bumps; the tensor is held until the run ends, so its memory cannot be reused under the
        same key. made: whether this run made ``t`` (True: a gradient autograd just made, which
        nothing else holds; False: copy it; None: a forward value, made here when _Writes saw an op
        make its storage)."""
        t = t.detach()  # shares the storage and the version counter
        try:
            ptr = t.untyped_storage().data_ptr()
            key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t.is_neg(),
                   t.is_conj(), t._version)
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, a tensor subclass)
            ptr = key = None
        hit = self.copies.get(key) if key is not None else None
        if hit is None:
            view = (key is not None and self.writes is not None and t.device.type == "cpu"
                    and (ptr in self.writes.born if made is None else made))
            values = to_numpy(t)
            values = values.view() if view else (values if t.device.type != "cpu" else values.copy())
            values.flags.writeable = False  # shared by every call that saw this content
            hit = (t, values)
            if key is not None:
                self.copies[key] = hit
                if view:
                    self.views[ptr].append(key)
                    self.places[key] = []
        if key in self.places:  # a view: where it goes, for before_write to put its copy there
            self.places[key].append((into, name))
        into[name] = hit[1]

    def before_write(self, t: torch.Tensor) -> None:
        """An op is about to write into ``t``'s storage: every value recorded there as a view is
        copied now, and the copy replaces the view wherever it was put."""
        for key in self.views.pop(_storage(t), ()):
            tensor, values = self.copies[key]
            values = values.copy()
            values.flags.writeable = False
            self.copies[key] = (tensor, values)
            for into, name in self.places.pop(key, ()):
                into[name] = values

    def changed(self) -> bool:
        """Whether a value recorded as a view was written after it was recorded, unseen."""
        return any(self.copies[key][0]._version != key[-1] for keys in self.views.values() for key in keys)

    def pre(self, mod, args, kwargs):
        path = self.names[id(mod)]
        call = TorchCall(path, self.counts[path], mod, sum(self.counts.values()))
        self.counts[path] += 1

        def view(x, name):
            if not isinstance(x, torch.Tensor):
                return x
            call.input_ids[name] = id(x)
            call.arrived[name] = x
            self.keep(call.input_values, name, x)
            if self.grads and x.requires_grad:
                leaf = x.is_leaf  # autograd accumulates a leaf's gradient in place: copied
                v = x.view_as(x)
                self.aliases[id(v)] = id(x)  # the module (and its children) see the view
                x = v
                self.tensor_hooks.append(
                    x.register_hook(lambda g: self.keep(call.input_grads, name, g, made=not leaf)))
            call.inputs[name] = x
            return x

        names = iter(n for n, _ in _call_leaves(args, kwargs))
        new_args, new_kwargs = jax.tree_util.tree_map(lambda x: view(x, next(names)), (tuple(args), dict(kwargs)))
        self.open[id(mod)].append(call)
        self.stack.append(call)
        return new_args, new_kwargs

    def post(self, mod, args, output):
        call = self.open[id(mod)].pop()
        if call in self.stack:
            self.stack.remove(call)
        call.outputs = {p: o for p, o in flatten(output).items() if isinstance(o, torch.Tensor)}
        for p, o in call.outputs.items():
            self.keep(call.output_values, p, o)
        self.calls.append(call)
        if not self.grads or not any(o.requires_grad for o in call.outputs.values()):
            return None
        if call.path == "":  # the model's own outputs: nothing inside uses them afterwards
            for p, o in call.outputs.items():
                if o.requires_grad:
                    self.tensor_hooks.append(
                        o.register_hook(lambda g, p=p: self.keep(call.output_grads, p, g, made=True)))
            return None

        # A layer may return a tensor it also uses itself (Wav2Vec2's feature projection returns
        # its LayerNorm output and projects it): a hook on that tensor would add the layer's own
        # use to its output cotangent. The callers get a view instead, and the hook sits on it.
        def hand(path, leaf):
            if not isinstance(leaf, torch.Tensor) or not leaf.requires_grad or call.outputs.get(path) is not leaf:
                return leaf
            view = leaf.view_as(leaf)
            self.aliases[id(view)] = id(leaf)
            call.handed[path] = view
            self.tensor_hooks.append(
                view.register_hook(lambda g, p=path: self.keep(call.output_grads, p, g, made=True)))
            return view

        return map_with_path(hand, output)

    def remove(self) -> None:
        for h in self.handles + self.tensor_hooks:
            h.remove()
        self.copies.clear()  # the gradients it held (the forward tensors are held by the calls)
        self.views.clear()
        self.places.clear()


# Tensor methods that write into their first argument without a trailing underscore.
_WRITING = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                      "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                      "__irshift__"})


class _Writes(torch.overrides.TorchFunctionMode):
    """The recorder's eyes on the forward's ops: the storages this run made (``born``: only those
    may be recorded as views; a weight, an input or a cached table can change after the run), and
    every write into a recorded storage, just before it happens (the recorder copies first). A
    write is an op named with a trailing underscore (``add_``, ``relu_``), an in-place operator
    (``+=``, ``x[i] = v``), an ``out=`` argument or ``inplace=True`` (F.relu, F.dropout)."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder, self.born = recorder, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.recorder.views:
            name = getattr(func, "__name__", "")
            written = []
            if (name.endswith("_") and not name.endswith("__")) or name in _WRITING or kwargs.get("inplace") is True:
                written.append(args[0] if args else None)
            written += jax.tree_util.tree_leaves(kwargs.get("out"))
            for t in written:
                if isinstance(t, torch.Tensor):
                    self.recorder.before_write(t)
        out = func(*args, **kwargs)
        # A new storage is born here; a view (of an input, of a weight) shares its source's.
        seen = {_storage(t) for t in jax.tree_util.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(leaf, torch.Tensor) and _storage(leaf) not in seen:
                self.born.add(_storage(leaf))
        return out


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, a tensor subclass)
        return None


class _PrecisionWatch(torch.overrides.TorchFunctionMode):
    """Notes every op that computes a float result of lower precision than the run's dtype from
    tensor inputs (``x.to(torch.float32)`` and what follows it in a float64 run), and marks the
    module calls running at that moment (TorchCall.lower_precision). Factories (``torch.tensor``)
    are not computation and are not noted."""

    def __init__(self, dtype: torch.dtype, recorder: "_Recorder | None"):
        super().__init__()
        self.eps, self.recorder = torch.finfo(dtype).eps, recorder
        self.lowest: torch.dtype | None = None
        self.first: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(a, torch.Tensor) for a in args) or any(isinstance(v, torch.Tensor)
                                                                 for v in (kwargs or {}).values()):
            for leaf in (out if isinstance(out, (tuple, list)) else (out,)):
                if (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
                        and torch.finfo(leaf.dtype).eps > self.eps):
                    self._mark(leaf.dtype)
        return out

    def _mark(self, dtype: torch.dtype) -> None:
        name = str(dtype).replace("torch.", "")
        if self.lowest is None or torch.finfo(dtype).eps > torch.finfo(self.lowest).eps:
            self.lowest = dtype
        stack = self.recorder.stack if self.recorder is not None else []
        if self.first is None:
            self.first = stack[-1].path if stack else ""
        for call in stack:
            if not call.lower_precision or torch.finfo(dtype).eps > torch.finfo(
                    getattr(torch, call.lower_precision)).eps:
                call.lower_precision = name


def run_torch(
    module: torch.nn.Module,
    args: tuple,
    *,
    train: bool = False,
    grads: bool = True,
    cotangents: dict[str, np.ndarray] | None = None,
    cotangent_seed: int = 1,
    capture: bool = False,
    watch_precision: torch.dtype | None = None,
    ops: bool = False,
    param_grad_sink: Callable[[str, np.ndarray], None] | None = None,
    free_weights: bool = False,
) -> TorchRun:
    """Forward, and with ``grads`` backward of sum <output leaf, cotangent leaf>.

    args: positional inputs from ``torch_inputs`` (the module is run as ``module(*args)``).
    cotangents: by output path, torch layout; default: ``random_cotangents(outputs, seed)``.
    capture: record every submodule call (TorchCall, completion order) for per-layer analysis.
    watch_precision: the run's dtype, to note forward ops that compute below it
    (TorchRun.lower_precision / lower_first, TorchCall.lower_precision): a float64 run of a model
    that upcasts into float32 on purpose is only float32-accurate there.
    ops: record every torch function the forward calls, credited to the innermost module running
    (TorchOp, call order; parity.runtime.torch_ops), for the trap lint.
    param_grad_sink(name, grad): each parameter's gradient is handed over as soon as autograd has
    finished it and dropped from the module (TorchRun.param_grads is then empty): a recorder
    writes it and never holds all of them (a float64 run's are twice the model's bytes).
    The module's parameter .grad fields are reset first; call it on a private copy.
    free_weights: a run of a copy nothing runs again (a cast's float64 copy): each parameter's
    storage is freed as soon as autograd has finished its gradient (every node that takes it as
    an input has run by then), so the weights go as their gradients come instead of both being
    held whole at the end of the backward (GPT-2-medium in float64: 2.8 GB each). A freed weight
    reads as NaN (one element, broadcast to its shape): a backward that still reads one (a custom
    Function holding the module in its ctx, a checkpointed segment recomputing a tied weight)
    makes a non-finite gradient, and a run whose gradients are not all finite raises
    RuntimeError, as does one that would have to be made again (a recorded value changed unseen,
    below): its weights are gone; the caller makes it again keeping them. The caller frees the
    rest (buffers, parameters autograd never reached: PreparedPair.free_torch_weights).
    """
    # A captured run records what this run made as views (_Recorder); if an op it could not see
    # wrote into one of them, the run is made again, from the same inputs and buffers, with
    # every value copied. A run that hands its gradients on (the sink) or its ops cannot be
    # repeated unseen: it copies from the start; but one that frees its weights is never made
    # again here (it raises, and its caller makes it again with a fresh sink): views.
    copy_all = ops or (param_grad_sink is not None and not free_weights)
    if not capture or copy_all:
        return _run(module, args, train, grads, cotangents, cotangent_seed, capture, watch_precision, ops,
                    param_grad_sink, copy_all=True, free_weights=free_weights)[0]
    state = [(t, t.detach().clone()) for t in jax.tree_util.tree_leaves(tuple(args)) + list(module.buffers())
             if isinstance(t, torch.Tensor)]
    run, changed = _run(module, args, train, grads, cotangents, cotangent_seed, capture, watch_precision, ops,
                        param_grad_sink, copy_all=False, free_weights=free_weights)
    if not changed:
        return run
    del run
    if free_weights:
        raise RuntimeError("a value the run recorded changed unseen, and its weights were freed as their "
                           "gradients came: it cannot be made again")
    with torch.no_grad():
        for t, was in state:
            t.copy_(was)
            t.grad = None
    return _run(module, args, train, grads, cotangents, cotangent_seed, capture, watch_precision, ops,
                param_grad_sink, copy_all=True)[0]


def _run(module, args, train, grads, cotangents, cotangent_seed, capture, watch_precision, ops, param_grad_sink,
         *, copy_all: bool, free_weights: bool = False) -> tuple[TorchRun, bool]:
    """run_torch once: (the run, whether a value recorded as a view changed unseen)."""
    module.train(train)
    module.zero_grad(set_to_none=True)
    recorder = _Recorder(module, grads, copy_all) if capture else None
    watch = _PrecisionWatch(watch_precision, recorder) if watch_precision is not None else None
    op_recorder = OpRecorder(module) if ops else None  # after the capture hooks: it skips them
    sunk: set[str] = set()
    handles = []
    if grads and param_grad_sink is not None:
        # Autograd sums every use of a parameter (a tied LM head and embedding) before its one
        # accumulation, so the hook sees the finished gradient, once.
        def sink(name):
            def hook(p):
                param_grad_sink(name, to_numpy(p.grad))
                sunk.add(name)
                p.grad = None
            return hook

        handles = [p.register_post_accumulate_grad_hook(sink(n)) for n, p in module.named_parameters()
                   if p.requires_grad]
    if grads and free_weights:
        # After the accumulation every node with this parameter as an input has run; a node that
        # saved a view or a detached alias of it holds that storage itself, and it stays alive.
        def free(p):
            p.data = torch.full((1,) * p.dim(), float("nan"), dtype=p.dtype, device=p.device).expand(p.shape)
        handles += [p.register_post_accumulate_grad_hook(free) for p in module.parameters() if p.requires_grad]
    try:
        # The op recorder is the outer mode: it sees each op after the watch, and what it computes
        # itself (reading a scalar's value) runs with both modes off, unseen by the watch.
        writes = recorder.writes if recorder is not None else None
        with op_recorder or contextlib.nullcontext(), watch or contextlib.nullcontext(), \
                writes or contextlib.nullcontext():
            raw = module(*args)
        outs = {p: o for p, o in flatten(raw).items() if isinstance(o, torch.Tensor)}
        values = {p: to_numpy(o.detach()).copy() for p, o in outs.items()}
        cots: dict[str, np.ndarray] = {}
        if grads:
            cots = cotangents if cotangents is not None else random_cotangents(values, cotangent_seed)
            pairs = [(outs[p], c) for p, c in cots.items() if outs[p].requires_grad]
            if pairs:
                loss = sum((o * torch.as_tensor(c, dtype=o.dtype, device=o.device)).sum() for o, c in pairs)
                loss.backward()
        changed = recorder is not None and recorder.changed()
    finally:
        if recorder is not None:
            recorder.remove()
        if op_recorder is not None:
            op_recorder.remove()
        for h in handles:
            h.remove()
    in_grads = {}
    if grads:
        for (path, _), leaf in zip(jax.tree_util.tree_flatten_with_path(tuple(args))[0],
                                   jax.tree_util.tree_leaves(tuple(args))):
            if is_float(leaf):
                in_grads[keystr(path)] = (to_numpy(leaf.grad) if leaf.grad is not None
                                          else np.zeros(tuple(leaf.shape)))
    p_grads = {n: (to_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape)))
               for n, p in module.named_parameters() if n not in sunk} if grads else {}
    if free_weights and not all(np.isfinite(np.sum(g)) for g in [*in_grads.values(), *p_grads.values()]):
        # Every gradient the backward computes flows into some leaf's: a freed weight it read is here.
        raise RuntimeError("a gradient is not finite in a run that freed its weights as their gradients came")
    if param_grad_sink is not None:  # the ones autograd never reached (zeros, as above)
        for n in list(p_grads):
            param_grad_sink(n, p_grads.pop(n))
    lowest = str(watch.lowest).replace("torch.", "") if watch is not None and watch.lowest is not None else ""
    return TorchRun(values, cots, in_grads, p_grads, recorder.calls if recorder else None, outs,
                    recorder.aliases if recorder else {}, lowest, watch.first if watch is not None else None,
                    op_recorder.ops if op_recorder else None), changed


def train_mode_matters(module: torch.nn.Module) -> bool:
    """Whether train() changes what ``module`` computes: it has a BatchNorm/InstanceNorm with
    running statistics or a Dropout (user layers that read ``self.training`` are not seen)."""
    kinds = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm,
             torch.nn.modules.dropout._DropoutNd)
    return any(isinstance(m, kinds) for m in module.modules())


__all__ = ["TorchCall", "TorchRun", "train_mode_matters", "input_paths", "is_float", "keystr",
           "random_cotangents", "run_torch", "torch_inputs"]
