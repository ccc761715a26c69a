"""Loading of the compiled extension ``acn_kernels._C``.

A missing or broken build never breaks ``import acn_kernels``: one warning is issued, ``C`` is None,
and automatic dispatch uses the "torch" reference (xformers' pattern).
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

C: ModuleType | None
LOAD_ERROR: str | None = None

try:
    from . import _C as C  # type: ignore[attr-defined]  # registers torch.ops.acn_kernels.*
except Exception as exc:  # noqa: BLE001 - any load failure must degrade, not crash
    C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"acn_kernels: the compiled extension could not be loaded ({LOAD_ERROR}); the 'cpu' and 'cuda' "
        "backends are unavailable and automatic dispatch uses the 'torch' reference. Rebuild with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

