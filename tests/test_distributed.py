"""Real multi-process runs on CPU (gloo): the distributed contrastive loss and its gradients, steps of a plain
transformers Trainer training every head under DistributedDataParallel, and examples/finetune.py under
torchrun and accelerate launch.

Each launch starts two Python processes that import torch and transformers (~10 s each on a loaded CPU), so
one worker script does several checks and writes what it saw; the assertions run here, against references
computed in this (single) process.

Semantics checked (docs/upstream/model.md §8, docs/training.md): rank r holds b regions and their captions, S_r, and with
``f_ij = -logsigmoid(label_ij * logit(caption i, region j))`` computes
``loss_r = 0.25 * (sum_{i in S_r, all j} f_ij + sum_{all i, j in S_r} f_ij) / b``, the other ranks' rows
gathered as constants. DDP averages gradients, so training follows ``L = mean_r loss_r``: with equal shares
its value is the single-process loss of the whole batch, and its gradient is the whole-batch gradient for
the parameters applied after the gather (attr_head, attr_fc, attr_t, attr_b) but not before it (projections,
Q-Former, ...), where a pair across ranks contributes through its local side only.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launch import run_command
from tiny import make_tiny_model

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
REGIONS, VIEWS, SIZE, EMBED = 6, 3, 56, 32
SPLITS = {"equal": (3, 3), "unequal": (2, 4)}  # regions per rank
EXAMPLE = str(REPO / "examples" / "finetune.py")
TINY_RUN = ["--tiny", "--num-shapes-images", "4", "--max-steps", "2", "--logging-steps", "1"]
AFTER_GATHER = ("attr_head.", "attr_fc.")  # and the scalars attr_t, attr_b

pytestmark = pytest.mark.slow


def contrastive_model():
    """The tiny model with logit bias 0 instead of -10: negatives then weigh as much as positives, so the
    pairs across ranks change the gradients measurably."""
    return make_tiny_model(attr_logit_bias_init=0.0)


def contrastive_inputs():
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(REGIONS, VIEWS, 3, SIZE, SIZE, generator=generator)
    corners = torch.rand(REGIONS, VIEWS, 2, generator=generator) * 24
    view_boxes = torch.cat(
        [corners, corners + 8 + torch.rand(REGIONS, VIEWS, 2, generator=generator) * 24], dim=-1
    )
    caption_embeds = torch.randn(REGIONS, EMBED, generator=generator)
    return pixel_values, view_boxes.round(), caption_embeds


WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, TrainingArguments

    from tiny import make_tiny_config, make_tiny_tokenizer
    from test_distributed import EXAMPLE, SPLITS, TINY_RUN, contrastive_inputs, contrastive_model
    from dynrefer_hf.shapes import SHAPES_VOCABULARY, shapes_split
    from transformers import Trainer
    from dynrefer_hf.training import CaptionEmbeddingCollator, RegionTrainingCollator
    from dynrefer_hf.image_processing_dynrefer import DynReferImageProcessor
    from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning
    from dynrefer_hf.processing_dynrefer import DynReferProcessor
    from dynrefer_hf.training import bag_of_words_embeddings

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}

    # (a) the contrastive loss of this rank's share of the batch, and the DDP-averaged gradients
    pixel_values, view_boxes, caption_embeds = contrastive_inputs()
    for split, counts in SPLITS.items():
        rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        model = contrastive_model()
        output = model(pixel_values[rows], view_boxes[rows], caption_embeds=caption_embeds[rows])
        output.loss_region_text.backward()
        grads = {}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)  # what DDP does: sum, then divide by the world size
                grads[name] = parameter.grad / world
        result[split] = {"loss": output.loss_region_text.item(), "logits": output.contrastive_logits.detach()}
        if rank == 0:
            torch.save(grads, os.path.join(out, f"grads_{split}.pt"))

    # (b) Trainer steps under DDP: tiny shapes model, each rank its own scenes
    vocabulary = SHAPES_VOCABULARY
    config = make_tiny_config(
        tag_names=list(vocabulary.tags), attribute_names=list(vocabulary.attributes),
        attribute_group_sizes=[1] * len(vocabulary.attributes),
        attribute_prompts=[f"the {value}" for value in vocabulary.attribute_values],
        class_names=list(vocabulary.classes), class_prompts=[f"the {name}" for name in vocabulary.classes],
    )
    torch.manual_seed(0)
    model = DynReferForRegionCaptioning(config)
    with torch.no_grad():  # distinct label embeddings
        for table in (model.clip_embeds, model.att_embeds, model.ov_embeds):
            table.normal_()
    # tokenizer training is not reproducible across processes: every rank uses rank 0's
    if rank == 0:
        make_tiny_tokenizer().save_pretrained(os.path.join(out, "tokenizer"))
    dist.barrier()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    processor = DynReferProcessor(DynReferImageProcessor(size={"height": 56, "width": 56}), tokenizer)
    scenes = shapes_split("train", 4, seed=3)
    encode = lambda captions: bag_of_words_embeddings(captions, vocabulary.tags, config.text_embed_dim)
    # every head: captions, tags, region-caption contrastive, attribute and class labels
    collator = CaptionEmbeddingCollator(RegionTrainingCollator(processor, vocabulary, seed=rank), encode)
    model.config.attribute_label_loss = "group_softmax"
    fixed_views = RegionTrainingCollator(
        processor, vocabulary, view_selection=[0.5, 0.25], use_controls=False
    )
    fixed = fixed_views(list(scenes))
    fixed["caption_embeds"] = encode([c for captions in scenes["captions"] for c in captions])
    fixed.pop("attribute_labels"), fixed.pop("class_labels")

    def fixed_loss():
        model.eval()
        with torch.no_grad():
            return model(**fixed).loss.item()

    seen, parts = [], []
    class RecordingCollator:
        def __call__(self, records):
            seen.append([record["image_id"] for record in records])
            return collator(records)

    result["loss_before"] = fixed_loss()
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    arguments = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=1, max_steps=6,
        learning_rate=3e-3,
        logging_steps=1, report_to=[], remove_unused_columns=False, use_cpu=True, save_strategy="no",
        disable_tqdm=True, ddp_find_unused_parameters=True, seed=0,
    )
    class RecordingTrainer(Trainer):  # a plain Trainer that notes which loss parts the model computed
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            parts.append(sorted(key for key in outputs.keys() if key.startswith("loss_")))
            return (loss, outputs) if return_outputs else loss

    trainer = RecordingTrainer(
        model=model, args=arguments, train_dataset=scenes, data_collator=RecordingCollator()
    )
    trainer.train()
    result["loss_parts"] = parts
    result["loss_after"] = fixed_loss()
    result["images_seen"] = seen
    result["trainer_is_distributed"] = trainer.model_wrapped is not model
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    result["moved"] = sum(not torch.equal(initial[name], p) for name, p in trained)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    result["max_parameter_difference"] = max((copy - flat).abs().max().item() for copy in copies)
    result["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()

    # (c) the example script, run as torchrun runs it (it ends by destroying the process group)
    import runpy
    sys.argv = [EXAMPLE, *TINY_RUN, "--batch-size", "3", "--lora", "--gradient-checkpointing", "--output-dir",
                os.path.join(out, "example")]
    runpy.run_path(EXAMPLE, run_name="__main__")
    assert not dist.is_initialized()
    """
)


