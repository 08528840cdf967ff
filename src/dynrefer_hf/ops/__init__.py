"""Sampling ops of DynRefer: RoIAlign (docs/upstream/model.md §3) and DCNv4's offset resampling (docs/upstream/model.md §4.4).

Each public function validates and normalises its arguments, then calls the kernel of a backend
(:mod:`dynrefer_hf.ops.backends`: one schema per op, one kernel per backend):

* ``"reference"``: the pure-PyTorch implementation in :mod:`dynrefer_hf.ops.reference` (any device).
* ``"triton"``: the Triton kernels in ``dynrefer_hf.ops.triton_*`` (CUDA tensors, or any tensor under
  ``TRITON_INTERPRET=1``).
* ``"auto"``: Triton when the tensor is on CUDA and Triton imports, or when ``TRITON_INTERPRET=1``;
  the reference otherwise (also when the kernel module cannot be imported).
* any backend added with :func:`register_backend` (docs/ops.md, "Adding a backend").

``backend=None`` reads the environment variable ``DYNREFER_OPS_BACKEND`` (default ``"auto"``).
Nothing here imports Triton at module load, so ``import dynrefer_hf`` works without Triton or a GPU.

The kernels call ``torch.library`` operators (``dynrefer::roi_align``, ``dynrefer::offset_resample``, and
``dynrefer::roi_align_triton``, ``dynrefer::offset_resample_triton`` once the kernel modules are imported),
each with a fake implementation, a backward operator and torchvision's autocast rule, so ``torch.compile``
and ``torch.export`` trace through these functions without graph breaks. Shape, dtype and device checks
always run (they cost no host sync); value checks (finite boxes, valid batch indices) read tensor values,
so they run only in eager mode unless asked for (``check_values``, ``DYNREFER_OPS_CHECK_VALUES``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from . import reference  # noqa: F401 (registers dynrefer::roi_align and dynrefer::offset_resample)
from .backends import (
    OP_SCHEMAS,
    Backend,
    backend_names,
    choose_backend,
    get_backend,
    register_backend,
    resolve_backend_name,
    unregister_backend,
)

__all__ = [
    "OP_SCHEMAS",
    "Backend",
    "RoIAlign",
    "backend_names",
    "get_backend",
    "offset_resample",
    "register_backend",
    "resolve_backend",
    "roi_align",
    "unregister_backend",
]

_ENV_CHECK_VALUES = "DYNREFER_OPS_CHECK_VALUES"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- dispatch


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """The backend asked for (``None`` reads ``DYNREFER_OPS_BACKEND``), with ``"auto"`` resolved.

    Returns a registered backend's name; in auto mode ``"triton"`` only if the kernel could run on
    ``tensor`` (CUDA with Triton installed, or Triton's interpreter switched on), else ``"reference"``.
    """
    return resolve_backend_name(backend, tensor.device.type)


@torch.compiler.assume_constant_result
def _backend_for(op: str, backend: str | None, device_type: str) -> str:
    """The backend whose kernel runs ``op`` (``backends.choose_backend``; importing a kernel module registers it).

    Under ``torch.compile``/``torch.export`` this runs once while tracing and its answer is baked into the
    graph (no guard on the environment), so the backend is chosen when a graph is traced.
    """
    return choose_backend(op, backend, device_type)


def _run(
    op: str, backend: str | None, device_type: str, arguments: tuple, deterministic: bool
) -> torch.Tensor:
    """``op``'s kernel on its schema's arguments; ``deterministic`` is also on under
    ``torch.use_deterministic_algorithms(True)``."""
    kernel = get_backend(_backend_for(op, backend, device_type)).kernel(op)
    return kernel(*arguments, bool(deterministic or torch.are_deterministic_algorithms_enabled()))


def _check_values(check_values: bool | None) -> bool:
    """Whether to run the value checks: the argument, else ``DYNREFER_OPS_CHECK_VALUES``, else eager only."""
    if check_values is not None:
        return bool(check_values)
    setting = os.environ.get(_ENV_CHECK_VALUES, "")
    if setting:
        return setting != "0"
    return not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------- validation


def _pair(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_float(tensor: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float64, float32, float16 or bfloat16, got {tensor.dtype}")


def _boxes_to_rois(boxes: torch.Tensor | Sequence[torch.Tensor], input: torch.Tensor) -> torch.Tensor:
    """torchvision's two box formats as one ``[K, 5]`` tensor ``(batch_index, x1, y1, x2, y2)``."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes as a tensor must be [K, 5] (batch_index, x1, y1, x2, y2), got {list(boxes.shape)}"
            )
        rois = boxes
    elif isinstance(boxes, Sequence):
        for index, image_boxes in enumerate(boxes):
            if (
                not isinstance(image_boxes, torch.Tensor)
                or image_boxes.dim() != 2
                or image_boxes.shape[1] != 4
            ):
                shape = (
                    list(image_boxes.shape)
                    if isinstance(image_boxes, torch.Tensor)
                    else type(image_boxes).__name__
                )
                raise ValueError(f"boxes[{index}] must be a [L, 4] tensor (x1, y1, x2, y2), got {shape}")
        if len(boxes) == 0:
            rois = input.new_zeros(0, 5)
        else:
            rois = torch.cat(
                [torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)], dim=0
            )
    else:
        raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    _check_float(rois, "boxes")
    _check_same_dtype(rois, "boxes", input, "input")
    if rois.device != input.device:
        raise ValueError(f"boxes are on {rois.device} but input is on {input.device}")
    return rois


