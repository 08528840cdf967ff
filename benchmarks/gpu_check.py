"""Everything a lent GPU should measure, in one command with a time budget: kernels, ops, released model, training.

    python benchmarks/gpu_check.py                  # a CUDA machine: every part, about 9 minutes
    python benchmarks/gpu_check.py --dry-run        # any machine: every part at tiny sizes on CPU (< 1 minute)
    python benchmarks/gpu_check.py --parts ops_bench,training --time-limit 200   # some parts only

Parts, in order, each in a child process with its own time limit (``--budget PART=SECONDS``):

* ``kernel_tests``: ``tests/test_ops_triton.py`` with the kernels compiled for the GPU (``TRITON_INTERPRET=0``,
  ``DYNREFER_OPS_BACKEND=triton``): float32/float16/bfloat16, two images, several program blocks along every
  grid dimension, atomic and deterministic backward, ``torch.library.opcheck`` of the Triton operators.
* ``ops_bench``: ``benchmarks/bench_ops.py`` at DynRefer's shapes: Triton vs the reference vs torchvision's
  ``roi_align``, forward and forward+backward, achieved bandwidth as a share of the card's.
* ``full_size``: ``benchmarks/bench_full_size.py --device cuda --precisions upstream --decoding beam
  --regions 128,32,8,1`` (the released architecture, upstream's precision and decoding); every ``regions_per_s`` row gets a ``vit_flop_limit_share`` row: regions/s
  over the limit set by the ViT's FLOPs for the 3 views of a region at the card's bf16 peak.
* ``backends``: the released architecture (random weights, upstream's precision) captions the same regions
  with the reference ops and with the Triton kernels: same tokens, scores within bf16 tolerance.
* ``training``: five AdamW steps of the released architecture, trainable parts as upstream
  (``set_trainable``, docs/training.md), once per ops backend from the same weights and batches: losses,
  peak GPU memory, steps/s.

Results go to ``<results-root>/<gpu-name>/`` (default ``benchmarks/results/gpu/``; ``cpu-dry-run`` for the
dry run): ``gpu_check.csv`` (the long format of ``benchmarks/_common.py``, appended as each measurement is
made), ``summary.json`` (GPU, driver, versions, commit, each part's status and the figures against the
targets of docs/performance.md, rewritten after every part), ``gpu_check.log`` (every child's output) and
``kernel_tests.xml`` (pytest's JUnit report). A part cut off by its limit or by ``--time-limit`` is killed
with its children and reported as ``timeout``; a part with too little time left is ``skipped`` (printed);
what was measured before stays in the files. The exit status is 0 when every part ran and passed its
checks, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    FIELDS,
    RESULTS,
    ROOT,
    append_results,
    git_commit,
    machine_description,
    read_results,
    versions,
)

PACKAGES = ("torch", "triton", "torchvision", "transformers", "accelerate")
CSV_NAME, SUMMARY_NAME, LOG_NAME, JUNIT_NAME = (
    "gpu_check.csv",
    "summary.json",
    "gpu_check.log",
    "kernel_tests.xml",
)

# Dense (no sparsity) datasheet peaks: bf16 tensor-core FLOP/s and DRAM bytes/s. The first name found in
# the device name wins, so the more specific names come first.
DATASHEET_PEAKS = (
    ("H200", 989.4e12, 4.8e12),
    ("H100 PCIe", 756.0e12, 2.0e12),
    ("H100 NVL", 835.0e12, 3.9e12),
    ("H100", 989.4e12, 3.35e12),
    ("GH200", 989.4e12, 4.0e12),
    ("A100", 312.0e12, 2.0e12),
    ("L40S", 362.0e12, 0.864e12),
)


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # on a GPU
    dry_budget_s: float  # in the dry run
    summary: str


# The dry run's limits only catch a hang: on a busy 2-core machine its parts take minutes, not seconds.
PARTS = (
    Part("kernel_tests", 150, 600, "Triton kernel and operator tests, compiled for the GPU"),
    Part("ops_bench", 90, 600, "bench_ops.py: Triton vs reference vs torchvision"),
    Part("full_size", 180, 600, "bench_full_size.py: regions/s of the released architecture"),
    Part("backends", 60, 600, "reference vs Triton ops: same captions and scores"),
    Part("training", 60, 600, "training steps per ops backend"),
)
PART_NAMES = tuple(part.name for part in PARTS)
# The targets on an H100/H200 (docs/performance.md, GPU); summary.json lists them beside the figures.
TARGETS = {
    "kernels_fwd_bwd_speedup_vs_reference": ">= 10",
    "roi_align_speed_vs_torchvision": ">= 1",
    "offset_resample_bandwidth_share_pct": ">= 60",
    "full_size_vit_flop_limit_share_pct": ">= 40 at 128 regions per call",
}
SETTINGS = {  # what each size runs; the dry run keeps every code path at tiny sizes
    "gpu": {
        "kernel_tests_select": None,  # the whole file
        "ops_repeats": 20,
        # the target's 128 regions first: a part cut short by its limit loses the small calls
        "full_size": ["--scale", "full", "--device", "cuda", "--regions", "128,32,8,1"],
        "backends_regions": 16,
        "caption_tokens": 20,
        "training_regions": 32,
        "training_steps": 5,
    },
    "dry": {
        # one small test: the plumbing (JUnit report, counts), not the coverage
        "kernel_tests_select": "roi_align_matches_reference_per_dtype and float32",
        "ops_repeats": 1,
        "full_size": ["--scale", "tiny", "--device", "cpu", "--regions", "1"],
        "backends_regions": 2,
        "caption_tokens": 4,
        "training_regions": 2,
        "training_steps": 2,
    },
}
# Pass marks of the in-process comparisons (bf16 tolerance: the heads run under bf16 autocast and their
# outputs are rounded to bf16, whose spacing is 2^-8 = 0.0039 just below 1).
SCORE_TOLERANCE = 2e-2
LOSS_RELATIVE_TOLERANCE = 1e-2


# ------------------------------------------------------------------------------------------ the machine


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (a folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def driver_version() -> str:
    """The NVIDIA driver's version from nvidia-smi, or ``unknown``."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def datasheet_peaks(device_name: str) -> tuple[float | None, float | None]:
    """(bf16 FLOP/s, DRAM bytes/s) from `DATASHEET_PEAKS`, or (None, None) for an unlisted device."""
    for key, flops, bandwidth in DATASHEET_PEAKS:
        if key.lower() in device_name.lower():
            return flops, bandwidth
    return None, None


