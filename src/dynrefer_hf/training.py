"""Training DynRefer with the Hugging Face ``Trainer``.

`RegionTrainer` adds to the model's own losses (captions, tags, and the region-caption contrastive loss
when caption embeddings are given) an optional direct supervision of the attribute and class heads with
region labels, and logs every loss part. `bag_of_words_embeddings` builds label-embedding tables when no
pretrained text encoder is available (the offline demonstration model, docs/demo_model.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

__all__ = [
    "ATTRIBUTE_LOSSES",
    "RegionTrainer",
    "attribute_groups",
    "bag_of_words_embeddings",
    "label_supervision_losses",
]


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


ATTRIBUTE_LOSSES = ("bce", "group_softmax")


def attribute_groups(attribute_names: Sequence[str]) -> list[list[int]]:
    """Column indices of each attribute group, groups in first-seen order (``"color"`` of ``"color:red"``)."""
    groups: dict[str, list[int]] = {}
    for column, name in enumerate(attribute_names):
        groups.setdefault(name.split(":")[0], []).append(column)
    return list(groups.values())


def _group_softmax_loss(
    logits: torch.Tensor, labels: torch.Tensor, groups: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Mean cross-entropy within each attribute group, over the (region, group) pairs with exactly one
    positive and no ignored label."""
    total, pairs = logits.sum() * 0.0, 0
    for columns in groups:
        group_labels = labels[:, columns]
        usable = ((group_labels == 1).sum(dim=1) == 1) & (group_labels != -1).all(dim=1)
        if usable.any():
            target = group_labels[usable].argmax(dim=1)
            total = total + F.cross_entropy(logits[usable][:, columns], target, reduction="sum")
            pairs += int(usable.sum())
    return total / max(pairs, 1)


