"""The language-model bridge (docs/upstream/model.md §11): where the language model plugs in.

The region queries are projected into the language model's embedding space (`language_projection`, upstream's
`t5_proj`) and followed by the control prompt's token embeddings plus `cem_memory`; that prefix is the
encoder input of a seq2seq model (Flan-T5, upstream) or the start of a causal model's sequence. Any
`AutoModelForSeq2SeqLM` or `AutoModelForCausalLM` of transformers plugs in through `config.text_config`; a family
that needs an adjustment after it is built registers it in `LANGUAGE_MODEL_ADJUSTMENTS` (docs/contributing.md,
"Add a language model"). Nothing outside this module knows which family the language model is.

`DynReferLanguageBridgeMixin` holds the parameters on the model itself (`language_model`,
`language_projection`, `cem_memory`: the checkpoint's key names).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dynrefer import DynReferConfig
from .modeling_common import at_least_float32, torch_default_init

__all__ = ["LANGUAGE_MODEL_ADJUSTMENTS", "DynReferLanguageBridgeMixin"]


def _untie_t5_lm_head(language_model: PreTrainedModel) -> None:
    """T5 v1.1 / Flan-T5 have an lm_head of their own (docs/upstream/model.md §11), but transformers 5 ties every
    T5 lm_head to the shared embedding; keep only the input-embedding ties."""
    if getattr(language_model.config, "scale_decoder_outputs", True) is not False:
        return  # the original T5, whose lm_head is the shared embedding
    language_model._tied_weights_keys = {
        target: source
        for target, source in language_model._tied_weights_keys.items()
        if not target.startswith("lm_head")
    }
    language_model.all_tied_weights_keys = language_model.get_expanded_tied_weights_keys(all_submodels=False)
    lm_head = language_model.get_output_embeddings()
    lm_head.weight = nn.Parameter(lm_head.weight.detach().clone())


# model_type of `config.text_config` -> what to do to the freshly built language model before weights load.
LANGUAGE_MODEL_ADJUSTMENTS: dict[str, Callable[[PreTrainedModel], None]] = {"t5": _untie_t5_lm_head}


def _pad_after_eos(sequences: torch.Tensor, generation_config, is_encoder_decoder: bool) -> None:
    """Put the pad id after the first EOS of every generated sequence, in place, as upstream's transformers did.

    transformers 5's beam search fills finished beams with ``pad_token_id or eos_token_id``, which takes
    T5's pad id 0 for missing and pads with EOS; greedy search already pads with the pad id.
    """
    pad, eos = generation_config.pad_token_id, generation_config.eos_token_id
    if pad is None or eos is None or sequences.numel() == 0:
        return
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=sequences.device)
    start = 1 if is_encoder_decoder else 0  # the decoder start token is not generated
    is_eos = torch.isin(sequences[:, start:], eos)
    after_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    sequences[:, start:].masked_fill_(after_first_eos, pad)


class DynReferLanguageBridgeMixin:
    """Region queries + control prompt -> the language model, for `DynReferForRegionCaptioning`."""

    def _build_language_bridge(self, config: DynReferConfig) -> None:
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        adjust = LANGUAGE_MODEL_ADJUSTMENTS.get(config.text_config.model_type)
        if adjust is not None:
            adjust(self.language_model)
        lm_width = self.language_model.get_input_embeddings().embedding_dim
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, lm_width)
        self.cem_memory = nn.Parameter(torch.zeros(lm_width))

    def _init_language_bridge(self) -> None:
        torch_default_init(self.language_projection)  # upstream's t5_proj is a plain nn.Linear
        init.zeros_(self.cem_memory)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def _language_model_inputs(
        self,
        region_queries: torch.Tensor,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[t5_proj(Q) | embed(control) + cem_memory]` and its mask (docs/upstream/model.md §11)."""
        device = region_queries.device
        embed_tokens = self.get_input_embeddings()
        with self._autocast(device, torch.bfloat16):
            visual = self.language_projection(region_queries.to(self.language_projection.weight.dtype))
        visual_mask = torch.ones(visual.shape[:2], dtype=torch.long, device=device)
        if input_ids is None:
            embeds, mask = visual, visual_mask
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            control = embed_tokens(input_ids) + self.cem_memory  # cem_memory is added to every control token
            embeds = torch.cat([visual.to(control.dtype), control], dim=1)
            mask = torch.cat([visual_mask, attention_mask.to(visual_mask.dtype)], dim=1)
        if self._uses_autocast(device):
            embeds = embeds.float()  # upstream feeds fp32 inputs_embeds to the bf16 LM under autocast
        else:
            embeds = embeds.to(embed_tokens.weight.dtype)
        return embeds, mask

    @staticmethod
    def _pack(mask: torch.Tensor, *tensors: torch.Tensor, left: bool) -> list[torch.Tensor]:
        """Move padding to one side of every row (stable), for the causal LM prefix."""
        key = mask if left else 1 - mask
        order = torch.sort(key.to(torch.int8), dim=1, stable=True).indices
        packed = [mask.gather(1, order)]
        for tensor in tensors:
            index = order.view(*order.shape, *([1] * (tensor.dim() - 2))).expand_as(tensor)
            packed.append(tensor.gather(1, index))
        return packed

    def _run_language_model(
        self, embeds, mask, labels, decoder_input_ids, decoder_attention_mask, **output_flags
    ) -> ModelOutput:
        """The language model on the prefix `embeds`: teacher-forced on `labels` (-100 = ignored) or on
        `decoder_input_ids` (seq2seq only); returns its output (`loss` with `labels`)."""
        if not self.config.use_decoder_only_language_model:
            return self.language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                labels=labels,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                return_dict=True,
                **output_flags,
            )
        pad_id = self.config.text_config.pad_token_id
        pad_id = 0 if pad_id is None else pad_id
        caption_mask = (labels != -100) if decoder_attention_mask is None else decoder_attention_mask.bool()
        caption_ids = labels.masked_fill(labels == -100, pad_id)
        caption_embeds = self.get_input_embeddings()(caption_ids).to(embeds.dtype)
        prefix_labels = torch.full(mask.shape, -100, dtype=labels.dtype, device=labels.device)
        full_mask = torch.cat([mask, caption_mask.to(mask.dtype)], dim=1)
        full_labels = torch.cat([prefix_labels, labels.masked_fill(~caption_mask, -100)], dim=1)
        full_mask, full_embeds, full_labels = self._pack(
            full_mask, torch.cat([embeds, caption_embeds], dim=1), full_labels, left=False
        )
        return self.language_model(
            inputs_embeds=full_embeds, attention_mask=full_mask, labels=full_labels, return_dict=True, **output_flags
        )

    def generate_captions(
        self,
        region_queries: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        **generate_kwargs,
    ) -> tuple[torch.LongTensor, torch.FloatTensor, ModelOutput]:
        """The language model's `generate` on the prefix of `region_queries` and the control prompts
        `input_ids`: returns the caption ids (pad after the first EOS), their log-probabilities
        (`caption_log_probs`) and the language model's own output. Defaults: `self.generation_config`."""
        embeds, mask = self._language_model_inputs(region_queries, input_ids, attention_mask)
        if self.config.use_decoder_only_language_model:
            mask, embeds = self._pack(mask, embeds, left=True)
        generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        model_kwargs = generation_config.update(**generate_kwargs)  # returns the non-generation arguments
        generation_config.output_scores = generation_config.return_dict_in_generate = True  # for the scores
        with self._autocast(embeds.device, torch.bfloat16):
            outputs = self.language_model.generate(
                inputs_embeds=embeds, attention_mask=mask, generation_config=generation_config, **model_kwargs
            )
        _pad_after_eos(outputs.sequences, generation_config, self.config.is_encoder_decoder)
        return outputs.sequences, self.caption_log_probs(outputs, generation_config), outputs

    def caption_log_probs(self, outputs, generation_config=None) -> torch.Tensor:
        """Log-probability `[R]` of each generated caption: beam search's `sequences_scores`; for greedy or
        sampling, the summed log-probabilities of the tokens up to the first EOS. `outputs` is the language
        model's `generate` output with `return_dict_in_generate=True, output_scores=True`."""
        if getattr(outputs, "sequences_scores", None) is not None:
            return at_least_float32(outputs.sequences_scores)
        steps = len(outputs.scores)
        generated = outputs.sequences[:, -steps:]
        log_probs = torch.stack([F.log_softmax(at_least_float32(step), dim=-1) for step in outputs.scores], dim=1)
        token_log_probs = log_probs.gather(2, generated.unsqueeze(-1)).squeeze(-1)
        eos = (generation_config or self.generation_config).eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=generated.device)
        is_eos = torch.isin(generated, eos)
        # tokens after the first EOS are padding
        finished_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        return token_log_probs.masked_fill(finished_before, 0.0).sum(dim=1)
