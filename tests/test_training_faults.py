"""An interrupted training loses nothing (docs/reliability.md): a run killed with SIGKILL and resumed from its
last complete checkpoint ends with the same weights, bit for bit on CPU, as an uninterrupted run; a
checkpoint half-written when the run was killed is never the one resumed from.

Each run is examples/finetune.py on a saved tiny model, in a fresh interpreter that kills itself with SIGKILL
at a chosen point (the worker below patches `RegionTrainer`); the uninterrupted reference runs the same way.
"""

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from launch import run_command
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parent
EXAMPLE = str(TESTS_DIR.parent / "examples" / "finetune.py")

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent(
    """
    import os, runpy, signal, sys

    from dynrefer_hf.training import RegionTrainer

    kill = os.environ.get("KILL_AT")  # "step:N" (inside step N + 1) or "save:N" (while checkpoint-N is written)
    rank = os.environ.get("RANK", "0")
    if kill and rank == os.environ.get("KILL_RANK", rank):  # every process, or only rank KILL_RANK
        kind, step = kill.split(":")
        step = int(step)
        name = "training_step" if kind == "step" else "_save_rng_state"
        original = getattr(RegionTrainer, name)

        def killing(self, *args, **kwargs):
            if self.state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)

        setattr(RegionTrainer, name, killing)
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny shapes model and its processor, saved once: every run starts from the same weights and tokenizer."""
    sys.path.insert(0, str(Path(EXAMPLE).parent))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    folder = tmp_path_factory.mktemp("base")
    model, processor = finetune.build_tiny(4, 0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    worker = folder / "worker.py"
    worker.write_text(WORKER)
    return folder


def _run(base, output, *extra, kill=None, launcher=(), kill_rank=None):
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DYNREFER_OPS_BACKEND": "reference",
    }
    environment.pop("KILL_AT", None)
    if kill:
        environment["KILL_AT"] = kill
    if kill_rank is not None:
        environment["KILL_RANK"] = str(kill_rank)
    arguments = [
        "--model", str(base), "--num-shapes-images", "4", "--batch-size", "3", "--max-steps", "6",
        "--save-steps", "2", "--logging-steps", "1", "--output-dir", str(output), "--seed", "3", *extra,
    ]  # fmt: skip
    command = [*(launcher or [sys.executable]), str(base / "worker.py"), EXAMPLE, *arguments]
    return run_command(command, env=environment, timeout=240, retries_on_hang=1)


def _final_weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def _assert_same(resumed, reference):
    assert resumed.keys() == reference.keys()
    different = [name for name in reference if not (resumed[name] == reference[name]).all()]
    assert not different, different[:5]


def _torchrun():
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.parametrize(
    ("name", "extra", "kill"),
    [
        # killed while checkpoint-4 is being written (weights saved, RNG state not): resumed from checkpoint-2
        ("plain", (), "save:4"),
        # killed in the middle of step 4 (after checkpoint-2): resumed from checkpoint-2
        ("lora", ("--lora", "--lora-r", "4", "--lora-alpha", "8"), "step:3"),
    ],
)
def test_killed_run_resumes_to_the_same_weights(base_model, tmp_path, name, extra, kill):
    reference = _run(base_model, tmp_path / "reference", *extra)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = _run(base_model, tmp_path / "run", *extra, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    if kill == "save:4":
        assert (tmp_path / "run" / "checkpoint-4").is_dir()  # written in part, never resumed from
        from dynrefer_hf.training import last_complete_checkpoint

        assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-2")
    resumed = _run(base_model, tmp_path / "run", *extra, "--resume-from-checkpoint", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(_final_weights(tmp_path / "run"), _final_weights(tmp_path / "reference"))


def test_killed_two_process_gloo_run_resumes_to_the_same_weights(base_model, tmp_path):
    """Rank 1 is killed while checkpoint-4 is written (rank 0 has saved the weights, rank 1 not its RNG state):
    checkpoint-4 stays incomplete, and the resumed two-process run ends as the uninterrupted one."""
    from dynrefer_hf.training import last_complete_checkpoint

    reference = _run(base_model, tmp_path / "reference", launcher=_torchrun())
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = _run(base_model, tmp_path / "run", kill="save:4", kill_rank=1, launcher=_torchrun())
    assert killed.returncode != 0 and not (tmp_path / "run" / "model.safetensors").exists()
    assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-2")
    resumed = _run(base_model, tmp_path / "run", "--resume-from-checkpoint", "last", launcher=_torchrun())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(_final_weights(tmp_path / "run"), _final_weights(tmp_path / "reference"))
