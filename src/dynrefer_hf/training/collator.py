"""Batches of region-schema records for training: nested views, control prompts, caption labels, targets."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..data.schema import ATTRIBUTE_IGNORE, RegionVocabulary

__all__ = ["RegionTrainingCollator", "sample_control_words"]


def sample_control_words(
    candidates: Sequence[str], rng: random.Random, full_drop_ratio: float = 0.5, drop_ratio: float = 0.5
) -> list[str]:
    """Upstream's training-time control words (docs/upstream/model.md §12).

    With probability ``full_drop_ratio`` no word at all; otherwise every candidate is kept independently
    when a uniform draw exceeds ``drop_ratio``, and the kept words are shuffled.
    """
    if rng.random() < full_drop_ratio:
        return []
    kept = [word for word in dict.fromkeys(candidates) if rng.random() > drop_ratio]
    rng.shuffle(kept)
    return kept


@dataclass
class RegionTrainingCollator:
    """Turns a list of region-schema records (docs/data.md) into one training batch of all their regions.

    Every record contributes all of its regions. Views are drawn with the processor's ``"random"``
    selection (upstream's training sampling, docs/upstream/views.md §3) unless ``view_selection`` says otherwise; control
    prompts come from each region's tags through `sample_control_words`; captions become ``labels``.

    Returns a dict with the processor's ``pixel_values [R, V, 3, S, S]``, ``view_boxes [R, V, 4]``,
    ``input_ids`` / ``attention_mask`` (control prompts), ``labels`` / ``decoder_attention_mask``
    (captions, pad = -100), ``tag_labels [R, num_tags]`` (multi-hot), ``attribute_labels [R, A]`` (1 / 0 / -1,
    all -1 for an unlabelled region) and ``class_labels [R]`` (-1 = none); with ``caption_labels``, also
    ``probe_labels [R, K]``.

    Args:
        processor: a `DynReferProcessor` (image processor + tokenizer).
        vocabulary: the dataset's label spaces; ``tag_labels`` columns follow ``vocabulary.tags``.
        view_selection: passed to the image processor (``"random"``, ``"image_prior"``, ``"task"`` or t values).
        task: the task prior for ``view_selection="task"``.
        use_controls: give tag words as control prompts (upstream); ``False`` gives every region the empty prompt.
        seed: seeds view and control-word sampling, so a run is reproducible. Batch ``n`` (counted from 0)
            draws from ``random.Random(f"{seed}:{n}")``, so a resumed run draws what an uninterrupted one would
            once ``batch_index`` is set to the number of batches already trained on (`RegionTrainer` does that;
            one collator per process, dataloader workers not supported for exact resumption).
        caption_labels: optional map from a region's caption to ``K`` integer labels (-1 = none), e.g. the
            caption's context words as class indices; they become ``probe_labels``, extra targets of
            `RegionTrainer`'s probe (``probe_label_sizes``).
    """

    processor: object
    vocabulary: RegionVocabulary
    view_selection: str | Sequence[float] = "random"
    task: str | None = None
    use_controls: bool = True
    seed: int = 0
    caption_labels: Callable[[str], Sequence[int]] | None = None
    batch_index: int = 0

    def __post_init__(self) -> None:
        self._tag_index = {tag: index for index, tag in enumerate(self.vocabulary.tags)}

    def __call__(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not records:
            raise ValueError("RegionTrainingCollator got an empty batch")
        records = [record for record in records if len(record["boxes"]) > 0]
        if not records:
            raise ValueError("none of the records in this batch has a region")
        rng = random.Random(f"{self.seed}:{self.batch_index}")  # str seeds hash the same in every process
        self.batch_index += 1
        captions = [caption for record in records for caption in record["captions"]]
        region_tags = [tags for record in records for tags in record["tags"]]
        controls = [
            sample_control_words(tags, rng) if self.use_controls else [] for tags in region_tags
        ]
        batch = self.processor(
            images=[record["image"] for record in records],
            boxes=[record["boxes"] for record in records],
            text=captions,
            controls=controls,
            view_selection=self.view_selection,
            task=self.task,
            seed=rng.randrange(2**32),
        )
        batch = dict(batch)
        for key in ("view_ratios", "crop_boxes", "region_image_index", "region_boxes"):
            batch.pop(key, None)
        batch["tag_labels"] = self._tag_targets(region_tags)
        batch["attribute_labels"] = self._attribute_targets(records)
        batch["class_labels"] = torch.tensor(
            [label for record in records for label in record["classes"]], dtype=torch.long
        )
        if self.caption_labels is not None:
            batch["probe_labels"] = torch.tensor(
                [list(self.caption_labels(caption)) for caption in captions], dtype=torch.long
            )
        return batch

    def _tag_targets(self, region_tags: Sequence[Sequence[str]]) -> torch.Tensor:
        targets = torch.zeros(len(region_tags), len(self.vocabulary.tags))
        for row, tags in enumerate(region_tags):
            unknown = [tag for tag in tags if tag not in self._tag_index]
            if unknown:
                raise ValueError(f"tags {unknown} are not in the vocabulary")
            targets[row, [self._tag_index[tag] for tag in tags]] = 1.0
        return targets

    def _attribute_targets(self, records: Sequence[Mapping]) -> torch.Tensor:
        num_attributes = len(self.vocabulary.attributes)
        rows = [
            list(labels) if len(labels) else [ATTRIBUTE_IGNORE] * num_attributes
            for record in records
            for labels in record["attributes"]
        ]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, num_attributes)
