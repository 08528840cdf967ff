"""Checkpoints an interrupted training resumes from exactly (docs/reliability.md, "Training faults").

The ``Trainer`` writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, the RNG state of
every process, trainer state), so a run killed while saving leaves a folder that looks like a checkpoint
but is not one. `CheckpointCompletionCallback` writes a marker into the folder once every process has
finished its part, with an atomic rename; `last_complete_checkpoint` only considers marked folders, and
`RegionTrainer.train(resume_from_checkpoint=True)` resumes from it.
"""

from __future__ import annotations

import json
import os
import re

import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointCompletionCallback",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
]

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a checkpoint whose saving finished (it holds the completion marker)."""
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-N`` folder of ``output_dir`` with the highest N whose saving finished, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = [
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT.match(name)) and is_complete_checkpoint(os.path.join(output_dir, name))
    ]
    return os.path.join(output_dir, max(steps)[1]) if steps else None


class CheckpointCompletionCallback(TrainerCallback):
    """Marks ``checkpoint-N`` complete after every process has saved its part of it.

    ``on_save`` runs on every process after the ``Trainer`` has written the checkpoint; a barrier waits for
    the slowest process (each writes its own RNG state), then the main process writes the marker to a
    temporary name and renames it, so the marker exists only once the whole checkpoint does.
    """

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero and os.path.isdir(folder):
            temporary = os.path.join(folder, f".{COMPLETE_MARKER}.tmp")
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump({"global_step": state.global_step, "files": sorted(os.listdir(folder))}, file)
            os.replace(temporary, os.path.join(folder, COMPLETE_MARKER))
        return control
