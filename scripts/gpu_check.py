"""Python parts of scripts/gpu_check.sh: the results table, pytest summaries, the small-shape
driver run under compute-sanitizer, and the benchmark with its hardware floors.

    python scripts/gpu_check.py row RESULTS STAGE ITEM RESULT NUMBERS
    python scripts/gpu_check.py junit RESULTS STAGE ITEM JUNIT_XML
    python scripts/gpu_check.py env RESULTS
    python scripts/gpu_check.py driver [--device cuda]
    python scripts/gpu_check.py bench RESULTS [--device cuda] [--quick]

Only the standard library is imported at module level (``row`` and ``junit`` work without torch);
``driver`` and ``bench`` also run on CPU tensors (the cpu backend), which is how
tests/test_cuda.py smoke-tests them without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

HEADER = "| stage | item | result | numbers |\n| --- | --- | --- | --- |\n"


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
    print(line, end="")
    return line


def junit_counts(xml_path: str | os.PathLike) -> dict[str, object]:
    """passed / failed / errors / skipped and the first failing test ids of a pytest junit XML."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return {
        "passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"],
        "failed": c["failures"],
        "errors": c["errors"],
        "skipped": c["skipped"],
        "failing": failing,
    }


def junit_row(results: str, stage: str, item: str, xml_path: str) -> int:
    """Row with the counts of a pytest run; returns 1 if anything failed or errored."""
    if not Path(xml_path).exists():
        append_row(results, stage, item, "no result", f"{xml_path} missing (pytest crashed or timed out)")
        return 1
    c = junit_counts(xml_path)
    bad = c["failed"] + c["errors"]
    numbers = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
    if c["failing"]:
        numbers += "; first failing: " + ", ".join(c["failing"][:8])
    append_row(results, stage, item, "FAIL" if bad else "pass", numbers)
    return 1 if bad else 0


def env_rows(results: str) -> None:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report any import failure
        tv = f"absent ({type(exc).__name__})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    append_row(results, "env", "stack", "info",
               f"Python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
               f"triton {tv}; {gpu}")


# ---------------------------------------------------------------------------------------------
# Small-shape driver (for compute-sanitizer): every kernel path once, checked against the reference


def _mixture_cases(device: str, failures: list[str]) -> None:
    import torch

    from acn_kernels import reference

    ops = torch.ops.acn_kernels
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.float64):
        for b, d, m in [(5, 33, 3), (3, 1, 1), (2, 0, 2), (4, 16, 5)]:
            for with_code in (False, True):
                for per_dim in (False, True):
                    base = [torch.randn(b, d, generator=g, dtype=torch.float64)] + [
                        torch.randn(b, d, m, generator=g, dtype=torch.float64) for _ in range(3)]
                    base.append(torch.randn(b, d, generator=g, dtype=torch.float64))
                    z, lg, mu, ls, code = (t.to(dtype) for t in base)
                    c = code if with_code else None
                    dev = [t.to(device) for t in (z, lg, mu, ls)]
                    out, lse = ops.mixture_fwd(*dev, c.to(device) if with_code else None, per_dim)
                    grad = torch.ones(out.shape, dtype=out.dtype)
                    grads = ops.mixture_bwd(grad.to(device), *dev, c.to(device) if with_code else None,
                                            lse, per_dim)
                    up = [t.double().requires_grad_() for t in (z, lg, mu, ls, code)]
                    lp = reference.mixture_log_prob_per_dim(*up[:4])
                    if with_code:
                        e = up[0] - up[4]
                        lp = -0.5 * e * e - reference.HALF_LOG_2PI - lp
                    ref = lp if per_dim else lp.sum(-1)
                    ref_grads = torch.autograd.grad(ref.sum(), up, allow_unused=True)
                    atol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2}[dtype] * max(1, d)
                    name = f"mixture {dtype} B={b} D={d} M={m} code={with_code} per_dim={per_dim}"
                    if not torch.allclose(out.cpu().double(), ref.detach(), rtol=atol, atol=atol):
                        failures.append(name + ": forward")
                    want = list(ref_grads[:4]) + ([ref_grads[4]] if with_code else [])
                    for j, (got, exp) in enumerate(zip(grads, want, strict=False)):
                        exp = torch.zeros_like(up[j]) if exp is None else exp
                        if not torch.allclose(got.cpu().double(), exp, rtol=atol, atol=atol):
                            failures.append(f"{name}: gradient {j}")


