"""The Flax side of the trap lint: one jaxpr of the twin, each equation with the Flax module path
that produced it, a data-flow view of it (producers, consumers, constants), and the
``jax.image.resize`` calls made during the trace.

Linen twins: each equation's ``source_info.name_stack`` ("Model/block/conv") is the module path
(the top module's class name dropped). NNX modules push nothing on the name stack, so an NNX
twin is traced through the engine's own NNX capture (parity.runtime.flax_runner: every
submodule's class temporarily swapped for a recording subclass) with a recorder that opens a
``jax.named_scope`` per submodule call; the innermost such scope is the equation's path.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import numpy as np

from parity.runtime.flax_runner import _Recorder

_NNX_MARK = "nnx:"  # prefix of the named scope an NNX submodule call opens (path joined by ".")


@dataclass(frozen=True, eq=False)
class Eqn:
    """One jaxpr equation with the Flax module path (tuple) that produced it."""

    prim: str
    scope: tuple[str, ...]
    params: dict
    in_shapes: tuple
    invars: tuple = ()
    outvars: tuple = ()


@dataclass(frozen=True)
class ResizeCall:
    """One jax.image.resize call of the twin: shapes [N, *S, C] as the twin passed them."""

    scope: tuple[str, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    method: str  # jax.image.ResizeMethod's name, lower case: "linear", "cubic_pytorch", ...
    antialias: bool


@dataclass
class FlaxTrace:
    """Every equation of one trace of the twin (nested jaxprs flattened, in order), the resize
    calls, and the data flow: which equation produced a variable and which ones read it."""

    eqns: list[Eqn]
    resizes: list[ResizeCall] = field(default_factory=list)
    producer: dict = field(default_factory=dict)  # Var -> Eqn
    consumers: dict = field(default_factory=dict)  # Var -> [Eqn]
    alias: dict = field(default_factory=dict)  # Var -> the Var it stands for across a nested jaxpr

    def source(self, v):
        """The equation that produced ``v`` (through nested-jaxpr boundaries), or None."""
        seen = 0
        while _hashable(v) and v in self.alias and seen < 64:
            v, seen = self.alias[v], seen + 1
        return self.producer.get(v) if _hashable(v) else None

    def readers(self, v) -> list[Eqn]:
        out = list(self.consumers.get(v, [])) if _hashable(v) else []
        for inner, outer in self.alias.items():  # a nested jaxpr reading v as its own invar
            if outer is v:
                out += self.consumers.get(inner, [])
        return out

    def constant(self, v, depth: int = 0):
        """v's value when it is computed from literals alone (sqrt(8.0), a python float), else None."""
        if isinstance(v, jax.extend.core.Literal):
            return np.asarray(v.val)
        e = self.source(v)
        if e is None or depth > 16 or e.prim not in _FOLD:
            return None
        args = [self.constant(a, depth + 1) for a in e.invars]
        if any(a is None for a in args):
            return None
        try:
            return np.asarray(_FOLD[e.prim](*args, **e.params))
        except Exception:  # noqa: BLE001  (an op this fold does not model: not a constant)
            return None


def _hashable(v) -> bool:
    return not isinstance(v, jax.extend.core.Literal)


# Primitives folded on constants (scale = 1 / sqrt(head_dim) is sqrt(literal) then div).
_FOLD = {
    "sqrt": lambda x, **_: np.sqrt(x), "rsqrt": lambda x, **_: 1 / np.sqrt(x),
    "mul": lambda a, b, **_: a * b, "div": lambda a, b, **_: a / b, "neg": lambda x, **_: -x,
    "integer_pow": lambda x, y, **_: x ** y, "pow": lambda a, b, **_: a ** b,
    "convert_element_type": lambda x, **_: x, "copy": lambda x, **_: x,
    "broadcast_in_dim": lambda x, shape, **_: np.broadcast_to(x, shape) if np.ndim(x) == 0 else None,
    "reshape": lambda x, **_: x if np.size(x) == 1 else None,
    "squeeze": lambda x, **_: x if np.size(x) == 1 else None,
}


