"""The pytest plugin through pytester: the ``parity`` fixture, --parity-* options, the marker,
and a failure message that is the report table."""
from __future__ import annotations

import pytest

TEST_FILE = """
import numpy as np
import pytest
import planted

X = planted.block_input(np.random.default_rng(0))

def test_good(parity):
    report = parity(planted.make_torch_block(), planted.FlaxBlock(), X, input_layout="as_is")
    assert report.ok and report.dtype == "{dtype}" and parity.reports == [report]

@pytest.mark.parity(dtype="float64")
def test_bad(parity):
    parity(planted.make_torch_block(), planted.FlaxBlock(approximate=True), X, input_layout="as_is")

def test_nnx_twin(parity):
    assert parity(planted.make_torch_block(), planted.make_nnx_block(), X).ok

def test_not_parity():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, request):
    pytester.syspathinsert(str(request.path.parent))  # planted.py
    return pytester


def test_fixture_marker_and_failure_report(suite):
    suite.makepyfile(test_pairs=TEST_FILE.format(dtype="float32"))
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*parity TorchBlock [[]float64, eval[]]: FAIL*",
        "*first divergence: act (GELU*",
        "*act * GELU * FAIL fwd/bwd  <- first divergence*",
    ])
    assert "Traceback" not in result.stdout.str() and "checker.py" not in result.stdout.str()


def test_options_and_marker_selection(suite):
    suite.makepyfile(test_pairs=TEST_FILE.format(dtype="float64"))
    # -m parity selects the fixture users (test_good carries the marker implicitly); the
    # command-line dtype reaches the fixture, while test_bad's marker kwargs would win over it.
    result = suite.runpytest("-p", "no:cacheprovider", "-m", "parity", "--parity-dtype", "float64",
                             "--parity-device", "cpu", "-k", "good")
    result.assert_outcomes(passed=1, deselected=3)


def test_help_lists_the_options(suite):
    result = suite.runpytest("--help")
    result.stdout.fnmatch_lines(["*--parity-dtype*", "*--parity-device*"])
