"""Arrays kept in files between the reads of them: a low-precision check's torch parameter
gradients, which wait through torch's float64 run for the judge (the checked run's), or which the
model judge, the rows' probe and the per-layer rows each read once, long after torch's float64
run made them (the reference's: GPT-2-medium's 2.8 GB held through three whole-model runs).

Each array is one raw file in a private temporary directory (``tempfile``'s: set TMPDIR to move
it; where that is a memory filesystem and TMPDIR is not set, /var/tmp), written by a worker
thread while the caller goes on (torch's backward); one that cannot be written (a full disk) is
kept in memory instead and the mapping says why (``failed``). A read maps the
file read-only (the page cache's pages, not a copy: 0.3 s for 2.9 GB where reading into fresh
arrays took 1.2 s on the 2-core VM) and keeps nothing, and a dropped key deletes its file. The
directory goes with the mapping (``close``, or when it is garbage-collected).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping, MutableMapping

import numpy as np

# A check spills torch's gradients when the float64 ones would hold at least this much (the
# model's parameters, 8 bytes each): BERT-base's 0.9 GB stay in memory (its check is within its
# memory targets; the writes would only add work on 2 cores); GPT-2-medium's go to files (its
# check's peak with rows 9.5-9.8 -> 7.0 GiB, for about 2.6 s of a 60 s check: docs/checking.md).
SPILL_BYTES = 1 << 30


def spill_wanted(spill: bool | None, nbytes: int) -> bool:
    """Whether gradients of ``nbytes`` go to files: ``spill`` True or False says so; None (the
    default) when they are at least SPILL_BYTES."""
    return nbytes >= SPILL_BYTES if spill is None else bool(spill)


def spill_root(mounts: str | None = None) -> str:
    """Where a Spill's directory goes: tempfile's (TMPDIR), unless that is memory (tmpfs, ramfs:
    /tmp on many systems) and TMPDIR is not set, then /var/tmp when it is on a disk.
    mounts: /proc/mounts' text (read when None)."""
    root = tempfile.gettempdir()
    if "TMPDIR" in os.environ or not in_memory(root, mounts):
        return root
    other = "/var/tmp"
    usable = os.path.isdir(other) and os.access(other, os.W_OK | os.X_OK)
    return other if usable and not in_memory(other, mounts) else root


def in_memory(path: str, mounts: str | None = None) -> bool:
    """Whether ``path`` is on a memory filesystem (tmpfs, ramfs), by its longest mount point in
    ``mounts`` (/proc/mounts' text, read when None; False where there is none)."""
    if mounts is None:
        try:
            with open("/proc/mounts") as f:
                mounts = f.read()
        except OSError:
            return False
    real, best, kind = os.path.realpath(path), "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        under = real == point or real.startswith(point.rstrip("/") + "/")
        if under and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind in ("tmpfs", "ramfs")


