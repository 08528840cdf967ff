"""The Q-Former bridge (docs/upstream/model.md §6): learned query tokens read the fused visual tokens of a region
through the BLIP-2 Q-Former and become its region queries, the one input of the label heads and (projected)
of the language model.

`DynReferQFormerBridgeMixin` holds the parameters on the model itself (`query_tokens`, `qformer`: the
checkpoint's key names).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
)
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

from .configuration_dynrefer import DynReferConfig

__all__ = ["DynReferQFormerBridgeMixin"]


class DynReferQFormerBridgeMixin:
    """Fused visual tokens -> region queries, for `DynReferForRegionCaptioning`."""

    def _build_qformer_bridge(self, config: DynReferConfig) -> None:
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)

    def _init_qformer_bridge(self) -> None:
        init.normal_(self.query_tokens, mean=0.0, std=self.config.qformer_config.initializer_range)

    def get_region_queries(self, pixel_values: torch.Tensor, view_boxes: torch.Tensor) -> torch.Tensor:
        """Views -> region queries `Q` `[R, num_query_tokens, qformer hidden]` (docs/upstream/model.md §2-§6)."""
        self._check_views(pixel_values, view_boxes)
        return self._encode_regions(pixel_values, view_boxes)[1].last_hidden_state

    def _encode_regions(
        self,
        pixel_values: torch.Tensor,
        view_boxes: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions]:
        """The vision tower's outputs over the `R * V` views and the Q-Former's (region queries first)."""
        vision_outputs, visual_embeds = self.encode_views(
            pixel_values, view_boxes, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        query_tokens = self.query_tokens.expand(pixel_values.shape[0], -1, -1)
        # the encoder mask is all ones upstream, i.e. no mask
        qformer_outputs = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=visual_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return vision_outputs, qformer_outputs
