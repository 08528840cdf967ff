"""Pure key mappings from upstream checkpoints onto this library's parameter names (docs/upstream/checkpoint.md §5).

Every mapper takes a flat state dict and returns a [`MappedWeights`]: the renamed (and, where the layouts
differ, reshaped) tensors under `DynReferForRegionCaptioning`'s names, plus the source keys that are
deliberately not used, each with the reason. A key no rule knows raises `UnknownKeysError` naming it, so
nothing is silently skipped. Mappers only rename, split, concatenate or transpose; dtypes are left alone.

Upstream namespaces handled:

* DynRefer's `DynReferT5` (`Qformer.*`, `t5_proj.*`, `cvem_*`, `tag_*`, `attr_*`, and the frozen
  `visual_encoder.*`, `ln_vision.*`, `query_tokens`, `t5_model.*`, `text_encoder.*`, tables);
* LAVIS BLIP-2 `Blip2T5` (a subset of the above);
* LAVIS `eva_vit_g.pth` (EVA ViT-g without prefix);
* BAAI `eva_clip_psz14.pt` (`text.*` is the text tower; `visual.*` is not used);
* a Flan-T5 (`T5ForConditionalGeneration`) state dict.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "MappedWeights",
    "UnknownKeysError",
    "check_alias_equal",
    "convert_blip2_state_dict",
    "convert_eva_clip_text_state_dict",
    "convert_eva_vit_state_dict",
    "convert_t5_state_dict",
    "convert_upstream_state_dict",
    "map_blip2_state_dict",
    "map_eva_clip_text_state_dict",
    "map_eva_vit_state_dict",
    "map_t5_state_dict",
    "map_upstream_state_dict",
    "tied_embedding_aliases",
]

# Reasons for keys that are read but deliberately not written.
DROP_POSITION_IDS = "constant BERT position-id buffer; the Q-Former gets no text input"
DROP_QFORMER_TEXT = "text-side Q-Former part, removed by BLIP-2-T5 (docs/upstream/model.md §6)"
DROP_T5_ALIAS = "tied alias of the T5 shared embedding (checked equal to it, docs/upstream/checkpoint.md §2)"
DROP_EXTRA_VIT_BLOCK = "EVA ViT block beyond the {num_layers} that BLIP-2 uses (docs/upstream/model.md §2)"
DROP_EVA_HEAD = "EVA final norm / head, absent from LAVIS's ViT-g (docs/upstream/model.md §2)"
DROP_LOGIT_SCALE = "CLIP logit scale, unused (docs/upstream/model.md §10)"
DROP_CLIP_VISION = "EVA-CLIP vision tower, unused by DynRefer (docs/upstream/model.md §10)"
DROP_ATTN_MASK = "causal mask buffer, rebuilt by the model"

T5_ALIAS_SUFFIXES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_T5_KEY = re.compile(r"(?:shared|lm_head|(?:encoder|decoder)\.(?:block\.\d+\..+|final_layer_norm))\.weight")

_QFORMER_LAYER_PARTS = (
    r"(?P<block>attention|crossattention)\.self\.(?P<proj>query|key|value)",
    r"(?P<out>attention|crossattention)\.output\.(?P<outmod>dense|LayerNorm)",
    r"(?P<ffn>intermediate_query\.dense|output_query\.(?:dense|LayerNorm))",
)
_HEAD_LAYER = (
    r"encoder\.layer\.\d+\.(?:crossattention\.self\.(?:query|key|value)|crossattention\.output\.(?:dense|LayerNorm)"
    r"|intermediate\.dense|output\.(?:dense|LayerNorm))\.(?:weight|bias)"
)
_DYNREFER_IDENTITY = re.compile(
    r"cvem_align\.(?:offset_mask_dw|offset_mask|value_proj|output_proj)\.(?:weight|bias)"
    r"|cvem_mlp\.[02]\.(?:weight|bias)"
    r"|cem_memory"
    rf"|(?:tag|attr)_head\.{_HEAD_LAYER}"
    r"|(?:tag|attr)_(?:vision_proj|text_proj|fc)\.(?:weight|bias)"
    r"|attr_[tb]"
    r"|(?:clip|att|ov)_embeds"
)


class UnknownKeysError(KeyError):
    """Source keys that no mapping rule knows."""

    def __init__(self, source: str, keys: list[str]):
        self.source = source
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:20]) + (
            f", ... ({len(self.keys)} in all)" if len(self.keys) > 20 else ""
        )
        super().__init__(f"{source}: {len(self.keys)} unknown key(s): {shown}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


@dataclass
class MappedWeights:
    """Result of a key mapping.

    Attributes:
        tensors: target name -> tensor, in this library's names.
        dropped: source key -> why it is deliberately not used.
        sources: target name -> the source key(s) it was built from.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def put(self, target: str, tensor: torch.Tensor, *source_keys: str) -> None:
        if target in self.tensors:
            raise ValueError(f"two source keys map onto {target}: {self.sources[target]} and {source_keys}")
        self.tensors[target] = tensor
        self.sources[target] = source_keys

    @property
    def consumed(self) -> set[str]:
        """Source keys that ended up in at least one target."""
        return {key for keys in self.sources.values() for key in keys}


