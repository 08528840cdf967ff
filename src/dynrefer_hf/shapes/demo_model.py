"""The embedded demonstration model: a small DynRefer trained from scratch on the synthetic shapes scenes.

No pretrained vision tower, language model or CLIP text tower is available offline, so everything is
trained here: the vision tower and the language model too (the released model freezes them), a T5-style
tokenizer is trained on the captions, and the label-embedding tables (tags, attribute prompts, class
prompts) are fixed bag-of-words vectors over the shapes vocabulary (`bag_of_words_embeddings`) instead of
EVA-CLIP text embeddings. The attribute and class heads are trained directly on the region labels (the
model's `loss_attribute` and `loss_class`); the region-caption contrastive loss, which needs a text encoder,
is not used.

``train_shapes_demo`` is what ``dynrefer train-demo`` and ``examples/train_shapes.py`` run; the model it
produced ships in ``dynrefer_hf/pretrained/shapes-demo`` (see its model card, docs/demo_model.md).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from ..configuration_dynrefer import DynReferConfig
from ..evaluation import RegionEvaluation, evaluate_regions
from ..image_processing_dynrefer import DynReferImageProcessor
from ..modeling_dynrefer import DynReferForRegionCaptioning
from ..pretrained import SHAPES_DEMO_PATH
from ..processing_dynrefer import DynReferProcessor
from ..prompts import ControlPromptTokens, format_control_prompt
from ..training import RegionTrainer, bag_of_words_embeddings
from ..training.collator import RegionTrainingCollator
from .scenes import (
    CONTEXT_FIELDS,
    CONTEXT_LABEL_SIZES,
    SHAPES_VOCABULARY,
    caption_field_accuracy,
    context_labels,
    shapes_split,
)
from .tokenizer import train_t5_style_tokenizer

__all__ = [
    "SHAPES_DEMO_PATH",
    "DemoTrainingRun",
    "ShapesDemoSettings",
    "TimeLimitCallback",
    "ValidationCurveCallback",
    "build_demo_model",
    "build_demo_processor",
    "calibrate_tag_threshold",
    "demo_scores",
    "evaluate_demo_model",
    "sincos_position_embeddings",
    "train_demo_model",
    "train_shapes_demo",
]

# The words of the label-embedding tables: every tag, attribute value and class is one of them.
_EMBEDDING_WORDS = SHAPES_VOCABULARY.tags


@dataclass
class ShapesDemoSettings:
    """Everything that defines a demonstration run (saved with the model as ``training_settings.json``).

    The view settings are what the view ablation (benchmarks/ablation_views.py) varies: ``num_views``
    views of ``view_size`` pixels, trained with ``train_view_selection`` (``"random"`` = upstream's random
    t, or a list of fixed t for views 1..V-1) and evaluated with ``eval_view_selection`` / ``eval_task``.
    ``sincos_positions`` starts the ViT's (learnt) position embeddings from 2-D sine-cosine values
    (`sincos_position_embeddings`) instead of small random ones. ``context_probe`` adds the caption's context
    words (relation, neighbour colour and class) to the probe's targets (`context_labels`);
    ``validation_steps > 0`` scores the model on the validation scenes every that many steps
    (`ValidationCurveCallback`).
    """

    num_train_images: int = 2400
    num_test_images: int = 200
    num_validation_images: int = 50
    seed: int = 0
    data_seed: int = 0
    epochs: float = 4.0
    batch_images: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    max_train_minutes: float = 28.0
    view_size: int = 64
    patch_size: int = 8
    num_views: int = 3
    train_view_selection: str | list[float] = "random"
    eval_view_selection: str | list[float] = "image_prior"
    eval_task: str | None = None
    vision_width: int = 96
    vision_layers: int = 4
    language_width: int = 128
    language_layers: int = 2
    num_query_tokens: int = 8
    tokenizer_vocab_size: int = 200
    logging_steps: int = 25
    eval_batch_images: int = 8
    ci_subset_images: int = 16
    context_probe: bool = False
    sincos_positions: bool = False
    validation_steps: int = 0


def _all_parameters_trainable(model: DynReferForRegionCaptioning) -> list[str]:
    children = [name for name, _ in model.named_children()]
    return children + [name for name, _ in model.named_parameters(recurse=False)]


def build_demo_processor(
    captions: Sequence[str], region_tags: Sequence[Sequence[str]], settings: ShapesDemoSettings
):
    """A `DynReferProcessor` with a tokenizer trained on ``captions`` and the control prompts of ``region_tags``."""
    prompts = [format_control_prompt(tags) for tags in region_tags]
    tokenizer = train_t5_style_tokenizer([*captions, *prompts], vocab_size=settings.tokenizer_vocab_size)
    image_processor = DynReferImageProcessor(
        size={"height": settings.view_size, "width": settings.view_size},
        num_views=settings.num_views,
        view_selection=settings.eval_view_selection,
        task=settings.eval_task,
    )
    return DynReferProcessor(image_processor=image_processor, tokenizer=tokenizer)


def sincos_position_embeddings(grid: int, width: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings of a ``grid x grid`` patch grid, as MAE initialises its ViT
    (He et al. 2022): ``[1 + grid * grid, width]``, a zero row for the class token, then the patches row by
    row, the first half of the channels encoding the row and the second half the column (``width`` divisible
    by 4, frequencies ``1 / 10000 ** (i / (width / 4))``).
    """
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for 2-D sine-cosine embeddings, got {width}")
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for position in (rows, columns):
        angles = position.flatten()[:, None].double() * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    patches = torch.cat(parts, dim=1).float()
    return torch.cat([torch.zeros(1, width), patches])


