"""``dynrefer eval``: the paper's benchmarks on upstream annotation files, or re-scoring a result file.

    dynrefer eval --task refcocog --annotations refcocog_val.json --images coco/train2014 --model M --output out/
    torchrun --nproc_per_node 8 -m dynrefer_hf.cli eval --task vg-densecap ...   # regions split over processes
    dynrefer eval --task refcocog --rescore out/result.json --annotations refcocog_val.json
"""

from __future__ import annotations

import argparse
import json
import os

from .common import add_precision_options, count, number
from .errors import CommandError

__all__ = ["register"]


def _threshold(text: str):
    """``--tag-threshold``: ``model`` (the model's own threshold) or a probability."""
    if text == "model":
        return text
    try:
        return number(0.0, 1.0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number in [0, 1] nor 'model'") from None


def register(subparsers) -> None:
    from ..evaluation import BENCHMARK_TASKS

    tasks = "; ".join(f"{name}: {task.description}" for name, task in BENCHMARK_TASKS.items())
    parser = subparsers.add_parser(
        "eval",
        help="run a benchmark of the paper on an upstream annotation file, or re-score a result file",
        description=(
            "Predict every region of an upstream DynRefer annotation file with the task's settings and score it "
            f"with the task's protocol (docs/evaluation.md). Tasks: {tasks}."
        ),
    )
    parser.add_argument("--task", required=True, choices=sorted(BENCHMARK_TASKS))
    parser.add_argument("--annotations", required=True, metavar="FILE", help="the ground-truth annotation file")
    parser.add_argument("--images", metavar="DIR", help="image folder (default: the file's dataset.image_root)")
    parser.add_argument("--model", help="model folder or Hub id (default: the embedded demonstration model)")
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where result.json and metrics.json go (required to predict; with --rescore: metrics.json)",
    )
    parser.add_argument("--rescore", metavar="RESULT.json", help="score this result file instead of predicting")
    parser.add_argument("--limit", type=count(1), metavar="N", help="only the first N images of the file")
    parser.add_argument(
        "--tag-threshold",
        type=_threshold,
        help="tag threshold: a number, or 'model' for the model's own (default: the task's upstream setting, "
        "0.76 refcocog, 0.8 vg-reg, else the model's)",
    )
    parser.add_argument("--batch-images", type=count(1), default=8, help="images per batch (default: %(default)s)")
    parser.add_argument(
        "--region-batch-size", type=count(1), default=20, help="regions per forward pass (default: %(default)s)"
    )
    parser.add_argument("--restart", action="store_true", help="ignore predictions of an earlier run in --output")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available; under torchrun: the local rank's GPU)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument(
        "--quiet", action="store_true", help="no notice when the embedded demonstration model is used, nor of the precision chosen"
    )
    add_precision_options(parser)
    parser.set_defaults(func=run)


def _rescore(args) -> int:
    from ..evaluation import ResultFileError, rescore_result_file
    from ..metrics import JavaNotFoundError

    class_names = None
    if args.model:
        from .common import load_config

        class_names = list(load_config(args.model).class_names)
    try:
        metrics = rescore_result_file(args.task, args.rescore, args.annotations, class_names=class_names)
    # only the user's errors become one line: any other exception is a bug, shown with its traceback
    except (FileNotFoundError, ResultFileError, JavaNotFoundError) as error:
        raise CommandError(str(error)) from None
    _print(args, metrics)
    if args.output:
        # as a predicting run writes it, with the settings that produced these metrics
        metrics_file = os.path.join(args.output, "metrics.json")
        settings = {
            "task": args.task,
            "annotations": os.path.abspath(args.annotations),
            "rescored": os.path.abspath(args.rescore),
        }
        with open(metrics_file, "w", encoding="utf-8") as file:
            json.dump({"metrics": metrics, "settings": settings}, file, indent=2)
        if not args.json:
            print(f"wrote {metrics_file}")
    return 0


def _print(args, metrics: dict, table: str | None = None) -> None:
    from ..evaluation import format_metrics_table

    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(table or format_metrics_table(args.task, metrics))


def _make_folder(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CommandError(f"--output {path}: cannot create the folder ({error.strerror})") from None


def _load(model_name: str | None, device: str | None, quiet: bool, dtype: str = "auto", quantize: str | None = None):
    import torch
    from transformers import AutoProcessor

    from .common import load_config, load_model, model_or_default

    # the demonstration-model notice, once (by process 0 under torchrun)
    name, revision = model_or_default(model_name, quiet or os.environ.get("RANK", "0") != "0")
    load_config(name, revision)
    local_rank = os.environ.get("LOCAL_RANK")
    if device is None:
        device = f"cuda:{local_rank or 0}" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        # the precision line once, from the first process under torchrun
        model = load_model(name, device, dtype, quantize, quiet or os.environ.get("RANK", "0") != "0", revision=revision)
        processor = AutoProcessor.from_pretrained(name, revision=revision)
    except OSError as error:
        raise CommandError(f"cannot load the model {name}: {error}") from None
    return model, processor


def run(args: argparse.Namespace) -> int:
    from ..data import AnnotationError
    from ..evaluation import OutputFolderError, ResultFileError
    from ..evaluation import run_benchmark as _run_benchmark
    from ..metrics import JavaNotFoundError

    if not os.path.isfile(args.annotations):
        raise CommandError(f"--annotations {args.annotations}: file not found")
    if args.rescore:
        if not os.path.isfile(args.rescore):
            raise CommandError(f"--rescore {args.rescore}: file not found")
        if args.output:
            _make_folder(args.output)
        return _rescore(args)
    if not args.output:
        raise CommandError("--output DIR is required to run a model (or give --rescore RESULT.json)")
    if args.images and not os.path.isdir(args.images):
        raise CommandError(f"--images {args.images}: not a folder")
    model, processor = _load(args.model, args.device, args.quiet, args.dtype, args.quantize)
    threshold = args.tag_threshold
    if threshold == "model":
        threshold = model.config.tag_threshold
    try:
        outcome = _run_benchmark(
            model,
            processor,
            args.task,
            args.annotations,
            args.output,
            args.images,
            limit=args.limit,
            batch_images=args.batch_images,
            region_batch_size=args.region_batch_size,
            tag_threshold=threshold,
            resume=not args.restart,
        )
    except (AnnotationError, ResultFileError, OutputFolderError, JavaNotFoundError, FileNotFoundError) as error:
        raise CommandError(str(error)) from None
    finally:
        import torch.distributed as dist

        # an explicit teardown: gloo can abort in its destructor at interpreter exit
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if outcome.result_file is None:  # not process 0
        return 0
    _print(args, outcome.metrics, outcome.table)
    if not args.json:
        resumed = outcome.num_resumed
        speed = f"{outcome.regions_per_second:.1f} regions/s" if outcome.num_predicted else "nothing left to predict"
        if outcome.num_predicted and outcome.processes > 1:
            speed += f" in process 0 of {outcome.processes}"
        print(
            f"{outcome.num_regions} regions ({resumed} from an earlier run); {speed}; "
            f"wrote {outcome.result_file} and {outcome.metrics_file}"
        )
    return 0