# --------------------------------------------------------------------------------------------------
# EVA ViT-g (LAVIS eva_vit_g.pth, upstream `visual_encoder.*`) -> Blip2VisionModel


def _map_eva_vit(
    state_dict: Mapping[str, torch.Tensor], prefix: str, num_layers: int | None, mapped: MappedWeights
) -> list[str]:
    """Map `prefix`-stripped EVA ViT keys; returns the keys it does not know."""
    simple = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    block_parts = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    block_pattern = re.compile(r"blocks\.(\d+)\.(.+)")
    unknown, qv_biases = [], {}
    for key, tensor in state_dict.items():
        name = key[len(prefix) :]
        if name in simple:
            mapped.put(f"vision_model.{simple[name]}", tensor, key)
            continue
        if re.fullmatch(r"(?:norm|fc_norm|head)\.(?:weight|bias)", name):
            mapped.dropped[key] = DROP_EVA_HEAD
            continue
        match = block_pattern.fullmatch(name)
        if match is None:
            unknown.append(key)
            continue
        index, rest = int(match.group(1)), match.group(2)
        if num_layers is not None and index >= num_layers:
            mapped.dropped[key] = DROP_EXTRA_VIT_BLOCK.format(num_layers=num_layers)
            continue
        target = f"vision_model.encoder.layers.{index}."
        if rest in ("attn.q_bias", "attn.v_bias"):
            qv_biases.setdefault(index, {})[rest.removeprefix("attn.")[0]] = key  # "q" or "v"
            continue
        module, _, param = rest.rpartition(".")
        if module in block_parts and param in ("weight", "bias") and rest != "attn.qkv.bias":
            mapped.put(target + f"{block_parts[module]}.{param}", tensor, key)
        else:
            unknown.append(key)
    for index, keys in sorted(qv_biases.items()):
        if set(keys) != {"q", "v"}:
            have = next(iter(keys.values()))
            missing = have.replace("q_bias", "v_bias") if "q" in keys else have.replace("v_bias", "q_bias")
            raise KeyError(f"{have} has no partner {missing}: EVA's qkv bias needs both q_bias and v_bias")
        q_bias, v_bias = state_dict[keys["q"]], state_dict[keys["v"]]
        # EVA has no key bias: the fused bias is (q_bias, 0, v_bias), exactly as LAVIS builds it per call.
        mapped.put(
            f"vision_model.encoder.layers.{index}.self_attn.qkv.bias",
            torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),
            keys["q"],
            keys["v"],
        )
    return unknown


def map_eva_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_layers: int | None = None
) -> MappedWeights:
    """Map LAVIS `eva_vit_g.pth` (EVA ViT-g keys without prefix) onto `vision_model.*`.

    Args:
        state_dict: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.*` tensors.
        num_layers: blocks `>= num_layers` are dropped (BLIP-2 keeps 39 of EVA-CLIP-g's 40); `None` keeps all.
    """
    mapped = MappedWeights()
    unknown = _map_eva_vit(state_dict, "", num_layers, mapped)
    if unknown:
        raise UnknownKeysError("EVA ViT state dict", unknown)
    return mapped


