"""RoIAlign (docs/upstream/model.md §3, torchvision's numbers) as Triton kernels, forward and backward.

Layout of the work:

* forward: one program per (box, block of ``BLOCK_C`` channels, block of ``BLOCK_P`` output bins). It walks the
  box's sample grid (a runtime loop, so adaptive sampling costs no recompilation) and gathers the four
  bilinear corners of every sample for the whole ``[BLOCK_C, BLOCK_P]`` tile. The input is read through its
  strides: a channels-last map (DynRefer's patch tokens viewed as ``[N, C, H, W]``) gives loads that are
  contiguous along the channel axis, without a copy. The output and the input gradient keep the input's
  layout (channels-last in, channels-last out), so the stores are contiguous along channels too.
* backward, default: the same walk, scattering ``grad / count`` to the corners with fp32 atomics (what
  torchvision does); the fp32 buffer is cast to the input dtype at the end.
* backward, ``deterministic=True``: no float atomics. One program per (image, channel block, pixel tile)
  visits the boxes of its image in a fixed order (a stable sort by batch index) and *gathers* from them. A
  sample's bilinear weight factorises into a row part and a column part (a sample is dropped when either
  coordinate is out of range), so pixel ``(y, x)`` receives ``sum_ph a_y[ph, y] * sum_pw grad[ph, pw] *
  a_x[pw, x]``: per row of bins one small ``[BLOCK_C, 16] @ [16, cells]`` product (``tl.dot`` in exact fp32),
  visiting only the bins whose samples can reach the tile.

All arithmetic is in float32 (float64 for float64 inputs); results are cast to the input dtype.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the dispatch in dynrefer_hf.ops falls back to the reference
    raise ImportError(
        "dynrefer_hf.ops.triton_roi_align needs triton (pip install 'dynrefer_hf[triton]')"
    ) from error

from ._library import register_float32_autocast
from ._triton_common import accumulator_dtypes, check_dtype, on_device

__all__ = ["roi_align_kernel", "roi_align_triton"]

# ------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _roi_geometry(
    rois_ptr,
    roi,
    stride_roi_k,
    stride_roi_c,
    spatial_scale,
    sampling_ratio,
    pooled_h,
    pooled_w,
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
):
    """Batch index, start, bin size and sample count per axis of box ``roi`` (torchvision's rules)."""
    row = rois_ptr + roi.to(tl.int64) * stride_roi_k
    batch = tl.load(row).to(ACC).to(tl.int32)  # torchvision truncates the float index
    x1 = tl.load(row + stride_roi_c).to(ACC)
    y1 = tl.load(row + 2 * stride_roi_c).to(ACC)
    x2 = tl.load(row + 3 * stride_roi_c).to(ACC)
    y2 = tl.load(row + 4 * stride_roi_c).to(ACC)
    offset = 0.5 if ALIGNED else 0.0
    start_x = x1 * spatial_scale - offset
    start_y = y1 * spatial_scale - offset
    roi_w = x2 * spatial_scale - offset - start_x
    roi_h = y2 * spatial_scale - offset - start_y
    if not ALIGNED:  # legacy: boxes are at least one cell
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_w = roi_w / pooled_w
    bin_h = roi_h / pooled_h
    # sampling_ratio <= 0 is adaptive: ceil(roi / pooled) samples per bin, none for empty (aligned) boxes
    grid_h = tl.where(
        sampling_ratio > 0, sampling_ratio, tl.maximum(tl.ceil(roi_h / pooled_h), 0.0).to(tl.int32)
    )
    grid_w = tl.where(
        sampling_ratio > 0, sampling_ratio, tl.maximum(tl.ceil(roi_w / pooled_w), 0.0).to(tl.int32)
    )
    return batch, start_y, start_x, bin_h, bin_w, grid_h, grid_w


@triton.jit
def _sample_coordinate(start, bin_index, bin_size, sample, grid):
    """Coordinate of sample ``sample`` of bin ``bin_index`` (torchvision's operation order)."""
    grid_f = tl.maximum(grid, 1).to(bin_size.dtype)
    return start + bin_index * bin_size + (sample + 0.5) * bin_size / grid_f


@triton.jit
def _axis_taps(coord, size):
    """torchvision's legacy bilinear rule on one axis: (low, high, weight_low, weight_high).

    A coordinate outside ``[-1, size]`` gets zero weights; inside, it is clamped at 0 and the last cell is
    replicated (``low == high == size - 1``).
    """
    inside = (coord >= -1.0) & (coord <= size)
    clamped = tl.minimum(tl.maximum(coord, 0.0), size)  # the upper clamp only keeps floor() in int range
    low = tl.floor(clamped).to(tl.int32)
    at_edge = low >= size - 1
    low = tl.where(at_edge, size - 1, low)
    high = tl.where(at_edge, low, low + 1)
    frac = tl.where(at_edge, 0.0, clamped - low.to(coord.dtype))
    weight_low = tl.where(inside, 1.0 - frac, 0.0)
    weight_high = tl.where(inside, frac, 0.0)
    return low, high, weight_low, weight_high


@triton.jit
def _bin_range(lo_coord, hi_coord, start, bin_size, pooled):
    """Bins whose samples may touch cells ``[lo_coord, hi_coord]`` (conservative by one bin each side)."""
    zero = bin_size == 0.0  # every sample of the box sits at its start: visit all bins
    safe_bin = tl.where(zero, 1.0, bin_size)
    a = (lo_coord - 1.0 - start) / safe_bin
    b = (hi_coord + 1.0 - start) / safe_bin
    first_f = tl.where(zero, 0.0, tl.floor(tl.minimum(a, b)) - 1.0)
    last_f = tl.where(zero, pooled - 1.0, tl.floor(tl.maximum(a, b)) + 1.0)
    first = tl.minimum(tl.maximum(first_f, 0.0), pooled - 1.0).to(tl.int32)
    last = tl.minimum(tl.maximum(last_f, -1.0), pooled - 1.0).to(tl.int32)
    return first, last


@triton.jit
def _weighted_load(pointers, mask, weight, ACC: tl.constexpr):
    """``weight[None, :] * tile`` for a ``[BLOCK_C, BLOCK_P]`` gather, in the accumulator dtype."""
    return weight[None, :] * tl.load(pointers, mask, 0.0).to(ACC)


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _roi_align_forward_kernel(
    input_ptr,
    rois_ptr,
    output_ptr,
    channels,
    height,
    width,
    pooled_h,
    pooled_w,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    stride_roi_k,
    stride_roi_c,
    stride_ok,
    stride_oc,
    stride_oh,
    stride_ow,
    spatial_scale,
    sampling_ratio,
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    roi = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    num_bins = pooled_h * pooled_w
    c_ok = c < channels
    p_ok = p < num_bins
    ph = p // pooled_w
    pw = p % pooled_w

    batch, start_y, start_x, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        rois_ptr,
        roi,
        stride_roi_k,
        stride_roi_c,
        spatial_scale,
        sampling_ratio,
        pooled_h,
        pooled_w,
        ALIGNED,
        ACC,
    )
    base = input_ptr + batch.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c
    tile_ok = c_ok[:, None] & p_ok[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    for iy in range(grid_h):
        y = _sample_coordinate(start_y, ph, bin_h, iy, grid_h)
        y_low, y_high, wy_low, wy_high = _axis_taps(y, height)
        for ix in range(grid_w):
            x = _sample_coordinate(start_x, pw, bin_w, ix, grid_w)
            x_low, x_high, wx_low, wx_high = _axis_taps(x, width)
            row_low = base + (y_low * stride_h)[None, :]
            row_high = base + (y_high * stride_h)[None, :]
            acc += _weighted_load(row_low + (x_low * stride_w)[None, :], tile_ok, wy_low * wx_low, ACC)
            acc += _weighted_load(row_low + (x_high * stride_w)[None, :], tile_ok, wy_low * wx_high, ACC)
            acc += _weighted_load(row_high + (x_low * stride_w)[None, :], tile_ok, wy_high * wx_low, ACC)
            acc += _weighted_load(row_high + (x_high * stride_w)[None, :], tile_ok, wy_high * wx_high, ACC)
    count = tl.maximum(grid_h * grid_w, 1).to(ACC)
    out = (
        output_ptr
        + roi.to(tl.int64) * stride_ok
        + c.to(tl.int64)[:, None] * stride_oc
        + (ph * stride_oh + pw * stride_ow)[None, :]
    )
    tl.store(out, (acc / count).to(output_ptr.dtype.element_ty), tile_ok)


@triton.jit
def _roi_align_backward_atomic_kernel(
    grad_output_ptr,
    rois_ptr,
    grad_input_ptr,
    channels,
    height,
    width,
    pooled_h,
    pooled_w,
    stride_gk,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    stride_roi_k,
    stride_roi_c,
    spatial_scale,
    sampling_ratio,
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    roi = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = c < channels
    p_ok = p < pooled_h * pooled_w
    ph = p // pooled_w
    pw = p % pooled_w
    tile_ok = c_ok[:, None] & p_ok[None, :]

    batch, start_y, start_x, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        rois_ptr,
        roi,
        stride_roi_k,
        stride_roi_c,
        spatial_scale,
        sampling_ratio,
        pooled_h,
        pooled_w,
        ALIGNED,
        ACC,
    )
    grad_ptrs = (
        grad_output_ptr
        + roi.to(tl.int64) * stride_gk
        + c.to(tl.int64)[:, None] * stride_gc
        + (ph * stride_gh + pw * stride_gw)[None, :]
    )
    count = tl.maximum(grid_h * grid_w, 1).to(ACC)
    grad = tl.load(grad_ptrs, tile_ok, 0.0).to(ACC) / count
    base = grad_input_ptr + batch.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c
    for iy in range(grid_h):
        y = _sample_coordinate(start_y, ph, bin_h, iy, grid_h)
        y_low, y_high, wy_low, wy_high = _axis_taps(y, height)
        for ix in range(grid_w):
            x = _sample_coordinate(start_x, pw, bin_w, ix, grid_w)
            x_low, x_high, wx_low, wx_high = _axis_taps(x, width)
            row_low = base + (y_low * stride_h)[None, :]
            row_high = base + (y_high * stride_h)[None, :]
            tl.atomic_add(row_low + (x_low * stride_w)[None, :], grad * (wy_low * wx_low)[None, :], tile_ok)
            tl.atomic_add(row_low + (x_high * stride_w)[None, :], grad * (wy_low * wx_high)[None, :], tile_ok)
            tl.atomic_add(row_high + (x_low * stride_w)[None, :], grad * (wy_high * wx_low)[None, :], tile_ok)
            tl.atomic_add(
                row_high + (x_high * stride_w)[None, :], grad * (wy_high * wx_high)[None, :], tile_ok
            )


@triton.jit
def _axis_weight(start, bin_index, bin_size, grid, cell, size):
    """Summed interpolation weight of the samples of bins ``bin_index`` on cells ``cell`` (one axis).

    ``bin_index`` is a scalar or broadcasts against ``cell``, whose shape the result takes.
    """
    weight = tl.zeros(cell.shape, dtype=bin_size.dtype)
    for sample in range(grid):
        coord = _sample_coordinate(start, bin_index, bin_size, sample, grid)
        low, high, weight_low, weight_high = _axis_taps(coord, size)
        weight += tl.where(cell == low, weight_low, 0.0) + tl.where(cell == high, weight_high, 0.0)
    return weight


@triton.jit
def _roi_align_backward_gather_kernel(
    grad_output_ptr,
    rois_ptr,
    order_ptr,
    segment_ptr,
    grad_input_ptr,
    channels,
    height,
    width,
    pooled_h,
    pooled_w,
    tiles_w,
    stride_gk,
    stride_gc,
    stride_gh,
    stride_gw,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    stride_roi_k,
    stride_roi_c,
    spatial_scale,
    sampling_ratio,
    ALIGNED: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_PW: tl.constexpr,
):
    image = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = tl.program_id(2)
    y0 = (tile // tiles_w) * BLOCK_Y
    x0 = (tile % tiles_w) * BLOCK_X
    cell = tl.arange(0, BLOCK_Y * BLOCK_X)
    y = y0 + cell // BLOCK_X
    x = x0 + cell % BLOCK_X
    c_ok = c < channels
    tile_ok = c_ok[:, None] & ((y < height) & (x < width))[None, :]
    last_y = tl.minimum(y0 + BLOCK_Y, height) - 1
    last_x = tl.minimum(x0 + BLOCK_X, width) - 1

    acc = tl.zeros((BLOCK_C, BLOCK_Y * BLOCK_X), dtype=ACC)
    pw_lane = tl.arange(0, BLOCK_PW)
    x_cells = tl.broadcast_to(x[None, :], (BLOCK_PW, BLOCK_Y * BLOCK_X))
    # Boxes of this image in ascending box index: a fixed summation order.
    for position in range(tl.load(segment_ptr + image), tl.load(segment_ptr + image + 1)):
        roi = tl.load(order_ptr + position)
        _, start_y, start_x, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
            rois_ptr,
            roi,
            stride_roi_k,
            stride_roi_c,
            spatial_scale,
            sampling_ratio,
            pooled_h,
            pooled_w,
            ALIGNED,
            ACC,
        )
        inv_count = 1.0 / tl.maximum(grid_h * grid_w, 1).to(ACC)
        first_h, last_h = _bin_range(y0.to(ACC), last_y.to(ACC), start_y, bin_h, pooled_h)
        first_w, last_w = _bin_range(x0.to(ACC), last_x.to(ACC), start_x, bin_w, pooled_w)
        grad_roi = grad_output_ptr + roi.to(tl.int64) * stride_gk + c.to(tl.int64)[:, None] * stride_gc
        # Separable: sum_pw grad[ph, pw] * a_x[pw, x] is a small matrix product per row of bins ph.
        for pw_start in range(first_w, last_w + 1, BLOCK_PW):
            pw = pw_start + pw_lane
            weight_x = _axis_weight(start_x, pw[:, None], bin_w, grid_w, x_cells, width)  # [BLOCK_PW, cells]
            grad_ok = c_ok[:, None] & (pw <= last_w)[None, :]
            for ph in range(first_h, last_h + 1):
                weight_y = _axis_weight(start_y, ph, bin_h, grid_h, y, height) * inv_count
                grad = tl.load(grad_roi + ph * stride_gh + pw[None, :] * stride_gw, grad_ok, 0.0).to(ACC)
                acc += tl.dot(grad, weight_x, input_precision="ieee") * weight_y[None, :]
    out = (
        grad_input_ptr
        + image.to(tl.int64) * stride_n
        + c.to(tl.int64)[:, None] * stride_c
        + (y * stride_h + x * stride_w)[None, :]
    )
    tl.store(out, acc.to(grad_input_ptr.dtype.element_ty), tile_ok)


# ------------------------------------------------------------------------------------------------ launch


def _bin_block(num_bins: int) -> int:
    return min(triton.next_power_of_2(num_bins), 256)


def _channel_block(channels: int, other: int, budget: int = 2048) -> int:
    """Channels per program so that a tile holds about ``budget`` elements.

    2048-element tiles on 8 warps keep every kernel under ~128 registers per thread without spills (checked by
    compiling for sm_90) while a forward load still covers 8 contiguous channels of a channels-last map.
    """
    return max(1, min(triton.next_power_of_2(channels), budget // other))


def _warps(tile: int) -> int:
    return 8 if tile >= 2048 else 4


def _memory_format(input: torch.Tensor) -> torch.memory_format:
    """Channels-last results for a channels-last input (like torch's convolutions), contiguous otherwise."""
    return torch.channels_last if input.shape[1] > 1 and input.stride(1) == 1 else torch.contiguous_format


def _forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    num_rois = rois.shape[0]
    _, channels, height, width = input.shape
    pooled_h, pooled_w = output_size
    output = torch.empty(
        num_rois, channels, pooled_h, pooled_w, dtype=input.dtype, device=input.device,
        memory_format=_memory_format(input),
    )  # fmt: skip
    if output.numel() == 0:
        return output
    block_p = _bin_block(pooled_h * pooled_w)
    block_c = _channel_block(channels, block_p)
    grid = (num_rois, triton.cdiv(channels, block_c), triton.cdiv(pooled_h * pooled_w, block_p))
    _roi_align_forward_kernel[grid](
        input,
        rois,
        output,
        channels,
        height,
        width,
        pooled_h,
        pooled_w,
        *input.stride(),
        *rois.stride(),
        *output.stride(),
        float(spatial_scale),
        int(sampling_ratio),
        ALIGNED=bool(aligned),
        ACC=accumulator_dtypes(input.dtype)[1],
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=_warps(block_c * block_p),
    )
    return output


def _backward_atomic(grad_output, rois, input_like, output_size, spatial_scale, sampling_ratio, aligned):
    input_shape, input_dtype, memory_format = input_like
    _, channels, height, width = input_shape
    pooled_h, pooled_w = output_size
    accumulator, acc = accumulator_dtypes(input_dtype)
    grad_input = torch.zeros(input_shape, dtype=accumulator, device=grad_output.device).to(
        memory_format=memory_format
    )
    block_p = _bin_block(pooled_h * pooled_w)
    block_c = _channel_block(channels, block_p)
    grid = (rois.shape[0], triton.cdiv(channels, block_c), triton.cdiv(pooled_h * pooled_w, block_p))
    _roi_align_backward_atomic_kernel[grid](
        grad_output,
        rois,
        grad_input,
        channels,
        height,
        width,
        pooled_h,
        pooled_w,
        *grad_output.stride(),
        *grad_input.stride(),
        *rois.stride(),
        float(spatial_scale),
        int(sampling_ratio),
        ALIGNED=bool(aligned),
        ACC=acc,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=_warps(block_c * block_p),
    )
    return grad_input.to(input_dtype)


def _backward_gather(grad_output, rois, input_like, output_size, spatial_scale, sampling_ratio, aligned):
    input_shape, input_dtype, memory_format = input_like
    num_images, channels, height, width = input_shape
    pooled_h, pooled_w = output_size
    grad_input = torch.empty(
        input_shape, dtype=input_dtype, device=grad_output.device, memory_format=memory_format
    )
    # Boxes grouped by image, in ascending box order inside each image (stable sort).
    batch_index = rois[:, 0].to(accumulator_dtypes(rois.dtype)[0]).long()  # truncation, as the kernels do
    batch_index, order = torch.sort(batch_index, stable=True)
    images = torch.arange(num_images + 1, device=rois.device, dtype=batch_index.dtype)
    segment = torch.searchsorted(batch_index, images)
    # 32-cell tiles (tl.dot needs >= 16 on each side); short tiles visit fewer rows of bins
    block_x = min(triton.next_power_of_2(width), 16)
    block_y = 32 // block_x
    block_c = max(16, _channel_block(channels, block_y * block_x))
    tiles_w = triton.cdiv(width, block_x)
    grid = (num_images, triton.cdiv(channels, block_c), triton.cdiv(height, block_y) * tiles_w)
    _roi_align_backward_gather_kernel[grid](
        grad_output,
        rois,
        order,
        segment,
        grad_input,
        channels,
        height,
        width,
        pooled_h,
        pooled_w,
        tiles_w,
        *grad_output.stride(),
        *grad_input.stride(),
        *rois.stride(),
        float(spatial_scale),
        int(sampling_ratio),
        ALIGNED=bool(aligned),
        ACC=accumulator_dtypes(input_dtype)[1],
        BLOCK_C=block_c,
        BLOCK_Y=block_y,
        BLOCK_X=block_x,
        BLOCK_PW=16,
        num_warps=_warps(block_c * block_y * block_x),
    )
    return grad_input


# ------------------------------------------------------------------------------------------------ operators
# torch.library.custom_op rather than triton_op: triton_op traces its body (wrap_triton) under FakeTensors,
# which Triton's interpreter cannot do, and the tests run the kernels in the interpreter (docs/ops.md).


def _check_arguments(input: torch.Tensor, rois: torch.Tensor) -> None:
    if input.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"expected input [N, C, H, W] and rois [K, 5], got {list(input.shape)} and {list(rois.shape)}"
        )
    check_dtype(input, "input", "roi_align_triton")


@torch.library.custom_op("dynrefer::roi_align_triton", mutates_args=())
def roi_align_triton(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    deterministic: bool = False,
) -> torch.Tensor:
    """RoIAlign with torchvision's numbers, on Triton kernels (differentiable in ``input``).

    The operator ``dynrefer::roi_align_triton``.

    Args:
        input: ``[N, C, H, W]`` feature map, any strides (channels-last views are read without a copy).
        rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, same device as ``input``; batch indices must
            be valid (the public ``dynrefer_hf.ops.roi_align`` checks them in eager mode). No gradient.
        output_size: ``(out_h, out_w)``.
        spatial_scale: box coordinates to feature cells.
        sampling_ratio: samples per bin and axis; ``<= 0`` is adaptive (``ceil(roi_size / out_size)``).
        aligned: half-cell shift, boxes may be smaller than one cell.
        deterministic: backward without float atomics (bitwise reproducible).

    Returns:
        ``[K, C, out_h, out_w]`` in the dtype of ``input``; channels-last when ``input`` is (DynRefer's patch
        tokens viewed as a map), so both the kernel's stores and a later ``flatten(2).transpose(1, 2)`` stay
        contiguous; contiguous otherwise. Gradients come back in the layout of ``input`` too.
    """
    _check_arguments(input, rois)
    with on_device(input):
        return _forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


@roi_align_triton.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic=False):
    _check_arguments(input, rois)
    return torch.empty(
        rois.shape[0], input.shape[1], output_size[0], output_size[1], dtype=input.dtype, device=input.device,
        memory_format=_memory_format(input),
    )  # fmt: skip


@torch.library.custom_op("dynrefer::roi_align_triton_backward", mutates_args=())
def _roi_align_triton_backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    input_shape: list[int],
    channels_last: bool,
    output_size: list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    deterministic: bool,
) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    input_like = (input_shape, grad_output.dtype, memory_format)
    if rois.shape[0] == 0 or grad_output.numel() == 0:
        return torch.zeros(input_shape, dtype=grad_output.dtype, device=grad_output.device).to(
            memory_format=memory_format
        )
    backward = _backward_gather if deterministic else _backward_atomic
    with on_device(grad_output):
        return backward(grad_output, rois, input_like, output_size, spatial_scale, sampling_ratio, aligned)


@_roi_align_triton_backward.register_fake
def _(grad_output, rois, input_shape, channels_last, *config):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(
        input_shape, dtype=grad_output.dtype, device=grad_output.device, memory_format=memory_format
    )


def _setup_context(ctx, inputs, output):
    input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic = inputs
    ctx.save_for_backward(rois)
    ctx.input_like = (list(input.shape), _memory_format(input) == torch.channels_last)
    ctx.config = (list(output_size), spatial_scale, sampling_ratio, aligned, deterministic)


def _grad(ctx, grad_output):
    grad_input = None
    if ctx.needs_input_grad[0]:
        (rois,) = ctx.saved_tensors
        grad_input = _roi_align_triton_backward(grad_output, rois, *ctx.input_like, *ctx.config)
    return grad_input, None, None, None, None, None, None


roi_align_triton.register_autograd(_grad, setup_context=_setup_context)
register_float32_autocast("dynrefer::roi_align_triton", (0,))
register_float32_autocast("dynrefer::roi_align_triton_backward", (0,))


def roi_align_kernel(input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic):
    """The triton backend's ``roi_align`` kernel (the schema of ops/backends.py)."""
    return torch.ops.dynrefer.roi_align_triton(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic
    )
