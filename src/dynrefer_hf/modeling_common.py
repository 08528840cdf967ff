"""What every part of the DynRefer model shares: what `forward` and `generate` return, the dtype rule of their
scores, and PyTorch's default initialisation of the parts upstream builds as plain layers."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
)
from transformers.utils import ModelOutput

__all__ = ["DynReferGenerationOutput", "DynReferOutput", "at_least_float32", "torch_default_init"]


@dataclass
class DynReferOutput(ModelOutput):
    """Output of [`DynReferForRegionCaptioning.forward`].

    Every loss part is already weighted, and `loss` is their sum over the parts that got targets.

    Args:
        loss (`torch.FloatTensor` of shape `()`): the sum of the loss parts below that were computed.
        loss_caption (`torch.FloatTensor` of shape `()`): token-mean caption cross-entropy of the language model
            (from `labels`; docs/upstream/model.md §11). Formerly `loss_llm`.
        loss_tag (`torch.FloatTensor` of shape `()`): summed asymmetric tag loss times `tag_loss_weight` (from
            `tag_labels`; §7).
        loss_region_text (`torch.FloatTensor` of shape `()`): sigmoid region-caption contrastive loss times
            `attr_loss_weight` (from `caption_embeds`; §8). Formerly `loss_att`.
        loss_attribute (`torch.FloatTensor` of shape `()`): attribute-label loss times
            `attribute_label_loss_weight` (from `attribute_labels`; not upstream, see `attribute_label_loss`).
        loss_class (`torch.FloatTensor` of shape `()`): class cross-entropy times `class_label_loss_weight` (from
            `class_labels`; not upstream).
        logits (`torch.FloatTensor` of shape `(R, L, vocab)`): language-model logits (with `labels` or
            `decoder_input_ids`).
        tag_logits (`torch.FloatTensor` of shape `(R, num_tags)`): tag logits (bf16-rounded when
            `config.quantize_head_outputs`).
        contrastive_logits (`torch.FloatTensor` of shape `(R, N)`): `s * exp(attr_t) + attr_b` of every local
            region against the captions of all ranks (N = regions of all ranks; only with `caption_embeds`).
        region_queries (`torch.FloatTensor` of shape `(R, num_query_tokens, qformer hidden)`): Q-Former output.
        vision_outputs (`BaseModelOutputWithPooling`): the vision tower's outputs over the `R * V` views (row
            `r * V + v`), with hidden states / attentions when asked.
        qformer_outputs (`BaseModelOutputWithPoolingAndCrossAttentions`): the Q-Former's outputs.
        language_model_outputs (`Seq2SeqLMOutput` or `CausalLMOutputWithPast`): the language model's outputs
            (when it ran: with `labels` or `decoder_input_ids`).
    """

    loss: torch.FloatTensor | None = None
    loss_caption: torch.FloatTensor | None = None
    loss_tag: torch.FloatTensor | None = None
    loss_region_text: torch.FloatTensor | None = None
    loss_attribute: torch.FloatTensor | None = None
    loss_class: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    tag_logits: torch.FloatTensor | None = None
    contrastive_logits: torch.FloatTensor | None = None
    region_queries: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    language_model_outputs: ModelOutput | None = None

    def to_tuple(self) -> tuple:
        nested = ("vision_outputs", "qformer_outputs", "language_model_outputs")
        return tuple(self[key].to_tuple() if key in nested else self[key] for key in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str) and key in _RENAMED_OUTPUTS:
            key = _renamed_output(key)
        return super().__getitem__(key)

    @property
    def loss_llm(self) -> torch.FloatTensor | None:
        """Deprecated name of `loss_caption`."""
        return getattr(self, _renamed_output("loss_llm"))

    @property
    def loss_att(self) -> torch.FloatTensor | None:
        """Deprecated name of `loss_region_text` (the region-caption contrastive loss)."""
        return getattr(self, _renamed_output("loss_att"))


# old DynReferOutput field names, kept readable (with a FutureWarning) by attribute and by key
_RENAMED_OUTPUTS = {"loss_llm": "loss_caption", "loss_att": "loss_region_text"}


def _renamed_output(old: str) -> str:
    new = _RENAMED_OUTPUTS[old]
    warnings.warn(f"DynReferOutput.{old} is deprecated: use {new}", FutureWarning, stacklevel=3)
    return new



@dataclass
class DynReferGenerationOutput(ModelOutput):
    """Output of [`DynReferForRegionCaptioning.generate`] (and, without the caption fields, of `label_regions`):
    everything a region record is made of, as tensors (`DynReferProcessor.post_process_generation` turns it
    into records).

    Args:
        sequences (`torch.LongTensor` of shape `(R, N)`): generated caption ids (pad after the first EOS).
        sequences_scores (`torch.FloatTensor` of shape `(R,)`): log-probability of each caption: beam search's
            score, or for greedy search and sampling the summed log-probabilities of its tokens up to EOS.
        input_ids, attention_mask (`torch.LongTensor` of shape `(R, T)`): the control prompts the captions were
            generated from (the user's words, then the predicted tags).
        tag_logits (`torch.FloatTensor` of shape `(R, num_tags)`), tag_mask (`torch.BoolTensor`),
        attribute_scores (`(R, num_attributes)`), class_scores (`(R, num_classes)`): `predict_labels`.
        language_model_outputs (`GenerateOutput`): the language model's own `generate` output (per-step scores,
            beam indices, ...).
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    input_ids: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None
    tag_logits: torch.FloatTensor | None = None
    tag_mask: torch.BoolTensor | None = None
    attribute_scores: torch.FloatTensor | None = None
    class_scores: torch.FloatTensor | None = None
    language_model_outputs: ModelOutput | None = None


def at_least_float32(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` in float32, or in float64 when it (or ``like``, the model's activations it was computed
    from, e.g. before bf16 rounding) is float64: half-precision results widen, a float64 model keeps float64."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    if like is not None:
        dtype = torch.promote_types(dtype, like.dtype)
    return tensor.to(dtype)



def torch_default_init(module: nn.Linear | nn.Conv2d) -> None:
    """`reset_parameters()` of nn.Linear / nn.Conv2d, through the HF init functions (they skip loaded weights)."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(module.bias, -bound, bound)
