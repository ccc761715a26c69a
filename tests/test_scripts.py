"""The tools around the suite: scripts/gpu_check.py and scripts/bench_report.py run as programs
(nothing under scripts/ is imported by the tests or the package), and tests/sanitize_driver.py,
the program scripts/gpu_check.sh runs under compute-sanitizer."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import sanitize_driver
import torch
from testing import requires_ext

import acn_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=120)


def test_gpu_check_results_table_and_junit(tmp_path):
    """scripts/gpu_check.sh's table rows and pytest counts."""
    results = tmp_path / "out" / "results.md"
    assert _script("gpu_check.py", "row", str(results), "build", "_C", "pass", "12 s | log").returncode == 0
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
        '<testcase classname="t" name="a"><failure/></testcase><testcase classname="t" name="b"><error/>'
        "</testcase></testsuite></testsuites>"
    )
    assert _script("gpu_check.py", "junit", str(results), "test", "pytest", str(xml)).returncode == 1
    assert _script("gpu_check.py", "junit", str(results), "test", "again", str(tmp_path / "none.xml")).returncode == 1
    lines = results.read_text().splitlines()
    assert lines[0] == "| stage | item | result | numbers |"
    assert lines[2] == "| build | _C | pass | 12 s / log |"
    assert lines[3].startswith("| test | pytest | FAIL | 2 passed, 1 failed, 1 errors, 1 skipped")
    assert "t::a" in lines[3] and "t::b" in lines[3]
    assert lines[4].startswith("| test | again | no result |")


def test_bench_report_ratio_tables(tmp_path):
    """scripts/bench_report.py on pytest-benchmark JSON: one table per group, peers' medians as
    ratios to the first acn_* implementation."""
    bench = [dict(group="g", name="test_x[a]", params={}, extra_info={"impl": impl}, stats={"median": t})
             for impl, t in (("torch", 0.006), ("acn_cpu", 0.002), ("faiss", 0.001))]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": bench, "machine_info": {"cpu": {"brand_raw": "X", "count": 2}},
                                "datetime": "today"}))
    out = _script("bench_report.py", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("machine: X, 2 cores")
    assert "### g" in lines and "| faiss | 1.000 | 0.50x |" in lines and "| torch | 6.000 | 3.00x |" in lines


@requires_ext
def test_sanitize_driver_checks_the_cpu_kernels(monkeypatch):
    """On CPU tensors the driver runs every case on the "cpu" kernels without a mismatch, and
    reports one where a kernel is wrong."""
    assert sanitize_driver.driver("cpu") == 0
    real = acn_kernels.masked_topk

    def off_by_one_row(*args, **kwargs):
        d, i = real(*args, **kwargs)
        return acn_kernels.MaskedTopK(d, torch.where(i > 0, i - 1, i))

    monkeypatch.setattr(acn_kernels, "masked_topk", off_by_one_row)
    assert sanitize_driver.driver("cpu") == 15  # every masked_topk case: 5 shapes x 3 dtypes


def test_nothing_imports_scripts():
    """Nothing under scripts/ is imported by the tests or the package, by name or by file path."""
    names = "|".join(p.stem for p in (ROOT / "scripts").glob("*.py"))
    by_name = re.compile(rf"^\s*(from|import)\s+(scripts\b|({names})\b)", re.M)
    for path in [*ROOT.glob("acn_kernels/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        text = path.read_text()
        assert not by_name.search(text), path
        if path.name != "test_scripts.py" and "spec_from_file_location" in text:
            # Loading by file path is for the runnable examples under python/ only.
            assert not re.search(r"""["']scripts\b""", text), path


# ---------------------------------------------------------------------------------------------
# Issue 16: scripts/ci_cuda_check.sh keeps its cache (a venv whose Python it runs) only where no
# other user can write


def _private_dir(path: pathlib.Path) -> subprocess.CompletedProcess:
    """The script's private_dir function, run on its own (the script itself compiles with nvcc
    and installs a CUDA torch before it gets there)."""
    text = (ROOT / "scripts" / "ci_cuda_check.sh").read_text()
    fn = re.search(r"^private_dir\(\) \{\n.*?^\}\n", text, re.M | re.S)
    assert fn, "private_dir() not found in scripts/ci_cuda_check.sh"
    return subprocess.run(["bash", "-c", f'{fn.group(0)}\nprivate_dir "$1"', "sh", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_ci_cuda_cache_is_private(tmp_path):
    """A new cache folder is created 0700 and used; one that others can write, or one below a
    folder that others can write (and that is not sticky), is refused with a FAIL line. (The
    cache used to be a fixed path in the shared temporary folder.)"""
    tmp_path.chmod(0o700)
    fresh = _private_dir(tmp_path / "a" / "cache")
    assert fresh.returncode == 0 and fresh.stdout.strip() == str(tmp_path / "a" / "cache"), fresh.stderr
    assert (tmp_path / "a" / "cache").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = _private_dir(shared)
    assert out.returncode != 0 and "FAIL:" in out.stderr and "writable by it alone" in out.stderr
    out = _private_dir(shared / "cache")
    assert out.returncode != 0 and "can be written by others" in out.stderr
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename what is ours
    ok = _private_dir(shared / "cache2")
    assert ok.returncode == 0, ok.stderr
