"""The released DynRefer (EVA ViT-g + Q-Former + Flan-T5-XL, 3.96 G parameters) end to end: load, memory, per-stage time.

    python benchmarks/bench_full_size.py --workdir /big/disk                       # random weights, released size
    python benchmarks/bench_full_size.py --model converted/ --precisions auto,int8  # a converted folder
    python benchmarks/bench_full_size.py --workdir /tmp/x --scale tiny              # seconds: checks the script runs

Without ``--model`` the released architecture (``DynReferConfig()``, or the tests' tiny config with ``--scale
tiny``) is built with random weights directly in bfloat16, saved once under ``--workdir`` in the converter's
layout (Flan-T5 bfloat16, the rest float32) and reused. Every measurement runs in a fresh process: it loads the
model at one precision (``load_s``, ``load_peak_rss_gib``), warms up on one region with two tokens, then describes
``R`` regions of one photo in one call (``R`` from ``--regions``) with one decoding, timing each stage through
forward hooks: ``processor_s`` (the nested views), ``vit_s``, ``fuse_s`` (RoI-Align + alignment + fusion),
``qformer_s``, ``heads_s`` (tags, attributes, class), ``generation_s`` (the language model's forward passes, encoder and
decoding steps; captions are forced to 20 new tokens so that precisions generate the same amount), ``other_s``
(the rest: beam search and logits processors between the steps, control prompts, post-processing). ``total_s`` is processor +
model; ``regions_per_s`` and ``s_per_region`` follow from it; ``rss_anon_gib`` / ``rss_file_gib`` split the
resident memory at the end into the process's own and mapped weight-file pages; ``total_cpu_s`` and ``load_cpu_s`` are the CPU
seconds of all the process's threads (on a shared machine they move less than wall-clock time); ``peak_rss_gib`` is the process's peak (load + run)
and, on CUDA, ``peak_gpu_mem_gib`` the peak allocated device memory.

Precisions: ``float32``, ``bfloat16``, ``upstream`` (the language model bfloat16, the rest float32; on CUDA the
ViT under float16 autocast), ``auto`` (the library's default for this machine, ``dynrefer_hf.precision``) and
``int8`` (torchao int8 weights over ``auto``). Decodings: ``greedy`` and ``beam`` (the released settings: 2
beams, repetition penalty 1.5). Rows are appended to ``--output`` (the long CSV of ``benchmarks/_common.py``) as
each measurement finishes: benchmark ``full_size_<scale>_<device>``, variant ``<precision>_<decoding>_<R>regions``.
``--time-limit`` stops starting measurements after that many seconds and lists what was skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, append_results, git_commit, machine_description, versions

PHOTO = ROOT / "tests" / "fixtures" / "images" / "COCO_val2014_000000000192.jpg"  # 640x480
PRECISIONS = ("float32", "bfloat16", "int8", "upstream", "auto")
DECODINGS = ("greedy", "beam")
NEW_TOKENS = 20
STAGES = ("processor", "vit", "fuse", "qformer", "heads", "generation")


def _gib(kib: float) -> float:
    return kib / 2**20


def peak_rss_gib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def resident_gib() -> dict[str, float]:
    """Resident memory now, split (Linux): ``rss_anon_gib`` (the process's own: weights it copied, activations) and
    ``rss_file_gib`` (pages of memory-mapped weight files: shared with the page cache, dropped under pressure)."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
        )
    except OSError:
        return {}
    return {
        f"rss_{kind}_gib": _gib(int(fields[f"Rss{kind.title()}"].split()[0]))
        for kind in ("anon", "file")
        if f"Rss{kind.title()}" in fields
    }


# ---------------------------------------------------------------- the model folder


