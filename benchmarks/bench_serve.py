"""Load test of ``dynrefer serve`` on loopback: concurrent clients against one-at-a-time requests, and overload.

A server (``dynrefer serve``, the packaged demonstration model unless ``--model``) is started in a session of
its own and killed, with every process it started, whatever happens. The requests are shapes test scenes
(PNG, base64) with ``--regions`` boxes each. First every distinct request is sent once, one at a time: these
answers are the reference (what the pipeline gives for that image alone) and the one-at-a-time speed. Then
``--clients`` (default 1, 4, 16, 64) clients each send requests back to back, chosen round-robin from the
distinct ones; every answer is compared with the reference of its request (a different caption, tags or box
list, or a score off by more than 1e-4, is a "mixed-up" answer; a request with no 200 answer is "lost").
Last, an overload run: more clients than ``--overload-queue`` with the server's queue set to it; 503 answers
(with ``Retry-After``) are expected there and counted apart, every 200 answer is checked.

Each run is bounded in requests and in seconds (``--max-seconds``): clients stop sending when the time is up.
Prints a table and writes ``benchmarks/results/bench_serve.csv`` (``_common.write_results``): benchmark
``serve_<regions>regions``, variant ``one_at_a_time``, ``clients_<n>`` or ``overload_<n>clients_queue<q>``,
metrics ``regions_per_s``, ``requests_per_s``, ``latency_p50/p95/p99`` (s), ``speedup`` (x over one at a
time), ``requests``, ``errors``, ``lost``, ``mixed_up``, ``rejected_503``.
The server runs at ``--dtype float32`` unless told otherwise: at bfloat16 a region's score depends on which
regions share its forward pass by up to a few percent (as the pipeline's does on its ``batch_size``), beyond the
1e-4 of the answer check.

Usage: ``python benchmarks/bench_serve.py [--model FOLDER] [--clients 1 4 16 64] [--max-wait-ms 50]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine_description, versions, write_results

# The server answers 504 to a request that waited --timeout (300 s here) for the model; a client waits longer, so
# that "lost" (no answer at all) means the server never answered, not that the client gave up first.
SERVER_TIMEOUT = 300
CLIENT_TIMEOUT = SERVER_TIMEOUT + 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``dynrefer serve`` in a session of its own; ``stop()`` (also on leaving the ``with``) kills the session."""

    def __init__(self, arguments: list[str], log: Path, threads: int):
        self.port = free_port()
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        environment["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environment.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "dynrefer_hf.cli", "serve", "--quiet", "--port", str(self.port), *arguments]
        self.log = log
        with open(log, "w") as output:
            self.process = subprocess.Popen(command, env=environment, stdout=output, stderr=output, start_new_session=True)

    def __enter__(self):
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError("the server stopped:\n" + self.log.read_text()[-3000:])
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response,
                ):
                    if response.status == 200:
                        return self
                time.sleep(0.5)
            raise RuntimeError("the server did not become healthy in 300 s:\n" + self.log.read_text()[-3000:])
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def post(port: int, body: bytes, timeout: float = CLIENT_TIMEOUT) -> tuple[int, dict | None, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/describe", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, None, dict(error.headers)
    except OSError:  # no answer at all (timeout, reset): lost
        return 0, None, {}


def shapes_requests(count: int, regions: int) -> list[bytes]:
    """``count`` distinct request bodies: shapes test scenes with their first ``regions`` boxes (repeated when a
    scene has fewer)."""
    from dynrefer_hf.shapes import shapes_scene

    bodies = []
    for index in range(count):
        scene = shapes_scene("test", index)
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        boxes = [[float(v) for v in obj.box] for obj in scene.objects]
        boxes = [boxes[i % len(boxes)] for i in range(regions)]
        bodies.append(json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "boxes": boxes}).encode())
    return bodies


def same_answer(answer: dict, reference: dict) -> bool:
    regions, expected = answer["regions"], reference["regions"]
    return len(regions) == len(expected) and all(
        (a["box"], a["caption"], a["tags"]) == (b["box"], b["caption"], b["tags"])
        and abs(a["score"] - b["score"]) <= 1e-4 * max(1.0, abs(b["score"]))
        for a, b in zip(regions, expected)
    )


def run_clients(port, bodies, references, clients, per_client, max_seconds):
    """``clients`` threads sending ``per_client`` requests each (fewer if ``max_seconds`` runs out)."""
    results = []  # (request index, status, latency, correct)
    lock = threading.Lock()
    start = threading.Barrier(clients)
    deadline = [0.0]

    def client(number):
        start.wait()
        for turn in range(per_client):
            if time.monotonic() > deadline[0]:
                return
            index = (number * per_client + turn) % len(bodies)
            sent = time.perf_counter()
            status, answer, headers = post(port, bodies[index])
            latency = time.perf_counter() - sent
            if status == 503 and "retry-after" not in {key.lower() for key in headers}:
                status = -503  # an error: a full server must say when to retry
            correct = status == 200 and (references is None or same_answer(answer, references[index]))
            with lock:
                results.append((index, status, latency, correct, answer))

    threads = [threading.Thread(target=client, args=(number,), daemon=True) for number in range(clients)]
    began = time.perf_counter()
    deadline[0] = time.monotonic() + max_seconds
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max_seconds + CLIENT_TIMEOUT)
    return results, time.perf_counter() - began


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(results, seconds, regions):
    ok = [r for r in results if r[1] == 200]
    latencies = [r[2] for r in ok]
    return {
        "requests": len(results),
        "regions_per_s": len(ok) * regions / seconds,
        "requests_per_s": len(ok) / seconds,
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
        "latency_p99": percentile(latencies, 99),
        "errors": sum(1 for r in results if r[1] not in (200, 503)),
        "lost": sum(1 for r in results if r[1] == 0),
        "mixed_up": sum(1 for r in results if r[1] == 200 and not r[3]),
        "rejected_503": sum(1 for r in results if r[1] == 503),
    }


