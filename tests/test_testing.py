"""The suite's own machinery (tests/testing.py, tests/conftest.py): the backend x dtype matrix
comes from the capability table, unrunnable combinations are skipped with their reasons, the
result-relative tolerance fails where it should, and ACN_REQUIRE_BACKENDS fails a session in
which a required backend did not run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import testing
import torch
from testing import assert_close, known_bug, params, required_backend_problems, unsupported_params

from acn_kernels import dispatch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("op", dispatch.OPS)
def test_params_cover_the_capability_table(op):
    """Every (backend, device type, dtype) of the table is a parameter, CUDA float64 included;
    Triton ones carry the triton marker, GPU ones the cuda marker; a skipped one gives this
    process's reasons; the unsupported dtypes are the table's complement."""
    got = {p.values: p for p in params(op)}
    want = {(be, dev, dt) for be, cap in dispatch.CAPABILITIES.items() for dev in cap.devices for dt in cap.dtypes}
    assert set(got) == want and ("cuda", "cuda", torch.float64) in got
    for (be, dev, dt), p in got.items():
        names = [m.name for m in p.marks]
        assert ("triton" in names) == (be == "triton") and ("cuda" in names) == (dev == "cuda")
        reasons = testing.skip_reasons(be, op, dev, dt)
        skips = [m.kwargs["reason"] for m in p.marks if m.name == "skip"]
        assert skips == ([f"{be} on {dev}: {'; '.join(reasons)}"] if reasons else [])
    assert {p.values for p in unsupported_params()} == {
        (be, dt) for be, cap in dispatch.CAPABILITIES.items() for dt in testing.DTYPES if dt not in cap.dtypes}


@pytest.fixture
def a_known_bug(monkeypatch):
    """A KNOWN_BUGS entry for the machinery's tests (the table is empty while no bug is known)."""
    monkeypatch.setitem(testing.KNOWN_BUGS, "some-bug", "triton returns some wrong value")
    return "some-bug"


def test_params_restrict_and_mark_known_bugs(a_known_bug):
    ps = params("mixture", dtypes=[torch.float16], backends=["cpu", "triton"], devices=["cpu"],
                xfail={"triton": a_known_bug})
    assert [p.id for p in ps] == ["cpu-cpu-float16", "triton-cpu-float16"]
    xf = [m for m in ps[1].marks if m.name == "xfail"]
    assert len(xf) == 1 and xf[0].kwargs["strict"] and xf[0].kwargs["raises"] is AssertionError
    assert not any(m.name == "xfail" for m in ps[0].marks)
    pairs = testing.backend_params(include_torch=True)
    assert {p.values for p in pairs} == {(be, dev) for be, cap in dispatch.CAPABILITIES.items() for dev in cap.devices}
    assert "cpu-cpu" in [p.id for p in pairs] and "torch" not in {p.values[0] for p in testing.backend_params()}


def test_assert_close_is_relative_to_the_result():
    want = torch.tensor([[1e-8, 2e-8], [1e6, 3.0]], dtype=torch.float64)
    assert_close(want * (1 + 1e-6), want, rtol=2e-6)
    with pytest.raises(AssertionError, match="1 of 4 elements off"):
        assert_close(want + torch.tensor([[1e-12, 0], [0, 0]]), want, rtol=1e-5)  # 1e-4 of its row
    assert_close(want + torch.tensor([[0, 0], [0, 1.0]]), want, rtol=2e-6)  # 1e-6 of its row's 1e6
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, float("nan")]), rtol=1.0)
    assert_close(torch.tensor([float("nan"), -float("inf")]), torch.tensor([float("nan"), -float("inf")]), rtol=0)
    with pytest.raises(AssertionError, match="elements off"):
        assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-3]), rtol=1e-4,
                     scale=torch.tensor([1.0, 2.0]))


def test_known_bug_turns_only_its_backend_into_xfail(a_known_bug):
    with pytest.raises(pytest.xfail.Exception, match="some wrong value"):
        with known_bug("triton", {"triton": a_known_bug}):
            raise AssertionError("off")
    with pytest.raises(AssertionError, match="off"):
        with known_bug("cpu", {"triton": a_known_bug}):
            raise AssertionError("off")


def test_required_backend_problems():
    av = {"cpu": True, "cuda": False, "triton": True, "torch": True}
    assert required_backend_problems(["cpu", "triton"], av, {"cpu": 3, "triton": 1}) == []
    got = required_backend_problems(["cpu", "cuda", "gpu", "triton"], av, {"cpu": 3})
    assert len(got) == 3
    assert "backend 'cuda' is required but unavailable" in got[0] and "'gpu' is not a backend" in got[1]
    assert got[2] == "backend 'triton' is required but none of its parametrised tests passed"


def _pytest(required: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACN_REQUIRE_BACKENDS": required}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@testing.requires_ext
def test_require_backends_fails_a_session_without_them():
    """The session hook of tests/conftest.py: exit status 1 when no test of a required backend
    passed, although every test that ran passed; 0 when one did."""
    res = _pytest("cpu", "tests/test_cuda.py::test_cu_sources_include_no_torch_headers")
    assert res.returncode == 1, res.stdout[-2000:]
    assert "1 passed" in res.stdout and "backend 'cpu' is required but none of its parametrised tests passed" \
        in res.stdout
    res = _pytest("cpu,torch", "tests/test_mixture.py", "-k", "nan_in_nan_out and log_scales and cpu-float32")
    assert res.returncode == 0, res.stdout[-2000:]
    assert "\nACN_REQUIRE_BACKENDS=cpu,torch: cpu: 1 passed, torch: 1 passed\n" in res.stdout
