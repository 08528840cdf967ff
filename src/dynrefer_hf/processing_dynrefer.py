"""DynReferProcessor: the image processor (nested views) plus the tokenizer: images, regions and text in
(control prompts, caption labels), region records out (`post_process_generation`,
`post_process_region_captioning`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from .prompts import ControlPromptTokens, format_control_prompt, merge_control_words, parse_control_words

__all__ = ["DynReferProcessor"]


class DynReferProcessor(ProcessorMixin):
    r"""Wraps a [`DynReferImageProcessor`] and a T5 tokenizer into one processor.

    The image processor builds the nested views of every region; the tokenizer encodes the control
    prompt of each region in upstream's `"w1,w2|"` format (docs/upstream/model.md §11-§12) and, for training, its
    caption as `labels` (padded with -100).

    Args:
        image_processor ([`DynReferImageProcessor`]): the view builder.
        tokenizer ([`T5TokenizerFast`]): Flan-T5's tokenizer or one with the same conventions (EOS appended).
        max_text_length (`int`, *optional*, defaults to 32): truncation length of prompts and captions
            (upstream `max_txt_len`).
    """

    def __init__(self, image_processor=None, tokenizer=None, max_text_length: int = 32, **kwargs):
        self.max_text_length = int(max_text_length)
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: Any = None,
        boxes: Any = None,
        masks: Any = None,
        controls: Sequence[str | Sequence[str]] | None = None,
        text: Sequence[str] | None = None,
        return_tensors: str = "pt",
        **image_kwargs,
    ) -> BatchFeature:
        r"""Views of every region, and optionally its control prompt and caption labels.

        Args:
            images, boxes, masks: as [`DynReferImageProcessor.__call__`]; further keyword arguments
                (`view_selection`, `task`, `normalized_boxes`, `seed`) go to the image processor.
            controls (*optional*): one entry per region (all images, in order): a list of control words or
                a string of comma-separated words; `[]` or `""` gives the empty prompt `"|"`. `None`: no
                prompt is encoded (the model then builds it from its predicted tags).
            text (*optional*): one caption per region, encoded as `labels` for training.
            return_tensors: `"pt"` (default) or `"np"`.

        Returns:
            [`BatchFeature`] with the image processor's keys, plus `input_ids` and `attention_mask` `[R, T]`
            when `controls` is given, and `labels` `[R, L]` (L <= `max_text_length`, pad = -100, EOS
            appended) with their `decoder_attention_mask` `[R, L]` when `text` is given (upstream passes
            the caption mask as the decoder attention mask).
        """
        if images is None:
            raise ValueError("DynReferProcessor needs `images` (with `boxes` or `masks`)")
        features = self.image_processor(images, boxes=boxes, masks=masks, return_tensors="pt", **image_kwargs)
        num_regions = features["region_image_index"].shape[0]
        data = dict(features)
        if controls is not None:
            encoded = self.encode_control_prompts(self._per_region(controls, num_regions, "controls"))
            data["input_ids"], data["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        if text is not None:
            captions = self._per_region(text, num_regions, "text")
            if not all(isinstance(caption, str) for caption in captions):
                raise ValueError("text must hold one caption string per region")
            encoded = self._tokenize(captions)
            data["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
            data["decoder_attention_mask"] = encoded["attention_mask"]
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        elif return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        return BatchFeature(data=data)

    @staticmethod
    def _per_region(values: Any, num_regions: int, name: str) -> list:
        if isinstance(values, str):
            values = [values]
        values = list(values)
        if len(values) != num_regions:
            raise ValueError(
                f"{name} must hold one entry per region: got {len(values)} for {num_regions} regions"
            )
        return values

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.int64)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        return self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )

    def tokenize_tag_vocabulary(self, tag_names: Sequence[str]) -> dict[str, Any]:
        """The tag vocabulary as this tokenizer writes it in a control prompt, for `DynReferConfig.control_prompt_tokens`
        (`prompts.ControlPromptTokens`): with it the model puts its predicted tags into the prompt on token ids,
        exactly as tokenising the text prompt would (`model.config.control_prompt_tokens =
        processor.tokenize_tag_vocabulary(model.config.tag_names)`; the converter, the demo trainer and the
        pipeline do this)."""
        return ControlPromptTokens.from_tokenizer(self.tokenizer, tag_names, self.max_text_length).to_dict()

    def build_control_prompts(
        self,
        controls: Sequence[str | Sequence[str] | None] | None = None,
        tags: Sequence[Sequence[str]] | None = None,
    ) -> list[str]:
        """Upstream's control prompt of every region (docs/upstream/model.md §11-§12): its user words
        (`controls[r]`: a list of words or a string of comma-separated words) first, then its predicted tags
        (`tags[r]`), each word once, formatted `"w1,w2|"`. Give at least one of `controls` and `tags`."""
        if controls is None and tags is None:
            raise ValueError("build_control_prompts needs controls or tags (one entry per region)")
        if controls is not None and tags is not None and len(controls) != len(tags):
            raise ValueError(f"controls has {len(controls)} entries for {len(tags)} regions")
        count = len(tags) if controls is None else len(controls)
        controls = [None] * count if controls is None else controls
        tags = [[]] * count if tags is None else tags
        return [
            format_control_prompt(merge_control_words(parse_control_words(words), region_tags))
            for words, region_tags in zip(controls, tags)
        ]

    def encode_control_prompts(
        self,
        controls: Sequence[str | Sequence[str] | None] | None = None,
        tags: Sequence[Sequence[str]] | None = None,
    ) -> BatchFeature:
        """`build_control_prompts` tokenised: `input_ids`, `attention_mask` `[R, T]` (padded to the longest,
        truncated to `max_text_length`), the model's `input_ids` for `forward` and `generate`."""
        return BatchFeature(data=dict(self._tokenize(self.build_control_prompts(controls, tags))))

    def post_process_generation(self, outputs, tag_names: Sequence[str]) -> list[dict]:
        """Region records from `model.generate`'s output (docs/upstream/model.md §16), one per region of all
        images, in order; from `model.label_regions`' output (heads only) without `caption` and `score`.

        Args:
            outputs: a `DynReferGenerationOutput`.
            tag_names: the model's tag vocabulary (`model.config.tag_names`).

        Returns:
            `[{"caption": str, "score": float (the caption's probability), "tags": [str] (tag-list order),
            "attribute_scores": [float] * num_attributes, "class_scores": [float] * num_classes}, ...]`.
        """
        tag_mask = outputs["tag_mask"]
        if tag_mask.dim() != 2 or tag_mask.shape[1] != len(tag_names):
            raise ValueError(f"tag_mask must be [R, {len(tag_names)}] (one column per tag name), got {list(tag_mask.shape)}")
        records = [
            {
                "tags": [tag_names[i] for i in row.nonzero().flatten().tolist()],
                "attribute_scores": attributes,
                "class_scores": classes,
            }
            for row, attributes, classes in zip(
                tag_mask.cpu(), outputs["attribute_scores"].tolist(), outputs["class_scores"].tolist()
            )
        ]
        if outputs.get("sequences") is None:  # heads only
            return records
        captions = self.batch_decode(outputs["sequences"])
        scores = outputs["sequences_scores"].float().exp().tolist()
        if not len(captions) == len(scores) == len(records):
            raise ValueError(f"the outputs hold {len(captions)} captions for {len(records)} regions")
        return [
            {"caption": caption, "score": score, **record} for caption, score, record in zip(captions, scores, records)
        ]

    def post_process_region_captioning(
        self,
        outputs,
        inputs: Mapping[str, Any],
        vocabulary,
        attribute_top_k: int | None = 5,
        return_views: bool = False,
    ) -> list[list[dict]]:
        """The `region-captioning` pipeline's records from `model.generate(**inputs)` (or `model.label_regions`),
        one list per image of `inputs`:

            inputs = processor(images=image, boxes=boxes)
            records = processor.post_process_region_captioning(model.generate(**inputs), inputs, model.config)[0]

        Args:
            outputs: a `DynReferGenerationOutput`.
            inputs: the processor's output the model ran on (for the region boxes and the views).
            vocabulary: anything with `tag_names`, `attribute_names` and `class_names`: the model's config.
            attribute_top_k: how many attributes to give per region, best first (`None`: all).
            return_views: add each region's views (`"views": {"ratios", "crop_boxes", "view_boxes"}`).

        Returns:
            per image, per region `{"box": [x1, y1, x2, y2], "caption": str, "score": float, "tags": [str],
            "attributes": [{"name", "score"}], "label": {"name", "score"} | None}` (no `caption` and `score` from
            `label_regions`).
        """
        attribute_names = list(vocabulary.attribute_names or [])
        class_names = list(vocabulary.class_names or [])
        image_index = inputs["region_image_index"].tolist()
        per_image: list[list[dict]] = [[] for _ in range(max(image_index, default=-1) + 1)]
        for region, record in enumerate(self.post_process_generation(outputs, vocabulary.tag_names)):
            result = {"box": [float(value) for value in inputs["region_boxes"][region].tolist()]}
            if "caption" in record:
                result.update(caption=record["caption"], score=float(record["score"]))
            result.update(
                tags=record["tags"],
                attributes=_top_attributes(record["attribute_scores"], attribute_names, attribute_top_k),
                label=_best_class(record["class_scores"], class_names),
            )
            if return_views:
                result["views"] = {
                    "ratios": inputs["view_ratios"][region].tolist(),
                    "crop_boxes": inputs["crop_boxes"][region].tolist(),
                    "view_boxes": inputs["view_boxes"][region].tolist(),
                }
            per_image[image_index[region]].append(result)
        return per_image

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode generated token ids to captions (special tokens skipped by default, as upstream)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        """Decode one sequence of token ids (special tokens skipped by default)."""
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "view_boxes", "input_ids", "attention_mask"]


def _top_attributes(scores: Sequence[float], names: Sequence[str], top_k: int | None) -> list[dict[str, Any]]:
    """The ``top_k`` best attributes, best first (stable: ties keep vocabulary order)."""
    if len(scores) != len(names):
        raise ValueError(
            f"the model gave {len(scores)} attribute scores but its config names {len(names)} attributes"
        )
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_k is not None:
        order = order[:top_k]
    return [{"name": names[i], "score": float(scores[i])} for i in order]


def _best_class(scores: Sequence[float], names: Sequence[str]) -> dict[str, Any] | None:
    """The class with the highest score (the first one on ties, as upstream's ``np.argmax``)."""
    if len(scores) != len(names):
        raise ValueError(
            f"the model gave {len(scores)} class scores but its config names {len(names)} classes"
        )
    if not scores:
        return None
    best = int(np.argmax(np.asarray(scores)))
    return {"name": names[best], "score": float(scores[best])}
