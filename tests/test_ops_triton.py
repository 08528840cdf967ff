"""Triton kernels of the two sampling ops against the PyTorch references (docs/upstream/model.md §3 and §4.4).

On a CPU machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
triton is imported), where every program instance costs ~20 ms: shapes here are tiny. On a GPU machine run
with ``TRITON_INTERPRET=0`` to test the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'dynrefer_hf[triton]')")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from dynrefer_hf import ops
from dynrefer_hf.ops import triton_offset_resample, triton_roi_align
from dynrefer_hf.ops.reference import offset_resample_reference, roi_align_reference
from dynrefer_hf.ops.triton_offset_resample import offset_resample_triton
from dynrefer_hf.ops.triton_roi_align import roi_align_triton

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel and reference both compute in fp32 from the same inputs; half results may differ by a rounding step.
TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
}


def _grads(output: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Gradients of ``sum(output * w)`` for a fixed random ``w``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(output.shape, generator=generator).to(output)
    return torch.autograd.grad(output, inputs, weight)


# ------------------------------------------------------------------------------------------------ roi_align

# Map 6x7 at spatial_scale 0.5 (cells 2 px): a box inside, one overlapping the right/bottom border, one fully
# outside, one of zero size, one with negative start.
ROIS = [
    [0, 1.0, 2.0, 9.0, 8.0],
    [1, 6.0, 4.0, 20.0, 17.0],
    [0, 30.0, 30.0, 40.0, 36.0],
    [1, 5.0, 5.0, 5.0, 5.0],
    [1, -4.0, -3.0, 3.0, 6.5],
]


def _roi_case(dtype, channels=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(2, channels, 6, 7, generator=generator).to(DEVICE, dtype)
    rois = torch.tensor(ROIS, device=DEVICE, dtype=dtype)
    return input, rois


def _check_roi_align(input, rois, output_size, sampling_ratio, aligned, tolerance, deterministic=False):
    input = input.detach().requires_grad_()
    args = (output_size, 0.5, sampling_ratio, aligned)
    expected = roi_align_reference(input, rois, *args)
    actual = roi_align_triton(input, rois, *args, deterministic=deterministic)
    assert actual.shape == expected.shape and actual.dtype == input.dtype
    torch.testing.assert_close(actual, expected, **tolerance)
    torch.testing.assert_close(_grads(actual, (input,)), _grads(expected, (input,)), **tolerance)
    return actual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roi_align_matches_reference_per_dtype(dtype):
    input, rois = _roi_case(dtype)
    output = _check_roi_align(input, rois, (3, 4), 2, False, TOLERANCE[dtype])
    assert output[2].abs().max() == 0  # the box outside the map reads nothing
    assert output[3].abs().max() > 0  # legacy mode grows the zero-size box to one cell


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0], ids=["fixed", "adaptive"])
def test_roi_align_modes(aligned, sampling_ratio):
    input, rois = _roi_case(torch.float32)
    output = _check_roi_align(input, rois, (3, 4), sampling_ratio, aligned, TOLERANCE[torch.float32])
    if aligned and sampling_ratio == 0:
        assert output[3].abs().max() == 0  # an empty aligned box has no samples


@pytest.mark.slow
def test_roi_align_deterministic_backward_bitwise():
    """Overlapping boxes on one image: the gather backward sums them in a fixed order."""
    input, _ = _roi_case(torch.float32)
    rois = torch.tensor(
        [[1, 0.0, 0.0, 9.0, 9.0], [0, 2.0, 1.0, 12.0, 8.0], [1, 1.0, 2.0, 8.0, 11.0]], device=DEVICE
    )
    for sampling_ratio in (2, -1):
        _check_roi_align(
            input, rois, (4, 4), sampling_ratio, True, TOLERANCE[torch.float32], deterministic=True
        )
    input = input.requires_grad_()
    runs = [
        _grads(roi_align_triton(input, rois, (4, 4), 0.5, 2, False, deterministic=True), (input,))[0]
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_roi_align_deterministic_backward_half(dtype):
    input, rois = _roi_case(dtype)
    _check_roi_align(input, rois, (3, 4), 2, False, TOLERANCE[dtype], deterministic=True)


def test_roi_align_non_contiguous_inputs():
    """A channels-last view (DynRefer's patch tokens), a strided box tensor and a stride-0 upstream gradient."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 6 * 7, 8, generator=generator).to(DEVICE)
    input = tokens.unflatten(1, (6, 7)).permute(0, 3, 1, 2).requires_grad_()  # [2, 8, 6, 7], channel stride 1
    assert not input.is_contiguous()
    wide = torch.zeros(len(ROIS), 10, device=DEVICE)
    wide[:, ::2] = torch.tensor(ROIS, device=DEVICE)
    rois = wide[:, ::2]
    assert not rois.is_contiguous()
    for deterministic in (False, True):
        actual = roi_align_triton(input, rois, (3, 3), 0.5, 2, False, deterministic=deterministic)
        expected = roi_align_reference(input, rois.contiguous(), (3, 3), 0.5, 2, False)
        torch.testing.assert_close(actual, expected)
        (grad_actual,) = torch.autograd.grad(actual.sum(), input)  # upstream gradient is an expanded view
        (grad_expected,) = torch.autograd.grad(expected.sum(), input)
        torch.testing.assert_close(grad_actual, grad_expected)
        # a channels-last input gives channels-last results, so the tokens view back without a copy
        assert actual.is_contiguous(memory_format=torch.channels_last)
        assert grad_actual.stride() == input.stride()


def test_roi_align_no_boxes():
    input, rois = _roi_case(torch.float32)
    input.requires_grad_()
    output = roi_align_triton(input, rois[:0], (3, 3), 0.5, 2, False)
    assert output.shape == (0, 8, 3, 3)
    (grad,) = torch.autograd.grad(output.sum(), input)
    assert torch.equal(grad, torch.zeros_like(input))


# ------------------------------------------------------------------------------------------ offset_resample

DCN = {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "group": 2,
       "offset_scale": 1.0, "remove_center": False}  # fmt: skip


def _offset_case(dtype, config=DCN, size=(4, 5), channels=8, pad_to=8, seed=0):
    """value [1, H, W, C] and offset_mask [1, Ho, Wo, M] with offsets large enough to leave the map."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        config[k] for k in ("kernel_size", "stride", "padding", "dilation")
    )
    height, width = size
    out_h = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    used = config["group"] * (kh * kw - int(config["remove_center"])) * 3
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(1, height, width, channels, generator=generator)
    offset_mask = 2.0 * torch.randn(1, out_h, out_w, -(-used // pad_to) * pad_to, generator=generator)
    return value.to(DEVICE, dtype), offset_mask.to(DEVICE, dtype)


def _check_offset_resample(value, offset_mask, config, tolerance, deterministic=False):
    value = value.detach().requires_grad_()
    offset_mask = offset_mask.detach().requires_grad_()
    expected = offset_resample_reference(value, offset_mask, **config)
    actual = offset_resample_triton(value, offset_mask, **config, deterministic=deterministic)
    assert actual.shape == expected.shape and actual.dtype == value.dtype
    torch.testing.assert_close(actual, expected, **tolerance)
    grads_actual = _grads(actual, (value, offset_mask))
    grads_expected = _grads(expected, (value, offset_mask))
    torch.testing.assert_close(grads_actual[0], grads_expected[0], **tolerance)
    # d(offset) sums over channels: compare relative to its scale
    scale = grads_expected[1].abs().max().item()
    torch.testing.assert_close(
        grads_actual[1], grads_expected[1], atol=tolerance["atol"] * scale, rtol=tolerance["rtol"]
    )
    return grads_actual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offset_resample_matches_reference_per_dtype(dtype):
    value, offset_mask = _offset_case(dtype)
    _check_offset_resample(value, offset_mask, DCN, TOLERANCE[dtype])


@pytest.mark.parametrize(
    "config",
    [
        {
            **DCN,
            "stride": (2, 1),
            "padding": (0, 1),
            "dilation": (1, 2),
            "offset_scale": 0.5,
            "remove_center": True,
        },
        {**DCN, "kernel_size": (1, 3), "padding": (0, 1), "group": 1},
    ],
    ids=["strided-dilated-no-centre", "1x3-one-group"],
)
def test_offset_resample_geometry(config):
    value, offset_mask = _offset_case(torch.float32, config, size=(5, 6))
    _check_offset_resample(value, offset_mask, config, TOLERANCE[torch.float32])


def test_offset_resample_samples_outside_the_map_read_zero():
    value, offset_mask = _offset_case(torch.float32)
    offset_mask[..., :54] = 0.0  # group g owns channels [27g, 27g + 27): 9 (dx, dy) pairs, then 9 masks
    offset_mask[..., 0:18:2] = 50.0  # group 0: every point far to the right
    offset_mask[..., 18:27] = 1.0
    offset_mask[..., 45:54] = 1.0  # group 1: plain 3x3 box sum, zero padded at the border
    output = offset_resample_triton(value, offset_mask, **DCN)
    assert output[..., :4].abs().max() == 0
    box = (
        torch.nn.functional.avg_pool2d(value[..., 4:].permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=True)
        * 9
    )
    torch.testing.assert_close(output[..., 4:], box.permute(0, 2, 3, 1))


@pytest.mark.slow
def test_offset_resample_padding_channels_ignored_with_zero_gradient():
    value, offset_mask = _offset_case(torch.float32, pad_to=16)  # 54 used channels padded to 64
    noisy = offset_mask.clone()
    noisy[..., 54:] = 1e3
    torch.testing.assert_close(
        offset_resample_triton(value, noisy, **DCN), offset_resample_triton(value, offset_mask, **DCN)
    )
    for deterministic in (False, True):
        grads = _check_offset_resample(
            value, noisy, DCN, TOLERANCE[torch.float32], deterministic=deterministic
        )
        assert torch.equal(grads[1][..., 54:], torch.zeros_like(grads[1][..., 54:]))
        assert grads[1][..., :54].abs().max() > 0


@pytest.mark.slow
def test_offset_resample_non_contiguous_inputs():
    value, offset_mask = _offset_case(torch.float32)
    value_nchw = value.permute(0, 3, 1, 2).contiguous()
    value_view = value_nchw.permute(0, 2, 3, 1)  # channels-last view of an NCHW tensor
    wide = torch.cat([offset_mask, torch.ones_like(offset_mask)], dim=-1)
    offset_view = wide[..., : offset_mask.shape[-1]]
    assert not value_view.is_contiguous() and not offset_view.is_contiguous()
    for deterministic in (False, True):
        inputs = (value_view.detach().requires_grad_(), offset_view.detach().requires_grad_())
        actual = offset_resample_triton(*inputs, **DCN, deterministic=deterministic)
        expected = offset_resample_reference(value, offset_mask, **DCN)
        torch.testing.assert_close(actual, expected)
        grads = torch.autograd.grad(actual.sum(), inputs)  # upstream gradient is an expanded view
        reference_inputs = (value.clone().requires_grad_(), offset_mask.clone().requires_grad_())
        expected_grads = torch.autograd.grad(
            offset_resample_reference(*reference_inputs, **DCN).sum(), reference_inputs
        )
        torch.testing.assert_close(grads, expected_grads, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_offset_resample_deterministic_backward(dtype):
    value, offset_mask = _offset_case(dtype)
    _check_offset_resample(value, offset_mask, DCN, TOLERANCE[dtype], deterministic=True)
    if dtype == torch.float32:
        value.requires_grad_()
        offset_mask.requires_grad_()
        runs = [
            _grads(
                offset_resample_triton(value, offset_mask, **DCN, deterministic=True), (value, offset_mask)
            )
            for _ in range(2)
        ]
        assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------------------------ larger grids, batch > 1


@pytest.mark.slow
def test_roi_align_several_blocks_per_dimension():
    """Two images, 2 channel blocks x 2 bin blocks in the forward and atomic backward (17x17 = 289 bins > 256),
    2 channel blocks and 6 pixel tiles in the deterministic backward (80 channels > 64, 5x20 map)."""
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(2, 16, 5, 20, generator=generator).to(DEVICE)
    rois = torch.tensor(
        [[1, 2.0, 1.0, 30.0, 9.0], [0, -3.0, 0.0, 41.0, 11.0], [1, 10.0, 2.0, 22.0, 7.0]], device=DEVICE
    )
    _check_roi_align(input, rois, (17, 17), 2, False, TOLERANCE[torch.float32])
    wide = torch.randn(2, 80, 5, 20, generator=generator).to(DEVICE)
    _check_roi_align(wide, rois, (3, 5), -1, True, TOLERANCE[torch.float32], deterministic=True)


@pytest.mark.slow
def test_offset_resample_several_blocks_per_dimension():
    """Two images, 2 channel blocks per group (136 channels > 128) and 3 position blocks (20 positions > 8)."""
    value, offset_mask = _offset_case(torch.float32, size=(4, 5), channels=272)
    value = torch.cat([value, value.flip(1)])
    offset_mask = torch.cat([offset_mask, -offset_mask])
    for deterministic in (False, True):
        _check_offset_resample(value, offset_mask, DCN, TOLERANCE[torch.float32], deterministic=deterministic)


# ------------------------------------------------------------------------------------------------ operators


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_operators_opcheck(deterministic):
    """Schema, fake implementation (layouts included), autograd registration and AOT tracing."""
    input, rois = _roi_case(torch.float32)
    channels_last = input.contiguous(memory_format=torch.channels_last).requires_grad_()
    for map in (input.requires_grad_(), channels_last):
        result = torch.library.opcheck(
            torch.ops.dynrefer.roi_align_triton, (map, rois, [3, 4], 0.5, 2, False, deterministic)
        )
        assert set(result.values()) == {"SUCCESS"}, result
    value, offset_mask = _offset_case(torch.float32)
    value.requires_grad_()
    offset_mask.requires_grad_()
    result = torch.library.opcheck(
        torch.ops.dynrefer.offset_resample_triton,
        (value, offset_mask, [3, 3], [1, 1], [1, 1], [1, 1], 2, 1.0, False, deterministic),
    )
    assert set(result.values()) == {"SUCCESS"}, result


def test_triton_operators_under_autocast():
    """torchvision's rule, as for the reference: float32 math, mixed dtypes accepted, input dtype out."""
    input, rois = _roi_case(torch.float32)
    value, offset_mask = _offset_case(torch.float32)
    expected = roi_align_reference(input, rois, (3, 4), 0.5, 2, False)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        same = ops.roi_align(input, rois, (3, 4), 0.5, 2, backend="triton")
        mixed = ops.roi_align(input.bfloat16(), rois, (3, 4), 0.5, 2, backend="triton")
        dcn = ops.offset_resample(value, offset_mask.bfloat16(), group=2, backend="triton")
    assert same.dtype == torch.float32 and mixed.dtype == torch.bfloat16 and dcn.dtype == torch.float32
    torch.testing.assert_close(same, expected, **TOLERANCE[torch.float32])
    torch.testing.assert_close(
        dcn,
        offset_resample_reference(value, offset_mask.bfloat16().float(), **DCN),
        **TOLERANCE[torch.float32],
    )


@pytest.mark.slow
def test_triton_operators_trace_without_graph_breaks():
    """Dynamo and AOT autograd see the Triton operators as single nodes (fake shapes, registered backward)."""
    import torch._dynamo

    input, rois = _roi_case(torch.float32)
    value, offset_mask = _offset_case(torch.float32)

    def function(input, rois, value, offset_mask):
        pooled = ops.roi_align(input, rois, (3, 4), 0.5, -1, backend="triton")
        return (
            pooled.square().sum() + ops.offset_resample(value, offset_mask, group=2, backend="triton").sum()
        )

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(function)(input, rois, value, offset_mask)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    inputs = [tensor.detach().requires_grad_() for tensor in (input, value, offset_mask)]
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(inputs[0], rois, *inputs[1:]), inputs)
    expected = torch.autograd.grad(function(inputs[0], rois, *inputs[1:]), inputs)
    torch.testing.assert_close(grads, expected)