def _check_same_dtype(tensor: torch.Tensor, name: str, other: torch.Tensor, other_name: str) -> None:
    """Same dtype, as torchvision asks; inside an autocast region mixed dtypes are fine (both become fp32)."""
    if tensor.dtype == other.dtype:
        return
    if torch.is_autocast_enabled(other.device.type) and torch.float64 not in (tensor.dtype, other.dtype):
        return
    raise ValueError(
        f"{name} dtype {tensor.dtype} does not match {other_name} dtype {other.dtype} (as in torchvision; "
        "mixed float16/bfloat16/float32 are accepted inside an autocast region)"
    )


def _check_roi_values(rois: torch.Tensor, num_images: int) -> None:
    """Finite boxes and integer batch indices in ``[0, num_images)``: one host sync, eager only by default."""
    if rois.shape[0] == 0:
        return
    batch_index = rois[:, 0]
    finite = torch.isfinite(rois).all()
    valid_index = (
        (batch_index >= 0) & (batch_index < num_images) & (batch_index == batch_index.floor())
    ).all()
    if bool(finite & valid_index):
        return
    if not bool(finite):
        raise ValueError("boxes contain NaN or infinite values")
    raise ValueError(f"box batch indices must be integers in [0, {num_images}), got {batch_index.tolist()}")


# ----------------------------------------------------------------------------------------------- roi_align


