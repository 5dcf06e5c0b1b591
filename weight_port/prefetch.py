"""Convert tensors on a background thread while the plan traces the Flax twin.

Planning (an abstract trace of the twin: Python, one core) and converting (copies at memory
speed, GIL released) use different resources, so torch_to_flax overlaps them. Only what does not
depend on the plan is converted early: tensors of torch layers whose rule's layout change is
decided by the torch layer alone (Linear, Conv, norms, Embedding); the plan then takes each
result whose layer got the same rule and no flatten permutation, and converts the rest itself.
A prefetched tensor is the same bits the plan would produce (tests/test_port_fast.py).
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from weight_port.rules import LayerInfo, Rule, rule_for
from weight_port.tensors import all_finite, single_threaded_torch, to_jax, to_numpy

# rules whose to_flax reads only the torch layer (and LayerInfo.flatten, checked on reuse)
_PLAN_FREE = frozenset({"linear", "conv", "norm", "group_norm", "instance_norm", "batch_norm",
                        "embedding", "rms_norm"})
# below this many bytes a thread costs more than it overlaps
MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class Converted:
    value: object  # jax.Array in Flax layout
    finite: bool
    source_shape: tuple[int, ...]
    rule: Rule


class Prefetch:
    """Starts converting ``state`` (torch names -> tensors of ``torch_module``) at once."""

    def __init__(self, torch_module: torch.nn.Module, state: Mapping, *, dtype, copy: bool,
                 check_finite: bool, workers: int = 2):
        self.done: dict[str, Converted] = {}
        self._stop = threading.Event()
        jobs = [(key, tmap, info, rule) for key, tmap, info, rule in _plan_free_tensors(torch_module)
                if key in state]
        # Each worker copies single-threaded (torch's OpenMP pool stays out of it); several
        # workers use the cores the plan's trace leaves free, and all of them once it is done.
        self._threads = [
            threading.Thread(target=self._run, args=(jobs[i::workers], state, dtype, copy, check_finite),
                             name=f"weight_port-prefetch-{i}", daemon=True)
            for i in range(workers)
        ]
        self._single = single_threaded_torch()
        self._single.__enter__()
        for t in self._threads:
            t.start()

    def _run(self, jobs, state, dtype, copy, check_finite) -> None:
        try:
            for key, tmap, info, rule in jobs:
                if self._stop.is_set():
                    return
                src = to_numpy(state[key])
                finite = all_finite(src) if check_finite else True
                value = to_jax(tmap.to_flax(src, info), dtype, copy=copy)
                self.done[key] = Converted(value, finite, tuple(src.shape), rule)
        except Exception:  # nothing is lost: the plan converts (and reports) whatever is missing
            return

    def _join(self) -> None:
        for t in self._threads:
            t.join()
        if self._single is not None:
            self._single.__exit__(None, None, None)
            self._single = None

    def result(self) -> dict[str, Converted]:
        self._join()
        return self.done

    def cancel(self) -> None:
        self._stop.set()
        self._join()
        self.done.clear()


def _plan_free_tensors(torch_module: torch.nn.Module):
    for path, module in torch_module.named_modules():
        rule = rule_for(type(module))
        if rule is None or rule.name not in _PLAN_FREE:
            continue
        info = LayerInfo(path, (), type(module), module)
        for tmap in rule.tensors:
            yield (f"{path}.{tmap.torch_name}" if path else tmap.torch_name), tmap, info, rule


def worth_prefetching(state: Mapping) -> bool:
    """In-memory torch tensors totalling at least MIN_BYTES (files are read lazily instead)."""
    if not isinstance(state, dict):
        return False
    total = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total >= MIN_BYTES


__all__ = ["Converted", "Prefetch", "worth_prefetching"]
