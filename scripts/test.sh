#!/usr/bin/env bash
# The README's test command: install the package with its compiled extension and test extras, run
# the test suite (with one smoke round of every benchmark), then the Triton tests under
# TRITON_INTERPRET=1 in their own pytest process. Every pytest run fails on exit 5 (no tests), and
# unless the backends it must cover ran (ACN_REQUIRE_BACKENDS, tests/conftest.py).
# Environment: scripts/env.sh (the active venv, else ./.venv). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck disable=SC1091
source scripts/env.sh test

export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" ACN_BENCH_SMOKE=1
unset ACN_KERNELS_BACKEND

run_pytest() {  # exit 5 (nothing collected) is a failure, not a pass
  local rc=0
  python -m pytest "$@" || rc=$?
  if [[ $rc -eq 5 ]]; then echo "pytest collected no tests: $*" >&2; return 1; fi
  return $rc
}

echo "== pytest (compiled and torch backends, benchmark smoke pass)"
ACN_REQUIRE_BACKENDS=cpu,torch TRITON_INTERPRET=0 run_pytest -q -m "not triton" tests "$@"

echo "== pytest -m triton under TRITON_INTERPRET=1"
ACN_REQUIRE_BACKENDS=triton TRITON_INTERPRET=1 run_pytest -q -m triton tests "$@"