def build_demo_model(tokenizer, settings: ShapesDemoSettings) -> DynReferForRegionCaptioning:
    """A small DynRefer over the shapes vocabulary, every parameter trainable, bag-of-words label tables."""
    vocabulary = SHAPES_VOCABULARY
    vision_width, language_width = settings.vision_width, settings.language_width
    config = DynReferConfig(
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_hidden_layers": settings.vision_layers,
            "num_attention_heads": 4,
            "image_size": settings.view_size,
            "patch_size": settings.patch_size,
            "layer_norm_eps": 1e-6,
            # BLIP-2's vision default (1e-10) suits loading pretrained weights, not training from scratch.
            "initializer_range": 0.02,
        },
        qformer_config={
            "hidden_size": vision_width,
            "intermediate_size": 2 * vision_width,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "cross_attention_frequency": 1,
        },
        text_config={
            "model_type": "t5",
            "vocab_size": len(tokenizer),
            "d_model": language_width,
            "d_kv": language_width // 4,
            "d_ff": 2 * language_width,
            "num_layers": settings.language_layers,
            "num_decoder_layers": settings.language_layers,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu",
            "tie_word_embeddings": False,
            "decoder_start_token_id": tokenizer.pad_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        num_views=settings.num_views,
        num_query_tokens=settings.num_query_tokens,
        head_hidden_size=64,
        head_num_attention_heads=2,
        head_intermediate_size=128,
        text_embed_dim=len(_EMBEDDING_WORDS),
        tag_names=list(vocabulary.tags),
        attribute_names=list(vocabulary.attributes),
        attribute_group_sizes=[1] * len(vocabulary.attributes),
        attribute_prompts=[f"the {value}" for value in vocabulary.attribute_values],
        class_names=list(vocabulary.classes),
        class_prompts=[f"the {name}" for name in vocabulary.classes],
        control_prompt_tokens=ControlPromptTokens.from_tokenizer(tokenizer, vocabulary.tags, 32).to_dict(),
        attribute_label_loss="group_softmax",  # every shapes attribute group has exactly one value per object
    )
    torch.manual_seed(settings.seed)
    model = DynReferForRegionCaptioning(config)
    # Trained from scratch: the vision tower, query tokens and language model learn too (upstream freezes them).
    model.set_trainable(_all_parameters_trainable(model))
    with torch.no_grad():
        # T5's init draws the untied lm_head with std 1, giving logits of std ~sqrt(d_model) and a first loss
        # near 60; from scratch, std d_model**-0.5 starts near log(vocab) and trains faster.
        model.language_model.lm_head.weight.normal_(std=language_width**-0.5)
        if settings.sincos_positions:
            # From scratch, small random position embeddings carry no notion of "nearby": attention would have
            # to learn the grid's geometry before it can relate a region to its neighbour.
            grid = settings.view_size // settings.patch_size
            model.vision_model.embeddings.position_embedding.copy_(
                sincos_position_embeddings(grid, vision_width)[None]
            )
        model.clip_embeds.copy_(bag_of_words_embeddings(config.tag_names, _EMBEDDING_WORDS))
        model.att_embeds.copy_(bag_of_words_embeddings(config.attribute_prompts, _EMBEDDING_WORDS))
        model.ov_embeds.copy_(bag_of_words_embeddings(config.class_prompts, _EMBEDDING_WORDS))
    # The captions repeat colour and shape words by design; the released repetition penalty (1.5) would fight that.
    model.generation_config.repetition_penalty = 1.0
    return model