def _topk_cases(device: str, failures: list[str]) -> None:
    import torch

    from acn_kernels import reference

    ops = torch.ops.acn_kernels
    g = torch.Generator().manual_seed(1)
    # One split; several splits and the merge kernel; k = MAX_K; D = 0 (all ties); a B that
    # leaves the last query group partly empty.
    shapes = [(3, 700, 7, 5), (1, 3000, 16, 300), (9, 1100, 20, 1024), (4, 50, 0, 3), (10, 5000, 5, 17)]
    for dtype in (torch.float32, torch.float16, torch.float64):
        for b, n, d, k in shapes:
            q = torch.randn(b, d, generator=g).to(dtype)
            bank = torch.randn(n, d, generator=g).to(dtype)
            if d:
                bank[3, 0] = math.nan
                q[0, -1] = math.inf if b > 1 else q[0, -1]
            mask = torch.rand(n, generator=g) < 0.3
            excl = torch.randint(-1, n, (b,), generator=g)
            dd, ii = ops.masked_topk(q.to(device), bank.to(device), k, mask.to(device), excl.to(device))
            rd, ri = reference.masked_topk(q, bank, k, mask, excl)
            name = f"topk {dtype} B={b} N={n} D={d} k={k}"
            dd, ii = dd.cpu(), ii.cpu()
            if not torch.equal(ii < 0, ri < 0):
                failures.append(name + ": padding")
                continue
            fin = ri >= 0
            scale = 1 + (rd[fin].abs().max().item() if fin.any() else 0)
            tol = 1e-9 if dtype == torch.float64 else 1e-4 * scale
            if fin.any() and (dd[fin].double() - rd[fin].double()).abs().max() > tol:
                failures.append(name + ": distances")
            if dtype == torch.float64 and not torch.equal(ii, ri):
                failures.append(name + ": indices")


def driver(device: str = "cuda") -> int:
    """Runs every kernel path once on small shapes and checks it; returns the number of failures."""
    import torch

    import acn_kernels  # noqa: F401  (loads _C)

    failures: list[str] = []
    _mixture_cases(device, failures)
    _topk_cases(device, failures)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    for f in failures:
        print("MISMATCH", f)
    print(f"driver: {len(failures)} mismatches on {device}")
    return len(failures)


# ---------------------------------------------------------------------------------------------
# Benchmark


def time_ms(fn: Callable[[], object], device: str, budget_s: float = 2.0, max_reps: int = 50) -> float:
    """Median wall time of fn in ms: CUDA events on a GPU, perf_counter on CPU. Two warm-up calls,
    then as many repetitions as fit in budget_s (at least one)."""
    import torch

    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if first < budget_s / 4:
        fn()
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-6))))
    samples = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def _copy_bandwidth(device: str, quick: bool) -> float:
    import torch

    x = torch.empty((1 << 20) if quick else (1 << 28), device=device)  # 1 GiB of float32 on a GPU
    y = torch.empty_like(x)
    t = time_ms(functools.partial(y.copy_, x), device)
    return 2 * x.numel() * 4 / (t * 1e-3) / 1e9


