"""Which Flax module a torch layer lands in: renames, the naming rules, structural auto-names.

Tried in order for each torch layer (a module owning tensors):
  1. the user's ``rename`` (callable, or (regex, replacement) pairs), applied to the torch path;
  2. the naming rules, first one whose leaves all exist in the Flax twin wins:
     ``a.b.0.c`` -> ``a/b_0/c`` (a list in setup), ``a/b/0/c`` (modules named by index, nnx
     lists), ``a/layers_0/c`` (flax nn.Sequential under ``a``), then a walk of the Flax module
     tree that picks one of these forms -- or HF's ``b/b_0`` -- per index (``tree_paths``);
  3. structural matching for the rest (Flax auto-names ``Dense_0``, ``Conv_1``): torch layers in
     registration order against unclaimed Flax modules in creation order, pairing a layer with the
     first module of the same layer type whose leaves have the converted shapes.
Anything still unpaired is reported with its closest candidate (difflib) on the other side.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence

from weight_port.naming import torch_to_flax_path

Rename = Callable[[str], str] | Sequence[tuple[str, str]] | None


def apply_rename(path: str, rename: Rename) -> str:
    """The user's rename of a dotted torch path; regex pairs apply in order (re.sub each)."""
    if rename is None:
        return path
    if callable(rename):
        return rename(path)
    for pattern, replacement in rename:
        path = re.sub(pattern, replacement, path)
    return path


def candidate_paths(torch_path: str, sequential: Iterable[str] = ()) -> list[tuple[str, ...]]:
    """Flax paths a torch module path may have, most common first.

    ``sequential``: torch paths of nn.Sequential containers (their children become ``layers_i``
    in a flax nn.Sequential). A path containing "/" (from a rename) is taken literally.
    """
    if "/" in torch_path:
        return [tuple(p for p in torch_path.split("/") if p)]
    parts = torch_path.split(".") if torch_path else []
    seq = set(sequential)
    out = [torch_to_flax_path(torch_path), tuple(parts)]
    layers_all: list[str] = []
    layers_seq: list[str] = []
    for i, part in enumerate(parts):
        parent = ".".join(parts[:i])
        if part.isdigit():
            layers_all.append(f"layers_{part}")
            if parent in seq:
                layers_seq.append(f"layers_{part}")
            elif layers_seq:
                layers_seq[-1] = f"{layers_seq[-1]}_{part}"
            else:
                layers_seq.append(part)
        else:
            layers_all.append(part)
            layers_seq.append(part)
    out += [tuple(layers_seq), tuple(layers_all)]
    unique: list[tuple[str, ...]] = []
    for p in out:
        if p not in unique:
            unique.append(p)
    return unique


def tree_paths(torch_path: str, flax_prefixes: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Flax paths for a torch path found by walking the Flax module tree one component at a time.

    A list index ``i`` under ``name`` may be ``name_i`` (a list in setup), its own component
    ``i`` (modules named by index), ``name/name_i`` (HF Flax collections: ResNet's
    ``layer/layer_0`` for torch ``layer.0``) or ``name/layers_i`` (a Flax nn.Sequential) -- and
    each index of one path may use a different form (HF ResNet: ``stages/0/layers/0/layer/layer_0``),
    which the fixed forms of ``candidate_paths`` cannot list. Only steps that exist in the Flax
    tree (``flax_prefixes``: every prefix of every module path owning a leaf) are taken, so the
    walk is as cheap as the path is deep. Every complete walk is returned, preferred forms first.
    """
    parts = torch_path.split(".") if torch_path else []
    found: list[tuple[str, ...]] = []

    def walk(i: int, path: tuple[str, ...]) -> None:
        if i == len(parts):
            found.append(path)
            return
        part = parts[i]
        if not part.isdigit():
            steps = [(*path, part)]
        elif path:
            steps = [(*path[:-1], f"{path[-1]}_{part}"), (*path, part), (*path, f"{path[-1]}_{part}"),
                     (*path, f"layers_{part}")]
        else:
            steps = [(part,), (f"layers_{part}",)]
        joins = i + 1 < len(parts) and parts[i + 1].isdigit() and not part.isdigit()
        for step in steps:
            # a name followed by an index may exist only joined with it (``blocks_1``)
            if step in flax_prefixes or joins:
                walk(i + 1, step)

    walk(0, ())
    return found


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The most similar candidate (difflib ratio), or None when nothing is remotely similar."""
    hits = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.3)
    return hits[0] if hits else None


def with_closest(line: str, name: str, candidates: Iterable[str], side: str) -> str:
    hit = closest(name, candidates)
    return f"{line}; closest {side}: {hit}" if hit else line


__all__ = ["Rename", "apply_rename", "candidate_paths", "closest", "tree_paths", "with_closest"]
