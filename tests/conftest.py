"""Shared pytest configuration: hypothesis profiles, the poison-leak guard, and the
ACN_REQUIRE_BACKENDS check.

HYPOTHESIS_PROFILE=ci (the default in the README's test script) runs tens of examples per
property with no deadline, so a slow runner cannot flake; "dev" runs more.

ACN_REQUIRE_BACKENDS=cpu,triton (comma-separated; scripts/test.sh sets it per pytest process)
fails the session unless every named backend can run here and at least one test parametrised
with it (a ``backend`` parameter, see testing.params) passed: a backend that silently stopped
running would otherwise leave only skips behind.
"""

from __future__ import annotations

import collections
import os

import pytest
from hypothesis import HealthCheck, settings
from testing import required_backend_problems

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REQUIRED = [b.strip() for b in os.environ.get("ACN_REQUIRE_BACKENDS", "").split(",") if b.strip()]
_backend_of: dict[str, str] = {}
_passed: collections.Counter[str] = collections.Counter()
_problems: list[str] = []


@pytest.fixture(autouse=True)
def _no_poison_leak():
    """A test that leaves the poison hook on would make every later kernel's output NaN."""
    yield
    from acn_kernels import _testing

    assert not _testing.POISON, "the test left acn_kernels._testing.POISON set"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "backend" in callspec.params:
            _backend_of[item.nodeid] = callspec.params["backend"]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and report.nodeid in _backend_of:
        _passed[_backend_of[report.nodeid]] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REQUIRED:
        return
    import acn_kernels

    _problems.extend(required_backend_problems(REQUIRED, acn_kernels.backends(), _passed))
    if _problems and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    """(Runs after pytest_sessionfinish, inside the terminal reporter's.)"""
    if REQUIRED:
        counts = ", ".join(f"{b}: {_passed[b]} passed" for b in REQUIRED)
        terminalreporter.write_line(f"ACN_REQUIRE_BACKENDS={','.join(REQUIRED)}: {counts}")
        for p in _problems:
            terminalreporter.write_line(f"ACN_REQUIRE_BACKENDS: {p}", red=True)
