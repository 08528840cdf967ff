"""Fine-tune a DynRefer model on a region dataset with the Hugging Face Trainer (docs/training.md).

The same command runs on one process, under torchrun, or under accelerate launch (one GPU to many machines):

    python examples/finetune.py --model ./dynrefer-converted --dataset shapes --output-dir out
    torchrun --nproc_per_node 8 examples/finetune.py --model ./dynrefer-converted --lora --precision bf16 ...
    accelerate launch --config_file multi_node.yaml examples/finetune.py --model ./dynrefer-converted ...
    python examples/finetune.py --tiny --output-dir /tmp/tiny      # CPU smoke run: a tiny model built here

The dataset is the synthetic shapes scenes (``shapes``, the default), an annotation file with ``--images DIR``
(upstream DynRefer's COCO-like files such as ``refcocog_train.json``, a COCO detection file, or a JSON Lines
file; docs/evaluation.md), a folder written by ``Dataset.save_to_disk``, or a Hub dataset id, in the record
schema of docs/data.md:

    python examples/finetune.py --model ./dynrefer-converted --dataset data/refcoco/dynrefer/refcocog_train.json \
        --images data/coco2014/train2014 --output-dir out Trained are the parts
upstream trains (docs/upstream/model.md §14) unless ``--trainable`` says otherwise; ``--lora`` adds upstream's LoRA
adapters to the language model. The result is saved as an ordinary model folder (adapters merged).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, TrainingArguments, set_seed

import dynrefer_hf  # noqa: F401  (registers the model type)
from dynrefer_hf.configuration_dynrefer import DEFAULT_TRAINABLE_MODULES
from dynrefer_hf.data import RegionVocabulary
from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning
from dynrefer_hf.processing_dynrefer import DynReferProcessor
from dynrefer_hf.shapes import shapes_split
from dynrefer_hf.training import (
    UPSTREAM_LORA_TARGETS,
    CaptionEmbeddingCollator,
    OneRegionPerSample,
    RegionTrainer,
    RegionTrainingCollator,
    add_language_model_lora,
    bag_of_words_embeddings,
    language_model_lora_config,
    merge_language_model_lora,
)

TARGET_KEYS = ("tag_labels", "attribute_labels", "class_labels")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("model and data")
    source.add_argument("--model", help="DynRefer folder or Hub id (with its processor)")
    source.add_argument(
        "--tiny", action="store_true", help="build a tiny shapes model here instead (CPU smoke run)"
    )
    source.add_argument(
        "--dataset",
        default="shapes",
        help="'shapes', an annotation file (.json: upstream or COCO detection; .jsonl), a save_to_disk folder or a Hub id",
    )
    source.add_argument("--images", help="image folder of an annotation file (default: its dataset.image_root)")
    source.add_argument(
        "--dataset-format",
        choices=("auto", "upstream", "coco", "jsonl"),
        default="auto",
        help="format of an annotation file; auto: .jsonl is JSON Lines, a .json whose annotations have 'bbox' "
        "but no 'segmentation' is COCO detection, any other .json is upstream's format",
    )
    source.add_argument("--split", default="train")
    source.add_argument(
        "--num-shapes-images", type=int, default=200, help="scenes generated for --dataset shapes"
    )
    source.add_argument(
        "--captions-only",
        action="store_true",
        help="train on captions alone (no tag/attribute/class targets): data labelled in another vocabulary",
    )
    parts = parser.add_argument_group("what trains")
    parts.add_argument(
        "--trainable",
        default="upstream",
        help="'upstream' (docs/upstream/model.md §14), 'all', 'config' (as saved) or comma-separated top-level modules",
    )
    parts.add_argument(
        "--lora", action="store_true", help="LoRA adapters on the language model (finetune_llm)"
    )
    parts.add_argument("--lora-r", type=int, default=64)
    parts.add_argument("--lora-alpha", type=int, default=128)
    parts.add_argument("--lora-dropout", type=float, default=0.0)
    parts.add_argument(
        "--lora-targets", default=",".join(UPSTREAM_LORA_TARGETS), help="module names in the LM"
    )
    parts.add_argument(
        "--caption-embeddings",
        choices=("auto", "text-encoder", "bag-of-words", "none"),
        default="auto",
        help="what feeds the region-caption contrastive loss: the model's text encoder (auto when present), "
        "bag-of-words vectors over the tag names (auto with --tiny), or nothing",
    )
    parts.add_argument(
        "--clip-tokenizer", help="the text encoder's tokenizer (default: <model>/clip_tokenizer)"
    )
    parts.add_argument("--attribute-loss-weight", type=float, default=0.0, help="direct attribute-label loss")
    parts.add_argument("--class-loss-weight", type=float, default=0.0, help="direct class-label loss")
    run = parser.add_argument_group("optimisation")
    run.add_argument("--output-dir", required=True)
    run.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="mixed precision")
    run.add_argument(
        "--upstream-precision",
        action="store_true",
        help="CUDA only: the frozen language model's weights in bf16, as upstream (docs/upstream/model.md §15); pair with "
        "--precision fp16 for upstream's outer AMP. With --lora the language model stays fp32, as upstream",
    )
    run.add_argument("--gradient-checkpointing", action="store_true")
    run.add_argument(
        "--batch-size", type=int, default=16, help="samples per process and step (see --batch-unit)"
    )
    run.add_argument(
        "--batch-unit",
        choices=("region", "image"),
        default="region",
        help="a sample is one region (upstream's layout: every process gets as many regions) or one "
        "image with all its regions (one image decode for all of them)",
    )
    run.add_argument("--gradient-accumulation-steps", type=int, default=1)
    run.add_argument("--learning-rate", type=float, default=1e-4)
    run.add_argument("--weight-decay", type=float, default=0.05)
    run.add_argument("--warmup-steps", type=int, default=0)
    run.add_argument("--epochs", type=float, default=1.0)
    run.add_argument("--max-steps", type=int, default=-1)
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument(
        "--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the final model)"
    )
    run.add_argument(
        "--resume-from-checkpoint",
        help="a checkpoint folder of an earlier run (--save-steps), or 'last' for the last complete one of --output-dir",
    )
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny == bool(args.model):
        parser.error("give exactly one of --model and --tiny")
    if args.upstream_precision and not torch.cuda.is_available():
        parser.error("--upstream-precision needs a CUDA device (upstream's autocast regions run only there)")
    return args


def tiny_settings(seed: int):
    from dynrefer_hf.shapes import ShapesDemoSettings

    return ShapesDemoSettings(
        view_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        language_width=32,
        language_layers=1,
        num_query_tokens=4,
        tokenizer_vocab_size=120,
        seed=seed,
    )


def build_tiny_model(tokenizer, seed: int):
    """A tiny shapes model over ``tokenizer``, built as the demonstration model is (shapes_demo.py)."""
    from dynrefer_hf.shapes import build_demo_model

    return build_demo_model(tokenizer, tiny_settings(seed))


def build_tiny(num_images: int, seed: int):
    """A tiny shapes model and its processor (tokenizer trained on the scenes' captions)."""
    from dynrefer_hf.shapes import build_demo_processor

    scenes = shapes_split("train", num_images, seed=seed)
    captions = [caption for captions in scenes["captions"] for caption in captions]
    region_tags = [tags for rows in scenes["tags"] for tags in rows]
    processor = build_demo_processor(captions, region_tags, tiny_settings(seed))
    return build_tiny_model(processor.tokenizer, seed), processor


def annotation_file_format(path: str) -> str:
    """upstream / coco / jsonl for ``--dataset-format auto``."""
    import json

    if path.endswith(".jsonl"):
        return "jsonl"
    with open(path, encoding="utf-8") as file:
        annotations = json.load(file).get("annotations") or [{}]
    first = annotations[0]
    return "coco" if "bbox" in first and "segmentation" not in first else "upstream"


def load_annotation_file(args, class_names):
    """An annotation file as image records (``--batch-unit region`` then gives upstream's one region per sample)."""
    from dynrefer_hf.data import load_coco_detection, load_jsonl_regions, load_upstream_annotations

    kind = annotation_file_format(args.dataset) if args.dataset_format == "auto" else args.dataset_format
    if kind == "upstream":
        return load_upstream_annotations(args.dataset, args.images, class_names=class_names)
    if args.images is None and kind == "coco":
        raise SystemExit("--images DIR is required with a COCO detection file")
    if kind == "coco":
        return load_coco_detection(args.dataset, args.images)
    return load_jsonl_regions(args.dataset, args.images)


def load_dataset_records(args, main_process_first, class_names=None):
    if args.dataset == "shapes":
        return shapes_split(args.split, args.num_shapes_images, seed=args.seed)
    import datasets

    if os.path.isfile(args.dataset):
        with main_process_first(desc="reading the annotation file"):
            return load_annotation_file(args, class_names)
    with main_process_first(desc="loading the dataset"):
        if os.path.isdir(args.dataset):
            loaded = datasets.load_from_disk(args.dataset)
            return loaded[args.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(args.dataset, split=args.split)


def model_vocabulary(model) -> RegionVocabulary:
    config = model.config
    return RegionVocabulary(
        classes=tuple(config.class_names),
        attributes=tuple(config.attribute_names),
        tags=tuple(config.tag_names),
    )


def check_vocabulary(dataset, vocabulary: RegionVocabulary) -> None:
    """Targets index the model's vocabularies: refuse data labelled in another one (see --captions-only)."""
    problems = []
    if list(dataset.features["classes"].feature.names) != list(vocabulary.classes):
        problems.append("class names")
    unknown = {tag for rows in dataset["tags"] for tags in rows for tag in tags} - set(vocabulary.tags)
    if unknown:
        problems.append(f"tags (e.g. {sorted(unknown)[:3]})")
    widths = {len(row) for rows in dataset["attributes"] for row in rows if len(row)}
    if widths - {len(vocabulary.attributes)}:
        problems.append(
            f"attribute rows of {sorted(widths)} labels (the model has {len(vocabulary.attributes)})"
        )
    if problems:
        raise ValueError(
            f"the dataset's {', '.join(problems)} do not fit the model's vocabulary; use --captions-only, or "
            "give the model the dataset's vocabulary first (model.set_vocabulary)"
        )


class CaptionsOnlyCollator:
    """Drops every label target but the captions (regions labelled in another vocabulary)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, records):
        blank = [
            {
                **record,
                "tags": [[]] * len(record["boxes"]),
                "attributes": [[]] * len(record["boxes"]),
                "classes": [-1] * len(record["boxes"]),
            }
            for record in records
        ]
        batch = self.collator(blank)
        for key in TARGET_KEYS:
            batch.pop(key)
        return batch


def caption_encoder(args, model, tiny: bool):
    """``captions -> [R, text_embed_dim]`` for the contrastive loss, or ``None`` (no ``loss_region_text``)."""
    choice = args.caption_embeddings
    if choice == "auto":
        choice = "bag-of-words" if tiny else "text-encoder" if model.text_encoder is not None else "none"
    if choice == "none":
        return None
    if choice == "bag-of-words":
        words, dim = list(model.config.tag_names), model.config.text_embed_dim
        return lambda captions: bag_of_words_embeddings(captions, words, dim)
    if model.text_encoder is None:
        raise ValueError("--caption-embeddings text-encoder: this model has no text encoder")
    if args.clip_tokenizer:
        clip_tokenizer = AutoTokenizer.from_pretrained(args.clip_tokenizer)
    else:
        clip_tokenizer = AutoTokenizer.from_pretrained(args.model, subfolder="clip_tokenizer")
    return lambda captions: model.encode_texts(captions, clip_tokenizer)


def trainable_modules(choice: str, model) -> list[str]:
    if choice == "upstream":
        return list(DEFAULT_TRAINABLE_MODULES)
    if choice == "config":
        return list(model.config.trainable_modules)
    if choice == "all":
        return [name for name, _ in model.named_children()] + [
            name for name, _ in model.named_parameters(recurse=False)
        ]
    return [name.strip() for name in choice.split(",") if name.strip()]


def main(argv=None) -> None:
    args = parse_args(argv)
    set_seed(args.seed)  # before anything random is built (the LoRA adapters): --seed makes the run repeatable
    use_cpu = not torch.cuda.is_available()
    arguments = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta2=0.999,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",  # upstream: linear warm-up then cosine to 0 (docs/upstream/model.md §18)
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        activation_checkpointing=args.gradient_checkpointing,
        # non-reentrant: works with the frozen vision tower (no grad inputs) and DDP's unused-parameter search
        activation_checkpointing_kwargs={"use_reentrant": False},
        # a head gets no gradient in a step whose batch has no target for it (e.g. no caption embeddings)
        ddp_find_unused_parameters=True,
        remove_unused_columns=False,  # the collator reads whole records
        report_to=[],
        use_cpu=use_cpu,
        seed=args.seed,
        disable_tqdm=True,
    )

    if args.tiny:
        # tokenizer training does not repeat itself exactly: the first process trains it, the others load it
        with arguments.main_process_first(local=False, desc="building the tiny model"):
            if arguments.process_index == 0:
                model, processor = build_tiny(args.num_shapes_images, args.seed)
                processor.save_pretrained(args.output_dir)
            else:
                processor = DynReferProcessor.from_pretrained(args.output_dir)
                model = build_tiny_model(processor.tokenizer, args.seed)
    else:
        model = DynReferForRegionCaptioning.from_pretrained(args.model)
        processor = DynReferProcessor.from_pretrained(args.model)
    model.set_trainable(trainable_modules(args.trainable, model))
    if args.upstream_precision and not args.lora:
        model.to_upstream_precision()
    encode_captions = caption_encoder(args, model, args.tiny)

    dataset = load_dataset_records(args, arguments.main_process_first, list(model.config.class_names))
    train_dataset = OneRegionPerSample(dataset) if args.batch_unit == "region" else dataset
    vocabulary = model_vocabulary(model)
    if not args.captions_only:
        check_vocabulary(dataset, vocabulary)
    # each process draws its own views and control words
    collator = RegionTrainingCollator(processor, vocabulary, seed=args.seed + arguments.process_index)
    if args.captions_only:
        collator = CaptionsOnlyCollator(collator)
    if encode_captions is not None:
        collator = CaptionEmbeddingCollator(collator, encode_captions)
    # the label losses are the model's (0 turns one off); RegionTrainer only logs the parts and keeps LoRA checkpoints
    model.config.attribute_label_loss_weight = args.attribute_loss_weight
    model.config.class_label_loss_weight = args.class_loss_weight

    trained = model
    if args.lora:
        lora_config = language_model_lora_config(
            args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets.split(",")
        )
        trained = add_language_model_lora(model, lora_config)
    if arguments.process_index == 0:
        count = sum(parameter.numel() for parameter in trained.parameters() if parameter.requires_grad)
        print(
            f"trainable: {count / 1e6:.2f}M parameters in {model.config.trainable_modules}"
            + (" + LoRA adapters" if args.lora else "")
        )

    trainer = RegionTrainer(model=trained, args=arguments, train_dataset=train_dataset, data_collator=collator)
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)

    final = merge_language_model_lora(trained) if args.lora else model
    if trainer.is_world_process_zero():
        final.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        print(f"saved to {args.output_dir}")
    trainer.accelerator.wait_for_everyone()
    # an explicit teardown: gloo can abort in its destructor at interpreter exit
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
