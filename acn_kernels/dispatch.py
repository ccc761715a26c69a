"""Which backend runs an op: the capability table and the one dispatcher (docs/design.md,
"Backends and dispatch").

Every backend declares, as data, the devices and dtypes it runs and its per-op limits
(:data:`CAPABILITIES`); :func:`not_supported_reasons` checks one backend against the actual
inputs, and :func:`resolve` picks the backend of a call. ``backend=None`` means the environment
variable ``ACN_KERNELS_BACKEND`` if it names a backend, else the automatic choice for the inputs
(the fastest backend that can run them; never the Triton interpreter). An explicit backend that
cannot run the inputs raises one error listing every backend with its reasons; only the automatic
choice falls back to "torch", with one warning per (op, reasons). The tests take their
backend x dtype matrix from the same table.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch

from . import _ext

BACKENDS = ("cpu", "cuda", "triton", "torch")
OPS = ("masked_topk", "mixture", "resolve_neighbours")

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_ALL_FLOATS = _FLOATS | {torch.float64}


@dataclasses.dataclass(frozen=True)
class Capability:
    """What one backend can run: device types, input dtypes, and the largest bank (rows) of
    masked_topk (None: no limit beyond int64 offsets)."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    max_bank_rows: int | None = None
    ops: frozenset[str] | None = None
    """The ops it has kernels for (None: every op of OPS)."""


CAPABILITIES: dict[str, Capability] = {
    "cpu": Capability(frozenset({"cpu"}), _ALL_FLOATS),
    "cuda": Capability(frozenset({"cuda"}), _ALL_FLOATS),
    # Device "cpu" only under TRITON_INTERPRET=1 (checked in not_supported_reasons). The top-K
    # key packs the row into 32 bits, and row 2^32 - 1 is its padding sentinel
    # (acn_kernels/triton/masked_topk.py).
    # No Triton kernel of the sequential batch walk (resolve_neighbours; docs/design.md).
    "triton": Capability(frozenset({"cuda", "cpu"}), _FLOATS, max_bank_rows=(1 << 32) - 2,
                         ops=frozenset({"masked_topk", "mixture"})),
    "torch": Capability(frozenset({"cpu", "cuda"}), _ALL_FLOATS),
}

GPU_DEFAULT = {"masked_topk": "cuda", "mixture": "triton", "resolve_neighbours": "cuda"}
"""The automatic backend per op on GPUs; the other GPU backend is the second choice (float64, say,
which Triton does not take). Not measured yet: chosen from the static estimates (docs/design.md,
"The GPU check"; BENCHMARKS.md, GPU section). masked_topk: the CUDA kernel's tensor-core path is
estimated at 1.2-4.6x of the TF32 floor, the Triton kernel's at 4.6-39x (both exact: the band
filters, the direct form rescores). mixture: both kernels read [B, D, M] coalesced and are
estimated near the memory floor; the Triton kernels' semantics are checked under the interpreter,
the CUDA kernels have never run. resolve_neighbours: CUDA only. scripts/gpu_check.sh bench prints
the faster backend per op."""


@functools.cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken Triton install must not break dispatch
        return False
    return True


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def build_reason(name: str) -> str | None:
    """Why backend ``name`` is missing from this installation (None: it is here)."""
    if name in ("cpu", "cuda") and _ext.C is None:
        return f"the compiled extension did not load ({_ext.LOAD_ERROR})"
    if name == "cuda" and not _ext.C.built_with_cuda():
        return "acn_kernels was built without CUDA"
    if name == "triton" and not _triton_installed():
        return "triton is not installed"
    return None


def not_supported_reasons(
    name: str, op: str, device: torch.device, dtype: torch.dtype, bank_rows: int | None = None
) -> list[str]:
    """Every reason backend ``name`` cannot run ``op`` on inputs of ``device`` and ``dtype``
    (``bank_rows``: N of masked_topk); empty when it can."""
    cap = CAPABILITIES[name]
    if cap.ops is not None and op not in cap.ops:
        return [f"it has no {op} kernel"]
    reasons = []
    built = build_reason(name)
    if built is not None:
        reasons.append(built)
    if device.type not in cap.devices:
        reasons.append(f"it runs {' and '.join(sorted(cap.devices))} tensors, got {device.type}")
    elif name == "triton" and device.type == "cpu" and not triton_interpreting():
        reasons.append("it runs CPU tensors only under TRITON_INTERPRET=1")
    if dtype not in cap.dtypes:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in cap.dtypes))
        reasons.append(f"it supports {names}, got {str(dtype).removeprefix('torch.')}")
    if op == "masked_topk" and cap.max_bank_rows is not None and bank_rows is not None \
            and bank_rows > cap.max_bank_rows:
        reasons.append(f"it supports banks of at most {cap.max_bank_rows} rows, got N={bank_rows}")
    return reasons


def _preference(op: str, device: torch.device) -> list[str]:
    if device.type == "cpu":
        return ["cpu"]
    if device.type == "cuda":
        first = GPU_DEFAULT[op]
        return [first, "triton" if first == "cuda" else "cuda"]
    return []


@functools.cache
def _warn_fallback(op: str, reasons: str) -> None:
    warnings.warn(f"acn_kernels: no compiled backend for {op} on these inputs ({reasons}); "
                  "using the 'torch' reference", RuntimeWarning, stacklevel=5)


def _table(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{n}: {', '.join(r) if r else 'ok'}" for n, r in reasons.items())


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype,
            bank_rows: int | None = None) -> str:
    """The backend that runs ``op`` on inputs of ``device`` / ``dtype``.

    Raises ValueError for an unknown name and RuntimeError, listing every backend with its
    reasons, for an explicit backend (argument or ``ACN_KERNELS_BACKEND``) that cannot run them;
    a variable naming a backend that has no kernel of ``op`` at all means the automatic choice.
    """
    name, source = backend, "backend"
    if name is None:
        env = os.environ.get("ACN_KERNELS_BACKEND", "").strip().lower()
        name, source = (None if env in ("", "auto") else env), "ACN_KERNELS_BACKEND"
        cap = CAPABILITIES.get(name)
        if cap is not None and cap.ops is not None and op not in cap.ops:
            name = None  # the variable names a backend without this op at all: choose automatically
    if name is None:
        tried = {}
        for cand in _preference(op, device):
            tried[cand] = not_supported_reasons(cand, op, device, dtype, bank_rows)
            if not tried[cand]:
                return cand
        _warn_fallback(op, _table(tried) or f"no compiled backend runs {device.type} tensors")
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} (or None / 'auto'), got {name!r}")
    reasons = not_supported_reasons(name, op, device, dtype, bank_rows)
    if reasons:
        every = {n: not_supported_reasons(n, op, device, dtype, bank_rows) for n in BACKENDS}
        raise RuntimeError(f"{source}={name!r} cannot run these {op} inputs ({device.type}, "
                           f"{str(dtype).removeprefix('torch.')}): {', '.join(reasons)}. "
                           f"Every backend: {_table(every)}")
    return name


def backends() -> dict[str, bool]:
    """Which backends can run here: {"cpu": ..., "cuda": ..., "triton": ..., "torch": True}.

    "cuda" needs a visible GPU; "triton" is True when Triton is importable and either a GPU is
    visible or TRITON_INTERPRET=1.
    """
    gpu = torch.cuda.is_available()
    return {
        "cpu": build_reason("cpu") is None,
        "cuda": build_reason("cuda") is None and gpu,
        "triton": build_reason("triton") is None and (gpu or triton_interpreting()),
        "torch": True,
    }
