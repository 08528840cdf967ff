"""Training DynRefer with the Hugging Face ``Trainer``.

The model computes every loss itself (captions, tags, the region-caption contrastive loss, the attribute and
class label losses; `DynReferForRegionCaptioning.forward`), so a plain `transformers.Trainer` trains every
head, under DistributedDataParallel too. `RegionTrainer` only adds conveniences: every loss part logged, an
optional linear probe for training from scratch, upstream's weight-decay rule and LoRA checkpoints that keep
the other trained parameters. `bag_of_words_embeddings` builds label-embedding tables when no pretrained text
encoder is available (the offline demonstration model, docs/demo_model.md).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..modeling_dynrefer import (
    ATTRIBUTE_LABEL_LOSSES,
    DynReferOutput,
    attribute_groups,
    attribute_label_loss,
    class_label_loss,
)
from .checkpoints import CheckpointCompletionCallback, is_complete_checkpoint, last_complete_checkpoint

__all__ = [
    "ATTRIBUTE_LOSSES",
    "TRAINED_MODULES_FILE",
    "RegionTrainer",
    "attribute_groups",
    "bag_of_words_embeddings",
]

ATTRIBUTE_LOSSES = ATTRIBUTE_LABEL_LOSSES  # the values of config.attribute_label_loss

# the loss parts of DynReferOutput that RegionTrainer logs
LOSS_PARTS = ("loss_caption", "loss_tag", "loss_region_text", "loss_attribute", "loss_class")

# deprecated RegionTrainer arguments -> the config fields that now hold them
_CONFIG_ARGUMENTS = {
    "attribute_loss": "attribute_label_loss",
    "attribute_loss_weight": "attribute_label_loss_weight",
    "class_loss_weight": "class_label_loss_weight",
}

TRAINED_MODULES_FILE = "trained_modules.safetensors"


def bag_of_words_embeddings(
    texts: Sequence[str], words: Sequence[str], dim: int | None = None
) -> torch.Tensor:
    """L2-normalised counts of ``words`` in each text (lower-cased, split on whitespace): ``[len(texts), dim]``.

    Column ``i`` counts ``words[i]``; columns past ``len(words)`` stay zero (``dim`` defaults to
    ``len(words)``). A transparent stand-in for CLIP text embeddings: texts that share a word share a
    direction, so "the red" (an attribute prompt) and "red" (a tag) are embedded alike.

    Raises:
        ValueError: a text with none of ``words``, duplicate words, or ``dim < len(words)``.
    """
    index = {word: position for position, word in enumerate(words)}
    if len(index) != len(words):
        raise ValueError("bag_of_words_embeddings: words must be distinct")
    dim = len(words) if dim is None else dim
    if dim < len(words):
        raise ValueError(f"dim {dim} is smaller than the {len(words)} words")
    table = torch.zeros(len(texts), dim)
    for row, text in enumerate(texts):
        known = [index[token] for token in text.lower().split() if token in index]
        if not known:
            raise ValueError(f"{text!r} contains none of the embedding words")
        table[row].index_add_(0, torch.tensor(known), torch.ones(len(known)))
    return F.normalize(table, dim=-1)




def _lora_base_model(model):
    """The model inside a peft wrapper, or ``None`` when ``model`` has no LoRA adapters."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else None


def _non_lora_trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}


