"""Compile the Triton kernels for a GPU architecture without a GPU and print their resource usage.

    python benchmarks/compile_kernels.py             # sm_90 (H100), DynRefer shapes, float32 and bfloat16
    python benchmarks/compile_kernels.py --arch 80   # A100

The op wrappers run on ``meta`` tensors at DynRefer's shapes with Triton's launcher replaced by a recorder;
every recorded launch is compiled ahead of time for ``cuda:<arch>`` with the specialisation the runtime would
apply (integer arguments equal to 1 become constants, multiples of 16 and all pointers are marked 16-divisible),
down to a cubin. The table shows registers per thread, spilled stack bytes and the number of 128-bit global
loads/stores in the PTX: what the block sizes in ``ops/triton_*.py`` were chosen by. It also catches errors
that only the compiler (not the interpreter) reports. Needs Triton's bundled ``ptxas``/``cuobjdump``.

The figures also go to ``benchmarks/results/compile_kernels_sm<arch>.csv`` (``--csv`` to choose; the
``benchmarks/_common.py`` long format): benchmark ``compile_sm<arch>``, variant ``<pass> <dtype>: <kernel>``,
metrics ``registers`` (per thread), ``stack`` and ``shared`` (bytes), ``v4_loads`` and ``v4_stores``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: the real compiler, not the interpreter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from dynrefer_hf.ops import triton_offset_resample, triton_roi_align

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, git_commit, machine_description, versions, write_results

RESOURCE_UNITS = {"REG": ("registers", "count"), "STACK": ("stack", "bytes"), "SHARED": ("shared", "bytes")}

POINTER_TYPES = {
    torch.float64: "*fp64", torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.int64: "*i64", torch.int32: "*i32",
}  # fmt: skip


def record_launches(thunk) -> list[tuple]:
    """Run ``thunk`` with kernel launches recorded (``(kernel, args, kwargs, grid)``) instead of executed."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid))

    JITFunction.run = record
    try:
        thunk()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(kernel, args, kwargs, arch: int):
    """Compile one recorded launch with the runtime's argument specialisation."""
    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    signature, constants, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(index,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(compiled) -> str:
    """``REG:.. STACK:..`` from cuobjdump for the compiled cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        )
    line = next((line for line in dump.stdout.splitlines() if "REG:" in line), "")
    return " ".join(field for field in line.split() if field.split(":")[0] in ("REG", "STACK", "SHARED"))


def dynrefer_launches(dtype: torch.dtype) -> dict[str, list[tuple]]:
    """Forward and every backward of both ops at DynRefer's shapes, on meta tensors."""
    ra, orz = triton_roi_align, triton_offset_resample
    tokens = torch.empty(192, 256, 1408, device="meta", dtype=dtype)
    maps = tokens.unflatten(1, (16, 16)).permute(0, 3, 1, 2)  # channels-last view, as the model passes it
    rois = torch.empty(192, 5, device="meta", dtype=dtype)
    grad = torch.empty(192, 1408, 16, 16, device="meta", dtype=dtype).to(memory_format=torch.channels_last)
    like = (maps.shape, dtype, torch.channels_last)
    roi_args = ((16, 16), 1 / 14, 2, False)
    value = torch.empty(128, 16, 16, 1408, device="meta", dtype=dtype)
    offset_mask = torch.empty(128, 16, 16, 112, device="meta", dtype=dtype)
    geometry = orz._Geometry((3, 3), (1, 1), (1, 1), (1, 1), 4, 1.0, False)
    return {
        "roi_align forward": record_launches(lambda: ra._forward(maps, rois, *roi_args)),
        "roi_align backward": record_launches(lambda: ra._backward_atomic(grad, rois, like, *roi_args)),
        "roi_align backward, deterministic": record_launches(
            lambda: ra._backward_gather(grad, rois, like, *roi_args)
        ),
        "offset_resample forward": record_launches(lambda: orz._forward(value, offset_mask, geometry)),
        "offset_resample backward": record_launches(
            lambda: orz._backward(value, offset_mask, value, geometry, True, True, False)
        ),
        "offset_resample backward, deterministic": record_launches(
            lambda: orz._backward(value, offset_mask, value, geometry, True, True, True)
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], nargs="+",
                        default=["float32", "bfloat16"])  # fmt: skip
    parser.add_argument(
        "--csv", type=Path, help="results CSV (default: results/compile_kernels_sm<arch>.csv)"
    )
    args = parser.parse_args(argv)
    rows = []
    print(f"{'pass':<50}{'kernel':<40}{'blocks':<36}{'resources':<32}{'v4 ld/st':>9}")
    for dtype_name in args.dtype:
        for label, launches in dynrefer_launches(getattr(torch, dtype_name)).items():
            for kernel, launch_args, kwargs, _ in launches:
                compiled = compile_launch(kernel, launch_args, kwargs, args.arch)
                ptx = compiled.asm["ptx"]
                blocks = ",".join(f"{k[6:]}={v}" for k, v in kwargs.items() if k.startswith("BLOCK_"))
                loads, stores = ptx.count("ld.global.v4"), ptx.count("st.global.v4")
                resources = resource_usage(compiled)
                print(
                    f"{label + ' ' + dtype_name:<50}{kernel.fn.__name__:<40}{blocks:<36}"
                    f"{resources:<32}{f'{loads}/{stores}':>9}"
                )
                variant = f"{label} {dtype_name}: {kernel.fn.__name__} ({blocks})"
                for field in resources.split():
                    key, value = field.split(":")
                    metric, unit = RESOURCE_UNITS[key]
                    rows.append((f"compile_sm{args.arch}", variant, metric, float(value), unit))
                rows.append((f"compile_sm{args.arch}", variant, "v4_loads", loads, "count"))
                rows.append((f"compile_sm{args.arch}", variant, "v4_stores", stores, "count"))
    path = args.csv or RESULTS / f"compile_kernels_sm{args.arch}.csv"
    machine = machine_description(f"no GPU needed (ahead-of-time compile for sm_{args.arch})")
    write_results(path, rows, git_commit(), versions("torch", "triton"), machine)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
