"""The GPU check of acn-kernels (scripts/gpu_check.sh runs this file): build, tests, sanitizer and
benchmarks on a machine with an NVIDIA GPU, offline, each stage inside its time budget.

    python scripts/gpu_check.py build|test|sanitize|bench|all OUTDIR
    python scripts/gpu_check.py wheels DIR        (on a machine with a package index: fill DIR)
    python scripts/gpu_check.py run RESULTS STAGE ITEM SECONDS LOG -- COMMAND ...
    python scripts/gpu_check.py row RESULTS STAGE ITEM RESULT [NUMBERS]
    python scripts/gpu_check.py junit RESULTS STAGE ITEM JUNIT_XML

A stage stops at its budget (:data:`BUDGETS`, seconds; ``ACN_GPU_CHECK_BUDGETS=test=200,bench=90``
changes them): each command in it runs under what is left, is interrupted (SIGINT, so pytest
still writes its counts) ``grace`` seconds before the end and killed at the end, and a command
that no longer fits is recorded as skipped. OUTDIR/results.md gets one row per item (what ran,
its result and time, what was skipped and why) and one per stage (its time against its budget);
OUTDIR keeps at most six files (results.md, bench.md, the benchmark JSON, logs.tar.gz with every
log and junit file), because a device call returns at most eight.

Stages, with the default budgets (``all``: six minutes in all on a fresh H100/H200):
  build     115 s  `setup.py build_ext --inplace` for the visible GPU's architecture only
                   (TORCH_CUDA_ARCH_LIST, e.g. 9.0), skipped when _C has CUDA and is newer than
                   every source
  test      115 s  the opt-in large tests first (ACN_TEST_FILL_GPU=1, ACN_TEST_HUGE=1: sizes that
                   fill the GPU, a float16 bank above 2^31 elements) with tests/test_cuda.py, then
                   every test marked cuda or triton (the GPU parameters of every op suite)
  sanitize   55 s  compute-sanitizer memcheck, then racecheck, on tests/sanitize_driver.py
  bench      55 s  the six fixed points of tests/benchmarks (ACN_BENCH_GRID=fixed) against the
                   torch peers, torch.compile and pykeops last in their own pass; tables and floors by
                   scripts/bench_report.py, and the faster GPU backend per op
Without a visible CUDA device every stage is recorded as skipped, at once.

Missing Python packages come as wheels (the GPU image has no package index): ``wheels DIR``
downloads :data:`WHEELS` into DIR (default .whl, ignored by git); a stage installs from
ROOT/.whl (or ACN_WHEELS) only the ones whose module does not import, with --no-index, into a
folder on the children's PYTHONPATH. The device call (see the header of scripts/gpu_check.sh)
carries .whl.

Only the standard library is imported here; torch is probed in child processes.
tests/test_scripts.py runs this file as a program.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| stage | item | result | numbers |\n| --- | --- | --- | --- |\n"
STAGES = ("build", "test", "sanitize", "bench")
BUDGETS = {"build": 115, "test": 115, "sanitize": 55, "bench": 55}
GRACE = 10.0
"""Seconds between the interrupt (SIGINT) and the kill (SIGKILL) of a command at its budget."""
WHEELS = {
    # requirement: the module it provides. Pure Python; the GPU image has most of them (its own
    # versions win). scikit-learn, faiss and mlxtend are compiled or pull compiled packages: the
    # tests that import a missing one are left out and recorded.
    "hypothesis==6.155.7": "hypothesis",
    "sortedcontainers==2.4.0": "sortedcontainers",
    "pytest-timeout==2.4.0": "pytest_timeout",
    "keopscore==2.3": "keopscore",
    "pykeops==2.3": "pykeops",  # sdist only: built into a pure-Python wheel by `wheels`
}
OPTIONAL_MODULES = ("faiss", "sklearn", "mlxtend", "hypothesis", "pytest_benchmark", "pytest_timeout", "xdist",
                    "matplotlib", "tqdm")


# ---------------------------------------------------------------------------------------------
# The results table


def append_row(results: str | os.PathLike, stage: str, item: str, result: str, numbers: str = "") -> str:
    """Append one row to the markdown results table (created with its header if missing)."""
    path = Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = [" ".join(str(c).replace("|", "/").split()) for c in (stage, item, result, numbers)]
    line = "| " + " | ".join(cells) + " |\n"
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a") as f:
        if new:
            f.write(HEADER)
        f.write(line)
    print(line, end="", flush=True)
    return line


def junit_counts(xml_path: str | os.PathLike) -> dict[str, object]:
    """passed / failed / errors / skipped and the first failing test ids of a pytest junit XML."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        skip = case.find("skipped")
        if skip is not None:
            why = " ".join(skip.get("message", "").split())[:120]
            reasons[why] = reasons.get(why, 0) + 1
    return {
        "passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"],
        "failed": c["failures"],
        "errors": c["errors"],
        "skipped": c["skipped"],
        "failing": failing,
        "skip_reasons": sorted(reasons.items(), key=lambda kv: -kv[1]),
    }


