"""Regions per second of a batch job (``dynrefer caption --input --output``): one process against two
(``torchrun --nproc_per_node 2``), on shapes test scenes saved as a ``datasets`` folder.

The variants run side by side in alternating order (``--rounds`` each), each in fresh processes, so that load
from other processes hits both alike: one process with ``OMP_NUM_THREADS=2`` (both cores), two processes with
``OMP_NUM_THREADS=1`` each. Regions/s counts the whole command, start-up (imports, model loading, the process
group) included. Both outputs must be byte-identical; the script fails otherwise.

Usage: ``python benchmarks/bench_batch.py [--scenes 200] [--rounds 1] [--model FOLDER]``. Writes
``benchmarks/results/bench_batch.csv``: benchmark ``batch_<n>scenes``, variants ``one_process`` and
``one_process_1thread``, ``two_processes``, metrics ``wall_best`` (s), ``regions_per_s_best`` and ``speedup_best`` (x over one process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine_description, versions, write_results


def run(command: list[str], threads: int) -> float:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environment.get("PYTHONPATH", "")])
    began = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, error = process.communicate(timeout=3600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{error.decode()[-3000:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", help="model folder (default: the packaged demonstration model)")
    args = parser.parse_args()

    from dynrefer_hf.shapes import shapes_split

    started = time.strftime("%H:%M:%S")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        scenes = shapes_split("test", args.scenes)
        scenes.save_to_disk(folder / "scenes")
        regions = sum(len(boxes) for boxes in scenes["boxes"])
        model = ["--model", args.model] if args.model else []
        caption = ["-m", "dynrefer_hf.cli", "caption", "--quiet", "--device", "cpu", *model, "--input", str(folder / "scenes")]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        variants = {
            "one_process": lambda out: run([sys.executable, *caption, "--output", out, "--restart"], threads=2),
            "one_process_1thread": lambda out: run([sys.executable, *caption, "--output", out, "--restart"], threads=1),
            "two_processes": lambda out: run([*launcher, *caption, "--output", out, "--restart"], threads=1),
        }
        walls = {name: [] for name in variants}
        for round_index in range(args.rounds):
            for name in variants if round_index % 2 == 0 else reversed(list(variants)):
                walls[name].append(variants[name](str(folder / f"{name}.jsonl")))
        outputs = {name: (folder / f"{name}.jsonl").read_text() for name in variants}
        if len(set(outputs.values())) != 1:
            raise RuntimeError("the outputs differ between the variants")
        assert len(outputs["one_process"].splitlines()) == args.scenes
        json.loads(outputs["one_process"].splitlines()[0])

    benchmark = f"batch_{args.scenes}scenes"
    best = {name: min(values) for name, values in walls.items()}
    rows = []
    print(f"{args.scenes} scenes, {regions} regions")
    for name in variants:
        speed = regions / best[name]
        speedup = best["one_process"] / best[name]
        print(f"{name:<14} {best[name]:8.1f} s {speed:8.2f} regions/s {speedup:6.2f}x")
        rows += [
            (benchmark, name, "wall_best", best[name], "s"),
            (benchmark, name, "regions_per_s_best", speed, "regions/s"),
            (benchmark, name, "speedup_best", speedup, "x"),
        ]
    machine = machine_description(f"shared machine; run started {started} UTC")
    print(machine)
    write_results(RESULTS / "bench_batch.csv", rows, git_commit(), versions("torch", "transformers"), machine)


if __name__ == "__main__":
    main()