class ValidationCurveCallback(TrainerCallback):
    """Calls ``score()`` every ``every`` optimizer steps and at the last step; keeps ``curve``, a list of
    ``{"step": ..., **score()}`` and passes each entry, as text, to ``log``. ``score`` evaluates the model (it
    may switch it to eval mode: the ``Trainer`` switches it back to train mode at every step)."""

    def __init__(self, score: Callable[[], dict], every: int, log: Callable[[str], None] | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.score = score
        self.every = every
        self.log = log
        self.curve: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps or control.should_training_stop
        if state.global_step % self.every == 0 or last:
            self.curve.append({"step": state.global_step, **self.score()})
            if self.log is not None:
                self.log("validation " + json.dumps({k: round(v, 2) for k, v in self.curve[-1].items()}))
        return control


class TimeLimitCallback(TrainerCallback):
    """Stops training once ``minutes`` of wall-clock time have passed since training began."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.start = None
        self.stopped_early_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True
            self.stopped_early_at_step = state.global_step
        return control


def _context_note(percentages: dict) -> str:
    context = [percentages[f"word_{name}"] for name in CONTEXT_FIELDS]
    if min(context) >= 50:
        return "The context words are learnt: the wider views carry them."
    return (
        "**The context is not learnt**: the relation and the nearest shape are named at about chance level. "
        "docs/demo_model.md gives the measurements of why and what was tried."
    )


def _model_card(
    settings: ShapesDemoSettings,
    scores: dict,
    train_seconds: float,
    num_parameters: int,
    steps: int,
    stopped_early: bool,
) -> str:
    percentages = scores["test"]
    return f"""---
license: apache-2.0
library_name: dynrefer_hf
pipeline_tag: region-captioning
tags:
- dynrefer
- region-captioning
- synthetic-data
- demonstration
---

# dynrefer_hf shapes-demo: a demonstration model on synthetic scenes

**This is not the DynRefer model of the paper** (arXiv 2405.16071, 4.2B parameters, trained on Visual
Genome and RefCOCOg). It is a {num_parameters / 1e6:.2f}M-parameter DynRefer of the same architecture, trained
from scratch by `dynrefer_hf` on procedurally generated scenes of coloured, textured shapes
(`dynrefer_hf.shapes.scenes`), so that the library runs offline and shows trained behaviour. It only
knows its synthetic world: 6 shapes, 7 colours, 4 textures, 3 sizes and 4 spatial relations. On real
photographs its output is meaningless.

## What it does

Given an image and boxes, it describes each boxed shape with a caption such as
"small red striped circle left of a blue square" (the shape's size, colour, texture and class, then
the nearest other shape and where it lies), predicts its tags, scores 14 attributes (7 colours,
4 textures, 3 sizes) and its class among the 6 shapes.

## Architecture and training

* Views: {settings.num_views} nested views of {settings.view_size} px per region (patch {settings.patch_size}),
  trained with `{settings.train_view_selection}` view selection, evaluated with `{settings.eval_view_selection}`.
* Vision tower: BLIP-2 ViT, width {settings.vision_width}, {settings.vision_layers} layers, trained (no pretrained ViT offline);
  Q-Former width {settings.vision_width}, 2 layers, {settings.num_query_tokens} queries; language model: T5,
  d_model {settings.language_width}, {settings.language_layers}+{settings.language_layers} layers, trained;
  tokenizer: a T5-style Unigram tokenizer trained on the training captions.
* Label tables (tags, attribute prompts, class prompts): fixed bag-of-words vectors over the 20 words of
  the vocabulary, standing in for EVA-CLIP text embeddings; `set_vocabulary` therefore does not apply.
* Losses: caption cross-entropy and the asymmetric tag loss (as upstream); the attribute and class heads
  are trained on the region labels through the attribute head's scoring function (softmax within each
  attribute group, cross-entropy over classes) instead of upstream's region-caption contrastive loss, which
  needs a text encoder; a linear probe on the mean region query (classes, attributes, tags{", and the caption's context words: relation, neighbour colour and class" if settings.context_probe else ""}; not saved)
  supervises the backbone directly, without which the heads stayed at chance when training from scratch{" and the context words stayed at chance" if settings.context_probe else ""}.