def junit_row(results: str, stage: str, item: str, xml_path: str, timed_out: bool = False) -> int:
    """Row with the counts of a pytest run; returns 1 if anything failed or errored."""
    if not Path(xml_path).exists():
        append_row(results, stage, item, "timeout" if timed_out else "no result",
                   f"{Path(xml_path).name} missing (pytest crashed or was killed)")
        return 1
    c = junit_counts(xml_path)
    bad = c["failed"] + c["errors"]
    numbers = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
    if c["failing"]:
        numbers += "; first failing: " + ", ".join(c["failing"][:8])
    if c["skip_reasons"]:
        numbers += "; skipped: " + "; ".join(f"{why} ({k})" for why, k in c["skip_reasons"][:4])
    result = "FAIL" if bad else "pass"
    if timed_out:
        result += ", stopped at budget"
        numbers += " (the rest not reached)"
    append_row(results, stage, item, result, numbers)
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# Commands under a budget


def run_budgeted(cmd: list[str], log: Path, seconds: float, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> tuple[int, float, bool]:
    """Run ``cmd`` (output to ``log``) for at most ``seconds``: SIGINT ``grace`` seconds before the
    end (pytest then writes its junit and benchmark files), SIGKILL to its whole process group at
    the end. Returns (exit status, seconds taken, whether it was stopped)."""
    grace = min(GRACE, seconds / 4)
    t0 = time.monotonic()
    with log.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        # SIGINT back to its default in the child: a shell's background job inherits it ignored,
        # and Python would then never raise KeyboardInterrupt.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        stopped = False
        try:
            proc.wait(timeout=max(seconds - grace, 0.1))
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGINT)  # the leader only: pytest-xdist's controller stops its workers
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:  # what the command left running in its process group (pytest-xdist workers, say)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, time.monotonic() - t0, stopped


class Stage:
    """One stage: its budget, its rows, and its commands run under what is left of the budget."""

    MIN_SECONDS = 5.0
    """A command is not started with less than this left."""

    def __init__(self, name: str, out: Path, work: Path, budget: float, env: dict[str, str]):
        self.name, self.results, self.work, self.budget, self.env = name, out / "results.md", work, budget, env
        self.t0 = time.monotonic()
        self.status = 0

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def row(self, item: str, result: str, numbers: str = "") -> None:
        append_row(self.results, self.name, item, result, numbers)

    def run(self, item: str, cmd: list[str], log: str, *, limit: float = math.inf,
            env: dict[str, str] | None = None) -> tuple[int, float, bool] | None:
        """``cmd`` under min(limit, what is left); None (and a 'skipped' row) if too little is left."""
        seconds = min(limit, self.left())
        if seconds < self.MIN_SECONDS:
            self.row(item, "skipped", f"the stage's budget is spent ({self.budget:.0f} s)")
            return None
        return run_budgeted(cmd, self.work / log, seconds, env={**self.env, **(env or {})})

    def finish(self) -> int:
        took = time.monotonic() - self.t0
        self.row("stage time", "FAIL" if self.status else "done", f"{took:.0f} s of a {self.budget:.0f} s budget")
        return self.status


