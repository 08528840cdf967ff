"""Checkpoint conversion (spec checkpoint.md, docs/upstream/model.md §2, §4, §5, §7, §10).

Synthetic upstream files are written with exactly upstream's key names (LAVIS `DynReferT5` / `Blip2T5`,
`eva_vit_g.pth`, `eva_clip_psz14.pt`) at scaled-down shapes, converted, saved and loaded back. The converted
model is then checked against implementations of the upstream formulas written here from the original
tensors: EVA attention with fused qkv and q/v biases, the DCNv4 alignment, the fusion MLP, the EVA-CLIP
text tower (label tables) and the tag head.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny import make_tiny_clip_tokenizer, make_tiny_config
from transformers import CLIPTextConfig
from upstream_layout import (
    blip2_layout,
    dynrefer_layout,
    eva_clip_layout,
    eva_vit_layout,
    flan_t5_layout,
    write_upstream_files,
)

from dynrefer_hf import DynReferConfig, DynReferForRegionCaptioning
from dynrefer_hf.convert import (
    CheckpointLoadError,
    ConversionError,
    UnknownKeysError,
    assemble_weights,
    convert_blip2_state_dict,
    convert_checkpoints,
    convert_eva_clip_text_state_dict,
    convert_eva_vit_state_dict,
    convert_t5_state_dict,
    convert_upstream_state_dict,
    load_checkpoint,
    model_weight_inventory,
    released_config,
    save_converted,
)

TEXT_TOWER = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 24,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,  # = make_tiny_config().text_embed_dim
}

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_config():
    return make_tiny_config()


@pytest.fixture(scope="module")
def text_tower_config():
    tokenizer = make_tiny_clip_tokenizer()
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_TOWER,
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_config, text_tower_config):
    """Synthetic upstream files on disk plus their tensors."""
    return write_upstream_files(tmp_path_factory.mktemp("upstream"), tiny_config, text_tower_config)


def _convert(upstream, config, text_tower_config, **overrides):
    paths = upstream["paths"]
    arguments = {
        "dynrefer": paths["dynrefer"],
        "blip2": paths["blip2"],
        "eva_vit": paths["eva_vit"],
        "flan_t5": upstream["root"] / "flan-t5",
        "eva_clip": paths["eva_clip"],
        "clip_tokenizer": make_tiny_clip_tokenizer(),
        "config": config,
        "text_encoder_config": text_tower_config,
    }
    arguments.update(overrides)
    return convert_checkpoints(**arguments)


@pytest.fixture(scope="module")
def converted_dir(upstream, tiny_config, text_tower_config, tmp_path_factory):
    converted = _convert(upstream, tiny_config, text_tower_config)
    out = tmp_path_factory.mktemp("converted")
    save_converted(converted, out, max_shard_size="200KB")
    return out, converted


@pytest.fixture(scope="module")
def model(converted_dir):
    return DynReferForRegionCaptioning.from_pretrained(converted_dir[0]).eval()


def test_converted_config_records_each_sub_model_dtype_and_auto_loads_them(converted_dir):
    folder, converted = converted_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["dtype"] == "bfloat16"
    assert config["vision_config"]["dtype"] == config["qformer_config"]["dtype"] == config["dtype"] == "float32"
    loaded = DynReferForRegionCaptioning.from_pretrained(folder, dtype="auto")
    stored = {name: tensor.dtype for name, tensor in converted.state_dict.items()}
    loaded_dtypes = {name: p.dtype for name, p in loaded.named_parameters() if name in stored}
    assert len(loaded_dtypes) > 100 and loaded_dtypes == {name: stored[name] for name in loaded_dtypes}
    assert loaded.language_model.shared.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------- independent upstream formulas


def eva_vit_reference(eva, ln_vision, pixel_values, num_layers, num_heads):
    """LAVIS EVA ViT-g then ln_vision (docs/upstream/model.md §2): pre-norm blocks, qkv bias (q_bias, 0, v_bias)."""
    weight = eva["patch_embed.proj.weight"]
    x = (
        F.conv2d(pixel_values, weight, eva["patch_embed.proj.bias"], stride=weight.shape[-1])
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([eva["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + eva["pos_embed"]
    batch, length, width = x.shape
    head_dim = width // num_heads
    for i in range(num_layers):
        p = {
            key[len(f"blocks.{i}.") :]: value for key, value in eva.items() if key.startswith(f"blocks.{i}.")
        }
        h = F.layer_norm(x, (width,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        bias = torch.cat([p["attn.q_bias"], torch.zeros_like(p["attn.q_bias"]), p["attn.v_bias"]])
        qkv = (
            (h @ p["attn.qkv.weight"].T + bias)
            .reshape(batch, length, 3, num_heads, head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0] * head_dim**-0.5, qkv[1], qkv[2]
        attended = (
            (torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
        )
        x = x + attended @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        h = F.layer_norm(x, (width,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = (
            x
            + F.gelu(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T
            + p["mlp.fc2.bias"]
        )
    return F.layer_norm(x, (width,), ln_vision["ln_vision.weight"], ln_vision["ln_vision.bias"], eps=1e-5)


def eva_clip_text_reference(eva_clip, token_ids, num_heads):
    """EVA-CLIP TextTransformer (docs/upstream/model.md §10): zero-padded ids, causal pre-LN blocks, EOT = argmax id."""
    p = {key[len("text.") :]: value for key, value in eva_clip.items() if key.startswith("text.")}
    context, width = p["positional_embedding"].shape
    ids = torch.zeros(len(token_ids), context, dtype=torch.long)
    for row, tokens in enumerate(token_ids):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    x = p["token_embedding.weight"][ids] + p["positional_embedding"]
    mask = torch.full((context, context), float("-inf")).triu(1)
    head_dim = width // num_heads
    layers = 1 + max(int(key.split(".")[2]) for key in p if key.startswith("transformer.resblocks."))
    for i in range(layers):
        b = {
            key[len(f"transformer.resblocks.{i}.") :]: v
            for key, v in p.items()
            if key.startswith(f"transformer.resblocks.{i}.")
        }
        h = F.layer_norm(x, (width,), b["ln_1.weight"], b["ln_1.bias"], eps=1e-5)
        q, k, v = (h @ b["attn.in_proj_weight"].T + b["attn.in_proj_bias"]).split(width, dim=-1)
        q, k, v = (t.reshape(len(ids), context, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim) + mask
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(len(ids), context, width)
        x = x + attended @ b["attn.out_proj.weight"].T + b["attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), b["ln_2.weight"], b["ln_2.bias"], eps=1e-5)
        x = (
            x
            + F.gelu(h @ b["mlp.c_fc.weight"].T + b["mlp.c_fc.bias"]) @ b["mlp.c_proj.weight"].T
            + b["mlp.c_proj.bias"]
        )
    x = F.layer_norm(x, (width,), p["ln_final.weight"], p["ln_final.bias"], eps=1e-5)
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ p["text_projection"]


def bilinear_zero_padded(value, y, x):
    """value [H, W, C] sampled at real (y, x); corners outside the map contribute 0."""
    height, width, _ = value.shape
    y0, x0 = math.floor(y), math.floor(x)
    out = torch.zeros(value.shape[-1], dtype=value.dtype)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * value[yy, xx]
    return out


def dcnv4_align_reference(p, moving, reference, group, kernel=3):
    """upstream CustomDCNv4 (docs/upstream/model.md §4.3-§4.4), one output position and sampling point at a time."""
    batch, channels, height, width = moving.shape
    value = moving.permute(0, 2, 3, 1) @ p["value_proj.weight"].T + p["value_proj.bias"]  # [N, H, W, C]
    # depthwise conv with groups=C over [moving | reference]: output c reads input channels 2c and 2c+1
    stacked = torch.cat([moving, reference], dim=1)
    padded = F.pad(stacked, (1, 1, 1, 1))
    guide = torch.zeros(batch, channels, height, width)
    for c in range(channels):
        for j in range(2):
            for ky in range(3):
                for kx in range(3):
                    guide[:, c] += (
                        p["offset_mask_dw.weight"][c, j, ky, kx]
                        * padded[:, 2 * c + j, ky : ky + height, kx : kx + width]
                    )
        guide[:, c] += p["offset_mask_dw.bias"][c]
    offset_mask = (
        guide.permute(0, 2, 3, 1) @ p["offset_mask.weight"].T + p["offset_mask.bias"]
    )  # [N, H, W, 112]
    points, group_channels = kernel * kernel, channels // group
    sampled = torch.zeros(batch, height, width, channels)
    for n in range(batch):
        for y in range(height):
            for x in range(width):
                om = offset_mask[n, y, x]
                for g in range(group):
                    base = g * points * 3
                    for k in range(points):
                        i, j = divmod(k, kernel)  # x-major: i is the column, j the row
                        dx, dy, m = om[base + 2 * k], om[base + 2 * k + 1], om[base + 2 * points + k]
                        slice_ = value[n, :, :, g * group_channels : (g + 1) * group_channels]
                        sampled[n, y, x, g * group_channels : (g + 1) * group_channels] += (
                            m * bilinear_zero_padded(slice_, y + (j - 1) + float(dy), x + (i - 1) + float(dx))
                        )
    return (sampled @ p["output_proj.weight"].T + p["output_proj.bias"]).permute(0, 3, 1, 2)


def label_head_reference(p, prefix, labels, memory, num_layers, num_heads):
    """RAM's cross-attention-only BERT (docs/upstream/model.md §7): post-LN, eps 1e-12, exact GELU."""
    h = labels
    width = h.shape[-1]
    head_dim = width // num_heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], num_heads, head_dim).transpose(1, 2)

    for i in range(num_layers):
        w = {
            key[len(f"{prefix}.encoder.layer.{i}.") :]: v
            for key, v in p.items()
            if key.startswith(f"{prefix}.encoder.layer.{i}.")
        }
        q = split(h @ w["crossattention.self.query.weight"].T + w["crossattention.self.query.bias"])
        k = split(memory @ w["crossattention.self.key.weight"].T + w["crossattention.self.key.bias"])
        v = split(memory @ w["crossattention.self.value.weight"].T + w["crossattention.self.value.bias"])
        context = (
            (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1) @ v)
            .transpose(1, 2)
            .flatten(2)
        )
        a = F.layer_norm(
            h + context @ w["crossattention.output.dense.weight"].T + w["crossattention.output.dense.bias"],
            (width,),
            w["crossattention.output.LayerNorm.weight"],
            w["crossattention.output.LayerNorm.bias"],
            eps=1e-12,
        )
        f = F.gelu(a @ w["intermediate.dense.weight"].T + w["intermediate.dense.bias"])
        h = F.layer_norm(
            a + f @ w["output.dense.weight"].T + w["output.dense.bias"],
            (width,),
            w["output.LayerNorm.weight"],
            w["output.LayerNorm.bias"],
            eps=1e-12,
        )
    return h


