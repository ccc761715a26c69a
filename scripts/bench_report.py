"""Turn pytest-benchmark JSON files into Markdown ratio tables for BENCHMARKS.md.

Usage: python scripts/bench_report.py results.json [more.json ...] [--ours acn_cpu] [--winners]

For every benchmark group, one row per implementation: median time and its ratio to ours (peer
time / our time, so > 1 means we are faster). Where the benchmarks recorded a floor (the GPU
runs of tests/benchmarks: extra_info floor_s, from the ceilings measured on the device at the
start of the run), the group's heading names it and a column gives each median over it. Where a
group has both GPU backends (acn_cuda, acn_triton), a last table says per op which one was faster
and by how much: the measurement behind acn_kernels/dispatch.py GPU_DEFAULT. --winners prints
only that table's lines, one per op (scripts/gpu_check.sh bench records them).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

GPU_BACKENDS = ("acn_cuda", "acn_triton")


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(benchmarks, the files' top-level records) of every file, in order."""
    benches, runs = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs.append(data)
        benches.extend(data["benchmarks"])
    return benches, runs


def impl_of(bench: dict) -> str:
    return bench.get("extra_info", {}).get("impl") or bench["params"].get("impl", bench["name"])


def winners(groups: dict[str, dict[str, dict]]) -> dict[str, dict[str, object]]:
    """Per op: wins of each GPU backend and the geometric mean of triton time / cuda time over the
    groups that timed both."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for benches in groups.values():
        if all(b in benches for b in GPU_BACKENDS):
            cuda, triton = (benches[b] for b in GPU_BACKENDS)
            ratios[cuda.get("extra_info", {}).get("op", "?")].append(
                triton["stats"]["median"] / cuda["stats"]["median"])
    out = {}
    for op, rs in ratios.items():
        geo = math.exp(sum(math.log(r) for r in rs) / len(rs))
        out[op] = {"cuda": sum(r > 1 for r in rs), "triton": sum(r <= 1 for r in rs), "points": len(rs),
                   "geomean": geo, "best": "cuda" if geo > 1 else "triton"}
    return out


def winner_lines(win: dict[str, dict[str, object]]) -> list[str]:
    return [f"{op}: {w['best']} (faster at {w[w['best']]} of {w['points']} points; "
            f"geomean triton / cuda time {w['geomean']:.2f}x)" for op, w in sorted(win.items())]


def floors_line(runs: list[dict], benches: list[dict]) -> str | None:
    for b in benches:
        f = b.get("extra_info", {}).get("floors")
        if f:
            return (f"floors measured on {f.get('device_name', '?')} at the start of the run: bf16 matmul "
                    f"{f['bf16_tflops']:.0f} TFLOP/s, TF32 matmul {f['tf32_tflops']:.0f} TFLOP/s, fp32 (SIMT) "
                    f"matmul {f['fp32_tflops']:.1f} TFLOP/s, device-to-device copy {f['copy_gbs']:.0f} GB/s")
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json_files", nargs="+")
    ap.add_argument("--ours", default=None, help="implementation name to compare against (default: first acn_*)")
    ap.add_argument("--winners", action="store_true", help="print only the fastest GPU backend per op")
    args = ap.parse_args(argv)
    benches, runs = load(args.json_files)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benches:
        groups[bench["group"]][impl_of(bench)] = bench
    win = winners(groups)
    if args.winners:
        print("\n".join(winner_lines(win)))
        return
    m = runs[0].get("machine_info", {})
    print(f"machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} cores; "
          f"python {m.get('python_version', '?')}; date {runs[0].get('datetime', '?')}\n")
    line = floors_line(runs, benches)
    if line:
        print(line + "\n")
    for group, by_impl in groups.items():
        times = {impl: b["stats"]["median"] for impl, b in by_impl.items()}
        ours_name = args.ours or next((k for k in times if k.startswith("acn_")), None)
        ours = times.get(ours_name) if ours_name else None
        floor = next((b["extra_info"]["floor_s"] for b in by_impl.values() if "floor_s" in b.get("extra_info", {})),
                     None)
        if floor is None:
            print(f"### {group}\n\n| impl | median (ms) | ratio (peer / {ours_name}) |\n|---|---:|---:|")
        else:
            kind = next(b["extra_info"]["floor"] for b in by_impl.values() if "floor" in b.get("extra_info", {}))
            print(f"### {group}\n\nfloor {floor * 1e3:.3f} ms ({kind})\n\n"
                  f"| impl | median (ms) | ratio (peer / {ours_name}) | median / floor |\n|---|---:|---:|---:|")
        for impl, t in sorted(times.items(), key=lambda kv: kv[1]):
            ratio = f"{t / ours:.2f}x" if ours else "-"
            tail = "" if floor is None else f" {t / floor:.2f}x |"
            print(f"| {impl} | {t * 1e3:.3f} | {ratio} |{tail}")
        print()
    if win:
        print("### Fastest GPU backend per op\n")
        for w in winner_lines(win):
            print(f"- {w}")


if __name__ == "__main__":
    main()
