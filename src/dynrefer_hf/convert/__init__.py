"""Conversion of the released DynRefer checkpoints (LAVIS `.pth`) into a Hub-ready Transformers model.

Pure key mappers (usable on any subset of a state dict, e.g. with `model.load_state_dict(..., strict=False)`):
[`convert_upstream_state_dict`], [`convert_blip2_state_dict`], [`convert_eva_vit_state_dict`],
[`convert_eva_clip_text_state_dict`], [`convert_t5_state_dict`]; [`load_upstream_state_dict`] loads an upstream
state dict into a model after checking it (completeness, shapes, tied aliases). The whole conversion:
[`convert_checkpoints`] then [`save_converted`], or `dynrefer convert` / `python -m dynrefer_hf.convert`.
"""

from .conversion import (
    SOURCE_ORDER,
    TEXT_TABLES,
    ConversionError,
    ConversionReport,
    ConvertedModel,
    assemble_weights,
    build_text_encoder,
    compute_text_tables,
    convert_checkpoints,
    load_upstream_state_dict,
    model_weight_inventory,
    released_config,
    save_converted,
)
from .key_mapping import (
    MappedWeights,
    UnknownKeysError,
    convert_blip2_state_dict,
    convert_eva_clip_text_state_dict,
    convert_eva_vit_state_dict,
    convert_t5_state_dict,
    convert_upstream_state_dict,
    map_blip2_state_dict,
    map_eva_clip_text_state_dict,
    map_eva_vit_state_dict,
    map_t5_state_dict,
    map_upstream_state_dict,
)
from .loading import CheckpointLoadError, load_checkpoint

__all__ = [
    "SOURCE_ORDER",
    "TEXT_TABLES",
    "CheckpointLoadError",
    "ConversionError",
    "ConversionReport",
    "ConvertedModel",
    "MappedWeights",
    "UnknownKeysError",
    "assemble_weights",
    "build_text_encoder",
    "compute_text_tables",
    "convert_blip2_state_dict",
    "convert_checkpoints",
    "convert_eva_clip_text_state_dict",
    "convert_eva_vit_state_dict",
    "convert_t5_state_dict",
    "convert_upstream_state_dict",
    "load_checkpoint",
    "load_upstream_state_dict",
    "map_blip2_state_dict",
    "map_eva_clip_text_state_dict",
    "map_eva_vit_state_dict",
    "map_t5_state_dict",
    "map_upstream_state_dict",
    "model_weight_inventory",
    "released_config",
    "save_converted",
]
