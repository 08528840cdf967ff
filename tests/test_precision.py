"""The precision a model runs at (dynrefer_hf.precision): the "auto" rule with the CPU's capability mocked, loading
each part in the dtype it was saved in, offloading to disk, int8 through torchao, the CLI's choice line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import make_tiny_tokenizer, make_varied_tiny_model
from transformers import pipeline

from dynrefer_hf import precision
from dynrefer_hf.image_processing_dynrefer import DynReferImageProcessor
from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning
from dynrefer_hf.processing_dynrefer import DynReferProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mock_cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [
        (True, False, "bfloat16"),
        (False, True, "bfloat16"),
        (True, True, "bfloat16"),
        (False, False, "float32"),
    ],
)
def test_auto_is_bfloat16_only_on_cpus_with_native_bfloat16(monkeypatch, amx, avx512_bf16, expected):
    mock_cpu(monkeypatch, amx, avx512_bf16)
    assert precision.resolve_precision("auto", "cpu")[0] == expected


def test_auto_reads_the_cpu_flags_where_torch_cannot_say(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"sse2", "avx512f", "avx512_bf16"}))
    assert precision.cpu_has_native_bfloat16()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    assert not precision.cpu_has_native_bfloat16()


def test_auto_on_cuda_is_upstreams_precision_and_elsewhere_float32(monkeypatch):
    mock_cpu(monkeypatch, True, True)  # the CPU's capability does not matter off the CPU
    assert precision.resolve_precision("auto", "cuda:1")[0] == "upstream"
    assert precision.resolve_precision("auto", "mps")[0] == "float32"
    assert precision.resolve_precision("float16", "cpu") == ("float16", "as asked")
    with pytest.raises(ValueError, match="precision must be one of auto, float32.*got 'fp8'"):
        precision.resolve_precision("fp8", "cpu")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A tiny model saved in the converter's layout: Flan-T5 in bfloat16, the rest float32."""
    model = make_varied_tiny_model(0)
    model.language_model.to(torch.bfloat16)
    precision.record_dtypes(model)
    folder = tmp_path_factory.mktemp("mixed")
    model.save_pretrained(folder)
    size = model.config.vision_config.image_size
    processor = DynReferProcessor(
        DynReferImageProcessor(size={"height": size, "width": size}), make_tiny_tokenizer()
    )
    processor.save_pretrained(folder)
    return folder, model


def part_dtypes(model) -> dict[str, torch.dtype]:
    return {name: parameter.dtype for name, parameter in model.named_parameters()}


def test_config_records_the_dtype_of_every_sub_model(mixed_folder):
    folder, _ = mixed_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["dtype"] == "bfloat16"
    assert (
        config["vision_config"]["dtype"] == config["qformer_config"]["dtype"] == config["dtype"] == "float32"
    )


def test_dtype_auto_loads_every_part_as_saved_and_a_dtype_casts_all(mixed_folder, tmp_path):
    folder, saved = mixed_folder
    loaded = DynReferForRegionCaptioning.from_pretrained(folder, dtype="auto")
    assert part_dtypes(loaded) == part_dtypes(saved)
    assert loaded.language_model.shared.weight.dtype == torch.bfloat16
    assert loaded.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
    for name, parameter in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], parameter), name
    assert loaded.config.text_config.dtype == torch.bfloat16 and loaded.config.dtype == torch.float32
    # saved again and reloaded: the record follows the weights
    loaded.save_pretrained(tmp_path)
    assert part_dtypes(DynReferForRegionCaptioning.from_pretrained(tmp_path, dtype="auto")) == part_dtypes(
        saved
    )
    everything = DynReferForRegionCaptioning.from_pretrained(folder, dtype=torch.bfloat16)
    assert set(part_dtypes(everything).values()) == {torch.bfloat16}


def test_upstream_precision_keeps_the_language_model_bfloat16_and_the_rest_float32(mixed_folder):
    folder, _ = mixed_folder
    model = DynReferForRegionCaptioning.from_pretrained(
        folder, **precision.from_pretrained_kwargs("bfloat16")
    )
    precision.set_precision(model, "upstream")
    for name, dtype in part_dtypes(model).items():
        assert dtype == (torch.bfloat16 if name.startswith("language_model.") else torch.float32), name
    assert model.clip_embeds.dtype == torch.float32


def region_inputs(model, regions: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(regions, model.config.num_views, 3, size, size, generator=generator)
    view_boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0]]).expand(regions, model.config.num_views, 4).clone()
    return pixel_values, view_boxes


