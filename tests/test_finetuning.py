"""Fine-tuning helpers in one process: LoRA on the language model (targets, trainable set, merge), the
caption collator and the caption-embedding trainer. Multi-process runs are in test_distributed.py."""

import pytest
import torch
from tiny import make_tiny_model, make_tiny_tokenizer
from torch import nn

from dynrefer_hf.configuration_dynrefer import DEFAULT_TRAINABLE_MODULES
from dynrefer_hf.data import validate_region_record
from dynrefer_hf.shapes import SHAPES_VOCABULARY, shapes_split
from dynrefer_hf.training import (
    UPSTREAM_LORA_TARGETS,
    CaptionEmbeddingCollator,
    CaptionEmbeddingTrainer,
    OneRegionPerSample,
    RegionTrainer,
    add_language_model_lora,
    language_model_lora_config,
    merge_language_model_lora,
)


def _views(regions=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(regions, 3, 3, 56, 56, generator=generator)
    view_boxes = torch.tensor([[0.0, 0.0, 56.0, 56.0], [10.0, 12.0, 40.0, 44.0], [20.0, 18.0, 31.0, 30.0]])
    return pixel_values, view_boxes.expand(regions, 3, 4).clone()


def _caption_batch(regions=2):
    tokenizer = make_tiny_tokenizer()
    control = tokenizer(["person,dog|", "|"][:regions], padding="longest", return_tensors="pt")
    target = tokenizer(
        ["a white dog lying on green grass", "a parked car"][:regions], padding="longest", return_tensors="pt"
    )
    return {
        "input_ids": control.input_ids,
        "attention_mask": control.attention_mask,
        "labels": target.input_ids.masked_fill(target.attention_mask == 0, -100),
        "decoder_attention_mask": target.attention_mask,
    }


def test_upstream_targets_are_what_peft_matched_in_upstreams_t5_layout():
    """In transformers < 5 a T5 stack's embed_tokens *is* the shared embedding: named_modules lists it once,
    as "shared", so upstream's "embed_tokens" target wraps nothing (docs/upstream/model.md §14)."""
    from peft import LoraConfig, get_peft_model

    class Stack(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.embed_tokens, self.q, self.v, self.o = (
                shared,
                nn.Linear(4, 4),
                nn.Linear(4, 4),
                nn.Linear(4, 4),
            )

    class OldT5(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Embedding(10, 4)
            self.encoder, self.decoder = Stack(self.shared), Stack(self.shared)
            self.lm_head = nn.Linear(4, 10)

    upstream = LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q", "v"])
    wrapped = get_peft_model(OldT5(), upstream)
    adapted = {
        name.split(".lora_")[0].removeprefix("base_model.model.")
        for name, _ in wrapped.named_parameters()
        if "lora_" in name
    }
    assert adapted == {"encoder.q", "encoder.v", "decoder.q", "decoder.v", "lm_head"}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(UPSTREAM_LORA_TARGETS)


def test_lora_wraps_only_language_model_q_v_and_lm_head_and_keeps_the_trainable_modules():
    model = make_tiny_model()
    model.language_model.to(torch.bfloat16)  # as after to_upstream_precision()
    peft_model = add_language_model_lora(model)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 128, 0.0)

    lora_modules = {name.split(".lora_")[0] for name, _ in peft_model.named_parameters() if "lora_" in name}
    expected = {
        name
        for name, _ in make_tiny_model().named_modules()
        if name.startswith("language_model.") and name.rsplit(".", 1)[-1] in ("q", "v", "lm_head")
    }
    assert {name.removeprefix("base_model.model.") for name in lora_modules} == expected
    assert len(expected) == 2 * 2 + 2 * 4 + 1  # encoder self q/v, decoder self + cross q/v, lm_head

    trainable = {
        name.removeprefix("base_model.model.") for name, p in peft_model.named_parameters() if p.requires_grad
    }
    assert {name.split(".")[0] for name in trainable if "lora_" not in name} == set(DEFAULT_TRAINABLE_MODULES)
    assert all(name.startswith(DEFAULT_TRAINABLE_MODULES) or "lora_" in name for name in trainable)
    assert all(
        p.dtype == torch.float32 for p in model.language_model.parameters()
    )  # cast to fp32 as upstream


@pytest.mark.slow
def test_merged_lora_model_computes_what_the_adapted_model_computes(tmp_path):
    model = make_tiny_model()
    peft_model = add_language_model_lora(model, language_model_lora_config(r=4, lora_alpha=8))
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect to merge
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    pixel_values, view_boxes = _views()
    batch = _caption_batch()
    with torch.no_grad():
        adapted = peft_model(pixel_values=pixel_values, view_boxes=view_boxes, **batch)
        plain = make_tiny_model()(pixel_values=pixel_values, view_boxes=view_boxes, **batch)
    assert not torch.allclose(adapted.logits, plain.logits, atol=1e-3)

    merged = merge_language_model_lora(peft_model)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert {name.split(".")[0] for name, p in merged.named_parameters() if p.requires_grad} == set(
        DEFAULT_TRAINABLE_MODULES
    )
    merged.save_pretrained(tmp_path)
    reloaded = type(merged).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(pixel_values=pixel_values, view_boxes=view_boxes, **batch)
    torch.testing.assert_close(again.logits, adapted.logits, rtol=1e-4, atol=1e-4)


def test_lora_config_rejects_bad_targets():
    with pytest.raises(ValueError, match="plain module names"):
        language_model_lora_config(targets=[".*q"])
    with pytest.raises(ValueError, match="plain module names"):
        language_model_lora_config(targets=[])
    with pytest.raises(ValueError, match="not found in the base model"):
        add_language_model_lora(make_tiny_model(), language_model_lora_config(targets=["query"]))


def test_caption_embedding_collator_feeds_the_contrastive_loss(tmp_path):
    from transformers import TrainingArguments

    pixel_values, view_boxes = _views(regions=3)
    model = make_tiny_model()
    seen = []

    def encode(captions):
        seen.append(captions)
        return torch.randn(
            len(captions), model.config.text_embed_dim, generator=torch.Generator().manual_seed(1)
        )

    records = [{"boxes": [[0, 0, 1, 1]] * 2, "captions": ["a", "b"]}, {"boxes": [[0, 0, 1, 1]], "captions": ["c"]}]
    collator = CaptionEmbeddingCollator(
        lambda records: {"pixel_values": pixel_values, "view_boxes": view_boxes}, encode
    )
    batch = collator(records)
    assert seen == [["a", "b", "c"]]
    torch.testing.assert_close(batch["caption_embeds"], encode(["a", "b", "c"]))
    with pytest.raises(ValueError, match="3 regions"):
        collator([{"boxes": [[0, 0, 1, 1]], "captions": ["a"]}])

    arguments = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = RegionTrainer(model=model, args=arguments)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    expected = model(pixel_values, view_boxes, caption_embeds=batch["caption_embeds"]).loss_region_text
    torch.testing.assert_close(loss, expected)
    assert outputs.contrastive_logits.shape == (3, 3)
    with pytest.raises(ValueError, match="no target"):
        trainer.compute_loss(model, {"pixel_values": pixel_values, "view_boxes": view_boxes})
    with pytest.warns(FutureWarning, match="CaptionEmbeddingTrainer"):
        shim = CaptionEmbeddingTrainer(model=model, args=arguments, caption_encoder=encode, data_collator=len)
    assert isinstance(shim, RegionTrainer) and isinstance(shim.data_collator, CaptionEmbeddingCollator)
    with pytest.warns(FutureWarning, match="attribute_label_loss"):
        RegionTrainer(model=model, args=arguments, attribute_loss="group_softmax")
    assert model.config.attribute_label_loss == "group_softmax"

    # upstream's weight-decay rule: matrices only, no biases, norms, cem_memory or the logit scale and bias
    decayed = set(trainer.get_decay_parameter_names(model))
    assert {"cem_memory", "attr_t", "attr_b", "qformer.layernorm.weight", "attr_fc.bias"}.isdisjoint(decayed)
    assert {"attr_fc.weight", "language_projection.weight", "query_tokens"} <= decayed


def test_one_region_per_sample_splits_records_without_losing_regions():
    scenes = shapes_split("train", 3, seed=2)
    for source in (
        scenes,
        [scenes[i] for i in range(len(scenes))],
    ):  # a datasets.Dataset or a list of records
        samples = OneRegionPerSample(source)
        assert len(samples) == sum(len(boxes) for boxes in scenes["boxes"])
        position = 0
        for record in scenes:
            for region in range(len(record["boxes"])):
                sample = samples[position]
                validate_region_record(sample, SHAPES_VOCABULARY)
                assert (
                    sample["image_id"] == record["image_id"] and sample["image"].size == record["image"].size
                )
                for key in ("boxes", "captions", "tags", "attributes", "classes"):
                    assert sample[key] == [record[key][region]], key
                position += 1
    with pytest.raises(ValueError, match="no region"):
        OneRegionPerSample([{"boxes": []}])


@pytest.mark.slow
def test_lora_checkpoints_keep_the_other_trained_modules_and_resume(tmp_path):
    from transformers import TrainingArguments

    pixel_values, view_boxes = _views()
    batch = _caption_batch()
    examples = [
        {"pixel_values": pixel_values[i], "view_boxes": view_boxes[i], **{k: v[i] for k, v in batch.items()}}
        for i in range(2)
    ]

    def collate(features):
        return {key: torch.stack([feature[key] for feature in features]) for key in features[0]}

    def run(max_steps, resume=None):
        model = add_language_model_lora(make_tiny_model(), language_model_lora_config(r=4, lora_alpha=8))
        arguments = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            save_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = RegionTrainer(model=model, args=arguments, train_dataset=examples, data_collator=collate)
        trainer.train(resume_from_checkpoint=resume)
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    trained = run(2)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (
        checkpoint / "trained_modules.safetensors"
    ).is_file()
    untrained = {
        name: p.detach().clone() for name, p in add_language_model_lora(make_tiny_model()).named_parameters()
    }
    assert not torch.equal(
        trained["base_model.model.qformer.layernorm.weight"],
        untrained["base_model.model.qformer.layernorm.weight"],
    )

    resumed = run(2, resume=str(checkpoint))  # nothing left to train: the loaded state is the result
    assert set(resumed) == set(trained)
    for name in trained:
        torch.testing.assert_close(resumed[name], trained[name], rtol=0, atol=0, msg=name)
