"""What each torch module calls during a real forward: every torch function (F.gelu,
F.interpolate, a matmul, ``x * c``, a softmax, ...) called while the module runs, credited to the
innermost module running at the time (run_torch(ops=True)).

A TorchFunctionMode sees each call once, at the outermost level (what F.interpolate calls inside
itself is not seen), and module forward pre/post hooks keep the stack of modules running, so an
op is credited to the module whose own ``forward`` (or a helper it calls) made it. Unlike a
torch.fx trace this reads any model that runs: data-dependent control flow, shape arithmetic in
Python, ``**kwargs`` forwards. A module called through ``module.forward(...)`` directly (no hooks)
has its ops credited to its caller.

Tensors are not kept: each appears in a record as a TensorRef, a serial number given to every
tensor an op returns (an in-place op's result gets a new one), so data flow can be walked back
(``producer[serial]``) without holding any activation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class TensorRef:
    """A tensor argument or result of a recorded op. serial: unique in the run (a tensor first
    seen as an argument -- a parameter, a model input -- gets one with no producer); value: the
    number, for a one-element tensor (``logits / torch.tensor(8.0).sqrt()``), else None."""

    serial: int
    value: float | None = None


@dataclass(frozen=True)
class TorchOp:
    """One torch function call. path: the innermost module running ("" for the root); name: the
    function's ``__name__`` ("gelu", "matmul", "mul", "softmax", "masked_fill_", ...); args and
    kwargs as called, tensors replaced by TensorRef (in lists, tuples and dicts too); outputs: the
    serials of the tensors it returned, in order."""

    path: str
    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    outputs: tuple[int, ...] = ()


_SKIP = ("__get__", "__set__")  # attribute reads (x.shape, x.dtype): no computation


def _value(x: torch.Tensor) -> float | None:
    """The number a one-element real tensor holds, else None. Inside torch.vmap (HF builds its
    attention masks with it) a tensor's value cannot be read: None there too."""
    if x.numel() != 1 or x.device.type == "meta" or x.is_complex():
        return None
    try:
        return float(x.detach().reshape(()))
    except RuntimeError:  # vmap: "We don't support vmap over calling .item() on a Tensor"
        return None


class OpRecorder(TorchFunctionMode):
    """Records TorchOps while active (a context manager around the forward), for every call made
    while some module of ``module`` runs. ``remove()`` takes the hooks off."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.ops: list[TorchOp] = []
        self._names = {id(m): p for p, m in module.named_modules()}
        # One entry per module running: its path while its own forward runs, None while its hooks
        # run (what other hooks compute -- run_torch's capture, a user's hook -- is no op of it).
        self._running: list[str | None] = []
        self._serials = WeakIdKeyDictionary()
        self._next = 0
        self._handles = []
        for mod in dict((id(m), m) for _, m in module.named_modules()).values():
            self._handles += [mod.register_forward_pre_hook(self._hooks_start, prepend=True),
                              mod.register_forward_pre_hook(self._forward_start),
                              mod.register_forward_hook(self._forward_end, prepend=True, always_call=True),
                              mod.register_forward_hook(self._hooks_end, always_call=True)]

    def _hooks_start(self, mod, args):
        self._running.append(None)

    def _forward_start(self, mod, args):
        self._running[-1] = self._names[id(mod)]

    def _forward_end(self, mod, args, output):
        self._running[-1] = None

    def _hooks_end(self, mod, args, output):
        self._running.pop()

    def _new_serial(self, t: torch.Tensor) -> int:
        self._next += 1
        self._serials[t] = self._next
        return self._next

    def _ref(self, x):
        if isinstance(x, torch.Tensor):
            serial = self._serials.get(x)
            if serial is None:
                serial = self._new_serial(x)
            return TensorRef(serial, _value(x))
        if type(x) in (list, tuple):  # not torch.Size, nor a named tuple (kept as they are)
            return type(x)(self._ref(a) for a in x)
        if isinstance(x, dict):
            return {k: self._ref(v) for k, v in x.items()}
        return x

    def _outputs(self, out) -> tuple[int, ...]:
        if isinstance(out, torch.Tensor):
            return (self._new_serial(out),)
        if isinstance(out, (list, tuple)):
            return tuple(s for o in out for s in self._outputs(o))
        return ()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self._running or self._running[-1] is None or name in _SKIP:
            return func(*args, **kwargs)
        # Arguments are read before the call: an in-place op changes what they hold.
        refs, kw_refs = self._ref(tuple(args)), self._ref(dict(kwargs))
        out = func(*args, **kwargs)
        self.ops.append(TorchOp(self._running[-1], name, refs, kw_refs, self._outputs(out)))
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


__all__ = ["OpRecorder", "TensorRef", "TorchOp"]
