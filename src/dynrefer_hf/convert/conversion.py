"""The full conversion: upstream DynRefer + BLIP-2 + EVA ViT-g + Flan-T5 + EVA-CLIP -> one HF model folder.

Upstream's effective weights (docs/upstream/checkpoint.md §3) are reproduced by applying the sources in upstream's
load order, later ones overwriting earlier ones: Flan-T5 (language model), EVA ViT-g (vision tower),
BLIP-2 (`ln_vision`, `query_tokens`, and a Q-Former / projection that DynRefer then replaces), DynRefer
(the trained part). The three label tables are encoded with the EVA-CLIP text tower.

Nothing is silently skipped: every source key is either used or listed as deliberately dropped with a
reason, every parameter and persistent buffer of the model is filled, and shapes must match; otherwise
[`ConversionError`] lists the offending keys.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..precision import record_dtypes
from .key_mapping import (
    DROP_T5_ALIAS,
    MappedWeights,
    check_alias_equal,
    map_blip2_state_dict,
    map_eva_clip_text_state_dict,
    map_eva_vit_state_dict,
    map_t5_state_dict,
    map_upstream_state_dict,
)
from .loading import load_checkpoint, load_folder_state_dict, read_run_config, resolve_pretrained_folder

__all__ = [
    "SOURCE_ORDER",
    "TEXT_TABLES",
    "ConversionError",
    "ConversionReport",
    "ConvertedModel",
    "assemble_weights",
    "build_text_encoder",
    "compute_text_tables",
    "convert_checkpoints",
    "load_upstream_state_dict",
    "model_weight_inventory",
    "released_config",
    "save_converted",
]

SHARED_EMBEDDING = "language_model.shared.weight"
# buffer -> the config field holding the strings encoded into it, in row order (docs/upstream/model.md §10).
TEXT_TABLES = {"clip_embeds": "tag_names", "att_embeds": "attribute_prompts", "ov_embeds": "class_prompts"}
TEXT_ENCODER_PREFIX = "text_encoder."

# Upstream's load order (docs/upstream/checkpoint.md §3): a later source overwrites what an earlier one set.
SOURCE_ORDER = ("flan_t5", "eva_vit", "blip2", "dynrefer", "eva_clip")
SOURCE_NAMES = {
    "flan_t5": "Flan-T5",
    "eva_vit": "EVA ViT-g (eva_vit_g.pth)",
    "blip2": "BLIP-2 (blip2_pretrained_flant5xl.pth)",
    "dynrefer": "DynRefer checkpoint",
    "eva_clip": "EVA-CLIP (eva_clip_psz14.pt)",
}


class ConversionError(ValueError):
    """The sources do not fill the model exactly; the message lists every offending key."""

    def __init__(self, problems: Mapping[str, Sequence[str]]):
        self.problems = {name: sorted(keys) for name, keys in problems.items() if keys}
        lines = []
        for name, keys in self.problems.items():
            shown = keys[:30] + ([f"... ({len(keys)} in all)"] if len(keys) > 30 else [])
            lines.append(f"{name} ({len(keys)}):\n  " + "\n  ".join(shown))
        super().__init__("conversion stopped:\n" + "\n".join(lines))


@dataclass
class ConversionReport:
    """What happened to every key.

    Attributes:
        consumed: per source, the keys that were used (written to the model or encoded into the tables).
        superseded: per source, used keys whose targets a later source overwrote (upstream load order).
        dropped: per source, deliberately unused keys -> reason.
        created: target keys written to the model folder (parameters and persistent buffers).
        computed: targets computed rather than copied (the text tables).
    """

    consumed: dict[str, list[str]] = field(default_factory=dict)
    superseded: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, dict[str, str]] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A plain-text table: per source, keys read / consumed / superseded / dropped; then targets."""
        rows = [f"{'source':<40} {'read':>7} {'consumed':>9} {'superseded':>11} {'dropped':>8}"]
        for name in self.consumed:
            consumed, dropped = len(self.consumed[name]), len(self.dropped.get(name, {}))
            superseded = len(self.superseded.get(name, []))
            rows.append(
                f"{SOURCE_NAMES.get(name, name):<40} {consumed + dropped:>7} {consumed:>9} {superseded:>11} {dropped:>8}"
            )
        rows.append(f"target keys created: {len(self.created)} (of which computed: {len(self.computed)})")
        return "\n".join(rows)