def probe_device(dry_run: bool) -> dict:
    """Name, driver and measured peaks (bf16 matrix product, device-to-device copy) of the device.

    On CPU (the dry run) the same measurements run at tiny sizes, to check the code."""
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    info = {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)",
        "driver": driver_version() if cuda else "none",
        "cuda": torch.version.cuda if cuda else None,
        "dry_run": dry_run,
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info["multiprocessors"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        bus, clock = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
        info["bandwidth_from_properties_gb_s"] = 2 * bus / 8 * clock * 1e3 / 1e9 if bus and clock else None
    flops, bandwidth = datasheet_peaks(info["gpu"])
    info["datasheet_bf16_tflop_s"] = flops / 1e12 if flops else None
    info["datasheet_bandwidth_gb_s"] = bandwidth / 1e9 if bandwidth else None

    side, rounds = (8192, 10) if cuda else (256, 2)
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    info["measured_bf16_tflop_s"] = 2 * side**3 / _best_seconds(lambda: a @ b, device, rounds) / 1e12
    source = torch.empty(2**30 if cuda else 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device, rounds)
    info["measured_copy_gb_s"] = 2 * source.numel() / seconds / 1e9  # bytes read and written
    return info


def _best_seconds(fn, device, rounds: int) -> float:
    import torch

    best = math.inf
    for index in range(rounds + 2):  # two warm-up rounds
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 2:
            best = min(best, time.perf_counter() - start)
    return best


def peak_flops(info: dict) -> float:
    """The bf16 peak the ViT limit is set by: the datasheet's where the device is listed, else measured."""
    return (info["datasheet_bf16_tflop_s"] or info["measured_bf16_tflop_s"]) * 1e12


def peak_bandwidth(info: dict) -> float:
    """Theoretical DRAM bytes/s: from the device properties, else the datasheet, else the measured copy."""
    gb_s = (
        info.get("bandwidth_from_properties_gb_s")
        or info["datasheet_bandwidth_gb_s"]
        or info["measured_copy_gb_s"]
    )
    return gb_s * 1e9


def vit_flops_per_view(vision_config) -> float:
    """Forward FLOPs (2 per multiply-add) of the ViT on one view: patch embedding, then per block the
    q/k/v and output projections, the two MLP matrices and the attention products (scores and weighted
    sum), over the patches plus the class token."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens, width = patches + 1, vision_config.hidden_size
    embedding = 2 * patches * 3 * vision_config.patch_size**2 * width
    block = 2 * tokens * (4 * width * width + 2 * width * vision_config.intermediate_size)
    block += 2 * 2 * tokens * tokens * width
    return embedding + vision_config.num_hidden_layers * block


# ------------------------------------------------------------------------------------------ the parent


class Run:
    """The results folder and the bookkeeping shared by the parts."""

    def __init__(self, folder: Path, info: dict, dry_run: bool, model: Path | None, commit: str | None):
        self.folder, self.info, self.dry_run, self.model = folder, info, dry_run, model
        self.csv, self.log = folder / CSV_NAME, folder / LOG_NAME
        self.commit = commit or git_commit()
        self.versions = versions(*PACKAGES)
        self.machine = machine_description(f"GPU {info['gpu']}; driver {info['driver']}")
        self.parts: dict[str, dict] = {}

    def append(self, rows) -> None:
        append_results(self.csv, rows, self.commit, self.versions, self.machine)

    def rows(self) -> list[dict[str, str]]:
        return read_results(self.csv)

    def write_summary(self) -> None:
        summary = {
            **self.info,
            **{name.replace("-", "_"): version for name, version in _version_pairs(self.versions)},
            "commit": self.commit,
            "machine": self.machine,
            "parts": self.parts,
            "figures": figures(self.rows(), self.info),
            "targets": TARGETS,
        }
        (self.folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")


def _version_pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split(" ", 1)) for item in text.split("; ")]  # type: ignore[misc]


def child_environment(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# A child gets a process group of its own (killed as a whole at its limit) but stays in this session, so
# that whoever ends this process's session (a terminal, a batch runner) ends the children too.
NEW_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def run_child(command: list[str], env: dict[str, str], limit_s: float, log: Path, part: str) -> str:
    """Run ``command`` in its own process group, its output copied to stdout and ``log``; kill the whole group
    after ``limit_s``. Returns ``done``, ``failed (exit N)`` or ``timeout``."""
    with open(log, "a") as handle:
        handle.write(f"\n===== {part}: {' '.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            **NEW_PROCESS_GROUP,
        )  # fmt: skip

        def copy_output() -> None:
            for line in process.stdout:
                sys.stdout.write(f"[{part}] {line}")
                handle.write(line)
            handle.flush()

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            returncode = None
        finally:
            if process.poll() is None:  # the parent itself was interrupted
                _kill_group(process)
            reader.join(timeout=10)
    if returncode is None:
        return "timeout"
    return "done" if returncode == 0 else f"failed (exit {returncode})"


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after 10 s if anything is left."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def part_command(part: str, run: Run, scratch: Path, limit_s: float) -> list[str]:
    """The command line of a part's child process."""
    settings = SETTINGS["dry" if run.dry_run else "gpu"]
    python = sys.executable
    if part == "kernel_tests":  # the child's environment also sets DYNREFER_OPS_BACKEND=triton
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops_triton.py",
                   f"--junitxml={run.folder / JUNIT_NAME}"]  # fmt: skip
        if settings["kernel_tests_select"]:
            command += ["-k", settings["kernel_tests_select"]]
        return command
    if part == "ops_bench":
        command = [python, "benchmarks/bench_ops.py", "--csv", str(scratch / "bench_ops.csv")]
        command += ["--repeats", str(settings["ops_repeats"])]
        return command + (["--cpu-smoke", "--warmup", "0"] if run.dry_run else [])
    if part == "full_size":
        # upstream's precision and decoding (2 beams); its --time-limit only stops *starting* measurements,
        # so the last quarter of the part's limit is left for the one under way
        command = [python, "benchmarks/bench_full_size.py", *settings["full_size"], "--precisions", "upstream",
                   "--decoding", "beam", "--backend", "triton", "--workdir", str(scratch / "full_size"),
                   "--output", str(scratch / "full_size.csv"),
                   "--time-limit", f"{0.75 * limit_s:.0f}"]  # fmt: skip
        return command + (["--model", str(run.model)] if run.model else [])
    command = [python, str(Path(__file__).resolve()), "--child", part, "--output-dir", str(run.folder)]
    command += ["--commit", run.commit] + (["--dry-run"] if run.dry_run else [])
    return command + (["--model", str(run.model)] if run.model else [])


