"""DCNv4's offset resampling (docs/upstream/model.md §4.4) as Triton kernels, forward and backward.

``value`` is channels last, so a program takes a block of ``BLOCK_Q`` output positions of one image and one
group and vectorises over ``BLOCK_D`` channels of that group: every bilinear corner is a ``[BLOCK_Q,
BLOCK_D]`` load that is contiguous along the channels.

* forward: one program per (image and position block, group, channel block); the kernel points are
  unrolled at compile time (kernel size and ``remove_center`` are compile-time constants).
* backward, offsets and masks: one program per (image and position block, group) loops over all channel
  blocks of the group, so the reductions over channels for ``d(offset)`` and ``d(mask)`` are complete in
  registers and written once (no atomics, deterministic). Padding channels of ``offset_mask`` get zeros.
* backward, ``value``, default: the same program scatters ``mask * weight * grad`` to the four corners with
  fp32 atomics.
* backward, ``value``, ``deterministic=True``: no float atomics. A small kernel writes the destination cell
  of every (position, group, point, corner); a stable sort groups them by destination; a gather kernel then
  sums each destination's contributions in that fixed order.

All arithmetic is in float32 (float64 for float64 inputs); results are cast to the input dtype.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the dispatch in dynrefer_hf.ops falls back to the reference
    raise ImportError(
        "dynrefer_hf.ops.triton_offset_resample needs triton (pip install 'dynrefer_hf[triton]')"
    ) from error

from ._library import register_float32_autocast
from ._triton_common import accumulator_dtypes, check_dtype, on_device

__all__ = ["offset_resample_kernel", "offset_resample_triton"]

# ------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _sample_point(
    om_row,
    qy,
    qx,
    tap_y,
    tap_x,
    point,
    stride_om_m,
    stride_y,
    stride_x,
    pad_y,
    pad_x,
    half_y,
    half_x,
    offset_scale,
    POINTS: tl.constexpr,
    ACC: tl.constexpr,
    mask,
):
    """Sampling location ``(py, px)`` and raw modulation of one kernel point (DCNv4's formula).

    ``om_row`` points at channel ``3K * g`` of each position's offset/mask vector; ``tap_y``/``tap_x`` are the
    dilated tap coordinates of point ``point``.
    """
    dx = tl.load(om_row + (2 * point) * stride_om_m, mask, 0.0).to(ACC)
    dy = tl.load(om_row + (2 * point + 1) * stride_om_m, mask, 0.0).to(ACC)
    modulation = tl.load(om_row + (2 * POINTS + point) * stride_om_m, mask, 0.0).to(ACC)
    # Integer part of the origin first, then the offset_scale correction, as DCNv4's kernel does.
    origin_y = (qy * stride_y + half_y - pad_y).to(ACC) - half_y * offset_scale
    origin_x = (qx * stride_x + half_x - pad_x).to(ACC) - half_x * offset_scale
    py = origin_y + (tap_y + dy) * offset_scale
    px = origin_x + (tap_x + dx) * offset_scale
    return py, px, modulation


@triton.jit
def _corners(py, px, height, width):
    """Top-left corner, fractional parts and in-map flags of a zero-padded bilinear sample."""
    # Clamping keeps floor() in int range; samples clamped there are outside and read nothing.
    py = tl.minimum(tl.maximum(py, -2.0), height + 1.0)
    px = tl.minimum(tl.maximum(px, -2.0), width + 1.0)
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    y0_ok = (y0 >= 0) & (y0 < height)
    y1_ok = (y0 + 1 >= 0) & (y0 + 1 < height)
    x0_ok = (x0 >= 0) & (x0 < width)
    x1_ok = (x0 + 1 >= 0) & (x0 + 1 < width)
    return y0, x0, ly, lx, y0_ok, y1_ok, x0_ok, x1_ok


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _offset_resample_forward_kernel(
    value_ptr,
    om_ptr,
    output_ptr,
    height,
    width,
    out_h,
    out_w,
    group_channels,
    channels,
    stride_vn,
    stride_vh,
    stride_vw,
    stride_vc,
    stride_om_n,
    stride_om_h,
    stride_om_w,
    stride_om_m,
    stride_y,
    stride_x,
    pad_y,
    pad_x,
    dilation_y,
    dilation_x,
    offset_scale,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    REMOVE_CENTER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    num_q = out_h * out_w
    blocks_q = tl.cdiv(num_q, BLOCK_Q)
    n = tl.program_id(0) // blocks_q
    q = (tl.program_id(0) % blocks_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    g = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    q_ok = q < num_q
    d_ok = d < group_channels
    qy = q // out_w
    qx = q % out_w
    POINTS: tl.constexpr = KERNEL_H * KERNEL_W - (1 if REMOVE_CENTER else 0)
    CENTER: tl.constexpr = (KERNEL_W // 2) * KERNEL_H + KERNEL_H // 2
    half_y = dilation_y * (KERNEL_H - 1) // 2
    half_x = dilation_x * (KERNEL_W - 1) // 2

    om_row = (
        om_ptr
        + n.to(tl.int64) * stride_om_n
        + qy * stride_om_h
        + qx * stride_om_w
        + g * (3 * POINTS) * stride_om_m
    )
    value_base = value_ptr + n.to(tl.int64) * stride_vn + (g * group_channels + d)[None, :] * stride_vc
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    for i in tl.static_range(KERNEL_W):  # x-major: k = i * kernel_h + j
        for j in tl.static_range(KERNEL_H):
            tap = i * KERNEL_H + j
            if not (REMOVE_CENTER and tap == CENTER):
                point = tap - (1 if REMOVE_CENTER and tap > CENTER else 0)
                py, px, modulation = _sample_point(
                    om_row,
                    qy,
                    qx,
                    j * dilation_y,
                    i * dilation_x,
                    point,
                    stride_om_m,
                    stride_y,
                    stride_x,
                    pad_y,
                    pad_x,
                    half_y,
                    half_x,
                    offset_scale,
                    POINTS,
                    ACC,
                    q_ok,
                )
                y0, x0, ly, lx, y0_ok, y1_ok, x0_ok, x1_ok = _corners(py, px, height, width)
                row0 = value_base + (y0 * stride_vh)[:, None]
                row1 = row0 + stride_vh
                col0 = (x0 * stride_vw)[:, None]
                col1 = col0 + stride_vw
                ok = q_ok[:, None] & d_ok[None, :]
                v00 = tl.load(row0 + col0, ok & (y0_ok & x0_ok)[:, None], 0.0).to(ACC)
                v01 = tl.load(row0 + col1, ok & (y0_ok & x1_ok)[:, None], 0.0).to(ACC)
                v10 = tl.load(row1 + col0, ok & (y1_ok & x0_ok)[:, None], 0.0).to(ACC)
                v11 = tl.load(row1 + col1, ok & (y1_ok & x1_ok)[:, None], 0.0).to(ACC)
                top = v00 + (v01 - v00) * lx[:, None]
                bottom = v10 + (v11 - v10) * lx[:, None]
                acc += modulation[:, None] * (top + (bottom - top) * ly[:, None])
    out = output_ptr + (n.to(tl.int64) * num_q + q)[:, None] * channels + (g * group_channels + d)[None, :]
    tl.store(out, acc.to(output_ptr.dtype.element_ty), q_ok[:, None] & d_ok[None, :])


@triton.jit
def _offset_resample_backward_kernel(
    value_ptr,
    om_ptr,
    grad_output_ptr,
    grad_om_ptr,
    grad_value_ptr,
    height,
    width,
    out_h,
    out_w,
    group_channels,
    padded_dim,
    stride_vn,
    stride_vh,
    stride_vw,
    stride_vc,
    stride_om_n,
    stride_om_h,
    stride_om_w,
    stride_om_m,
    stride_gn,
    stride_gh,
    stride_gw,
    stride_gc,
    stride_y,
    stride_x,
    pad_y,
    pad_x,
    dilation_y,
    dilation_x,
    offset_scale,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    REMOVE_CENTER: tl.constexpr,
    ACC: tl.constexpr,
    SCATTER_VALUE: tl.constexpr,
    OM_GRAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    num_q = out_h * out_w
    blocks_q = tl.cdiv(num_q, BLOCK_Q)
    n = tl.program_id(0) // blocks_q
    q = (tl.program_id(0) % blocks_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    g = tl.program_id(1)
    q_ok = q < num_q
    qy = q // out_w
    qx = q % out_w
    POINTS: tl.constexpr = KERNEL_H * KERNEL_W - (1 if REMOVE_CENTER else 0)
    CENTER: tl.constexpr = (KERNEL_W // 2) * KERNEL_H + KERNEL_H // 2
    half_y = dilation_y * (KERNEL_H - 1) // 2
    half_x = dilation_x * (KERNEL_W - 1) // 2

    om_row = (
        om_ptr
        + n.to(tl.int64) * stride_om_n
        + qy * stride_om_h
        + qx * stride_om_w
        + g * (3 * POINTS) * stride_om_m
    )
    grad_om_row = grad_om_ptr + (n.to(tl.int64) * num_q + q) * padded_dim + g * (3 * POINTS)
    value_n = value_ptr + n.to(tl.int64) * stride_vn
    grad_value_n = grad_value_ptr + n.to(tl.int64) * height * width * group_channels * tl.num_programs(1)
    grad_out_q = grad_output_ptr + n.to(tl.int64) * stride_gn + (qy * stride_gh + qx * stride_gw)[:, None]
    for i in tl.static_range(KERNEL_W):
        for j in tl.static_range(KERNEL_H):
            tap = i * KERNEL_H + j
            if not (REMOVE_CENTER and tap == CENTER):
                point = tap - (1 if REMOVE_CENTER and tap > CENTER else 0)
                py, px, modulation = _sample_point(
                    om_row,
                    qy,
                    qx,
                    j * dilation_y,
                    i * dilation_x,
                    point,
                    stride_om_m,
                    stride_y,
                    stride_x,
                    pad_y,
                    pad_x,
                    half_y,
                    half_x,
                    offset_scale,
                    POINTS,
                    ACC,
                    q_ok,
                )
                y0, x0, ly, lx, y0_ok, y1_ok, x0_ok, x1_ok = _corners(py, px, height, width)
                ok00 = (q_ok & y0_ok & x0_ok)[:, None]
                ok01 = (q_ok & y0_ok & x1_ok)[:, None]
                ok10 = (q_ok & y1_ok & x0_ok)[:, None]
                ok11 = (q_ok & y1_ok & x1_ok)[:, None]
                hy = (1.0 - ly)[:, None]
                hx = (1.0 - lx)[:, None]
                ly2 = ly[:, None]
                lx2 = lx[:, None]
                grad_sampled = tl.zeros((BLOCK_Q,), dtype=ACC)  # d out / d modulation
                grad_px = tl.zeros((BLOCK_Q,), dtype=ACC)
                grad_py = tl.zeros((BLOCK_Q,), dtype=ACC)
                for d_start in range(0, group_channels, BLOCK_D):
                    d = d_start + tl.arange(0, BLOCK_D)
                    d_ok = (d < group_channels)[None, :]
                    channel = (g * group_channels + d)[None, :]
                    grad = tl.load(grad_out_q + channel * stride_gc, q_ok[:, None] & d_ok, 0.0).to(ACC)
                    if OM_GRAD:
                        row0 = value_n + channel * stride_vc + (y0 * stride_vh)[:, None]
                        row1 = row0 + stride_vh
                        col0 = (x0 * stride_vw)[:, None]
                        col1 = col0 + stride_vw
                        v00 = tl.load(row0 + col0, ok00 & d_ok, 0.0).to(ACC)
                        v01 = tl.load(row0 + col1, ok01 & d_ok, 0.0).to(ACC)
                        v10 = tl.load(row1 + col0, ok10 & d_ok, 0.0).to(ACC)
                        v11 = tl.load(row1 + col1, ok11 & d_ok, 0.0).to(ACC)
                        top = v00 + (v01 - v00) * lx2
                        bottom = v10 + (v11 - v10) * lx2
                        grad_sampled += tl.sum(grad * (top + (bottom - top) * ly2), axis=1)
                        grad_px += tl.sum(grad * (hy * (v01 - v00) + ly2 * (v11 - v10)), axis=1)
                        grad_py += tl.sum(grad * (bottom - top), axis=1)
                    if SCATTER_VALUE:
                        weighted = grad * modulation[:, None]
                        cell0 = (
                            grad_value_n
                            + channel
                            + ((y0 * width + x0) * group_channels * tl.num_programs(1))[:, None]
                        )
                        cell1 = cell0 + width * group_channels * tl.num_programs(1)
                        step_x = group_channels * tl.num_programs(1)
                        tl.atomic_add(cell0, weighted * (hy * hx), ok00 & d_ok)
                        tl.atomic_add(cell0 + step_x, weighted * (hy * lx2), ok01 & d_ok)
                        tl.atomic_add(cell1, weighted * (ly2 * hx), ok10 & d_ok)
                        tl.atomic_add(cell1 + step_x, weighted * (ly2 * lx2), ok11 & d_ok)
                if OM_GRAD:
                    dtype = grad_om_ptr.dtype.element_ty
                    scale = modulation * offset_scale
                    tl.store(grad_om_row + 2 * point, (grad_px * scale).to(dtype), q_ok)
                    tl.store(grad_om_row + 2 * point + 1, (grad_py * scale).to(dtype), q_ok)
                    tl.store(grad_om_row + 2 * POINTS + point, grad_sampled.to(dtype), q_ok)


@triton.jit
def _offset_resample_destination_kernel(
    om_ptr,
    destination_ptr,
    height,
    width,
    out_h,
    out_w,
    stride_om_n,
    stride_om_h,
    stride_om_w,
    stride_om_m,
    stride_y,
    stride_x,
    pad_y,
    pad_x,
    dilation_y,
    dilation_x,
    offset_scale,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    REMOVE_CENTER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """Destination ``((n * H + y) * W + x) * G + g`` of every (n, q, g, point, corner); past-the-end if outside."""
    num_q = out_h * out_w
    blocks_q = tl.cdiv(num_q, BLOCK_Q)
    n = tl.program_id(0) // blocks_q
    q = (tl.program_id(0) % blocks_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    g = tl.program_id(1)
    groups = tl.num_programs(1)
    q_ok = q < num_q
    qy = q // out_w
    qx = q % out_w
    POINTS: tl.constexpr = KERNEL_H * KERNEL_W - (1 if REMOVE_CENTER else 0)
    CENTER: tl.constexpr = (KERNEL_W // 2) * KERNEL_H + KERNEL_H // 2
    half_y = dilation_y * (KERNEL_H - 1) // 2
    half_x = dilation_x * (KERNEL_W - 1) // 2
    outside = (tl.num_programs(0) // blocks_q).to(tl.int64) * height * width * groups

    om_row = (
        om_ptr
        + n.to(tl.int64) * stride_om_n
        + qy * stride_om_h
        + qx * stride_om_w
        + g * (3 * POINTS) * stride_om_m
    )
    out_row = destination_ptr + (((n.to(tl.int64) * num_q + q) * groups + g) * POINTS) * 4
    for i in tl.static_range(KERNEL_W):
        for j in tl.static_range(KERNEL_H):
            tap = i * KERNEL_H + j
            if not (REMOVE_CENTER and tap == CENTER):
                point = tap - (1 if REMOVE_CENTER and tap > CENTER else 0)
                py, px, _ = _sample_point(
                    om_row,
                    qy,
                    qx,
                    j * dilation_y,
                    i * dilation_x,
                    point,
                    stride_om_m,
                    stride_y,
                    stride_x,
                    pad_y,
                    pad_x,
                    half_y,
                    half_x,
                    offset_scale,
                    POINTS,
                    ACC,
                    q_ok,
                )
                y0, x0, _, _, y0_ok, y1_ok, x0_ok, x1_ok = _corners(py, px, height, width)
                cell = ((n.to(tl.int64) * height + y0) * width + x0) * groups + g
                tl.store(out_row + point * 4 + 0, tl.where(y0_ok & x0_ok, cell, outside), q_ok)
                tl.store(out_row + point * 4 + 1, tl.where(y0_ok & x1_ok, cell + groups, outside), q_ok)
                tl.store(
                    out_row + point * 4 + 2, tl.where(y1_ok & x0_ok, cell + width * groups, outside), q_ok
                )
                tl.store(
                    out_row + point * 4 + 3,
                    tl.where(y1_ok & x1_ok, cell + (width + 1) * groups, outside),
                    q_ok,
                )


@triton.jit
def _offset_resample_value_gather_kernel(
    om_ptr,
    grad_output_ptr,
    source_ptr,
    segment_ptr,
    grad_value_ptr,
    num_cells,
    out_h,
    out_w,
    group_channels,
    groups,
    stride_om_n,
    stride_om_h,
    stride_om_w,
    stride_om_m,
    stride_gn,
    stride_gh,
    stride_gw,
    stride_gc,
    stride_y,
    stride_x,
    pad_y,
    pad_x,
    dilation_y,
    dilation_x,
    offset_scale,
    height,
    width,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    REMOVE_CENTER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``grad_value`` rows (one per cell and group) as fixed-order sums of their sorted contributions."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # destination (n, y, x, g)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < num_cells
    d_ok = d < group_channels
    begin = tl.load(segment_ptr + r, r_ok, 0)
    end = tl.load(segment_ptr + r + 1, r_ok, 0)
    POINTS: tl.constexpr = KERNEL_H * KERNEL_W - (1 if REMOVE_CENTER else 0)
    CENTER: tl.constexpr = (KERNEL_W // 2) * KERNEL_H + KERNEL_H // 2
    half_y = dilation_y * (KERNEL_H - 1) // 2
    half_x = dilation_x * (KERNEL_W - 1) // 2
    num_q = out_h * out_w

    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for step in range(tl.max(end - begin, axis=0)):
        live = r_ok & (begin + step < end)
        source = tl.load(
            source_ptr + begin + step, live, 0
        )  # (((n * Q + q) * G + g) * K + point) * 4 + corner
        corner = source % 4
        point = (source // 4) % POINTS
        g = (source // (4 * POINTS)) % groups
        nq = source // (4 * POINTS * groups)
        n = nq // num_q
        q = nq % num_q
        qy = q // out_w
        qx = q % out_w
        tap = point + (1 if REMOVE_CENTER else 0) * (point >= CENTER).to(point.dtype)
        om_row = (
            om_ptr
            + n.to(tl.int64) * stride_om_n
            + qy * stride_om_h
            + qx * stride_om_w
            + g * (3 * POINTS) * stride_om_m
        )
        py, px, modulation = _sample_point(
            om_row,
            qy,
            qx,
            (tap % KERNEL_H) * dilation_y,
            (tap // KERNEL_H) * dilation_x,
            point,
            stride_om_m,
            stride_y,
            stride_x,
            pad_y,
            pad_x,
            half_y,
            half_x,
            offset_scale,
            POINTS,
            ACC,
            live,
        )
        _, _, ly, lx, _, _, _, _ = _corners(py, px, height, width)
        weight_y = tl.where(corner >= 2, ly, 1.0 - ly)
        weight_x = tl.where(corner % 2 == 1, lx, 1.0 - lx)
        weight = tl.where(live, modulation * weight_y * weight_x, 0.0)
        grad = tl.load(
            grad_output_ptr
            + (n.to(tl.int64) * stride_gn + qy * stride_gh + qx * stride_gw + g * group_channels * stride_gc)[
                :, None
            ]
            + d[None, :] * stride_gc,
            live[:, None] & d_ok[None, :],
            0.0,
        ).to(ACC)
        acc += weight[:, None] * grad
    out = grad_value_ptr + (r.to(tl.int64) * group_channels)[:, None] + d[None, :]
    tl.store(out, acc.to(grad_value_ptr.dtype.element_ty), r_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------------------ launch


def _blocks(group_channels: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D): up to 128 channels per program, 1024 elements per tile.

    The kernel points are unrolled and all their corner loads issued together; with 1024-element tiles on
    4 warps that stays under ~190 registers without spills (compiled for sm_90), 2048 spills.
    """
    block_d = min(triton.next_power_of_2(group_channels), 128)
    return max(1, 1024 // block_d), block_d


class _Geometry:
    """The op's static arguments, packed once for every launch."""

    def __init__(self, kernel_size, stride, padding, dilation, group, offset_scale, remove_center):
        self.kernel_size, self.group, self.remove_center = kernel_size, group, remove_center
        self.scalars = (*stride, *padding, *dilation, float(offset_scale))
        self.points = kernel_size[0] * kernel_size[1] - int(remove_center)

    def constants(self, dtype: torch.dtype) -> dict:
        return {
            "KERNEL_H": self.kernel_size[0],
            "KERNEL_W": self.kernel_size[1],
            "REMOVE_CENTER": bool(self.remove_center),
            "ACC": accumulator_dtypes(dtype)[1],
        }


def _forward(value, offset_mask, geometry: _Geometry):
    batch, height, width, channels = value.shape
    _, out_h, out_w, _ = offset_mask.shape
    output = value.new_empty(batch, out_h, out_w, channels)
    if output.numel() == 0:
        return output
    group_channels = channels // geometry.group
    block_q, block_d = _blocks(group_channels)
    grid = (batch * triton.cdiv(out_h * out_w, block_q), geometry.group, triton.cdiv(group_channels, block_d))
    _offset_resample_forward_kernel[grid](
        value,
        offset_mask,
        output,
        height,
        width,
        out_h,
        out_w,
        group_channels,
        channels,
        *value.stride(),
        *offset_mask.stride(),
        *geometry.scalars,
        **geometry.constants(value.dtype),
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return output


def _backward(value, offset_mask, grad_output, geometry: _Geometry, need_value, need_om, deterministic):
    batch, height, width, channels = value.shape
    _, out_h, out_w, padded_dim = offset_mask.shape
    group_channels = channels // geometry.group
    block_q, block_d = _blocks(group_channels)
    blocks_q = triton.cdiv(out_h * out_w, block_q)
    accumulator = accumulator_dtypes(value.dtype)[0]
    scatter = need_value and not deterministic
    grad_om = torch.zeros_like(offset_mask, memory_format=torch.contiguous_format) if need_om else None
    grad_value = value.new_zeros(value.shape, dtype=accumulator) if scatter else None
    constants = geometry.constants(value.dtype)
    if need_om or scatter:
        _offset_resample_backward_kernel[(batch * blocks_q, geometry.group)](
            value,
            offset_mask,
            grad_output,
            grad_om if need_om else offset_mask,  # a gradient not asked for gets a placeholder, never written
            grad_value if scatter else value,
            height,
            width,
            out_h,
            out_w,
            group_channels,
            padded_dim,
            *value.stride(),
            *offset_mask.stride(),
            *grad_output.stride(),
            *geometry.scalars,
            **constants,
            SCATTER_VALUE=scatter,
            OM_GRAD=need_om,
            BLOCK_Q=block_q,
            BLOCK_D=block_d,
            num_warps=4,
        )
    if scatter:
        grad_value = grad_value.to(value.dtype)
    elif need_value:
        grad_value = _value_grad_gather(value, offset_mask, grad_output, geometry)
    return grad_value, grad_om


def _value_grad_gather(value, offset_mask, grad_output, geometry: _Geometry):
    """Deterministic ``grad_value``: sort the contributions by destination, then sum each in that order."""
    batch, height, width, channels = value.shape
    _, out_h, out_w, _ = offset_mask.shape
    group_channels = channels // geometry.group
    constants = geometry.constants(value.dtype)
    num_cells = batch * height * width * geometry.group
    num_contributions = batch * out_h * out_w * geometry.group * geometry.points * 4
    # int32 indices sort faster and decode faster in the gather kernel
    index_dtype = torch.int32 if max(num_cells, num_contributions) < 2**31 - 1 else torch.int64
    destination = torch.empty(num_contributions, device=value.device, dtype=index_dtype)
    block_q = 64
    _offset_resample_destination_kernel[(batch * triton.cdiv(out_h * out_w, block_q), geometry.group)](
        offset_mask,
        destination,
        height,
        width,
        out_h,
        out_w,
        *offset_mask.stride(),
        *geometry.scalars,
        **constants,
        BLOCK_Q=block_q,
    )
    destination, source = torch.sort(destination, stable=True)
    source = source.to(index_dtype)
    cells = torch.arange(num_cells + 1, device=value.device, dtype=index_dtype)
    segment = torch.searchsorted(destination, cells)
    # contiguous [N, H, W, C]: row r = (n, y, x, g) holds the D channels of group g
    grad_value = value.new_empty(value.shape)
    block_r, block_d = _blocks(group_channels)
    _offset_resample_value_gather_kernel[
        (triton.cdiv(num_cells, block_r), triton.cdiv(group_channels, block_d))
    ](
        offset_mask,
        grad_output,
        source,
        segment,
        grad_value,
        num_cells,
        out_h,
        out_w,
        group_channels,
        geometry.group,
        *offset_mask.stride(),
        *grad_output.stride(),
        *geometry.scalars,
        height,
        width,
        **constants,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return grad_value


# ------------------------------------------------------------------------------------------------ operators
# torch.library.custom_op rather than triton_op: triton_op traces its body (wrap_triton) under FakeTensors,
# which Triton's interpreter cannot do, and the tests run the kernels in the interpreter (docs/ops.md).


def _geometry(value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center):
    """Check the arguments (shapes and dtypes only) and pack the static ones."""
    if value.dim() != 4 or offset_mask.dim() != 4:
        raise ValueError(
            f"expected value [N, H, W, C] and offset_mask [N, Ho, Wo, M], got {list(value.shape)} and {list(offset_mask.shape)}"
        )
    check_dtype(value, "value", "offset_resample_triton")
    if offset_mask.dtype != value.dtype:
        raise ValueError(f"offset_mask dtype {offset_mask.dtype} does not match value dtype {value.dtype}")
    if value.shape[-1] % group != 0:
        raise ValueError(f"channels ({value.shape[-1]}) must be divisible by group ({group})")
    geometry = _Geometry(
        tuple(kernel_size),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        int(group),
        offset_scale,
        bool(remove_center),
    )
    if offset_mask.shape[-1] < geometry.group * geometry.points * 3:
        raise ValueError(
            f"offset_mask has {offset_mask.shape[-1]} channels, needs at least group * 3 * points = "
            f"{geometry.group * geometry.points * 3}"
        )
    return geometry


@torch.library.custom_op("dynrefer::offset_resample_triton", mutates_args=())
def offset_resample_triton(
    value: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    group: int,
    offset_scale: float,
    remove_center: bool,
    deterministic: bool = False,
) -> torch.Tensor:
    """DCNv4's sampling op on Triton kernels (differentiable in ``value`` and ``offset_mask``).

    The operator ``dynrefer::offset_resample_triton``.

    Args:
        value: ``[N, H, W, C]`` channels last (any strides); group g owns channels ``[g*C/G, (g+1)*C/G)``.
        offset_mask: ``[N, H_out, W_out, M]``, same dtype; per group ``K`` (dx, dy) pairs then ``K`` masks;
            channels from ``group * 3K`` on are padding (ignored, zero gradient).
        kernel_size, stride, padding, dilation: ``(h, w)`` pairs.
        group: number of groups G (divides C).
        offset_scale: scales the tap grid and the offsets.
        remove_center: drop the centre tap.
        deterministic: backward without float atomics (bitwise reproducible).

    Returns:
        ``[N, H_out, W_out, C]`` contiguous, in the dtype of ``value``.
    """
    geometry = _geometry(
        value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center
    )
    with on_device(value):
        return _forward(value, offset_mask, geometry)


@offset_resample_triton.register_fake
def _(
    value,
    offset_mask,
    kernel_size,
    stride,
    padding,
    dilation,
    group,
    offset_scale,
    remove_center,
    deterministic=False,
):
    _geometry(value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center)
    return value.new_empty(*offset_mask.shape[:3], value.shape[3])


@torch.library.custom_op("dynrefer::offset_resample_triton_backward", mutates_args=())
def _offset_resample_triton_backward(
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
    deterministic: bool,
    need_value: bool,
    need_offset_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_value, grad_offset_mask)``, contiguous; a gradient not asked for is an empty ``[0]`` tensor."""
    geometry = _geometry(
        value, offset_mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center
    )
    if grad_output.numel() == 0:
        grad_value, grad_om = torch.zeros_like(value), torch.zeros_like(offset_mask)
    else:
        with on_device(value):
            grad_value, grad_om = _backward(
                value, offset_mask, grad_output, geometry, need_value, need_offset_mask, deterministic
            )
    return (
        grad_value.contiguous() if need_value else value.new_empty(0),
        grad_om.contiguous() if need_offset_mask else offset_mask.new_empty(0),
    )


@_offset_resample_triton_backward.register_fake
def _(grad_output, value, offset_mask, *config):
    need_value, need_offset_mask = config[-2:]
    return (
        value.new_empty(value.shape if need_value else (0,)),
        offset_mask.new_empty(offset_mask.shape if need_offset_mask else (0,)),
    )


def _setup_context(ctx, inputs, output):
    value, offset_mask, *config = inputs
    ctx.save_for_backward(value, offset_mask)
    ctx.config = config


def _grad(ctx, grad_output):
    value, offset_mask = ctx.saved_tensors
    need_value, need_offset_mask = ctx.needs_input_grad[:2]
    grad_value = grad_om = None
    if need_value or need_offset_mask:
        grad_value, grad_om = _offset_resample_triton_backward(
            grad_output, value, offset_mask, *ctx.config, need_value, need_offset_mask
        )
    return (
        grad_value if need_value else None,
        grad_om if need_offset_mask else None,
        None, None, None, None, None, None, None, None,
    )  # fmt: skip


offset_resample_triton.register_autograd(_grad, setup_context=_setup_context)
register_float32_autocast("dynrefer::offset_resample_triton", (0,))
register_float32_autocast("dynrefer::offset_resample_triton_backward", (1, 2))


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
    """The triton backend's ``offset_resample`` kernel (the schema of ops/backends.py)."""
    return torch.ops.dynrefer.offset_resample_triton(
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
    )