def save_random_model(folder: Path, scale: str, device: str = "cpu") -> Path:
    """Build the ``scale`` architecture with random weights in bfloat16 on ``device`` (a GPU initialises 4 G values
    in seconds), put everything but the language model in float32 (the converter's layout) and save it with a
    processor; returns ``folder``."""
    import torch

    from dynrefer_hf.configuration_dynrefer import DynReferConfig
    from dynrefer_hf.image_processing_dynrefer import DynReferImageProcessor
    from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning
    from dynrefer_hf.precision import set_precision
    from dynrefer_hf.processing_dynrefer import DynReferProcessor

    if scale == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tiny_config, make_tiny_tokenizer

        config, tokenizer = make_tiny_config(), make_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        from dynrefer_hf.pretrained import SHAPES_DEMO_PATH

        # any T5 tokenizer whose ids fit Flan-T5's vocabulary: the demonstration model's (no download)
        config, tokenizer = DynReferConfig(), AutoTokenizer.from_pretrained(SHAPES_DEMO_PATH)
    size = config.vision_config.image_size
    image_processor = DynReferImageProcessor(size={"height": size, "width": size}, num_views=config.num_views)
    processor = DynReferProcessor(image_processor, tokenizer, max_text_length=config.max_text_length)
    # the tag vocabulary as this tokenizer writes it: `generate` puts predicted tags into the control prompts
    config.control_prompt_tokens = processor.tokenize_tag_vocabulary(config.tag_names)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 8 GB instead of 16 GB while building
    try:
        with torch.device(device):
            model = DynReferForRegionCaptioning(config)
    finally:
        torch.set_default_dtype(default)
    set_precision(model, "upstream")  # in place, one sub-model at a time
    model.save_pretrained(folder, max_shard_size="2GB")
    processor.save_pretrained(folder)
    return folder


def model_folder(args) -> Path:
    if args.model:
        return Path(args.model)
    folder = Path(args.workdir) / f"dynrefer-random-{args.scale}"
    if not (folder / "config.json").exists():
        print(f"building the {args.scale} model with random weights in {folder} ...", flush=True)
        start = time.perf_counter()
        build = [
            sys.executable,
            __file__,
            "--_build",
            str(folder),
            "--scale",
            args.scale,
            "--device",
            args.device,
        ]
        subprocess.run(build, check=True)
        print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


# ---------------------------------------------------------------- one measurement (in its own process)


class StageClock:
    """Seconds spent in each stage, from forward hooks and wrapped methods (synchronising CUDA at each edge)."""

    def __init__(self, device):
        import torch

        self.device = device
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._started: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def start(self, stage: str) -> None:
        self._depth[stage] = self._depth.get(stage, 0) + 1
        if self._depth[stage] == 1:  # a stage nested in itself (an encoder inside its model) counts once
            self._sync()
            self._started[stage] = time.perf_counter()

    def stop(self, stage: str) -> None:
        self._depth[stage] -= 1
        if self._depth[stage] == 0:
            self._sync()
            self.seconds[stage] += time.perf_counter() - self._started.pop(stage)

    def hook_module(self, module, stage: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(stage))
        module.register_forward_hook(lambda *_: self.stop(stage))

    def wrap_method(self, owner, name: str, stage: str) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            self.start(stage)
            try:
                return method(*args, **kwargs)
            finally:
                self.stop(stage)

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)


def load(folder: Path, precision: str, device: str):
    """The model at ``precision`` on ``device``, as the library's own loaders build it, and the precision used."""
    from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning
    from dynrefer_hf.precision import from_pretrained_kwargs, resolve_precision, set_precision

    quantization = "int8" if precision == "int8" else None
    chosen, _ = resolve_precision("auto" if precision == "int8" else precision, device)
    model = DynReferForRegionCaptioning.from_pretrained(
        folder, **from_pretrained_kwargs(chosen, quantization)
    )
    if chosen == "upstream":
        set_precision(model, chosen)
    return model.to(device), chosen


