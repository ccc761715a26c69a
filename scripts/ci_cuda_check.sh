#!/usr/bin/env bash
# Compile-and-link checks of the CUDA backend on a machine without a GPU (called by .ci/run).
#
#   bash scripts/ci_cuda_check.sh [--nvcc-only]
#
# 1. Layout rule (docs/design.md, "Layout"): no .cu/.cuh file includes torch, ATen or c10 headers.
# 2. Every csrc/cuda/*.cu compiles with plain nvcc for sm_75, sm_80 and sm_90 (C++17, and C++20
#    for sm_90), with the flags torch's CUDAExtension adds (relaxed constexpr, no implicit half
#    conversions) plus setup.py's, warnings as errors. Seconds per file.
# 3. Unless --nvcc-only: a CUDA wheel built the way the README tells users to build one, from the
#    sdist (`python -m build --sdist`, unpacked into $ACN_CUDA_BUILD_DIR, kept between runs so that
#    ninja rebuilds only what changed; the archive keeps the files' times), with ACN_FORCE_CUDA=1,
#    TORCH_CUDA_ARCH_LIST=9.0 and `pip wheel --no-build-isolation --no-deps` against a CUDA build of
#    torch in a separate virtual environment ($ACN_CUDA_VENV, created on first use from the torch
#    wheel on local disk, about 5.5 GB, 75 s); the wheel is installed there and, from outside the
#    sources, `import acn_kernels._C` (no GPU needed) and a check that every op has a CUDA kernel
#    registered with the dispatcher.
# Time on a 2-core machine: nvcc loop about 25 s; full CUDA build of _C about 6 min (incremental
# rebuilds after a .cu change well under a minute).
#
# The venv and the build are a cache under $ACN_CUDA_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/acn-kernels), never in a shared temporary folder: this script runs the
# Python interpreter found there, so the cache and every folder above it must be writable by this
# user only (folders of root, or sticky ones like /tmp, are fine above it); it is created with mode
# 0700 and checked before each use, and everything this script writes is private (umask 077).
#
# Environment: NVCC (default $CUDA_HOME/bin/nvcc or /usr/local/cuda/bin/nvcc), ACN_CUDA_CACHE,
# ACN_CUDA_VENV (default $ACN_CUDA_CACHE/venv-cuda), ACN_CUDA_BUILD_DIR (default
# $ACN_CUDA_CACHE/cuda-build), ACN_CUDA_TORCH (pip requirement of the CUDA torch, default
# torch==2.14.1), MAX_JOBS (default 2).
set -euo pipefail

umask 077
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
CACHE="${ACN_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/acn-kernels}"
VENV="${ACN_CUDA_VENV:-$CACHE/venv-cuda}"
BUILD_DIR="${ACN_CUDA_BUILD_DIR:-$CACHE/cuda-build}"
TORCH_REQ="${ACN_CUDA_TORCH:-torch==2.14.1}"
NVCC_ONLY=0
case "${1:-}" in
  --nvcc-only) NVCC_ONLY=1 ;;
  "") ;;
  *) echo "usage: $0 [--nvcc-only]" >&2; exit 2 ;;
esac

# Print the physical path of folder $1, creating it (mode 0700) if missing, after checking that no
# other user can write it or replace it: it and every folder above it must belong to this user or
# root and be writable by no one else, unless sticky (then others cannot rename what is ours).
private_dir() {
  local dir uid owner mode p
  uid="$(id -u)"
  mkdir -p "$(dirname "$1")"
  dir="$(realpath -m "$1")"
  [[ -e "$dir" ]] || mkdir -m 0700 "$dir"
  [[ -d "$dir" ]] || { echo "FAIL: $dir is not a folder" >&2; return 1; }
  read -r owner mode < <(stat -c '%u %a' "$dir")
  if [[ $owner != "$uid" ]] || (( 8#$mode & 8#022 )); then
    echo "FAIL: $dir must belong to uid $uid and be writable by it alone (it is uid $owner, mode $mode)" >&2
    return 1
  fi
  p="$dir"
  while [[ $p != / ]]; do
    p="$(dirname "$p")"
    read -r owner mode < <(stat -c '%u %a' "$p")
    if [[ $owner != "$uid" && $owner != 0 ]] || { (( 8#$mode & 8#022 )) && ! (( 8#$mode & 8#1000 )); }; then
      echo "FAIL: $p, above $dir, can be written by others (uid $owner, mode $mode)" >&2
      return 1
    fi
  done
  echo "$dir"
}

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

CACHE="$(private_dir "$CACHE")"
VENV="$(private_dir "$VENV")"
BUILD_DIR="$(private_dir "$BUILD_DIR")"
echo "== ci_cuda_check: CUDA torch venv at $VENV"
if ! "$VENV/bin/python" -c "import build, torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  find "$VENV" -mindepth 1 -delete
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_REQ" ninja setuptools wheel numpy packaging build
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo "== ci_cuda_check: CUDA wheel from the sdist, built in $BUILD_DIR"
"$VENV/bin/python" -m build --sdist --no-isolation --outdir "$obj_dir" "$ROOT" >"$obj_dir/sdist.log" 2>&1 \
  || { tail -n 40 "$obj_dir/sdist.log" >&2; echo "FAIL: python -m build --sdist" >&2; exit 1; }
# Replace the sources (deleted files must not linger), keep build/ (ninja's objects and log).
find "$BUILD_DIR" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
tar -xzf "$obj_dir"/*.tar.gz -C "$BUILD_DIR" --strip-components=1
t0=$SECONDS
ACN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" CUDA_HOME="$CUDA_HOME" \
  "$VENV/bin/python" -m pip wheel -v --no-cache-dir --no-build-isolation --no-deps -w "$obj_dir" "$BUILD_DIR" \
  >"$BUILD_DIR/build.log" 2>&1 \
  || { grep -E -A12 '^FAILED:' "$BUILD_DIR/build.log" | head -n 80 >&2 || tail -n 60 "$BUILD_DIR/build.log" >&2
       echo "FAIL: CUDA wheel from the sdist (log: $BUILD_DIR/build.log)" >&2; exit 1; }
echo "ok   CUDA wheel from the sdist: $(basename "$obj_dir"/*.whl) ($((SECONDS - t0)) s)"
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$obj_dir"/*.whl

(
  cd "$obj_dir"  # no acn_kernels folder here: the import is the installed wheel's
  "$VENV/bin/python" - <<'EOF'
import torch

import acn_kernels._C as C

assert "site-packages" in C.__file__, C.__file__
assert C.built_with_cuda(), "_C was built without ACN_WITH_CUDA"
for op in ("mixture_fwd", "mixture_bwd", "masked_topk", "resolve_neighbours"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"acn_kernels::{op}", key), (op, key)
print("ok   import acn_kernels._C; CPU and CUDA kernels registered for mixture_fwd, mixture_bwd, masked_topk, "
      "resolve_neighbours")
EOF
)
echo "== ci_cuda_check: done in $((SECONDS - t_start)) s"
