"""Configuration of DynRefer region-level models (docs/upstream/model.md §2-§17)."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, GenerationConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig
from transformers.models.clip.configuration_clip import CLIPTextConfig

from .validation import check_count, check_probability

__all__ = [
    "DEFAULT_TRAINABLE_MODULES",
    "EVA_CLIP_TEXT_CONFIG",
    "FLAN_T5_XL_CONFIG",
    "RELEASED_GENERATION_DEFAULTS",
    "DynReferConfig",
    "default_vocabularies",
]

# google/flan-t5-xl with LAVIS's exact-GELU override (docs/upstream/model.md §11); `tie_word_embeddings=False` makes
# HF's T5 skip the decoder-output rescaling, as T5 v1.1 / Flan-T5 do.
FLAN_T5_XL_CONFIG = {
    "vocab_size": 32128,
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 32,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu",
    "tie_word_embeddings": False,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 1,
}

# The EVA-CLIP text tower of docs/upstream/model.md §10 / docs/upstream/checkpoint.md §5.5 as an HF CLIPTextModelWithProjection.
EVA_CLIP_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1024,
}

# The released model config's generation arguments (docs/upstream/model.md §11, `dynrefer_flant5xl.yaml`).
RELEASED_GENERATION_DEFAULTS = {
    "num_beams": 2,
    "max_new_tokens": 20,
    "min_length": 1,
    "length_penalty": 0.0,
    "repetition_penalty": 1.5,
    "do_sample": False,
}

# Upstream trains every parameter whose name contains cvem, cem, tag, attr, Qformer or t5_proj
# (docs/upstream/model.md §14); these are the top-level modules that rule selects, in this port's names.
DEFAULT_TRAINABLE_MODULES = (
    "qformer",
    "language_projection",
    "cvem_align",
    "cvem_mlp",
    "cem_memory",
    "tag_head",
    "tag_vision_proj",
    "tag_text_proj",
    "tag_fc",
    "attr_head",
    "attr_vision_proj",
    "attr_text_proj",
    "attr_fc",
    "attr_t",
    "attr_b",
)


@lru_cache(maxsize=1)
def _shipped_vocabularies() -> dict:
    root = resources.files("dynrefer_hf") / "resources"
    tags = [line.strip() for line in (root / "ram_tag_list.txt").read_text(encoding="utf-8").splitlines()]
    ovad = json.loads((root / "ovad" / "ovad_att_templates.json").read_text(encoding="utf-8"))
    classes = json.loads((root / "coco.json").read_text(encoding="utf-8"))
    class_prompts = json.loads((root / "ov_prompts.json").read_text(encoding="utf-8"))["prompts"]
    return {
        "tag_names": [tag for tag in tags if tag],
        "attribute_names": list(ovad["attribute_names"]),
        "attribute_group_sizes": [int(size) for size in ovad["group_sizes"]],
        "attribute_prompts": list(ovad["templates"]),
        "class_names": list(classes),
        "class_prompts": list(class_prompts),
    }


def default_vocabularies() -> dict[str, list]:
    """The shipped vocabularies: 4585 RAM tags, 117 OVAD attributes (474 prompts), 80 COCO classes."""
    return {key: list(value) for key, value in _shipped_vocabularies().items()}


@strict
class DynReferConfig(PreTrainedConfig):
    r"""Configuration of [`DynReferForRegionCaptioning`].

    Defaults reproduce the released DynRefer Flan-T5-XL model (docs/upstream/model.md §17): EVA ViT-g/14 at 224 px, a
    BLIP-2 Q-Former with 32 queries, Flan-T5-XL, 3 nested views.

    Args:
        vision_config (`dict` or `Blip2VisionConfig`): the EVA ViT-g vision tower (1408 wide, 39 layers).
        qformer_config (`dict` or `Blip2QFormerConfig`): the Q-Former; `encoder_hidden_size` is forced to the
            vision width.
        text_config (`dict` or `PreTrainedConfig`): the language model: any seq2seq config (Flan-T5-XL by
            default) or a causal LM config (the LM then gets the visual and control prompts as a prefix).
        text_encoder_config (`dict` or `CLIPTextConfig`, *optional*): the CLIP text tower used to re-encode
            vocabularies and captions (docs/upstream/model.md §10); `None` means no text encoder is built.
        num_views (`int`): views per region (§4-§5); view 0 is the reference.
        num_query_tokens (`int`): Q-Former queries.
        roi_output_size (`int`, *optional*): RoI-Align output side, default `image_size // patch_size`.
        roi_spatial_scale (`float`, *optional*): RoI-Align spatial scale, default `1 / patch_size`.
        roi_sampling_ratio (`int`), roi_aligned (`bool`): RoI-Align sampling (2, legacy `aligned=False`).
        align_group, align_kernel_size, align_offset_scale, align_dw_kernel_size: the DCNv4 alignment
            module (§4): 4 groups, 3x3 taps, offset scale 1, 3x3 depthwise conv.
        head_num_layers, head_hidden_size, head_num_attention_heads, head_intermediate_size, head_hidden_act,
        head_layer_norm_eps, head_dropout: the cross-attention-only BERT of the tag and attribute heads (§7).
        text_embed_dim (`int`): width of the label-embedding tables (EVA-CLIP projection, 1024).
        tag_loss_weight, attr_loss_weight (`float`): weights of `loss_tag` and of the region-caption contrastive
            loss `loss_region_text` (0.01, 0.5; §13; `attr_` is upstream's name: the loss trains the attribute head).
        attribute_label_loss (`str`): `"bce"` or `"group_softmax"`, the loss of `attribute_labels`
            (`modeling_dynrefer.attribute_label_loss`; not upstream).
        attribute_label_loss_weight, class_label_loss_weight (`float`): weights of `loss_attribute` and
            `loss_class` (1.0; 0 turns a loss off). Upstream trains the attribute head only through the
            region-caption loss; these losses use region labels when a dataset has them.
        asl_gamma_neg, asl_gamma_pos, asl_clip, asl_eps (`float`): asymmetric tag loss (§7).
        attr_logit_scale_init, attr_logit_bias_init (`float`): init of `attr_t` (ln 10) and `attr_b` (-10).
        ln_vision_eps (`float`): eps of the LayerNorm after the ViT (1e-5, not the blocks' 1e-6; §2).
        tag_threshold (`float`): sigmoid threshold for predicted tags (0.7).
        max_text_length (`int`): truncation length of control prompts and captions (32).
        quantize_head_outputs (`bool`): round head logits and probabilities to bfloat16 as upstream's bf16
            autocast does (§7-§9), on every device, so tag sets and score ties match upstream.
        upstream_precision (`bool`): on CUDA run the ViT under fp16 autocast and the heads and language model
            under bf16 autocast (§15). Ignored on CPU, where everything runs in float32.
        trainable_modules (`list[str]`, *optional*): top-level modules left trainable (§14); default
            `DEFAULT_TRAINABLE_MODULES`. Everything else (ViT, `query_tokens`, the LM, the text encoder) is
            frozen.
        tag_names (`list[str]`): tag vocabulary (default: the 4585 RAM tags).
        attribute_names (`list[str]`), attribute_group_sizes (`list[int]`), attribute_prompts (`list[str]`):
            attribute vocabulary: `attribute_group_sizes[i]` consecutive prompts score attribute `i`
            (default: the 117 OVAD attributes, 474 prompts).
        class_names (`list[str]`), class_prompts (`list[str]`): open-vocabulary classes and the prompt encoded
            for each (default: the 80 COCO classes, "the {name}").
        control_prompt_tokens (`dict`, *optional*): the tag vocabulary as the language model's tokenizer writes it
            in a control prompt (`prompts.ControlPromptTokens.to_dict`), so that `generate` puts the predicted tags
            into the prompt on token ids; built by `DynReferProcessor.tokenize_tag_vocabulary(tag_names)` when a
            model is converted, trained or loaded by the pipeline.
        deduplicate_views (`bool`): run identical views of one call through the vision tower once (the outputs are
            those of running every view).
    """

    model_type: ClassVar[str] = "dynrefer"
    sub_configs_defaults: ClassVar[dict] = {
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5", init_kwargs=FLAN_T5_XL_CONFIG),
        "text_encoder_config": SubConfigSpec(config_class=CLIPTextConfig, optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    text_encoder_config: dict | PreTrainedConfig | None = None

    num_views: int = 3
    num_query_tokens: int = 32
    roi_output_size: int | None = None
    roi_spatial_scale: float | None = None
    roi_sampling_ratio: int = 2
    roi_aligned: bool = False

    align_group: int = 4
    align_kernel_size: int = 3
    align_offset_scale: float = 1.0
    align_dw_kernel_size: int = 3

    head_num_layers: int = 2
    head_hidden_size: int = 256
    head_num_attention_heads: int = 4
    head_intermediate_size: int = 1024
    head_hidden_act: str = "gelu"
    head_layer_norm_eps: float = 1e-12
    head_dropout: float = 0.1
    text_embed_dim: int = 1024

    tag_loss_weight: float = 0.01
    attr_loss_weight: float = 0.5
    attribute_label_loss: str = "bce"
    attribute_label_loss_weight: float = 1.0
    class_label_loss_weight: float = 1.0
    asl_gamma_neg: float = 7.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    asl_eps: float = 1e-8
    attr_logit_scale_init: float = math.log(10.0)
    attr_logit_bias_init: float = -10.0

    ln_vision_eps: float = 1e-5
    tag_threshold: float = 0.7
    max_text_length: int = 32
    quantize_head_outputs: bool = True
    upstream_precision: bool = True
    trainable_modules: list[str] | None = None
    initializer_range: float = 0.02

    tag_names: list[str] | None = None
    attribute_names: list[str] | None = None
    attribute_group_sizes: list[int] | None = None
    attribute_prompts: list[str] | None = None
    class_names: list[str] | None = None
    class_prompts: list[str] | None = None
    control_prompt_tokens: dict | None = None
    deduplicate_views: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.is_encoder_decoder = bool(self.text_config.is_encoder_decoder)
        self.use_decoder_only_language_model = (
            self.text_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        )
        patch_size = self.vision_config.patch_size
        if self.roi_output_size is None:
            self.roi_output_size = self.vision_config.image_size // patch_size
        if self.roi_spatial_scale is None:
            self.roi_spatial_scale = 1.0 / patch_size
        if self.trainable_modules is None:
            self.trainable_modules = list(DEFAULT_TRAINABLE_MODULES)
        defaults = _shipped_vocabularies()
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, list(value))
        self._check_architecture()
        self._check_vocabularies()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As `PreTrainedConfig.from_dict`, refusing the `config.json` of another `model_type`: its fields
        would be ignored and the full-size released architecture built instead."""
        found = config_dict.get("model_type")
        if found is not None and found != cls.model_type:
            raise ValueError(
                f"this config is of model_type {found!r}, not {cls.model_type!r}: DynReferConfig refuses it "
                "(it would build the released DynRefer architecture around another model's settings)"
            )
        return super().from_dict(config_dict, **kwargs)

    def _check_architecture(self) -> None:
        for name in (
            "num_views",
            "num_query_tokens",
            "roi_output_size",
            "head_num_layers",
            "align_group",
            "max_text_length",
        ):
            check_count(name, getattr(self, name))
        check_probability("tag_threshold", self.tag_threshold)
        check_probability("head_dropout", self.head_dropout)
        if self.align_kernel_size % 2 == 0 or self.align_dw_kernel_size % 2 == 0:
            raise ValueError("align_kernel_size and align_dw_kernel_size must be odd (same-size alignment)")
        if self.vision_config.hidden_size % self.align_group:
            raise ValueError(
                f"the vision width ({self.vision_config.hidden_size}) must be divisible by align_group ({self.align_group})"
            )
        if self.attribute_label_loss not in ("bce", "group_softmax"):
            raise ValueError(
                f"attribute_label_loss must be 'bce' or 'group_softmax', got {self.attribute_label_loss!r}"
            )
        if self.head_hidden_size % self.head_num_attention_heads:
            raise ValueError(
                f"head_hidden_size ({self.head_hidden_size}) must be divisible by head_num_attention_heads "
                f"({self.head_num_attention_heads})"
            )

    def _check_vocabularies(self) -> None:
        if sum(self.attribute_group_sizes) != len(self.attribute_prompts):
            raise ValueError(
                f"attribute_group_sizes sum to {sum(self.attribute_group_sizes)} but there are "
                f"{len(self.attribute_prompts)} attribute_prompts"
            )
        if len(self.attribute_group_sizes) != len(self.attribute_names):
            raise ValueError(
                f"{len(self.attribute_names)} attribute_names but {len(self.attribute_group_sizes)} attribute groups"
            )
        if any(size < 1 for size in self.attribute_group_sizes):
            raise ValueError("every attribute group needs at least one prompt")
        tokens = self.control_prompt_tokens
        if tokens is not None and len(tokens.get("tags_first", ())) != len(self.tag_names):
            raise ValueError(
                f"control_prompt_tokens holds {len(tokens.get('tags_first', ()))} tags but there are "
                f"{len(self.tag_names)} tag_names: rebuild it with processor.tokenize_tag_vocabulary(tag_names)"
            )
        if len(self.class_prompts) != len(self.class_names):
            raise ValueError(
                f"{len(self.class_names)} class_names but {len(self.class_prompts)} class_prompts"
            )

    @property
    def num_tags(self) -> int:
        return len(self.tag_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_group_sizes)

    @property
    def num_attribute_prompts(self) -> int:
        return len(self.attribute_prompts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def align_offset_mask_channels(self) -> int:
        """Width of the offset/mask Linear: group x K x 3 rounded up to a multiple of 8 (112 upstream)."""
        points = self.align_group * self.align_kernel_size**2
        return math.ceil(points * 3 / 8) * 8

    def released_generation_config(self) -> GenerationConfig:
        """The released generation arguments (docs/upstream/model.md §11) with the language model's special tokens."""
        text = self.text_config
        tokens = {
            name: getattr(text, name, None)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        }
        return GenerationConfig(
            **RELEASED_GENERATION_DEFAULTS, **{k: v for k, v in tokens.items() if v is not None}
        )