def reference_tables(upstream, config, num_heads):
    tokenizer = make_tiny_clip_tokenizer()
    tables = {}
    for name, texts in (
        ("clip_embeds", config.tag_names),
        ("att_embeds", config.attribute_prompts),
        ("ov_embeds", config.class_prompts),
    ):
        tables[name] = eva_clip_text_reference(
            upstream["tensors"]["eva_clip"], tokenizer(list(texts)).input_ids, num_heads
        )
    return tables


# ---------------------------------------------------------------------------------------------- numerics


def test_vision_tower_matches_eva_with_q_and_v_bias(model, upstream, tiny_config):
    torch.manual_seed(0)
    vision = tiny_config.vision_config
    pixels = torch.randn(2, 3, vision.image_size, vision.image_size)
    expected = eva_vit_reference(
        upstream["tensors"]["eva_vit"],
        upstream["tensors"]["blip2"],
        pixels,
        vision.num_hidden_layers,
        vision.num_attention_heads,
    )
    with torch.no_grad():
        actual = model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_alignment_matches_dcnv4_reference(model, upstream, tiny_config):
    torch.manual_seed(1)
    width, side = tiny_config.vision_config.hidden_size, 4
    moving, reference = torch.randn(2, width, side, side), torch.randn(2, width, side, side)
    weights = {
        k[len("cvem_align.") :]: v
        for k, v in upstream["tensors"]["dynrefer"].items()
        if k.startswith("cvem_align.")
    }
    expected = dcnv4_align_reference(weights, moving, reference, tiny_config.align_group)
    with torch.no_grad():
        actual = model.cvem_align(moving, reference)
    assert expected.abs().max() > 0.1  # the offsets and masks are not trivial
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_fusion_mlp_matches_upstream(model, upstream, tiny_config):
    torch.manual_seed(2)
    p = upstream["tensors"]["dynrefer"]
    views = [torch.randn(3, 5, tiny_config.vision_config.hidden_size) for _ in range(tiny_config.num_views)]
    fused = torch.cat(views, dim=-1)  # [view0 | view1 | view2] per token (docs/upstream/model.md §5)
    expected = (
        torch.relu(fused @ p["cvem_mlp.0.weight"].T + p["cvem_mlp.0.bias"]) @ p["cvem_mlp.2.weight"].T
        + p["cvem_mlp.2.bias"]
    )
    with torch.no_grad():
        torch.testing.assert_close(model.cvem_mlp(fused), expected, rtol=1e-5, atol=1e-5)