def convert_eva_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_layers: int | None = None
) -> dict[str, torch.Tensor]:
    """[`map_eva_vit_state_dict`] returning only the tensors, for `model.load_state_dict(..., strict=False)`."""
    return map_eva_vit_state_dict(state_dict, num_layers).tensors


# --------------------------------------------------------------------------------------------------
# EVA-CLIP text tower (eva_clip_psz14.pt `text.*`, upstream `text_encoder.*`) -> CLIPTextModelWithProjection


def _map_eva_clip_text(
    state_dict: Mapping[str, torch.Tensor], prefix: str, mapped: MappedWeights
) -> list[str]:
    layer_parts = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    out = "text_encoder.text_model."
    unknown = []
    for key, tensor in state_dict.items():
        name = key[len(prefix) :]
        if name == "token_embedding.weight":
            mapped.put(out + "embeddings.token_embedding.weight", tensor, key)
        elif name == "positional_embedding":
            mapped.put(out + "embeddings.position_embedding.weight", tensor, key)
        elif name in ("ln_final.weight", "ln_final.bias"):
            mapped.put(out + "final_layer_norm." + name.rpartition(".")[2], tensor, key)
        elif name == "text_projection":
            # EVA-CLIP computes x @ P with P [width, embed_dim]; an nn.Linear stores P transposed.
            mapped.put("text_encoder.text_projection.weight", tensor.t().contiguous(), key)
        elif name == "logit_scale":
            mapped.dropped[key] = DROP_LOGIT_SCALE
        elif name == "attn_mask":
            mapped.dropped[key] = DROP_ATTN_MASK
        elif match := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", name):
            index, module, param = match.groups()
            layer = f"{out}encoder.layers.{index}."
            if module in layer_parts:
                mapped.put(layer + f"{layer_parts[module]}.{param}", tensor, key)
            else:
                unknown.append(key)
        elif match := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name):
            index, param = match.groups()
            # nn.MultiheadAttention stacks the q, k and v projections along dim 0, in that order.
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                mapped.put(f"{out}encoder.layers.{index}.self_attn.{proj}.{param}", part.contiguous(), key)
        else:
            unknown.append(key)
    return unknown


def map_eva_clip_text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> MappedWeights:
    """Map the EVA-CLIP text tower onto `text_encoder.*` (a `CLIPTextModelWithProjection`, docs/upstream/model.md §10).

    Accepts the whole `eva_clip_psz14.pt` (`text.*` is mapped; `visual.*` and `logit_scale` are dropped) or
    the bare `TextTransformer` keys. `in_proj_weight`/`in_proj_bias` are split into q/k/v and
    `text_projection` [width, embed_dim] is transposed into a Linear weight.
    """
    mapped = MappedWeights()
    text = {}
    for key, tensor in state_dict.items():
        if key.startswith("visual."):
            mapped.dropped[key] = DROP_CLIP_VISION
        elif key == "logit_scale":
            mapped.dropped[key] = DROP_LOGIT_SCALE
        else:
            text[key] = tensor
    prefixed = any(key.startswith("text.") for key in text)
    unknown = [key for key in text if prefixed and not key.startswith("text.")]
    unknown += _map_eva_clip_text(
        {k: v for k, v in text.items() if k not in unknown}, "text." if prefixed else "", mapped
    )
    if unknown:
        raise UnknownKeysError("EVA-CLIP text state dict", unknown)
    return mapped


