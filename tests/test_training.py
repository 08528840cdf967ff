"""Training pieces: control-word sampling, the collator, label-table embeddings, the label losses of the
model, the Trainer subclass, a plain Trainer and the evaluation loop, on tiny models and a few synthetic scenes."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_config, make_tiny_tokenizer

from dynrefer_hf.evaluation import evaluate_regions
from dynrefer_hf.image_processing_dynrefer import DynReferImageProcessor
from dynrefer_hf.metrics import attribute_map, cider_d, class_accuracy
from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning, attribute_label_loss
from dynrefer_hf.processing_dynrefer import DynReferProcessor
from dynrefer_hf.shapes import CONTEXT_LABEL_SIZES, SHAPES_VOCABULARY, context_labels, shapes_split
from dynrefer_hf.training import (
    RegionTrainer,
    RegionTrainingCollator,
    attribute_groups,
    bag_of_words_embeddings,
    sample_control_words,
)


@pytest.fixture(scope="module")
def scenes():
    return shapes_split("train", 2, seed=5)


def _processor():
    return DynReferProcessor(DynReferImageProcessor(size={"height": 56, "width": 56}), make_tiny_tokenizer())


def _shapes_model(seed=0):
    vocabulary = SHAPES_VOCABULARY
    config = make_tiny_config(
        tag_names=list(vocabulary.tags),
        attribute_names=list(vocabulary.attributes),
        attribute_group_sizes=[1] * len(vocabulary.attributes),
        attribute_prompts=[f"the {value}" for value in vocabulary.attribute_values],
        class_names=list(vocabulary.classes),
        class_prompts=[f"the {name}" for name in vocabulary.classes],
    )
    torch.manual_seed(seed)
    model = DynReferForRegionCaptioning(config)
    with torch.no_grad():  # distinct label embeddings
        for table in (model.clip_embeds, model.att_embeds, model.ov_embeds):
            table.normal_()
    return model


def test_bag_of_words_embeddings():
    table = bag_of_words_embeddings(["the red red circle", "Blue"], ["red", "blue", "circle"], dim=4)
    expected = torch.tensor([[2.0, 0, 1, 0], [0, 1, 0, 0]])
    torch.testing.assert_close(table, expected / expected.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="none of the embedding words"):
        bag_of_words_embeddings(["a dog"], ["red"])
    with pytest.raises(ValueError, match="smaller than"):
        bag_of_words_embeddings(["red"], ["red", "blue"], dim=1)


def test_sample_control_words_follows_upstream_rates():
    candidates = ["red", "circle", "blue"]
    rng = random.Random(0)
    draws = [sample_control_words(candidates, rng) for _ in range(4000)]
    assert all(set(draw) <= set(candidates) and len(draw) == len(set(draw)) for draw in draws)
    # empty: 0.5 (full drop) + 0.5 * 0.5**3 (every word dropped)
    assert np.mean([draw == [] for draw in draws]) == pytest.approx(0.5 + 0.5 * 0.125, abs=0.03)
    # each word kept with probability 0.5 * 0.5
    assert np.mean(["red" in draw for draw in draws]) == pytest.approx(0.25, abs=0.03)
    # shuffled: "circle" is not always after "red" when both are kept
    orders = {tuple(w for w in draw if w in ("red", "circle")) for draw in draws}
    assert {("red", "circle"), ("circle", "red")} <= orders
    again = random.Random(0)
    assert [sample_control_words(candidates, again) for _ in range(4000)] == draws


def test_collator_builds_every_target(scenes):
    records = [scenes[0], scenes[1]]
    collator = RegionTrainingCollator(_processor(), SHAPES_VOCABULARY, seed=3)
    batch = collator(records)
    regions = sum(len(record["boxes"]) for record in records)
    assert batch["pixel_values"].shape == (regions, 3, 3, 56, 56)
    assert batch["view_boxes"].shape == (regions, 3, 4)
    assert batch["labels"].shape[0] == regions and batch["input_ids"].shape[0] == regions
    flat_tags = [tags for record in records for tags in record["tags"]]
    for row, tags in zip(batch["tag_labels"], flat_tags):
        assert {SHAPES_VOCABULARY.tags[i] for i in row.nonzero().flatten().tolist()} == set(tags)
    expected_attributes = [labels for record in records for labels in record["attributes"]]
    assert batch["attribute_labels"].tolist() == expected_attributes
    assert batch["class_labels"].tolist() == [label for record in records for label in record["classes"]]
    # view 0 is the tight box and the others are drawn at random, reproducibly from the seed
    again = RegionTrainingCollator(_processor(), SHAPES_VOCABULARY, seed=3)(records)
    for key in batch:
        torch.testing.assert_close(batch[key], again[key])
    other = RegionTrainingCollator(_processor(), SHAPES_VOCABULARY, seed=4)(records)
    assert not torch.equal(batch["pixel_values"], other["pixel_values"])
    assert "probe_labels" not in batch
    with_context = RegionTrainingCollator(_processor(), SHAPES_VOCABULARY, seed=3, caption_labels=context_labels)
    captions = [caption for record in records for caption in record["captions"]]
    assert with_context(records)["probe_labels"].tolist() == [context_labels(c) for c in captions]
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


@pytest.mark.slow
def test_label_losses_in_forward_against_a_direct_computation(scenes):
    model = _shapes_model().eval()
    model.config.attribute_label_loss_weight = 0.5
    model.config.class_label_loss_weight = 2.0
    views = _processor().image_processor(list(scenes["image"]), boxes=list(scenes["boxes"]))
    regions = views["pixel_values"].shape[0]
    generator = torch.Generator().manual_seed(0)
    attribute_labels = torch.randint(-1, 2, (regions, model.config.num_attributes), generator=generator)
    class_labels = torch.tensor([(3 * row) % 6 - (row == 1) for row in range(regions)])  # region 1: no class
    # the region's colour, texture and size: exactly one positive in each group, but for the last region
    groups = attribute_groups(model.config.attribute_names)
    single = torch.zeros(regions, model.config.num_attributes, dtype=torch.long)
    for row in range(regions - 1):
        for columns in groups:
            single[row, columns[row % len(columns)]] = 1
    single[-1] = -1

    inputs = {"pixel_values": views["pixel_values"], "view_boxes": views["view_boxes"]}
    with torch.no_grad():
        bce = model(**inputs, attribute_labels=attribute_labels, class_labels=class_labels)
        model.config.attribute_label_loss = "group_softmax"
        softmax = model(**inputs, attribute_labels=single)
        queries = bce.region_queries
        scale, bias = model.attr_t.exp(), model.attr_b
        logits = model.attribute_similarity(queries, model.att_embeds) * scale + bias  # one prompt per attribute
        class_logits = model.attribute_similarity(queries, model.ov_embeds) * scale

    kept = attribute_labels != -1
    expected_bce = F.binary_cross_entropy_with_logits(logits[kept], attribute_labels[kept].float())
    torch.testing.assert_close(bce.loss_attribute, 0.5 * expected_bce)
    expected_class = np.mean(
        [
            -torch.log_softmax(class_logits[row], 0)[label].item()
            for row, label in enumerate(class_labels.tolist())
            if label >= 0
        ]
    )
    assert bce.loss_class.item() == pytest.approx(2.0 * expected_class, rel=1e-5)
    assert bce.loss.item() == pytest.approx(bce.loss_attribute.item() + bce.loss_class.item(), rel=1e-6)
    assert bce.loss_caption is None and bce.loss_tag is None and bce.loss_region_text is None
    terms = [
        -torch.log_softmax(logits[row, columns], 0)[single[row, columns].argmax()].item()
        for row in range(regions - 1)
        for columns in groups
    ]
    assert softmax.loss_attribute.item() == pytest.approx(0.5 * np.mean(terms), rel=1e-5)
    assert softmax.loss_class is None
    model.config.class_label_loss_weight = 0.0  # a zero weight turns the loss off
    assert model(**inputs, class_labels=class_labels).loss is None
    with pytest.raises(ValueError, match="must be one of"):
        attribute_label_loss(logits, single, "hinge")
    with pytest.raises(ValueError, match="class_labels"):
        model(**inputs, class_labels=class_labels[:-1])


def test_attribute_pooling_is_shared_by_predictions_and_losses():
    model = make_tiny_model_with_groups()
    prompt_scores = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.5, 0.4], [0.7, 0.2, 0.8, 0.6, 0.1, 0.3]])
    # groups of 2, 1 and 3 prompts: the max of each
    expected = torch.tensor([[0.9, 0.3, 0.5], [0.7, 0.8, 0.6]])
    torch.testing.assert_close(model.pool_attribute_prompts(prompt_scores), expected)


def make_tiny_model_with_groups():
    from tiny import make_tiny_model

    return make_tiny_model()


@pytest.mark.slow
def test_region_trainer_trains_and_logs_every_loss_part(scenes, tmp_path):
    from transformers import TrainingArguments

    model = _shapes_model()
    model.config.attribute_label_loss = "group_softmax"
    model.set_trainable([name for name, _ in model.named_children()])
    before = model.attr_fc.weight.detach().clone()
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RegionTrainer(
        model=model,
        args=arguments,
        train_dataset=scenes,
        data_collator=RegionTrainingCollator(_processor(), SHAPES_VOCABULARY),
        probe_loss_weight=1.0,
    )
    probe_before = trainer.probe.weight.detach().clone()
    assert trainer.probe.out_features == model.config.num_classes + model.config.num_attributes + model.config.num_tags
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        parts = ("loss_caption", "loss_tag", "loss_attribute", "loss_class", "loss_probe")
        assert set(parts) <= set(entry) and all(np.isfinite(entry[key]) for key in parts)
    assert not torch.equal(before, model.attr_fc.weight)
    assert not torch.equal(probe_before, trainer.probe.weight)  # the probe is optimised with the model
    assert not any(name.startswith("probe") for name in model.state_dict())  # and is not part of it


@pytest.mark.slow
def test_plain_trainer_trains_every_head(scenes, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _shapes_model()
    model.set_trainable([name for name, _ in model.named_children()])
    heads = ("tag_fc", "attr_fc", "language_projection")
    before = {name: getattr(model, name).weight.detach().clone() for name in heads}
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=1, report_to=[],
        remove_unused_columns=False, use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    collator = RegionTrainingCollator(_processor(), SHAPES_VOCABULARY)
    batch = collator([scenes[0]])
    with torch.no_grad():
        output = model(**batch)
    assert all(output[name] is not None for name in ("loss_caption", "loss_tag", "loss_attribute", "loss_class"))
    Trainer(model=model, args=arguments, train_dataset=scenes, data_collator=collator).train()
    assert all(not torch.equal(before[name], getattr(model, name).weight) for name in heads)


@pytest.mark.slow
def test_probe_label_sizes_add_one_cross_entropy_per_caption_label(scenes, tmp_path):
    from transformers import TrainingArguments

    model = _shapes_model()
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = RegionTrainer(
        model=model, args=arguments, probe_loss_weight=1.0, probe_label_sizes=CONTEXT_LABEL_SIZES
    )
    config = model.config
    own = config.num_classes + config.num_attributes + config.num_tags
    assert trainer.probe.out_features == own + sum(CONTEXT_LABEL_SIZES)
    regions = 4
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(regions, config.num_query_tokens, config.qformer_config.hidden_size, generator=generator)
    nothing_else = torch.full((regions, config.num_attributes), -1)
    no_class = torch.full((regions,), -1)
    probe_labels = torch.tensor([[0, 2, 1], [3, 6, -1], [1, 0, 5], [-1, -1, -1]])
    with torch.no_grad():
        loss = trainer._probe_loss(queries, nothing_else, no_class, None, probe_labels)
        extra = trainer.probe(queries.mean(dim=1))[:, own:].split(list(CONTEXT_LABEL_SIZES), dim=1)
    expected = sum(
        np.mean(
            [
                -torch.log_softmax(extra[column][row], 0)[label].item()
                for row, label in enumerate(probe_labels[:, column].tolist())
                if label >= 0
            ]
        )
        for column in range(3)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="probe_labels"):
        trainer._probe_loss(queries, nothing_else, no_class, None, None)
    # A collated batch: the probe takes probe_labels, the model never sees them.
    batch = RegionTrainingCollator(_processor(), SHAPES_VOCABULARY, caption_labels=context_labels)([scenes[0]])
    loss = trainer.compute_loss(model, batch)
    assert torch.isfinite(loss) and "probe_labels" not in batch
    with pytest.raises(ValueError, match="probe_loss_weight"):
        RegionTrainer(model=model, args=arguments, probe_label_sizes=(4,))
    with pytest.raises(ValueError, match="at least 2 classes"):
        RegionTrainer(model=model, args=arguments, probe_loss_weight=1.0, probe_label_sizes=(1,))


def test_evaluate_regions_scores_the_predictions(scenes):
    model = _shapes_model().eval()
    result = evaluate_regions(model, _processor(), scenes, batch_images=1, max_new_tokens=4, num_beams=1)
    references = [caption for captions in scenes["captions"] for caption in captions]
    assert result.num_regions == len(references) == len(result.predictions)
    candidates = [prediction["caption"] for prediction in result.predictions]
    assert result.cider_d == pytest.approx(cider_d(candidates, [[r] for r in references]).score)
    labels = np.array([labels for rows in scenes["attributes"] for labels in rows])
    scores = np.array([prediction["attribute_scores"] for prediction in result.predictions])
    assert result.attribute_map == pytest.approx(attribute_map(scores, labels).map)
    classes = np.array([label for labels in scenes["classes"] for label in labels])
    class_scores = np.array([prediction["class_scores"] for prediction in result.predictions])
    assert result.class_accuracy == pytest.approx(class_accuracy(class_scores, classes))
    assert set(result.percentages()) == {"cider_d", "attribute_map", "class_accuracy"}


def test_sincos_position_embeddings_encode_rows_and_columns():
    from dynrefer_hf.shapes import sincos_position_embeddings

    grid, width = 4, 16
    table = sincos_position_embeddings(grid, width)
    assert table.shape == (1 + grid * grid, width) and not table[0].any()  # the class token gets zeros
    frequencies = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4))
    for row in range(grid):
        for column in range(grid):
            expected = np.concatenate(
                [
                    np.sin(row * frequencies),
                    np.cos(row * frequencies),
                    np.sin(column * frequencies),
                    np.cos(column * frequencies),
                ]
            )
            np.testing.assert_allclose(table[1 + row * grid + column].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embeddings(grid, 18)
