"""Launch helpers shared by the Triton ops: the dtypes they take, the device check, the device
context."""

import contextlib

import torch

from ..dispatch import CAPABILITIES, triton_interpreting

SUPPORTED_DTYPES = CAPABILITIES["triton"].dtypes


def check_device(device: torch.device, kernel: object) -> None:
    """Raise unless the Triton ``kernel`` can run tensors on ``device``: CUDA tensors, or CPU
    tensors when the kernels were defined under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return
    if device.type != "cpu" or not triton_interpreting():
        raise RuntimeError(
            f"the triton backend runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; got {device}"
        )
    if type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after acn_kernels defined its Triton kernels, which were "
            "compiled for the GPU; set it before the first call with backend='triton'"
        )


def device_ctx(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
