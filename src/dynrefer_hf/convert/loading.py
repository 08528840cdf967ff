"""Reading source checkpoints safely: `torch.load(..., weights_only=True)` only, clear errors otherwise."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

__all__ = [
    "CheckpointLoadError",
    "load_checkpoint",
    "load_folder_state_dict",
    "read_run_config",
    "resolve_pretrained_folder",
]


class CheckpointLoadError(ValueError):
    """A source checkpoint that cannot be read safely or completely."""


def _torch_load(path: Path) -> object:
    # mmap keeps multi-GB files out of RAM until a tensor is touched; legacy (non-zip) files cannot be mmapped.
    use_mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointLoadError(
                f"{path} needs arbitrary unpickling (it stores Python objects besides tensors and plain "
                "containers), which this converter refuses for safety. Re-save its state dict with "
                "torch.save(state_dict) in a trusted environment and convert that file."
            ) from error
        raise CheckpointLoadError(f"{path} is truncated or not a PyTorch checkpoint: {error}") from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointLoadError(f"{path} is truncated or not a PyTorch checkpoint: {error}") from error


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load a flat state dict from a `.pth`/`.pt`/`.bin` (weights-only unpickling) or `.safetensors` file.

    With `dtype`, floating-point tensors are cast as they are read (one tensor at a time, so a large
    file never sits in memory twice).

    A LAVIS training checkpoint (`{"model": state_dict, "optimizer": ..., "config": ..., ...}`) yields its
    `"model"` entry, as LAVIS's own loader does (docs/upstream/checkpoint.md §1).

    Raises:
        CheckpointLoadError: missing, truncated or unsafe file, or content that is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, "pt") as handle:
                return {key: _cast(handle.get_tensor(key), dtype) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as error:
            raise CheckpointLoadError(f"{path} is truncated or not a safetensors file: {error}") from error
    content = _torch_load(path)
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        content = content["model"]
    if not isinstance(content, dict):
        raise CheckpointLoadError(f"{path} holds a {type(content).__name__}, not a state dict")
    not_tensors = sorted(str(key) for key, value in content.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointLoadError(
            f"{path} is not a flat state dict; non-tensor entries: {', '.join(not_tensors[:10])}"
        )
    return {key: _cast(tensor, dtype) for key, tensor in content.items()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def read_run_config(path: str | os.PathLike) -> dict:
    """The run config a LAVIS training checkpoint stores under `"config"` (docs/upstream/checkpoint.md §1); `{}` if none."""
    content = _torch_load(Path(path))
    config = content.get("config") if isinstance(content, dict) else None
    return config if isinstance(config, dict) else {}


def resolve_pretrained_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a Hub repo id fetched (weights, config, tokenizer only) into the HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointLoadError(f"{path} is a file; expected a model folder or a Hub repo id")
    from huggingface_hub import snapshot_download

    files = ["*.json", "*.model", "*.txt"]
    try:
        # safetensors when the repo has them (google/flan-t5-xl has both formats: fetch one, not both)
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=[*files, "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(str(name_or_path), allow_patterns=[*files, "pytorch_model*.bin"]))
    except (OSError, ValueError) as error:  # offline, unknown or gated repo, invalid id
        raise CheckpointLoadError(f"could not find {name_or_path} locally or on the Hub: {error}") from error
    return folder


def load_folder_state_dict(
    folder: str | os.PathLike, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All weights of a `save_pretrained` folder: safetensors (single or sharded) preferred, else `.bin` shards.

    `dtype` casts floating-point tensors as they are read (see [`load_checkpoint`]).
    """
    folder = Path(folder)
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            files = [
                folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
            ]
        else:
            files = sorted(folder.glob(pattern))
        if files:
            state_dict: dict[str, torch.Tensor] = {}
            for file in files:
                state_dict.update(load_checkpoint(file, dtype))
            return state_dict
    raise CheckpointLoadError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