def _scope(stack: str, nnx: bool) -> tuple[str, ...]:
    # einsum pushes its spec ("...qhd,...khd->...hqk") on the name stack: not a module.
    parts = [p for p in stack.split("/") if p and "->" not in p]
    if not nnx:
        return tuple(parts[1:])  # drop the top module's class name
    marks = [p[len(_NNX_MARK):] for p in parts if p.startswith(_NNX_MARK)]
    return tuple(marks[-1].split(".")) if marks and marks[-1] else ()


def _walk(jaxpr, trace: FlaxTrace, nnx: bool, stack: str = "") -> None:
    for e in jaxpr.eqns:
        own = str(e.source_info.name_stack)
        full = "/".join(s for s in (stack, own) if s)
        shapes = tuple(getattr(v.aval, "shape", None) for v in e.invars)
        eq = Eqn(e.primitive.name, _scope(full, nnx), dict(e.params), shapes, tuple(e.invars), tuple(e.outvars))
        trace.eqns.append(eq)
        for v in e.invars:
            if _hashable(v):
                trace.consumers.setdefault(v, []).append(eq)
        for v in e.outvars:
            trace.producer[v] = eq
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            # A call-like nested jaxpr (pjit, custom_jvp_call, remat) with one invar per operand
            # and one outvar per result: its variables alias the outer ones, so data flow crosses it.
            if len(sub.invars) == len(e.invars) and len(sub.outvars) == len(e.outvars):
                trace.alias.update({i: o for i, o in zip(sub.invars, e.invars) if _hashable(o)})
                trace.alias.update({o: i for o, i in zip(e.outvars, sub.outvars) if _hashable(i)})
            _walk(sub, trace, nnx, full)


class _ScopeRecorder(_Recorder):
    """The engine's NNX recorder, reused for its class swap: each submodule call runs inside a
    named scope holding its path, and nothing is recorded."""

    def __init__(self):
        super().__init__(None)

    def record(self, path, module_for_rerun, run, args, kwargs):
        with jax.named_scope(_NNX_MARK + ".".join(path)):
            return run(*args, **kwargs)


@contextlib.contextmanager
def _recording_resize(calls: list[ResizeCall], nnx: bool):
    """jax.image.resize wrapped for the duration of the trace: each call is recorded with the
    name stack current at the call (its Flax module path), its method and antialias flag."""
    from jax._src import source_info_util

    original = jax.image.resize

    def resize(image, shape, method, antialias=True, precision=jax.lax.Precision.HIGHEST):
        stack = str(source_info_util.current_name_stack())
        name = (method if isinstance(method, jax.image.ResizeMethod)
                else jax.image.ResizeMethod.from_string(method)).name.lower()
        calls.append(ResizeCall(_scope(stack, nnx), tuple(image.shape), tuple(shape), name, bool(antialias)))
        return original(image, shape, method, antialias=antialias, precision=precision)

    jax.image.resize = resize
    try:
        yield
    finally:
        jax.image.resize = original


def flax_trace(twin, variables: Mapping, args: tuple) -> FlaxTrace:
    """One jax.make_jaxpr of the twin (a dropout RNG supplied, so a twin that draws random bits
    in eval traces instead of failing on a missing 'dropout' stream)."""
    if twin.nnx:
        fn = lambda v, a: twin.apply(v, a, _ScopeRecorder())[0]  # noqa: E731  (NNX carries its RNGs)
    else:
        def fn(v, a):
            mutable = [c for c in v if c != "params"] if twin.train else False
            return twin.module.apply(dict(v), *a, rngs={"dropout": jax.random.PRNGKey(0)},
                                     mutable=mutable, **twin.kwargs)
    trace = FlaxTrace([])
    with _recording_resize(trace.resizes, twin.nnx):
        closed = jax.make_jaxpr(fn)(dict(variables), tuple(args))
    _walk(closed.jaxpr, trace, twin.nnx)
    return trace


__all__ = ["Eqn", "FlaxTrace", "ResizeCall", "flax_trace"]
