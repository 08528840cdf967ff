"""Benchmark the sampling ops: PyTorch reference vs Triton kernels (vs torchvision's RoIAlign when installed).

    python benchmarks/bench_ops.py              # CUDA device needed; appends to benchmarks/results/bench_ops.csv
    python benchmarks/bench_ops.py --cpu-smoke  # tiny shapes on CPU, reference only: checks the script runs
    TRITON_INTERPRET=1 python benchmarks/bench_ops.py --cpu-smoke --repeats 1  # ... and the kernels, interpreted

For each case it times the forward and the forward+backward (median of CUDA-event timings after warm-up) and
prints milliseconds, achieved bandwidth and the speed-up over the reference. Bandwidth counts the unique bytes
the op must touch once (inputs read, outputs written; for the backward also the upstream gradient read and the
input gradients written) divided by the time. Cases:

* roi_align, DynRefer: 64 regions x 3 views = 192 maps of 16x16 with 1408 channels (a channels-last view of the
  ViT patch tokens, as the model passes it), one box per map, 16x16 output, spatial_scale 1/14,
  sampling_ratio 2, aligned False; float32 and bfloat16.
* roi_align, large (detector-like): 4 maps of 256 x 50x68, 512 boxes, 7x7 output, adaptive sampling,
  aligned True, spatial_scale 1/16.
* offset_resample, DynRefer: value [128, 16, 16, 1408], offset_mask [128, 16, 16, 112], 3x3, group 4; float32
  and bfloat16.
* offset_resample, large: value [32, 64, 64, 512], group 4, 3x3.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dynrefer_hf.ops.reference import offset_resample_reference, roi_align_reference

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ops.csv"
CSV_FIELDS = [
    "date",
    "device",
    "op",
    "case",
    "dtype",
    "pass",
    "backend",
    "ms",
    "gb_per_s",
    "speedup_vs_reference",
]


@dataclass
class Case:
    op: str
    name: str
    dtype: torch.dtype
    make_inputs: Callable[[], tuple[torch.Tensor, ...]]  # differentiable inputs first, then the rest
    grad_inputs: int  # how many leading inputs get gradients
    config: tuple  # the op's arguments after the tensors
    backends: dict[str, Callable[..., torch.Tensor]]
    forward_bytes: int
    backward_bytes: int


# ------------------------------------------------------------------------------------------------- cases


def _nbytes(dtype: torch.dtype, *shapes: tuple[int, ...]) -> int:
    return sum(math.prod(shape) for shape in shapes) * torch.empty(0, dtype=dtype).element_size()


def _roi_align_case(
    name, device, dtype, maps, channels, size, boxes, output, scale, sampling, aligned, backends
):
    generator = torch.Generator(device="cpu").manual_seed(0)
    extent = torch.tensor([size[1], size[0]]) / scale  # image width, height
    corners = torch.rand(boxes, 2, 2, generator=generator) * extent
    xy = torch.cat([corners.min(1).values, corners.max(1).values], dim=1).round()
    batch = torch.arange(boxes) % maps
    rois = torch.cat([batch[:, None].float(), xy], dim=1).to(device, dtype)

    def make_inputs():
        tokens = torch.randn(maps, size[0] * size[1], channels, device=device, dtype=dtype)
        input = tokens.unflatten(1, size).permute(0, 3, 1, 2)  # channels-last view, like the model's tokens
        return input.requires_grad_(), rois

    input_shape, rois_shape, out_shape = (
        (maps, channels, *size),
        (boxes, 5),
        (boxes, channels, output, output),
    )
    return Case(
        "roi_align", name, dtype, make_inputs, 1, ((output, output), scale, sampling, aligned), backends,
        forward_bytes=_nbytes(dtype, input_shape, rois_shape, out_shape),
        backward_bytes=_nbytes(dtype, out_shape, rois_shape, input_shape),
    )  # fmt: skip


def _offset_resample_case(name, device, dtype, batch, size, channels, group, backends):
    padded = -(-group * 27 // 8) * 8  # 3x3 kernel: 27 values per group, padded to a multiple of 8

    def make_inputs():
        value = torch.randn(batch, *size, channels, device=device, dtype=dtype)
        offset_mask = torch.randn(batch, *size, padded, device=device, dtype=dtype)
        return value.requires_grad_(), offset_mask.requires_grad_()

    value, offset_mask = (batch, *size, channels), (batch, *size, padded)
    return Case(
        "offset_resample", name, dtype, make_inputs, 2, ((3, 3), (1, 1), (1, 1), (1, 1), group, 1.0, False),
        backends,
        forward_bytes=_nbytes(dtype, value, offset_mask, value),
        # read grad_out, value and offset_mask; write grad_value and grad_offset_mask
        backward_bytes=_nbytes(dtype, value, value, offset_mask, value, offset_mask),
    )  # fmt: skip


def _backends(op: str, with_kernels: bool) -> dict[str, Callable[..., torch.Tensor]]:
    if op == "roi_align":
        backends = {"reference": roi_align_reference}
        if with_kernels:
            from dynrefer_hf.ops.triton_roi_align import roi_align_triton

            backends["triton"] = roi_align_triton
            backends["triton-deterministic"] = functools.partial(roi_align_triton, deterministic=True)
            try:
                from torchvision.ops import roi_align as torchvision_roi_align
            except ImportError:
                print("torchvision not importable: no torchvision rows", file=sys.stderr)
            else:
                backends["torchvision"] = torchvision_roi_align  # same positional arguments
        return backends
    backends = {"reference": offset_resample_reference}
    if with_kernels:
        from dynrefer_hf.ops.triton_offset_resample import offset_resample_triton

        backends["triton"] = offset_resample_triton
        backends["triton-deterministic"] = functools.partial(offset_resample_triton, deterministic=True)
    return backends


def build_cases(device: torch.device, smoke: bool) -> list[Case]:
    kernels = not smoke or os.environ.get("TRITON_INTERPRET") == "1"  # smoke: kernels only in the interpreter
    roi = _backends("roi_align", kernels)
    offset = _backends("offset_resample", kernels)
    if smoke:
        return [
            _roi_align_case("smoke", device, torch.float32, 3, 8, (16, 16), 3, 4, 1 / 14, 2, False, roi),
            _offset_resample_case("smoke", device, torch.float32, 2, (8, 8), 16, 4, offset),
        ]
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        cases.append(
            _roi_align_case("dynrefer", device, dtype, 192, 1408, (16, 16), 192, 16, 1 / 14, 2, False, roi)
        )
        cases.append(_offset_resample_case("dynrefer", device, dtype, 128, (16, 16), 1408, 4, offset))
    cases.append(
        _roi_align_case("large", device, torch.float32, 4, 256, (50, 68), 512, 7, 1 / 16, 0, True, roi)
    )
    cases.append(_offset_resample_case("large", device, torch.float32, 32, (64, 64), 512, 4, offset))
    return cases


# ------------------------------------------------------------------------------------------------ timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _measure(fn, inputs, grad_inputs, device, warmup, repeats) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``fn(*inputs)``."""
    upstream = torch.randn_like(fn(*inputs))
    forward = time_ms(lambda: fn(*inputs), device, warmup, repeats)
    both = time_ms(lambda: torch.autograd.grad(fn(*inputs), grad_inputs, upstream), device, warmup, repeats)
    return forward, both


