"""Build acn_kernels._C with torch.utils.cpp_extension.

CPU sources are always built (-O3 -fopenmp). CUDA sources are added when torch is a CUDA build
and a CUDA toolkit is found, or when ACN_FORCE_CUDA=1 (then a missing toolkit is an error).
ACN_FORCE_CPU=1 skips CUDA even where it could be built. Without a visible GPU,
TORCH_CUDA_ARCH_LIST defaults to "7.5;8.0;9.0" (torch's helper fails with no arch to target).
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("ACN_FORCE_CPU"):
        return False
    if _flag("ACN_FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("ACN_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 on old
    # torch, C++20 on current releases; torch 2.14's headers refuse C++17) when none is given.
    # -fno-trapping-math lets GCC if-convert the float selects of the CPU lane loops so that they
    # vectorise; NaN and inf semantics are kept (unlike -ffast-math).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if not _want_cuda():
        return CppExtension(
            "acn_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "7.5;8.0;9.0"
    sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    return CUDAExtension(
        "acn_kernels._C", sources, include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx + ["-DACN_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
