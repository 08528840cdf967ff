"""Checkpoints shipped inside the package.

``shapes-demo/``: the demonstration DynRefer trained by ``dynrefer train-demo`` on synthetic shapes scenes
(docs/demo_model.md); not the paper's model.
"""

from pathlib import Path

__all__ = ["SHAPES_DEMO_PATH"]

SHAPES_DEMO_PATH = Path(__file__).resolve().parent / "shapes-demo"