def _environment() -> dict:
    environment = dict(os.environ)
    environment.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DYNREFER_OPS_BACKEND="reference",
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), environment.get("PYTHONPATH", "")]),
    )
    return environment


def _launch(command: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    completed = run_command(command, env=_environment(), timeout=timeout, cwd=cwd, retries_on_hang=1)
    output = f"{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    assert completed.returncode == 0, f"{command} failed:\n{output}"
    return completed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*arguments: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *arguments,
    ]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    script = folder / "worker.py"
    script.write_text(WORKER)
    completed = _launch(_torchrun(str(script), str(folder)), cwd=folder)
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    grads = {split: torch.load(folder / f"grads_{split}.pt") for split in SPLITS}
    return ranks, grads, folder, completed.stdout


# --------------------------------------------------------------------------------- reference (one process)


def reference_rank_losses(model, region_queries, caption_embeds, counts):
    """loss_r of every rank, written out from docs/upstream/model.md §8: the local rows keep their graph, the rows gathered
    from the other ranks are constants (detached after the projections, where the model gathers)."""
    memory = model.attr_vision_proj(region_queries)  # [B, Q, H]
    text = model.attr_text_proj(caption_embeds)  # [B, H]

    def scores(text_rows, memory_rows):  # [regions, captions]
        queries = text_rows.unsqueeze(0).expand(memory_rows.shape[0], -1, -1)
        return model.attr_fc(F.normalize(model.attr_head(queries, memory_rows), dim=-1)).squeeze(-1)

    def pair_terms(logits, positives):
        return -F.logsigmoid(torch.where(positives, logits, -logits))

    scale, bias, total = model.attr_t.exp(), model.attr_b, sum(counts)
    losses = []
    for rank, count in enumerate(counts):
        start = sum(counts[:rank])
        local = torch.zeros(total, dtype=torch.bool)
        local[start : start + count] = True
        memory_seen = torch.where(local[:, None, None], memory, memory.detach())
        text_seen = torch.where(local[:, None], text, text.detach())
        positives = torch.zeros(count, total, dtype=torch.bool)
        positives[torch.arange(count), torch.arange(count) + start] = True
        i2t = scores(text[local], memory_seen).T * scale + bias  # local captions x all regions
        t2i = scores(text_seen, memory[local]) * scale + bias  # local regions x all captions
        losses.append(0.25 * (pair_terms(i2t, positives).sum() + pair_terms(t2i, positives).sum()) / count)
    return losses


