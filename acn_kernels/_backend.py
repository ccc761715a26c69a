"""Backend selection shared by every op.

``backend=None`` means: the environment variable ``ACN_KERNELS_BACKEND`` if it is set to a name,
else the automatic choice for the tensors' device. An explicit argument wins over the variable.
An explicit backend that cannot run the tensors is an error; only the automatic choice falls back
to "torch", with one warning per (op, reason).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from . import _ext

BACKENDS = ("cpu", "cuda", "triton", "torch")

# Default GPU backend per op (see BENCHMARKS.md: chosen from GPU measurements when there are any).
GPU_DEFAULT = {"mixture": "cuda", "topk": "cuda"}


@functools.cache
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if ``name`` can run tensors on ``device``, else the reason."""
    if name == "torch":
        return None
    if name == "cpu":
        if _ext.C is None:
            return f"the compiled extension did not load ({_ext.LOAD_ERROR})"
        return None if device.type == "cpu" else f"it runs CPU tensors only, got {device}"
    if name == "cuda":
        if device.type != "cuda":
            return f"it runs CUDA tensors only, got {device}"
        if _ext.C is None:
            return f"the compiled extension did not load ({_ext.LOAD_ERROR})"
        if not _ext.C.built_with_cuda():
            return "acn_kernels was built without CUDA"
        return None
    if name == "triton":
        if not _triton_ok():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"it runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; got {device}"
    raise AssertionError(name)


def _auto(op: str, device: torch.device) -> str:
    if device.type == "cpu":
        first = ["cpu"]
    elif device.type == "cuda":
        other = "triton" if GPU_DEFAULT[op] == "cuda" else "cuda"
        first = [GPU_DEFAULT[op], other]
    else:
        first = []
    for name in first:
        if why_unavailable(name, device) is None:
            return name
    _warn_fallback(op, str(device), "; ".join(f"{n}: {why_unavailable(n, device)}" for n in first))
    return "torch"


@functools.cache
def _warn_fallback(op: str, device: str, reason: str) -> None:
    warnings.warn(
        f"acn_kernels: no compiled backend for {op} on {device} ({reason or 'unsupported device'}); "
        "using the 'torch' reference",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device``; raises ValueError/RuntimeError naming ``backend``."""
    name = backend
    if name is None:
        env = os.environ.get("ACN_KERNELS_BACKEND", "").strip().lower()
        name = None if env in ("", "auto") else env
        source = "ACN_KERNELS_BACKEND"
    else:
        source = "backend"
    if name is None:
        return _auto(op, device)
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} (or None / 'auto'), got {name!r}")
    reason = why_unavailable(name, device)
    if reason is not None:
        raise RuntimeError(f"{source}={name!r} cannot run these tensors: {reason}")
    return name


def backends() -> dict[str, bool]:
    """Which backends can run here: {"cpu": ..., "cuda": ..., "triton": ..., "torch": True}.

    "triton" is True when Triton is importable and either a GPU is visible or TRITON_INTERPRET=1.
    """
    gpu = torch.cuda.is_available()
    return {
        "cpu": _ext.C is not None,
        "cuda": _ext.has_cuda(),
        "triton": _triton_ok() and (gpu or triton_interpreting()),
        "torch": True,
    }