def convert_eva_clip_text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[`map_eva_clip_text_state_dict`] returning only the tensors (names under `text_encoder.`)."""
    return map_eva_clip_text_state_dict(state_dict).tensors


# --------------------------------------------------------------------------------------------------
# Flan-T5


def tied_embedding_aliases(prefix: str = "") -> tuple[str, ...]:
    """The T5 keys that alias `shared.weight` (`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`)."""
    return tuple(prefix + suffix for suffix in T5_ALIAS_SUFFIXES)


def check_alias_equal(alias_key: str, alias: torch.Tensor, shared_key: str, shared: torch.Tensor) -> None:
    """Raise unless `alias` equals `shared` once both are in the alias's dtype (values are not checked on meta)."""
    if alias.shape != shared.shape:
        raise ValueError(
            f"{alias_key} has shape {list(alias.shape)} but {shared_key} has {list(shared.shape)}"
        )
    if alias.is_meta or shared.is_meta:
        return
    if not torch.equal(alias, shared.to(alias.dtype)):
        raise ValueError(
            f"{alias_key} differs from {shared_key} (after casting to {alias.dtype}); it was expected to be a "
            "tied copy. Check that the Flan-T5 weights are the ones the checkpoint was trained with."
        )


def map_t5_state_dict(state_dict: Mapping[str, torch.Tensor]) -> MappedWeights:
    """Map a `T5ForConditionalGeneration` state dict onto `language_model.*`.

    The tied `encoder/decoder.embed_tokens.weight` aliases, when present, are checked equal to
    `shared.weight` and dropped (the model re-ties them). A file that kept only an alias of the shared
    embedding (de-duplicated safetensors may keep either name) provides `shared.weight` through it.
    """
    mapped = MappedWeights()
    shared_key = next((key for key in ("shared.weight", *T5_ALIAS_SUFFIXES) if key in state_dict), None)
    unknown = []
    for key, tensor in state_dict.items():
        if key == shared_key:
            mapped.put("language_model.shared.weight", tensor, key)
        elif key in T5_ALIAS_SUFFIXES:
            check_alias_equal(key, tensor, shared_key, state_dict[shared_key])
            mapped.dropped[key] = DROP_T5_ALIAS
        elif _T5_KEY.fullmatch(key):
            mapped.put(f"language_model.{key}", tensor, key)
        else:
            unknown.append(key)
    if unknown:
        raise UnknownKeysError("T5 state dict", unknown)
    return mapped


