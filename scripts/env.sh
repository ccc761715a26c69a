# Sourced by scripts/train.sh and scripts/test.sh: make a Python environment with acn-kernels
# installed (editable, compiled extension built here) plus the extras named in $1.
#
# Uses the active virtual environment, or creates ./.venv. torch is installed only if missing:
# ACN_TORCH_SPEC (default torch==2.13.0, the CPU build on the project's machines) says which.
# --no-build-isolation: the extension must build against the torch that will import it.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -d .venv ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "${ACN_TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q --no-build-isolation -e ".[${1:-test}]"
