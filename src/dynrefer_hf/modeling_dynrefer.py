"""DynRefer region captioning as a native Transformers model (docs/upstream/model.md §1-§16).

R regions, each seen through V nested views, go through a BLIP-2 vision tower; the patch tokens of every
view are RoI-aligned to the target box, views 1..V-1 are aligned to view 0 by a DCNv4-style module, the
views are fused by an MLP, a Q-Former turns the fused tokens into region queries, and those feed the
language model (with a control prompt) and three label heads (tags, attributes, open-vocabulary classes).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    CLIPTextModelWithProjection,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel
from transformers.utils import ModelOutput

from .configuration_dynrefer import DynReferConfig
from .ops import offset_resample, roi_align
from .validation import check_model_folder, check_weight_shapes

__all__ = [
    "ATTRIBUTE_LABEL_LOSSES",
    "DynReferForRegionCaptioning",
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


# ------------------------------------------------------------------------------------------------ losses


def _at_least_float32(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` in float32, or in float64 when it (or ``like``, the model's activations it was computed
    from, e.g. before bf16 rounding) is float64: half-precision results widen, a float64 model keeps float64."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    if like is not None:
        dtype = torch.promote_types(dtype, like.dtype)
    return tensor.to(dtype)


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


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float = 7.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Asymmetric loss of RAM (docs/upstream/model.md §7), **summed** over all entries; focal weights carry no gradient.

    Args:
        logits: `[R, T]` tag logits. targets: `[R, T]` multi-hot 0/1.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    prob_neg = (1 - prob + clip).clamp(max=1) if clip > 0 else 1 - prob
    log_likelihood = targets * torch.log(prob.clamp(min=eps)) + (1 - targets) * torch.log(
        prob_neg.clamp(min=eps)
    )
    with torch.no_grad():
        prob_target = prob * targets + prob_neg * (1 - targets)
        gamma = gamma_pos * targets + gamma_neg * (1 - targets)
        weight = torch.pow(1 - prob_target, gamma)
    return -(log_likelihood * weight).sum()


def sigmoid_contrastive_loss(logits: torch.Tensor, rank: int = 0, offset: int | None = None) -> torch.Tensor:
    """SigLIP-style loss of one direction (docs/upstream/model.md §8): `-sum(logsigmoid(label * logits)) / bs`.

    Args:
        logits: `[bs, N]`, row i = local item i against all N gathered items; the positive of row i is
            column `offset + i`, every other entry is a negative.
        rank: with equal batches on every rank, `offset` defaults to `rank * bs`.
        offset: the first column of this rank's items (the rows of the ranks before it, when batches differ).
    """
    batch = logits.shape[0]
    labels = -torch.ones_like(logits)
    offset = rank * batch if offset is None else offset
    columns = torch.arange(batch, device=logits.device) + offset
    labels[torch.arange(batch, device=logits.device), columns] = 1
    return -F.logsigmoid(labels * logits).sum() / batch


ATTRIBUTE_LABEL_LOSSES = ("bce", "group_softmax")


def attribute_groups(attribute_names: Sequence[str]) -> list[list[int]]:
    """Column indices of each attribute group, groups in first-seen order (`"color"` of `"color:red"`)."""
    groups: dict[str, list[int]] = {}
    for column, name in enumerate(attribute_names):
        groups.setdefault(name.split(":")[0], []).append(column)
    return list(groups.values())


def attribute_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str = "bce", attribute_names: Sequence[str] | None = None
) -> torch.Tensor:
    """Loss of attribute logits `[R, A]` against region labels `[R, A]` in {1, 0, -1 (ignored)}.

    * `"bce"`: binary cross-entropy (mean) over every label that is not -1 (any number of positives);
    * `"group_softmax"`: cross-entropy within each attribute group (`"group:value"` names, `attribute_names`
      required), mean over the (region, group) pairs with exactly one positive and no ignored label. Where
      every group is single-valued (a colour, a texture, a size) this is the better-posed loss: BCE lets the
      shared head settle on one constant score (the positive rate) for every attribute.

    Returns 0 (still connected to `logits`) when nothing is labelled.
    """
    if kind not in ATTRIBUTE_LABEL_LOSSES:
        raise ValueError(f"the attribute label loss must be one of {ATTRIBUTE_LABEL_LOSSES}, got {kind!r}")
    logits = logits.float()
    if kind == "group_softmax":
        if attribute_names is None:
            raise ValueError("the group_softmax attribute loss needs the attribute names (group:value)")
        total, pairs = logits.sum() * 0.0, 0
        for columns in attribute_groups(attribute_names):
            group_labels = labels[:, columns]
            usable = ((group_labels == 1).sum(dim=1) == 1) & (group_labels != -1).all(dim=1)
            if usable.any():
                target = group_labels[usable].argmax(dim=1)
                total = total + F.cross_entropy(logits[usable][:, columns], target, reduction="sum")
                pairs += int(usable.sum())
        return total / max(pairs, 1)
    labelled = labels != -1
    if not labelled.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[labelled], labels[labelled].to(logits.dtype))


def class_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits `[R, C]` against class labels `[R]` (-1 = unlabelled, ignored); 0 when
    no region has a class."""
    logits = logits.float()
    if not (labels != -1).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-1)


