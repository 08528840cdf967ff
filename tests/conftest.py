"""Test-wide setup.

Triton's interpreter must be switched on before anything imports triton (transformers does so
indirectly), so it is set here, at the very top. Model tests use the reference ops by default
(``DYNREFER_OPS_BACKEND=reference``); the kernel tests ask for the Triton path explicitly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DYNREFER_OPS_BACKEND", "reference")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures``: the vendored COCO images and golden view vectors (tests/fixtures/README.md)."""
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def tiny_region_captioner(tmp_path_factory) -> Path:
    """A folder holding a saved tiny DynRefer model, tokenizer and image processor (``tiny.save_tiny_region_captioner``)."""
    from tiny import save_tiny_region_captioner

    return save_tiny_region_captioner(tmp_path_factory.mktemp("tiny_region_captioner"))


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory) -> Path:
    """A folder holding a saved tiny, randomly initialised SAM and its processor (``tiny.save_tiny_sam``)."""
    from tiny import save_tiny_sam

    return save_tiny_sam(tmp_path_factory.mktemp("tiny_sam"))
