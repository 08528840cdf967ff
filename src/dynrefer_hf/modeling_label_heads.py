"""The label heads (docs/upstream/model.md §7-§9): tags, attribute prompts and open-vocabulary classes scored
against the region queries by two cross-attention-only BERTs, and their losses.

`DynReferLabelHeadsMixin` holds the heads' parameters on the model itself (`tag_head`, `tag_vision_proj`, ...,
`attr_t`, `attr_b`: the checkpoint's key names) and the methods that use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dynrefer import DynReferConfig
from .modeling_common import at_least_float32, torch_default_init

__all__ = [
    "ATTRIBUTE_LABEL_LOSSES",
    "DynReferLabelHead",
    "DynReferLabelHeadsMixin",
    "asymmetric_loss",
    "attribute_groups",
    "attribute_label_loss",
    "class_label_loss",
    "sigmoid_contrastive_loss",
]

# ------------------------------------------------------------------------------------------------ losses


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



class DynReferLabelHeadsMixin:
    """The tag and attribute heads of `DynReferForRegionCaptioning` (the attribute head also scores classes and,
    in training, the region-caption pairs)."""

    def _build_label_heads(self, config: DynReferConfig) -> None:
        qformer_width, head_width = config.qformer_config.hidden_size, config.head_hidden_size
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

    def _init_label_heads(self) -> None:
        init.constant_(self.attr_t, self.config.attr_logit_scale_init)
        init.constant_(self.attr_b, self.config.attr_logit_bias_init)
        # upstream builds these as plain nn.Linear: PyTorch's default init
        for layer in (
            self.tag_vision_proj,
            self.tag_text_proj,
            self.tag_fc,
            self.attr_vision_proj,
            self.attr_text_proj,
            self.attr_fc,
        ):
            torch_default_init(layer)

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
            at_least_float32(tag_logits, like=region_queries),
            tag_mask,
            at_least_float32(attribute_scores, like=region_queries),
            at_least_float32(class_scores, like=region_queries),
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
