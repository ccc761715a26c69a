"""Turn a pytest-benchmark JSON file into Markdown ratio tables for BENCHMARKS.md.

Usage: python scripts/bench_report.py results.json [--ours acn_cpu]
For every benchmark group, one row per implementation: median time and its ratio to ours
(peer time / our time, so > 1 means we are faster).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--ours", default=None, help="implementation name to compare against (default: first acn_*)")
    args = ap.parse_args()
    data = json.load(open(args.json_file))
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = bench.get("extra_info", {}).get("impl") or bench["params"].get("impl", bench["name"])
        groups[bench["group"]][impl] = bench["stats"]["median"]
    m = data.get("machine_info", {})
    print(f"machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} cores; "
          f"python {m.get('python_version', '?')}; date {data.get('datetime', '?')}\n")
    for group, times in groups.items():
        ours_name = args.ours or next((k for k in times if k.startswith("acn_")), None)
        ours = times.get(ours_name) if ours_name else None
        print(f"### {group}\n\n| impl | median (ms) | ratio (peer / {ours_name}) |\n|---|---:|---:|")
        for impl, t in sorted(times.items(), key=lambda kv: kv[1]):
            ratio = f"{t / ours:.2f}x" if ours else "-"
            print(f"| {impl} | {t * 1e3:.3f} | {ratio} |")
        print()


if __name__ == "__main__":
    main()
