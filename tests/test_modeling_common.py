"""transformers' common model tests (ModelTesterMixin, ConfigTester) on a tiny DynRefer, as a model inside
transformers is tested. The mixins come from the installed version's source distribution (transformers_common.py).
Each skipped common test says in one line why it does not apply."""

import unittest
from typing import ClassVar

import pytest
import torch
from tiny import make_tiny_config
from transformers_common import load_common_tests

from dynrefer_hf.configuration_dynrefer import DynReferConfig
from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning

test_modeling_common, test_configuration_common = load_common_tests()
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester
floats_tensor = test_modeling_common.floats_tensor
ids_tensor = test_modeling_common.ids_tensor


class DynReferModelTester:
    """Tiny DynRefer: 1-layer ViT on 28 px views (patch 14), 2 views, 1-layer Q-Former, 1+1-layer T5."""

    def __init__(self, parent, batch_size=7, seq_length=5, label_length=5, is_training=True):
        self.parent = parent
        self.batch_size = batch_size  # regions (7: the batch the eager-vs-SDPA test builds)
        self.seq_length = seq_length  # control-prompt tokens
        self.label_length = label_length
        self.is_training = is_training
        self.num_views = 2
        self.image_size = 28
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 1
        self.num_attention_heads = 4

    def get_config(self) -> DynReferConfig:
        return make_tiny_config(
            vision_config={
                "hidden_size": self.hidden_size,
                "intermediate_size": 37,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "image_size": self.image_size,
                "patch_size": 14,
                "initializer_range": 0.02,
            },
            qformer_config={
                "hidden_size": self.hidden_size,
                "intermediate_size": 37,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "cross_attention_frequency": 1,
            },
            text_config={
                "model_type": "t5",
                "vocab_size": self.vocab_size,
                "d_model": self.hidden_size,
                "d_kv": 8,
                "d_ff": 37,
                "num_layers": self.num_hidden_layers,
                "num_decoder_layers": self.num_hidden_layers,
                "num_heads": self.num_attention_heads,
                "feed_forward_proj": "gated-gelu",
                "dense_act_fn": "gelu",
                "tie_word_embeddings": False,
                "decoder_start_token_id": 0,
                "pad_token_id": 0,
                "eos_token_id": 1,
            },
            num_views=self.num_views,
            num_query_tokens=4,
            head_num_layers=1,
            head_hidden_size=16,
            head_num_attention_heads=2,
            head_intermediate_size=24,
            text_embed_dim=16,
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = floats_tensor(
            [self.batch_size, self.num_views, 3, self.image_size, self.image_size]
        )
        corners = torch.tensor([[2.0, 3.0], [0.0, 1.0]]).expand(self.batch_size, -1, -1)
        view_boxes = torch.cat([corners, corners + torch.tensor([20.0, 17.0])], dim=-1)
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        attention_mask = torch.ones_like(input_ids)
        labels = ids_tensor([self.batch_size, self.label_length], self.vocab_size - 2) + 2
        return config, pixel_values, view_boxes.contiguous(), input_ids, attention_mask, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, view_boxes, input_ids, attention_mask, labels = self.prepare_config_and_inputs()
        inputs_dict = {
            "pixel_values": pixel_values,
            "view_boxes": view_boxes,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            # the common tests use the main input as decoder input unless one is given
            "decoder_input_ids": labels,
        }
        return config, inputs_dict


class DynReferModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DynReferForRegionCaptioning,)
    is_encoder_decoder = True
    additional_model_inputs: ClassVar[list[str]] = ["view_boxes"]  # the target box in every view: part of the image input
    test_resize_embeddings = False  # the language model's embeddings; resizing them is T5's, tested there

    def setUp(self):
        self.model_tester = DynReferModelTester(self)
        self.config_tester = ConfigTester(self, config_class=DynReferConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:  # a target for every head, so that training reaches every parameter
            tester, config = self.model_tester, self.model_tester.get_config()
            regions = tester.batch_size
            inputs_dict["tag_labels"] = (torch.arange(regions * config.num_tags).view(regions, -1) % 3 == 0).float()
            inputs_dict["attribute_labels"] = torch.arange(regions * config.num_attributes).view(regions, -1) % 3 - 1
            inputs_dict["class_labels"] = torch.arange(regions) % config.num_classes
            # fixed values: the common tests prepare the inputs twice and compare the two outputs
            inputs_dict["caption_embeds"] = torch.linspace(-1, 1, regions * config.text_embed_dim).view(regions, -1)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    # the slowest common tests (seconds each on a busy 2-core machine) run in the full suite only
    @pytest.mark.slow
    def test_bc_torch_dtype(self):
        super().test_bc_torch_dtype()

    @pytest.mark.slow
    def test_model_outputs_equivalence(self):
        super().test_model_outputs_equivalence()

    @pytest.mark.slow
    def test_training_gradient_checkpointing(self):
        super().test_training_gradient_checkpointing()

    @pytest.mark.slow
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        super().test_training_gradient_checkpointing_use_reentrant_false()

    @pytest.mark.slow
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        super().test_training_gradient_checkpointing_use_reentrant_true()

    @unittest.skip("no separate base model: the region encoder, the heads and the LM sit side by side (as BLIP-2's)")
    def test_model_base_model_prefix(self):
        pass

    @unittest.skip("generate's tests live in transformers' tests/generation (not in the sdist); see test_modeling.py")
    def test_generation_tester_mixin_inheritance(self):
        pass

    @unittest.skip("attentions are nested per sub-model (vision/qformer/language_model_outputs, BLIP-2's layout); test_modeling.py checks them")
    def test_attention_outputs(self):
        pass

    @unittest.skip("hidden states are nested per sub-model (BLIP-2's layout); test_modeling.py checks them")
    def test_hidden_states_output(self):
        pass

    @unittest.skip("hidden states and attentions are nested per sub-model (BLIP-2's layout); test_modeling.py checks them")
    def test_retain_grad_hidden_states_attentions(self):
        pass


# One skip for every parameterised case of the eager-vs-SDPA test (parameterized names them `..._00_fp16_...`).
_SDPA_SKIP = unittest.skip(
    "picks the compared tensor by top-level key or a 'blip' class name; ours are nested per sub-model "
    "(BLIP-2's layout); test_modeling.py compares the eager and SDPA label heads"
)
for _name in [name for name in dir(ModelTesterMixin) if name.startswith("test_eager_matches_sdpa_inference")]:
    setattr(DynReferModelTest, _name, _SDPA_SKIP(lambda self: None))


if __name__ == "__main__":
    unittest.main()