def test_label_tables_match_eva_clip_text_tower(model, upstream, tiny_config, text_tower_config):
    expected = reference_tables(upstream, tiny_config, text_tower_config.num_attention_heads)
    for name, table in expected.items():
        torch.testing.assert_close(getattr(model, name), table, rtol=1e-5, atol=1e-5, msg=name)


def test_tag_head_matches_upstream(model, upstream, tiny_config, text_tower_config):
    torch.manual_seed(3)
    p = upstream["tensors"]["dynrefer"]
    queries = torch.randn(2, tiny_config.num_query_tokens, tiny_config.qformer_config.hidden_size)
    clip_embeds = reference_tables(upstream, tiny_config, text_tower_config.num_attention_heads)[
        "clip_embeds"
    ]
    memory = queries @ p["tag_vision_proj.weight"].T + p["tag_vision_proj.bias"]
    labels = (clip_embeds @ p["tag_text_proj.weight"].T + p["tag_text_proj.bias"]).expand(2, -1, -1)
    hidden = label_head_reference(
        p, "tag_head", labels, memory, tiny_config.head_num_layers, tiny_config.head_num_attention_heads
    )
    expected = (hidden @ p["tag_fc.weight"].T + p["tag_fc.bias"]).squeeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(model.tag_logits(queries), expected, rtol=1e-4, atol=1e-4)


