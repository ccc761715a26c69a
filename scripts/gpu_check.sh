#!/usr/bin/env bash
# GPU check of acn-kernels on a machine with an NVIDIA GPU, offline, with that machine's own Python
# stack (torch + CUDA, Triton; what is absent is skipped and recorded, nothing is downloaded).
#
#   bash scripts/gpu_check.sh build|test|sanitize|bench|all OUTDIR
#   bash scripts/gpu_check.sh wheels [DIR]     # here, with a package index: fill .whl (git-ignored)
#
# Stages and budgets (scripts/gpu_check.py's docstring has the details): build 115 s, test 115 s,
# sanitize 55 s, bench 55 s; `all` ends within six minutes on a fresh H100/H200. Each stage stops
# at its budget; OUTDIR/results.md lists what ran, what was skipped and why, and each stage's
# time; OUTDIR also gets bench.md, bench*.json and logs.tar.gz (at most the eight files a device
# call returns).
#
# The device call of this workplace (the device tool's `run`; the GPU image lacks a few pure-Python
# packages, carried as wheels). Once, here, in the repository root:
#   bash scripts/gpu_check.sh wheels
# then:
#   run(command="bash scripts/gpu_check.sh all $OUT", carry=[".whl"], timeout_s=420)
# which leaves the time for a rerun inside a 15-minute lease. PYTHON picks the interpreter
# (default: python3, the one that holds torch on the GPU image).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
[[ $# -ge 1 ]] || { echo "usage: bash $0 build|test|sanitize|bench|all OUTDIR | wheels [DIR]" >&2; exit 2; }
cd "$ROOT"
"$PY" scripts/gpu_check.py "$@"
rc=$?
[[ $# -ge 2 && -f $2/results.md ]] && { echo "== $2/results.md"; cat "$2/results.md"; }
exit $rc