# ---------------------------------------------------------------------------------------------
# The machine


def probe(py: str, env: dict[str, str]) -> dict[str, object]:
    """What the child Python sees: versions, the GPU, _C, and which optional modules import."""
    code = f"""
import importlib.util, json, sys
info = {{"python": sys.version.split()[0], "modules": {{}}}}
for m in {OPTIONAL_MODULES!r}:
    info["modules"][m] = importlib.util.find_spec(m) is not None
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda_version"] = torch.version.cuda
    info["gpu"] = torch.cuda.is_available()
    if info["gpu"]:
        info["gpu_name"] = torch.cuda.get_device_name()
        info["arch"] = "%d.%d" % torch.cuda.get_device_capability()
except Exception as e:
    info["torch_error"] = repr(e)
    info["gpu"] = False
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = "absent (%s)" % type(e).__name__
try:
    import acn_kernels._C as C
    info["ext_cuda"] = bool(C.built_with_cuda())
except Exception as e:
    info["ext_cuda"] = None
print(json.dumps(info))
"""
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if out.returncode != 0:
        return {"gpu": False, "torch_error": out.stderr.strip().splitlines()[-1:] or ["python failed"],
                "modules": {}}
    return json.loads(out.stdout.strip().splitlines()[-1])


def install_wheels(py: str, env: dict[str, str], results: Path, site: Path) -> None:
    """Install, offline, the wheels of ROOT/.whl (or ACN_WHEELS) whose module does not import."""
    folder = Path(os.environ.get("ACN_WHEELS", ROOT / ".whl"))
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        append_row(results, "env", "wheels", "none", f"no wheels in {folder} (the image's packages only)")
        return
    by_dist = {req.split("==")[0].replace("-", "_").lower(): mod for req, mod in WHEELS.items()}
    wanted, there = [], []
    for w in wheels:
        mod = by_dist.get(w.name.split("-")[0].lower())
        found = mod and subprocess.run([py, "-c", f"import {mod}"], env=env, capture_output=True).returncode == 0
        (there if found else wanted).append(w)
    if wanted:
        cmd = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", str(site), *map(str, wanted)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        result = "installed" if out.returncode == 0 else "FAIL"
        numbers = ", ".join(w.name for w in wanted) + ("" if out.returncode == 0 else f": {out.stderr[-300:]}")
        append_row(results, "env", "wheels", result, numbers)
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{site}"
    if there:
        append_row(results, "env", "wheels", "already there", ", ".join(w.name for w in there))


def download_wheels(folder: Path) -> int:
    """Fill ``folder`` with :data:`WHEELS` for CPython 3.12 on x86-64 Linux (the GPU image's)."""
    folder.mkdir(parents=True, exist_ok=True)
    plat = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]
    rc = 0
    for req in WHEELS:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(folder), req]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            print(f"{req}: no binary wheel; building one from the sdist (pure Python)")
            rc |= subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder),
                                  req]).returncode
    for w in sorted(folder.glob("*.whl")):
        print(w.name)
    return rc


# ---------------------------------------------------------------------------------------------
# Stages


def stage_build(st: Stage, info: dict, py: str) -> int:
    so = sorted(ROOT.glob("acn_kernels/_C*.so"))
    sources = [p for p in [*ROOT.glob("csrc/**/*"), ROOT / "setup.py"] if p.is_file()]
    if so and info.get("ext_cuda") and all(p.stat().st_mtime <= so[0].stat().st_mtime for p in sources):
        st.row("_C", "up to date", f"{so[0].name} has CUDA and is newer than csrc/ and setup.py")
        return 0
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or str(info.get("arch", "9.0"))
    env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    res = st.run("_C (CUDA)", [py, "setup.py", "build_ext", "--inplace"], "build.log", env=env)
    if res is None:
        return 1
    rc, took, stopped = res
    if rc == 0:
        info.update(probe(py, st.env))  # the later stages see the new _C
    if rc == 0 and info.get("ext_cuda"):
        st.row("_C (CUDA)", "pass", f"{took:.0f} s, TORCH_CUDA_ARCH_LIST={arch}")
        return 0
    first = next((ln for ln in (st.work / "build.log").read_text(errors="replace").splitlines()
                  if "error" in ln.lower()), "")
    st.row("_C (CUDA)", "timeout" if stopped else "FAIL", f"rc={rc} after {took:.0f} s; {first[:200]}")
    return 1