def merge_rows(run: Run, path: Path) -> int:
    """Append the rows of another benchmark's CSV to the run's CSV as they are (their commit, versions and
    machine fields included: they may say more than this run's, e.g. the precision chosen), except an
    ``unknown`` commit (a copy without .git), which becomes the run's."""
    rows = read_results(path)
    for row in rows:
        if row["commit"] == "unknown":
            row["commit"] = run.commit
    with open(run.csv, "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=FIELDS).writerows(rows)
    return len(rows)


def vit_limit_rows(run: Run, rows: list[dict[str, str]], vision_config) -> list[tuple]:
    """For every ``regions_per_s`` row: the ViT-FLOP limit (3 views per region at the bf16 peak) and the share
    of it reached."""
    views = 3
    limit = peak_flops(run.info) / (views * vit_flops_per_view(vision_config))
    out = []
    for row in rows:
        if row["metric"] == "regions_per_s":
            out.append((row["benchmark"], row["variant"], "vit_flop_limit_regions_per_s", limit, "regions/s"))
            share = 100 * float(row["value"]) / limit
            out.append((row["benchmark"], row["variant"], "vit_flop_limit_share", share, "%"))
    return out


def finish_part(part: str, run: Run, scratch: Path, status: str) -> str:
    """Fold what a part's child left in ``scratch`` into the run's files; returns a detail line."""
    if part == "ops_bench" and (scratch / "bench_ops.csv").exists():
        return f"{merge_rows(run, scratch / 'bench_ops.csv')} rows from bench_ops.py"
    if part == "full_size":
        path = scratch / "full_size.csv"
        if not path.exists():
            return "bench_full_size.py wrote no results"
        rows = read_results(path)
        merge_rows(run, path)
        limit_rows = vit_limit_rows(run, rows, released_vision_config(run))
        run.append(limit_rows)
        return f"{len(rows)} rows from bench_full_size.py, {len(limit_rows)} ViT-limit rows"
    if part == "kernel_tests" and (run.folder / JUNIT_NAME).exists():
        counts = junit_counts(run.folder / JUNIT_NAME)
        run.append([("kernel_tests", "pytest", key, value, "tests") for key, value in counts.items()])
        return ", ".join(f"{value} {key}" for key, value in counts.items())
    return ""


def released_vision_config(run: Run):
    """The vision config the full-size benchmark ran: the ``--model`` folder's, else the released default
    (the tiny test config in the dry run)."""
    from dynrefer_hf import DynReferConfig

    if run.model:
        return DynReferConfig.from_pretrained(run.model).vision_config
    if run.dry_run:
        return tiny_config().vision_config
    return DynReferConfig().vision_config


def junit_counts(path: Path) -> dict[str, int]:
    """Tests passed, failed (failures and errors) and skipped in a pytest JUnit XML report."""
    from xml.etree import ElementTree

    suites = ElementTree.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = {
        key: sum(int(suite.get(key, 0)) for suite in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    return {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"] + total["errors"],
        "skipped": total["skipped"],
    }


def figures(rows: list[dict[str, str]], info: dict) -> dict:
    """The headline figures to hold against `TARGETS`, from the rows measured so far."""

    def values(predicate) -> list[tuple[dict, float]]:
        return [(row, float(row["value"])) for row in rows if predicate(row)]

    out: dict = {}
    tests = {row["metric"]: int(float(row["value"])) for row in rows if row["benchmark"] == "kernel_tests"}
    if tests:
        out["kernel_tests"] = tests
    speedups = values(
        lambda r: (
            r["metric"] == "speedup_best"
            and r["benchmark"].endswith("forward+backward")
            and r["variant"] == "triton"
        )
    )
    if speedups:
        out["kernels_fwd_bwd_speedup_vs_reference"] = {r["benchmark"]: round(v, 2) for r, v in speedups}
    walls = {(r["benchmark"], r["variant"]): v for r, v in values(lambda r: r["metric"] == "wall_best")}
    versus_torchvision = {
        benchmark: round(walls[(benchmark, "torchvision")] / ms, 2)
        for (benchmark, variant), ms in walls.items()
        if variant == "triton" and (benchmark, "torchvision") in walls
    }
    if versus_torchvision:
        out["roi_align_speed_vs_torchvision"] = versus_torchvision  # > 1: the Triton kernel is faster
    bandwidths = values(
        lambda r: (
            r["metric"] == "gbps_best"
            and r["benchmark"].startswith("offset_resample")
            and r["variant"] == "triton"
        )
    )
    if bandwidths:
        out["offset_resample_bandwidth_share_pct"] = {
            r["benchmark"]: round(100 * v * 1e9 / peak_bandwidth(info), 1) for r, v in bandwidths
        }
        out["offset_resample_share_of_measured_copy_pct"] = {
            r["benchmark"]: round(100 * v / info["measured_copy_gb_s"], 1) for r, v in bandwidths
        }
    vit = values(lambda r: r["metric"] == "vit_flop_limit_share")
    if vit:
        out["full_size_vit_flop_limit_share_pct"] = {
            f"{r['benchmark']}/{r['variant']}": round(v, 2) for r, v in vit
        }
    for part in ("backends", "training"):
        found = {f"{r['variant']}/{r['metric']}": v for r, v in values(lambda r, p=part: r["benchmark"] == p)}
        if found:
            out[part] = found
    return out


def checks_failed(part: str, rows: list[dict[str, str]]) -> list[str]:
    """What a finished part's rows say failed (empty when its checks passed)."""
    failed = []
    for row in rows:
        if row["benchmark"] == part and row["metric"] == "check_passed" and float(row["value"]) != 1:
            failed.append(f"{part}: {row['variant']} failed")
        failed_tests = row["benchmark"] == part == "kernel_tests" and row["metric"] == "failed"
        if failed_tests and float(row["value"]) > 0:
            failed.append(f"kernel_tests: {int(float(row['value']))} tests failed")
    return failed


def parse_budgets(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in PART_NAMES:
            raise SystemExit(f"--budget {item!r}: unknown part {name!r}; choose from {', '.join(PART_NAMES)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise SystemExit(f"--budget {item!r}: seconds must be a number, got {seconds!r}") from None
        if budgets[name] <= 0:
            raise SystemExit(f"--budget {item!r}: seconds must be positive")
    return budgets


def run_parts(args) -> int:
    """The parent: probe the device, then every part in turn within its budget and the total."""
    started = time.monotonic()
    # SIGTERM (a runner's time limit) unwinds like Ctrl-C, so the running part's process group is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    budgets = parse_budgets(args.budget)
    wanted = args.parts.split(",") if args.parts else list(PART_NAMES)
    unknown = sorted(set(wanted) - set(PART_NAMES))
    if unknown:
        print(f"--parts: unknown {unknown}; choose from {', '.join(PART_NAMES)}", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check.py needs a CUDA device (none found); --dry-run checks the script on CPU",
            file=sys.stderr,
        )
        return 2
    info = probe_device(args.dry_run)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the probe's 2.3 GB back to the device before the parts run
    name = "cpu-dry-run" if args.dry_run else slug(info["gpu"])
    folder = (args.results_root or RESULTS / "gpu") / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (CSV_NAME, SUMMARY_NAME, LOG_NAME, JUNIT_NAME):
        (folder / stale).unlink(missing_ok=True)
    run = Run(folder, info, args.dry_run, args.model, args.commit)
    print(f"device: {info['gpu']} (driver {info['driver']}); results: {folder}")
    run.append([
        ("device", "matmul_bf16", "measured_tflop_s", info["measured_bf16_tflop_s"], "TFLOP/s"),
        ("device", "copy_d2d", "measured_gb_s", info["measured_copy_gb_s"], "GB/s"),
    ])  # fmt: skip
    run.write_summary()

    env = child_environment(args.dry_run)
    failures = []
    for part in PARTS:
        if part.name not in wanted:
            run.parts[part.name] = {"status": "not asked for"}
            continue
        left = args.time_limit - (time.monotonic() - started)
        limit = min(budgets.get(part.name, part.dry_budget_s if args.dry_run else part.budget_s), left)
        if limit < args.min_part_s:
            print(f"SKIPPED {part.name} ({part.summary}): {left:.0f} s of the total time limit left")
            run.parts[part.name] = {"status": "skipped", "time_left_s": round(left, 1)}
            failures.append(f"{part.name}: skipped")
            run.write_summary()
            continue
        if part.name == "full_size" and not (ROOT / "benchmarks" / "bench_full_size.py").exists():
            print(f"MISSING {part.name}: benchmarks/bench_full_size.py is not in this checkout")
            run.parts[part.name] = {"status": "missing benchmarks/bench_full_size.py"}
            failures.append(f"{part.name}: benchmarks/bench_full_size.py missing")
            run.write_summary()
            continue
        print(f"----- {part.name} ({part.summary}), limit {limit:.0f} s")
        part_start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"gpu_check_{part.name}_") as scratch:
            part_env = {**env, "DYNREFER_OPS_BACKEND": "triton"} if part.name == "kernel_tests" else env
            command = part_command(part.name, run, Path(scratch), limit)
            status = run_child(command, part_env, limit, run.log, part.name)
            try:
                detail = finish_part(part.name, run, Path(scratch), status)
            except (OSError, ValueError, KeyError) as error:  # a malformed CSV must not lose the other parts
                detail = f"could not read the part's results: {error}"
                status = f"failed ({detail})"
        seconds = time.monotonic() - part_start
        run.parts[part.name] = {"status": status, "seconds": round(seconds, 1), "limit_s": round(limit, 1)}
        if detail:
            run.parts[part.name]["detail"] = detail
        problems = ([] if status == "done" else [f"{part.name}: {status}"]) + checks_failed(
            part.name, run.rows()
        )
        failures += problems
        if problems:
            run.parts[part.name]["problems"] = problems
        run.write_summary()
        print(f"----- {part.name}: {status} in {seconds:.0f} s{'; ' + detail if detail else ''}")
    print(json.dumps(figures(run.rows(), run.info), indent=2))
    print(f"wrote {run.csv}, {folder / SUMMARY_NAME}; {time.monotonic() - started:.0f} s in all")
    for failure in failures:
        print(f"NOT OK: {failure}")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------ in-process parts


def tiny_config():
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_config

    return make_tiny_config()


def build_model(args, device):
    """The released architecture with random weights (or ``--model``), upstream's precision, on ``device``;
    random label tables so that tags and scores differ from label to label. The tiny test config in the
    dry run."""
    import torch

    from dynrefer_hf import DynReferConfig, DynReferForRegionCaptioning

    torch.manual_seed(0)
    if args.model:
        model = DynReferForRegionCaptioning.from_pretrained(args.model, dtype=torch.float32).to(device)
    else:
        config = tiny_config() if args.dry_run else DynReferConfig()
        with torch.device(device):
            model = DynReferForRegionCaptioning(config)
        with torch.no_grad():
            for table in (model.clip_embeds, model.att_embeds, model.ov_embeds):
                table.normal_()
    return model.to_upstream_precision().eval()


def region_inputs(model, regions: int, seed: int, device):
    """``regions`` boxes on a synthetic 640x480 image through the image processor: ``pixel_values``, ``view_boxes``."""
    import numpy as np
    import torch

    from dynrefer_hf import DynReferImageProcessor

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    corners = rng.uniform([0, 0], [640, 480], size=(regions, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1) + 8], axis=1).round()
    side = model.config.vision_config.image_size
    processor = DynReferImageProcessor(size={"height": side, "width": side})
    features = processor(image, boxes.tolist(), num_threads=1)
    torch.manual_seed(seed)
    return features["pixel_values"].to(device), features["view_boxes"].to(device)


def child_backends(args, run: Run, device) -> None:
    """Caption the same regions with each ops backend; compare tokens and scores (rows as they come)."""
    import torch

    model = build_model(args, device)
    settings = SETTINGS["dry" if args.dry_run else "gpu"]
    regions, tokens = settings["backends_regions"], settings["caption_tokens"]
    pixel_values, view_boxes = region_inputs(model, regions, seed=1, device=device)
    results = {}
    for backend in ("reference", "triton"):
        os.environ["DYNREFER_OPS_BACKEND"] = backend
        with torch.no_grad():
            describe_once(model, pixel_values, view_boxes, tokens)  # warm-up: compiles the kernels
            _synchronize(device)
            start = time.perf_counter()
            results[backend] = describe_once(model, pixel_values, view_boxes, tokens)
            _synchronize(device)
        seconds = time.perf_counter() - start
        run.append([("backends", backend, "s_per_region", seconds / regions, "s")])
        print(f"{backend}: {seconds / regions:.4f} s per region ({regions} regions, greedy)")
    reference, triton = results["reference"], results["triton"]
    same_tokens = sum(torch.equal(a, b) for a, b in zip(reference["tokens"], triton["tokens"])) / regions
    rows = [("backends", "triton_vs_reference", "captions_identical", same_tokens, "fraction")]
    worst = 0.0
    for key in ("tag_probabilities", "attribute_scores", "class_scores", "sequence_scores"):
        difference = (reference[key] - triton[key]).abs().max().item()
        worst = max(worst, difference)
        rows.append(("backends", "triton_vs_reference", f"{key}_max_abs_diff", difference, ""))
    queries = (reference["region_queries"] - triton["region_queries"]).abs().max().item()
    rows.append(("backends", "triton_vs_reference", "region_queries_max_abs_diff", queries, ""))
    passed = same_tokens == 1 and worst <= SCORE_TOLERANCE
    rows.append(("backends", "triton_vs_reference", "check_passed", float(passed), "bool"))
    run.append(rows)
    print(f"captions identical: {same_tokens:.0%}; largest score difference {worst:.2e} "
          f"(tolerance {SCORE_TOLERANCE}); region queries differ by at most {queries:.2e}")  # fmt: skip


def describe_once(model, pixel_values, view_boxes, tokens: int) -> dict:
    """Region queries, label scores and greedy captions of ``tokens`` tokens at most (ids and log-probability)."""
    region_queries = model.get_region_queries(pixel_values, view_boxes)
    tag_probabilities, _, attribute_scores, class_scores = model.predict_labels(region_queries)
    outputs = model.generate(
        region_queries=region_queries, add_predicted_tags=False, num_beams=1, max_new_tokens=tokens
    )
    return {
        "region_queries": region_queries.float(),
        "tag_probabilities": tag_probabilities.float(),
        "attribute_scores": attribute_scores.float(),
        "class_scores": class_scores.float(),
        "tokens": list(outputs.sequences.cpu()),
        "sequence_scores": outputs.sequences_scores.float(),
    }


def child_training(args, run: Run, device) -> None:
    """AdamW steps (five; two in the dry run) per ops backend from the same weights and batches, trainable parts as upstream."""
    import torch

    settings = SETTINGS["dry" if args.dry_run else "gpu"]
    model = build_model(args, device).train()
    model.set_trainable()  # config.trainable_modules: upstream's choice unless --model says otherwise
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    initial = {name: p.detach().clone() for name, p in trainable.items()}
    count = sum(p.numel() for p in trainable.values())
    run.append([("training", "model", "trainable_parameters", count, "parameters")])
    batches = [
        training_batch(model, settings["training_regions"], seed, device)
        for seed in range(settings["training_steps"])
    ]
    losses = {}
    for backend in ("reference", "triton"):
        os.environ["DYNREFER_OPS_BACKEND"] = backend
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(initial[name])
        optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4, weight_decay=0.05)
        torch.manual_seed(0)  # the same dropout masks for both backends
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses[backend], times = [], []
        for batch in batches:
            _synchronize(device)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(device)
            times.append(time.perf_counter() - start)
            losses[backend].append(loss.item())
        rows = [
            ("training", backend, f"loss_step{i + 1}", value, "") for i, value in enumerate(losses[backend])
        ]
        timed = times[1:] or times  # the first step compiles the kernels
        rows.append(("training", backend, "steps_per_s", len(timed) / sum(timed), "steps/s"))
        rows.append(("training", backend, "first_step_s", times[0], "s"))
        if device.type == "cuda":
            rows.append(
                (
                    "training",
                    backend,
                    "peak_gpu_mem_gib",
                    torch.cuda.max_memory_allocated(device) / 2**30,
                    "GiB",
                )
            )
        run.append(rows)
        print(
            f"{backend}: losses {[round(v, 4) for v in losses[backend]]}, {len(timed) / sum(timed):.3g} steps/s"
        )
    relative = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses["reference"], losses["triton"]))
    passed = relative <= LOSS_RELATIVE_TOLERANCE and all(map(math.isfinite, losses["triton"]))
    run.append([
        ("training", "triton_vs_reference", "loss_max_relative_diff", relative, ""),
        ("training", "triton_vs_reference", "check_passed", float(passed), "bool"),
    ])  # fmt: skip
    print(f"largest relative loss difference {relative:.2e} (tolerance {LOSS_RELATIVE_TOLERANCE})")


