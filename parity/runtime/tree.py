"""Pytrees of model inputs and outputs, flattened to {path: leaf} with readable paths.

One flattener serves both frameworks (torch tensors, jax arrays and tracers, numpy arrays), so a
torch ``ModelOutput`` and the Flax twin's ``FlaxBaseModelOutput`` (or a dict, a dataclass, a
tuple holding ``None``) flatten to the same paths: ``out.last_hidden_state``, ``out[1]``,
``out['logits']``. ``None`` leaves are dropped (an optional output that is absent is no value to
compare); HF ``ModelOutput`` is an OrderedDict subclass whose None fields are not keys already.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

Leaf = Any  # torch.Tensor, jax.Array / tracer, np.ndarray, or a Python scalar


def _is_model_output(x) -> bool:
    # transformers.utils.ModelOutput without importing transformers (it is an optional extra).
    return any(c.__name__ == "ModelOutput" for c in type(x).__mro__)


def _children(x) -> list[tuple[str, Any]] | None:
    """(path suffix, child) pairs of a container node, None for a leaf."""
    if _is_model_output(x) or (dataclasses.is_dataclass(x) and not isinstance(x, type)):
        if isinstance(x, Mapping):
            items = list(x.items())
        else:
            items = [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
        return [(f".{k}", v) for k, v in items]
    if isinstance(x, Mapping):
        return [(f"[{k!r}]", v) for k, v in x.items()]
    if isinstance(x, (tuple, list)):
        return [(f"[{i}]", v) for i, v in enumerate(x)]
    return None


def flatten(tree, root: str = "out") -> dict[str, Leaf]:
    """{path: leaf} in traversal order; None leaves dropped. A bare leaf is ``{root: leaf}``."""
    out: dict[str, Leaf] = {}

    def walk(node, path: str) -> None:
        if node is None:
            return
        kids = _children(node)
        if kids is None:
            out[path] = node
            return
        for suffix, child in kids:
            walk(child, path + suffix)

    walk(tree, root)
    return out


def structure(tree, root: str = "out") -> str:
    """A one-line picture of a tree's leaf paths (for structural-mismatch messages)."""
    paths = list(flatten(tree, root))
    return "{" + ", ".join(paths) + "}" if paths else "{} (no array leaves)"


def map_with_path(fn, tree, root: str = "out"):
    """Rebuild ``tree`` with fn(path, leaf) at every non-None leaf, paths as ``flatten`` names them
    (containers rebuilt as the same type; a ModelOutput or dataclass from its fields)."""

    def walk(node, path: str):
        if node is None:
            return None
        if _is_model_output(node):
            return type(node)(**{k: walk(v, f"{path}.{k}") for k, v in node.items()})
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return dataclasses.replace(node, **{f.name: walk(getattr(node, f.name), f"{path}.{f.name}")
                                                for f in dataclasses.fields(node) if f.init})
        if isinstance(node, Mapping):
            return type(node)((k, walk(v, f"{path}[{k!r}]")) for k, v in node.items())
        if isinstance(node, tuple):
            vals = [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
            return type(node)(*vals) if hasattr(node, "_fields") else tuple(vals)
        if isinstance(node, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return fn(path, node)

    return walk(tree, root)


def canonical_path(path: str) -> str:
    """An output path as both frameworks may spell it: a ModelOutput / dataclass field
    (``out.logits``, torch) and a dict key (``out['logits']``, a Flax dict) are one leaf to a user
    comparing a torch ModelOutput against a Flax dict, so both become ``out.logits``."""
    return re.sub(r"\['([^']*)'\]", r".\1", path)


def match_outputs(flax_paths: Sequence[str], torch_paths: Sequence[str]) -> dict[str, str] | None:
    """{flax output path: torch output path}, paired by ``canonical_path``; None when the two
    output structures differ (a leaf on one side with no partner on the other)."""
    by_canon = {canonical_path(p): p for p in torch_paths}
    out = {p: by_canon.get(canonical_path(p)) for p in flax_paths}
    if None in out.values() or len(set(out.values())) != len(torch_paths):
        return None
    return out


def as_args(example_input) -> tuple:
    """The positional arguments a model is called with: a tuple/list is several arguments, any
    other value (a tensor, a dict, a dataclass) is one."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def input_paths(args: tuple) -> list[str]:
    """Readable names of the leaves of a tuple of positional arguments: input[0], input[1]['ids']."""
    return [keystr(p) for p, _ in _jtu().tree_flatten_with_path(args)[0]]


def keystr(path, root: str = "input") -> str:
    parts = []
    for k in path:
        if isinstance(k, _jtu().SequenceKey):
            parts.append(f"[{k.idx}]")
        elif isinstance(k, _jtu().DictKey):
            parts.append(f"[{k.key!r}]")
        else:
            parts.append(f".{getattr(k, 'name', k)}")
    return root + "".join(parts)


def _jtu():
    import jax  # (lazy: ``import parity.configs`` stays framework-free through this module)

    return jax.tree_util


__all__ = ["as_args", "canonical_path", "flatten", "input_paths", "keystr", "map_with_path", "match_outputs",
           "structure"]
