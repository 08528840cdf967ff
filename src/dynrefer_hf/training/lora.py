"""Fine-tuning helpers: PEFT LoRA on the language model (upstream's ``finetune_llm``, docs/upstream/model.md §14) and
the caption embeddings of each batch that feed the region-caption contrastive loss (docs/upstream/model.md §8).

`examples/finetune.py` puts these together with a `Trainer`; docs/training.md explains the choices.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .trainer import RegionTrainer

__all__ = [
    "UPSTREAM_LORA_TARGETS",
    "CaptionEmbeddingCollator",
    "CaptionEmbeddingTrainer",
    "OneRegionPerSample",
    "add_language_model_lora",
    "language_model_lora_config",
    "merge_language_model_lora",
]

# Upstream asks for ["embed_tokens", "lm_head", "q", "v"], but in its T5 (transformers < 5) the stacks'
# `embed_tokens` is the `shared` module itself, which `named_modules()` lists once, as "shared": peft never
# matches "embed_tokens" there, so the adapters land on q, v and lm_head only. These are those targets.
UPSTREAM_LORA_TARGETS = ("q", "v", "lm_head")


def language_model_lora_config(
    r: int = 64,
    lora_alpha: int = 128,
    lora_dropout: float = 0.0,
    targets: Sequence[str] = UPSTREAM_LORA_TARGETS,
):
    """A peft `LoraConfig` with targets inside ``model.language_model`` only (defaults: docs/upstream/model.md §14).

    ``targets`` are module-name suffixes as in peft (``"q"`` matches every ``...SelfAttention.q`` and
    ``...EncDecAttention.q`` of the T5); the regex keeps them inside the language model, so a Q-Former or
    label-head module of the same name is never wrapped.

    Raises:
        ValueError: no targets, or a target that is not a plain module name.
    """
    from peft import LoraConfig

    targets = list(targets)
    if not targets or not all(name.replace("_", "").isalnum() for name in targets):
        raise ValueError(f"LoRA targets must be plain module names such as 'q' or 'lm_head', got {targets}")
    pattern = rf"(.*\.)?language_model(\..*)?\.({'|'.join(targets)})"
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern)


def add_language_model_lora(model, lora_config=None):
    """Wrap ``model`` with LoRA adapters on its language model; returns the `peft.PeftModel`.

    As upstream, the language model is cast to float32 first (its adapters train in fp32 even where the
    frozen LM was bfloat16), and the modules of ``model.config.trainable_modules`` stay trainable next to the
    adapters (peft alone would freeze them).

    Raises:
        ValueError: (from peft) when the config's targets match no module.
    """
    from peft import get_peft_model

    lora_config = language_model_lora_config() if lora_config is None else lora_config
    model.language_model.float()
    peft_model = get_peft_model(model, lora_config)  # raises ValueError when no module matches
    model.set_trainable()  # every module named in config.trainable_modules, nothing else ...
    for name, parameter in peft_model.named_parameters():
        if "lora_" in name:  # ... plus the adapters
            parameter.requires_grad_(True)
    return peft_model


def merge_language_model_lora(peft_model):
    """Fold the adapters into the language-model weights; returns the plain model (saved as usual)."""
    model = peft_model.merge_and_unload()
    model.set_trainable()
    return model


PER_REGION_FIELDS = ("boxes", "captions", "tags", "attributes", "classes")


class OneRegionPerSample(Dataset):
    """A view of a region dataset (docs/data.md) with one sample per region, upstream's training layout
    (``obj_lvl``, docs/upstream/model.md §18): a batch of ``n`` samples is ``n`` regions, the same count on every process,
    which the all-gathered contrastive loss assumes (docs/training.md). Sample ``k`` is the record of its
    image with only region ``k``; images are decoded when a sample is read.
    """

    def __init__(self, records):
        self.records = records
        counts = (
            [len(boxes) for boxes in records["boxes"]]
            if hasattr(records, "column_names")
            else [len(record["boxes"]) for record in records]
        )
        self.index = [(record, region) for record, count in enumerate(counts) for region in range(count)]
        if not self.index:
            raise ValueError("the dataset holds no region")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> dict:
        record_index, region = self.index[position]
        record = self.records[record_index]
        return {**record, **{key: [record[key][region]] for key in PER_REGION_FIELDS}}


@dataclass
class CaptionEmbeddingCollator:
    """Wraps a region collator and adds ``caption_embeds`` ``[R, text_embed_dim]``: the region captions of the
    batch (in region order) through ``caption_encoder``, which turns on the region-caption contrastive loss
    ``loss_region_text`` of the model (docs/upstream/model.md §8; all-gathered across processes).

    The records are read the way `RegionTrainingCollator` reads them (every region of every record with at
    least one region). ``caption_encoder`` maps a list of captions to a tensor, e.g. the frozen text encoder
    (``lambda texts: model.encode_texts(texts, clip_tokenizer)``); it runs without gradient where the collator
    runs (the main process with the Trainer's default ``dataloader_num_workers=0``), and its embeddings are
    returned on the CPU in float32.
    """

    collator: Callable[[Sequence[Mapping]], dict]
    caption_encoder: Callable[[list[str]], torch.Tensor]

    def __call__(self, records: Sequence[Mapping]) -> dict:
        batch = self.collator(records)
        captions = [caption for record in records if len(record["boxes"]) for caption in record["captions"]]
        if len(captions) != batch["pixel_values"].shape[0]:
            raise ValueError(
                f"{len(captions)} captions for {batch['pixel_values'].shape[0]} regions: "
                "every region needs one caption"
            )
        with torch.no_grad():
            batch["caption_embeds"] = self.caption_encoder(captions).detach().to("cpu", torch.float32)
        return batch


def CaptionEmbeddingTrainer(*args, caption_encoder=None, data_collator=None, **kwargs) -> RegionTrainer:
    """Deprecated: a `RegionTrainer` whose collator is wrapped in `CaptionEmbeddingCollator(data_collator,
    caption_encoder)`; use those two (or a plain `Trainer`) instead."""
    warnings.warn(
        "CaptionEmbeddingTrainer is deprecated: wrap the collator in CaptionEmbeddingCollator(collator, "
        "caption_encoder) and use RegionTrainer or transformers.Trainer",
        FutureWarning,
        stacklevel=2,
    )
    if caption_encoder is not None:
        data_collator = CaptionEmbeddingCollator(data_collator, caption_encoder)
    return RegionTrainer(*args, data_collator=data_collator, **kwargs)
