"""The vocabularies (docs/upstream/model.md §10, §12): the text-embedding tables the label heads score against
(`clip_embeds` for tags, `att_embeds` for attribute prompts, `ov_embeds` for classes), the optional CLIP text
tower that re-encodes them, and the control prompt written in token ids from the predicted tags
(`config.control_prompt_tokens`, built from the tokenizer by `DynReferProcessor.tokenize_tag_vocabulary`).

`DynReferVocabulariesMixin` holds the tables and the text tower on the model itself (`clip_embeds`,
`att_embeds`, `ov_embeds`, `text_encoder`: the checkpoint's key names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import CLIPTextModelWithProjection
from transformers import initialization as init

from .configuration_dynrefer import DynReferConfig
from .prompts import ControlPromptTokens

__all__ = ["DynReferVocabulariesMixin"]


class DynReferVocabulariesMixin:
    """Label vocabularies and control prompts of `DynReferForRegionCaptioning`."""

    def _build_vocabularies(self, config: DynReferConfig) -> None:
        self.text_encoder = (
            CLIPTextModelWithProjection._from_config(config.text_encoder_config)
            if config.text_encoder_config is not None
            else None
        )
        self.register_buffer("clip_embeds", torch.zeros(config.num_tags, config.text_embed_dim))
        self.register_buffer("att_embeds", torch.zeros(config.num_attribute_prompts, config.text_embed_dim))
        self.register_buffer("ov_embeds", torch.zeros(config.num_classes, config.text_embed_dim))

    def _init_vocabularies(self) -> None:
        # zero placeholders (deterministic) until a checkpoint or `set_vocabulary` fills the tables
        for name in ("clip_embeds", "att_embeds", "ov_embeds"):
            init.zeros_(getattr(self, name))

    def control_prompts(
        self,
        tag_mask: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """The control prompt of every region in token ids (docs/upstream/model.md §12): the user's words
        (`input_ids`, the processor's tokenised `"w1,w2|"`; `None`: none), then the predicted tags of
        `tag_mask` `[R, num_tags]` in tag-list order, each word once, padded to the longest (right).

        Equal to tokenising the text prompt `DynReferProcessor.build_control_prompts` writes (tested), without
        the tokenizer: the tag pieces are `config.control_prompt_tokens`."""
        if self.config.control_prompt_tokens is None:
            raise ValueError(
                "this model has no tokenised tag vocabulary (config.control_prompt_tokens), so it cannot put its "
                "predicted tags into the control prompt: set it with `model.config.control_prompt_tokens = "
                "processor.tokenize_tag_vocabulary(model.config.tag_names)`, or pass add_predicted_tags=False"
            )
        table = ControlPromptTokens.from_dict(self.config.control_prompt_tokens)
        rows = []
        for region, tags in enumerate(tag_mask.cpu()):
            user = None
            if input_ids is not None:
                user = input_ids[region]
                if attention_mask is not None:
                    user = user[attention_mask[region].bool()]
                user = user.tolist()
            rows.append(table.prompt_ids(user, tags.nonzero().flatten().tolist()))
        width = max(len(row) for row in rows)
        device = tag_mask.device
        ids = torch.full((len(rows), width), table.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for region, row in enumerate(rows):
            ids[region, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[region, : len(row)] = 1
        return ids, mask

    def encode_texts(self, texts: Sequence[str], tokenizer, batch_size: int = 64) -> torch.Tensor:
        """Text-encoder embeddings `[M, text_embed_dim]` (EOT token, projected, not normalised; docs/upstream/model.md §10).

        `tokenizer` is the text encoder's CLIP tokenizer; texts are truncated to its max length (77) and each
        batch is padded to its longest text: upstream pads to 77, which gives the same vectors at several times
        the cost.
        """
        if self.text_encoder is None:
            raise ValueError(
                "encoding texts needs a text encoder: build the model with config.text_encoder_config "
                "(a CLIPTextConfig) and load its weights, or attach one with `attach_text_encoder`"
            )
        if tokenizer is None:
            raise ValueError("encoding texts needs the text encoder's tokenizer (a CLIP tokenizer)")
        texts = list(texts)
        if not texts or not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a non-empty list of strings")
        device = self.text_encoder.device
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                ids = tokenizer(
                    texts[start : start + batch_size],
                    padding="longest",
                    max_length=self.config.text_encoder_config.max_position_embeddings,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(device)
                # causal attention only, as upstream: padding after EOT cannot reach the EOT token, so its length is free
                chunks.append(self.text_encoder(input_ids=ids).text_embeds.float())
        return torch.cat(chunks)

    def attach_text_encoder(self, text_encoder: CLIPTextModelWithProjection) -> None:
        """Attach a (frozen) CLIP text tower used by `encode_texts` and `set_vocabulary`."""
        if text_encoder.config.projection_dim != self.config.text_embed_dim:
            raise ValueError(
                f"the text encoder projects to {text_encoder.config.projection_dim}, "
                f"but config.text_embed_dim is {self.config.text_embed_dim}"
            )
        self.text_encoder = text_encoder.requires_grad_(False)
        self.config.text_encoder_config = text_encoder.config

    def set_vocabulary(
        self,
        tags: Sequence[str] | None = None,
        attributes: Mapping[str, Sequence[str]] | None = None,
        classes: Sequence[str] | Mapping[str, str] | None = None,
        tokenizer=None,
        batch_size: int = 64,
    ) -> None:
        """Replace tag, attribute and/or class vocabularies and recompute their embedding tables.

        Args:
            tags: tag strings (each encoded as is, like RAM's tags).
            attributes: attribute name -> its prompts; an attribute's score is the max over its prompts.
            classes: class names (encoded as upstream's prompt "the {name lowercased}") or name -> prompt.
            tokenizer: the text encoder's CLIP tokenizer.
        Raises:
            ValueError: without an attached text encoder or tokenizer, or with an empty vocabulary.
        """
        if tags is None and attributes is None and classes is None:
            raise ValueError("set_vocabulary needs tags, attributes or classes")
        if self.text_encoder is None:
            raise ValueError(
                "set_vocabulary needs a text encoder to embed the new strings: build the model with "
                "config.text_encoder_config or call attach_text_encoder(CLIPTextModelWithProjection)"
            )
        if tokenizer is None:
            raise ValueError("set_vocabulary needs the text encoder's tokenizer")
        updates = {}
        if tags is not None:
            tags = [str(tag) for tag in tags]
            updates["clip_embeds"] = self.encode_texts(tags, tokenizer, batch_size)
        if attributes is not None:
            if not isinstance(attributes, Mapping) or not attributes or not all(attributes.values()):
                raise ValueError("attributes must map every attribute name to a non-empty list of prompts")
            prompts = [prompt for group in attributes.values() for prompt in group]
            updates["att_embeds"] = self.encode_texts(prompts, tokenizer, batch_size)
        if classes is not None:
            if isinstance(classes, Mapping):
                class_names, class_prompts = list(classes), list(classes.values())
            else:
                class_names = list(classes)
                class_prompts = [f"the {name.lower()}" for name in class_names]
            updates["ov_embeds"] = self.encode_texts(class_prompts, tokenizer, batch_size)

        device = self.clip_embeds.device
        for name, table in updates.items():
            setattr(self, name, table.to(device=device, dtype=getattr(self, name).dtype))
        if tags is not None:
            self.config.tag_names = tags
            # the tag pieces of the control prompt belong to the old tags: rebuild them from the tokenizer
            # (the pipeline does so when it loads the model)
            self.config.control_prompt_tokens = None
        if attributes is not None:
            self.config.attribute_names = list(attributes)
            self.config.attribute_group_sizes = [len(group) for group in attributes.values()]
            self.config.attribute_prompts = prompts
        if classes is not None:
            self.config.class_names = class_names
            self.config.class_prompts = class_prompts
