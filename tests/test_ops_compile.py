"""The ops and the region encoder under torch.compile and torch.export (reference backend, CPU).

The ops are torch.library operators with fake implementations, so tracing sees static output shapes, and
their value checks (a host sync) are skipped while compiling: ``get_region_queries`` compiles to one graph
with no graph break and exports (docs/ops.md, "Operators").
"""

import pytest
import torch
import torch._dynamo
from tiny import make_tiny_model

from dynrefer_hf.ops import offset_resample, roi_align

REF = {"backend": "reference"}


def _views(regions=2, views=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(regions, views, 3, 56, 56, generator=generator)
    boxes = torch.tensor([[0.0, 0.0, 56.0, 56.0], [10.0, 12.0, 40.0, 44.0], [20.0, 18.0, 31.0, 30.0]])
    view_boxes = boxes[:views].expand(regions, views, 4).clone()
    view_boxes[1:, 1:] += 2.0
    return pixel_values, view_boxes


@pytest.fixture(scope="module")
def model():
    model = make_tiny_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero offsets and masks, so the views' alignment does something
        weight = model.cvem_align.offset_mask.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


def _explain(function, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(function)(*args)
    reasons = [reason.reason.splitlines()[0] for reason in explanation.break_reasons]
    return explanation, reasons


def test_ops_compile_without_graph_breaks():
    """Adaptive sampling (a data-dependent sample grid) stays inside the operator; no break, same numbers."""
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(2, 4, 6, 7, generator=generator)
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 8.0], [1, 6.0, 4.0, 20.0, 17.0], [1, -4.0, -3.0, 3.0, 6.5]])
    value = torch.randn(2, 4, 5, 8, generator=generator)
    offset_mask = torch.randn(2, 4, 5, 56, generator=generator)

    def function(input, rois, value, offset_mask):
        return roi_align(input, rois, 3, 0.5, -1, **REF), offset_resample(value, offset_mask, group=2, **REF)

    explanation, reasons = _explain(function, input, rois, value, offset_mask)
    assert explanation.graph_break_count == 0, reasons
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    for actual, expected in zip(
        compiled(input, rois, value, offset_mask), function(input, rois, value, offset_mask)
    ):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_region_encoder_compiles_to_one_graph(model, monkeypatch):
    monkeypatch.setenv("DYNREFER_OPS_BACKEND", "reference")
    pixel_values, view_boxes = _views()
    explanation, reasons = _explain(model.get_region_queries, pixel_values, view_boxes)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), reasons
    with torch.no_grad():
        expected = model.get_region_queries(pixel_values, view_boxes)
        torch._dynamo.reset()
        compiled = torch.compile(model.get_region_queries, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(pixel_values, view_boxes), expected, rtol=1e-5, atol=1e-5)


class _RegionEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, view_boxes):
        return self.model.get_region_queries(pixel_values, view_boxes)


@pytest.mark.slow
def test_region_encoder_exports(model, monkeypatch):
    monkeypatch.setenv("DYNREFER_OPS_BACKEND", "reference")
    pixel_values, view_boxes = _views()
    exported = torch.export.export(_RegionEncoder(model), (pixel_values, view_boxes))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"dynrefer.roi_align.default", "dynrefer.offset_resample.default"} <= targets
    other_pixels, other_boxes = _views(seed=3)
    other_boxes[0, 2] = torch.tensor([5.0, 7.0, 50.0, 33.0])
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(other_pixels, other_boxes),
            model.get_region_queries(other_pixels, other_boxes),
            rtol=1e-5,
            atol=1e-5,
        )
