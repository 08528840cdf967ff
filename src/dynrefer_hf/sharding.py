"""Jobs split over processes and resumed after a stop: what ``dynrefer eval`` and the batch jobs share.

Under ``torchrun`` / ``accelerate launch`` every process takes its share of the work units and appends one JSON
line per finished unit to a file of its own; the main process merges those files. Because a unit is computed
the same way whichever process runs it, the merged result equals a one-process run; because finished units are
on disk, a stopped job resumes where it was. A process killed mid-write leaves a torn last line: readers skip
it, and the next writer starts on a fresh line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import IO

import torch
import torch.distributed as dist

__all__ = ["barrier", "open_for_append", "process_group", "read_json_lines"]


def process_group() -> tuple[int, int]:
    """(rank, world size), starting the process group from torchrun / accelerate variables when needed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for in a one-process run)."""
    if world > 1:
        dist.barrier()


def _ends_torn(path: str | os.PathLike) -> bool:
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


def open_for_append(path: str | os.PathLike) -> IO[str]:
    """``path`` opened to append JSON lines; a killed writer's half-written last line stays a line of its own
    (which `read_json_lines` skips)."""
    torn = _ends_torn(path)
    file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - returned to the caller, who closes it
    if torn:
        file.write("\n")
    return file


def read_json_lines(path: str | os.PathLike) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file, one per complete line; a torn line (a killed writer's) is skipped."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.endswith("\n"):
                return
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict):
                yield item
