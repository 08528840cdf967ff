"""DynRefer region captioning as a native Transformers model (docs/upstream/model.md §1-§16).

R regions, each seen through V nested views, go through a BLIP-2 vision tower; the patch tokens of every
view are RoI-aligned to the target box, views 1..V-1 are aligned to view 0 by a DCNv4-style module, the
views are fused by an MLP, a Q-Former turns the fused tokens into region queries, and those feed the
language model (with a control prompt) and three label heads (tags, attributes, open-vocabulary classes).

This module is the Transformers plumbing (config, loading, `forward`, `generate`); each part of the model
lives in a module of its own, a mixin holding its parameters under the checkpoint's key names
(docs/architecture.md, "The model's rooms"):

* `modeling_view_encoder`: ViT, RoI-Align, cross-view alignment, fusion;
* `modeling_qformer_bridge`: query tokens and Q-Former -> region queries;
* `modeling_label_heads`: tag / attribute / class heads and their losses;
* `modeling_language_bridge`: the language model and how the region queries and control prompt reach it;
* `modeling_vocabularies`: the label embedding tables, the text tower, control prompts in token ids;
* `modeling_common`: the outputs and the helpers every part shares.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from transformers import GenerationMixin, PreTrainedModel

from . import precision
from .configuration_dynrefer import DynReferConfig
from .modeling_common import DynReferGenerationOutput, DynReferOutput, at_least_float32
from .modeling_label_heads import (
    ATTRIBUTE_LABEL_LOSSES,
    DynReferLabelHead,
    DynReferLabelHeadsMixin,
    asymmetric_loss,
    attribute_groups,
    attribute_label_loss,
    class_label_loss,
    sigmoid_contrastive_loss,
)
from .modeling_language_bridge import DynReferLanguageBridgeMixin
from .modeling_qformer_bridge import DynReferQFormerBridgeMixin
from .modeling_view_encoder import DynReferRegionAlign, DynReferViewEncoderMixin
from .modeling_vocabularies import DynReferVocabulariesMixin
from .validation import check_model_folder, check_weight_shapes

__all__ = [
    "ATTRIBUTE_LABEL_LOSSES",
    "DynReferForRegionCaptioning",
    "DynReferGenerationOutput",
    "DynReferLabelHead",
    "DynReferOutput",
    "DynReferPreTrainedModel",
    "DynReferRegionAlign",
    "asymmetric_loss",
    "attribute_groups",
    "attribute_label_loss",
    "class_label_loss",
    "sigmoid_contrastive_loss",
]

# Keys of the processor's output that are bookkeeping for post-processing (where each region's views came from),
# not model inputs: `generate(**processor(...))` takes and ignores them.
PROCESSOR_BOOKKEEPING_KEYS = ("view_ratios", "crop_boxes", "region_image_index", "region_boxes")


class DynReferPreTrainedModel(PreTrainedModel):
    config_class = DynReferConfig
    config: DynReferConfig
    base_model_prefix = "dynrefer"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_flash_attn = False  # the BLIP-2 Q-Former does not support it
    _no_split_modules = [  # noqa: RUF012 (HF class attribute)
        "Blip2EncoderLayer",
        "Blip2QFormerLayer",
        "Blip2VisionEmbeddings",
        "DynReferRegionAlign",
        "DynReferLabelHeadLayer",
    ]

    @classmethod
    def is_custom_code(cls) -> bool:
        """Initialise like a model inside transformers. Outside it, transformers assumes `_init_weights` may
        overwrite loaded weights and skips every module without parameters of its own; that also skipped the
        sub-models' own initialisation of such modules (the language model's attention and feed-forward blocks),
        leaving language model weights missing from a checkpoint at random N(0, 1) values. Here every init goes
        through `transformers.initialization`, which leaves loaded tensors alone, so the sub-models (dispatched
        to their own `_init_weights` by `initialize_weights`) initialise exactly their missing weights."""
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        # Everything DynRefer-specific is set from the root, each part by its own module.
        if isinstance(module, DynReferForRegionCaptioning):
            # in this order: it fixes the random initialisation of a seeded model
            module._init_view_alignment()
            module._init_qformer_bridge()
            module._init_language_bridge()
            module._init_view_fusion()
            module._init_label_heads()
            module._init_vocabularies()


class DynReferForRegionCaptioning(
    DynReferViewEncoderMixin,
    DynReferQFormerBridgeMixin,
    DynReferLanguageBridgeMixin,
    DynReferLabelHeadsMixin,
    DynReferVocabulariesMixin,
    DynReferPreTrainedModel,
    GenerationMixin,
):
    """DynRefer: region captions, tags, attribute scores and open-vocabulary class scores (model.md).

    Inputs are the processor's nested views: `pixel_values [R, V, 3, S, S]` and the target box inside every
    view, `view_boxes [R, V, 4]` (x1, y1, x2, y2 in view pixels); `generate(**processor(images=..., boxes=...))`
    captions them.
    """

    def __init__(self, config: DynReferConfig):
        super().__init__(config)
        # in this order: it fixes the random initialisation of a seeded model (modules are initialised in order)
        self._build_vision_tower(config)
        self._build_qformer_bridge(config)
        self._build_language_bridge(config)
        self._build_view_fusion(config)
        self._build_label_heads(config)
        self._build_vocabularies(config)
        self.post_init()
        self.generation_config = config.released_generation_config()
        self.set_trainable(config.trainable_modules)

    # ------------------------------------------------------------------ HF plumbing

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, with one-sentence errors for a local folder that is broken
        (`validation.check_model_folder`) or whose weights do not fit its config, and `model.missing_weights`
        listing the weights the checkpoint lacked. With `dtype="auto"` a local folder loads every part in the
        dtype its safetensors hold (`precision.loading_as_stored`), and the config records each sub-model's dtype."""
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            check_model_folder(source)
            if kwargs.get("config") is None and not kwargs.get("ignore_mismatched_sizes"):
                with torch.device("meta"):
                    expected = cls(cls.config_class.from_pretrained(source))
                check_weight_shapes(source, {name: tuple(t.shape) for name, t in expected.state_dict().items()})
        output_loading_info = kwargs.pop("output_loading_info", False)
        # `pipeline(...)` loading with its default dtype="auto": the pipeline then sets the machine's precision
        for_pipeline = kwargs.get("_from_pipeline") is not None and kwargs.get("dtype") == "auto"
        as_stored = kwargs.get("dtype") == "auto" and isinstance(source, (str, os.PathLike)) and os.path.isdir(source)
        # dtype="auto" from a folder: every part in the dtype it was saved in (Flan-T5 bf16 next to a float32 ViT)
        with precision.loading_as_stored(source) if as_stored else contextlib.nullcontext() as main_dtype:
            if main_dtype is not None:
                kwargs["dtype"] = main_dtype
            model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        precision.record_dtypes(model)
        model.machine_precision_pending = for_pipeline
        model.set_trainable()  # loading swaps in new Parameters, which resets requires_grad
        # Weights the checkpoint lacked (randomly initialised): the pipeline refuses such a model unless told.
        model.missing_weights = sorted(loading_info["missing_keys"])
        return (model, loading_info) if output_loading_info else model

    def _get_dtype_plan(self, dtype: torch.dtype) -> dict:
        return {**super()._get_dtype_plan(dtype), **precision.load_dtype_plan()}

    def set_trainable(self, modules: Sequence[str] | None = None) -> None:
        """Freeze everything except the named top-level modules/parameters (docs/upstream/model.md §14).

        `modules=None` uses `config.trainable_modules` (default: Q-Former, projection, alignment, fusion MLP,
        `cem_memory` and the tag/attribute heads; the ViT, `query_tokens`, the LM and the text encoder stay
        frozen). The choice is stored in the config, so it survives `save_pretrained`.
        """
        modules = list(self.config.trainable_modules if modules is None else modules)
        known = {name for name, _ in self.named_children()} | {
            name for name, _ in self.named_parameters(recurse=False)
        }
        unknown = sorted(set(modules) - known)
        if unknown:
            raise ValueError(f"unknown trainable modules {unknown}; choose from {sorted(known)}")
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.split(".", 1)[0] in modules)
        self.config.trainable_modules = modules

    def to_upstream_precision(self) -> DynReferForRegionCaptioning:
        """Cast the language model to bfloat16 as upstream does (docs/upstream/model.md §11, §15); other weights stay fp32.

        With `config.upstream_precision` on a CUDA device this reproduces upstream's numerics: ViT under fp16
        autocast with fp32 weights, heads under bf16 autocast, the LM with bf16 weights and fp32 inputs.
        """
        self.language_model.to(torch.bfloat16)
        wrong = [name for name, p in self.language_model.named_parameters() if p.dtype != torch.bfloat16]
        if wrong:
            raise RuntimeError(f"language-model parameters left out of bfloat16: {wrong[:5]}")
        return self

    def _uses_autocast(self, device: torch.device) -> bool:
        """Upstream's `maybe_autocast` condition: on CUDA, and only with `config.upstream_precision`."""
        return self.config.upstream_precision and device.type == "cuda"

    def _autocast(self, device: torch.device, dtype: torch.dtype):
        if self._uses_autocast(device):
            return torch.autocast(device.type, dtype=dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_rows(name: str, tensor: torch.Tensor | None, regions: int, width: int | None = None) -> None:
        if tensor is None:
            return
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] != regions:
            shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"{name} must be [R={regions}, {width if width is not None else 'T'}], got {shape}"
            )
        if width is not None and tensor.shape[1] != width:
            raise ValueError(f"{name} must have {width} columns, got {tensor.shape[1]}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN/inf")

    # ------------------------------------------------------------------ forward / generate

    def forward(
        self,
        pixel_values: torch.Tensor,
        view_boxes: torch.Tensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        tag_labels: torch.Tensor | None = None,
        attribute_labels: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        caption_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DynReferOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(R, V, 3, S, S)`): nested views of every region.
            view_boxes (`torch.FloatTensor` of shape `(R, V, 4)`): target box inside each view, view pixels.
            input_ids, attention_mask (`torch.LongTensor` of shape `(R, T)`): tokenised control prompts.
            decoder_input_ids (`torch.LongTensor` of shape `(R, L)`): decoder inputs of a seq2seq language model
                (default: `labels` shifted right, as seq2seq models do) -> `logits`.
            decoder_attention_mask (`torch.LongTensor` of shape `(R, L)`): caption mask (upstream passes it).
            labels (`torch.LongTensor` of shape `(R, L)`): caption tokens, padding = -100 -> `loss_caption`.
            tag_labels (`torch.Tensor` of shape `(R, num_tags)`): multi-hot tag targets (upstream: the union of
                tag_set1 and tag_set2) -> `loss_tag`.
            attribute_labels (`torch.LongTensor` of shape `(R, num_attributes)`): 1 / 0 / -1 (ignored) ->
                `loss_attribute` (`config.attribute_label_loss`, weight `config.attribute_label_loss_weight`).
            class_labels (`torch.LongTensor` of shape `(R,)`): class index, -1 = none -> `loss_class` (weight
                `config.class_label_loss_weight`).
            caption_embeds (`torch.FloatTensor` of shape `(R, text_embed_dim)`): text-encoder embeddings of the
                region captions -> `loss_region_text` (all-gathered across ranks under torch.distributed).
            output_attentions, output_hidden_states (`bool`): return the attentions / hidden states of the
                vision tower, the Q-Former and (when it runs) the language model in the nested outputs.

        A loss part whose weight is 0 is not computed. Every loss is computed inside `forward`, so a plain
        `transformers.Trainer` trains every head, also under DistributedDataParallel.
        """
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        self._check_views(pixel_values, view_boxes)
        regions = pixel_values.shape[0]
        self._check_rows("input_ids", input_ids, regions)
        if attention_mask is not None and (input_ids is None or attention_mask.shape != input_ids.shape):
            raise ValueError("attention_mask must come with input_ids and have its shape")
        self._check_rows("labels", labels, regions)
        self._check_rows("decoder_input_ids", decoder_input_ids, regions)
        if decoder_input_ids is not None and config.use_decoder_only_language_model:
            raise ValueError(
                "decoder_input_ids is for a seq2seq language model; this model's is decoder-only: give labels"
            )
        decoder_tokens = labels if decoder_input_ids is None else decoder_input_ids
        if decoder_attention_mask is not None and (
            decoder_tokens is None or decoder_attention_mask.shape != decoder_tokens.shape
        ):
            raise ValueError(
                "decoder_attention_mask must come with labels or decoder_input_ids and have their shape"
            )
        self._check_rows("tag_labels", tag_labels, regions, config.num_tags)
        self._check_rows("attribute_labels", attribute_labels, regions, config.num_attributes)
        if class_labels is not None and (
            not isinstance(class_labels, torch.Tensor) or tuple(class_labels.shape) != (regions,)
        ):
            shape = list(class_labels.shape) if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
            raise ValueError(f"class_labels must be [R={regions}] class indices (-1 = none), got {shape}")
        self._check_rows("caption_embeds", caption_embeds, regions, config.text_embed_dim)

        output_flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        vision_outputs, qformer_outputs = self._encode_regions(pixel_values, view_boxes, **output_flags)
        region_queries = qformer_outputs.last_hidden_state

        raw_tag_logits = self.tag_logits(region_queries)
        loss_tag = None
        if tag_labels is not None and config.tag_loss_weight != 0:
            loss_tag = config.tag_loss_weight * asymmetric_loss(
                raw_tag_logits, tag_labels, config.asl_gamma_neg, config.asl_gamma_pos, config.asl_clip, config.asl_eps
            )

        loss_region_text = contrastive_logits = None
        if caption_embeds is not None and config.attr_loss_weight != 0:
            loss_region_text, contrastive_logits = self._contrastive(region_queries, caption_embeds)

        loss_attribute = None
        if attribute_labels is not None and config.attribute_label_loss_weight != 0:
            loss_attribute = config.attribute_label_loss_weight * attribute_label_loss(
                self.attribute_label_logits(region_queries),
                attribute_labels,
                config.attribute_label_loss,
                config.attribute_names,
            )

        loss_class = None
        if class_labels is not None and config.class_label_loss_weight != 0:
            loss_class = config.class_label_loss_weight * class_label_loss(
                self.class_label_logits(region_queries), class_labels
            )

        loss_caption = logits = language_model_outputs = None
        if labels is not None or decoder_input_ids is not None:
            embeds, mask = self._language_model_inputs(region_queries, input_ids, attention_mask)
            with self._autocast(embeds.device, torch.bfloat16):
                language_model_outputs = self._run_language_model(
                    embeds, mask, labels, decoder_input_ids, decoder_attention_mask, **output_flags
                )
            loss_caption, logits = language_model_outputs.loss, language_model_outputs.logits

        parts = (loss_caption, loss_tag, loss_region_text, loss_attribute, loss_class)
        losses = [at_least_float32(loss, like=region_queries) for loss in parts if loss is not None]
        output = DynReferOutput(
            loss=torch.stack(losses).sum()
            if losses
            else None,
            loss_caption=loss_caption,
            loss_tag=loss_tag,
            loss_region_text=loss_region_text,
            loss_attribute=loss_attribute,
            loss_class=loss_class,
            logits=logits,
            tag_logits=at_least_float32(self._quantize(raw_tag_logits), like=region_queries),
            contrastive_logits=contrastive_logits,
            region_queries=region_queries,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
            language_model_outputs=language_model_outputs,
        )
        return output if return_dict else output.to_tuple()


    def _queries_of(self, pixel_values, view_boxes, region_queries, caller: str) -> torch.Tensor:
        """The region queries of the views, or the `region_queries` given instead of them."""
        if region_queries is None:
            if pixel_values is None or view_boxes is None:
                raise ValueError(f"{caller} needs pixel_values and view_boxes, or region_queries")
            return self.get_region_queries(pixel_values, view_boxes)
        if pixel_values is not None or view_boxes is not None:
            raise ValueError(f"give either pixel_values and view_boxes or region_queries to {caller}, not both")
        return region_queries

    @staticmethod
    def _drop_bookkeeping(inputs: dict, also: Sequence[str] = ()) -> None:
        """Remove the processor's bookkeeping keys (and the keys `also`) from `inputs`, in place."""
        for key in (*PROCESSOR_BOOKKEEPING_KEYS, *also):
            inputs.pop(key, None)

    @torch.no_grad()
    def label_regions(
        self,
        pixel_values: torch.Tensor | None = None,
        view_boxes: torch.Tensor | None = None,
        region_queries: torch.Tensor | None = None,
        tag_threshold: float | None = None,
        **processor_outputs,
    ) -> DynReferGenerationOutput:
        """Tags, attribute scores and class scores of the regions without running the language model (the
        heads-only mode; docs/pipeline.md). Takes what `generate` takes (`label_regions(**processor(...))`;
        control prompts and the processor's bookkeeping keys are ignored) and returns its output without the
        caption fields."""
        self._drop_bookkeeping(processor_outputs, also=("input_ids", "attention_mask"))
        if processor_outputs:
            raise TypeError(f"label_regions got unexpected arguments {sorted(processor_outputs)}")
        region_queries = self._queries_of(pixel_values, view_boxes, region_queries, "label_regions")
        tag_logits, tag_mask, attribute_scores, class_scores = self.predict_labels(region_queries, tag_threshold)
        return DynReferGenerationOutput(
            tag_logits=tag_logits, tag_mask=tag_mask, attribute_scores=attribute_scores, class_scores=class_scores
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        view_boxes: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        region_queries: torch.Tensor | None = None,
        add_predicted_tags: bool = True,
        tag_threshold: float | None = None,
        **generate_kwargs,
    ) -> DynReferGenerationOutput:
        """Describe the regions (docs/upstream/model.md §11-§12, §16): `generate(**processor(images=..., boxes=...))`.

        The label heads predict tags, attribute and class scores; the control prompt of every region is its
        user's words (`input_ids`: the processor's `controls`, tokenised) followed by its predicted tags, each
        word once, built on token ids (`control_prompts`); the language model captions each region from its
        region queries and that prompt. `DynReferProcessor.post_process_generation` /
        `post_process_region_captioning` turn the output into records.

        Args:
            pixel_values, view_boxes: the processor's views; or `region_queries` (from `get_region_queries`)
                instead of them.
            input_ids, attention_mask: tokenised control prompts; with `add_predicted_tags=False` they are the
                whole prompt (e.g. one written by `processor.encode_control_prompts`).
            add_predicted_tags: put the predicted tags into the control prompt (upstream inference, default).
            tag_threshold: overrides `config.tag_threshold`.
            generate_kwargs: generation parameters (default `self.generation_config`, the released values:
                num_beams 2, max_new_tokens 20, repetition_penalty 1.5, length_penalty 0). The processor's
                bookkeeping keys (`view_ratios`, `crop_boxes`, `region_image_index`, `region_boxes`) are accepted
                and ignored.

        Returns:
            [`DynReferGenerationOutput`]: caption ids and their log-probabilities, the control prompts used, the
            heads' outputs and the language model's own `generate` output.
        """
        self._drop_bookkeeping(generate_kwargs)
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("generate describes every region once: num_return_sequences must be 1")
        region_queries = self._queries_of(pixel_values, view_boxes, region_queries, "generate")
        self._check_rows("input_ids", input_ids, region_queries.shape[0])
        if attention_mask is not None and (input_ids is None or attention_mask.shape != input_ids.shape):
            raise ValueError("attention_mask must come with input_ids and have its shape")
        tag_logits, tag_mask, attribute_scores, class_scores = self.predict_labels(region_queries, tag_threshold)
        if add_predicted_tags:
            input_ids, attention_mask = self.control_prompts(tag_mask, input_ids, attention_mask)
        sequences, sequences_scores, language_model_outputs = self.generate_captions(
            region_queries, input_ids, attention_mask, **generate_kwargs
        )
        return DynReferGenerationOutput(
            sequences=sequences,
            sequences_scores=sequences_scores,
            input_ids=input_ids,
            attention_mask=attention_mask,
            tag_logits=tag_logits,
            tag_mask=tag_mask,
            attribute_scores=attribute_scores,
            class_scores=class_scores,
            language_model_outputs=language_model_outputs,
        )
