"""DynReferConfig: released defaults (docs/upstream/model.md §2-§17), vocabularies, serialisation, Auto registration."""

import json
import math

import pytest
from tiny import make_tiny_config
from transformers import AutoConfig, Blip2QFormerConfig, Blip2VisionConfig, CLIPTextConfig, GenerationConfig

import dynrefer_hf  # noqa: F401  (registers the Auto classes)
from dynrefer_hf.configuration_dynrefer import DEFAULT_TRAINABLE_MODULES, DynReferConfig


@pytest.fixture(scope="module")
def released():
    return DynReferConfig()


def test_vision_defaults_are_eva_vit_g(released):
    vision = released.vision_config
    assert isinstance(vision, Blip2VisionConfig)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1408, 39, 16)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (6144, 14, 224)
    assert vision.hidden_act == "gelu" and vision.layer_norm_eps == 1e-6 and vision.qkv_bias
    assert released.ln_vision_eps == 1e-5


def test_qformer_defaults(released):
    qformer = released.qformer_config
    assert isinstance(qformer, Blip2QFormerConfig)
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.num_attention_heads) == (768, 12, 12)
    assert (qformer.intermediate_size, qformer.cross_attention_frequency) == (3072, 2)
    assert qformer.encoder_hidden_size == 1408 and qformer.layer_norm_eps == 1e-12
    assert released.num_query_tokens == 32


def test_text_defaults_are_flan_t5_xl_with_exact_gelu(released):
    text = released.text_config
    assert text.model_type == "t5"
    assert (text.d_model, text.d_ff, text.num_layers, text.num_decoder_layers, text.num_heads) == (
        2048,
        5120,
        24,
        24,
        32,
    )
    assert text.vocab_size == 32128 and text.is_gated_act
    assert text.dense_act_fn == "gelu"  # LAVIS override of Flan-T5's gelu_new
    assert text.scale_decoder_outputs is False  # T5 v1.1: no d_model**-0.5 rescaling before lm_head
    assert (text.decoder_start_token_id, text.eos_token_id, text.pad_token_id) == (0, 1, 0)
    assert released.is_encoder_decoder and not released.use_decoder_only_language_model
    assert released.text_encoder_config is None


def test_module_knobs(released):
    c = released
    assert c.num_views == 3
    assert c.roi_output_size == 16 and math.isclose(c.roi_spatial_scale, 1 / 14)
    assert c.roi_sampling_ratio == 2 and c.roi_aligned is False
    assert (c.align_group, c.align_kernel_size, c.align_offset_scale, c.align_dw_kernel_size) == (
        4,
        3,
        1.0,
        3,
    )
    assert c.align_offset_mask_channels == 112  # ceil(4 * 9 * 3 / 8) * 8
    assert (c.head_num_layers, c.head_hidden_size, c.head_num_attention_heads, c.head_intermediate_size) == (
        2,
        256,
        4,
        1024,
    )
    assert c.text_embed_dim == 1024
    assert (c.tag_loss_weight, c.attr_loss_weight) == (0.01, 0.5)
    assert (c.asl_gamma_neg, c.asl_gamma_pos, c.asl_clip, c.asl_eps) == (7, 0, 0.05, 1e-8)
    assert math.isclose(c.attr_logit_scale_init, math.log(10)) and c.attr_logit_bias_init == -10
    assert c.tag_threshold == 0.7 and c.max_text_length == 32
    assert c.trainable_modules == list(DEFAULT_TRAINABLE_MODULES)


def test_derived_roi_geometry_follows_the_vision_tower():
    config = DynReferConfig(vision_config={"image_size": 112, "patch_size": 8, "hidden_size": 64})
    assert config.roi_output_size == 14 and math.isclose(config.roi_spatial_scale, 1 / 8)
    assert config.qformer_config.encoder_hidden_size == 64


def test_default_vocabularies_come_from_the_shipped_files(released):
    resources = __import__("importlib").resources.files("dynrefer_hf") / "resources"
    tags = [t.strip() for t in (resources / "ram_tag_list.txt").read_text().splitlines() if t.strip()]
    ovad = json.loads((resources / "ovad" / "ovad_att_templates.json").read_text())
    coco = json.loads((resources / "coco.json").read_text())
    assert released.tag_names == tags and released.num_tags == 4585
    assert released.attribute_prompts == ovad["templates"] and released.num_attribute_prompts == 474
    assert released.attribute_group_sizes == ovad["group_sizes"] and released.num_attributes == 117
    assert sum(released.attribute_group_sizes) == 474
    assert released.class_names == coco and released.num_classes == 80
    assert released.class_prompts == [f"the {name.lower()}" for name in coco]


def test_released_generation_config(released):
    generation = released.released_generation_config()
    assert isinstance(generation, GenerationConfig)
    assert (generation.num_beams, generation.max_new_tokens, generation.min_length) == (2, 20, 1)
    assert (generation.repetition_penalty, generation.length_penalty, generation.do_sample) == (
        1.5,
        0.0,
        False,
    )
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 1, 0)


def test_save_load_and_auto_config_round_trip(tmp_path, released):
    released.save_pretrained(tmp_path)
    for loaded in (DynReferConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is DynReferConfig
        assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == {
            k: v for k, v in released.to_dict().items() if k != "_name_or_path"
        }
        assert loaded.text_config.dense_act_fn == "gelu" and loaded.text_config.scale_decoder_outputs is False
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dynrefer" and len(saved["tag_names"]) == 4585


def test_custom_vocabulary_round_trips(tmp_path):
    config = make_tiny_config()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.tag_names == config.tag_names and loaded.num_tags == 12
    assert loaded.attribute_group_sizes == [2, 1, 3] and loaded.num_attributes == 3
    assert loaded.class_names == config.class_names


def test_causal_language_model_config():
    config = make_tiny_config(
        text_config={
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        }
    )
    assert config.use_decoder_only_language_model and not config.is_encoder_decoder


def test_text_encoder_config_is_optional_clip():
    config = make_tiny_config(text_encoder_config={"hidden_size": 32, "projection_dim": 32})
    assert isinstance(config.text_encoder_config, CLIPTextConfig)
    assert config.text_encoder_config.projection_dim == 32


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attribute_group_sizes": [2, 1, 2]}, "sum to"),
        ({"attribute_names": ["a", "b"]}, "attribute groups"),
        ({"class_prompts": ["the person"]}, "class_prompts"),
        ({"attribute_group_sizes": [3, 0, 3]}, "at least one prompt"),
    ],
)
def test_inconsistent_vocabularies_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_views": 0}, "num_views"),
        ({"align_kernel_size": 2}, "odd"),
        ({"align_group": 3}, "divisible by align_group"),
        ({"head_num_attention_heads": 5}, "head_hidden_size"),
    ],
)
def test_inconsistent_architecture_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_config(**overrides)