class Spill(MutableMapping):
    """{name: array} held in files (one per array, its raw bytes); ``spill[name]`` is a read-only
    array mapped from its file, ``del`` deletes the file (unread). Arrays keep their dtype and
    shape exactly. Writes go to a worker thread, at most ``in_flight`` bytes handed over and not
    yet written (the caller waits past that); a read or a delete of a key waits for its write.
    failed: why an array could not be written ("" when all were); it and every array after it
    are kept in memory. in_memory: the directory is on a memory filesystem (nothing saved)."""

    def __init__(self, prefix: str = "parity-spill-", in_flight: int = 256 << 20):
        root = spill_root()
        self.directory = tempfile.mkdtemp(prefix=prefix, dir=root)
        self.in_memory = in_memory(root)
        self.failed = ""
        self._kept: dict[str, np.ndarray] = {}  # path -> an array that could not be written
        self._meta: dict[str, tuple[str, np.dtype, tuple[int, ...]]] = {}
        self._count = 0
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self._cv = threading.Condition()
        self._queue: list[tuple[str, np.ndarray]] = []  # handed over, not yet written, in order
        self._limit, self._bytes = in_flight, 0
        self._worker: threading.Thread | None = None

    def __setitem__(self, name: str, value) -> None:
        a = np.asarray(value)
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes a 0-d array 1-d)
        if a.dtype.hasobject:
            raise TypeError(f"cannot spill {name!r}: an object array")
        if name in self._meta:
            del self[name]
        with self._cv:
            self._cv.wait_for(lambda: self._bytes <= self._limit)
            self._count += 1
            path = os.path.join(self.directory, f"{self._count}.bin")
            if self.failed:  # the disk said no once: the rest stay in memory
                self._kept[path] = a
                self._meta[name] = (path, a.dtype, a.shape)
                return
            self._queue.append((path, a))
            self._bytes += a.nbytes
            if self._worker is None:
                self._worker = threading.Thread(target=self._write, name="parity-spill", daemon=True)
                self._worker.start()
        self._meta[name] = (path, a.dtype, a.shape)

    def _write(self) -> None:
        """The worker: writes what is queued, in order, and ends when nothing is."""
        while True:
            with self._cv:
                if not self._queue:
                    self._worker = None
                    return
                path, a = self._queue[0]
            try:
                with open(path, "wb") as f:
                    f.write(memoryview(a.reshape(-1).view(np.uint8)))  # the GIL is let go while it writes
            except OSError as exc:  # a full disk, a directory gone: kept in memory, and said
                with contextlib.suppress(OSError):
                    os.remove(path)
                with self._cv:
                    self._kept[path] = a
                    self.failed = self.failed or f"{type(exc).__name__}: {exc}"
            with self._cv:
                self._queue.pop(0)
                self._bytes -= a.nbytes
                self._cv.notify_all()
            del a

    def _written(self, path: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: all(p != path for p, _ in self._queue))

    def __getitem__(self, name: str) -> np.ndarray:
        path, dtype, shape = self._meta[name]
        self._written(path)
        if path in self._kept:
            kept = self._kept[path].view()
            kept.flags.writeable = False  # read-only, as a mapped one is
            return kept
        if not shape or 0 in shape:
            return np.fromfile(path, dtype=dtype).reshape(shape)  # (mmap cannot map 0 bytes)
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(m, dtype=dtype).reshape(shape)  # read-only; unmapped when dropped

    def __delitem__(self, name: str) -> None:
        path = self._meta.pop(name)[0]
        self._written(path)
        if self._kept.pop(path, None) is None:
            os.remove(path)

    def __contains__(self, name) -> bool:
        return name in self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._meta))

    def __len__(self) -> int:
        return len(self._meta)

    def reorder(self, names) -> Spill:
        """Iterate in the order of ``names`` (a model's parameter order, where a sink filled it in
        autograd's), the names not in it after them, as they were. Returns the mapping."""
        names = [n for n in names if n in self._meta]
        rest = {n: m for n, m in self._meta.items() if n not in set(names)}
        self._meta = {**{n: self._meta[n] for n in names}, **rest}
        return self

    def shape(self, name: str) -> tuple[int, ...]:
        """An array's shape (nothing read)."""
        return self._meta[name][2]

    def clear(self) -> None:
        """Drop every array, reading none."""
        for name in list(self._meta):
            del self[name]

    def close(self) -> None:
        """Delete every file and the directory (the mapping is empty after)."""
        with self._cv:
            self._cv.wait_for(lambda: not self._queue)
        self._meta.clear()
        self._kept.clear()
        self._finalizer()


class Renamed(Mapping):
    """A read-only view of ``source`` under ``prefix`` + its keys (``param:`` + a torch name):
    reads go through to ``source`` as asked, so a Spill is read a tensor at a time."""

    def __init__(self, source: Mapping, prefix: str):
        self.source, self.prefix = source, prefix

    def __getitem__(self, key: str):
        if not key.startswith(self.prefix):
            raise KeyError(key)
        return self.source[key[len(self.prefix):]]

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key.startswith(self.prefix) and key[len(self.prefix):] in self.source

    def __iter__(self) -> Iterator[str]:
        return (self.prefix + k for k in self.source)

    def __len__(self) -> int:
        return len(self.source)


__all__ = ["SPILL_BYTES", "Renamed", "Spill", "in_memory", "spill_root", "spill_wanted"]
