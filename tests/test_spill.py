"""torch's float64 parameter gradients kept in files between the judge's reads (parity._spill):
the mapping keeps every array exactly, frees what is dropped, leaves no file behind, and a check
that spills gives the report one that does not gives, a planted mis-port included."""
from __future__ import annotations

import gc
import os
import time

import ml_dtypes
import numpy as np
import pytest

import parity
import parity.checker as checker
from planted import FlaxTwoFC, TorchTwoFC
from parity._spill import SPILL_BYTES, Renamed, Spill, in_memory, spill_root, spill_wanted


def _gone(directory: str) -> bool:
    """The directory deleted once the mapping is collected (its writer thread, holding it while it
    writes, ends first: waited for up to 10 s)."""
    for _ in range(100):
        gc.collect()
        if not os.path.exists(directory):
            return True
        time.sleep(0.1)
    return False


def test_arrays_come_back_exactly_and_read_only():
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((5, 3)), "b": rng.standard_normal(7).astype(np.float32),
              "h": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16), "s": np.float64(3.5),
              "e": np.zeros((0, 4)), "t": rng.standard_normal((4, 6)).T}  # not contiguous
    s = Spill(in_flight=1)  # every write waits for the one before: the queue's own path
    for k, v in arrays.items():
        s[k] = v
    assert sorted(s) == sorted(arrays) and len(s) == len(arrays) and s.shape("w") == (5, 3)
    for k, v in arrays.items():
        got = s[k]
        assert got.dtype == np.asarray(v).dtype and got.shape == np.shape(v), k
        assert got.tobytes() == np.asarray(v).tobytes(), k  # bit for bit
    with pytest.raises(ValueError, match="read-only"):
        s["w"][0, 0] = 1.0
    s["w"] = np.ones(2)  # replaced: the old file goes
    assert np.array_equal(s["w"], np.ones(2)) and len(os.listdir(s.directory)) == len(arrays)
    del s["w"]
    assert "w" not in s and len(os.listdir(s.directory)) == len(arrays) - 1
    s.clear()
    assert len(s) == 0 and os.listdir(s.directory) == []
    directory = s.directory
    s.close()
    assert not os.path.exists(directory)


def test_the_directory_goes_with_the_mapping():
    s = Spill()
    s["a"] = np.ones(3)
    directory = s.directory
    del s
    assert _gone(directory)


def test_what_cannot_be_written_stays_in_memory_and_says_why():
    s = Spill()
    os.rmdir(s.directory)  # the write then fails, in the worker (as on a full disk)
    s["a"], s["b"] = np.arange(3.0), np.ones(2)
    assert np.array_equal(s["a"], np.arange(3.0)) and np.array_equal(s["b"], np.ones(2))
    assert "FileNotFoundError" in s.failed, s.failed
    with pytest.raises(ValueError, match="read-only"):
        s["a"][0] = 1.0
    del s["a"]
    assert list(s) == ["b"]
    s.close()


MOUNTS = """/dev/vda / ext4 rw 0 0
tmpfs /tmp tmpfs rw,nosuid 0 0
tmpfs /dev/shm tmpfs rw 0 0
/dev/vdb /var/tmp ext4 rw 0 0
"""


def test_a_memory_filesystem_is_seen_by_its_longest_mount_point():
    assert in_memory("/tmp/x", MOUNTS) and in_memory("/dev/shm", MOUNTS)
    assert not in_memory("/var/tmp", MOUNTS) and not in_memory("/tmpfoo", MOUNTS) and not in_memory("/", MOUNTS)
    assert not in_memory("/tmp", "/dev/vda / ext4 rw 0 0\n")


def test_spills_leave_a_memory_tmp_for_var_tmp_unless_tmpdir_is_set(monkeypatch):
    import tempfile

    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/tmp")
    assert spill_root(MOUNTS) == ("/var/tmp" if os.access("/var/tmp", os.W_OK) else "/tmp")
    assert spill_root("/dev/vda / ext4 rw 0 0\n") == "/tmp"  # /tmp on a disk: kept
    monkeypatch.setenv("TMPDIR", "/tmp")
    assert spill_root(MOUNTS) == "/tmp"  # the user's choice


def test_renamed_reads_through():
    s = Spill()
    s["fc.weight"] = np.arange(3.0)
    view = Renamed(s, "param:")
    assert "param:fc.weight" in view and "fc.weight" not in view and list(view) == ["param:fc.weight"]
    assert np.array_equal(view["param:fc.weight"], np.arange(3.0))
    with pytest.raises(KeyError):
        view["fc.weight"]
    s.close()


def test_spill_by_default_from_one_gib_of_gradients():
    assert spill_wanted(None, SPILL_BYTES) and not spill_wanted(None, SPILL_BYTES - 1)
    assert spill_wanted(True, 0) and not spill_wanted(False, 10 * SPILL_BYTES)


@pytest.mark.parametrize("layers", [False, True], ids=["model", "rows"])
@pytest.mark.parametrize("low", ["", "fc2"], ids=["correct", "mis-port"])
def test_a_check_that_spills_gives_the_same_report(monkeypatch, layers, low):
    made, read = [], []
    setitem = Spill.__setitem__
    monkeypatch.setattr(Spill, "__setitem__", lambda self, k, v: (made.append(self), setitem(self, k, v))[1])
    analyze = checker.analyze_layers

    def spy(*args, **kwargs):
        read.append(kwargs["param_grads"])
        return analyze(*args, **kwargs)
    monkeypatch.setattr(checker, "analyze_layers", spy)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    reports = [parity.check(TorchTwoFC(), FlaxTwoFC(dtype=None, low=low), x, input_layout="as_is", lint=False, layers=layers,
                            spill=spill).to_dict() for spill in (False, True)]
    for r in reports:
        r["env"] = None  # (timings and versions aside)
    assert reports[0] == reports[1]
    assert reports[0]["verdict"] == ("FAIL" if low else "PASS"), reports[0]["verdict"]
    # the second check's: every parameter's gradient in float32 (the checked run) and float64
    assert len(made) == 8 and len({id(s) for s in made}) == 2
    if layers:  # the rows read them from the files, and let each go once judged
        assert not isinstance(read[0], Spill) and isinstance(read[1], Spill) and len(read[1]) == 0
    directories = {s.directory for s in made}
    made.clear(), read.clear()  # (the spies held the mappings)
    assert all(_gone(d) for d in directories)  # nothing left behind


def test_a_check_whose_files_fail_still_judges_and_says_so(monkeypatch):
    import parity._spill as spill_module

    init = Spill.__init__

    def no_directory(self, *a, **kw):
        init(self, *a, **kw)
        os.rmdir(self.directory)
    monkeypatch.setattr(Spill, "__init__", no_directory)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    r = parity.check(TorchTwoFC(), FlaxTwoFC(dtype=None, low="fc2"), x, input_layout="as_is", lint=False, spill=True)
    assert r.verdict == "FAIL" and r.first_divergence == "fc2", r.summary()
    assert any("torch's gradients could not all be kept in files" in w and "held in memory" in w for w in r.warnings), r.warnings
    monkeypatch.setattr(Spill, "__init__", init)
    monkeypatch.setattr(spill_module, "in_memory", lambda *a, **kw: True)
    r = parity.check(TorchTwoFC(), FlaxTwoFC(dtype=None), x, input_layout="as_is", lint=False, spill=True)
    assert r.verdict == "PASS" and any("a memory filesystem: set TMPDIR" in w for w in r.warnings), r.warnings
