"""Synthetic upstream checkpoints: upstream's exact key names, shapes from a `DynReferConfig` (docs/upstream/checkpoint.md §2, §4).

Used by tests/test_convert.py (tiny sizes) and benchmarks/bench_convert.py (the released sizes).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from tiny import make_tiny_tokenizer


def _linear(prefix, out_features, in_features, shapes):
    shapes[f"{prefix}.weight"] = (out_features, in_features)
    shapes[f"{prefix}.bias"] = (out_features,)


def _norm(prefix, width, shapes):
    shapes[f"{prefix}.weight"] = (width,)
    shapes[f"{prefix}.bias"] = (width,)


def eva_vit_layout(vision, num_blocks):
    width, patch = vision.hidden_size, vision.patch_size
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, (vision.image_size // patch) ** 2 + 1, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
    }
    for i in range(num_blocks):
        block = f"blocks.{i}"
        _norm(f"{block}.norm1", width, shapes)
        shapes[f"{block}.attn.qkv.weight"] = (3 * width, width)
        shapes[f"{block}.attn.q_bias"] = (width,)
        shapes[f"{block}.attn.v_bias"] = (width,)
        _linear(f"{block}.attn.proj", width, width, shapes)
        _norm(f"{block}.norm2", width, shapes)
        _linear(f"{block}.mlp.fc1", vision.intermediate_size, width, shapes)
        _linear(f"{block}.mlp.fc2", width, vision.intermediate_size, shapes)
    return shapes


def qformer_layout(qformer):
    hidden, inter = qformer.hidden_size, qformer.intermediate_size
    shapes = {"Qformer.bert.embeddings.position_ids": (1, qformer.max_position_embeddings)}
    _norm("Qformer.bert.embeddings.LayerNorm", hidden, shapes)
    for i in range(qformer.num_hidden_layers):
        layer = f"Qformer.bert.encoder.layer.{i}"
        for block, kv_width in [("attention", hidden)] + (
            [("crossattention", qformer.encoder_hidden_size)]
            if i % qformer.cross_attention_frequency == 0
            else []
        ):
            _linear(f"{layer}.{block}.self.query", hidden, hidden, shapes)
            _linear(f"{layer}.{block}.self.key", hidden, kv_width, shapes)
            _linear(f"{layer}.{block}.self.value", hidden, kv_width, shapes)
            _linear(f"{layer}.{block}.output.dense", hidden, hidden, shapes)
            _norm(f"{layer}.{block}.output.LayerNorm", hidden, shapes)
        _linear(f"{layer}.intermediate_query.dense", inter, hidden, shapes)
        _linear(f"{layer}.output_query.dense", hidden, inter, shapes)
        _norm(f"{layer}.output_query.LayerNorm", hidden, shapes)
    return shapes


def flan_t5_layout(text):
    """A Flan-T5 `model.safetensors` (HF names, untied `lm_head`, no embed_tokens aliases; docs/upstream/checkpoint.md §4)."""
    d, inner, ff = text.d_model, text.num_heads * text.d_kv, text.d_ff
    shapes = {"shared.weight": (text.vocab_size, d), "lm_head.weight": (text.vocab_size, d)}
    for stack, layers in (("encoder", text.num_layers), ("decoder", text.num_decoder_layers)):
        attentions = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
        for i in range(layers):
            block = f"{stack}.block.{i}.layer"
            for index, attention in enumerate(attentions):
                for proj in ("q", "k", "v"):
                    shapes[f"{block}.{index}.{attention}.{proj}.weight"] = (inner, d)
                shapes[f"{block}.{index}.{attention}.o.weight"] = (d, inner)
                shapes[f"{block}.{index}.layer_norm.weight"] = (d,)
            ffn = len(attentions)
            shapes[f"{block}.{ffn}.DenseReluDense.wi_0.weight"] = (ff, d)
            shapes[f"{block}.{ffn}.DenseReluDense.wi_1.weight"] = (ff, d)
            shapes[f"{block}.{ffn}.DenseReluDense.wo.weight"] = (d, ff)
            shapes[f"{block}.{ffn}.layer_norm.weight"] = (d,)
        shapes[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            text.relative_attention_num_buckets,
            text.num_heads,
        )
        shapes[f"{stack}.final_layer_norm.weight"] = (d,)
    return shapes


def t5_alias_layout(text):
    return {
        f"t5_model.{part}.embed_tokens.weight": (text.vocab_size, text.d_model)
        for part in ("encoder", "decoder")
    }


def dynrefer_layout(config):
    """The released DynRefer file's `model` entry (docs/upstream/checkpoint.md §2)."""
    width, hidden = config.vision_config.hidden_size, config.qformer_config.hidden_size
    lm, head, inter = config.text_config.d_model, config.head_hidden_size, config.head_intermediate_size
    shapes = qformer_layout(config.qformer_config)
    _linear("t5_proj", lm, hidden, shapes)
    shapes["cvem_align.offset_mask_dw.weight"] = (
        width,
        2,
        config.align_dw_kernel_size,
        config.align_dw_kernel_size,
    )
    shapes["cvem_align.offset_mask_dw.bias"] = (width,)
    _linear(
        "cvem_align.offset_mask",
        math.ceil(config.align_group * config.align_kernel_size**2 * 3 / 8) * 8,
        width,
        shapes,
    )
    _linear("cvem_align.value_proj", width, width, shapes)
    _linear("cvem_align.output_proj", width, width, shapes)
    _linear("cvem_mlp.0", width, config.num_views * width, shapes)
    _linear("cvem_mlp.2", width, width, shapes)
    shapes["cem_memory"] = (lm,)
    for name in ("tag", "attr"):
        for i in range(config.head_num_layers):
            layer = f"{name}_head.encoder.layer.{i}"
            for proj in ("query", "key", "value"):
                _linear(f"{layer}.crossattention.self.{proj}", head, head, shapes)
            _linear(f"{layer}.crossattention.output.dense", head, head, shapes)
            _norm(f"{layer}.crossattention.output.LayerNorm", head, shapes)
            _linear(f"{layer}.intermediate.dense", inter, head, shapes)
            _linear(f"{layer}.output.dense", head, inter, shapes)
            _norm(f"{layer}.output.LayerNorm", head, shapes)
        _linear(f"{name}_vision_proj", head, hidden, shapes)
        _linear(f"{name}_text_proj", head, config.text_embed_dim, shapes)
        _linear(f"{name}_fc", 1, head, shapes)
    shapes["attr_t"] = ()
    shapes["attr_b"] = ()
    shapes.update(t5_alias_layout(config.text_config))
    return shapes


