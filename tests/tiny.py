"""Tiny models, tokenizers and vocabularies built in the tests (no Hub access)."""

from __future__ import annotations

from functools import lru_cache

from dynrefer_hf.shapes import train_t5_style_tokenizer

TINY_CORPUS = (
    "a red striped circle left of a blue square",
    "the man riding a horse on the beach",
    "a white dog lying on green grass",
    "two people standing next to a parked car",
    "a small black cat sitting on a wooden table",
    "person,dog,grass|",
    "horse,beach,man|",
    "car,tree,road,sky|",
    "|",
)


@lru_cache(maxsize=1)
def _tiny_tokenizer():
    return train_t5_style_tokenizer(TINY_CORPUS * 4, vocab_size=120)


def make_tiny_tokenizer():
    """A T5-style tokenizer (pad 0, eos 1, unk 2) of about 100 pieces; a fresh copy per call."""
    import copy

    return copy.deepcopy(_tiny_tokenizer())


TINY_TAGS = ("person", "dog", "grass", "horse", "beach", "man", "car", "tree", "road", "sky", "cat", "table")
TINY_ATTRIBUTES = {"color:red": ("the red", "the  is red"), "color:blue": ("the blue",), "size:small": ("the small", "the  is small", "the tiny")}
TINY_CLASSES = ("person", "dog", "car", "cat", "horse")


def make_tiny_config(**overrides):
    """A DynReferConfig small enough for CPU tests.

    2-layer ViT of width 64 on 56 px images (patch 14 -> 4x4 RoI maps), 2-layer Q-Former (width 32, 4 queries),
    2+2-layer T5 over the tiny tokenizer's vocabulary, 2-layer label heads of width 32, 12 tags, 3 attribute
    groups (6 prompts), 5 classes, text embeddings of width 32. Keyword arguments override any field
    (sub-configs as dicts or config objects).
    """
    from dynrefer_hf.configuration_dynrefer import DynReferConfig
    from dynrefer_hf.prompts import ControlPromptTokens

    vocab_size = len(make_tiny_tokenizer())
    fields = {
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 56,
            "patch_size": 14,
            "initializer_range": 0.02,
        },
        "qformer_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "cross_attention_frequency": 2,
        },
        "text_config": {
            "model_type": "t5",
            "vocab_size": vocab_size,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu",
            "tie_word_embeddings": False,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
        "num_query_tokens": 4,
        "head_hidden_size": 32,
        "head_num_attention_heads": 4,
        "head_intermediate_size": 64,
        "text_embed_dim": 32,
        "tag_names": list(TINY_TAGS),
        "attribute_names": list(TINY_ATTRIBUTES),
        "attribute_group_sizes": [len(prompts) for prompts in TINY_ATTRIBUTES.values()],
        "attribute_prompts": [prompt for prompts in TINY_ATTRIBUTES.values() for prompt in prompts],
        "class_names": list(TINY_CLASSES),
        "class_prompts": [f"the {name}" for name in TINY_CLASSES],
    }
    fields.update(overrides)
    if "control_prompt_tokens" not in fields:  # the tags as the tiny tokenizer writes them in a control prompt
        fields["control_prompt_tokens"] = ControlPromptTokens.from_tokenizer(
            make_tiny_tokenizer(), fields["tag_names"], fields.get("max_text_length", 32)
        ).to_dict()
    return DynReferConfig(**fields)


def make_tiny_model(seed: int = 0, **overrides):
    """A randomly initialised tiny DynReferForRegionCaptioning (eval mode), reproducible from ``seed``, its
    label tables drawn from N(0, 1) as stand-ins for text-encoder embeddings."""
    import torch

    from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning

    torch.manual_seed(seed)
    model = DynReferForRegionCaptioning(make_tiny_config(**overrides)).eval()
    with torch.no_grad():  # distinct label embeddings (the model starts with zero tables until set_vocabulary)
        for table in (model.clip_embeds, model.att_embeds, model.ov_embeds):
            table.normal_(mean=0.0, std=1.0)
    return model


def make_varied_tiny_model(seed: int = 0, **overrides):
    """``make_tiny_model`` with every weight matrix redrawn from N(0, 9 / fan_in) and random label tables.

    At the default initialisation every region gets nearly the same tags, caption and scores; these
    wider weights and distinct tag/attribute/class embeddings make the outputs differ from region to
    region and from label to label, so tests can tell them apart.
    """
    import torch

    model = make_tiny_model(seed, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                fan_in = parameter.shape[-1]
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (3.0 / fan_in**0.5))
        for table in (model.clip_embeds, model.att_embeds, model.ov_embeds):
            table.copy_(torch.randn(table.shape, generator=generator))
    return model


def save_tiny_region_captioner(folder, seed: int = 0):
    """Save a varied tiny model and its processor (the tiny tokenizer, a matching image processor) to ``folder``.

    The folder loads with ``pipeline("region-captioning", model=folder)`` and ``dynrefer caption --model``.
    """
    from dynrefer_hf.image_processing_dynrefer import DynReferImageProcessor
    from dynrefer_hf.processing_dynrefer import DynReferProcessor

    model = make_varied_tiny_model(seed)
    image_size = model.config.vision_config.image_size
    model.save_pretrained(folder)
    image_processor = DynReferImageProcessor(size={"height": image_size, "width": image_size})
    DynReferProcessor(image_processor, make_tiny_tokenizer()).save_pretrained(folder)
    return folder


def make_tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer without merges: 256 bytes, the same 256 ending a word (``</w>``),
    then ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513), the highest ids as in OpenAI's vocabulary."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [char + "</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={piece: index for index, piece in enumerate(pieces)}, merges=[])


def save_tiny_sam(folder, seed: int = 0):
    """Save a randomly initialised tiny SAM (64-pixel input, 16-wide layers) and its processor to ``folder``:
    a segmenter for ``points=`` that loads like ``facebook/sam-vit-base`` (``segmentation.PointSegmenter``)."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(seed)
    config = SamConfig(
        vision_config={
            "hidden_size": 16,
            "output_channels": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "mlp_dim": 32,
            "global_attn_indexes": [0],
            "window_size": 4,
            "num_pos_feats": 8,
        },
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )
    SamModel(config).save_pretrained(folder)
    image_processor = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(image_processor).save_pretrained(folder)
    return folder