def test_device_map_auto_offloads_to_disk_under_a_memory_limit_with_the_same_outputs(mixed_folder, tmp_path):
    folder, _ = mixed_folder
    reference = DynReferForRegionCaptioning.from_pretrained(folder, dtype="auto")
    weights_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    offloaded = DynReferForRegionCaptioning.from_pretrained(
        folder,
        dtype="auto",
        device_map="auto",
        max_memory={"cpu": weights_bytes // 3},  # a third of the model fits in memory
        offload_folder=str(tmp_path / "offload"),
    )
    placements = set(offloaded.hf_device_map.values())
    assert "disk" in placements, offloaded.hf_device_map
    pixel_values, view_boxes = region_inputs(reference)
    with torch.no_grad():
        expected = reference.get_region_queries(pixel_values, view_boxes)
        got = offloaded.get_region_queries(pixel_values, view_boxes)
        torch.testing.assert_close(got, expected)
        ids = reference.generate(pixel_values, view_boxes, num_beams=1, max_new_tokens=4).sequences
        assert torch.equal(
            offloaded.generate(pixel_values, view_boxes, num_beams=1, max_new_tokens=4).sequences, ids
        )


def test_int8_quantizes_the_linear_layers_and_stays_close_to_float32(mixed_folder):
    pytest.importorskip("torchao")
    from torchao.utils import TorchAOBaseTensor

    folder, _ = mixed_folder
    reference = DynReferForRegionCaptioning.from_pretrained(folder, dtype=torch.float32)
    quantized = DynReferForRegionCaptioning.from_pretrained(
        folder, **precision.from_pretrained_kwargs("float32", "int8")
    )
    assert isinstance(quantized.vision_model.encoder.layers[0].mlp.fc1.weight, TorchAOBaseTensor)
    assert isinstance(
        quantized.language_model.encoder.block[0].layer[1].DenseReluDense.wo.weight, TorchAOBaseTensor
    )
    # the label heads stay in their dtype (their scores meet thresholds)
    assert quantized.tag_fc.weight.dtype == torch.float32 and not isinstance(
        quantized.tag_fc.weight, TorchAOBaseTensor
    )
    # one layer against its float32 self: int8 weights (per channel) and activations (per token) lose ~1%
    inputs = torch.randn(
        5, reference.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference.vision_model.encoder.layers[0].mlp.fc1(inputs)
        got = quantized.vision_model.encoder.layers[0].mlp.fc1(inputs)
    assert not torch.equal(got, expected)  # it did quantize
    assert (got - expected).norm() / expected.norm() < 0.03
    pixel_values, view_boxes = region_inputs(reference, regions=3)
    with torch.no_grad():
        ids = quantized.generate(pixel_values, view_boxes, num_beams=1, max_new_tokens=4).sequences
    assert ids.shape[0] == 3


def test_pipeline_auto_runs_at_the_machines_precision(monkeypatch, mixed_folder):
    folder, _ = mixed_folder
    mock_cpu(monkeypatch, True, False)
    assert pipeline("region-captioning", model=str(folder), device="cpu").model.dtype == torch.bfloat16
    mock_cpu(monkeypatch, False, False)
    assert set(
        part_dtypes(pipeline("region-captioning", model=str(folder), device="cpu").model).values()
    ) == {torch.float32}
    loaded = pipeline("region-captioning", model=str(folder), device="cpu", dtype=torch.float16).model
    assert loaded.vision_model.embeddings.patch_embedding.weight.dtype == torch.float16  # as asked, not auto
    mock_cpu(monkeypatch, True, False)
    model = DynReferForRegionCaptioning.from_pretrained(folder, dtype="auto")
    given = pipeline("region-captioning", model=model, processor=str(folder), device="cpu").model
    assert given is model and part_dtypes(model)["language_model.shared.weight"] == torch.bfloat16
    assert (
        part_dtypes(model)["vision_model.embeddings.patch_embedding.weight"] == torch.float32
    )  # used as it is


def run_caption(folder, image, *options):
    return subprocess.run(
        [sys.executable, "-m", "dynrefer_hf.cli", "caption", str(image), "--box", "10,20,200,180",
         "--model", str(folder), "--device", "cpu", "--max-new-tokens", "3", *options],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}, timeout=600,
        check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_says_which_precision_it_chose_and_quantizes_on_request(tiny_region_captioner, fixtures_dir):
    image = fixtures_dir / "images" / "COCO_val2014_000000000192.jpg"
    chosen = run_caption(tiny_region_captioner, image, "--dtype", "float32")
    assert chosen.returncode == 0, chosen.stderr
    notes = [line for line in chosen.stderr.splitlines() if line.startswith("dynrefer:")]
    assert notes == ["dynrefer: precision float32 (as asked; --dtype to choose, --quiet to hide this)"]
    quiet = run_caption(tiny_region_captioner, image, "--quantize", "int8", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert "dynrefer:" not in quiet.stderr and "10,20,200,180" in quiet.stdout.replace(" ", "").replace(
        ".0", ""
    )
    bad = run_caption(tiny_region_captioner, image, "--dtype", "fp8")
    assert bad.returncode == 2 and "--dtype: invalid choice: 'fp8'" in bad.stderr


@pytest.mark.slow
def test_bench_full_size_runs_at_tiny_scale(tmp_path):
    def bench(*options):
        command = [
            sys.executable, os.path.join(ROOT, "benchmarks", "bench_full_size.py"), "--scale", "tiny",
            "--workdir", str(tmp_path), "--output", str(tmp_path / "results.csv"), "--regions", "2",
            "--decoding", "greedy", "--skip-peaks", *options,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "building the tiny model" in bench("--precisions", "bfloat16")
    # the saved model is reused; past the time limit nothing more starts, and the skipped ones are named
    again = bench("--precisions", "float32,int8", "--time-limit", "0")
    assert "building" not in again
    assert "skipped (--time-limit 0.0 s or failed): float32_greedy_2regions, int8_greedy_2regions" in again
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from _common import read_results

    rows = {row["metric"]: row for row in read_results(tmp_path / "results.csv")}
    assert {row["variant"] for row in rows.values()} == {"bfloat16_greedy_2regions"}
    stages = ("processor_s", "vit_s", "fuse_s", "qformer_s", "heads_s", "generation_s")
    for metric in ("load_s", "load_peak_rss_gib", "peak_rss_gib", "regions_per_s", "s_per_region", *stages):
        assert float(rows[metric]["value"]) > 0, metric
    total = float(rows["s_per_region"]["value"]) * 2
    assert sum(float(rows[stage]["value"]) for stage in stages) <= total * 1.01
    assert float(rows["regions_per_s"]["value"]) == pytest.approx(
        1 / float(rows["s_per_region"]["value"]), rel=1e-4
    )
