"""Training DynRefer with the Hugging Face ``Trainer``: the collators, the trainer and LoRA on the language model."""

from .checkpoints import CheckpointCompletionCallback, last_complete_checkpoint
from .collator import RegionTrainingCollator, sample_control_words
from .lora import (
    UPSTREAM_LORA_TARGETS,
    CaptionEmbeddingCollator,
    CaptionEmbeddingTrainer,
    OneRegionPerSample,
    add_language_model_lora,
    language_model_lora_config,
    merge_language_model_lora,
)
from .trainer import ATTRIBUTE_LOSSES, RegionTrainer, attribute_groups, bag_of_words_embeddings

__all__ = [
    "ATTRIBUTE_LOSSES",
    "UPSTREAM_LORA_TARGETS",
    "CaptionEmbeddingCollator",
    "CaptionEmbeddingTrainer",
    "CheckpointCompletionCallback",
    "OneRegionPerSample",
    "RegionTrainer",
    "RegionTrainingCollator",
    "add_language_model_lora",
    "attribute_groups",
    "bag_of_words_embeddings",
    "language_model_lora_config",
    "last_complete_checkpoint",
    "merge_language_model_lora",
    "sample_control_words",
]