def pytest_args(info: dict) -> tuple[list[str], list[str]]:
    """Common pytest arguments, and rows' text on test files left out for missing modules."""
    mods = info.get("modules", {})
    args = ["-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rfE"]
    if mods.get("pytest_benchmark"):
        args.append("--benchmark-disable")
    if mods.get("pytest_timeout"):
        args.append("--timeout=60")  # one hung test must not take the stage
    missing = [m for m, ok in mods.items() if not ok]
    ignored = []
    for f in sorted(ROOT.glob("tests/test_*.py")):
        text = f.read_text()
        if any(re.search(rf"^(import|from) {m}\b", text, re.M) for m in missing):  # module-level imports
            ignored.append(f"tests/{f.name}")
    args += [f"--ignore={f}" for f in ignored]
    return args, [f"missing: {', '.join(missing) or 'none'}; left out: {', '.join(ignored) or 'none'}"]


def stage_test(st: Stage, info: dict, py: str) -> int:
    mods = info.get("modules", {})
    if not mods.get("hypothesis"):
        st.row("pytest", "skipped", "hypothesis is not installed (tests/conftest.py needs it); carry .whl")
        return 1
    args, why = pytest_args(info)
    st.row("absent modules", "info", why[0])
    status = 0
    large = ["tests/test_cuda.py", "tests/test_masked_topk.py", "tests/test_mixture.py"]
    res = st.run("large sizes", [py, *args, "--junitxml", str(st.work / "junit_large.xml"), *large,
                                 "-k", "(fill_gpu or 2_pow_31 or test_cuda) and not torch-cuda"],
                 "pytest_large.log", limit=45, env={"ACN_TEST_FILL_GPU": "1", "ACN_TEST_HUGE": "1"})
    if res is not None:
        status |= junit_row(str(st.results), st.name, f"large sizes + test_cuda.py ({res[1]:.0f} s)",
                            str(st.work / "junit_large.xml"), res[2])
    par = ["-n", "6"] if mods.get("xdist") else []  # Triton compiles on the CPUs, in parallel
    files = [f"tests/{p.name}" for p in sorted(ROOT.glob("tests/test_*.py")) if p.name != "test_cuda_sass.py"]
    xml = st.work / "junit_gpu.xml"
    res = st.run("cuda + triton", [py, *args, *par, "--junitxml", str(xml), "-m", "cuda or triton", *files],
                 "pytest_gpu.log")
    if res is not None:
        status |= junit_row(str(st.results), st.name,
                            f"-m 'cuda or triton' ({res[1]:.0f} s; test_cuda_sass.py left to CI)", str(xml), res[2])
        if xml.is_file():
            # (ACN_REQUIRE_BACKENDS cannot see the tests under pytest-xdist: counted here instead.)
            passed = backend_passes(xml)
            none = [b for b, n in passed.items() if n == 0]
            st.row("GPU parameters passed", "FAIL" if none and not res[2] else "info",
                   ", ".join(f"{b}-cuda: {n}" for b, n in passed.items()))
            status |= bool(none and not res[2])
    return status


def backend_passes(xml_path: Path) -> dict[str, int]:
    """Passed tests of a junit file whose parameters run backend "cuda" or "triton" on a GPU
    (ids ``[...cuda-cuda...]``, ``[...triton-cuda...]``, testing.params)."""
    counts = {"cuda": 0, "triton": 0}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        if any(case.find(t) is not None for t in ("failure", "error", "skipped")):
            continue
        for b in counts:
            counts[b] += f"{b}-cuda" in case.get("name", "")
    return counts