def label_supervision_losses(
    model,
    region_queries: torch.Tensor,
    attribute_labels: torch.Tensor,
    class_labels: torch.Tensor,
    attribute_loss: str = "bce",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct losses for the attribute and class heads from region labels.

    The logits are the attribute head's raw scores `s` (model.md §8-§9; for an attribute, the max over its
    prompts) scaled as in upstream's contrastive training, `s * exp(attr_t) + attr_b`: `s` is a dot product
    with an L2-normalised vector, too narrow a range to fit labels unscaled. Inference ranks by `s` itself
    (sigmoid for attributes, argmax for classes), which the scaling does not reorder. Classes are trained
    with cross-entropy (class -1 ignored). Attributes with ``attribute_loss``:

    * ``"bce"``: binary cross-entropy over every label that is not -1 (any number of positives);
    * ``"group_softmax"``: cross-entropy over the attributes of each group (``"group:value"`` names), for
      groups with exactly one positive. Where every group is single-valued (a colour, a texture, a size)
      this is the better-posed loss: BCE lets the shared head settle on one constant score (the positive
      rate) for every attribute, which also flattens the class scores computed by the same head.

    Args:
        region_queries: `[R, Q, H]` from the model's forward.
        attribute_labels: `[R, num_attributes]` in {1, 0, -1}.
        class_labels: `[R]`, -1 = unlabelled.
    Returns:
        `(attribute_loss, class_loss)`, each a scalar (0 when nothing is labelled).
    """
    if attribute_loss not in ATTRIBUTE_LOSSES:
        raise ValueError(f"attribute_loss must be one of {ATTRIBUTE_LOSSES}, got {attribute_loss!r}")
    scale, bias = model.attr_t.exp(), model.attr_b
    prompt_scores = model.attribute_similarity(region_queries, model.att_embeds).float() * scale + bias
    group_sizes = torch.tensor(model.config.attribute_group_sizes, device=prompt_scores.device)
    group_of_prompt = torch.repeat_interleave(
        torch.arange(len(group_sizes), device=prompt_scores.device), group_sizes
    )
    index = group_of_prompt.expand(prompt_scores.shape[0], -1)
    attribute_scores = prompt_scores.new_full(
        (prompt_scores.shape[0], model.config.num_attributes), -torch.inf
    )
    attribute_scores = attribute_scores.scatter_reduce(1, index, prompt_scores, "amax", include_self=False)
    if attribute_loss == "group_softmax":
        attr_loss = _group_softmax_loss(
            attribute_scores, attribute_labels, attribute_groups(model.config.attribute_names)
        )
    elif (attribute_labels != -1).any():
        labelled = attribute_labels != -1
        attr_loss = F.binary_cross_entropy_with_logits(
            attribute_scores[labelled], attribute_labels[labelled].to(attribute_scores.dtype)
        )
    else:
        attr_loss = prompt_scores.sum() * 0.0
    class_scores = model.attribute_similarity(region_queries, model.ov_embeds).float() * scale
    if (class_labels != -1).any():
        class_loss = F.cross_entropy(class_scores, class_labels, ignore_index=-1)
    else:
        class_loss = class_scores.sum() * 0.0
    return attr_loss, class_loss


class RegionTrainer(Trainer):
    """`Trainer` for `DynReferForRegionCaptioning` on batches of `RegionTrainingCollator`.

    ``loss = model loss + attribute_loss_weight * attribute loss + class_loss_weight * class CE`` (see
    `label_supervision_losses`, ``attribute_loss`` = ``"bce"`` or ``"group_softmax"``) ``+ probe_loss_weight *
    probe loss``; the two label losses are computed only when the batch carries ``attribute_labels`` /
    ``class_labels``. Every part (``loss_llm``, ``loss_tag``, ``loss_att``, ``loss_attribute``, ``loss_class``,
    ``loss_probe``) is averaged over the logging interval and logged next to ``loss``.

    ``probe_loss_weight > 0`` adds deep supervision for training from scratch: a linear probe on the
    mean of the region queries predicts the classes, attributes and tags (cross-entropy, the attribute loss
    above, binary cross-entropy). The label heads score labels through cross-attention to the region queries,
    a path whose gradient reaching the backbone is tiny at initialisation; the probe gives the backbone a
    direct signal, so the queries become informative and the heads can learn from them. The probe is trained
    with the model but is not part of it (nothing of it is saved). ``probe_label_sizes`` adds to it one
    cross-entropy per column of the batch's ``probe_labels [R, K]`` (`RegionTrainingCollator`'s
    ``caption_labels``; column ``k`` has ``probe_label_sizes[k]`` classes, -1 ignored): targets that only
    the captions carry, such as the words about a region's context.
    """

    def __init__(
        self,
        *args,
        attribute_loss_weight: float = 1.0,
        class_loss_weight: float = 1.0,
        attribute_loss: str = "bce",
        probe_loss_weight: float = 0.0,
        probe_label_sizes: Sequence[int] = (),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if attribute_loss not in ATTRIBUTE_LOSSES:
            raise ValueError(f"attribute_loss must be one of {ATTRIBUTE_LOSSES}, got {attribute_loss!r}")
        self.attribute_loss = attribute_loss
        self.attribute_loss_weight = attribute_loss_weight
        self.class_loss_weight = class_loss_weight
        self.probe_loss_weight = probe_loss_weight
        self.probe_label_sizes = [int(size) for size in probe_label_sizes]
        if self.probe_label_sizes and probe_loss_weight <= 0:
            raise ValueError(f"probe_label_sizes {self.probe_label_sizes} need probe_loss_weight > 0")
        if any(size < 2 for size in self.probe_label_sizes):
            raise ValueError(f"every probe label needs at least 2 classes, got {self.probe_label_sizes}")
        self.probe = None
        if probe_loss_weight > 0:
            config = self.model.config
            outputs = config.num_classes + config.num_attributes + config.num_tags + sum(self.probe_label_sizes)
            self.probe = torch.nn.Linear(config.qformer_config.hidden_size, outputs).to(self.model.device)
        self._loss_parts: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.probe is not None and not any(
            parameter is self.probe.weight
            for group in optimizer.param_groups
            for parameter in group["params"]
        ):
            optimizer.add_param_group({"params": list(self.probe.parameters()), "weight_decay": 0.0})
        return optimizer

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
        if (class_labels != -1).any():
            loss = loss + F.cross_entropy(class_logits, class_labels, ignore_index=-1)
        if self.attribute_loss == "group_softmax":
            loss = loss + _group_softmax_loss(
                attribute_logits, attribute_labels, attribute_groups(config.attribute_names)
            )
        elif (attribute_labels != -1).any():
            labelled = attribute_labels != -1
            loss = loss + F.binary_cross_entropy_with_logits(
                attribute_logits[labelled], attribute_labels[labelled].float()
            )
        if tag_labels is not None:
            loss = loss + F.binary_cross_entropy_with_logits(tag_logits, tag_labels.float())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        attribute_labels = inputs.pop("attribute_labels", None)
        class_labels = inputs.pop("class_labels", None)
        probe_labels = inputs.pop("probe_labels", None)
        outputs = model(**inputs)
        loss = outputs.loss
        parts = {"loss_llm": outputs.loss_llm, "loss_tag": outputs.loss_tag, "loss_att": outputs.loss_att}
        if attribute_labels is not None and class_labels is not None:
            attribute_loss, class_loss = label_supervision_losses(
                model, outputs.region_queries, attribute_labels, class_labels, self.attribute_loss
            )
            parts.update(loss_attribute=attribute_loss, loss_class=class_loss)
            extra = self.attribute_loss_weight * attribute_loss + self.class_loss_weight * class_loss
            if self.probe is not None:
                parts["loss_probe"] = self._probe_loss(
                    outputs.region_queries, attribute_labels, class_labels, inputs.get("tag_labels"), probe_labels
                )
                extra = extra + self.probe_loss_weight * parts["loss_probe"]
            loss = extra if loss is None else loss + extra
        for name, value in parts.items():
            if value is not None:
                self._loss_parts[name].append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._loss_parts:
            logs.update(
                {name: round(sum(values) / len(values), 4) for name, values in self._loss_parts.items()}
            )
            self._loss_parts.clear()
        super().log(logs, *args, **kwargs)