def _matmul_rate(device: str, quick: bool) -> float:
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = 256 if quick else 8192
        a = torch.randn(m, m, device=device)
        b = torch.randn(m, m, device=device)
        t = time_ms(functools.partial(torch.matmul, a, b), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * m**3 / (t * 1e-3) / 1e9


def floors(device: str, quick: bool) -> tuple[float, float]:
    """(device-to-device copy bandwidth in GB/s, fp32 matmul rate in GFLOP/s, full fp32: no TF32)."""
    return _copy_bandwidth(device, quick), _matmul_rate(device, quick)


def _mixture_step(params: list, backend: str) -> None:
    import torch

    import acn_kernels

    out = acn_kernels.mixture_log_prob(*params, backend=backend)
    torch.autograd.grad(out.sum(), params)


def _bench_mixture(results: str, device: str, shape: tuple[int, int, int], backends: list[str],
                   bw: float) -> None:
    import torch

    import acn_kernels

    b, d, m = shape
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(b, d, device=device, generator=g)
    params = [t.requires_grad_() for t in (z, *(torch.randn(b, d, m, device=device, generator=g)
                                                 for _ in range(3)))]
    # Bytes the fused forward must move: the inputs once, out [B] and the saved lse [B, D, 2].
    fwd_bytes = 4 * (b * d + 3 * b * d * m + b + 2 * b * d)
    base = None
    for be in backends:
        item = f"mixture B={b} D={d} M={m} fp32 {be}"
        try:
            t_f = time_ms(functools.partial(acn_kernels.mixture_log_prob, *params, backend=be), device)
            t_fb = time_ms(functools.partial(_mixture_step, params, be), device)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run is a row, not a crash
            append_row(results, "bench", item, "error", f"{type(exc).__name__}: {exc}"[:300])
            continue
        base = base or t_f
        gbs = fwd_bytes / (t_f * 1e-3) / 1e9
        append_row(results, "bench", item, "ok",
                   f"fwd {t_f:.4f} ms ({gbs:.0f} GB/s, {100 * gbs / bw:.0f}% of copy); "
                   f"fwd+bwd {t_fb:.4f} ms; fwd time / first backend's {t_f / base:.2f}x")


def _bench_topk(results: str, device: str, shape: tuple[int, int, int, int], backends: list[str],
                bw: float, flops: float) -> None:
    import torch

    import acn_kernels

    b, n, d, k = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, d, device=device, generator=g)
    bank = torch.randn(n, d, device=device, generator=g)
    mask = torch.rand(n, device=device, generator=g) < 0.1
    base = None
    for be in backends:
        item = f"masked_topk B={b} N={n} D={d} k={k} fp32 10% masked {be}"
        try:
            fn = functools.partial(acn_kernels.masked_topk, q, bank, k, exclude_mask=mask, backend=be)
            t = time_ms(fn, device, budget_s=3.0)
        except Exception as exc:  # noqa: BLE001
            append_row(results, "bench", item, "error", f"{type(exc).__name__}: {exc}"[:300])
            continue
        base = base or t
        rate = 2 * b * n * d / (t * 1e-3) / 1e9  # as the GEMM of the expanded form would count
        gbs = n * d * 4 / (t * 1e-3) / 1e9
        append_row(results, "bench", item, "ok",
                   f"{t:.3f} ms; {rate / 1e3:.2f} TFLOP/s-equivalent ({100 * rate / flops:.0f}% of fp32 "
                   f"matmul); bank read {gbs:.0f} GB/s ({100 * gbs / bw:.0f}% of copy); "
                   f"time / first backend's {t / base:.2f}x")


def bench(results: str, device: str = "cuda", quick: bool = False) -> None:
    """Rows for the floors, then both ops on every backend at sizes that fill a large GPU."""
    import torch

    bw, flops = floors(device, quick)
    append_row(results, "bench", "floor: device copy", "ok", f"{bw:.0f} GB/s (read + write)")
    append_row(results, "bench", "floor: fp32 matmul (no TF32)", "ok", f"{flops / 1e3:.1f} TFLOP/s")
    backends = ["cuda", "triton", "torch"] if device.startswith("cuda") else ["cpu", "torch"]
    mix_shapes = [(128, 16, 3)] if quick else [(128, 16, 3), (65536, 64, 8), (1 << 20, 16, 3)]
    for shape in mix_shapes:
        _bench_mixture(results, device, shape, backends, bw)
    topk_shapes = [(16, 5000, 16, 5)] if quick else [
        (128, 60_000, 16, 5), (1024, 2_000_000, 16, 5), (256, 1_000_000, 16, 1024),
        (1, 4_000_000, 16, 5), (4096, 200_000, 64, 132)]
    for shape in topk_shapes:
        _bench_topk(results, device, shape, backends, bw, flops)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("row")
    for name in ("results", "stage", "item", "result"):
        r.add_argument(name)
    r.add_argument("numbers", nargs="?", default="")
    j = sub.add_parser("junit")
    for name in ("results", "stage", "item", "xml"):
        j.add_argument(name)
    e = sub.add_parser("env")
    e.add_argument("results")
    d = sub.add_parser("driver")
    d.add_argument("--device", default="cuda")
    b = sub.add_parser("bench")
    b.add_argument("results")
    b.add_argument("--device", default="cuda")
    b.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "row":
        append_row(a.results, a.stage, a.item, a.result, a.numbers)
        return 0
    if a.cmd == "junit":
        return junit_row(a.results, a.stage, a.item, a.xml)
    if a.cmd == "env":
        env_rows(a.results)
        return 0
    if a.cmd == "driver":
        return 1 if driver(a.device) else 0
    bench(a.results, a.device, a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