def convert_t5_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[`map_t5_state_dict`] returning only the tensors."""
    return map_t5_state_dict(state_dict).tensors


# --------------------------------------------------------------------------------------------------
# The upstream DynReferT5 / LAVIS Blip2T5 namespace


def _map_qformer(key: str, tensor: torch.Tensor, mapped: MappedWeights) -> bool:
    """`Qformer.*` (LAVIS BERT with query FFN) -> `qformer.*` (HF Blip2QFormerModel)."""
    name = key[len("Qformer.") :]
    if name in ("bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"):
        mapped.put("qformer.layernorm." + name.rpartition(".")[2], tensor, key)
        return True
    if name == "bert.embeddings.position_ids":
        mapped.dropped[key] = DROP_POSITION_IDS
        return True
    if re.fullmatch(r"bert\.embeddings\.(?:word|position)_embeddings\.weight|cls\..+", name):
        mapped.dropped[key] = DROP_QFORMER_TEXT
        return True
    match = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
    if match is None:
        return False
    index, module, param = match.groups()
    if re.fullmatch(r"intermediate\.dense|output\.(?:dense|LayerNorm)", module):
        mapped.dropped[key] = DROP_QFORMER_TEXT
        return True
    for pattern in _QFORMER_LAYER_PARTS:
        if re.fullmatch(pattern, module):
            # HF renames the BERT `self` attention module to `attention`; everything else is unchanged.
            module = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", module)
            mapped.put(f"qformer.encoder.layer.{index}.{module}.{param}", tensor, key)
            return True
    return False


_UPSTREAM_GROUPS = (
    "visual_encoder",
    "ln_vision",
    "query_tokens",
    "Qformer",
    "t5_proj",
    "t5_model",
    "text_encoder",
    "dynrefer",
)
_BLIP2_GROUPS = ("visual_encoder", "ln_vision", "query_tokens", "Qformer", "t5_proj", "t5_model")


def _map_lavis_namespace(
    state_dict: Mapping[str, torch.Tensor],
    groups: tuple[str, ...],
    source: str,
    num_vision_layers: int | None,
) -> MappedWeights:
    mapped = MappedWeights()
    unknown: list[str] = []
    vision, text = {}, {}

    def ln_vision(key, tensor):
        if key not in ("ln_vision.weight", "ln_vision.bias"):
            return False
        mapped.put("vision_model.post_layernorm." + key.rpartition(".")[2], tensor, key)
        return True

    def query_tokens(key, tensor):
        if key != "query_tokens":
            return False
        mapped.put("query_tokens", tensor, key)
        return True

    def t5_proj(key, tensor):
        if key not in ("t5_proj.weight", "t5_proj.bias"):
            return False
        mapped.put("language_projection." + key.rpartition(".")[2], tensor, key)
        return True

    def t5_model(key, tensor):
        name = key[len("t5_model.") :]
        if name in T5_ALIAS_SUFFIXES:
            mapped.dropped[key] = DROP_T5_ALIAS  # checked against the shared embedding by the full conversion
            return True
        if not _T5_KEY.fullmatch(name):
            return False
        mapped.put(f"language_model.{name}", tensor, key)
        return True

    def collect(bucket):
        def handler(key, tensor):
            bucket[key] = tensor
            return True

        return handler

    handlers: dict[str, Callable[[str, torch.Tensor], bool]] = {
        "visual_encoder": collect(vision),
        "ln_vision": ln_vision,
        "query_tokens": query_tokens,
        "Qformer": lambda key, tensor: _map_qformer(key, tensor, mapped),
        "t5_proj": t5_proj,
        "t5_model": t5_model,
        "text_encoder": collect(text),
    }
    for key, tensor in state_dict.items():
        group = key.split(".", 1)[0]
        if "dynrefer" in groups and _DYNREFER_IDENTITY.fullmatch(key):
            mapped.put(key, tensor, key)
        elif group in groups and group in handlers and handlers[group](key, tensor):
            continue
        else:
            unknown.append(key)
    unknown += _map_eva_vit(vision, "visual_encoder.", num_vision_layers, mapped)
    unknown += _map_eva_clip_text(text, "text_encoder.", mapped)
    if unknown:
        raise UnknownKeysError(source, unknown)
    return mapped


def map_upstream_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_vision_layers: int | None = None
) -> MappedWeights:
    """Map an upstream `DynReferT5` state dict (any subset of its keys) onto this library's names.

    The released checkpoints hold the trained part (`Qformer.*`, `t5_proj.*`, `cvem_*`, `cem_memory`,
    `tag_*`, `attr_*`) plus `Qformer.bert.embeddings.position_ids` and two tied T5 embedding aliases (both
    dropped); the frozen parts of a full upstream state dict (`visual_encoder.*`, `ln_vision.*`,
    `query_tokens`, `t5_model.*`, `text_encoder.*`, the three tables) are mapped too.
    """
    return _map_lavis_namespace(state_dict, _UPSTREAM_GROUPS, "DynRefer state dict", num_vision_layers)


def convert_upstream_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an upstream DynRefer state dict for `DynReferForRegionCaptioning.load_state_dict(..., strict=False)`.

    Maps whatever subset it is given (e.g. only the `cvem_align.*` keys) and raises `UnknownKeysError` on
    keys it does not know; dropped keys (position ids, tied T5 aliases) are left out. Completeness is
    checked by the full conversion ([`convert_checkpoints`]).
    """
    return map_upstream_state_dict(state_dict).tensors


def map_blip2_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_vision_layers: int | None = None
) -> MappedWeights:
    """Map a LAVIS BLIP-2 Flan-T5 checkpoint (`Blip2T5` names) onto this library's names.

    Handles `visual_encoder.*`, `ln_vision.*` (-> `vision_model.post_layernorm`), `query_tokens`,
    `Qformer.*` (text-side parts of a stage-1 Q-Former are dropped), `t5_proj.*` and `t5_model.*`.
    """
    return _map_lavis_namespace(state_dict, _BLIP2_GROUPS, "BLIP-2 state dict", num_vision_layers)


def convert_blip2_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[`map_blip2_state_dict`] returning only the tensors."""
    return map_blip2_state_dict(state_dict).tensors