* Data: {settings.num_train_images} training scenes (seed {settings.data_seed}), {settings.epochs} epochs planned,
  {steps} optimizer steps{" (stopped early by the time limit)" if stopped_early else ""}, batch {settings.batch_images} images (all their regions),
  AdamW lr {settings.learning_rate}, weight decay {settings.weight_decay}, {settings.warmup_steps} warmup steps, cosine decay, fp32 on CPU.
* Tag threshold {scores["tag_threshold"]} (released default 0.7), chosen for the best tag micro-F1 on
  {settings.num_validation_images} validation scenes: the predicted tags become the control prompt.
* Training time: {train_seconds / 60:.1f} minutes on a shared 2-core CPU.
* Generation: beam search as released (2 beams, max 20 new tokens, length penalty 0) but repetition penalty
  1.0, because the captions repeat colour and shape words by design.

## Test-split scores

On {percentages["num_regions"]} regions of {settings.num_test_images} test scenes (seed {settings.data_seed}), views by `{settings.eval_view_selection}`:

| metric | score | chance |
|---|---|---|
| caption CIDEr-D (x100, pycocoevalcap: PTB tokeniser, CIDEr-D) | {percentages["cider_d"]:.1f} | |
| attribute mAP (x100, OVAD protocol) | {percentages["attribute_map"]:.1f} | about 21 (constant scores give the positive rate) |
| class accuracy (%) | {percentages["class_accuracy"]:.1f} | 16.7 |

The captions follow one template, so CIDEr-D is high even for captions that get an attribute wrong; the
accuracy of each word of the captions (`caption_field_accuracy`, % of regions) says more:

| caption word | accuracy (%) | chance |
|---|---|---|
| size | {percentages["word_size"]:.1f} | 33.3 |
| colour | {percentages["word_colour"]:.1f} | 14.3 |
| texture | {percentages["word_texture"]:.1f} | 25.0 |
| class | {percentages["word_class"]:.1f} | 16.7 |
| relation to the nearest shape | {percentages["word_relation"]:.1f} | 25.0 |
| colour of the nearest shape | {percentages["word_neighbour_colour"]:.1f} | 14.3 |
| class of the nearest shape | {percentages["word_neighbour_class"]:.1f} | 16.7 |
| every word right | {percentages["word_all"]:.1f} | |

{_context_note(percentages)}

Reproduce: `dynrefer train-demo --output-dir shapes-demo` (see `training_settings.json` for every setting).
"""


@dataclass
class DemoTrainingRun:
    """What `train_demo_model` returns: the trained model and processor, the test scenes and the run's facts."""

    model: DynReferForRegionCaptioning
    processor: DynReferProcessor
    test_dataset: object
    train_seconds: float
    steps: int
    stopped_early: bool
    validation_curve: list[dict]