def test_contrastive_loss_under_two_ranks_equals_the_whole_batch_loss(worker_results):
    ranks = worker_results[0]
    pixel_values, view_boxes, caption_embeds = contrastive_inputs()
    model = contrastive_model()
    with torch.no_grad():
        single = model(pixel_values, view_boxes, caption_embeds=caption_embeds)
        queries = single.region_queries
        for split, counts in SPLITS.items():
            expected = reference_rank_losses(model, queries, caption_embeds, counts)
            for rank, result in enumerate(ranks):
                assert result[split]["loss"] == pytest.approx(expected[rank].item(), rel=1e-5), (split, rank)
                # this rank's regions against every caption of the batch, in batch order
                rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
                torch.testing.assert_close(
                    result[split]["logits"], single.contrastive_logits[rows], rtol=1e-5, atol=1e-5
                )
    # equal shares: the mean over ranks (what DDP trains on) is the single-process loss of the whole batch
    mean = sum(result["equal"]["loss"] for result in ranks) / 2
    assert mean == pytest.approx(single.loss_region_text.item(), rel=1e-5)
    assert ranks[0]["equal"]["loss"] != pytest.approx(ranks[1]["equal"]["loss"], rel=1e-3)  # shares differ


def test_ddp_averaged_gradients_follow_the_gathered_constants_rule(worker_results):
    grads = worker_results[1]
    pixel_values, view_boxes, caption_embeds = contrastive_inputs()
    for split, counts in SPLITS.items():
        model = contrastive_model()
        queries = model.get_region_queries(pixel_values, view_boxes)
        (sum(reference_rank_losses(model, queries, caption_embeds, counts)) / len(counts)).backward()
        expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert set(grads[split]) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(grads[split][name], grad, rtol=1e-4, atol=1e-7, msg=name)

    # against the single-process gradient of the whole batch: equal after the gather, different before it
    model = contrastive_model()
    model(pixel_values, view_boxes, caption_embeds=caption_embeds).loss_region_text.backward()
    single = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    after = [name for name in single if name.startswith(AFTER_GATHER) or name in ("attr_t", "attr_b")]
    assert "attr_t" in after and any(name.startswith("attr_head.") for name in after)
    for name in after:
        torch.testing.assert_close(grads["equal"][name], single[name], rtol=1e-4, atol=1e-7, msg=name)
    for name in ("attr_vision_proj.weight", "attr_text_proj.weight"):
        assert not torch.allclose(grads["equal"][name], single[name], rtol=1e-2, atol=1e-6), name


def test_trainer_steps_under_ddp_keep_ranks_identical_and_lower_the_loss(worker_results):
    ranks = worker_results[0]
    assert all(result["trainer_is_distributed"] for result in ranks)
    # each rank read its own scenes (so identical parameters come from gradient synchronisation)
    seen = [sorted(image for batch in result["images_seen"] for image in batch) for result in ranks]
    assert seen[0] != seen[1]
    assert all(result["moved"] > 0 for result in ranks)
    assert all(result["max_parameter_difference"] == 0.0 for result in ranks)
    assert ranks[0]["loss_before"] == ranks[1]["loss_before"]
    for result in ranks:
        assert result["loss_after"] < result["loss_before"] * 0.97
        assert len(result["losses"]) == 6
        every_head = ["loss_attribute", "loss_caption", "loss_class", "loss_region_text", "loss_tag"]
        assert result["loss_parts"] == [every_head] * 6


def _check_saved_model(folder: Path) -> None:
    from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning
    from dynrefer_hf.processing_dynrefer import DynReferProcessor

    model = DynReferForRegionCaptioning.from_pretrained(folder)
    assert not any("lora" in name for name, _ in model.named_parameters())  # adapters merged
    DynReferProcessor.from_pretrained(folder)


def test_finetune_example_tiny_mode_under_torchrun(worker_results):
    _, _, folder, stdout = worker_results
    assert stdout.count("saved to") == 1  # by rank 0 only
    _check_saved_model(folder / "example")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not installed")
def test_finetune_example_tiny_mode_under_accelerate_launch(tmp_path):
    output = tmp_path / "out"
    # --multi_gpu with 2 processes: on a machine without GPUs, 2 gloo processes (`--cpu` would start one)
    launcher = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    command = [*launcher.split(), "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command += [EXAMPLE, *TINY_RUN, "--batch-unit", "image", "--batch-size", "1", "--output-dir", str(output)]
    completed = _launch(command, cwd=tmp_path)
    # 4 scenes, 1 per process and step: 2 steps cover the data once only with 2 processes
    assert "'epoch': '1'" in completed.stdout and "'epoch': '0.5'" in completed.stdout
    _check_saved_model(output)
    assert json.loads((output / "config.json").read_text())["model_type"] == "dynrefer"