def find_sanitizer() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for c in (shutil.which("compute-sanitizer"), f"{cuda_home}/bin/compute-sanitizer",
              "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if c and os.access(c, os.X_OK):
            return c
    return None


def stage_sanitize(st: Stage, info: dict, py: str) -> int:
    cs = find_sanitizer()
    if cs is None:
        st.row("compute-sanitizer", "skipped", "not found (PATH, CUDA_HOME/bin, /usr/local/cuda)")
        return 0
    status = 0
    for tool, limit in (("memcheck", 27), ("racecheck", math.inf)):
        log = f"sanitize_{tool}.log"
        res = st.run(tool, [cs, "--tool", tool, py, "tests/sanitize_driver.py", "--device", "cuda"], log,
                     limit=limit, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        if res is None:
            continue
        rc, took, stopped = res
        text = (st.work / log).read_text(errors="replace")
        summary = next((ln for ln in text.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln), "")
        clean = summary and (" 0 errors" in summary or " 0 hazards" in summary) and "driver: 0 mismatches" in text
        if stopped:
            st.row(tool, "timeout", f"stopped after {took:.0f} s; log {log}")
        elif clean:
            st.row(tool, "pass", f"{summary.strip()}; {took:.0f} s")
        elif not summary:
            first = next((ln for ln in text.splitlines() if any(w in ln.lower() for w in
                                                                ("error", "not supported", "unable"))), "")
            st.row(tool, "not run", f"rc={rc}: {first[:200]}")
        else:
            st.row(tool, "FAIL", f"{summary.strip()}; {text.count('MISMATCH')} mismatches; rc={rc}; log {log}")
            status = 1
    return status


def stage_bench(st: Stage, info: dict, py: str, out: Path) -> int:
    if not info.get("modules", {}).get("pytest_benchmark"):
        st.row("pytest-benchmark", "skipped", "pytest-benchmark is not installed")
        return 0
    base = [py, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rfEs", "--benchmark-enable",
            "tests/benchmarks/bench_masked_topk.py::test_masked_topk",
            "tests/benchmarks/bench_mixture.py::test_mixture"]
    env = {"ACN_BENCH_DEVICE": "cuda", "ACN_BENCH_GRID": "fixed"}
    status = 0
    jsons = []
    # The peers that compile on first use (torch.compile; pykeops with nvrtc) go last, in their own
    # pass. The GPU cases' ids end in "-cuda" (the CPU grid is collected and skipped on a GPU).
    compiling = "(torch_compile or pykeops)"
    for item, sel, name, limit in (("six fixed points", f"cuda and not {compiling}", "bench.json", st.left() - 15),
                                   ("compiling peers", f"cuda and {compiling}", "bench_compile.json", math.inf)):
        res = st.run(item, [*base, "-k", sel, f"--benchmark-json={out / name}",
                            "--junitxml", str(st.work / name.replace(".json", ".xml"))],
                     "bench.log", limit=limit, env=env)
        if res is None:
            continue
        status |= junit_row(str(st.results), st.name, f"{item} ({res[1]:.0f} s)",
                            str(st.work / name.replace(".json", ".xml")), res[2])
        if (out / name).is_file() and (out / name).stat().st_size:
            jsons.append(str(out / name))
    if not jsons:
        return status
    report = subprocess.run([py, str(ROOT / "scripts/bench_report.py"), *jsons], capture_output=True, text=True)
    (out / "bench.md").write_text(report.stdout + report.stderr)
    print(report.stdout, flush=True)
    st.row("ratio tables", "info", "bench.md (scripts/bench_report.py: medians, ratios, distance to each floor)")
    winners = subprocess.run([py, str(ROOT / "scripts/bench_report.py"), "--winners", *jsons], capture_output=True,
                             text=True)
    for line in winners.stdout.splitlines() or ["no point timed both GPU backends"]:
        st.row("fastest GPU backend (for dispatch.GPU_DEFAULT)", "info", line)
    return status


def budgets() -> dict[str, float]:
    out = dict(BUDGETS)
    for part in filter(None, os.environ.get("ACN_GPU_CHECK_BUDGETS", "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in out:
            raise SystemExit(f"ACN_GPU_CHECK_BUDGETS: unknown stage {key!r} (one of {', '.join(STAGES)})")
        out[key.strip()] = float(value)
    return out


def check(stage: str, out: Path) -> int:
    """Run ``stage`` (or ``all``) into ``out``; returns 1 if anything failed."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.md"
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    py = sys.executable
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci"), "TRITON_INTERPRET": "0",
           "PYTHONPATH": f"{ROOT}{os.pathsep + os.environ['PYTHONPATH'] if os.environ.get('PYTHONPATH') else ''}"}
    env.pop("ACN_KERNELS_BACKEND", None)
    todo = STAGES if stage == "all" else (stage,)
    limits = budgets()
    t0 = time.monotonic()
    status = 0
    try:
        install_wheels(py, env, results, work / "site")
        info = probe(py, env)
        append_row(results, "env", "stack", "info",
                   f"Python {info.get('python', '?')}; torch {info.get('torch', info.get('torch_error'))} "
                   f"(CUDA {info.get('cuda_version')}); triton {info.get('triton', '?')}; "
                   f"{info.get('gpu_name', 'no GPU')} (sm {info.get('arch', '-')})")
        if not info.get("gpu"):
            for name in todo:
                append_row(results, name, "stage", "skipped", "no CUDA device is visible to torch")
            return 0
        built = "build" in todo or bool(info.get("ext_cuda"))
        for name in todo:
            st = Stage(name, out, work, limits[name], env)
            if name != "build" and not built:
                st.row("stage", "skipped", "no CUDA build of _C (the build stage failed or did not run)")
                continue
            if name == "build":
                st.status = stage_build(st, info, py)
                built = st.status == 0
            elif name == "test":
                st.status = stage_test(st, info, py)
            elif name == "sanitize":
                st.status = stage_sanitize(st, info, py)
            else:
                st.status = stage_bench(st, info, py, out)
            status |= st.finish()
        return status
    finally:
        append_row(results, stage, "total", "FAIL" if status else "done",
                   f"{time.monotonic() - t0:.0f} s; logs and junit files in logs.tar.gz")
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(work.glob("*")):
                if p.is_file():
                    tar.add(p, arcname=p.name)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in (*STAGES, "all"):
        sub.add_parser(name).add_argument("out")
    sub.add_parser("wheels").add_argument("dir", nargs="?", default=str(ROOT / ".whl"))
    r = sub.add_parser("row")
    for name in ("results", "stage", "item", "result"):
        r.add_argument(name)
    r.add_argument("numbers", nargs="?", default="")
    j = sub.add_parser("junit")
    for name in ("results", "stage", "item", "xml"):
        j.add_argument(name)
    b = sub.add_parser("run")
    for name in ("results", "stage", "item", "seconds", "log"):
        b.add_argument(name)
    b.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.cmd == "row":
        append_row(a.results, a.stage, a.item, a.result, a.numbers)
        return 0
    if a.cmd == "junit":
        return junit_row(a.results, a.stage, a.item, a.xml)
    if a.cmd == "wheels":
        return download_wheels(Path(a.dir))
    if a.cmd == "run":
        cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
        rc, took, stopped = run_budgeted(cmd, Path(a.log), float(a.seconds))
        append_row(a.results, a.stage, a.item, "timeout" if stopped else ("pass" if rc == 0 else "FAIL"),
                   f"{'stopped at its budget after' if stopped else f'rc={rc},'} {took:.1f} s of {a.seconds} s")
        return 1 if stopped or rc else 0
    return check(a.cmd, Path(a.out).resolve())


if __name__ == "__main__":
    sys.exit(main())