def test_sources_land_in_upstream_load_order(model, upstream, converted_dir):
    """ViT from EVA, ln_vision/query_tokens from BLIP-2, Q-Former/projection from DynRefer, LM from Flan-T5."""
    t = upstream["tensors"]
    state = model.state_dict()
    torch.testing.assert_close(state["vision_model.embeddings.class_embedding"], t["eva_vit"]["cls_token"])
    torch.testing.assert_close(state["vision_model.post_layernorm.weight"], t["blip2"]["ln_vision.weight"])
    torch.testing.assert_close(state["query_tokens"], t["blip2"]["query_tokens"])
    torch.testing.assert_close(
        state["qformer.encoder.layer.0.crossattention.attention.key.weight"],
        t["dynrefer"]["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
    )
    torch.testing.assert_close(
        state["qformer.layernorm.bias"], t["dynrefer"]["Qformer.bert.embeddings.LayerNorm.bias"]
    )
    torch.testing.assert_close(state["language_projection.weight"], t["dynrefer"]["t5_proj.weight"])
    assert model.vision_model.post_layernorm.eps == 1e-5
    flan = t["flan_t5"]
    assert not torch.equal(
        state["language_model.lm_head.weight"].float(), state["language_model.shared.weight"].float()
    )
    for key in ("shared.weight", "lm_head.weight", "decoder.block.1.layer.2.DenseReluDense.wo.weight"):
        torch.testing.assert_close(
            state[f"language_model.{key}"].float(), flan[key].to(torch.bfloat16).float()
        )

    report = converted_dir[1].report
    assert report.superseded["blip2"] == sorted(
        k for k in t["blip2"] if k.startswith("Qformer.bert.") and "position_ids" not in k
    ) + ["t5_proj.bias", "t5_proj.weight"]
    assert set(report.dropped["dynrefer"]) == {
        "Qformer.bert.embeddings.position_ids",
        "t5_model.encoder.embed_tokens.weight",
        "t5_model.decoder.embed_tokens.weight",
    }
    extra_block = f"blocks.{model.config.vision_config.num_hidden_layers}."
    assert {k for k in report.dropped["eva_vit"]} == {k for k in t["eva_vit"] if k.startswith(extra_block)}
    assert set(report.dropped["eva_clip"]) == {"text.logit_scale", "visual.cls_token"}
    assert report.dropped["flan_t5"] == {}
    for name, source in t.items():  # every source key is used or deliberately dropped
        assert set(report.consumed[name]) | set(report.dropped[name]) == set(source), name


def test_saved_folder_is_hub_ready(converted_dir):
    out, converted = converted_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # sharded
    dtypes = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                dtypes[key] = handle.get_slice(key).get_dtype()
    assert set(dtypes) == set(converted.state_dict)
    assert {dtype for key, dtype in dtypes.items() if key.startswith("language_model.")} == {"BF16"}
    assert {dtype for key, dtype in dtypes.items() if not key.startswith("language_model.")} == {"F32"}
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_new_tokens"], generation["repetition_penalty"]) == (
        2,
        20,
        1.5,
    )
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "CIDEr 190.5" in card and "arXiv:2405.16071" in card and "CC BY-NC-SA 4.0" in card