def _gather_keep_local_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather over ranks (dim 0, row counts may differ between ranks); this rank's slice is the input
    itself, so it keeps its gradient. Returns the gathered rows and the offset of this rank's first row."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(count) for count in sizes]
    # image-batched collators give each rank its own number of regions; all_gather needs equal shapes
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [part[:count] for part, count in zip(parts, sizes)]
    parts[rank] = tensor
    return torch.cat(parts), sum(sizes[:rank])


# ----------------------------------------------------------------------------------------------- modules


class DynReferRegionAlign(nn.Module):
    """Cross-view alignment with DCNv4 semantics (upstream `CustomDCNv4`, docs/upstream/model.md §4).

    The moving view's values are resampled at offsets and with raw modulation masks predicted, per position,
    from a grouped depthwise conv over `[moving | reference]` channels. `offset_mask` starts at zero, so the
    output is exactly zero at initialisation.
    """

    def __init__(
        self,
        channels: int,
        group: int = 4,
        kernel_size: int = 3,
        offset_scale: float = 1.0,
        dw_kernel_size: int = 3,
    ):
        super().__init__()
        if channels % group:
            raise ValueError(f"channels ({channels}) must be divisible by group ({group})")
        self.channels = channels
        self.group = group
        self.kernel_size = kernel_size
        self.offset_scale = offset_scale
        # groups=channels: output channel c reads input channels 2c and 2c+1 of the concatenation (§4.3).
        self.offset_mask_dw = nn.Conv2d(
            2 * channels,
            channels,
            dw_kernel_size,
            stride=1,
            padding=(dw_kernel_size - 1) // 2,
            groups=channels,
        )
        self.offset_mask = nn.Linear(channels, math.ceil(group * kernel_size**2 * 3 / 8) * 8)
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)

    def forward(self, moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Align `moving` `[N, C, H, W]` to `reference` `[N, C, H, W]`; returns `[N, C, H, W]`."""
        value = self.value_proj(moving.permute(0, 2, 3, 1))  # [N, H, W, C]
        guide = self.offset_mask_dw(torch.cat([moving, reference], dim=1))  # moving first (§4.3)
        offset_mask = self.offset_mask(guide.permute(0, 2, 3, 1))  # [N, H, W, 112]
        sampled = offset_resample(
            value,
            offset_mask.to(value.dtype),
            kernel_size=self.kernel_size,
            stride=1,
            padding=(self.kernel_size - 1) // 2,
            dilation=1,
            group=self.group,
            offset_scale=self.offset_scale,
        )
        return self.output_proj(sampled).permute(0, 3, 1, 2)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(q k^T * scaling + mask) v` on `[B, heads, L, D]` inputs; returns `([B, L, heads, D], weights)`."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DynReferCrossAttention(nn.Module):
    """BERT cross-attention (`crossattention.self`): queries from the labels, keys/values from the region.

    The attention itself is the function of `config._attn_implementation` in transformers' registry
    (`ALL_ATTENTION_FUNCTIONS`: "sdpa" by default, also "flash_attention_*", "flex_attention" or a kernel),
    "eager" being `eager_attention_forward`.
    """

    def __init__(self, config: DynReferConfig):
        super().__init__()
        hidden = config.head_hidden_size
        self.config = config
        self.num_heads = config.head_num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = config.head_dropout

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        query = self._split_heads(self.query(hidden_states))
        key = self._split_heads(self.key(memory))
        value = self._split_heads(self.value(memory))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, _ = attention(
            self,
            query,
            key,
            value,
            None,  # the memory mask is all ones upstream, so none is passed
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return context.flatten(2)


class DynReferResidualOutput(nn.Module):
    """`LayerNorm(residual + dropout(dense(x)))`, BERT's post-LN output block."""

    def __init__(self, config: DynReferConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.head_hidden_size)
        self.LayerNorm = nn.LayerNorm(config.head_hidden_size, eps=config.head_layer_norm_eps)
        self.dropout = nn.Dropout(config.head_dropout)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(hidden_states)))