UNITS = {"regions_per_s": "regions/s", "requests_per_s": "requests/s", "speedup": "x"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: the packaged demonstration model)")
    parser.add_argument("--regions", type=int, default=4, help="boxes per request (default: %(default)s)")
    parser.add_argument("--distinct", type=int, default=24, help="distinct requests (scenes) (default: %(default)s)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=1000, help="requests over the concurrent runs (default: %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=150, help="time limit of each run (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=50)
    parser.add_argument("--max-batch-regions", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="the server's --dtype (default: %(default)s: at bfloat16 a region's score moves by up to a few %% with the "
        "regions it shares a forward pass with, which the 1e-4 answer check would count as mixed up)",
    )
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server (default: %(default)s)")
    parser.add_argument("--overload-clients", type=int, default=48)
    parser.add_argument("--overload-queue", type=int, default=16)
    parser.add_argument("--skip-overload", action="store_true")
    args = parser.parse_args()

    bodies = shapes_requests(args.distinct, args.regions)
    serve = ["--max-wait-ms", str(args.max_wait_ms), "--max-batch-regions", str(args.max_batch_regions)]
    serve += ["--dtype", args.dtype, "--workers", str(args.workers), "--max-queue", "1024", "--timeout", str(SERVER_TIMEOUT)]
    if args.model:
        serve += ["--model", args.model]
    benchmark = f"serve_{args.regions}regions"
    rows, table = [], []
    started = time.strftime("%H:%M:%S")
    with tempfile.TemporaryDirectory() as folder:
        with Server(serve, Path(folder) / "server.log", args.threads) as server:
            post(server.port, bodies[0])  # warm-up
            # one at a time: the reference answers and the baseline speed
            references, latencies = [], []
            began = time.perf_counter()
            for body in bodies:
                sent = time.perf_counter()
                status, answer, _ = post(server.port, body)
                latencies.append(time.perf_counter() - sent)
                if status != 200:
                    raise RuntimeError(f"a one-at-a-time request failed with {status}")
                references.append(answer)
            seconds = time.perf_counter() - began
            baseline = summary([(i, 200, latency, True, None) for i, latency in enumerate(latencies)], seconds, args.regions)
            runs = {"one_at_a_time": baseline}
            per_run = max(1, args.requests // len(args.clients))
            for clients in args.clients:
                per_client = max(1, per_run // clients)
                results, seconds = run_clients(server.port, bodies, references, clients, per_client, args.max_seconds)
                runs[f"clients_{clients}"] = summary(results, seconds, args.regions)
        if not args.skip_overload:
            overload = serve[:]
            overload[overload.index("--max-queue") + 1] = str(args.overload_queue)
            with Server(overload, Path(folder) / "overload.log", args.threads) as server:
                post(server.port, bodies[0])
                results, seconds = run_clients(
                    server.port, bodies, references, args.overload_clients, 4, args.max_seconds
                )
                name = f"overload_{args.overload_clients}clients_queue{args.overload_queue}"
                runs[name] = summary(results, seconds, args.regions)

    machine = machine_description(f"shared machine; run started {started} UTC; server OMP_NUM_THREADS={args.threads}")
    header = f"{'run':<34}{'requests':>9}{'regions/s':>11}{'x':>7}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'errors':>8}{'lost':>6}{'mixed':>7}{'503':>6}"
    table.append(header)
    for name, figures in runs.items():
        figures["speedup"] = figures["regions_per_s"] / baseline["regions_per_s"]
        table.append(
            f"{name:<34}{figures['requests']:>9}{figures['regions_per_s']:>11.2f}{figures['speedup']:>7.2f}"
            f"{figures['latency_p50']:>8.2f}{figures['latency_p95']:>8.2f}{figures['latency_p99']:>8.2f}"
            f"{figures['errors']:>8}{figures['lost']:>6}{figures['mixed_up']:>7}{figures['rejected_503']:>6}"
        )
        for metric, value in figures.items():
            unit = UNITS.get(metric, "s" if metric.startswith("latency") else "count")
            rows.append((benchmark, name, metric, float(value), unit))
    print("\n".join(table))
    print(machine)
    path = RESULTS / "bench_serve.csv"
    write_results(path, rows, git_commit(), versions("torch", "transformers", "litserve"), machine)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
