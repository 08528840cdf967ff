"""Speed of `dynrefer eval` with the embedded demonstration model on CPU: one process vs two (torchrun, gloo).

    python benchmarks/bench_eval.py --scenes 16 --rounds 2

Exports shapes test scenes in upstream's format, then times `dynrefer eval --task ovad` (no Java: the time is
the model's) as one process and under `torchrun --nproc_per_node 2`, interleaved (``_common.interleaved``:
one warm-up round, then ``--rounds`` rounds alternating the order). Each run starts from scratch
(``--restart``) and is timed end to end: start-up, model loading, dataset (from the ``datasets`` cache after
the warm-up), prediction, merge and scoring. torchrun gives each process OMP_NUM_THREADS=1; the single process
runs with torch's default thread count and, as a third variant, with OMP_NUM_THREADS=1 (to tell the gain of
two processes from that of fewer threads on a busy machine). Writes ``benchmarks/results/bench_eval_cpu.csv`` (``_common.write_results``):
wall seconds (best and median round) and regions per second over the best round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RESULTS, git_commit, interleaved, machine_description, versions, write_results

BENCHMARK = "dynrefer eval --task ovad, shapes demo model, CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=16, help="shapes test scenes (16: 91 regions)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-images", type=int, default=2, help="images per batch (the unit split over processes)")
    args = parser.parse_args()

    from dynrefer_hf.shapes import export_shapes_upstream

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    annotations = export_shapes_upstream(work / "scenes", args.scenes)
    num_regions = len(json.loads(Path(annotations).read_text())["annotations"])
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    common = ["eval", "--task", "ovad", "--annotations", annotations, "--restart", "--batch-images", str(args.batch_images)]
    commands = {
        "1 process": [sys.executable, "-m", "dynrefer_hf.cli", *common, "--output", str(work / "one")],
        "1 process, 1 thread": [sys.executable, "-m", "dynrefer_hf.cli", *common, "--output", str(work / "one1")],
        "2 processes (torchrun, gloo)": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "dynrefer_hf.cli", *common, "--output", str(work / "two"),
        ],
    }

    def runner(name, command):
        env = dict(environment, OMP_NUM_THREADS="1") if name.endswith("1 thread") else environment
        return lambda: subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    machine = machine_description()
    timings = interleaved({name: runner(name, command) for name, command in commands.items()}, rounds=args.rounds)
    rows = []
    for name, timing in timings.items():
        rows += [
            (BENCHMARK, name, "wall_best", timing.best, "s"),
            (BENCHMARK, name, "wall_median", timing.median, "s"),
            (BENCHMARK, name, "regions_per_second", num_regions / timing.best, "regions/s"),
            (BENCHMARK, name, "regions", num_regions, "regions"),
        ]
        print(f"{name}: best {timing.best:.1f} s, median {timing.median:.1f} s over {args.rounds} rounds; "
              f"{num_regions / timing.best:.2f} regions/s end to end ({num_regions} regions)")
    path = RESULTS / "bench_eval_cpu.csv"
    write_results(path, rows, git_commit(), versions("torch", "transformers", "datasets"), machine)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