class DynReferCrossAttentionBlock(nn.Module):
    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.self = DynReferCrossAttention(config)
        self.output = DynReferResidualOutput(config, config.head_hidden_size)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, memory), hidden_states)


class DynReferIntermediate(nn.Module):
    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.dense = nn.Linear(config.head_hidden_size, config.head_intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.head_hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class DynReferLabelHeadLayer(GradientCheckpointingLayer):
    """One layer of the label head: cross-attention then FFN, no self-attention (docs/upstream/model.md §7)."""

    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.crossattention = DynReferCrossAttentionBlock(config)
        self.intermediate = DynReferIntermediate(config)
        self.output = DynReferResidualOutput(config, config.head_intermediate_size)

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        attended = self.crossattention(hidden_states, memory)
        return self.output(self.intermediate(attended), attended)


class DynReferLabelEncoder(nn.Module):
    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.layer = nn.ModuleList([DynReferLabelHeadLayer(config) for _ in range(config.head_num_layers)])

    def forward(self, hidden_states: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, memory)
        return hidden_states


class DynReferLabelHead(nn.Module):
    """Cross-attention-only BERT shared by the tag and attribute heads (RAM's tagging head, docs/upstream/model.md §7).

    `forward(labels [B, M, H], memory [B, Q, H]) -> [B, M, H]`: each label embedding attends to the region's
    projected queries.
    """

    def __init__(self, config: DynReferConfig):
        super().__init__()
        self.encoder = DynReferLabelEncoder(config)

    def forward(self, label_embeds: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.encoder(label_embeds, memory)


# ------------------------------------------------------------------------------------------------- model


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
        sub-models' own initialisation of such modules (T5Attention, T5's feed-forward blocks), leaving language
        model weights missing from a checkpoint at random N(0, 1) values. Here every init goes through
        `transformers.initialization`, which leaves loaded tensors alone, so the sub-models (dispatched to their
        own `_init_weights` by `initialize_weights`) initialise exactly their missing weights."""
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        # Everything DynRefer-specific is set from the root, in one place.
        if isinstance(module, DynReferForRegionCaptioning):
            align = module.cvem_align
            # upstream CustomDCNv4._reset_parameters; the depthwise conv keeps PyTorch's default init
            init.zeros_(align.offset_mask.weight)
            init.zeros_(align.offset_mask.bias)
            for linear in (align.value_proj, align.output_proj):
                init.xavier_uniform_(linear.weight)
                init.zeros_(linear.bias)
            _torch_default_init(align.offset_mask_dw)
            init.normal_(module.query_tokens, mean=0.0, std=self.config.qformer_config.initializer_range)
            init.zeros_(module.cem_memory)
            init.constant_(module.attr_t, self.config.attr_logit_scale_init)
            init.constant_(module.attr_b, self.config.attr_logit_bias_init)
            # upstream builds these as plain nn.Linear: PyTorch's default init
            for layer in (
                module.language_projection,
                module.cvem_mlp[0],
                module.cvem_mlp[2],
                module.tag_vision_proj,
                module.tag_text_proj,
                module.tag_fc,
                module.attr_vision_proj,
                module.attr_text_proj,
                module.attr_fc,
            ):
                _torch_default_init(layer)
            # zero placeholders (deterministic) until a checkpoint or `set_vocabulary` fills the tables
            for name in ("clip_embeds", "att_embeds", "ov_embeds"):
                init.zeros_(getattr(module, name))


def _torch_default_init(module: nn.Linear | nn.Conv2d) -> None:
    """`reset_parameters()` of nn.Linear / nn.Conv2d, through the HF init functions (they skip loaded weights)."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(module.bias, -bound, bound)


class DynReferForRegionCaptioning(DynReferPreTrainedModel, GenerationMixin):
    """DynRefer: region captions, tags, attribute scores and open-vocabulary class scores (model.md).

    Inputs are the processor's nested views: `pixel_values [R, V, 3, S, S]` and the target box inside every
    view, `view_boxes [R, V, 4]` (x1, y1, x2, y2 in view pixels).
    """

    def __init__(self, config: DynReferConfig):
        super().__init__(config)
        vision_width = config.vision_config.hidden_size
        qformer_width = config.qformer_config.hidden_size
        head_width = config.head_hidden_size

        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        # upstream's ln_vision uses PyTorch's default eps 1e-5, not the ViT blocks' 1e-6 (docs/upstream/model.md §2)
        self.vision_model.post_layernorm.eps = config.ln_vision_eps
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_width))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        if getattr(self.language_model.config, "scale_decoder_outputs", True) is False:
            self._untie_t5_lm_head()
        lm_width = self.language_model.get_input_embeddings().embedding_dim
        self.language_projection = nn.Linear(qformer_width, lm_width)

        self.cvem_align = DynReferRegionAlign(
            vision_width,
            group=config.align_group,
            kernel_size=config.align_kernel_size,
            offset_scale=config.align_offset_scale,
            dw_kernel_size=config.align_dw_kernel_size,
        )
        self.cvem_mlp = nn.Sequential(
            nn.Linear(vision_width * config.num_views, vision_width),
            nn.ReLU(),
            nn.Linear(vision_width, vision_width),
        )
        self.cem_memory = nn.Parameter(torch.zeros(lm_width))

        self.tag_head = DynReferLabelHead(config)
        self.tag_vision_proj = nn.Linear(qformer_width, head_width)
        self.tag_text_proj = nn.Linear(config.text_embed_dim, head_width)
        self.tag_fc = nn.Linear(head_width, 1)
        self.attr_head = DynReferLabelHead(config)
        self.attr_vision_proj = nn.Linear(qformer_width, head_width)
        self.attr_text_proj = nn.Linear(config.text_embed_dim, head_width)
        self.attr_fc = nn.Linear(head_width, 1)
        self.attr_t = nn.Parameter(torch.tensor(config.attr_logit_scale_init))
        self.attr_b = nn.Parameter(torch.tensor(config.attr_logit_bias_init))

        self.text_encoder = (
            CLIPTextModelWithProjection._from_config(config.text_encoder_config)
            if config.text_encoder_config is not None
            else None
        )
        self.register_buffer("clip_embeds", torch.zeros(config.num_tags, config.text_embed_dim))
        self.register_buffer("att_embeds", torch.zeros(config.num_attribute_prompts, config.text_embed_dim))
        self.register_buffer("ov_embeds", torch.zeros(config.num_classes, config.text_embed_dim))

        self.post_init()
        self.generation_config = config.released_generation_config()
        self.set_trainable(config.trainable_modules)

    # ------------------------------------------------------------------ HF plumbing

    def _untie_t5_lm_head(self) -> None:
        """T5 v1.1 / Flan-T5 have an lm_head of their own (docs/upstream/model.md §11), but transformers 5 ties every T5
        lm_head to the shared embedding; keep only the input-embedding ties."""
        language_model = self.language_model
        language_model._tied_weights_keys = {
            target: source
            for target, source in language_model._tied_weights_keys.items()
            if not target.startswith("lm_head")
        }
        language_model.all_tied_weights_keys = language_model.get_expanded_tied_weights_keys(
            all_submodels=False
        )
        lm_head = language_model.get_output_embeddings()
        lm_head.weight = nn.Parameter(lm_head.weight.detach().clone())

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, with one-sentence errors for a local folder that is broken
        (`validation.check_model_folder`) or whose weights do not fit its config, and `model.missing_weights`
        listing the weights the checkpoint lacked."""
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            check_model_folder(source)
            if kwargs.get("config") is None and not kwargs.get("ignore_mismatched_sizes"):
                with torch.device("meta"):
                    expected = cls(cls.config_class.from_pretrained(source))
                check_weight_shapes(source, {name: tuple(t.shape) for name, t in expected.state_dict().items()})
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.set_trainable()  # loading swaps in new Parameters, which resets requires_grad
        # Weights the checkpoint lacked (randomly initialised): the pipeline refuses such a model unless told.
        model.missing_weights = sorted(loading_info["missing_keys"])
        return (model, loading_info) if output_loading_info else model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

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

    def _check_views(self, pixel_values: torch.Tensor, view_boxes: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            shape = (
                list(pixel_values.shape)
                if isinstance(pixel_values, torch.Tensor)
                else type(pixel_values).__name__
            )
            raise ValueError(
                f"pixel_values must be [R, V, 3, H, W] (regions, views, channels, height, width), got {shape}"
            )
        regions, views, channels, height, width = pixel_values.shape
        size = self.config.vision_config.image_size
        if views != self.config.num_views:
            raise ValueError(
                f"pixel_values has {views} views per region but config.num_views is {self.config.num_views}"
            )
        if channels != 3 or height != size or width != size:
            raise ValueError(f"each view must be [3, {size}, {size}], got {[channels, height, width]}")
        if regions == 0:
            raise ValueError("pixel_values holds no regions (R = 0)")
        # value checks read the tensors (a host sync): eager only, skipped inside torch.compile/export
        checking_values = not torch.compiler.is_compiling()
        if not pixel_values.is_floating_point() or (
            checking_values and not bool(torch.isfinite(pixel_values).all())
        ):
            raise ValueError("pixel_values must be floating point and free of NaN/inf")
        if not isinstance(view_boxes, torch.Tensor) or tuple(view_boxes.shape) != (regions, views, 4):
            shape = (
                list(view_boxes.shape) if isinstance(view_boxes, torch.Tensor) else type(view_boxes).__name__
            )
            raise ValueError(
                f"view_boxes must be [R, V, 4] = [{regions}, {views}, 4] (x1, y1, x2, y2), got {shape}"
            )
        if not view_boxes.is_floating_point() or (
            checking_values and not bool(torch.isfinite(view_boxes).all())
        ):
            raise ValueError("view_boxes must be floating point and free of NaN/inf")
        if checking_values and bool((view_boxes[..., 2:] < view_boxes[..., :2]).any()):
            raise ValueError("view_boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")

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

    # ------------------------------------------------------------------ visual path

    def fuse_views(self, embeds: torch.Tensor, view_boxes: torch.Tensor) -> torch.Tensor:
        """RoI-Align, cross-view alignment and fusion (docs/upstream/model.md §3-§5).

        Args:
            embeds: `[R*V, 1 + P*P, D]` ViT tokens after `ln_vision`, index `r*V + v`.
            view_boxes: `[R, V, 4]` target box in every view's pixels.
        Returns:
            `[R, 1 + S*S, D]` fused visual tokens, `S = config.roi_output_size`.
        """
        regions, views = view_boxes.shape[:2]
        cls_tokens, patches = embeds[:, :1], embeds[:, 1:]
        grid = math.isqrt(patches.shape[1])
        if grid * grid != patches.shape[1]:
            raise ValueError(f"the vision tower gave {patches.shape[1]} patch tokens, not a square grid")
        width = embeds.shape[-1]
        maps = patches.transpose(1, 2).reshape(regions * views, width, grid, grid)
        # box k is applied to image k (each view has its own box)
        image_index = torch.arange(regions * views, device=maps.device, dtype=maps.dtype)
        rois = torch.cat([image_index[:, None], view_boxes.reshape(-1, 4).to(maps.dtype)], dim=1)
        roi_maps = roi_align(
            maps,
            rois,
            self.config.roi_output_size,
            spatial_scale=self.config.roi_spatial_scale,
            sampling_ratio=self.config.roi_sampling_ratio,
            aligned=self.config.roi_aligned,
            check_values=False,  # batch indices built above; box values checked once in _check_views
        )
        size = roi_maps.shape[-1]
        roi_maps = roi_maps.view(regions, views, width, size, size)
        if views > 1:
            # view-major: all regions of view 1, then of view 2, ...; each aligned to view 0 of its region
            moving = roi_maps[:, 1:].transpose(0, 1).reshape(-1, width, size, size)
            reference = roi_maps[:, 0].repeat(views - 1, 1, 1, 1)
            aligned = self.cvem_align(moving, reference).to(roi_maps.dtype)
            aligned = aligned.view(views - 1, regions, width, size, size).transpose(0, 1)
            roi_maps = torch.cat([roi_maps[:, :1], aligned], dim=1)
        tokens = roi_maps.flatten(3).transpose(2, 3)  # [R, V, S*S, D], row-major cells
        sequences = torch.cat([cls_tokens.reshape(regions, views, 1, width).to(tokens.dtype), tokens], dim=2)
        fused = sequences.permute(0, 2, 1, 3).reshape(
            regions, 1 + size * size, views * width
        )  # [v0 | v1 | v2]
        return self.cvem_mlp(fused)

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
        regions = pixel_values.shape[0]
        images = pixel_values.flatten(0, 1)  # index r*V + v
        # the frozen ViT needs no graph
        vision_trainable = any(p.requires_grad for p in self.vision_model.parameters())
        with (
            torch.set_grad_enabled(torch.is_grad_enabled() and vision_trainable),
            self._autocast(images.device, torch.float16),
        ):
            vision_outputs = self.vision_model(
                pixel_values=images,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        embeds = vision_outputs.last_hidden_state.to(self.cvem_mlp[0].weight.dtype)
        visual_embeds = self.fuse_views(embeds, view_boxes)
        query_tokens = self.query_tokens.expand(regions, -1, -1)
        # the encoder mask is all ones upstream, i.e. no mask
        qformer_outputs = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=visual_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return vision_outputs, qformer_outputs

    # ------------------------------------------------------------------ heads

    @staticmethod
    def _label_scores(
        head: DynReferLabelHead,
        vision_proj: nn.Linear,
        text_proj: nn.Linear,
        fc: nn.Linear,
        text_embeds: torch.Tensor,
        region_queries: torch.Tensor,
        normalize: bool,
    ) -> torch.Tensor:
        """Score M label embeddings `[M, E]` against B regions `[B, Q, Hq]` -> `[B, M]` (docs/upstream/model.md §7-§9)."""
        memory = vision_proj(region_queries)
        labels = text_proj(text_embeds.to(text_proj.weight.dtype))
        hidden = head(labels.unsqueeze(0).expand(memory.shape[0], -1, -1), memory)
        if normalize:
            hidden = F.normalize(hidden, dim=-1)
        return fc(hidden).squeeze(-1)

    def _quantize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Upstream computes the heads under bf16 autocast; round to bf16 so scores match (§7-§9)."""
        if self.config.quantize_head_outputs:
            return tensor.to(torch.bfloat16)
        return tensor

    def tag_logits(self, region_queries: torch.Tensor) -> torch.Tensor:
        """Tag logits `[R, num_tags]` (docs/upstream/model.md §7), not rounded."""
        with self._autocast(region_queries.device, torch.bfloat16):
            return self._label_scores(
                self.tag_head,
                self.tag_vision_proj,
                self.tag_text_proj,
                self.tag_fc,
                self.clip_embeds,
                region_queries,
                normalize=False,
            )

    def attribute_similarity(self, region_queries: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The attribute head's raw score `s` of every region against every text embedding: `[R, M]` (§8)."""
        with self._autocast(region_queries.device, torch.bfloat16):
            return self._label_scores(
                self.attr_head,
                self.attr_vision_proj,
                self.attr_text_proj,
                self.attr_fc,
                text_embeds,
                region_queries,
                normalize=True,
            )

    def pool_attribute_prompts(self, prompt_scores: torch.Tensor) -> torch.Tensor:
        """Per-prompt scores `[R, num_attribute_prompts]` -> per-attribute `[R, num_attributes]`: the max over
        each attribute's `config.attribute_group_sizes[i]` consecutive prompts (docs/upstream/model.md §8).
        Used for the predicted probabilities and the label-loss logits alike (max commutes with sigmoid)."""
        sizes = torch.tensor(self.config.attribute_group_sizes, device=prompt_scores.device)
        group_of_prompt = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)
        index = group_of_prompt.expand(prompt_scores.shape[0], -1)
        pooled = prompt_scores.new_zeros(prompt_scores.shape[0], self.config.num_attributes)
        return pooled.scatter_reduce(1, index, prompt_scores, "amax", include_self=False)

    def predict_labels(
        self, region_queries: torch.Tensor, tag_threshold: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference outputs of the three heads (docs/upstream/model.md §7-§9).

        Returns:
            tag_logits `[R, num_tags]`, tag_mask `[R, num_tags]` (sigmoid > threshold), attribute_scores
            `[R, num_attributes]` (max sigmoid over each attribute's prompts), class_scores `[R, num_classes]`
            (raw scores). With `config.quantize_head_outputs` all are bf16-rounded as upstream, and the threshold
            test happens in bf16 too; the returned tensors are float32.
        """
        threshold = self.config.tag_threshold if tag_threshold is None else tag_threshold
        tag_logits = self._quantize(self.tag_logits(region_queries))
        tag_mask = torch.sigmoid(tag_logits) > threshold
        attribute_probs = torch.sigmoid(
            self._quantize(self.attribute_similarity(region_queries, self.att_embeds))
        )
        attribute_scores = self.pool_attribute_prompts(attribute_probs)
        class_scores = self._quantize(self.attribute_similarity(region_queries, self.ov_embeds))
        return (
            _at_least_float32(tag_logits, like=region_queries),
            tag_mask,
            _at_least_float32(attribute_scores, like=region_queries),
            _at_least_float32(class_scores, like=region_queries),
        )

    def attribute_label_logits(self, region_queries: torch.Tensor) -> torch.Tensor:
        """Logits `[R, num_attributes]` of the attribute-label loss: the attribute head's raw scores `s`
        (docs/upstream/model.md §8; max over each attribute's prompts) scaled as in the region-caption loss,
        `s * exp(attr_t) + attr_b`: `s` compares L2-normalised vectors, too narrow a range to fit labels unscaled.
        Inference ranks by `s` itself (`predict_labels`), which the scaling does not reorder."""
        scores = self.attribute_similarity(region_queries, self.att_embeds).float()
        return self.pool_attribute_prompts(scores * self.attr_t.exp() + self.attr_b)

    def class_label_logits(self, region_queries: torch.Tensor) -> torch.Tensor:
        """Logits `[R, num_classes]` of the class-label loss: `s * exp(attr_t)` of the class prompts (§9)."""
        return self.attribute_similarity(region_queries, self.ov_embeds).float() * self.attr_t.exp()

    def _contrastive(self, region_queries: torch.Tensor, caption_embeds: torch.Tensor):
        """Sigmoid region-caption loss across ranks (docs/upstream/model.md §8) and the region->caption logits."""
        device = region_queries.device
        with self._autocast(device, torch.bfloat16):
            memory = self.attr_vision_proj(region_queries)
            captions = self.attr_text_proj(caption_embeds.to(self.attr_text_proj.weight.dtype))
            memory_all, offset = _gather_keep_local_grad(memory)
            captions_all, _ = _gather_keep_local_grad(captions)

            def score(labels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
                hidden = self.attr_head(labels.unsqueeze(0).expand(regions.shape[0], -1, -1), regions)
                return self.attr_fc(F.normalize(hidden, dim=-1)).squeeze(-1)

            scale, bias = self.attr_t.exp(), self.attr_b
            logits_i2t = score(captions, memory_all).transpose(0, 1) * scale + bias  # [bs, N]: local captions
            logits_t2i = score(captions_all, memory) * scale + bias  # [bs, N]: local regions
        loss = (
            sigmoid_contrastive_loss(logits_i2t.float(), offset=offset)
            + sigmoid_contrastive_loss(logits_t2i.float(), offset=offset)
        ) / 2
        return loss * self.config.attr_loss_weight, logits_t2i

    # ------------------------------------------------------------------ language model

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
                (default: `labels` shifted right, as T5 does) -> `logits`.
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
        losses = [_at_least_float32(loss, like=region_queries) for loss in parts if loss is not None]
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
            tag_logits=_at_least_float32(self._quantize(raw_tag_logits), like=region_queries),
            contrastive_logits=contrastive_logits,
            region_queries=region_queries,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
            language_model_outputs=language_model_outputs,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        view_boxes: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        region_queries: torch.Tensor | None = None,
        **generate_kwargs,
    ):
        """Caption the regions; returns what the language model's `generate` returns (ids, or a
        `GenerateOutput` with `return_dict_in_generate=True`). Defaults: `self.generation_config`, the
        released values (num_beams 2, max_new_tokens 20, repetition_penalty 1.5, length_penalty 0).

        The regions are given as views (`pixel_values`, `view_boxes`) or as their `region_queries` (from
        `get_region_queries`, so that the label heads and generation share one visual pass).
        """
        if region_queries is None:
            if pixel_values is None or view_boxes is None:
                raise ValueError("generate needs pixel_values and view_boxes, or region_queries")
            region_queries = self.get_region_queries(pixel_values, view_boxes)
        elif pixel_values is not None or view_boxes is not None:
            raise ValueError("give either pixel_values and view_boxes or region_queries to generate, not both")
        self._check_rows("input_ids", input_ids, region_queries.shape[0])
        embeds, mask = self._language_model_inputs(region_queries, input_ids, attention_mask)
        if self.config.use_decoder_only_language_model:
            mask, embeds = self._pack(mask, embeds, left=True)
        generation_config = copy.deepcopy(
            generate_kwargs.pop("generation_config", None) or self.generation_config
        )
        model_kwargs = generation_config.update(**generate_kwargs)  # returns the non-generation arguments
        with self._autocast(embeds.device, torch.bfloat16):
            outputs = self.language_model.generate(
                inputs_embeds=embeds, attention_mask=mask, generation_config=generation_config, **model_kwargs
            )
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        _pad_after_eos(sequences, generation_config, self.config.is_encoder_decoder)
        return outputs

    @torch.no_grad()
    def describe_regions(
        self,
        pixel_values: torch.Tensor,
        view_boxes: torch.Tensor,
        processor,
        controls: Sequence[Sequence[str] | str] | None = None,
        tag_threshold: float | None = None,
        **generate_kwargs,
    ) -> list[dict]:
        """One record per region (docs/upstream/model.md §16): a convenience over `get_region_queries`,
        `predict_labels`, the processor's control prompts, `generate` and the processor's
        `post_process_generation`.

        The control prompt of region r holds the user's words first, then the predicted tags in tag-list order
        (upstream used a hash-seed dependent set order, docs/upstream/model.md §12).

        Args:
            processor: a `DynReferProcessor` (a bare tokenizer of the language model is accepted too).
            controls: per region, a list of words or a string of words separated by ",".
            tag_threshold: overrides `config.tag_threshold`.

        Returns:
            `[{"caption": str, "score": float (exp of the sequence score), "tags": [str],
            "attribute_scores": [float] * num_attributes, "class_scores": [float] * num_classes}, ...]`.
        """
        from .processing_dynrefer import DynReferProcessor

        if not isinstance(processor, DynReferProcessor):  # a tokenizer: the text side of a processor
            processor = DynReferProcessor.for_tokenizer(processor, max_text_length=self.config.max_text_length)
        regions = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else None
        if controls is not None and regions is not None and len(controls) != regions:
            raise ValueError(f"controls has {len(controls)} entries for {regions} regions")
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError(
                "describe_regions returns one caption per region: num_return_sequences must be 1"
            )
        region_queries = self.get_region_queries(pixel_values, view_boxes)
        _, tag_mask, attribute_scores, class_scores = self.predict_labels(region_queries, tag_threshold)
        tags = processor.tags_from_mask(tag_mask, self.config.tag_names)
        prompts = processor.encode_control_prompts(controls, tags).to(region_queries.device)
        generate_kwargs.update(output_scores=True, return_dict_in_generate=True)
        outputs = self.generate(
            input_ids=prompts["input_ids"],
            attention_mask=prompts["attention_mask"],
            region_queries=region_queries,
            **generate_kwargs,
        )
        return processor.post_process_generation(
            outputs.sequences, self.sequence_scores(outputs), tags, attribute_scores, class_scores
        )

    def sequence_scores(self, outputs) -> torch.Tensor:
        """Log-probability `[R]` of each generated caption: beam search's `sequences_scores`; for greedy or
        sampling, the summed log-probabilities of the tokens up to the first EOS. `outputs` is `generate`'s
        output with `return_dict_in_generate=True, output_scores=True`."""
        if getattr(outputs, "sequences_scores", None) is not None:
            return _at_least_float32(outputs.sequences_scores)
        steps = len(outputs.scores)
        generated = outputs.sequences[:, -steps:]
        log_probs = torch.stack(
            [F.log_softmax(_at_least_float32(step), dim=-1) for step in outputs.scores], dim=1
        )
        token_log_probs = log_probs.gather(2, generated.unsqueeze(-1)).squeeze(-1)
        eos = self.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=generated.device)
        is_eos = torch.isin(generated, eos)
        # tokens after the first EOS are padding
        finished_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        return token_log_probs.masked_fill(finished_before, 0.0).sum(dim=1)

    # ------------------------------------------------------------------ vocabularies

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
        if attributes is not None:
            self.config.attribute_names = list(attributes)
            self.config.attribute_group_sizes = [len(group) for group in attributes.values()]
            self.config.attribute_prompts = prompts
        if classes is not None:
            self.config.class_names = class_names
            self.config.class_prompts = class_prompts
