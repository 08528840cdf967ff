"""The pure-PyTorch reference ops against slow scalar loops that follow docs/upstream/model.md §3 / §4.4 literally."""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dynrefer_hf import ops
from dynrefer_hf.ops import RoIAlign, offset_resample, resolve_backend, roi_align

REF = {"backend": "reference"}


# ------------------------------------------------------------------------------------- slow loop oracles


def roi_bilinear_loop(feature, y, x):
    """torchvision's legacy bilinear sample of ``feature [C, H, W]`` at ``(y, x)`` (docs/upstream/model.md §3)."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def roi_align_loop(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """One box, one bin, one sample at a time, in float64."""
    features = input.double().numpy()
    out_h, out_w = output_size
    out = np.zeros((len(rois), features.shape[1], out_h, out_w))
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w = x2 * spatial_scale - offset - start_x
        roi_h = y2 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                total = np.zeros(features.shape[1])
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += roi_bilinear_loop(features[int(b)], y, x)
                out[k, :, ph, pw] = total / count
    return torch.from_numpy(out)


def bilinear_zero_loop(image, y, x):
    """Bilinear sample of ``image [H, W, D]`` with zero padding (docs/upstream/model.md §4.4 ``bilinear0``)."""
    height, width, depth = image.shape
    if y <= -1 or x <= -1 or y >= height or x >= width:
        return np.zeros(depth)
    y0, x0 = math.floor(y), math.floor(x)
    total = np.zeros(depth)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                total += wy * wx * image[yy, xx]
    return total


def offset_resample_loop(value, offset_mask, kernel, stride, pad, dilation, group, scale, remove_center):
    """One output position, group and kernel point at a time, in float64 (square kernel/stride/pad)."""
    value, offset_mask = value.double().numpy(), offset_mask.double().numpy()
    batch, _, _, channels = value.shape
    _, out_h, out_w, _ = offset_mask.shape
    depth = channels // group
    taps = [(i, j) for i in range(kernel) for j in range(kernel)]  # x-major: k = i * kernel + j
    if remove_center:
        taps.remove((kernel // 2, kernel // 2))
    points = len(taps)
    half = dilation * (kernel - 1) // 2
    out = np.zeros((batch, out_h, out_w, channels))
    for n in range(batch):
        for yo in range(out_h):
            for xo in range(out_w):
                for g in range(group):
                    base = g * points * 3
                    for k, (i, j) in enumerate(taps):
                        dx = offset_mask[n, yo, xo, base + 2 * k]
                        dy = offset_mask[n, yo, xo, base + 2 * k + 1]
                        mask = offset_mask[n, yo, xo, base + 2 * points + k]
                        px = xo * stride - pad + half - half * scale + (i * dilation + dx) * scale
                        py = yo * stride - pad + half - half * scale + (j * dilation + dy) * scale
                        sample = bilinear_zero_loop(value[n, :, :, g * depth : (g + 1) * depth], py, px)
                        out[n, yo, xo, g * depth : (g + 1) * depth] += mask * sample
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------- roi_align


def random_rois(generator, count, batch, extent):
    """Boxes of every kind: inside, partly and fully outside, zero-size, inverted, tiny."""
    corners = torch.rand(count, 2, generator=generator, dtype=torch.float64) * (1.6 * extent) - 0.3 * extent
    sizes = torch.rand(count, 2, generator=generator, dtype=torch.float64) * extent * 0.8
    sizes[: count // 6] = 0.0  # zero-size boxes
    sizes[count // 6 : count // 4] *= -0.2  # inverted boxes (x2 < x1)
    index = torch.randint(0, batch, (count, 1), generator=generator).double()
    return torch.cat([index, corners, corners + sizes], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0, -1])
def test_roi_align_matches_loop(aligned, sampling_ratio):
    generator = torch.Generator().manual_seed(10 * aligned + sampling_ratio)
    input = torch.randn(3, 2, 9, 11, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 24, batch=3, extent=44.0)
    rois = torch.cat([rois, torch.tensor([[0.0, 0.0, 0.0, 44.0, 36.0], [2.0, 40.0, 32.0, 44.0, 36.0]])])
    out = roi_align(input, rois, (7, 5), 0.25, sampling_ratio, aligned, **REF)
    expected = roi_align_loop(input, rois, (7, 5), 0.25, sampling_ratio, aligned)
    assert out.shape == (26, 2, 7, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert out.abs().sum() > 0


def test_roi_align_dynrefer_shape_and_list_form():
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64)
    xy = torch.randint(0, 150, (5, 2), generator=generator).double()
    boxes = [torch.cat([xy[:3], xy[:3] + 70], 1), torch.cat([xy[3:], xy[3:] + 40], 1)]
    out = roi_align(input, boxes, 16, 1 / 14, 2, **REF)
    rois = torch.cat([torch.tensor([[0.0]] * 3 + [[1.0]] * 2), torch.cat(boxes)], 1)
    torch.testing.assert_close(
        out, roi_align_loop(input, rois, (16, 16), 1 / 14, 2, False), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(roi_align(input, rois, 16, 1 / 14, 2, **REF), out, rtol=0, atol=0)
    module = RoIAlign(16, 1 / 14, 2, backend="reference")
    torch.testing.assert_close(module(input, boxes), out, rtol=0, atol=0)
    assert "sampling_ratio=2" in repr(module)


def test_roi_align_float32_matches_loop():
    generator = torch.Generator().manual_seed(2)
    input = torch.randn(2, 4, 12, 12, generator=generator)
    rois = random_rois(generator, 16, batch=2, extent=12.0).float()
    out = roi_align(input, rois, 4, 1.0, -1, True, **REF)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), roi_align_loop(input, rois, (4, 4), 1.0, -1, True), rtol=1e-5, atol=1e-5
    )


def test_roi_align_full_view_is_not_identity():
    """docs/upstream/model.md §3: the t = 0 view box [0, 0, 224, 224] averages 2x2 cells shifted by half a patch."""
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(1, 2, 16, 16, generator=generator, dtype=torch.float64)
    out = roi_align(
        input, torch.tensor([[0.0, 0.0, 0.0, 224.0, 224.0]], dtype=torch.float64), 16, 1 / 14, 2, **REF
    )[0]
    # Samples at p + 0.25 and p + 0.75 weight cells p and p + 1 by 1/2 each; row/column 15 clamps to itself.
    nxt = torch.clamp(torch.arange(16) + 1, max=15)
    x = input[0]
    expected = 0.25 * (x + x[:, nxt] + x[:, :, nxt] + x[:, nxt][:, :, nxt])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 15, 15], x[:, 15, 15])
    assert not torch.allclose(out, x, atol=1e-3)


def test_roi_align_samples_exactly_on_the_legacy_border():
    """A sample at exactly y = -1 or y = H still counts (torchvision drops only y < -1 or y > H)."""
    input = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) + 1
    rois = torch.tensor(
        [
            [0, 1.5, -1.5, 2.5, -0.5],
            [0, 0.5, 3.5, 1.5, 4.5],
            [0, 1.5, -1.6, 2.5, -0.6],
            [0, -1.5, 0.5, -0.5, 1.5],
        ],
        dtype=torch.float64,
    )  # one sample per box, at (x, y) = (2, -1), (1, 4), (2, -1.1), (-1, 1)
    out = roi_align(input, rois, 1, 1.0, 1, **REF).flatten()
    expected = torch.stack([input[0, 0, 0, 2], input[0, 0, 3, 1], input.new_tensor(0.0), input[0, 0, 1, 0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_roi_align_gradcheck():
    generator = torch.Generator().manual_seed(4)
    input = torch.randn(2, 2, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.8, 4.1, 5.2], [1, -1.5, 2.0, 3.3, 9.0], [1, 2.2, 2.2, 2.2, 2.2], [0, 4.0, 3.5, 8.5, 7.9]]
    )
    rois = rois.double()
    for sampling_ratio, aligned in ((2, False), (-1, True)):
        assert torch.autograd.gradcheck(
            lambda x, ratio=sampling_ratio, shift=aligned: roi_align(
                x, rois, (3, 2), 1.0, ratio, shift, **REF
            ),
            (input,),
            fast_mode=True,
        )


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_roi_align_half_precision_close_to_float32(dtype, tolerance):
    generator = torch.Generator().manual_seed(5)
    input = torch.randn(2, 8, 16, 16, generator=generator).to(dtype)
    rois = torch.tensor([[0, 0, 0, 224, 224], [1, 14, 28, 140, 210], [1, 100, 3, 101, 200]], dtype=dtype)
    out = roi_align(input, rois, 16, 1 / 14, 2, **REF)
    expected = roi_align(input.float(), rois.float(), 16, 1 / 14, 2, **REF)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------------------------------- offset_resample


@pytest.mark.parametrize(
    "kernel, stride, pad, dilation, group, scale, remove_center",
    [
        (3, 1, 1, 1, 2, 1.0, False),
        (3, 1, 1, 1, 2, 0.7, False),
        (3, 2, 1, 1, 1, 1.0, False),
        (3, 1, 0, 2, 2, 1.3, False),
        (3, 1, 1, 1, 2, 1.0, True),
        (5, 2, 2, 1, 1, 0.5, True),
    ],
)
def test_offset_resample_matches_loop(kernel, stride, pad, dilation, group, scale, remove_center):
    generator = torch.Generator().manual_seed(kernel * 100 + stride * 10 + dilation + int(remove_center))
    value = torch.randn(2, 6, 7, 4 * group, generator=generator, dtype=torch.float64)
    points = kernel * kernel - int(remove_center)
    out_h = (6 + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    out_w = (7 + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1
    offset_mask = torch.randn(
        2, out_h, out_w, group * points * 3 + 3, generator=generator, dtype=torch.float64
    )
    offset_mask[..., :] *= 2.5  # offsets push many samples outside the map
    args = (kernel, stride, pad, dilation, group, scale, remove_center)
    out = offset_resample(value, offset_mask, *args, **REF)
    assert out.shape == (2, out_h, out_w, 4 * group) and out.dtype == torch.float64
    torch.testing.assert_close(out, offset_resample_loop(value, offset_mask, *args), rtol=1e-10, atol=1e-10)


def test_offset_resample_float32_matches_loop():
    generator = torch.Generator().manual_seed(9)
    value = torch.randn(1, 8, 8, 8, generator=generator)
    offset_mask = torch.randn(1, 8, 8, 112, generator=generator) * 3
    out = offset_resample(value, offset_mask, **REF)
    assert out.dtype == torch.float32
    expected = offset_resample_loop(value, offset_mask, 3, 1, 1, 1, 4, 1.0, False)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_offset_resample_kernel_points_are_x_major():
    """A single mask of 1 at kernel point k = 3 i + j reads the neighbour (x + i - 1, y + j - 1)."""
    height, width = 4, 5
    positions = torch.arange(height * width, dtype=torch.float64).view(1, height, width, 1) + 1
    value = torch.cat([positions, -positions], dim=-1)  # group 0: +position, group 1: -position
    padded = torch.nn.functional.pad(value[0, :, :, 0], (1, 1, 1, 1))
    for k in range(9):
        i, j = divmod(k, 3)
        offset_mask = torch.zeros(1, height, width, 56, dtype=torch.float64)
        offset_mask[..., 18 + k] = 1.0  # group 0 mask of point k
        offset_mask[..., 27 + 18 + 4] = 0.5  # group 1 centre point
        out = offset_resample(value, offset_mask, group=2, **REF)
        neighbour = padded[j : j + height, i : i + width]  # value at (y + j - 1, x + i - 1), zero outside
        torch.testing.assert_close(out[0, :, :, 0], neighbour)
        torch.testing.assert_close(out[0, :, :, 1], -0.5 * positions[0, :, :, 0])


def test_offset_resample_padded_channels_get_zero_gradient():
    generator = torch.Generator().manual_seed(6)
    value = torch.randn(1, 5, 5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    offset_mask = torch.randn(1, 5, 5, 112, generator=generator, dtype=torch.float64, requires_grad=True)
    out = offset_resample(value, offset_mask, group=4, **REF)
    out.square().sum().backward()
    assert torch.all(offset_mask.grad[..., 108:] == 0)
    assert offset_mask.grad[..., :108].abs().sum() > 0 and value.grad.abs().sum() > 0
    changed = offset_mask.detach().clone()
    changed[..., 108:] = 1e6  # ignored channels do not change the output
    torch.testing.assert_close(
        offset_resample(value.detach(), changed, group=4, **REF), out.detach(), rtol=0, atol=0
    )


def test_offset_resample_gradcheck():
    generator = torch.Generator().manual_seed(7)
    value = torch.randn(1, 4, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    offset_mask = (
        torch.rand(1, 4, 5, 56, generator=generator, dtype=torch.float64) * 3 - 1.5
    ).requires_grad_()
    for args in ((3, 1, 1, 1, 2, 1.0, False), (3, 2, 1, 1, 2, 0.6, True)):
        mask = offset_mask if args[1] == 1 else offset_mask[:, ::2, ::2]
        assert torch.autograd.gradcheck(
            lambda v, m, args=args: offset_resample(v, m, *args, **REF), (value, mask), fast_mode=True
        )


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_offset_resample_half_precision_close_to_float32(dtype, tolerance):
    generator = torch.Generator().manual_seed(8)
    value = torch.randn(2, 8, 8, 16, generator=generator).to(dtype)
    offset_mask = torch.randn(2, 8, 8, 112, generator=generator).to(dtype)
    out = offset_resample(value, offset_mask, **REF)
    expected = offset_resample(value.float(), offset_mask.float(), **REF)
    assert out.dtype == dtype
    scale = expected.abs().max()
    torch.testing.assert_close(out.float() / scale, expected / scale, rtol=tolerance, atol=tolerance)


def test_non_contiguous_inputs_and_no_boxes():
    generator = torch.Generator().manual_seed(11)
    nchw = torch.randn(2, 16, 6, 6, generator=generator)
    value = nchw.permute(0, 2, 3, 1)  # channels-last view of an NCHW tensor
    offset_mask = torch.randn(2, 112, 6, 6, generator=generator).permute(0, 2, 3, 1)
    assert not value.is_contiguous() and not offset_mask.is_contiguous()
    torch.testing.assert_close(
        offset_resample(value, offset_mask, **REF),
        offset_resample(value.contiguous(), offset_mask.contiguous(), **REF),
        rtol=0,
        atol=0,
    )
    rois = torch.tensor([[1.0, 0.5, 1.0, 4.0, 5.5], [0.0, 2.0, 2.0, 3.0, 6.0]])
    features = nchw.transpose(2, 3)
    torch.testing.assert_close(
        roi_align(features, rois, 3, **REF), roi_align(features.contiguous(), rois, 3, **REF), rtol=0, atol=0
    )
    assert roi_align(features, torch.zeros(0, 5), 3, **REF).shape == (0, 16, 3, 3)
    assert roi_align(features, [torch.zeros(0, 4), torch.zeros(0, 4)], 3, **REF).shape == (0, 16, 3, 3)


# ------------------------------------------------------------------------------------------------ errors


def _value():
    return torch.zeros(1, 4, 4, 8)


def _offset_mask(channels=112):
    return torch.zeros(1, 4, 4, channels)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: roi_align(torch.zeros(2, 3, 4), torch.zeros(1, 5), 2), r"input must be \[N, C, H, W\]"),
        (
            lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4), 2),
            r"boxes as a tensor must be \[K, 5\]",
        ),
        (
            lambda: roi_align(torch.zeros(1, 1, 4, 4), [torch.zeros(2, 5)], 2),
            r"boxes\[0\] must be a \[L, 4\]",
        ),
        (lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.full((1, 5), float("nan")), 2), "NaN or infinite"),
        (lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[1.0, 0, 0, 1, 1]]), 2), "batch indices"),
        (
            lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5).double(), 2),
            "does not match input dtype",
        ),
        (
            lambda: roi_align(torch.zeros(1, 1, 4, 4, dtype=torch.int64), torch.zeros(1, 5), 2),
            "input must be float",
        ),
        (lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (2, 0)), "output_size must be >= 1"),
        (
            lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, backend="cuda"),
            "ops backend must be",
        ),
        (lambda: offset_resample(torch.zeros(4, 4, 8), _offset_mask()), r"value must be \[N, H, W, C\]"),
        (
            lambda: offset_resample(torch.zeros(1, 4, 4, 6), _offset_mask()),
            r"channels \(6\) must be divisible",
        ),
        (lambda: offset_resample(_value(), _offset_mask(100)), "at least group\\*K\\*3 = 4\\*9\\*3 = 108"),
        (lambda: offset_resample(_value(), torch.zeros(1, 3, 4, 112)), r"offset_mask must be \[1, 4, 4, M\]"),
        (lambda: offset_resample(_value(), _offset_mask().double()), "does not match value dtype"),
        (lambda: offset_resample(_value(), _offset_mask(), kernel_size=2, remove_center=True), "odd kernel"),
        (lambda: offset_resample(_value(), _offset_mask(), stride=0), "stride must be >= 1"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: roi_align(np.zeros((1, 1, 4, 4)), torch.zeros(1, 5), 2), "input must be a torch.Tensor"),
        (lambda: roi_align(torch.zeros(1, 1, 4, 4), np.zeros((1, 5)), 2), "boxes must be a Tensor"),
        (
            lambda: roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, 2.0),
            "sampling_ratio must be",
        ),
    ],
)
def test_wrong_argument_types_raise_type_error(call, message):
    with pytest.raises(TypeError, match=message):
        call()


# -------------------------------------------------------------------------------------------------- dispatch


def test_backend_resolution(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DYNREFER_OPS_BACKEND", "auto")
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(None, cpu) == "triton"
    monkeypatch.setenv("DYNREFER_OPS_BACKEND", "reference")
    assert resolve_backend(None, cpu) == "reference"
    monkeypatch.setenv("DYNREFER_OPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="DYNREFER_OPS_BACKEND"):
        resolve_backend(None, cpu)


def test_missing_kernel_falls_back_in_auto_and_fails_when_asked(monkeypatch):
    triton = ops.get_backend("triton")
    broken = dataclasses.replace(
        triton, kernels={**triton.kernels, "roi_align": "dynrefer_hf.ops.no_such_kernel:x"}
    )
    monkeypatch.setitem(ops.backends._REGISTRY, "triton", broken)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    input, rois = torch.randn(1, 2, 5, 5), torch.tensor([[0.0, 0.5, 0.5, 3.0, 4.0]])
    expected = roi_align(input, rois, 2, backend="reference")
    torch.testing.assert_close(roi_align(input, rois, 2, backend="auto"), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backend='triton'.*no_such_kernel"):
        roi_align(input, rois, 2, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="need a CUDA tensor or TRITON_INTERPRET=1"):
        offset_resample(_value(), _offset_mask(), backend="triton")


def test_a_registered_backend_is_dispatched_to(monkeypatch):
    # docs/ops.md, "Adding a backend": one module with the kernels, one register_backend call
    calls = []

    def stub_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned, deterministic):
        calls.append(deterministic)
        return (
            torch.ops.dynrefer.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned) + 1
        )

    ops.register_backend(
        ops.Backend("stub", kernels={"roi_align": stub_roi_align}, automatic=lambda d: d == "cpu")
    )
    try:
        input, rois = torch.randn(1, 2, 5, 5), torch.tensor([[0.0, 0.5, 0.5, 3.0, 4.0]])
        expected = roi_align(input, rois, 2, backend="reference") + 1
        assert "stub" in ops.backend_names()
        torch.testing.assert_close(roi_align(input, rois, 2, backend="stub"), expected, rtol=0, atol=0)
        monkeypatch.setenv("DYNREFER_OPS_BACKEND", "stub")
        torch.testing.assert_close(RoIAlign(2, 1.0, -1)(input, rois), expected, rtol=0, atol=0)
        monkeypatch.setenv("DYNREFER_OPS_BACKEND", "auto")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        torch.testing.assert_close(roi_align(input, rois, 2, deterministic=True), expected, rtol=0, atol=0)
        assert calls == [False, False, True]
        # an op the backend lacks: refused when asked for, the reference in auto mode
        with pytest.raises(RuntimeError, match="backend='stub' was asked for offset_resample, but it has no"):
            offset_resample(_value(), _offset_mask(), backend="stub")
        torch.testing.assert_close(
            offset_resample(_value(), _offset_mask()),
            offset_resample(_value(), _offset_mask(), backend="reference"),
        )
        with pytest.raises(ValueError, match="registered already"):
            ops.register_backend(ops.Backend("stub", kernels={}))
    finally:
        ops.unregister_backend("stub")
    with pytest.raises(ValueError, match="must be one of"):
        roi_align(input, rois, 2, backend="stub")


def test_a_backend_whose_kernel_does_not_take_the_schema_is_refused():
    def wrong(input, boxes, output_size):
        return input

    with pytest.raises(
        TypeError, match=r"the roi_align kernel of the ops backend 'wrong' must take \(input, rois,"
    ):
        ops.register_backend(ops.Backend("wrong", kernels={"roi_align": wrong}))
    with pytest.raises(ValueError, match="unknown ops"):
        ops.register_backend(ops.Backend("wrong", kernels={"deform_conv": wrong}))
    assert "wrong" not in ops.backend_names()


@pytest.mark.slow
def test_import_and_auto_backend_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, dynrefer_hf, dynrefer_hf.ops as ops\n"
        "assert ops.resolve_backend('auto', torch.zeros(1)) == 'reference'\n"
        "print(ops.offset_resample(torch.zeros(1, 4, 4, 8), torch.zeros(1, 4, 4, 108)).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DYNREFER_OPS_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 4, 4, 8])" in result.stdout


# ------------------------------------------------------------------------------------------------ operators


def _roi_case(dtype=torch.float64):
    generator = torch.Generator().manual_seed(12)
    input = torch.randn(2, 3, 6, 7, generator=generator, dtype=dtype, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.8, 4.1, 5.2], [1, -1.5, 2.0, 3.3, 9.0], [1, 2.2, 2.2, 2.2, 2.2], [0, 4.0, 3.5, 8.5, 7.9]],
        dtype=dtype,
    )
    return input, rois


def _offset_case(dtype=torch.float64):
    generator = torch.Generator().manual_seed(13)
    value = torch.randn(2, 4, 5, 8, generator=generator, dtype=dtype, requires_grad=True)
    offset_mask = (torch.randn(2, 4, 5, 56, generator=generator, dtype=dtype) * 2).requires_grad_()
    return value, offset_mask


DCN_ARGS = ([3, 3], [1, 1], [1, 1], [1, 1], 2, 1.0, False)


@pytest.mark.slow
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (-1, True)])
def test_roi_align_operator_opcheck(sampling_ratio, aligned):
    """Schema, fake implementation, autograd registration and AOT tracing of dynrefer::roi_align."""
    input, rois = _roi_case()
    for args in ((input, rois), (input.float(), rois.float())):
        result = torch.library.opcheck(
            torch.ops.dynrefer.roi_align, (*args, [3, 2], 0.5, sampling_ratio, aligned)
        )
        assert set(result.values()) == {"SUCCESS"}, result
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.dynrefer.roi_align(x, rois, [3, 2], 0.5, sampling_ratio, aligned), (input,)
    )


def test_offset_resample_operator_opcheck():
    value, offset_mask = _offset_case()
    for args in ((value, offset_mask), (value.float(), offset_mask.float())):
        result = torch.library.opcheck(torch.ops.dynrefer.offset_resample, (*args, *DCN_ARGS))
        assert set(result.values()) == {"SUCCESS"}, result


def test_backward_operators_match_autograd_of_the_reference():
    """The explicit backward operators give the gradients autograd computes through the reference."""
    input, rois = _roi_case()
    grad = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    (expected,) = torch.autograd.grad(
        ops.reference.roi_align_reference(input, rois, (3, 2), 0.5, -1, False), input, grad
    )
    (actual,) = torch.autograd.grad(roi_align(input, rois, (3, 2), 0.5, -1, **REF), input, grad)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    value, offset_mask = _offset_case()
    out = offset_resample(value, offset_mask, group=2, **REF)
    grad = torch.randn(out.shape, dtype=torch.float64)
    expected = torch.autograd.grad(
        ops.reference.offset_resample_reference(
            value, offset_mask, (3, 3), (1, 1), (1, 1), (1, 1), 2, 1.0, False
        ),
        (value, offset_mask),
        grad,
    )
    torch.testing.assert_close(torch.autograd.grad(out, (value, offset_mask), grad), expected, rtol=0, atol=0)


def test_autocast_computes_in_float32_like_torchvision():
    """Inside CPU autocast: float32 math for float32 inputs, mixed box/input dtypes accepted (torchvision's rule)."""
    input, rois = _roi_case(torch.float32)
    expected = roi_align(input, rois, 4, 0.5, 2, **REF)
    value, offset_mask = _offset_case(torch.float32)
    expected_dcn = offset_resample(value, offset_mask, group=2, **REF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = roi_align(input, rois, 4, 0.5, 2, **REF)
        mixed = roi_align(input.bfloat16(), rois, 4, 0.5, 2, **REF)  # bf16 map, float32 boxes
        dcn = offset_resample(value, offset_mask, group=2, **REF)
        dcn_mixed = offset_resample(value, offset_mask.bfloat16(), group=2, **REF)
        (grad,) = torch.autograd.grad(same.sum(), input)
    assert same.dtype == torch.float32 and mixed.dtype == torch.bfloat16 and grad.dtype == torch.float32
    torch.testing.assert_close(same, expected, rtol=0, atol=0)
    torch.testing.assert_close(dcn, expected_dcn, rtol=0, atol=0)
    torch.testing.assert_close(mixed, roi_align(input.bfloat16().float(), rois, 4, 0.5, 2, **REF).bfloat16())
    assert dcn_mixed.dtype == torch.float32
    torch.testing.assert_close(
        dcn_mixed, offset_resample(value, offset_mask.bfloat16().float(), group=2, **REF), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="does not match input dtype"):  # outside autocast, as torchvision
        roi_align(input.bfloat16(), rois, 4, 0.5, 2, **REF)


def test_value_checks_are_opt_out_in_eager_and_off_when_compiling(monkeypatch):
    input = torch.zeros(1, 1, 4, 4)
    bad = torch.tensor([[3.0, 0, 0, 1, 1]])  # batch index out of range
    with pytest.raises(ValueError, match="batch indices"):
        roi_align(input, bad, 2, **REF)
    monkeypatch.setenv("DYNREFER_OPS_CHECK_VALUES", "0")
    with pytest.raises((IndexError, RuntimeError)):  # unchecked: index_select itself refuses
        roi_align(input, bad, 2, **REF)
    monkeypatch.delenv("DYNREFER_OPS_CHECK_VALUES")
    fractional = torch.tensor([[0.5, 0, 0, 1, 1]])  # rejected when checked, truncated to image 0 when not
    with pytest.raises(ValueError, match="batch indices"):
        roi_align(input, fractional, 2, **REF)
    assert roi_align(input, fractional, 2, check_values=False, **REF).shape == (1, 1, 2, 2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ops._check_values(None) and ops._check_values(True)
