#!/usr/bin/env bash
# GPU check of acn-kernels on a machine with an NVIDIA GPU, offline, with its own Python stack
# (e.g. Python 3.12, torch + CUDA, Triton; faiss, mlxtend or others may be absent: what is
# absent is skipped and recorded, nothing is ever downloaded).
#
#   bash scripts/gpu_check.sh build|test|sanitize|bench|all OUTDIR
#
# Every stage appends rows "| stage | item | result | numbers |" to OUTDIR/results.md and keeps
# its logs in OUTDIR; each rebuilds the extension only when needed and finishes in about 8
# minutes or less (commands run under `timeout`).
#   build     pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0 unless
#             set), skipped when _C is built with CUDA and newer than every source
#   test      pytest on tests/ (all of it, Triton tests included, no -x): pass/fail counts;
#             then the opt-in large tests of the op suites (fill the GPU, > 2^31 elements)
#   sanitize  compute-sanitizer memcheck / racecheck / synccheck / initcheck on small shapes of
#             both ops (tests/sanitize_driver.py, which also checks the results)
#   bench     the pytest-benchmark files of both ops (tests/benchmarks/bench_masked_topk.py,
#             bench_mixture.py) on the GPU: the cuda / triton backends against torch peers;
#             JSON and the ratio tables of scripts/bench_report.py in OUTDIR
set -uo pipefail

