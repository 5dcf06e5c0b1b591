"""pytest plugin (entry point pytest11): a ``parity`` fixture, ``--parity-*`` options, a marker.

    def test_my_port(parity):
        parity(MyTorchNet(), MyFlaxNet(), torch.randn(2, 3, 32, 32))

Keyword precedence: arguments of the call > ``@pytest.mark.parity(...)`` kwargs >
``--parity-dtype`` / ``--parity-device`` > parity.check's defaults. A failing (or INVALID) check
fails the test with the report table as the whole message, once (no traceback into the checker).
The warnings of every check (port hyperparameters, precision, pairings, all-zero gradients) are
printed under the verdict: in that message on failure, and on a pass in a "parity warnings"
section of the terminal summary and as the test's ``parity_warnings`` property (JUnit XML).
"""
from __future__ import annotations

from typing import Any

import pytest

_MARKER = "parity(**check_kwargs): a model-pair parity check; kwargs become defaults of the parity fixture"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "torch <-> Flax parity checks")
    group.addoption("--parity-dtype", default=None,
                    choices=("float32", "float64", "float16", "bfloat16"),
                    help="dtype for tests using the parity fixture (default: float32)")
    group.addoption("--parity-device", default=None, choices=("cpu", "cuda"),
                    help="device for tests using the parity fixture (default: cpu)")


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too so projects that only install the plugin get no unknown-marker warning.
    config.addinivalue_line("markers", _MARKER)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that use the fixture carry the marker, so `pytest -m parity` selects them all.
    for item in items:
        if "parity" in getattr(item, "fixturenames", ()) and item.get_closest_marker("parity") is None:
            item.add_marker(pytest.mark.parity)


class ParityFixture:
    """Callable fixture object: ``parity(torch_module, flax_module, example_input, **kw)``.

    Returns the Report when parity holds; otherwise fails the test with the report table.
    ``reports`` keeps every report of the test (e.g. to save JSON as a CI artifact).
    """

    def __init__(self, defaults: dict[str, Any], node: pytest.Item | None = None):
        self.defaults = defaults
        self.reports: list = []
        self.node = node

    def __call__(self, torch_module, flax_module, example_input, **kwargs):
        from parity.checker import check

        options = {**self.defaults, **kwargs}
        report = check(torch_module, flax_module, example_input, **options)
        self.reports.append(report)
        if not report.ok:
            # Failed here, outside any except block: raising from inside one printed the report
            # twice ("During handling of the above exception, another exception occurred").
            pytest.fail(str(report), pytrace=False)
        if report.warnings and self.node is not None:
            self.node.user_properties.append(("parity_warnings", "\n".join(report.warnings)))
            _PASSED_WARNINGS.append((self.node.nodeid, f"{report.model} [{report.dtype}, {report.mode}]",
                                     list(report.warnings)))
        return report


@pytest.fixture
def parity(request: pytest.FixtureRequest) -> ParityFixture:
    defaults: dict[str, Any] = {}
    dtype = request.config.getoption("--parity-dtype")
    device = request.config.getoption("--parity-device")
    if dtype:
        defaults["dtype"] = dtype
    if device:
        defaults["device"] = device
    marker = request.node.get_closest_marker("parity")
    if marker is not None:
        defaults.update(marker.kwargs)
    return ParityFixture(defaults, request.node)


# (test id, model, warnings) of passing checks, printed at the end of the session: a pass with
# a LayerNorm eps of 1e-6 against torch's 1e-5 must not go unseen.
_PASSED_WARNINGS: list[tuple[str, str, list[str]]] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _PASSED_WARNINGS:
        return
    terminalreporter.section("parity warnings")
    for nodeid, what, warns in _PASSED_WARNINGS:
        terminalreporter.write_line(f"{nodeid}: {what}: PASS with {len(warns)} warning(s)")
        for w in warns:
            terminalreporter.write_line(f"    warning: {w}")
    _PASSED_WARNINGS.clear()