def measure(spec: dict) -> dict:
    import torch
    from bench_pipeline import random_boxes
    from PIL import Image

    from dynrefer_hf.processing_dynrefer import DynReferProcessor

    if spec["backend"]:
        os.environ["DYNREFER_OPS_BACKEND"] = spec["backend"]
    device = torch.device(spec["device"])
    start, cpu_start = time.perf_counter(), time.process_time()
    model, chosen = load(Path(spec["folder"]), spec["precision"], spec["device"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = {
        "load_s": time.perf_counter() - start,
        "load_cpu_s": time.process_time() - cpu_start,
        "load_peak_rss_gib": peak_rss_gib(),
        "chosen": chosen,
    }
    processor = DynReferProcessor.from_pretrained(spec["folder"])
    image = Image.open(PHOTO).convert("RGB")
    boxes = random_boxes(spec["regions"], *image.size)
    generation = {"num_beams": 1} if spec["decoding"] == "greedy" else {}
    generation.update(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    clock = StageClock(device)
    clock.hook_module(model.vision_model, "vit")
    clock.wrap_method(model, "fuse_views", "fuse")
    clock.hook_module(model.qformer, "qformer")
    clock.wrap_method(model, "predict_labels", "heads")
    clock.hook_module(model.language_model, "generation")  # every decoding step
    if getattr(model.language_model, "encoder", None) is not None:  # `generate` runs the encoder on its own
        clock.hook_module(model.language_model.encoder, "generation")

    def describe(region_boxes, **extra):
        clock.start("processor")
        inputs = processor(images=image, boxes=region_boxes)
        clock.stop("processor")
        tensors = {
            "pixel_values": inputs["pixel_values"].to(device=device, dtype=model.query_tokens.dtype),
            "view_boxes": inputs["view_boxes"].to(device),
        }
        outputs = model.generate(**tensors, **{**generation, **extra})
        return processor.post_process_region_captioning(outputs, inputs, model.config)

    describe(boxes[:1], max_new_tokens=2, min_new_tokens=2)  # warm-up: lazy inits, kernels, allocator
    clock.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    describe(boxes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    total = time.perf_counter() - start
    result["total_cpu_s"] = time.process_time() - cpu_start  # all threads: less disturbed by other processes
    result.update({f"{stage}_s": seconds for stage, seconds in clock.seconds.items()})
    result.update(
        other_s=total
        - sum(clock.seconds.values()),  # beam search, logits processors, prompts, post-processing
        total_s=total,
        regions_per_s=spec["regions"] / total,
        s_per_region=total / spec["regions"],
        peak_rss_gib=peak_rss_gib(),
        **resident_gib(),
    )
    return result


# ---------------------------------------------------------------- what the machine can do


def machine_peaks(device_name: str) -> dict[str, float]:
    """Matrix-multiply throughput (GFLOP/s, 2048^3, float32 and bfloat16) and memory bandwidth (GiB/s read + write
    of a 1 GiB copy) of ``device_name``: what each stage's time is compared with (docs/performance.md)."""
    import torch

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def best_seconds(function, repeats: int = 5) -> float:
        function()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    peaks = {}
    size = 2048
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        product = functools.partial(torch.mm, a, b)
        peaks[f"gemm_{str(dtype).removeprefix('torch.')}_gflops"] = 2 * size**3 / best_seconds(product) / 1e9
    source = torch.ones(2**28, device=device)  # 1 GiB of float32
    target = torch.empty_like(source)
    peaks["copy_gib_per_s"] = 2 * source.numel() * 4 / 2**30 / best_seconds(lambda: target.copy_(source))
    return peaks


# ---------------------------------------------------------------- the driver

UNITS = {"regions_per_s": "regions/s", "chosen": None, "copy_gib_per_s": "GiB/s"}


def rows_of(benchmark: str, variant: str, result: dict) -> list[tuple]:
    rows = []
    for metric, value in result.items():
        if metric == "chosen":
            continue
        unit = UNITS.get(metric) or (
            "GiB" if metric.endswith("_gib") else "GFLOP/s" if metric.endswith("_gflops") else "s"
        )
        rows.append((benchmark, variant, metric, value, unit))
    return rows


def parse_list(text: str, allowed: tuple[str, ...] | None, name: str) -> list[str]:
    values = [value.strip() for value in text.split(",") if value.strip()]
    if allowed is not None:
        for value in values:
            if value not in allowed:
                raise SystemExit(f"--{name}: {value!r} is not one of {', '.join(allowed)}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a converted model folder (default: random weights under --workdir)")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "results" / "full_size_models"))
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precisions", default="float32,bfloat16,int8,upstream,auto")
    parser.add_argument("--regions", default="1,8,32", help="regions per call, comma-separated")
    parser.add_argument("--decoding", default="greedy,beam")
    parser.add_argument(
        "--backend", choices=("reference", "triton"), help="ops backend (default: the library's)"
    )
    parser.add_argument(
        "--output", help="results CSV (default: benchmarks/results/bench_full_size_<scale>_<device>.csv)"
    )
    parser.add_argument("--time-limit", type=float, help="start no measurement after this many seconds")
    parser.add_argument(
        "--skip-peaks", action="store_true", help="do not measure the machine's GEMM and copy rates"
    )
    parser.add_argument("--_build", help=argparse.SUPPRESS)
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._build:
        save_random_model(Path(args._build), args.scale, args.device)
        return
    if args._measure:
        print("RESULT " + json.dumps(measure(json.loads(args._measure))), flush=True)
        return

    precisions = parse_list(args.precisions, PRECISIONS, "precisions")
    decodings = parse_list(args.decoding, DECODINGS, "decoding")
    try:
        regions = [int(value) for value in parse_list(args.regions, None, "regions")]
    except ValueError:
        raise SystemExit(f"--regions: {args.regions!r} is not a comma-separated list of counts") from None
    if not regions or min(regions) < 1:
        raise SystemExit(f"--regions: counts must be at least 1, got {args.regions!r}")
    began = time.perf_counter()
    folder = model_folder(args)
    output = Path(args.output) if args.output else RESULTS / f"bench_full_size_{args.scale}_{args.device}.csv"
    benchmark = f"full_size_{args.scale}_{args.device}"
    commit, installed = git_commit(), versions("torch", "transformers", "torchao")
    if not args.skip_peaks:
        peaks = machine_peaks(args.device)
        append_results(output, rows_of(benchmark, "machine", peaks), commit, installed, machine_description())
        print("machine: " + ", ".join(f"{name} {value:.1f}" for name, value in peaks.items()), flush=True)
    plan = [(p, d, r) for p in precisions for d in decodings for r in regions]
    skipped = []
    print(f"model {folder}; {len(plan)} measurements; results appended to {output}", flush=True)
    header = f"{'variant':<28}{'load s':>8}{'RSS GiB':>9}{'s/region':>10}" + "".join(
        f"{s:>11}" for s in STAGES
    )
    print(header, flush=True)
    for precision, decoding, count in plan:
        variant = f"{precision}_{decoding}_{count}regions"
        if args.time_limit is not None and time.perf_counter() - began > args.time_limit:
            skipped.append(variant)
            continue
        spec = {
            "folder": str(folder),
            "precision": precision,
            "decoding": decoding,
            "regions": count,
            "device": args.device,
            "backend": args.backend,
        }
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        }
        child = subprocess.run(
            [sys.executable, __file__, "--_measure", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            print(
                f"{variant}: failed (exit {child.returncode}): {child.stderr.strip().splitlines()[-1:]}",
                flush=True,
            )
            skipped.append(f"{variant} (failed)")
            continue
        result = json.loads(lines[-1].removeprefix("RESULT "))
        machine = machine_description(f"precision chosen: {result['chosen']}")
        append_results(output, rows_of(benchmark, variant, result), commit, installed, machine)
        print(
            f"{variant:<28}{result['load_s']:>8.1f}{result['peak_rss_gib']:>9.2f}{result['s_per_region']:>10.2f}"
            + "".join(f"{result[f'{s}_s']:>11.2f}" for s in STAGES),
            flush=True,
        )
    if skipped:
        print(f"skipped (--time-limit {args.time_limit} s or failed): {', '.join(skipped)}", flush=True)


if __name__ == "__main__":
    main()