def train_demo_model(
    settings: ShapesDemoSettings,
    work_dir: str | Path,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> DemoTrainingRun:
    """Build the shapes data, the tokenizer and the model of ``settings`` and train it (nothing is saved)."""
    begin = time.monotonic()
    log(f"building {settings.num_train_images} training and {settings.num_test_images} test scenes")
    train = shapes_split("train", settings.num_train_images, seed=settings.data_seed)
    test = shapes_split("test", settings.num_test_images, seed=settings.data_seed)
    captions = [caption for captions in train["captions"] for caption in captions]
    region_tags = [tags for rows in train["tags"] for tags in rows]
    log(f"{len(captions)} training regions; data built in {time.monotonic() - begin:.0f} s")

    processor = build_demo_processor(captions, region_tags, settings)
    model = build_demo_model(processor.tokenizer, settings)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    log(f"model: {num_parameters / 1e6:.2f}M parameters, tokenizer: {len(processor.tokenizer)} pieces")

    collator = RegionTrainingCollator(
        processor,
        SHAPES_VOCABULARY,
        view_selection=settings.train_view_selection,
        seed=settings.seed,
        caption_labels=context_labels if settings.context_probe else None,
    )
    steps = math.ceil(settings.epochs * math.ceil(len(train) / settings.batch_images))
    arguments = TrainingArguments(
        output_dir=str(Path(work_dir) / "trainer"),
        per_device_train_batch_size=settings.batch_images,
        max_steps=steps,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        seed=settings.seed,
        disable_tqdm=not show_progress,
    )
    # The time limit comes first, so that the validation callback sees its stop and scores the last step.
    time_limit = TimeLimitCallback(settings.max_train_minutes)
    callbacks = [time_limit]
    validation_curve = None
    if settings.validation_steps > 0:
        validation = shapes_split("validation", settings.num_validation_images, seed=settings.data_seed)
        validation_curve = ValidationCurveCallback(
            lambda: demo_scores(evaluate_demo_model(model, processor, validation, settings), validation),
            settings.validation_steps,
            log,
        )
        callbacks.append(validation_curve)
    trainer = RegionTrainer(
        model=model,
        args=arguments,
        train_dataset=train,
        data_collator=collator,
        callbacks=callbacks,
        probe_loss_weight=1.0,  # from scratch, the label heads only learn once the region queries carry the labels
        # Without it the context words stay at chance (docs/demo_model.md): captions alone do not teach them.
        probe_label_sizes=CONTEXT_LABEL_SIZES if settings.context_probe else (),
    )
    log(f"training for {steps} steps (at most {settings.max_train_minutes} minutes)")
    train_start = time.monotonic()
    trainer.train()
    train_seconds = time.monotonic() - train_start
    log(f"trained {trainer.state.global_step} steps in {train_seconds / 60:.1f} minutes")
    return DemoTrainingRun(
        model=model,
        processor=processor,
        test_dataset=test,
        train_seconds=train_seconds,
        steps=trainer.state.global_step,
        stopped_early=time_limit.stopped_early_at_step is not None,
        validation_curve=[] if validation_curve is None else validation_curve.curve,
    )


@torch.no_grad()
def calibrate_tag_threshold(model, processor, dataset, settings: ShapesDemoSettings) -> float:
    """The tag threshold (0.05 steps in [0.3, 0.95]) with the best micro-F1 of predicted tags on ``dataset``.

    Upstream also sets the threshold per dataset (0.7, 0.76, 0.8; docs/upstream/model.md §17); the tags feed the control
    prompt, so a threshold that lets in wrong words misleads the captions.
    """
    model.eval()
    probabilities, targets = [], []
    tag_index = {tag: index for index, tag in enumerate(model.config.tag_names)}
    for start in range(0, len(dataset), settings.eval_batch_images):
        records = dataset[start : start + settings.eval_batch_images]
        views = processor.image_processor(
            records["image"],
            boxes=records["boxes"],
            view_selection=settings.eval_view_selection,
            task=settings.eval_task,
        )
        queries = model.get_region_queries(views["pixel_values"], views["view_boxes"])
        tag_logits, _, _, _ = model.predict_labels(queries)
        probabilities.append(torch.sigmoid(tag_logits))
        for tags in (t for rows in records["tags"] for t in rows):
            row = torch.zeros(len(tag_index), dtype=torch.bool)
            row[[tag_index[tag] for tag in tags]] = True
            targets.append(row)
    probabilities, targets = torch.cat(probabilities), torch.stack(targets)
    best_threshold, best_f1 = 0.7, -1.0
    for threshold in [round(0.3 + 0.05 * step, 2) for step in range(14)]:
        predicted = probabilities > threshold
        true_positives = (predicted & targets).sum().item()
        f1 = 2 * true_positives / max(predicted.sum().item() + targets.sum().item(), 1)
        if f1 > best_f1:
            best_threshold, best_f1 = threshold, f1
    return best_threshold


def evaluate_demo_model(model, processor, test_dataset, settings: ShapesDemoSettings) -> RegionEvaluation:
    """`evaluate_regions` with the evaluation views and batch size of ``settings``."""
    return evaluate_regions(
        model,
        processor,
        test_dataset,
        batch_images=settings.eval_batch_images,
        view_selection=settings.eval_view_selection,
        task=settings.eval_task,
    )


def demo_scores(evaluation: RegionEvaluation, dataset) -> dict[str, float]:
    """The scores of ``evaluation`` x 100 (`RegionEvaluation.percentages`) and the per-word accuracies
    (`caption_field_accuracy`, x 100, keys ``word_<field>``) of its captions against ``dataset``'s."""
    references = [caption for captions in dataset["captions"] for caption in captions]
    words = caption_field_accuracy([p["caption"] for p in evaluation.predictions], references)
    return {**evaluation.percentages(), **{f"word_{name}": 100 * value for name, value in words.items()}}


def train_shapes_demo(
    output_dir: str | Path,
    settings: ShapesDemoSettings | None = None,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
) -> RegionEvaluation:
    """Train the demonstration model (`train_demo_model`), evaluate it on the test split and save it.

    Writes to ``output_dir``: the model (safetensors), the processor (image processor + tokenizer), a
    model card ``README.md`` with the test scores, ``training_settings.json`` and ``test_scores.json`` (the
    scores of the whole test split and of its first ``settings.ci_subset_images`` scenes, which
    tests/test_demo_model.py re-checks). Returns the test-split evaluation.
    """
    settings = settings or ShapesDemoSettings()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    begin = time.monotonic()
    with tempfile.TemporaryDirectory() as work_dir:  # the Trainer's own output folder, not kept
        run = train_demo_model(settings, work_dir, log, show_progress)

    validation = shapes_split("validation", settings.num_validation_images, seed=settings.data_seed)
    run.model.config.tag_threshold = calibrate_tag_threshold(run.model, run.processor, validation, settings)
    log(f"tag threshold calibrated on {len(validation)} validation scenes: {run.model.config.tag_threshold}")

    log("evaluating on the test split")
    evaluation = evaluate_demo_model(run.model, run.processor, run.test_dataset, settings)
    subset_size = min(settings.ci_subset_images, len(run.test_dataset))
    subset = evaluate_demo_model(
        run.model, run.processor, run.test_dataset.select(range(subset_size)), settings
    )
    test_scores = demo_scores(evaluation, run.test_dataset)
    scores = {
        "test": {**test_scores, "num_images": len(run.test_dataset), "num_regions": evaluation.num_regions},
        "ci_subset": {
            **demo_scores(subset, run.test_dataset.select(range(subset_size))),
            "num_images": subset_size,
            "num_regions": subset.num_regions,
        },
        "tag_threshold": run.model.config.tag_threshold,
        "train_minutes": round(run.train_seconds / 60, 2),
        "steps": run.steps,
        "validation_curve": run.validation_curve,
    }
    log("test split: " + ", ".join(f"{name} {value:.1f}" for name, value in test_scores.items()))

    run.model.save_pretrained(output_dir)
    run.processor.save_pretrained(output_dir)
    (output_dir / "training_settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    (output_dir / "test_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    num_parameters = sum(parameter.numel() for parameter in run.model.parameters())
    (output_dir / "README.md").write_text(
        _model_card(settings, scores, run.train_seconds, num_parameters, run.steps, run.stopped_early)
    )
    log(f"saved to {output_dir} ({(time.monotonic() - begin) / 60:.1f} minutes in all)")
    return evaluation
