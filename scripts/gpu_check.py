"""Python parts of scripts/gpu_check.sh: the results table and the summaries of pytest runs.

    python scripts/gpu_check.py row RESULTS STAGE ITEM RESULT NUMBERS
    python scripts/gpu_check.py junit RESULTS STAGE ITEM JUNIT_XML
    python scripts/gpu_check.py env RESULTS

Only the standard library is imported at module level (``row`` and ``junit`` work without
torch). The sanitizer's driver is tests/sanitize_driver.py; the benchmarks are
tests/benchmarks/ (pytest-benchmark, tables by scripts/bench_report.py). tests/test_scripts.py
runs this file as a program.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
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
    a = p.parse_args(argv)
    if a.cmd == "row":
        append_row(a.results, a.stage, a.item, a.result, a.numbers)
        return 0
    if a.cmd == "junit":
        return junit_row(a.results, a.stage, a.item, a.xml)
    env_rows(a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
