"""Give the memory a check has freed back to the operating system (glibc's ``malloc_trim``).

glibc serves an allocation below its mmap threshold from its heap arenas, and keeps what is freed
there for reuse instead of returning it. The threshold rises with every large block freed, up to
32 MiB, so after the first weights are freed a model's weight-sized tensors (GPT-2-medium's
float32 matrices: 16 MiB) come from the heap, and when a check frees a copy of the model (torch's
float64 weights, a run's gradients) the process keeps its pages: measured on GPT-2-medium with
per-layer rows, 1.4 to 2.5 GB above the live tensors at each phase boundary, and the next phase's
fresh allocations on top of that. Trimming at the boundaries keeps the check's resident memory to
what is alive. Elsewhere (macOS, musl) there is nothing to call and nothing happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def give_back() -> None:
    """Return the heap's free pages to the operating system (a few ms; nothing without glibc)."""
    trim = _trim()
    if trim is not None:
        trim(0)