class RegionTrainer(Trainer):
    """`Trainer` for `DynReferForRegionCaptioning` (batches of `RegionTrainingCollator`, optionally wrapped by
    `CaptionEmbeddingCollator`). The loss is the model's own (`outputs.loss`); a plain `Trainer` gives the same
    training. This subclass adds:

    * every loss part of the model (``loss_caption``, ``loss_tag``, ``loss_region_text``, ``loss_attribute``,
      ``loss_class``) and ``loss_probe`` averaged over the logging interval and logged next to ``loss``;
    * ``probe_loss_weight > 0``: deep supervision for training from scratch. A linear probe on the mean of the
      region queries predicts the classes, attributes and tags (the model's class and attribute label losses,
      binary cross-entropy for tags). The label heads score labels through cross-attention to the region
      queries, a path whose gradient reaching the backbone is tiny at initialisation; the probe gives the
      backbone a direct signal. The probe trains with the model but is not part of it (nothing of it is saved;
      under several processes it has its own DistributedDataParallel wrapper). ``probe_label_sizes`` adds to it
      one cross-entropy per column of the batch's ``probe_labels [R, K]`` (`RegionTrainingCollator`'s
      ``caption_labels``; column ``k`` has ``probe_label_sizes[k]`` classes, -1 ignored): targets that only the
      captions carry, such as the words about a region's context;
    * upstream's weight-decay rule (docs/upstream/model.md §18): none for biases and parameters of fewer than
      2 dimensions;
    * LoRA checkpoints (peft) that hold, next to the adapters, the other trained parameters
      (``trained_modules.safetensors``), restored on resume.

    The label-loss settings live in the model config (``attribute_label_loss``, ``attribute_label_loss_weight``,
    ``class_label_loss_weight``); the former arguments ``attribute_loss``, ``attribute_loss_weight`` and
    ``class_loss_weight`` still set them, with a FutureWarning.
    """

    def __init__(self, *args, probe_loss_weight: float = 0.0, probe_label_sizes: Sequence[int] = (), **kwargs):
        moved = {name: kwargs.pop(name) for name in list(kwargs) if name in _CONFIG_ARGUMENTS}
        super().__init__(*args, **kwargs)
        self.add_callback(CheckpointCompletionCallback())
        config = self.model.config
        for name, value in moved.items():
            warnings.warn(
                f"RegionTrainer({name}=...) is deprecated: set model.config.{_CONFIG_ARGUMENTS[name]}",
                FutureWarning,
                stacklevel=2,
            )
            setattr(config, _CONFIG_ARGUMENTS[name], value)
        if config.attribute_label_loss not in ATTRIBUTE_LOSSES:
            raise ValueError(
                f"attribute_label_loss must be one of {ATTRIBUTE_LOSSES}, got {config.attribute_label_loss!r}"
            )
        self.probe_loss_weight = probe_loss_weight
        self.probe_label_sizes = [int(size) for size in probe_label_sizes]
        if self.probe_label_sizes and probe_loss_weight <= 0:
            raise ValueError(f"probe_label_sizes {self.probe_label_sizes} need probe_loss_weight > 0")
        if any(size < 2 for size in self.probe_label_sizes):
            raise ValueError(f"every probe label needs at least 2 classes, got {self.probe_label_sizes}")
        self.probe = None
        if probe_loss_weight > 0:
            outputs = config.num_classes + config.num_attributes + config.num_tags + sum(self.probe_label_sizes)
            self.probe = torch.nn.Linear(config.qformer_config.hidden_size, outputs).to(self.model.device)
            if self.args.world_size > 1:  # outside the model's DDP wrapper: synchronised by its own
                self.probe = torch.nn.parallel.DistributedDataParallel(self.probe)
        self._loss_parts: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.probe is not None and not any(
            parameter is next(self.probe.parameters())
            for group in optimizer.param_groups
            for parameter in group["params"]
        ):
            optimizer.add_param_group({"params": list(self.probe.parameters()), "weight_decay": 0.0})
        return optimizer

    def get_decay_parameter_names(self, model) -> list[str]:
        """Upstream's rule (docs/upstream/model.md §18): no weight decay for biases and for parameters of fewer
        than 2 dimensions (norm weights, ``cem_memory``, ``attr_t``, ``attr_b``)."""
        return [
            name for name, parameter in model.named_parameters() if parameter.ndim >= 2 and "bias" not in name
        ]

    def _probe_loss(
        self, region_queries, attribute_labels, class_labels, tag_labels, probe_labels
    ) -> torch.Tensor:
        config = self.model.config
        logits = self.probe(region_queries.mean(dim=1).float())
        class_logits, attribute_logits, tag_logits, *extra_logits = logits.split(
            [config.num_classes, config.num_attributes, config.num_tags, *self.probe_label_sizes], dim=1
        )
        loss = logits.sum() * 0.0
        if extra_logits:
            if probe_labels is None or probe_labels.shape[1] != len(extra_logits):
                raise ValueError(
                    f"probe_label_sizes {self.probe_label_sizes} need probe_labels [R, {len(extra_logits)}] "
                    f"in every batch, got {None if probe_labels is None else list(probe_labels.shape)}"
                )
            for column, column_logits in enumerate(extra_logits):
                if (probe_labels[:, column] != -1).any():
                    loss = loss + F.cross_entropy(column_logits, probe_labels[:, column], ignore_index=-1)
        if class_labels is not None:
            loss = loss + class_label_loss(class_logits, class_labels)
        if attribute_labels is not None:
            loss = loss + attribute_label_loss(
                attribute_logits, attribute_labels, config.attribute_label_loss, config.attribute_names
            )
        if tag_labels is not None:
            loss = loss + F.binary_cross_entropy_with_logits(tag_logits, tag_labels.float())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        probe_labels = inputs.pop("probe_labels", None)  # the probe's extra targets, not the model's
        outputs: DynReferOutput = model(**inputs)
        loss = outputs.loss
        parts = {name: outputs[name] for name in LOSS_PARTS if outputs.get(name) is not None}
        if self.probe is not None:
            parts["loss_probe"] = self._probe_loss(
                outputs.region_queries,
                inputs.get("attribute_labels"),
                inputs.get("class_labels"),
                inputs.get("tag_labels"),
                probe_labels,
            )
            extra = self.probe_loss_weight * parts["loss_probe"]
            loss = extra if loss is None else loss + extra
        if loss is None:
            raise ValueError(
                "the batch gave the model no target: give labels, tag_labels, attribute_labels, class_labels "
                "or caption_embeds"
            )
        for name, value in parts.items():
            self._loss_parts[name].append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints: ``resume_from_checkpoint=True`` takes the
        last complete one of ``output_dir`` (a folder half-written by a killed run is skipped), and a folder
        without the completion marker is refused (`training.checkpoints`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: {self.args.output_dir} holds no complete checkpoint")
        elif resume_from_checkpoint and not is_complete_checkpoint(resume_from_checkpoint):
            last = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (its saving did not finish, or it was not "
                f"written by RegionTrainer); the last complete one beside it: {last}"
            )
        # Point the collator's sampler at the first batch not yet trained on: a resumed run then draws the
        # views and control words an uninterrupted one would (skipped batches are not collated again).
        collator = self.data_collator
        while collator is not None and not hasattr(collator, "batch_index"):
            collator = getattr(collator, "collator", None)  # wrappers keep the sampling collator as `.collator`
        if collator is not None:
            collator.batch_index = 0
            if resume_from_checkpoint:
                with open(os.path.join(resume_from_checkpoint, "trainer_state.json"), encoding="utf-8") as file:
                    trained_steps = json.load(file)["global_step"]
                collator.batch_index = trained_steps * self.args.gradient_accumulation_steps
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._loss_parts:
            logs.update(
                {name: round(sum(values) / len(values), 4) for name, values in self._loss_parts.items()}
            )
            self._loss_parts.clear()
        super().log(logs, *args, **kwargs)

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
