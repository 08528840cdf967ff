"""Benchmark the sampling ops: PyTorch reference vs Triton kernels (vs torchvision's RoIAlign when installed).

    python benchmarks/bench_ops.py              # CUDA device needed; writes benchmarks/results/bench_ops.csv
    python benchmarks/bench_ops.py --cpu-smoke  # tiny shapes on CPU, reference only: checks the script runs
    TRITON_INTERPRET=1 python benchmarks/bench_ops.py --cpu-smoke --repeats 1  # ... and the kernels, interpreted

The backends are the operators (``dynrefer::roi_align`` and ``dynrefer::offset_resample`` for the reference,
``dynrefer::*_triton`` for the kernels, atomic and deterministic backward) and, when importable,
``torchvision.ops.roi_align``. For each case the forward and the forward+backward of all backends are timed
interleaved (``benchmarks/_common.py``: warm-up rounds, then ``--repeats`` rounds, each running every backend
once in alternating order, synchronised on CUDA); the table shows the best round in milliseconds, the achieved
bandwidth and the speed-up over the reference. Bandwidth counts the unique bytes the op must touch once
(inputs read, outputs written; for the backward also the upstream gradient read and the input gradients
written) divided by the time. Rows go to the long results CSV (``_common.write_results``): benchmark
``<op>_<case>_<dtype>_<pass>``, variant = backend, metrics ``wall_best``/``wall_median`` (ms),
``gbps_best`` (GB/s), ``peak_share_best`` (% of the card's theoretical bandwidth) and ``speedup_best``/
``speedup_median`` (x over the reference). Cases:

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
import functools
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, git_commit, interleaved, machine_description, versions, write_results

import dynrefer_hf.ops  # noqa: F401 (registers the reference operators)


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
        backends = {"reference": torch.ops.dynrefer.roi_align}
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
    backends = {"reference": torch.ops.dynrefer.offset_resample}
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


def _synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def run_case(case: Case, device: torch.device, warmup: int, repeats: int) -> list[dict]:
    """Best and median milliseconds of every backend, forward and forward+backward, timed interleaved."""
    tensors = case.make_inputs()
    grad_inputs = tensors[: case.grad_inputs]
    passes = {"forward": {}, "forward+backward": {}}
    for backend, op in case.backends.items():
        fn = functools.partial(_call_with_config, op, case.config, *tensors)
        try:
            upstream = torch.randn_like(fn())
        except (RuntimeError, NotImplementedError) as error:  # OOM, a dtype torchvision lacks, ...
            print(f"{case.op}/{case.name}/{backend}: skipped ({str(error).splitlines()[0]})", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        passes["forward"][backend] = _synchronized(fn, device)
        passes["forward+backward"][backend] = _synchronized(
            lambda fn=fn, upstream=upstream: torch.autograd.grad(fn(), grad_inputs, upstream), device
        )
    rows = []
    for name, variants in passes.items():
        nbytes = case.forward_bytes + (case.backward_bytes if name != "forward" else 0)
        timings = interleaved(variants, rounds=repeats, warmup=warmup)
        reference = timings.get("reference")
        for backend, timing in timings.items():
            best, median = timing.best * 1e3, timing.median * 1e3
            rows.append({
                "op": case.op, "case": case.name, "dtype": str(case.dtype).removeprefix("torch."), "pass": name,
                "backend": backend, "ms": best, "ms_median": median, "gb_per_s": nbytes / best / 1e6,
                "speedup_vs_reference": reference.best * 1e3 / best if reference else float("nan"),
                "speedup_median": reference.median * 1e3 / median if reference else float("nan"),
            })  # fmt: skip
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


def result_rows(rows: list[dict], peak: float | None) -> list[tuple[str, str, str, float, str]]:
    """The measurements as ``(benchmark, variant, metric, value, unit)`` rows of the results CSV."""
    out = []
    for r in rows:
        benchmark = f"{r['op']}_{r['case']}_{r['dtype']}_{r['pass']}"
        out += [
            (benchmark, r["backend"], "wall_best", r["ms"], "ms"),
            (benchmark, r["backend"], "wall_median", r["ms_median"], "ms"),
            (benchmark, r["backend"], "gbps_best", r["gb_per_s"], "GB/s"),
            (benchmark, r["backend"], "speedup_best", r["speedup_vs_reference"], "x"),
            (benchmark, r["backend"], "speedup_median", r["speedup_median"], "x"),
        ]
        if peak:
            out.append((benchmark, r["backend"], "peak_share_best", 100 * r["gb_per_s"] / peak, "%"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, reference only, on CPU")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per measurement")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed rounds first (includes Triton compilation)"
    )
    parser.add_argument(
        "--csv", type=Path, help="results CSV to write (default on CUDA: benchmarks/results/bench_ops.csv)"
    )
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
    peak = peak_bandwidth_gb_per_s(device)
    print_table(rows, peak)
    path = args.csv or (RESULTS / "bench_ops.csv" if device.type == "cuda" else None)
    if path is not None:
        machine = machine_description(f"GPU {device_name}" if device.type == "cuda" else "no GPU")
        machine += f"; torch threads {torch.get_num_threads()}"
        write_results(
            path, result_rows(rows, peak), git_commit(), versions("torch", "triton", "torchvision"), machine
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
