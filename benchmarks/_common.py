"""What every benchmark shares: interleaved timing, the machine and versions, the long results CSV.

Results are rows of ``benchmark, variant, metric, value, unit, commit, versions, machine``: one measured
figure per row, with what it was measured on. Compared variants are timed *interleaved*: every round
runs each variant once, in alternating order, so that load from other processes hits all of them alike;
report the best (least disturbed) and the median round of each.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("benchmark", "variant", "metric", "value", "unit", "commit", "versions", "machine")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Timings:
    """Seconds per round of one variant: wall clock and CPU time of the whole process (all its threads)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_best(self) -> float:
        return min(self.cpu)


def interleaved(
    variants: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1
) -> dict[str, Timings]:
    """Time every variant ``rounds`` times, one run of each per round, the order reversed every other round.

    ``warmup`` untimed rounds come first (caches, lazy imports, thread start-up).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(variants)
    timings = {name: Timings() for name in names}
    for round_index in range(warmup + rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if round_index >= warmup:
                timings[name].wall.append(wall)
                timings[name].cpu.append(cpu)
    return timings


def machine_description(extra: str = "") -> str:
    """CPU model, logical CPUs (and how many this process may use), OS, load averages, plus ``extra``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [
        model,
        f"{os.cpu_count()} logical CPUs ({usable} usable)",
        f"{platform.system()} {platform.release()}",
    ]
    if hasattr(os, "getloadavg"):
        parts.append("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def versions(*distributions: str) -> str:
    """``python X; name version; ...`` for the installed distributions named."""
    found = [f"python {platform.python_version()}"]
    for name in distributions:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return "; ".join(found)


def git_commit() -> str:
    """Short hash of the checked-out commit, with ``+dirty`` when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _csv_text(
    rows: Iterable[tuple[str, str, str, float, str]], commit: str, versions: str, machine: str, header: bool
) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header:
        writer.writerow(FIELDS)
    for benchmark, variant, metric, value, unit in rows:
        writer.writerow([benchmark, variant, metric, f"{value:.6g}", unit, commit, versions, machine])
    return buffer.getvalue()


def write_results(
    path: Path, rows: Iterable[tuple[str, str, str, float, str]], commit: str, versions: str, machine: str
) -> None:
    """Write ``(benchmark, variant, metric, value, unit)`` rows, each with commit, versions and machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_csv_text(rows, commit, versions, machine, header=True), newline="")


def append_results(
    path: Path, rows: Iterable[tuple[str, str, str, float, str]], commit: str, versions: str, machine: str
) -> None:
    """`write_results`, appending to ``path`` (the header only when it is new): for results written as they come.

    Each call is one ``write`` of whole lines to a file opened for appending, so that processes running side
    by side can share the file once it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _csv_text(rows, commit, versions, machine, header=not path.exists())
    with open(path, "a", newline="") as handle:
        handle.write(text)


def read_results(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV as dicts keyed by `FIELDS` (empty when there is no file yet)."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