def model_weight_inventory(model: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every key `save_pretrained` writes: parameters and persistent buffers, tied aliases left out.

    Works on a model built on the meta device.
    """
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    state = model.state_dict()
    return {key: (tensor.shape, tensor.dtype) for key, tensor in state.items() if key in unique}


def _inventory_problems(
    weights: Mapping[str, torch.Tensor],
    inventory: Mapping[str, tuple[torch.Size, torch.dtype]],
    sources_of: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Keys the weights leave unfilled, keys the model lacks, and shape mismatches (naming each key's source)."""
    sources_of = sources_of or {}
    return {
        "missing (no source fills them)": [key for key in inventory if key not in weights],
        "unexpected (the model has no such key)": [key for key in weights if key not in inventory],
        "shape mismatch": [
            f"{key}: source {list(weights[key].shape)} from {sources_of.get(key, 'computed')}, model {list(shape)}"
            for key, (shape, _) in inventory.items()
            if key in weights and weights[key].shape != shape
        ],
    }


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Parameter names that share another parameter's tensor -> that parameter's (first) name."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first_name:
            aliases[name] = first_name[id(parameter)]
        else:
            first_name[id(parameter)] = name
    return aliases


def _map_source(name: str, state_dict: Mapping[str, torch.Tensor], num_vision_layers: int) -> MappedWeights:
    if name == "flan_t5":
        return map_t5_state_dict(state_dict)
    if name == "eva_vit":
        return map_eva_vit_state_dict(state_dict, num_layers=num_vision_layers)
    if name == "blip2":
        return map_blip2_state_dict(state_dict, num_vision_layers=num_vision_layers)
    if name == "dynrefer":
        return map_upstream_state_dict(state_dict, num_vision_layers=num_vision_layers)
    if name == "eva_clip":
        return map_eva_clip_text_state_dict(state_dict)
    raise ValueError(f"unknown source {name!r}; expected one of {SOURCE_ORDER}")


def _target_dtype(key: str, tensor: torch.Tensor, language_model_dtype: torch.dtype) -> torch.dtype:
    if not tensor.is_floating_point():
        return tensor.dtype
    # The LM in bf16 as upstream (or fp32); everything else fp32, including the ViT that LAVIS keeps in
    # fp16 (autocast reproduces that at run time, docs/upstream/model.md §2).
    return language_model_dtype if key.startswith("language_model.") else torch.float32


def assemble_weights(
    sources: Mapping[str, Mapping[str, torch.Tensor]],
    inventory: Mapping[str, tuple[torch.Size, torch.dtype]],
    *,
    num_vision_layers: int,
    trainable_modules: Sequence[str],
    language_model_dtype: torch.dtype = torch.bfloat16,
    tables: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map, merge and check the source state dicts against the model's `inventory`.

    Args:
        sources: source name (see `SOURCE_ORDER`) -> flat state dict in that source's own names.
        inventory: [`model_weight_inventory`] of the target model.
        num_vision_layers: ViT depth of the target (extra EVA blocks are dropped).
        trainable_modules: the model's trained top-level modules; the DynRefer checkpoint must fill all of
            them (LAVIS would silently keep random values for a missing one, docs/upstream/checkpoint.md §2).
        language_model_dtype: dtype of `language_model.*` (bf16 as upstream, or fp32).
        tables: the computed `clip_embeds` / `att_embeds` / `ov_embeds` (meta tensors for a dry run).

    Returns:
        The state dict to save (target names, target dtypes) and the [`ConversionReport`].

    Raises:
        ConversionError: missing, unexpected or mis-shaped targets, an incomplete DynRefer checkpoint,
            or T5 embedding aliases that differ from the shared embedding.
    """
    unknown_sources = set(sources) - set(SOURCE_ORDER)
    if unknown_sources:
        raise ValueError(f"unknown sources {sorted(unknown_sources)}; expected names from {SOURCE_ORDER}")
    report = ConversionReport()
    merged: dict[str, torch.Tensor] = {}
    provider: dict[str, tuple[str, tuple[str, ...]]] = {}
    keep_text_encoder = any(key.startswith(TEXT_ENCODER_PREFIX) for key in inventory)
    problems: dict[str, list[str]] = {}
    for name in SOURCE_ORDER:
        if name not in sources:
            continue
        mapped = _map_source(name, sources[name], num_vision_layers)
        report.consumed[name] = sorted(mapped.consumed)
        report.dropped[name] = dict(sorted(mapped.dropped.items()))
        report.superseded.setdefault(name, [])
        for target, tensor in mapped.tensors.items():
            if target.startswith(TEXT_ENCODER_PREFIX) and not keep_text_encoder:
                continue  # used for the tables only
            if target in provider:
                earlier, keys = provider[target]
                report.superseded[earlier].extend(keys)
            merged[target] = tensor
            provider[target] = (name, mapped.sources[target])
        if name == "dynrefer":
            trained = [key for key in inventory if key.split(".", 1)[0] in trainable_modules]
            problems["trained keys missing from the DynRefer checkpoint"] = [
                key for key in trained if key not in mapped.tensors
            ]
    for name in report.superseded:
        report.superseded[name] = sorted(report.superseded[name])

    for name, table in (tables or {}).items():
        merged[name] = table
        report.computed.append(name)

    if SHARED_EMBEDDING in merged:
        for name in sources:
            for key, reason in report.dropped.get(name, {}).items():
                if reason == DROP_T5_ALIAS and key.startswith("t5_model."):
                    check_alias_equal(key, sources[name][key], SHARED_EMBEDDING, merged[SHARED_EMBEDDING])

    sources_of = {key: name for key, (name, _) in provider.items()}
    problems.update(_inventory_problems(merged, inventory, sources_of))
    if any(problems.values()):
        raise ConversionError(problems)

    state = {
        key: merged[key].to(_target_dtype(key, merged[key], language_model_dtype)).contiguous()
        for key in inventory
    }
    report.created = sorted(state)
    return state, report


# --------------------------------------------------------------------------------------------------
# Loading the sources and running the whole conversion

StateDictSource = str | os.PathLike | Mapping[str, torch.Tensor]


def _as_state_dict(source: StateDictSource) -> Mapping[str, torch.Tensor]:
    return source if isinstance(source, Mapping) else load_checkpoint(source)


def build_text_encoder(eva_clip_state_dict: Mapping[str, torch.Tensor], text_encoder_config):
    """An fp32 `CLIPTextModelWithProjection` holding the EVA-CLIP text tower (every weight filled)."""
    from transformers import CLIPTextModelWithProjection

    mapped = map_eva_clip_text_state_dict(eva_clip_state_dict)
    weights = {key[len(TEXT_ENCODER_PREFIX) :]: tensor.float() for key, tensor in mapped.tensors.items()}
    text_encoder = CLIPTextModelWithProjection(text_encoder_config)
    problems = _inventory_problems(
        weights, model_weight_inventory(text_encoder), dict.fromkeys(weights, "eva_clip")
    )
    if any(problems.values()):
        raise ConversionError({f"text tower: {name}": keys for name, keys in problems.items()})
    text_encoder.load_state_dict(weights, strict=True)
    return text_encoder.eval()


def compute_text_tables(model, tokenizer, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """`clip_embeds`, `att_embeds`, `ov_embeds` of `model.config`'s vocabularies with the model's text encoder.

    Rows are the exact strings upstream encodes: the raw tag names, the OVAD attribute prompts and the
    class prompts (docs/upstream/model.md §10).
    """
    return {
        name: model.encode_texts(getattr(model.config, field), tokenizer, batch_size)
        for name, field in TEXT_TABLES.items()
    }


@dataclass
class ConvertedModel:
    """The result of [`convert_checkpoints`]: ready to be saved with [`save_converted`]."""

    config: object
    state_dict: dict[str, torch.Tensor]
    report: ConversionReport
    tokenizer: object
    clip_tokenizer: object


# run-config field of the DynRefer checkpoint (upstream names) -> DynReferConfig field it must equal
RUN_CONFIG_FIELDS = {
    "num_views": "num_views",
    "num_query_token": "num_query_tokens",
    "max_txt_len": "max_text_length",
}


def check_run_config(run_config: Mapping, config) -> None:
    """Refuse a checkpoint trained with other architecture settings than `config` (fields it records)."""
    model = run_config.get("model", {}) if isinstance(run_config.get("model"), Mapping) else {}
    different = [
        f"{name}: checkpoint {model[name]!r}, config {getattr(config, field)!r}"
        for name, field in RUN_CONFIG_FIELDS.items()
        if name in model and model[name] != getattr(config, field)
    ]
    if different:
        raise ConversionError({"the DynRefer checkpoint was trained with other settings": different})


def released_config(flan_t5_folder: str | os.PathLike):
    """The released model's `DynReferConfig` with the language model's config read from `flan_t5_folder`.

    LAVIS runs Flan-T5 with exact GELU instead of its `gelu_new` (docs/upstream/model.md §11); that is forced here.
    """
    from transformers import AutoConfig

    from ..configuration_dynrefer import DynReferConfig

    text_config = AutoConfig.from_pretrained(flan_t5_folder, dense_act_fn="gelu")
    config = DynReferConfig(text_config=text_config.to_dict())
    if getattr(config.text_config, "dense_act_fn", "gelu") != "gelu":
        raise ConversionError(
            {"language model activation is not exact GELU": [config.text_config.dense_act_fn]}
        )
    return config


def _meta_model(config):
    from ..modeling_dynrefer import DynReferForRegionCaptioning

    with torch.device("meta"):
        return DynReferForRegionCaptioning(config)


def load_upstream_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> MappedWeights:
    """Load an upstream `DynReferT5` state dict (upstream key names) into `model`, checking it first.

    Keys are renamed by [`map_upstream_state_dict`] (unknown keys raise `UnknownKeysError`). The T5
    embedding aliases (`t5_model.{encoder,decoder}.embed_tokens.weight`) are not dropped blindly: each
    must equal the shared embedding, the state dict's own `t5_model.shared.weight` or else the model's
    (`ValueError` otherwise: the checkpoint was trained with other Flan-T5 weights). Shapes must match,
    and with `strict=True` every parameter and persistent buffer of the model must be filled
    (`ConversionError` lists the missing, unexpected and misshaped keys). `strict=False` loads any subset,
    e.g. the released checkpoints' trained part onto a model holding the frozen parts.

    Returns the mapping (target tensors, dropped keys and why, sources of every target).
    """
    mapped = map_upstream_state_dict(state_dict, num_vision_layers=model.config.vision_config.num_hidden_layers)
    problems = _inventory_problems(
        mapped.tensors,
        model_weight_inventory(model),
        {target: ", ".join(keys) for target, keys in mapped.sources.items()},
    )
    if not strict:
        problems.pop("missing (no source fills them)")
    if any(problems.values()):
        raise ConversionError(problems)
    shared = mapped.tensors.get(SHARED_EMBEDDING)
    if shared is None:
        shared = model.get_parameter(SHARED_EMBEDDING).detach()
    for key, reason in mapped.dropped.items():
        if reason == DROP_T5_ALIAS:
            check_alias_equal(key, state_dict[key], SHARED_EMBEDDING, shared)
    model.load_state_dict(mapped.tensors, strict=False)
    return mapped


def convert_checkpoints(
    dynrefer: StateDictSource,
    blip2: StateDictSource,
    eva_vit: StateDictSource,
    flan_t5: str | os.PathLike,
    eva_clip: StateDictSource,
    clip_tokenizer,
    *,
    config=None,
    text_encoder_config=None,
    keep_text_encoder: bool = False,
    language_model_dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> ConvertedModel:
    """Convert the released DynRefer checkpoint and its frozen parts into one `DynReferForRegionCaptioning`.

    Args:
        dynrefer: `vg1.2_5e.pth` or `refcocog_ft.pth` (path or loaded state dict).
        blip2: LAVIS `blip2_pretrained_flant5xl.pth` (gives `ln_vision` and `query_tokens`).
        eva_vit: LAVIS `eva_vit_g.pth` (the ViT).
        flan_t5: `google/flan-t5-xl` folder or Hub id (weights, config, tokenizer).
        eva_clip: BAAI `eva_clip_psz14.pt` (the text tower that encodes the label tables).
        clip_tokenizer: a CLIP BPE tokenizer (folder, Hub id such as `openai/clip-vit-large-patch14`, or an
            instance).
        config: a `DynReferConfig` to convert into (default: the released model's, with Flan-T5's config
            from `flan_t5` and LAVIS's exact-GELU override).
        text_encoder_config: the text tower's `CLIPTextConfig` (default `EVA_CLIP_TEXT_CONFIG`; or
            `config.text_encoder_config` when set).
        keep_text_encoder: also store the text tower (so vocabularies can be changed later).
        language_model_dtype: `torch.bfloat16` (upstream) or `torch.float32`.
        batch_size: texts per text-tower forward pass (64 as upstream).
        device: where the text tower encodes the tables (fp32 on any device; a GPU makes it seconds).
    """
    from transformers import AutoTokenizer, CLIPTextConfig

    from ..configuration_dynrefer import EVA_CLIP_TEXT_CONFIG
    from ..prompts import ControlPromptTokens

    if language_model_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(
            f"language_model_dtype must be torch.bfloat16 or torch.float32, got {language_model_dtype}"
        )
    t5_folder = resolve_pretrained_folder(flan_t5)
    tokenizer = AutoTokenizer.from_pretrained(t5_folder)
    if isinstance(clip_tokenizer, (str, os.PathLike)):
        clip_tokenizer = AutoTokenizer.from_pretrained(clip_tokenizer)
    token_ids = {
        "bos_token_id": clip_tokenizer.bos_token_id,
        "eos_token_id": clip_tokenizer.eos_token_id,
        "pad_token_id": clip_tokenizer.pad_token_id,
    }
    if text_encoder_config is None:
        text_encoder_config = getattr(config, "text_encoder_config", None)
    if text_encoder_config is None:
        text_encoder_config = CLIPTextConfig(**EVA_CLIP_TEXT_CONFIG, **token_ids)
    elif isinstance(text_encoder_config, Mapping):
        text_encoder_config = CLIPTextConfig(**{**token_ids, **text_encoder_config})
    if text_encoder_config.eos_token_id != clip_tokenizer.eos_token_id:
        raise ConversionError(
            {
                "the CLIP tokenizer's end-of-text id differs from the text tower's eos_token_id (pooling "
                "would read the wrong token)": [
                    f"{clip_tokenizer.eos_token_id} != {text_encoder_config.eos_token_id}"
                ]
            }
        )
    config = released_config(t5_folder) if config is None else copy.deepcopy(config)
    config.text_encoder_config = text_encoder_config if keep_text_encoder else None
    # the tags as Flan-T5's tokenizer writes them in a control prompt, for `generate` (docs/model.md)
    config.control_prompt_tokens = ControlPromptTokens.from_tokenizer(
        tokenizer, config.tag_names, config.max_text_length
    ).to_dict()

    if not isinstance(dynrefer, Mapping):
        check_run_config(read_run_config(dynrefer), config)
    sources = {
        # cast while reading: Flan-T5-XL is 10.6 GiB in fp32, 5.3 GiB in bf16
        "flan_t5": load_folder_state_dict(t5_folder, dtype=language_model_dtype),
        "eva_vit": _as_state_dict(eva_vit),
        "blip2": _as_state_dict(blip2),
        "dynrefer": _as_state_dict(dynrefer),
        "eva_clip": _as_state_dict(eva_clip),
    }
    inventory = model_weight_inventory(_meta_model(config))
    # Check every key first with shape-only stand-ins for the tables, then spend the time to encode them.
    placeholders = {name: torch.empty(inventory[name][0], device="meta") for name in TEXT_TABLES}
    state_dict, report = assemble_weights(
        sources,
        inventory,
        num_vision_layers=config.vision_config.num_hidden_layers,
        trainable_modules=config.trainable_modules,
        language_model_dtype=language_model_dtype,
        tables=placeholders,
    )
    table_model = _meta_model(copy.deepcopy(config))
    table_model.attach_text_encoder(build_text_encoder(sources["eva_clip"], text_encoder_config).to(device))
    for name, table in compute_text_tables(table_model, clip_tokenizer, batch_size).items():
        if table.shape != placeholders[name].shape:
            raise ConversionError({"text table shape mismatch": [f"{name}: {list(table.shape)}"]})
        state_dict[name] = table.to(device="cpu", dtype=torch.float32)
    return ConvertedModel(config, state_dict, report, tokenizer, clip_tokenizer)


def save_converted(
    converted: ConvertedModel,
    output_dir: str | os.PathLike,
    *,
    repo_id: str = "callsys/dynrefer",
    checkpoint_name: str = "vg1.2_5e",
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write the converted model as a Hub-ready folder.

    Contents: sharded safetensors and `config.json` / `generation_config.json` (`save_pretrained`), the
    processor and Flan-T5 tokenizer files, `clip_tokenizer/` when the text tower is kept, and `README.md`
    (the model card).
    """
    from ..image_processing_dynrefer import DynReferImageProcessor
    from ..processing_dynrefer import DynReferProcessor
    from .model_card import render_model_card

    output_dir = Path(output_dir)
    config = converted.config
    model = _meta_model(config)
    # Tied parameters (T5's embed_tokens aliases of `shared`) get the same tensor as their source; assign=True
    # adopts the converted tensors instead of copying them into freshly allocated ones.
    weights = dict(converted.state_dict)
    weights.update({alias: weights[source] for alias, source in _tied_aliases(model).items()})
    model.load_state_dict(weights, strict=True, assign=True)
    record_dtypes(model)  # config.json says Flan-T5 is bf16, so that dtype="auto" loads it so
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)

    image_size = config.vision_config.image_size
    image_processor = DynReferImageProcessor(
        size={"height": image_size, "width": image_size}, num_views=config.num_views
    )
    processor = DynReferProcessor(
        image_processor=image_processor, tokenizer=converted.tokenizer, max_text_length=config.max_text_length
    )
    processor.save_pretrained(output_dir)
    if config.text_encoder_config is not None:
        converted.clip_tokenizer.save_pretrained(output_dir / "clip_tokenizer")

    language_model_dtype = str(converted.state_dict["language_model.shared.weight"].dtype).removeprefix(
        "torch."
    )
    card = render_model_card(
        repo_id=repo_id,
        checkpoint_name=checkpoint_name,
        language_model_dtype=language_model_dtype,
        report_summary=converted.report.summary(),
        has_text_encoder=config.text_encoder_config is not None,
    )
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    return output_dir
