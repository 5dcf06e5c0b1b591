"""Keyword inputs: one call, given as positional and keyword arguments, made alike on both sides.

Models we did not write take their inputs in different positional orders: HF ``GPT2Model.forward``
is ``(input_ids, past_key_values, cache_position, attention_mask, ...)`` while its Flax module's
``__call__`` is ``(input_ids, attention_mask, position_ids, ...)``, with no defaults. No positional
tuple feeds both; the same keywords do. ``Inputs(ids, attention_mask=m, position_ids=p)`` says so.

The engine runs top modules positionally everywhere (checker, port, lint, per-layer analysis), so
keywords are bound once here: the torch copy and the Flax module get a subclass of their own class
whose call maps the trailing positional arguments back to the keywords. Module paths, parameter
names and hooks are unchanged (the top module is the same module, only its call signature grows).
Keyword leaves are named ``input[k]`` after the positional ones, in the order they were given.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import Any

try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None


class Inputs:
    """The arguments of one model call, positional and keyword, passed alike to torch and Flax.

    ``parity.check(torch_model, flax_module, Inputs(ids, attention_mask=mask, position_ids=pos))``.
    ``torch_only=`` / ``flax_only=``: keywords only one side takes, passed to it as they are.
    Leaves are named ``input[0]`` (positional first), then ``input[1]``... per keyword in the order
    given (``names()`` lists them); layouts declared per leaf use those names.
    """

    def __init__(self, *args: Any, torch_only: dict | None = None, flax_only: dict | None = None, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs
        # Keywords one side alone takes (HF FlaxBartModule requires position_ids, which BartModel
        # computes itself): constants of that side's call, neither compared nor differentiated.
        self.torch_only = dict(torch_only or {})
        self.flax_only = dict(flax_only or {})

    def names(self) -> dict[str, str]:
        """{input path: what it is}: ``input[0]`` -> ``args[0]``, ``input[1]`` -> ``attention_mask``."""
        out = {f"input[{i}]": f"args[{i}]" for i in range(len(self.args))}
        out.update({f"input[{len(self.args) + i}]": k for i, k in enumerate(self.kwargs)})
        return out

    def __repr__(self) -> str:
        return f"Inputs({len(self.args)} positional, keywords {list(self.kwargs)})"


def _torch_call(cls: type, n_pos: int, keys: tuple[str, ...], only: dict) -> type:
    base = cls.forward

    @functools.wraps(base)
    def forward(self, *args):
        return base(self, *args[:n_pos], **dict(zip(keys, args[n_pos:])), **only)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
        + [inspect.Parameter(f"arg{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(n_pos)]
        + [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in keys])
    # Same name and module: reports, rule lookup by type name and pickling-free deepcopy all see
    # the user's class (deepcopy keeps the class object itself).
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _flax_call(cls: type, n_pos: int, keys: tuple[str, ...], only: dict) -> type:
    # The undecorated __call__: calling Linen's wrapped parent method from the subclass's (also
    # wrapped) method would be a second interceptable call of the same module (the per-layer
    # recorder would see the root twice).
    base = getattr(cls.__call__, "__wrapped__", cls.__call__)
    signature = inspect.signature(cls.__call__)

    def __call__(self, *args, **kwargs):
        return base(self, *args[:n_pos], **dict(zip(keys, args[n_pos:])), **only, **kwargs)

    # The train keyword (deterministic, train, ...) is found from the signature: keep the user's.
    __call__.__signature__ = signature
    if getattr(base, "compact", False):  # an @nn.compact body defines its submodules in this call
        from flax import linen as nn

        __call__ = nn.compact(__call__)
    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _rebuilt_linen(module, cls: type):
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    return cls(**fields)


def bind_keywords(torch_module: torch.nn.Module | None, flax_module, example_input):
    """(torch module, Flax module, positional example input) with ``Inputs`` keywords bound.

    Anything but an ``Inputs`` comes back unchanged. The torch module must be the caller's private
    copy (its class is swapped in place; ``keyword_call`` restores it); the Flax module is rebuilt
    (Linen modules are frozen dataclasses). NNX twins are refused with a clear error: give them
    positional arguments. Either module may be None (a port from a state_dict has no torch module).
    """
    if not isinstance(example_input, Inputs):
        return torch_module, flax_module, example_input
    keys = tuple(example_input.kwargs)
    n_pos = len(example_input.args)
    args = tuple(example_input.args) + tuple(example_input.kwargs.values())
    t_only = dict(example_input.torch_only)
    f_only = {k: _as_jax(v) for k, v in example_input.flax_only.items()}
    if not keys and not t_only and not f_only:
        return torch_module, flax_module, args
    from flax import linen as nn

    if flax_module is not None and not isinstance(flax_module, nn.Module):
        raise TypeError(f"parity.Inputs with keywords ({', '.join(keys + tuple(f_only))}) needs a Linen Flax "
                        f"module; got {type(flax_module).__name__} (an NNX twin takes positional inputs)")
    if torch_module is not None:
        torch_module.__class__ = _torch_call(type(torch_module), n_pos, keys, t_only)
    if flax_module is not None:
        flax_module = _rebuilt_linen(flax_module, _flax_call(type(flax_module), n_pos, keys, f_only))
    return torch_module, flax_module, args


@contextlib.contextmanager
def keyword_call(torch_module: torch.nn.Module | None, flax_module, example_input) -> Iterator[tuple]:
    """``bind_keywords`` on the caller's own torch module, its class restored on exit (the port
    traces the module it is given; it must not come back changed)."""
    cls = type(torch_module) if torch_module is not None else None
    try:
        yield bind_keywords(torch_module, flax_module, example_input)
    finally:
        if torch_module is not None:
            torch_module.__class__ = cls


def _as_jax(value):
    # A torch tensor constant for the Flax side: the same values as a numpy array.
    # (no torch on this machine: parity.verify binds a twin from a bundle, whose values are numpy)
    return value.detach().cpu().numpy() if torch is not None and isinstance(value, torch.Tensor) else value


__all__ = ["Inputs", "bind_keywords", "keyword_call"]
