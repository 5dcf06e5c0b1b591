"""The check's worker threads, in one place: a run beside the caller's (``beside`` / ``settle``)
and a map whose items are computed side by side and taken in order (``in_order``).

Threads, not processes: what they run is torch's and XLA's kernels and numpy's loops, which
release the GIL, on arrays the caller already holds (a process would copy them). Each result
depends on its own inputs alone, so a report is the one a single thread writes."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Threads that judge tensors side by side (parity.judge, parity.layers): numpy's loops over a
# tile release the GIL, and parity._blockwise keeps one set of tile buffers per thread. None:
# as many as torch's CPU thread pool has (the cores the caller gives torch: pytest-xdist workers
# get one each in this suite, where more threads only contend), or without torch (verify) the
# cores this process may use; at most 4, where the judge is bound by memory bandwidth.
WORKERS: int | None = None


def workers() -> int:
    """The threads ``in_order`` uses now (WORKERS)."""
    if WORKERS is not None:
        return WORKERS
    torch = sys.modules.get("torch")
    if torch is not None:
        n = torch.get_num_threads()
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, n))


def beside(fn: Callable[..., Any], *args) -> Future:
    """``fn(*args)`` in a worker thread, beside the caller's work, under the caller's JAX default
    device, JAX's x64 mode and torch's current CUDA device (each is per thread: a float64 run
    in a thread without the caller's ``jax.enable_x64`` would be float32; pinned numerics and
    torch's flags are global)."""
    import jax  # here: parity.judge imports this module, and the judge alone needs no framework

    device = jax.config.jax_default_device
    x64 = bool(jax.config.jax_enable_x64)
    torch = sys.modules.get("torch")
    cuda = torch.cuda.current_device() if torch is not None and torch.cuda.is_initialized() else None

    def job():
        if cuda is not None:
            torch.cuda.set_device(cuda)
        with (jax.default_device(device) if device is not None else contextlib.nullcontext(),
              jax.enable_x64(x64)):
            return fn(*args)
    pool = ThreadPoolExecutor(1, thread_name_prefix="parity-beside")
    try:
        return pool.submit(job)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one job


def settle(future: Future | None) -> None:
    """Wait for a run started by ``beside`` that nothing will read (its caller is failing): the
    caller returns with none of its work still going on (and its memory freed)."""
    if future is not None and not future.cancel():
        with contextlib.suppress(BaseException):
            future.result()


def in_order(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """fn(item) of each item, yielded in the items' order, computed by ``workers()`` threads (the
    ones not yet begun are cancelled when the caller stops or one raises)."""
    items = list(items)
    n = workers()
    if n == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(n, thread_name_prefix="parity-judge")
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
