"""The web demo as a Hugging Face Space (``sdk: gradio``, ``app_file: app.py``): the page of ``dynrefer demo``.

Runs from a clone of this repository without installing it (``src/`` goes on the import path). The model
is the demonstration model shipped in the package unless the ``DYNREFER_MODEL`` environment variable
names another model folder or Hub id; ``DYNREFER_SEGMENTER`` (a SAM / SAM 2 folder or Hub id, e.g.
``facebook/sam-vit-base``) turns on clicking on objects. docs/demo.md says how to make a Space of it.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from dynrefer_hf.app import LAUNCH_OPTIONS, build_demo

demo = build_demo(
    os.environ.get("DYNREFER_MODEL") or None, segmenter=os.environ.get("DYNREFER_SEGMENTER") or None
)

if __name__ == "__main__":
    demo.launch(**LAUNCH_OPTIONS)
