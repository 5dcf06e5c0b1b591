"""The judge's working memory: judging a tensor takes a few float64 copies of it, not ten (verify
judges a GPT-2 vocabulary's embedding gradient, 50257 x 1024: 400 MB per float64 copy, and its
peak was the judging of that one tensor), with the same numbers as the general, masked path."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from parity import _blockwise
from parity import judge as j
from parity.tolerances import REFERENCE, tolerance_for

RNG = np.random.default_rng(0)
REF = RNG.standard_normal((2048, 512))
TORCH = (REF * (1 + 1e-7 * RNG.standard_normal(REF.shape))).astype(np.float32)
FLAX = (REF * (1 + 1e-7 * RNG.standard_normal(REF.shape))).astype(np.float32)
RULE = j.measured(tolerance_for("float32", REFERENCE, "highest", "cpu"), "float32")


@pytest.mark.parametrize("axis", [0, 1, None])
@pytest.mark.parametrize("own_probe", [False, True], ids=["probe-is-torch", "probe-apart"])
def test_judging_a_tensor_takes_few_float64_copies_of_it(axis, own_probe):
    # a low-precision run's probe is torch's own value (ModelJudge passes the same array): one
    # float64 copy of it; a float64 run's probe is another run
    probe = TORCH.copy() if own_probe else TORCH
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        c = j.judge("grad", FLAX, TORCH, RULE, reference=REF, probe=probe, axis=axis)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c.ok
    # every value is read a tile at a time into two reused 1 MiB float64 buffers (a quarter of
    # this tensor in float64; 0.02 copies once they exist), never copied whole: |flax - torch| in
    # float64 and block temporaries made it 3.1 copies, whole float64 copies of the flax, torch
    # (and probe) values 5.3 and 6.3, the masked copies of the general path 9.9 either way
    assert peak <= 0.5 * REF.nbytes, peak / REF.nbytes


@pytest.mark.parametrize("shape", [(2048, 512), ()], ids=["matrix", "scalar"])  # a loss is 0-d
def test_the_finite_path_gives_the_masked_paths_numbers(shape):
    a, e = FLAX.astype(np.float64), TORCH.astype(np.float64)
    e[3, :7] = 0.0  # zeros in torch's values: their relative error is inf or 0
    a[3, :3] = 0.0
    if not shape:
        a, e = np.asarray(a[0, 0]), np.asarray(e[0, 0])
    lean, full = j._finite_statistics(a, e), j._masked_statistics(a, e)
    assert lean.made_diff is None or not shape  # |a - b| is not made until something reads it whole
    np.testing.assert_array_equal(lean.diff, full.diff)
    assert (lean.max_abs, lean.max_rel, lean.nonfinite, lean.note) == (full.max_abs, full.max_rel, full.nonfinite,
                                                                       full.note)
    assert not lean.any_one_sided() and not full.any_one_sided()
    assert not lean.agree_inf.any() and not lean.nan_both.any()
    # the norms: sums of squares per row, then of the rows, against one dot product of the whole
    # array: the same numbers but for summation order (1e-14 apart at 1M elements, the per-row
    # sums nearer the exact sum; the verdicts' bounds are 1e-6 and wider)
    assert lean.ref_norm == pytest.approx(full.ref_norm, rel=1e-12)
    assert lean.rel_norm == pytest.approx(full.rel_norm, rel=1e-12)


@pytest.mark.parametrize("shape,axis", [((6, 5, 4), 0), ((6, 5, 4), 1), ((6, 5, 4), 2), ((30,), None),
                                        ((1, 8), 0)])
def test_the_worst_element_of_a_slice_is_found_without_a_mask(shape, axis):
    diff = np.round(RNG.random(shape) * 4)  # ties: the first in C order wins, as argmax finds it
    rows = diff.shape[axis] if axis is not None and diff.ndim > 1 else 1
    for row in range(rows):
        mask = np.zeros(shape, dtype=bool)
        if axis is None or diff.ndim < 2:
            mask[...] = True
        else:
            mask[(slice(None),) * axis + (row,)] = True
        want = np.unravel_index(int(np.argmax(np.where(mask, diff, -1.0))), shape)
        assert j._worst_in_slice(diff, axis, row) == tuple(int(i) for i in want)


def test_the_twins_own_noise_is_judged_a_block_at_a_time(monkeypatch):
    """The per-slice norms (the twin's own-noise run's difference among them) are taken a block of
    rows at a time: the own values are never copied whole into float64, nor their difference and
    its square (6.3 copies before, at GPT-2-medium's embedding gradient 2.5 GB; 3.4 with blocks
    and a whole |flax - torch|; tiles into reused buffers now)."""
    monkeypatch.setattr(_blockwise, "BLOCK", 1 << 14)  # blocks far smaller than the tensor, as at full size
    own32 = (REF * (1 + 1e-7 * RNG.standard_normal(REF.shape))).astype(np.float32)
    own64 = REF * (1 + 1e-13 * RNG.standard_normal(REF.shape))
    tracemalloc.start()
    try:
        c = j.judge("grad", FLAX, TORCH, RULE, reference=REF, probe=TORCH, flax_probe=own32, flax_reference=own64,
                    axis=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert c.ok
    assert peak <= 0.5 * REF.nbytes, peak / REF.nbytes


@pytest.mark.parametrize("axis", [0, 1, None])
def test_blockwise_norms_give_the_whole_arrays_numbers(monkeypatch, axis):
    """The same verdict a block at a time as in one piece. Slices along the blocked (leading) axis
    are whole in each block: the same bits. Slices across it add one partial sum per block: the
    same numbers to rounding."""
    own32, own64 = TORCH[::-1].copy(), REF[::-1].copy()
    kw = dict(reference=REF, probe=TORCH, flax_probe=own32, flax_reference=own64, axis=axis)
    whole = j.judge("grad", FLAX, TORCH, RULE, **kw)
    monkeypatch.setattr(_blockwise, "BLOCK", 1000)  # blocks that do not divide the rows evenly
    blocked = j.judge("grad", FLAX, TORCH, RULE, **kw)
    if axis == 0:
        assert blocked == whole
    else:
        assert (blocked.ok, blocked.mismatches, blocked.worst_index) == (whole.ok, whole.mismatches, whole.worst_index)
        assert blocked.score == pytest.approx(whole.score, rel=1e-12)
    strided = np.moveaxis(REF.reshape(64, 32, 512), 2, 0)  # a channels-last view: slices along axis 0
    np.testing.assert_allclose(j._slice_norms(strided, 0, strided * 0.5),
                               np.linalg.norm((strided - strided * 0.5).reshape(512, -1), axis=1), rtol=1e-13)


@pytest.mark.parametrize("axis", [0, 1, None])
def test_torch_as_its_own_reference_reuses_the_difference_with_the_same_numbers(axis):
    # rows and float64 checks judge against torch's own value: |flax - torch| is at hand, and the
    # noise numbers must be those of the general path (a copy of torch's value as the reference)
    torch64, flax64 = TORCH.astype(np.float64), FLAX.astype(np.float64)
    flax64[5, 7] += 1e-3  # one slice out, so the worst slice and its note are read too
    rule = j.measured(tolerance_for("float64", REFERENCE), "float64", probe_dtype="float32")
    same = j.judge("x", flax64, torch64, rule, reference=torch64, probe=REF, axis=axis)
    apart = j.judge("x", flax64, torch64, rule, reference=torch64.copy(), probe=REF, axis=axis)
    assert not same.ok
    assert same == apart
