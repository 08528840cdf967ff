"""DynReferProcessor: the image processor (nested views) plus the tokenizer: text in (control prompts, caption
labels) and text out (decoding and post-processing generated captions into region records)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

from .prompts import format_control_prompt, merge_control_words, parse_control_words

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

    @classmethod
    def for_tokenizer(cls, tokenizer, max_text_length: int = 32) -> DynReferProcessor:
        """A processor for the text side only (prompts, decoding): ``tokenizer`` with a default image processor."""
        from .image_processing_dynrefer import DynReferImageProcessor

        return cls(DynReferImageProcessor(), tokenizer, max_text_length=max_text_length)

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

    @staticmethod
    def tags_from_mask(tag_mask: torch.Tensor, tag_names: Sequence[str]) -> list[list[str]]:
        """The names of the predicted tags of every region, in tag-list order, from a `[R, num_tags]` mask
        (`DynReferForRegionCaptioning.predict_labels`)."""
        if tag_mask.dim() != 2 or tag_mask.shape[1] != len(tag_names):
            raise ValueError(f"tag_mask must be [R, {len(tag_names)}], got {list(tag_mask.shape)}")
        return [[tag_names[i] for i in row.nonzero().flatten().tolist()] for row in tag_mask.cpu()]

    def post_process_generation(
        self,
        sequences: torch.Tensor,
        sequence_scores: torch.Tensor,
        tags: Sequence[Sequence[str]],
        attribute_scores: torch.Tensor,
        class_scores: torch.Tensor,
    ) -> list[dict]:
        """Region records from the model's tensors (docs/upstream/model.md §16).

        Args:
            sequences: `[R, N]` generated ids; sequence_scores: `[R]` their log-probabilities
                (`model.sequence_scores`); tags: the predicted tag names per region (`tags_from_mask`);
                attribute_scores `[R, num_attributes]`, class_scores `[R, num_classes]` (`model.predict_labels`).

        Returns:
            `[{"caption": str, "score": float (exp of the sequence score), "tags": [str],
            "attribute_scores": [float] * num_attributes, "class_scores": [float] * num_classes}, ...]`.
        """
        captions = self.batch_decode(sequences)
        counts = {len(captions), len(sequence_scores), len(tags), len(attribute_scores), len(class_scores)}
        if len(counts) != 1:
            raise ValueError(f"post_process_generation got different numbers of regions: {sorted(counts)}")
        scores = sequence_scores.float().exp().tolist()
        return [
            {
                "caption": caption,
                "score": score,
                "tags": list(region_tags),
                "attribute_scores": attributes,
                "class_scores": classes,
            }
            for caption, score, region_tags, attributes, classes in zip(
                captions, scores, tags, attribute_scores.tolist(), class_scores.tolist()
            )
        ]

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode generated token ids to captions (special tokens skipped by default, as upstream)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        """Decode one sequence of token ids (special tokens skipped by default)."""
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "view_boxes", "input_ids", "attention_mask"]
