"""Speed of `dynrefer eval` with the embedded demonstration model on CPU: one process vs two (torchrun, gloo).

    python benchmarks/bench_eval.py --scenes 16 --repeats 2

Exports shapes test scenes in upstream's format, then runs `dynrefer eval --task ovad` (no Java: the timing is
the model's) with one process and under `torchrun --nproc_per_node 2`, the two variants interleaved so that
machine load hits both. Reported: end-to-end wall time of the command (model loading, dataset build, prediction,
merge, scoring) and regions per second over it. torchrun gives each process OMP_NUM_THREADS=1; the single
process uses torch's default thread count. Rows are appended to benchmarks/results/bench_eval.csv as
benchmark,variant,metric,value,unit,commit,versions,machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_eval.csv"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> str:
    import torch
    import transformers

    return f"python {platform.python_version()}; torch {torch.__version__}; transformers {transformers.__version__}"


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f} at start"


def _run(command: list[str], environment: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-images", type=int, default=2)
    args = parser.parse_args()

    from dynrefer_hf.shapes import export_shapes_upstream

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    annotations = export_shapes_upstream(work / "scenes", args.scenes)
    num_regions = len(json.loads(Path(annotations).read_text())["annotations"])
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    common = ["eval", "--task", "ovad", "--annotations", annotations, "--restart", "--batch-images", str(args.batch_images)]
    variants = {
        "1 process": [sys.executable, "-m", "dynrefer_hf.cli", *common, "--output", str(work / "one")],
        "2 processes (torchrun, gloo)": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "dynrefer_hf.cli", *common, "--output", str(work / "two"),
        ],
    }
    # warm-up: the datasets cache and the file system cache, for both variants
    _run(variants["1 process"], environment)
    times = {name: [] for name in variants}
    machine = _machine()
    for _ in range(args.repeats):
        for name, command in variants.items():  # interleaved
            times[name].append(_run(command, environment))
    commit, versions = _commit(), _versions()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new_file = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as file:
        writer = csv.writer(file)
        if new_file:
            writer.writerow(["benchmark", "variant", "metric", "value", "unit", "commit", "versions", "machine"])
        for name, values in times.items():
            best = min(values)
            rows = [
                ("wall_time_best", f"{best:.2f}", "s"),
                ("wall_time_mean", f"{sum(values) / len(values):.2f}", "s"),
                ("regions_per_second", f"{num_regions / best:.2f}", "regions/s"),
                ("regions", str(num_regions), "regions"),
            ]
            for metric, value, unit in rows:
                writer.writerow(["dynrefer eval ovad, shapes demo model, CPU", name, metric, value, unit, commit, versions, machine])
            print(f"{name}: best {best:.1f} s, mean {sum(values) / len(values):.1f} s over {len(values)} runs; "
                  f"{num_regions / best:.2f} regions/s end to end ({num_regions} regions)")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