def run_case(case: Case, device: torch.device, warmup: int, repeats: int) -> list[dict]:
    tensors = case.make_inputs()
    rows = []
    for backend, op in case.backends.items():
        fn = functools.partial(_call_with_config, op, case.config)
        try:
            forward, both = _measure(fn, tensors, tensors[: case.grad_inputs], device, warmup, repeats)
        except (RuntimeError, NotImplementedError) as error:  # OOM, a dtype torchvision lacks, ...
            print(f"{case.op}/{case.name}/{backend}: skipped ({str(error).splitlines()[0]})", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for name, ms, nbytes in (
            ("forward", forward, case.forward_bytes),
            ("forward+backward", both, case.forward_bytes + case.backward_bytes),
        ):
            dtype = str(case.dtype).removeprefix("torch.")
            rows.append({
                "op": case.op, "case": case.name, "dtype": dtype, "pass": name, "backend": backend, "ms": ms,
                "gb_per_s": nbytes / ms / 1e6,
            })  # fmt: skip
    for row in rows:
        same_pass = (r["ms"] for r in rows if r["backend"] == "reference" and r["pass"] == row["pass"])
        row["speedup_vs_reference"] = next(same_pass, float("nan")) / row["ms"]
    return rows


def _call_with_config(op, config, *tensors):
    return op(*tensors, *config)


# ------------------------------------------------------------------------------------------------ output


def peak_bandwidth_gb_per_s(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth from the device properties (double data rate), if torch reports them."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    bus, clock = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)  # bits, kHz
    return 2 * bus / 8 * clock * 1e3 / 1e9 if bus and clock else None


def print_table(rows: list[dict], peak: float | None) -> None:
    header = f"{'op':<16}{'case':<10}{'dtype':<10}{'pass':<18}{'backend':<22}{'ms':>10}{'GB/s':>9}"
    header += f"{'% peak':>8}{'x ref':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        share = f"{100 * r['gb_per_s'] / peak:7.0f}%" if peak else f"{'-':>8}"
        print(
            f"{r['op']:<16}{r['case']:<10}{r['dtype']:<10}{r['pass']:<18}{r['backend']:<22}"
            f"{r['ms']:>10.3f}{r['gb_per_s']:>9.1f}{share}{r['speedup_vs_reference']:>8.1f}"
        )


def append_csv(rows: list[dict], device_name: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({
                **row, "date": date, "device": device_name, "ms": f"{row['ms']:.4f}",
                "gb_per_s": f"{row['gb_per_s']:.1f}", "speedup_vs_reference": f"{row['speedup_vs_reference']:.2f}",
            })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, reference only, on CPU")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed runs first (includes Triton compilation)"
    )
    parser.add_argument("--csv", type=Path, default=RESULTS, help="CSV to append to (GPU runs only)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "bench_ops.py needs a CUDA device (none found); run with --cpu-smoke to check the script on CPU",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda")
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    print(f"device: {device_name}")
    rows = []
    for case in build_cases(device, smoke=args.cpu_smoke):
        rows += run_case(case, device, args.warmup, args.repeats)
    print_table(rows, peak_bandwidth_gb_per_s(device))
    if device.type == "cuda":
        append_csv(rows, device_name, args.csv)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