usage() { echo "usage: bash $0 build|test|sanitize|bench|all OUTDIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
STAGE="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$2"
OUT="$(cd "$2" && pwd)"
RESULTS="$OUT/results.md"
PY="${PYTHON:-$(command -v python || command -v python3)}"
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1 HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # scripts run from tests/ import acn_kernels
unset ACN_KERNELS_BACKEND

row() { "$PY" scripts/gpu_check.py row "$RESULTS" "$@" >/dev/null; echo "[$1] $2: $3 $4"; }
has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------------
# build

so_path() { ls acn_kernels/_C*.so 2>/dev/null | head -n 1; }

needs_build() {
  local so
  so="$(so_path)"
  [[ -n $so ]] || return 0
  "$PY" -c "import acn_kernels._C as C, sys; sys.exit(0 if C.built_with_cuda() else 1)" >/dev/null 2>&1 || return 0
  [[ -n "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ]]
}

BUILT=0
stage_build() {
  [[ $BUILT == 1 ]] && return 0
  "$PY" scripts/gpu_check.py env "$RESULTS" >/dev/null || row env stack FAIL "torch does not import"
  if ! needs_build; then
    BUILT=1
    row build "_C" "up to date" "$(so_path)"
    return 0
  fi
  local t0=$SECONDS rc=0
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    timeout 470 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1 || rc=$?
  if [[ $rc -ne 0 && $rc -ne 124 ]]; then
    # Older setuptools cannot do an editable PEP 660 build without isolation: build in place.
    echo "pip install -e failed (rc=$rc), trying setup.py build_ext --inplace" >>"$OUT/build.log"
    rc=0
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      timeout 470 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || rc=$?
  fi
  if [[ $rc -eq 0 ]] && "$PY" -c "import acn_kernels._C as C, sys; sys.exit(0 if C.built_with_cuda() else 1)" \
      >>"$OUT/build.log" 2>&1; then
    row build "_C (CUDA)" pass "$((SECONDS - t0)) s; log build.log"
    BUILT=1
  else
    row build "_C (CUDA)" FAIL "rc=$rc after $((SECONDS - t0)) s; $(grep -m1 -E 'error|Error' "$OUT/build.log" | cut -c1-200)"
    return 1
  fi
}

# ---------------------------------------------------------------------------------------------
# test

stage_test() {
  stage_build || return 1
  if ! has_module pytest; then
    row test pytest "not run" "pytest is not installed"
    return 0
  fi
  local args=(-o addopts= -p no:cacheprovider -q -rfE --continue-on-collection-errors)
  has_module pytest_timeout && args+=(--timeout=300)
  has_module pytest_benchmark && args+=(--benchmark-disable)  # the benchmarks: one smoke round here
  # Files that import a module this machine lacks are left out (recorded), not counted as errors.
  local missing=() f mod
  for mod in faiss sklearn mlxtend hypothesis pytest_benchmark matplotlib tqdm; do
    has_module "$mod" || missing+=("$mod")
  done
  local ignored=()
  for f in tests/test_*.py tests/benchmarks/*.py; do
    for mod in "${missing[@]}"; do
      if grep -qE "^\s*(import|from) $mod\b" "$f"; then ignored+=("$f"); break; fi
    done
  done
  if [[ " ${missing[*]} " == *" pytest_benchmark "* ]]; then ignored+=(tests/benchmarks); fi
  if [[ " ${missing[*]} " == *" hypothesis "* ]]; then args+=(--noconftest); fi  # conftest needs it
  for f in "${ignored[@]}"; do args+=(--ignore="$f"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    row test "absent modules" "files skipped" "missing: ${missing[*]}; left out: ${ignored[*]:-none}"
  fi

  local t0=$SECONDS
  rm -f "$OUT/junit_all.xml" "$OUT/junit_large.xml"  # a crashed run must not reuse old counts
  ACN_BENCH_SMOKE=1 TRITON_INTERPRET=0 timeout 360 "$PY" -m pytest "${args[@]}" --junitxml="$OUT/junit_all.xml" tests \
    >"$OUT/pytest_all.log" 2>&1
  local rc=$?
  [[ $rc -eq 124 ]] && row test "pytest tests/" "timed out" "360 s; partial log pytest_all.log"
  "$PY" scripts/gpu_check.py junit "$RESULTS" test "pytest tests/ ($((SECONDS - t0)) s, log pytest_all.log)" \
    "$OUT/junit_all.xml" >/dev/null
  tail -n 3 "$OUT/pytest_all.log"

  t0=$SECONDS
  ACN_TEST_FILL_GPU=1 ACN_TEST_HUGE=1 TRITON_INTERPRET=0 timeout 100 "$PY" -m pytest "${args[@]}" \
    --junitxml="$OUT/junit_large.xml" tests/test_masked_topk.py tests/test_mixture.py \
    -k "fill_gpu or 2_pow_31" >"$OUT/pytest_large.log" 2>&1
  "$PY" scripts/gpu_check.py junit "$RESULTS" test \
    "large sizes ($((SECONDS - t0)) s, log pytest_large.log)" "$OUT/junit_large.xml" >/dev/null
  tail -n 3 "$OUT/pytest_large.log"
}

# ---------------------------------------------------------------------------------------------
# sanitize

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -n $c && -x $c ]] && { echo "$c"; return 0; }
  done
  "$PY" - <<'EOF' 2>/dev/null
import glob, os, sys
for p in sys.path:
    for c in glob.glob(os.path.join(p, "nvidia", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(c) and os.access(c, os.X_OK):
            print(c)
            raise SystemExit(0)
raise SystemExit(1)
EOF
}

stage_sanitize() {
  stage_build || return 1
  local cs
  if ! cs="$(find_sanitizer)"; then
    row sanitize compute-sanitizer "not run" "compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda)"
    return 0
  fi
  local tool log rc summary t0 limit
  for tool in memcheck racecheck synccheck initcheck; do
    log="$OUT/sanitize_$tool.log"
    limit=100
    [[ $tool == racecheck ]] && limit=150  # instruments every shared-memory access
    t0=$SECONDS
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $limit "$cs" --tool "$tool" \
      "$PY" tests/sanitize_driver.py --device cuda >"$log" 2>&1
    rc=$?
    summary="$(grep -E -m1 '(ERROR|RACECHECK) SUMMARY' "$log")"
    if [[ $rc -eq 124 ]]; then
      row sanitize "$tool" "timed out" "$limit s; log $(basename "$log")"
    elif [[ -z $summary ]]; then
      row sanitize "$tool" "not run" "rc=$rc: $(grep -m1 -iE 'error|not supported|unable|fail' "$log" | cut -c1-200)"
    elif [[ $summary =~ [^0-9]0\ (errors|hazards) ]] && grep -q "driver: 0 mismatches" "$log"; then
      row sanitize "$tool" pass "$summary; $((SECONDS - t0)) s"
    else
      row sanitize "$tool" FAIL "$summary; $(grep -c MISMATCH "$log") mismatches; rc=$rc; log $(basename "$log")"
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# bench

stage_bench() {
  stage_build || return 1
  if ! has_module pytest_benchmark; then
    row bench pytest-benchmark "not run" "pytest-benchmark is not installed"
    return 0
  fi
  local t0=$SECONDS rc=0
  rm -f "$OUT/bench.json" "$OUT/junit_bench.xml" "$OUT/bench.md"
  # The full grids (no ACN_BENCH_SMOKE); conftest.DEVICE is the GPU. -o addopts= drops the
  # default --benchmark-disable.
  ACN_BENCH_DEVICE=cuda TRITON_INTERPRET=0 timeout 460 "$PY" -m pytest -o addopts= -p no:cacheprovider -q -rfEs \
    --benchmark-enable --benchmark-max-time=0.5 --benchmark-json="$OUT/bench.json" \
    --junitxml="$OUT/junit_bench.xml" tests/benchmarks/bench_masked_topk.py tests/benchmarks/bench_mixture.py \
    >"$OUT/bench.log" 2>&1 || rc=$?
  [[ $rc -eq 124 ]] && row bench pytest-benchmark "timed out" "460 s; partial log bench.log"
  "$PY" scripts/gpu_check.py junit "$RESULTS" bench "pytest-benchmark ($((SECONDS - t0)) s, log bench.log)" \
    "$OUT/junit_bench.xml" >/dev/null
  if [[ -s $OUT/bench.json ]] && "$PY" scripts/bench_report.py "$OUT/bench.json" >"$OUT/bench.md"; then
    row bench "ratio tables" info "bench.md (scripts/bench_report.py); raw bench.json"
    cat "$OUT/bench.md"
  fi
  tail -n 3 "$OUT/bench.log"
  [[ $rc -eq 0 ]]
}

case "$STAGE" in
  build) stage_build ;;
  test) stage_test ;;
  sanitize) stage_sanitize ;;
  bench) stage_bench ;;
  all) stage_build && { stage_test; stage_sanitize; stage_bench; } ;;
  *) usage ;;
esac
rc=$?
echo "== results: $RESULTS"
exit $rc
