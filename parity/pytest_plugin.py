"""pytest plugin (entry point pytest11): a ``parity`` fixture, ``--parity-*`` options, a marker.

    def test_my_port(parity):
        parity(MyTorchNet(), MyFlaxNet(), torch.randn(2, 3, 32, 32))

Keyword precedence: arguments of the call > ``@pytest.mark.parity(...)`` kwargs >
``--parity-dtype`` / ``--parity-device`` > parity.check's defaults. A failing check fails the
test with the report table as the whole message (no traceback into the checker).
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

    def __init__(self, defaults: dict[str, Any]):
        self.defaults = defaults
        self.reports: list = []

    def __call__(self, torch_module, flax_module, example_input, **kwargs):
        from parity.checker import assert_parity

        options = {**self.defaults, **kwargs}
        try:
            report = assert_parity(torch_module, flax_module, example_input, **options)
        except AssertionError as exc:
            pytest.fail(str(exc).lstrip("\n"), pytrace=False)
        self.reports.append(report)
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
    return ParityFixture(defaults)
