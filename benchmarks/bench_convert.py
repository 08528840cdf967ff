"""`dynrefer convert` end to end on synthetic upstream files: time, peak memory and output size.

    python benchmarks/bench_convert.py --workdir /big/disk               # the released sizes (~20 GB of inputs)
    python benchmarks/bench_convert.py --workdir /tmp/x --scale tiny     # the test sizes: checks the script runs

The inputs have upstream's exact key names and the released shapes (tests/upstream_layout.py: EVA ViT-g with
40 blocks, BLIP-2, the DynRefer checkpoint, Flan-T5-XL as safetensors, the EVA-CLIP text tower) filled with
random values, so the numbers are those of a real conversion except for the tokenizers (tiny stand-ins). The
conversion and the reload each run in a fresh process; peak RSS is that process's maximum resident set.
Each step runs once (minutes and tens of GB at the released sizes: no repeated rounds). Prints a table and
writes benchmarks/results/bench_convert_<scale>.csv (``benchmarks/_common.py`` format): benchmark
``convert_<scale>``, variant = step (``synthetic_inputs``, ``dynrefer_convert``, ``from_pretrained_fp32``),
metrics ``wall_once`` (s), ``peak_rss`` and ``size`` (GiB), ``parameters`` and ``from_pretrained_alone`` (s).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine_description, versions, write_results

sys.path.insert(0, str(ROOT / "tests"))

RELOAD = """
import sys, time, torch, dynrefer_hf
from transformers import AutoModel
start = time.perf_counter()
model = AutoModel.from_pretrained(sys.argv[1])
print(time.perf_counter() - start, sum(p.numel() for p in model.parameters()))
"""


def _run_measured(command: list[str]) -> tuple[float, float, str]:
    """Seconds, peak RSS (GiB) and stdout of a child process (RUSAGE_CHILDREN keeps the largest child's peak,
    so every measured command runs after the previous ones have set a lower or equal mark)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-4000:]}")
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # Linux reports KiB
    return seconds, peak_gib, done.stdout


def _size_gib(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path, help="empty folder with room for ~40 GB")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="cuda", help="device of the text tower (cuda or cpu)")
    parser.add_argument("--language-model-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()

    import torch
    from tiny import make_tiny_clip_tokenizer, make_tiny_config
    from transformers import CLIPTextConfig
    from upstream_layout import write_upstream_files

    from dynrefer_hf import DynReferConfig
    from dynrefer_hf.configuration_dynrefer import EVA_CLIP_TEXT_CONFIG

    clip_tokenizer = make_tiny_clip_tokenizer()
    ids = {"bos_token_id": clip_tokenizer.bos_token_id, "eos_token_id": clip_tokenizer.eos_token_id}
    if args.scale == "full":
        config, text = DynReferConfig(), CLIPTextConfig(**EVA_CLIP_TEXT_CONFIG, **ids)
    else:
        config = make_tiny_config()
        text = CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=16, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=24,
                              projection_dim=config.text_embed_dim, hidden_act="gelu", **ids)  # fmt: skip
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    upstream = write_upstream_files(
        workdir / "upstream", config, text, eva_vit_blocks=config.vision_config.num_hidden_layers + 1
    )
    del upstream["tensors"]
    generate_seconds = time.perf_counter() - start
    clip_tokenizer.save_pretrained(workdir / "clip-tokenizer")
    paths = upstream["paths"]
    command = [
        sys.executable, "-m", "dynrefer_hf.convert",
        "--dynrefer", str(paths["dynrefer"]), "--blip2", str(paths["blip2"]), "--eva-vit", str(paths["eva_vit"]),
        "--flan-t5", str(workdir / "upstream" / "flan-t5"), "--eva-clip", str(paths["eva_clip"]),
        "--clip-tokenizer", str(workdir / "clip-tokenizer"), "--output", str(workdir / "converted"),
        "--language-model-dtype", args.language_model_dtype, "--device", args.device,
    ]  # fmt: skip
    if args.scale == "tiny":
        config.to_json_file(workdir / "config.json")
        text.to_json_file(workdir / "text.json")
        command += [
            "--config",
            str(workdir / "config.json"),
            "--text-encoder-config",
            str(workdir / "text.json"),
        ]
    convert_seconds, convert_peak, convert_out = _run_measured(command)
    reload_seconds, reload_peak, reload_out = _run_measured(
        [sys.executable, "-c", RELOAD, str(workdir / "converted")]
    )
    load_seconds, parameters = reload_out.split()[-2:]

    rows = [
        ("synthetic_inputs", generate_seconds, None, _size_gib(workdir / "upstream")),
        ("dynrefer_convert", convert_seconds, convert_peak, _size_gib(workdir / "converted")),
        ("from_pretrained_fp32", reload_seconds, reload_peak, None),
    ]
    print(f"{'step':<40} {'seconds':>8} {'peak RSS GiB':>13} {'size GiB':>9}")
    for name, seconds, peak, size in rows:
        peak_text = f"{peak:13.1f}" if peak is not None else f"{'':>13}"
        size_text = f"{size:9.2f}" if size is not None else f"{'':>9}"
        print(f"{name:<40} {seconds:8.1f} {peak_text} {size_text}")
    print(f"parameters: {int(parameters):,}; from_pretrained alone: {float(load_seconds):.1f} s")
    print(convert_out.strip())

    benchmark = f"convert_{args.scale}"
    results = []
    for name, seconds, peak, size in rows:
        results.append((benchmark, name, "wall_once", seconds, "s"))
        if peak is not None:
            results.append((benchmark, name, "peak_rss", peak, "GiB"))
        if size is not None:
            results.append((benchmark, name, "size", size, "GiB"))
    results.append((benchmark, "from_pretrained_fp32", "parameters", int(parameters), "count"))
    results.append((benchmark, "from_pretrained_fp32", "from_pretrained_alone", float(load_seconds), "s"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    machine = machine_description(
        f"{gpu}; text tower on {args.device}; language model {args.language_model_dtype}; "
        f"torch threads {torch.get_num_threads()}"
    )
    out = RESULTS / f"bench_convert_{args.scale}.csv"
    write_results(out, results, git_commit(), versions("torch", "transformers", "safetensors"), machine)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
