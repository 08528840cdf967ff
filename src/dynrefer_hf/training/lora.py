"""Fine-tuning helpers: PEFT LoRA on the language model (upstream's ``finetune_llm``, docs/upstream/model.md §14) and the
region-caption contrastive loss fed from the captions of each batch (docs/upstream/model.md §8).

`examples/finetune.py` puts these together with `RegionTrainer`; docs/training.md explains the choices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .trainer import RegionTrainer, label_supervision_losses

__all__ = [
    "UPSTREAM_LORA_TARGETS",
    "CaptionEmbeddingTrainer",
    "CaptionTextCollator",
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


TRAINED_MODULES_FILE = "trained_modules.safetensors"


def _lora_base_model(model):
    """The model inside a peft wrapper, or ``None`` when ``model`` has no LoRA adapters."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else None


def _non_lora_trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}


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
class CaptionTextCollator:
    """Wraps a region collator and adds ``captions``: the caption strings of the batch, in region order.

    `CaptionEmbeddingTrainer` encodes them for the contrastive loss. The records are read the way
    `RegionTrainingCollator` reads them (every region of every record with at least one region).
    """

    collator: Callable[[Sequence[Mapping]], dict]

    def __call__(self, records: Sequence[Mapping]) -> dict:
        batch = self.collator(records)
        batch["captions"] = [caption for record in records for caption in record["captions"]]
        if len(batch["captions"]) != batch["pixel_values"].shape[0]:
            raise ValueError(
                f"{len(batch['captions'])} captions for {batch['pixel_values'].shape[0]} regions: "
                "every region needs one caption"
            )
        return batch


class CaptionEmbeddingTrainer(RegionTrainer):
    """`RegionTrainer` that turns each batch's ``captions`` into ``caption_embeds``, enabling the sigmoid
    region-caption loss ``loss_att`` (docs/upstream/model.md §8), all-gathered across processes under torch.distributed.

    Checkpoints of a LoRA run hold, next to peft's adapter file, the other trained parameters
    (``trained_modules.safetensors``); resuming restores both. Under DistributedDataParallel the label losses
    read the heads of the unwrapped model, and their gradients reach DDP only when those heads also take part
    in the forward (through ``loss_att``): with label-loss weights and several processes a ``caption_encoder``
    is required. A zero weight drops that loss (and its labels) altogether.

    Args:
        caption_encoder: ``captions -> [R, text_embed_dim]`` tensor, e.g. the frozen text encoder
            (``lambda texts: model.encode_texts(texts, clip_tokenizer)``). ``None`` drops the captions and
            trains without ``loss_att``.
        Everything else: as `RegionTrainer`.
    """

    def __init__(self, *args, caption_encoder: Callable[[list[str]], torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.caption_encoder = caption_encoder

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A LoRA checkpoint from peft holds the adapters only: add the other trained parameters beside it."""
        super()._save(output_dir, state_dict)
        base = _lora_base_model(self.model)
        if base is not None:
            from safetensors.torch import save_file

            output_dir = self.args.output_dir if output_dir is None else output_dir
            tensors = {name: p.detach().cpu().contiguous() for name, p in _non_lora_trainable(base).items()}
            save_file(tensors, os.path.join(output_dir, TRAINED_MODULES_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        base = _lora_base_model(self.model if model is None else model)
        path = os.path.join(resume_from_checkpoint, TRAINED_MODULES_FILE)
        if base is not None:
            if not os.path.isfile(path):
                raise ValueError(
                    f"{resume_from_checkpoint} has no {TRAINED_MODULES_FILE}: not a LoRA checkpoint"
                )
            from safetensors.torch import load_file

            tensors = load_file(path)
            expected = _non_lora_trainable(base)
            if set(tensors) != set(expected):
                raise ValueError(
                    f"{path} holds other parameters than the trainable ones: "
                    f"{sorted(set(tensors) ^ set(expected))[:5]}"
                )
            with torch.no_grad():
                for name, tensor in tensors.items():
                    expected[name].copy_(tensor)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Upstream's rule (docs/upstream/model.md §18): no weight decay for biases and for parameters of fewer than 2
        dimensions (norm weights, ``cem_memory``, ``attr_t``, ``attr_b``)."""
        return [
            name for name, parameter in model.named_parameters() if parameter.ndim >= 2 and "bias" not in name
        ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        captions = inputs.pop("captions", None)
        if self.caption_encoder is not None:
            if captions is None:
                raise ValueError("a caption_encoder needs batches with 'captions' (use CaptionTextCollator)")
            with torch.no_grad():
                embeds = self.caption_encoder(list(captions))
            inputs["caption_embeds"] = embeds.to(inputs["pixel_values"].device, torch.float32)
        attribute_labels = inputs.pop("attribute_labels", None)
        class_labels = inputs.pop("class_labels", None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        weighted = self.attribute_loss_weight != 0 or self.class_loss_weight != 0
        if weighted and attribute_labels is not None and class_labels is not None:
            unwrapped = self.accelerator.unwrap_model(model)
            if unwrapped is not model and "caption_embeds" not in inputs:
                raise ValueError(
                    "label losses under DistributedDataParallel need caption embeddings: the attribute head "
                    "must take part in the forward for DDP to synchronise its gradients"
                )
            attribute_loss, class_loss = label_supervision_losses(
                unwrapped, outputs.region_queries, attribute_labels, class_labels, self.attribute_loss
            )
            self._loss_parts["loss_attribute"].append(float(attribute_loss.detach()))
            self._loss_parts["loss_class"].append(float(class_loss.detach()))
            extra = self.attribute_loss_weight * attribute_loss + self.class_loss_weight * class_loss
            loss = extra if loss is None else loss + extra
        return (loss, outputs) if return_outputs else loss
