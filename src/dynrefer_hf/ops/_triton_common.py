"""Launch helpers shared by the two Triton kernel modules (imported only after Triton imported)."""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from .reference import _compute_dtype

__all__ = ["SUPPORTED_DTYPES", "accumulator_dtypes", "check_dtype", "on_device"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulator_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The compute dtype of the reference for ``dtype`` (float64 or float32), as torch and Triton dtypes."""
    compute = _compute_dtype(dtype)
    return compute, (tl.float64 if compute == torch.float64 else tl.float32)


def check_dtype(tensor: torch.Tensor, name: str, function: str) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{function} supports float32, float16, bfloat16 and float64 {name}, got {tensor.dtype}"
        )


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current one: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
