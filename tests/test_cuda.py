"""Internals of the "cuda" backend (csrc/cuda) that no generic test sees: the layout rule that
lets plain nvcc compile every .cu file, and the registration of its kernels. The contracts of
both ops, CUDA float64 included, are tested once in test_masked_topk.py and test_mixture.py over
the capability table; scripts/ci_cuda_check.sh compiles the sources without a GPU.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from acn_kernels import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cu_sources_include_no_torch_headers():
    """docs/design.md ("Layout"): .cu files see only CUDA toolkit headers and csrc/include, so nvcc
    compiles them without torch (scripts/ci_cuda_check.sh compiles them that way)."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
    assert sources, "no CUDA sources found"
    bad = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    for path in sources:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not bad.search(line), f"{path.name}:{n} includes a torch header: {line.strip()}"


def test_cuda_kernels_registered_when_built_with_cuda():
    if _ext.C is None or not _ext.C.built_with_cuda():
        pytest.skip("_C not built with CUDA")
    for op in ("mixture_fwd", "mixture_bwd", "masked_topk"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"acn_kernels::{op}", "CUDA"), op