def roi_align(
    input: torch.Tensor,
    boxes: torch.Tensor | Sequence[torch.Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    backend: str | None = None,
    deterministic: bool = False,
    check_values: bool | None = None,
) -> torch.Tensor:
    """RoIAlign with the signature and numbers of ``torchvision.ops.roi_align`` (no torchvision needed).

    Args:
        input: ``[N, C, H, W]`` float64/32/16 or bfloat16 feature map.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of N ``Tensor[L, 4]``
            (one per image); same device as ``input``, same dtype outside autocast. Boxes get no gradient.
        output_size: ``int`` or ``(out_h, out_w)``.
        spatial_scale: box coordinates times this give feature cells (DynRefer: ``1/14``).
        sampling_ratio: samples per bin and axis; ``<= 0`` is adaptive (``ceil(roi_size / out_size)``).
        aligned: half-pixel shift (``False`` is the legacy behaviour DynRefer uses).
        backend: ``None`` (read ``DYNREFER_OPS_BACKEND``), ``"auto"`` or a registered backend
            (``"reference"``, ``"triton"``, ...: ``backend_names()``).
        deterministic: ask the Triton kernel for a backward without float atomics (also on under
            ``torch.use_deterministic_algorithms(True)``); the reference ignores it.
        check_values: check that boxes are finite and batch indices valid (reads the boxes: one host
            sync). ``None`` reads ``DYNREFER_OPS_CHECK_VALUES`` (``0``/``1``); unset, the checks run in
            eager mode and are skipped under ``torch.compile``/``torch.export``.

    Returns:
        ``[K, C, out_h, out_w]`` in the dtype of ``input`` (also inside an autocast region, where the math
        is float32 as in torchvision).
    """
    _check_float(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {list(input.shape)}")
    output_hw = _pair(output_size, "output_size", 1)
    if not math.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"spatial_scale must be a positive finite number, got {spatial_scale!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    rois = _boxes_to_rois(boxes, input)
    if _check_values(check_values):
        _check_roi_values(rois, input.shape[0])
    arguments = (input, rois, list(output_hw), float(spatial_scale), sampling_ratio, bool(aligned))
    return _run("roi_align", backend, input.device.type, arguments, deterministic)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`, like ``torchvision.ops.RoIAlign``."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.backend = backend

    def forward(self, input: torch.Tensor, rois: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return roi_align(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


# ----------------------------------------------------------------------------------------- offset_resample


def offset_resample(
    value: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size: int | tuple[int, int] = 3,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    group: int = 4,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    *,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """DCNv4's core sampling op (docs/upstream/model.md §4.4): deformable, mask-weighted sum of bilinear samples.

    Args:
        value: ``[N, H, W, C]`` channels last, ``C`` divisible by ``group``.
        offset_mask: ``[N, H_out, W_out, M]``, ``M >= group * K * 3`` with ``K = kh * kw`` (minus one with
            ``remove_center``). Per group g the slice ``[3Kg, 3K(g+1))`` holds K ``(dx, dy)`` offset pairs
            then K raw masks; kernel points are x-major. Channels past ``group * K * 3`` are ignored.
            ``H_out = (H + 2 * pad - (dilation * (kh - 1) + 1)) // stride + 1`` (same for W).
        kernel_size, stride, padding, dilation: ``int`` or ``(h, w)``.
        group: number of groups.
        offset_scale: scales the tap grid and the offsets.
        remove_center: drop the centre kernel point (needs odd kernel sizes).
        backend: ``None`` (read ``DYNREFER_OPS_BACKEND``), ``"auto"`` or a registered backend
            (``"reference"``, ``"triton"``, ...: ``backend_names()``).
        deterministic: ask the Triton kernel for a backward without float atomics (also on under
            ``torch.use_deterministic_algorithms(True)``); the reference ignores it.

    Returns:
        ``[N, H_out, W_out, C]`` in the dtype of ``value`` (inside an autocast region ``offset_mask`` may
        have another float dtype and the math is float32).
    """
    _check_float(value, "value")
    _check_float(offset_mask, "offset_mask")
    if value.dim() != 4:
        raise ValueError(f"value must be [N, H, W, C] (channels last), got shape {list(value.shape)}")
    if offset_mask.dim() != 4:
        raise ValueError(f"offset_mask must be [N, H_out, W_out, M], got shape {list(offset_mask.shape)}")
    _check_same_dtype(offset_mask, "offset_mask", value, "value")
    if offset_mask.device != value.device:
        raise ValueError(f"offset_mask is on {offset_mask.device} but value is on {value.device}")
    kernel_hw = _pair(kernel_size, "kernel_size", 1)
    stride_hw = _pair(stride, "stride", 1)
    padding_hw = _pair(padding, "padding", 0)
    dilation_hw = _pair(dilation, "dilation", 1)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    if not math.isfinite(offset_scale):
        raise ValueError(f"offset_scale must be finite, got {offset_scale!r}")
    if remove_center and (kernel_hw[0] % 2 == 0 or kernel_hw[1] % 2 == 0):
        raise ValueError(f"remove_center needs odd kernel sizes, got kernel_size={kernel_size!r}")

    batch, height, width, channels = value.shape
    if channels % group:
        raise ValueError(f"value channels ({channels}) must be divisible by group ({group})")
    points = kernel_hw[0] * kernel_hw[1] - int(bool(remove_center))
    if points < 1:
        raise ValueError("remove_center with a 1x1 kernel leaves no kernel points")
    expected_hw = tuple(
        (size + 2 * pad - (dil * (k - 1) + 1)) // step + 1
        for size, pad, dil, k, step in zip((height, width), padding_hw, dilation_hw, kernel_hw, stride_hw)
    )
    if min(expected_hw) < 1:
        raise ValueError(f"value of size {height}x{width} is too small for this kernel/padding/dilation")
    if offset_mask.shape[0] != batch or tuple(offset_mask.shape[1:3]) != expected_hw:
        raise ValueError(
            f"offset_mask must be [{batch}, {expected_hw[0]}, {expected_hw[1]}, M] for value "
            f"{list(value.shape)} with this kernel/stride/padding/dilation, got {list(offset_mask.shape)}"
        )
    if offset_mask.shape[3] < group * points * 3:
        raise ValueError(
            f"offset_mask needs at least group*K*3 = {group}*{points}*3 = {group * points * 3} channels, "
            f"got {offset_mask.shape[3]}"
        )

    arguments = (
        value,
        offset_mask,
        list(kernel_hw),
        list(stride_hw),
        list(padding_hw),
        list(dilation_hw),
        group,
        float(offset_scale),
        bool(remove_center),
    )
    return _run("offset_resample", backend, value.device.type, arguments, deterministic)
