#!/usr/bin/env bash
# Compile-and-link checks of the CUDA backend on a machine without a GPU (called by .ci/run).
#
#   bash scripts/ci_cuda_check.sh [--nvcc-only]
#
# 1. Layout rule (DESIGN.md): no .cu/.cuh file includes torch, ATen or c10 headers.
# 2. Every csrc/cuda/*.cu compiles with plain nvcc for sm_75, sm_80 and sm_90 (C++17, and C++20
#    for sm_90), with the flags torch's CUDAExtension adds (relaxed constexpr, no implicit half
#    conversions) plus setup.py's, warnings as errors. Seconds per file.
# 3. Unless --nvcc-only: a CUDA build of acn_kernels._C (ACN_FORCE_CUDA=1,
#    TORCH_CUDA_ARCH_LIST=9.0) against a CUDA build of torch in a separate virtual environment
#    ($ACN_CUDA_VENV, default /tmp/acn-venv-cuda, created on first use from the torch wheel on
#    local disk, about 5.5 GB, 75 s), done in a copy of the repository ($ACN_CUDA_BUILD_DIR,
#    default /tmp/acn-cuda-build, kept for incremental rebuilds) so it never touches the CPU build
#    in the working tree; then `import acn_kernels._C` there (no GPU needed) and a check that every
#    op has a CUDA kernel registered with the dispatcher.
# Time on a 2-core machine: nvcc loop about 25 s; full CUDA build of _C about 6 min (incremental
# rebuilds after a .cu change well under a minute).
#
# Environment: NVCC (default $CUDA_HOME/bin/nvcc or /usr/local/cuda/bin/nvcc), ACN_CUDA_VENV,
# ACN_CUDA_TORCH (pip requirement of the CUDA torch, default torch==2.14.1), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
VENV="${ACN_CUDA_VENV:-/tmp/acn-venv-cuda}"
BUILD_DIR="${ACN_CUDA_BUILD_DIR:-/tmp/acn-cuda-build}"
TORCH_REQ="${ACN_CUDA_TORCH:-torch==2.14.1}"
NVCC_ONLY=0
case "${1:-}" in
  --nvcc-only) NVCC_ONLY=1 ;;
  "") ;;
  *) echo "usage: $0 [--nvcc-only]" >&2; exit 2 ;;
esac

t_start=$SECONDS
cd "$ROOT"

echo "== ci_cuda_check: layout rule (no torch/ATen/c10 in .cu/.cuh)"
if grep -nE '#[[:space:]]*include[[:space:]]*[<"](torch|ATen|c10)/' csrc/cuda/*.cu csrc/cuda/*.cuh; then
  echo "FAIL: a .cu/.cuh file includes torch, ATen or c10 headers" >&2
  exit 1
fi

echo "== ci_cuda_check: plain nvcc ($("$NVCC" --version | tail -1))"
obj_dir="$(mktemp -d)"
trap 'rm -rf "$obj_dir"' EXIT
flags=(-O3 -lineinfo --expt-relaxed-constexpr
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Werror all-warnings -Icsrc/include)
# C++17 for every arch (the oldest torch we support builds with it); C++20 (what current torch's
# cpp_extension passes) once more for sm_90.
for src in csrc/cuda/*.cu; do
  for target in "75 17" "80 17" "90 17" "90 20"; do
    read -r arch std <<<"$target"
    t0=$SECONDS
    "$NVCC" -std=c++$std "${flags[@]}" -arch=sm_$arch -c "$src" -o "$obj_dir/$(basename "$src" .cu)_$arch.o"
    echo "ok   $src sm_$arch c++$std ($((SECONDS - t0)) s)"
  done
done

if [[ $NVCC_ONLY == 1 ]]; then
  echo "== ci_cuda_check: done (nvcc only) in $((SECONDS - t_start)) s"
  exit 0
fi

echo "== ci_cuda_check: CUDA torch venv at $VENV"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_REQ" ninja setuptools wheel numpy packaging
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo "== ci_cuda_check: CUDA build of _C in a copy of the repository ($BUILD_DIR)"
# The copy persists between runs so that ninja rebuilds only what changed (tar keeps the files'
# times); its sources are replaced each time, so deleted files do not linger.
mkdir -p "$BUILD_DIR"
rm -rf "$BUILD_DIR/csrc" "$BUILD_DIR/acn_kernels" "$BUILD_DIR/setup.py"
# Tracked and untracked-but-not-ignored files: what a clone would have, without build outputs.
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - | tar -C "$BUILD_DIR" -xf -
t0=$SECONDS
(
  cd "$BUILD_DIR"
  ACN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" CUDA_HOME="$CUDA_HOME" \
    "$VENV/bin/python" setup.py -q build_ext --inplace >build.log 2>&1 \
    || { grep -E -A12 '^FAILED:' build.log | head -n 80 >&2 || tail -n 60 build.log >&2
         echo "FAIL: CUDA build of _C" >&2; exit 1; }
)
echo "ok   CUDA build of _C ($((SECONDS - t0)) s)"

(
  cd "$BUILD_DIR"
  "$VENV/bin/python" - <<'EOF'
import torch

import acn_kernels._C as C

assert C.built_with_cuda(), "_C was built without ACN_WITH_CUDA"
for op in ("mixture_fwd", "mixture_bwd", "masked_topk", "resolve_neighbours"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"acn_kernels::{op}", key), (op, key)
print("ok   import acn_kernels._C; CPU and CUDA kernels registered for mixture_fwd, mixture_bwd, masked_topk, "
      "resolve_neighbours")
EOF
)
echo "== ci_cuda_check: done in $((SECONDS - t_start)) s"
