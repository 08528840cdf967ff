"""Pure-PyTorch reference implementations of the two sampling ops (docs/upstream/model.md §3 and §4.4).

Both functions take already-validated, normalised arguments (see :mod:`dynrefer_hf.ops` for the public,
checking entry points). They are vectorised over boxes, sampling points, groups and kernel points, run on
any device, and get their backward from autograd. Half-precision inputs are computed in float32 and the
result is cast back; float64 stays float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._library import register_float32_autocast

__all__ = [
    "offset_resample_backward_reference",
    "offset_resample_kernel",
    "offset_resample_reference",
    "roi_align_backward_reference",
    "roi_align_kernel",
    "roi_align_reference",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _roi_axis_weights(
    start: torch.Tensor,
    bin_size: torch.Tensor,
    grid: torch.Tensor,
    max_grid: int,
    pooled: int,
    size: int,
) -> torch.Tensor:
    """Interpolation weights of one axis of RoIAlign, summed over the samples of each bin.

    torchvision's bilinear weight of a sample factorises into a row part and a column part (and a sample is
    dropped when either coordinate is out of range), so the 2-D average is ``A_y @ X @ A_x^T``.

    Args:
        start: ``[K]`` roi start on this axis, in feature cells.
        bin_size: ``[K]`` bin size on this axis.
        grid: ``[K]`` integer sample count per bin on this axis (may be <= 0 for empty boxes).
        max_grid: the largest entry of ``grid`` (at least 1); samples past a box's own count are masked.
        pooled: output size on this axis.
        size: input size on this axis.

    Returns:
        ``[K, pooled, size]`` weights (not yet divided by the sample count).
    """
    dtype, device = start.dtype, start.device
    bins = torch.arange(pooled, device=device, dtype=dtype)
    steps = torch.arange(max_grid, device=device, dtype=dtype) + 0.5
    grid_f = grid.clamp(min=1).to(dtype)
    # Same operation order as torchvision: start + p * bin + (i + .5) * bin / grid.
    coord = (
        start[:, None, None]
        + bins[None, :, None] * bin_size[:, None, None]
        + steps[None, None, :] * bin_size[:, None, None] / grid_f[:, None, None]
    )  # [K, pooled, max_grid]
    in_box = torch.arange(max_grid, device=device)[None, None, :] < grid[:, None, None]
    # Legacy torchvision rule: a sample outside [-1, size] contributes nothing; inside, clamp at 0.
    inside = (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(dtype))
    keep = (in_box & inside).to(dtype)
    weights = torch.zeros(start.shape[0], pooled, size, device=device, dtype=dtype)
    weights.scatter_add_(2, low.flatten(2), ((1.0 - frac) * keep).flatten(2))
    weights.scatter_add_(2, high.flatten(2), (frac * keep).flatten(2))
    return weights


def _roi_weights(
    rois: torch.Tensor,
    size: tuple[int, int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch index ``[K]``, row weights ``[K, out_h, H]``, column weights ``[K, out_w, W]`` and sample count ``[K]``."""
    out_h, out_w = output_size
    height, width = size
    rois = rois.detach().to(compute)
    batch_index = rois[:, 0].long()  # torchvision truncates the float index

    offset = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - offset
    start_y = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_x
    roi_h = rois[:, 4] * spatial_scale - offset - start_y
    if not aligned:  # legacy behaviour: rois are at least one cell
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / out_w
    bin_h = roi_h / out_h

    if sampling_ratio > 0:
        grid_h = torch.full_like(batch_index, sampling_ratio)
        grid_w = grid_h
        max_h = max_w = sampling_ratio
    else:
        grid_h = torch.ceil(roi_h / out_h).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / out_w).long().clamp(min=0)
        if rois.shape[0] == 0:
            max_h = max_w = 1
        else:  # one host sync: the sample grid is padded to the largest per-box count and masked
            max_h, max_w = (int(v) for v in torch.stack([grid_h.max(), grid_w.max()]).clamp(min=1).tolist())

    weights_y = _roi_axis_weights(start_y, bin_h, grid_h, max_h, out_h, height)  # [K, out_h, H]
    weights_x = _roi_axis_weights(start_x, bin_w, grid_w, max_w, out_w, width)  # [K, out_w, W]
    count = (grid_h * grid_w).clamp(min=1).to(compute)
    return batch_index, weights_y, weights_x, count