def test_keep_text_encoder_and_float32_language_model(upstream, tiny_config, text_tower_config, tmp_path):
    converted = _convert(
        upstream, tiny_config, text_tower_config, keep_text_encoder=True, language_model_dtype=torch.float32
    )
    assert converted.state_dict["language_model.shared.weight"].dtype == torch.float32
    p = upstream["tensors"]["eva_clip"]
    k = p["text.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)[1]
    layer = "text_encoder.text_model.encoder.layers.1.self_attn."
    torch.testing.assert_close(converted.state_dict[layer + "k_proj.weight"], k)
    torch.testing.assert_close(
        converted.state_dict["text_encoder.text_projection.weight"], p["text.text_projection"].T
    )
    save_converted(converted, tmp_path)
    model = DynReferForRegionCaptioning.from_pretrained(tmp_path).eval()
    tokenizer = make_tiny_clip_tokenizer()
    # the kept tower re-encodes the vocabulary to the stored table
    torch.testing.assert_close(
        model.encode_texts(list(tiny_config.class_prompts), tokenizer), model.ov_embeds
    )
    assert (tmp_path / "clip_tokenizer" / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------------------------------- key mappers


def test_upstream_mapper_maps_any_subset_and_names_unknown_keys(upstream):
    source = upstream["tensors"]["dynrefer"]
    align = {k: v for k, v in source.items() if k.startswith("cvem_align.")}
    assert convert_upstream_state_dict(align).keys() == align.keys()
    mapped = convert_upstream_state_dict(
        {"Qformer.bert.encoder.layer.1.attention.self.value.bias": torch.zeros(3)}
    )
    assert list(mapped) == ["qformer.encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(UnknownKeysError, match=r"cvem_align\.bogus\.weight"):
        convert_upstream_state_dict({**align, "cvem_align.bogus.weight": torch.zeros(1)})
    with pytest.raises(UnknownKeysError, match="t5_proj.scale"):
        convert_blip2_state_dict({"t5_proj.scale": torch.zeros(1)})
    with pytest.raises(UnknownKeysError, match="cem_memory"):  # not a BLIP-2 key
        convert_blip2_state_dict({"cem_memory": torch.zeros(1)})


def test_eva_vit_mapper_builds_fused_bias_and_needs_both_halves():
    q, v = torch.randn(4), torch.randn(4)
    mapped = convert_eva_vit_state_dict({"blocks.0.attn.q_bias": q, "blocks.0.attn.v_bias": v})
    assert torch.equal(
        mapped["vision_model.encoder.layers.0.self_attn.qkv.bias"], torch.cat([q, torch.zeros(4), v])
    )
    with pytest.raises(KeyError, match="v_bias"):
        convert_eva_vit_state_dict({"blocks.3.attn.q_bias": q})
    with pytest.raises(UnknownKeysError, match="blocks.0.attn.qkv.bias"):
        convert_eva_vit_state_dict({"blocks.0.attn.qkv.bias": torch.zeros(12)})


def test_eva_clip_mapper_accepts_bare_keys():
    weight = torch.randn(6, 2)
    mapped = convert_eva_clip_text_state_dict(
        {"transformer.resblocks.0.attn.in_proj_weight": weight, "text_projection": torch.randn(2, 5)}
    )
    assert torch.equal(mapped["text_encoder.text_model.encoder.layers.0.self_attn.v_proj.weight"], weight[4:])
    assert mapped["text_encoder.text_projection.weight"].shape == (5, 2)


def test_t5_aliases_dropped_only_when_equal():
    shared = torch.randn(5, 3)
    mapped = convert_t5_state_dict({"shared.weight": shared, "encoder.embed_tokens.weight": shared.clone()})
    assert list(mapped) == ["language_model.shared.weight"]
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs"):
        convert_t5_state_dict({"shared.weight": shared, "encoder.embed_tokens.weight": shared + 1})
    # a de-duplicated file that kept an alias name instead of shared.weight
    mapped = convert_t5_state_dict(
        {"decoder.embed_tokens.weight": shared, "encoder.embed_tokens.weight": shared}
    )
    assert (
        list(mapped) == ["language_model.shared.weight"] and mapped["language_model.shared.weight"] is shared
    )


# ----------------------------------------------------------------------------------------- bad inputs


def _with(upstream, tmp_path, name, change):
    """A copy of one synthetic source file, modified by `change(state_dict)`."""
    state = dict(upstream["tensors"][name])
    change(state)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path


def test_missing_trained_key_is_named(upstream, tiny_config, text_tower_config, tmp_path):
    path = _with(upstream, tmp_path, "dynrefer", lambda s: s.pop("cvem_align.value_proj.bias"))
    with pytest.raises(ConversionError, match=r"trained keys missing[\s\S]*cvem_align\.value_proj\.bias"):
        _convert(upstream, tiny_config, text_tower_config, dynrefer=path)


def test_missing_frozen_key_is_named(upstream, tiny_config, text_tower_config, tmp_path):
    path = _with(upstream, tmp_path, "blip2", lambda s: s.pop("query_tokens"))
    with pytest.raises(ConversionError, match=r"missing \(no source fills them\)[\s\S]*query_tokens"):
        _convert(upstream, tiny_config, text_tower_config, blip2=path)


def test_extra_key_is_named(upstream, tiny_config, text_tower_config, tmp_path):
    path = _with(
        upstream, tmp_path, "dynrefer", lambda s: s.update({"cvem_align.extra_scale": torch.ones(1)})
    )
    with pytest.raises(UnknownKeysError, match=r"cvem_align\.extra_scale"):
        _convert(upstream, tiny_config, text_tower_config, dynrefer=path)


def test_misshaped_key_is_named(upstream, tiny_config, text_tower_config, tmp_path):
    path = _with(upstream, tmp_path, "dynrefer", lambda s: s.update({"cem_memory": torch.zeros(7)}))
    with pytest.raises(ConversionError, match=r"shape mismatch[\s\S]*cem_memory: source \[7\]"):
        _convert(upstream, tiny_config, text_tower_config, dynrefer=path)


def test_checkpoint_trained_with_other_settings_is_refused(
    upstream, tiny_config, text_tower_config, tmp_path
):
    path = tmp_path / "dynrefer.pth"
    run_config = {"model": {"num_views": 2, "num_query_token": tiny_config.num_query_tokens}}
    torch.save({"model": upstream["tensors"]["dynrefer"], "config": run_config}, path)
    with pytest.raises(ConversionError, match="num_views: checkpoint 2, config 3"):
        _convert(upstream, tiny_config, text_tower_config, dynrefer=path)


def test_alias_that_differs_from_flan_t5_is_refused(upstream, tiny_config, text_tower_config, tmp_path):
    key = "t5_model.decoder.embed_tokens.weight"
    path = _with(upstream, tmp_path, "dynrefer", lambda s: s.update({key: s[key] + 1}))
    with pytest.raises(ValueError, match=f"{key} differs"):
        _convert(upstream, tiny_config, text_tower_config, dynrefer=path)


def test_truncated_files_give_a_clear_error(upstream, tmp_path):
    for source in (upstream["paths"]["eva_vit"], upstream["root"] / "flan-t5" / "model.safetensors"):
        data = source.read_bytes()
        path = tmp_path / f"truncated{source.suffix}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointLoadError, match=f"{path.name} is truncated"):
            load_checkpoint(path)


def test_flan_t5_that_is_neither_a_folder_nor_cached_is_reported(tmp_path):
    from dynrefer_hf.convert.loading import load_folder_state_dict, resolve_pretrained_folder

    with pytest.raises(CheckpointLoadError, match="nobody/no-such-flan-t5"):  # HF_HUB_OFFLINE=1 (conftest)
        resolve_pretrained_folder("nobody/no-such-flan-t5")
    with pytest.raises(CheckpointLoadError, match=r"no \*\.safetensors"):
        load_folder_state_dict(tmp_path)


class _Payload:  # any non-allow-listed class needs full unpickling
    pass


def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"cem_memory": torch.zeros(2)}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointLoadError, match="arbitrary unpickling"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------- real checkpoint layout


def test_real_layout_maps_completely_on_meta_tensors():
    """Spec checkpoint.md: the released layout (shapes only, no memory) fills the full-size model exactly."""
    config = DynReferConfig()
    text = CLIPTextConfig(
        vocab_size=49408,
        **{
            **TEXT_TOWER,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "projection_dim": 1024,
        },
    )
    layouts = {
        "eva_vit": eva_vit_layout(config.vision_config, 40),
        "blip2": blip2_layout(config),
        "dynrefer": dynrefer_layout(config),
        "eva_clip": {k: v for k, v in eva_clip_layout(text).items() if not k.startswith("visual.")},
        "flan_t5": flan_t5_layout(config.text_config),
    }
    dynrefer = layouts["dynrefer"]
    assert len(dynrefer) == 350  # docs/upstream/checkpoint.md §2
    trained = [k for k in dynrefer if "position_ids" not in k and not k.startswith("t5_model.")]
    assert sum(math.prod(dynrefer[k]) for k in trained) == 122_877_684
    with torch.device("meta"):
        full = DynReferForRegionCaptioning(config)
    sources = {
        name: {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
        for name, layout in layouts.items()
    }
    tables = {
        name: torch.empty(getattr(full, name).shape, device="meta")
        for name in ("clip_embeds", "att_embeds", "ov_embeds")
    }
    state, report = assemble_weights(
        sources,
        model_weight_inventory(full),
        num_vision_layers=config.vision_config.num_hidden_layers,
        trainable_modules=config.trainable_modules,
        tables=tables,
    )
    assert len(state) == len(report.created) == len(model_weight_inventory(full))
    assert len(report.dropped["dynrefer"]) == 3 and len(report.dropped["eva_vit"]) == 13
    for name, layout in layouts.items():
        assert set(report.consumed[name]) | set(report.dropped[name]) == set(layout), name


def test_released_config_reads_flan_t5_and_forces_exact_gelu(upstream, tmp_path):
    flan = json.loads((upstream["root"] / "flan-t5" / "config.json").read_text())
    flan["dense_act_fn"] = "gelu_new"  # Flan-T5's own activation
    flan["d_model"] = 48
    (tmp_path / "config.json").write_text(json.dumps(flan))
    config = released_config(tmp_path)
    assert config.text_config.dense_act_fn == "gelu" and config.text_config.d_model == 48
    assert config.vision_config.num_hidden_layers == 39 and config.ln_vision_eps == 1e-5
    assert config.num_tags == 4585 and config.num_attribute_prompts == 474 and config.num_classes == 80


# ------------------------------------------------------------------------------------------------ Hub


@pytest.mark.slow
def test_offline_hub_snapshot_loads_through_auto_classes_and_pipeline(converted_dir, tmp_path):
    out, converted = converted_dir
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--callsys--dynrefer"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in out.rglob("*"):
        if file.is_file():
            target = snapshot / file.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    script = textwrap.dedent(
        """
        import json
        import numpy as np
        import dynrefer_hf
        from transformers import AutoModel, AutoProcessor, pipeline

        model = AutoModel.from_pretrained("callsys/dynrefer")
        processor = AutoProcessor.from_pretrained("callsys/dynrefer")
        describe = pipeline("region-captioning", model="callsys/dynrefer")
        image = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
        results = describe(image, boxes=[[10, 12, 60, 70]])
        print(json.dumps({
            "model": type(model).__name__,
            "processor": type(processor).__name__,
            "cem_memory": model.cem_memory.tolist(),
            "results": [{"caption": r["caption"], "tags": r["tags"]} for r in results],
        }))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["model"] == "DynReferForRegionCaptioning" and loaded["processor"] == "DynReferProcessor"
    torch.testing.assert_close(torch.tensor(loaded["cem_memory"]), converted.state_dict["cem_memory"])
    assert len(loaded["results"]) == 1 and isinstance(loaded["results"][0]["caption"], str)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_converts_checks_and_reports(upstream, tiny_config, text_tower_config, tmp_path, capsys):
    from dynrefer_hf.cli import main

    tiny_config.to_json_file(tmp_path / "config.json")
    text_tower_config.to_json_file(tmp_path / "text.json")
    make_tiny_clip_tokenizer().save_pretrained(tmp_path / "clip-tokenizer")
    paths, out = upstream["paths"], tmp_path / "out"
    argv = [
        "convert", "--dynrefer", str(paths["dynrefer"]), "--blip2", str(paths["blip2"]),
        "--eva-vit", str(paths["eva_vit"]), "--flan-t5", str(upstream["root"] / "flan-t5"),
        "--eva-clip", str(paths["eva_clip"]), "--clip-tokenizer", str(tmp_path / "clip-tokenizer"),
        "--config", str(tmp_path / "config.json"), "--text-encoder-config", str(tmp_path / "text.json"),
        "--tag-threshold", "0.76", "--output", str(out), "--report", str(tmp_path / "report.json"),
        "--check", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "caption:" in printed and "DynRefer checkpoint" in printed
    assert json.loads((out / "config.json").read_text())["tag_threshold"] == 0.76
    report = json.loads((tmp_path / "report.json").read_text())
    assert "Qformer.bert.embeddings.position_ids" in report["dropped"]["dynrefer"]
    # a second run into the same folder is refused rather than mixing files
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_reports_a_truncated_checkpoint_in_one_line(upstream, tmp_path, capsys):
    from dynrefer_hf.cli import main

    truncated = tmp_path / "vg1.2_5e.pth"
    truncated.write_bytes(upstream["paths"]["dynrefer"].read_bytes()[:1000])
    make_tiny_clip_tokenizer().save_pretrained(tmp_path / "clip-tokenizer")
    paths = upstream["paths"]
    argv = [
        "convert", "--dynrefer", str(truncated), "--blip2", str(paths["blip2"]), "--eva-vit", str(paths["eva_vit"]),
        "--flan-t5", str(upstream["root"] / "flan-t5"), "--eva-clip", str(paths["eva_clip"]),
        "--clip-tokenizer", str(tmp_path / "clip-tokenizer"), "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("dynrefer convert:")
        and f"{truncated} is truncated" in err
        and len(err.splitlines()) == 1
    )


def test_cli_names_the_model_type_of_another_models_config(upstream, tmp_path, capsys):
    from dynrefer_hf.cli import main

    paths, other = upstream["paths"], upstream["root"] / "flan-t5" / "config.json"
    argv = [
        "convert", "--dynrefer", str(paths["dynrefer"]), "--blip2", str(paths["blip2"]),
        "--eva-vit", str(paths["eva_vit"]), "--flan-t5", str(upstream["root"] / "flan-t5"),
        "--eva-clip", str(paths["eva_clip"]), "--config", str(other), "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--config {other}: its model_type is 't5', not 'dynrefer'" in err and len(err.splitlines()) == 1


def test_push_refuses_a_folder_that_is_not_a_conversion(tmp_path, capsys):
    from dynrefer_hf.cli import main

    assert main(["push", str(tmp_path)]) == 2
    assert "not a folder written by `dynrefer convert`" in capsys.readouterr().err


# ------------------------------------------------------------------------------ load_upstream_state_dict


def _full_upstream_state_dict(upstream, model):
    """Every upstream key of a DynReferT5 state dict: the trained part, BLIP-2's frozen extras, the ViT, Flan-T5
    (under `t5_model.`) and the three tables."""
    tensors = upstream["tensors"]
    full = dict(tensors["dynrefer"])
    full.update({k: v for k, v in tensors["blip2"].items() if k.startswith(("query_tokens", "ln_vision"))})
    full.update({f"visual_encoder.{k}": v for k, v in tensors["eva_vit"].items()})
    full.update({f"t5_model.{k}": v for k, v in tensors["flan_t5"].items()})
    generator = torch.Generator().manual_seed(0)
    for name in ("clip_embeds", "att_embeds", "ov_embeds"):
        full[name] = torch.randn(getattr(model, name).shape, generator=generator)
    return full


def test_load_upstream_state_dict_fills_every_weight_and_checks_aliases(upstream, tiny_config):
    from dynrefer_hf.convert import load_upstream_state_dict

    model = DynReferForRegionCaptioning(tiny_config)
    full = _full_upstream_state_dict(upstream, model)
    mapped = load_upstream_state_dict(model, full)
    state = model.state_dict()
    assert set(model_weight_inventory(model)) <= set(mapped.tensors)
    for target, tensor in mapped.tensors.items():
        assert torch.equal(state[target], tensor.to(state[target].dtype)), target
    assert torch.equal(state["cvem_mlp.0.weight"], full["cvem_mlp.0.weight"])
    aliases = [key for key, reason in mapped.dropped.items() if "tied alias" in reason]
    assert sorted(aliases) == ["t5_model.decoder.embed_tokens.weight", "t5_model.encoder.embed_tokens.weight"]

    # strict: a trained-part-only checkpoint leaves the frozen parts unfilled, and says which
    with pytest.raises(ConversionError, match=r"missing \(no source fills them\)[\s\S]*clip_embeds"):
        load_upstream_state_dict(DynReferForRegionCaptioning(tiny_config), upstream["tensors"]["dynrefer"])
    # not strict: the subset loads (aliases checked against the model's own shared embedding)
    partial = DynReferForRegionCaptioning(tiny_config)
    partial.language_model.shared.weight.data.copy_(upstream["tensors"]["flan_t5"]["shared.weight"])
    load_upstream_state_dict(partial, upstream["tensors"]["dynrefer"], strict=False)
    assert torch.equal(partial.cem_memory, upstream["tensors"]["dynrefer"]["cem_memory"])
    # an alias that differs from the shared embedding is refused, not dropped
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs"):
        load_upstream_state_dict(DynReferForRegionCaptioning(tiny_config), upstream["tensors"]["dynrefer"], strict=False)
    # misshaped and unknown keys
    misshaped = {**full, "cem_memory": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"shape mismatch[\s\S]*cem_memory"):
        load_upstream_state_dict(DynReferForRegionCaptioning(tiny_config), misshaped)
    with pytest.raises(UnknownKeysError, match="cvem_align.bogus"):
        load_upstream_state_dict(model, {**full, "cvem_align.bogus": torch.zeros(1)})


def test_converted_folder_generates_from_the_processors_output_as_the_pipeline(converted_dir):
    """The conventional call on a converted folder: the converter stored the tag vocabulary's tokenisation, and
    `model.generate(**processor(...))` post-processed by the processor gives the pipeline's records."""
    import numpy as np
    from transformers import AutoProcessor, pipeline

    out, _ = converted_dir
    model = DynReferForRegionCaptioning.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.control_prompt_tokens == processor.tokenize_tag_vocabulary(model.config.tag_names)
    image = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    boxes, controls = [[10, 12, 60, 70], [0, 0, 96, 80]], [["dog"], []]
    expected = pipeline("region-captioning", model=model, processor=processor, device="cpu")(
        image, boxes=boxes, controls=controls, max_new_tokens=4
    )
    inputs = processor(images=image, boxes=boxes, controls=controls)
    outputs = model.generate(**inputs, max_new_tokens=4)
    assert processor.post_process_region_captioning(outputs, inputs, model.config) == [expected]
