"""Convert tensors on background threads while the plan traces the Flax twin.

Planning (an abstract trace of the twin: Python, one core, holding the GIL) and converting
(copies at memory speed, GIL released) use different resources, so torch_to_flax overlaps them.
Only what does not depend on the plan is converted early: tensors of torch layers whose rule's
layout change is decided by the torch layer alone (Linear, Conv, norms, Embedding); the plan then
takes each result whose layer got the same rule and no flatten permutation, and converts the rest
itself. A prefetched tensor is the same bits the plan would produce (tests/test_port_fast.py).

Scheduling: one shared queue, largest tensors first, so no thread is left with the big ones at the
end (a fixed split of the (weight, bias, weight, ...) list gave one worker every weight and the
other every bias). While the plan traces, the workers take the cores the trace leaves free; once
the plan is built, ``result()`` drains the queue on the caller's thread too.
"""
from __future__ import annotations

import collections
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

from weight_port.rules import LayerInfo, Rule, rule_for
from weight_port.tensors import all_finite, single_threaded_torch, to_jax, to_numpy

# rules whose to_flax reads only the torch layer (and LayerInfo.flatten, checked on reuse)
_PLAN_FREE = frozenset({"linear", "conv", "norm", "group_norm", "instance_norm", "batch_norm",
                        "embedding", "rms_norm"})
# below this many bytes a thread costs more than it overlaps
MIN_BYTES = 64 << 20


def default_workers() -> int:
    """Background threads: the cores the plan's trace leaves free (at least one, at most four:
    more threads only queue on the GIL and on page faults)."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class Converted:
    value: object  # jax.Array in Flax layout
    finite: bool
    source_shape: tuple[int, ...]
    rule: Rule


class Prefetch:
    """Starts converting ``state`` (torch names -> tensors of ``torch_module``) at once.

    workers: background threads (default: default_workers()); 0 leaves every tensor to
    ``result()``, which converts on the calling thread (the same code path, for tests).
    """

    def __init__(self, torch_module: torch.nn.Module, state: Mapping, *, dtype, copy: bool,
                 check_finite: bool, workers: int | None = None):
        self.done: dict[str, Converted] = {}
        self._stop = threading.Event()
        self._args = (state, dtype, copy, check_finite)
        jobs = [(key, tmap, info, rule) for key, tmap, info, rule in _plan_free_tensors(torch_module)
                if key in state]
        jobs.sort(key=lambda job: -_nbytes(state[job[0]]))
        self._queue = collections.deque(jobs)  # popleft is atomic: the threads share it safely
        n = default_workers() if workers is None else workers
        self._threads = [threading.Thread(target=self._drain, name=f"weight_port-prefetch-{i}", daemon=True)
                         for i in range(n)]
        # Each copy runs single-threaded (torch's OpenMP pool stays out of it; see tensors.py).
        self._single = single_threaded_torch()
        self._single.__enter__()
        for t in self._threads:
            t.start()

    def _drain(self) -> None:
        state, dtype, copy, check_finite = self._args
        while not self._stop.is_set():
            try:
                key, tmap, info, rule = self._queue.popleft()
            except IndexError:
                return
            try:
                src = to_numpy(state[key])
                finite = all_finite(src) if check_finite else True
                value = to_jax(tmap.to_flax(src, info), dtype, copy=copy)
            except Exception:  # nothing is lost: the plan converts (and reports) this one itself
                continue
            self.done[key] = Converted(value, finite, tuple(src.shape), rule)

    def _join(self) -> None:
        for t in self._threads:
            t.join()
        if self._single is not None:
            self._single.__exit__(None, None, None)
            self._single = None

    def result(self) -> dict[str, Converted]:
        """Every prefetched tensor; what is still queued is converted on this thread meanwhile."""
        try:
            self._drain()
        finally:
            self._join()
        return self.done

    def cancel(self) -> None:
        self._stop.set()
        self._join()
        self.done.clear()


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else int(getattr(t, "nbytes", 0))


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


__all__ = ["Converted", "Prefetch", "default_workers", "worth_prefetching"]