def blip2_layout(config):
    """LAVIS `blip2_pretrained_flant5xl.pth`: the BLIP-2 stage-2 trained set (docs/upstream/checkpoint.md §3)."""
    width, hidden = config.vision_config.hidden_size, config.qformer_config.hidden_size
    shapes = {"query_tokens": (1, config.num_query_tokens, hidden)}
    _norm("ln_vision", width, shapes)
    shapes.update(qformer_layout(config.qformer_config))
    _linear("t5_proj", config.text_config.d_model, hidden, shapes)
    shapes.update(t5_alias_layout(config.text_config))
    return shapes


def eva_clip_layout(text):
    """`eva_clip_psz14.pt`: `text.*` (the TextTransformer), one `visual.*` stand-in for the vision tower."""
    width = text.hidden_size
    shapes = {
        "text.token_embedding.weight": (text.vocab_size, width),
        "text.positional_embedding": (text.max_position_embeddings, width),
        "text.text_projection": (width, text.projection_dim),
        "text.logit_scale": (),
        "visual.cls_token": (1, 1, 8),
    }
    for i in range(text.num_hidden_layers):
        block = f"text.transformer.resblocks.{i}"
        _norm(f"{block}.ln_1", width, shapes)
        shapes[f"{block}.attn.in_proj_weight"] = (3 * width, width)
        shapes[f"{block}.attn.in_proj_bias"] = (3 * width,)
        _linear(f"{block}.attn.out_proj", width, width, shapes)
        _norm(f"{block}.ln_2", width, shapes)
        _linear(f"{block}.mlp.c_fc", text.intermediate_size, width, shapes)
        _linear(f"{block}.mlp.c_proj", width, text.intermediate_size, shapes)
    _norm("text.ln_final", width, shapes)
    return shapes


def materialize(shapes, seed, dtype=torch.float32):
    """Random tensors for a layout; norms near 1, position ids as arange, T5 aliases filled by the caller."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            tensors[key] = torch.arange(shape[-1]).expand(shape).clone()
        elif re.search(r"(norm\d?|LayerNorm|layer_norm|ln_\w+|ln_vision)\.weight$", key):
            tensors[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensors[key] = (0.2 * torch.randn(shape, generator=generator)).to(dtype)
    return tensors


def write_upstream_files(root, config, text_config, eva_vit_blocks=None):
    """Synthetic upstream files under `root`, as upstream's sources would be downloaded.

    `flan-t5/` (a save_pretrained-style folder with an untied lm_head), `dynrefer.pth` (a LAVIS training
    checkpoint: `{"model": ..., "config": ..., "epoch": ...}`), `blip2.pth` (`{"model": ...}`), `eva_vit.pth`
    and `eva_clip.pth` (flat). `eva_vit_blocks` defaults to one block more than the ViT keeps, as EVA-CLIP-g
    has 40 blocks and BLIP-2 keeps 39. Returns `{"root", "paths", "tensors"}`.
    """
    from safetensors.torch import save_file

    root = Path(root)
    flan = materialize(flan_t5_layout(config.text_config), 5)
    (root / "flan-t5").mkdir(parents=True)
    save_file(flan, root / "flan-t5" / "model.safetensors", metadata={"format": "pt"})
    config.text_config.save_pretrained(root / "flan-t5")
    make_tiny_tokenizer().save_pretrained(root / "flan-t5")
    shared_bf16 = flan["shared.weight"].to(torch.bfloat16)
    if eva_vit_blocks is None:
        eva_vit_blocks = config.vision_config.num_hidden_layers + 1
    tensors = {
        "eva_vit": materialize(eva_vit_layout(config.vision_config, eva_vit_blocks), 1),
        "blip2": materialize(blip2_layout(config), 2),
        "dynrefer": materialize(dynrefer_layout(config), 3),
        "eva_clip": materialize(eva_clip_layout(text_config), 4),
    }
    for name in ("blip2", "dynrefer"):
        for key in t5_alias_layout(config.text_config):
            tensors[name][key] = shared_bf16.clone()
    paths = {name: root / f"{name}.pth" for name in tensors}
    run_model_config = {
        "arch": "dynrefer_t5",
        "num_views": config.num_views,
        "num_query_token": config.num_query_tokens,
        "max_txt_len": config.max_text_length,
        "tag_thr": config.tag_threshold,
    }
    # LAVIS training checkpoints wrap the state dict with optimizer/config/epoch entries (docs/upstream/checkpoint.md §1)
    torch.save(
        {"model": tensors["dynrefer"], "config": {"model": run_model_config}, "epoch": 4}, paths["dynrefer"]
    )
    torch.save({"model": tensors["blip2"]}, paths["blip2"])
    torch.save(tensors["eva_vit"], paths["eva_vit"])
    torch.save(tensors["eva_clip"], paths["eva_clip"])
    tensors["flan_t5"] = flan
    return {"root": root, "paths": paths, "tensors": tensors}
