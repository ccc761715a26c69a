"""The tools around the suite: scripts/gpu_check.py and scripts/bench_report.py run as programs
(nothing under scripts/ is imported by the tests or the package), and tests/sanitize_driver.py,
the program scripts/gpu_check.sh runs under compute-sanitizer."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

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
    assert sanitize_driver.driver("cpu") == 18  # every masked_topk case: 6 shapes x 3 dtypes


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
# issue 11: the GPU check's budgets, its run without a GPU, the GPU benchmark report


def test_gpu_check_stops_a_command_at_its_budget(tmp_path):
    """A command that overruns its budget is interrupted, then killed if it ignores the interrupt,
    and recorded as a timeout with its time; one that ends in time is recorded with its status."""
    results, log = tmp_path / "results.md", tmp_path / "fake.log"
    ignores_sigint = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                      "print('started', flush=True); time.sleep(120)")
    t0 = time.monotonic()
    out = _script("gpu_check.py", "run", str(results), "fake", "sleeper", "3", str(log), "--",
                  sys.executable, "-c", ignores_sigint)
    took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    assert took < 60  # not the command's 120 s
    assert _script("gpu_check.py", "run", str(results), "fake", "quick", "30", str(log), "--",
                   sys.executable, "-c", "raise SystemExit(3)").returncode == 1
    assert _script("gpu_check.py", "run", str(results), "fake", "ok", "30", str(log), "--",
                   sys.executable, "-c", "pass").returncode == 0
    rows = results.read_text().splitlines()[2:]
    assert re.fullmatch(r"\| fake \| sleeper \| timeout \| stopped at its budget after [0-9.]+ s of 3 s \|", rows[0])
    assert float(rows[0].split("after ")[1].split(" s")[0]) < 3.5
    assert rows[1].startswith("| fake | quick | FAIL | rc=3,") and rows[2].startswith("| fake | ok | pass | rc=0,")
    assert "started" in log.read_text() and log.read_text().count("$ ") == 3  # each command and its output


def test_gpu_check_interrupted_pytest_still_reports(tmp_path):
    """A pytest run stopped at its budget (SIGINT first, even where the caller ignores SIGINT, as
    a shell's background job does) still writes its junit file: the counts of what ran."""
    (tmp_path / "test_fake.py").write_text("import time\n\ndef test_a():\n    pass\n\n"
                                           "def test_b():\n    time.sleep(300)\n")
    results, xml = tmp_path / "results.md", tmp_path / "j.xml"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "run", str(results), "fake", "pytest", "40",
           str(tmp_path / "log"), "--", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "--rootdir", str(tmp_path), "--junitxml", str(xml), str(tmp_path / "test_fake.py")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert out.returncode == 1, out.stderr
    assert "| fake | pytest | timeout | stopped at its budget after" in results.read_text()
    assert "KeyboardInterrupt" in (tmp_path / "log").read_text()
    assert _script("gpu_check.py", "junit", str(results), "fake", "counts", str(xml)).returncode == 0
    assert results.read_text().splitlines()[-1] == "| fake | counts | pass | 1 passed, 0 failed, 0 errors, 0 skipped |"


def test_gpu_check_rows_give_skip_reasons(tmp_path):
    """What was skipped and why: a junit file's skip messages, most frequent first."""
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuite tests="4" failures="0" errors="0" skipped="3">'
                   '<testcase name="a"><skipped message="no CUDA device is visible"/></testcase>'
                   '<testcase name="b"><skipped message="pykeops does not import"/></testcase>'
                   '<testcase name="c"><skipped message="no CUDA device is visible"/></testcase>'
                   '<testcase name="d"/></testsuite>')
    results = tmp_path / "results.md"
    assert _script("gpu_check.py", "junit", str(results), "bench", "points", str(xml)).returncode == 0
    assert results.read_text().splitlines()[-1] == (
        "| bench | points | pass | 1 passed, 0 failed, 0 errors, 3 skipped; skipped: no CUDA device is visible (2); "
        "pykeops does not import (1) |")


def test_gpu_check_all_without_a_gpu_skips_every_stage(tmp_path):
    """`gpu_check.sh all` where torch sees no CUDA device: every stage recorded as skipped with the
    reason, exit status 0, at most the eight files a device call returns."""
    out_dir = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "ACN_WHEELS": str(tmp_path / "none")}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "all", str(out_dir)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = (out_dir / "results.md").read_text().splitlines()
    for stage in ("build", "test", "sanitize", "bench"):
        assert f"| {stage} | stage | skipped | no CUDA device is visible to torch |" in rows
    assert any(r.startswith("| env | stack | info | Python ") for r in rows)
    assert rows[-1].startswith("| all | total | done |")
    assert len(list(out_dir.rglob("*"))) <= 8


def test_gpu_check_rejects_an_unknown_budget(tmp_path):
    env = {**os.environ, "ACN_GPU_CHECK_BUDGETS": "tests=10"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "all", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "unknown stage 'tests'" in out.stderr


def _gpu_bench(impl, median, group="masked_topk B=4096 cuda", op="masked_topk", floor=0.001):
    floors = {"device_name": "NVIDIA H200", "bf16_tflops": 790.0, "tf32_tflops": 400.0, "fp32_tflops": 50.0,
              "copy_gbs": 4300.0}
    return dict(group=group, name=f"test[{impl}]", params={}, stats={"median": median},
                extra_info={"impl": impl, "op": op, "floor_s": floor, "floor": "tf32 matmul", "floors": floors})


def test_bench_report_floors_and_gpu_winners(tmp_path):
    """GPU results: the measured floors once, each median over its group's floor, and per op the
    faster GPU backend (geometric mean over the points that timed both), from several files."""
    a = [_gpu_bench("acn_cuda", 0.002), _gpu_bench("acn_triton", 0.004), _gpu_bench("torch", 0.020),
         _gpu_bench("acn_cuda", 0.003, group="masked_topk B=128 cuda"),
         _gpu_bench("acn_triton", 0.002, group="masked_topk B=128 cuda")]
    b = [_gpu_bench("acn_cuda", 0.004, group="mixture cuda", op="mixture", floor=0.002),
         _gpu_bench("acn_triton", 0.003, group="mixture cuda", op="mixture", floor=0.002)]
    paths = []
    for name, benches in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps({"benchmarks": benches, "machine_info": {}, "datetime": "today"}))
        paths.append(str(tmp_path / name))
    out = _script("bench_report.py", *paths)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(ln.startswith("floors measured on NVIDIA H200") and "TF32 matmul 400 TFLOP/s" in ln for ln in lines)
    assert "floor 1.000 ms (tf32 matmul)" in lines
    assert "| acn_cuda | 2.000 | 1.00x | 2.00x |" in lines and "| torch | 20.000 | 10.00x | 20.00x |" in lines
    win = _script("bench_report.py", "--winners", *paths).stdout.splitlines()
    # masked_topk: triton / cuda = 2 and 2/3, geomean 1.15 -> cuda; mixture: 0.75 -> triton.
    assert win == ["masked_topk: cuda (faster at 1 of 2 points; geomean triton / cuda time 1.15x)",
                   "mixture: triton (faster at 1 of 1 points; geomean triton / cuda time 0.75x)"]
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