def training_batch(model, regions: int, seed: int, device) -> dict:
    """Views of ``regions`` boxes, random control prompts, captions, tags and caption embeddings."""
    import torch

    config = model.config
    pixel_values, view_boxes = region_inputs(model, regions, seed=100 + seed, device=device)
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    input_ids = torch.randint(3, vocab, (regions, 8), generator=generator)
    labels = torch.randint(3, vocab, (regions, 12), generator=generator)
    labels[:, -1] = config.text_config.eos_token_id
    tag_labels = (torch.rand(regions, config.num_tags, generator=generator) < 0.01).float()
    caption_embeds = torch.nn.functional.normalize(
        torch.randn(regions, config.text_embed_dim, generator=generator), dim=-1
    )
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "tag_labels": tag_labels,
        "caption_embeds": caption_embeds,
    }
    return {
        "pixel_values": pixel_values,
        "view_boxes": view_boxes,
        **{k: v.to(device) for k, v in batch.items()},
    }


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_child_part(args) -> int:
    """``--child PART``: one in-process part, appending its rows to the run's CSV as they are measured."""
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    info = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"}
    info["driver"] = driver_version() if device.type == "cuda" else "none"
    run = Run(args.output_dir, info, args.dry_run, args.model, args.commit)
    {"backends": child_backends, "training": child_training}[args.child](args, run, device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="every part at tiny sizes on CPU (Triton's interpreter)"
    )
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PART_NAMES)} (default: all)")
    parser.add_argument(
        "--time-limit", type=float, help="seconds for all parts together (default 540; 1500 for --dry-run)"
    )
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help="a part's own time limit (repeatable); defaults: "
                        + ", ".join(f"{p.name}={p.budget_s:.0f}" for p in PARTS))  # fmt: skip
    parser.add_argument(
        "--min-part-s", type=float, default=20.0, help="skip a part with less time left than this"
    )
    parser.add_argument(
        "--results-root",
        type=Path,
        help="folder of the <gpu-name>/ results folder (default benchmarks/results/gpu)",
    )
    parser.add_argument(
        "--model", type=Path, help="a converted DynRefer folder instead of random released-size weights"
    )
    parser.add_argument(
        "--commit",
        help="the commit to record (default: git's; a copy without .git, as on a device, says unknown)",
    )
    parser.add_argument("--child", choices=("backends", "training"), help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_limit is None:
        args.time_limit = 1500.0 if args.dry_run else 540.0
    if args.time_limit <= 0:
        parser.error(f"--time-limit must be positive, got {args.time_limit}")
    return run_child_part(args) if args.child else run_parts(args)


if __name__ == "__main__":
    sys.exit(main())