def roi_align_reference(
    input: torch.Tensor,
    boxes: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign with the numbers of ``torchvision.ops.roi_align``.

    Args:
        input: ``[N, C, H, W]`` feature map.
        boxes: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image coordinates, same dtype as
            ``input``. Boxes get no gradient (torchvision does not differentiate them either).
        output_size: ``(out_h, out_w)``.
        spatial_scale: factor from box coordinates to feature cells (e.g. ``1/14``).
        sampling_ratio: samples per bin and axis; ``<= 0`` means adaptive, ``ceil(roi_size / out_size)``
            per box.
        aligned: ``True`` shifts boxes by half a cell and lets them be smaller than one cell.

    Returns:
        ``[K, C, out_h, out_w]`` contiguous, in the dtype of ``input``. Differentiable in ``input`` through
        plain autograd; the ``dynrefer::roi_align`` operator uses :func:`roi_align_backward_reference`.
    """
    _, channels, height, width = input.shape
    compute = _compute_dtype(input.dtype)
    batch_index, weights_y, weights_x, count = _roi_weights(
        boxes, (height, width), output_size, spatial_scale, sampling_ratio, aligned, compute
    )
    features = input.to(compute).index_select(0, batch_index)  # [K, C, H, W]
    # Contract x as one large batched matmul, then y; ~2x faster than per-channel small matmuls.
    columns = (features.flatten(1, 2) @ weights_x.transpose(1, 2)).unflatten(1, (channels, height))
    pooled = torch.einsum("kph,kchq->kcpq", weights_y, columns)  # [K, C, out_h, out_w]
    return (pooled / count[:, None, None, None]).to(input.dtype).contiguous()


def roi_align_backward_reference(
    grad_output: torch.Tensor,
    boxes: torch.Tensor,
    input_shape: tuple[int, int, int, int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """Gradient of :func:`roi_align_reference` with respect to ``input`` (RoIAlign is linear in ``input``).

    Box ``k`` adds ``A_y^T @ grad[k] @ A_x / count`` to its image; boxes of the same image are summed with
    ``index_add``. Returns ``input_shape`` contiguous, in the dtype of ``grad_output``.
    """
    compute = _compute_dtype(grad_output.dtype)
    _, _, height, width = input_shape
    batch_index, weights_y, weights_x, count = _roi_weights(
        boxes, (height, width), output_size, spatial_scale, sampling_ratio, aligned, compute
    )
    grad = grad_output.to(compute) / count[:, None, None, None]
    rows = torch.einsum("kph,kcpq->kchq", weights_y, grad)  # [K, C, H, out_w]
    per_box = rows @ weights_x[:, None]  # [K, C, H, W]
    grad_input = per_box.new_zeros(input_shape).index_add_(0, batch_index, per_box)
    return grad_input.to(grad_output.dtype)


def _tap_offsets(
    kernel_size: tuple[int, int], dilation: tuple[int, int], remove_center: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated tap positions ``(x, y)`` of the kernel points, x-major (k = i * kernel_h + j)."""
    kernel_h, kernel_w = kernel_size
    i = torch.arange(kernel_w, device=device).repeat_interleave(kernel_h)  # column (x) index
    j = torch.arange(kernel_h, device=device).repeat(kernel_w)  # row (y) index
    if remove_center:
        keep = (i != kernel_w // 2) | (j != kernel_h // 2)
        i, j = i[keep], j[keep]
    return i * dilation[1], j * dilation[0]


def offset_resample_reference(
    value: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> torch.Tensor:
    """DCNv4's core sampling op (docs/upstream/model.md §4.4), via ``F.grid_sample``.

    For output position ``(y, x)``, group ``g`` and kernel point ``k = i * kernel_h + j`` (x-major), the
    sample lands at ``p0 + (tap + offset) * offset_scale`` with ``p0 = x * stride - pad + half * (1 - s)``,
    ``half = dilation * (kernel - 1) // 2`` (same for y). Samples are read bilinearly with zero padding,
    multiplied by the raw mask (no softmax) and summed over k.

    Args:
        value: ``[N, H, W, C]`` channels last; group g owns channels ``[g*C/G, (g+1)*C/G)``.
        offset_mask: ``[N, H_out, W_out, M]``; group g owns ``[3Kg, 3K(g+1))``: K ``(dx, dy)`` pairs, then
            K masks. Channels from ``group * 3K`` on are padding (ignored, zero gradient).
        kernel_size, stride, padding, dilation: ``(h, w)`` pairs.
        group: number of groups G.
        offset_scale: scales both the tap grid and the offsets.
        remove_center: drop the centre tap (K = kh * kw - 1).

    Returns:
        ``[N, H_out, W_out, C]`` in the dtype of ``value``.
    """
    batch, height, width, channels = value.shape
    _, out_h, out_w, _ = offset_mask.shape
    compute = _compute_dtype(value.dtype)
    device = value.device
    tap_x, tap_y = _tap_offsets(kernel_size, dilation, remove_center, device)
    points = tap_x.numel()

    om = offset_mask[..., : group * points * 3].to(compute).unflatten(-1, (group, 3 * points))
    offsets = om[..., : 2 * points].unflatten(-1, (points, 2))  # [N, Ho, Wo, G, K, (dx, dy)]
    masks = om[..., 2 * points :]  # [N, Ho, Wo, G, K]

    # Integer part of the origin first, then the offset_scale correction, as DCNv4's kernel does.
    half_h = dilation[0] * (kernel_size[0] - 1) // 2
    half_w = dilation[1] * (kernel_size[1] - 1) // 2
    origin_y = (torch.arange(out_h, device=device) * stride[0] + half_h - padding[0]).to(compute)
    origin_x = (torch.arange(out_w, device=device) * stride[1] + half_w - padding[1]).to(compute)
    origin_y = origin_y - half_h * offset_scale
    origin_x = origin_x - half_w * offset_scale
    px = origin_x[None, None, :, None, None] + (tap_x.to(compute) + offsets[..., 0]) * offset_scale
    py = origin_y[None, :, None, None, None] + (tap_y.to(compute) + offsets[..., 1]) * offset_scale

    # grid_sample with align_corners=False puts pixel centres at (2p + 1) / size - 1.
    grid = torch.stack(((2 * px + 1) / width - 1, (2 * py + 1) / height - 1), dim=-1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(batch * group, out_h * out_w, points, 2)
    group_values = value.to(compute).unflatten(-1, (group, channels // group)).permute(0, 3, 4, 1, 2)
    group_values = group_values.reshape(batch * group, channels // group, height, width)
    sampled = F.grid_sample(group_values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    masks = masks.permute(0, 3, 1, 2, 4).reshape(batch * group, out_h * out_w, points)
    out = torch.einsum("bdqk,bqk->bqd", sampled, masks)  # [N*G, Ho*Wo, D]
    out = out.unflatten(0, (batch, group)).permute(0, 2, 1, 3).reshape(batch, out_h, out_w, channels)
    return out.to(value.dtype).contiguous()


def offset_resample_backward_reference(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`offset_resample_reference` for ``value`` and ``offset_mask``, contiguous.

    The forward is recomputed and differentiated with ``torch.func.vjp`` (``grid_sample``'s own backward), so
    the forward of the ``dynrefer::offset_resample`` operator keeps none of its large intermediate samples;
    ``torch.func`` also differentiates where the operator runs below the autograd dispatch key (compiled
    backward graphs).
    """

    def forward(value, offset_mask):
        return offset_resample_reference(
            value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center
        )

    _, vjp = torch.func.vjp(forward, value.detach(), offset_mask.detach())
    grad_value, grad_offset_mask = vjp(grad_output)
    return grad_value.contiguous(), grad_offset_mask.contiguous()


# ------------------------------------------------------------------------------------------------ operators
# dynrefer::roi_align and dynrefer::offset_resample: the reference as opaque torch.library operators, with
# fake (shape) implementations so torch.compile and torch.export see static output shapes, explicit backward
# operators, and torchvision's autocast rule (docs/ops.md, "Operators").


@torch.library.custom_op("dynrefer::roi_align", mutates_args=())
def _roi_align_op(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    return roi_align_reference(input, rois, tuple(output_size), spatial_scale, sampling_ratio, aligned)


@_roi_align_op.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return input.new_empty(rois.shape[0], input.shape[1], output_size[0], output_size[1])


@torch.library.custom_op("dynrefer::roi_align_backward", mutates_args=())
def _roi_align_backward_op(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    input_shape: list[int],
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    return roi_align_backward_reference(
        grad_output, rois, tuple(input_shape), tuple(output_size), spatial_scale, sampling_ratio, aligned
    )


@_roi_align_backward_op.register_fake
def _(grad_output, rois, input_shape, output_size, spatial_scale, sampling_ratio, aligned):
    return grad_output.new_empty(input_shape)


def _roi_align_setup_context(ctx, inputs, output):
    input, rois, output_size, spatial_scale, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = list(input.shape)
    ctx.config = (list(output_size), spatial_scale, sampling_ratio, aligned)


def _roi_align_grad(ctx, grad_output):
    grad_input = None
    if ctx.needs_input_grad[0]:
        (rois,) = ctx.saved_tensors
        grad_input = _roi_align_backward_op(grad_output, rois, ctx.input_shape, *ctx.config)
    return grad_input, None, None, None, None, None


_roi_align_op.register_autograd(_roi_align_grad, setup_context=_roi_align_setup_context)


@torch.library.custom_op("dynrefer::offset_resample", mutates_args=())
def _offset_resample_op(
    value: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> torch.Tensor:
    return offset_resample_reference(
        value,
        offset_mask,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        group,
        offset_scale,
        remove_center,
    )


@_offset_resample_op.register_fake
def _(value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center):
    return value.new_empty(*offset_mask.shape[:3], value.shape[3])


@torch.library.custom_op("dynrefer::offset_resample_backward", mutates_args=())
def _offset_resample_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return offset_resample_backward_reference(
        grad_output,
        value,
        offset_mask,
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        group,
        offset_scale,
        remove_center,
    )


@_offset_resample_backward_op.register_fake
def _(grad_output, value, offset_mask, *config):
    return value.new_empty(value.shape), offset_mask.new_empty(offset_mask.shape)


def _offset_resample_setup_context(ctx, inputs, output):
    value, offset_mask, *config = inputs
    ctx.save_for_backward(value, offset_mask)
    ctx.config = config


def _offset_resample_grad(ctx, grad_output):
    value, offset_mask = ctx.saved_tensors
    grad_value, grad_offset_mask = _offset_resample_backward_op(grad_output, value, offset_mask, *ctx.config)
    return grad_value, grad_offset_mask, None, None, None, None, None, None, None


_offset_resample_op.register_autograd(_offset_resample_grad, setup_context=_offset_resample_setup_context)

for _qualname, _result_like in (
    ("dynrefer::roi_align", (0,)),
    ("dynrefer::roi_align_backward", (0,)),
    ("dynrefer::offset_resample", (0,)),
    ("dynrefer::offset_resample_backward", (1, 2)),
):
    register_float32_autocast(_qualname, _result_like)


# The reference backend's kernels (the schemas of ops/backends.py); the reference has no float atomics, so
# `deterministic` changes nothing.
def roi_align_kernel(input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic):
    return torch.ops.dynrefer.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


def offset_resample_kernel(
    value,
    offset_mask,
    kernel_size,
    stride,
    padding,
    dilation,
    group,
    offset_scale,
    remove_center,
    deterministic,
):
    return torch.ops.dynrefer.offset_resample(
        value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center
    )