# ------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_steps_match_the_reference(monkeypatch):
    """Three SGD steps of the tiny model's region encoder: Triton and reference backends, same losses."""
    from tiny import make_tiny_model

    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 3, 56, 56, generator=generator).to(DEVICE)
    view_boxes = torch.tensor([[0.0, 0.0, 56.0, 56.0], [10.0, 12.0, 40.0, 44.0], [20.0, 18.0, 31.0, 30.0]])
    view_boxes = torch.stack([view_boxes, view_boxes + 2.0]).to(DEVICE)
    target = torch.randn(2, 4, 32, generator=generator).to(DEVICE)
    losses = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("DYNREFER_OPS_BACKEND", backend)
        model = make_tiny_model().to(DEVICE)  # eval mode: no dropout, gradients still flow
        with torch.no_grad():  # non-zero offsets and masks: the alignment and its gradients matter
            weight = model.cvem_align.offset_mask.weight
            weight.copy_(
                torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(weight) * 0.1
            )
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses[backend] = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = (model.get_region_queries(pixel_values, view_boxes) - target).square().mean()
            loss.backward()
            optimizer.step()
            losses[backend].append(loss.item())
    assert losses["reference"][-1] < losses["reference"][0]
    torch.testing.assert_close(losses["triton"], losses["reference"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- dispatch


def _spy(monkeypatch, module, name):
    calls = []
    function = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_dispatch_reaches_the_kernels(monkeypatch, backend):
    monkeypatch.setenv("DYNREFER_OPS_BACKEND", backend)
    roi_calls = _spy(monkeypatch, triton_roi_align, "_forward")
    gather_calls = _spy(monkeypatch, triton_roi_align, "_backward_gather")
    offset_calls = _spy(monkeypatch, triton_offset_resample, "_forward")
    input, rois = _roi_case(torch.float32)
    value, offset_mask = _offset_case(torch.float32)
    input.requires_grad_()

    output = ops.roi_align(input, rois, 3, 0.5, 2, deterministic=True)
    torch.testing.assert_close(output, roi_align_reference(input, rois, (3, 3), 0.5, 2, False))
    output.sum().backward()  # deterministic=True reaches the gather backward
    torch.testing.assert_close(
        ops.offset_resample(value, offset_mask, group=2), offset_resample_reference(value, offset_mask, **DCN)
    )
    assert (roi_calls, gather_calls, offset_calls) == (["_forward"], ["_backward_gather"], ["_forward"])

    ops.roi_align(input, rois, 3, 0.5, 2, backend="reference")
    ops.offset_resample(value, offset_mask, group=2, backend="reference")
    assert len(roi_calls) == 1 and len(offset_calls) == 1
