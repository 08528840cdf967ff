"""The Gradio web demo: draw boxes or click on a picture in the browser, read DynRefer's description of each region.

Needs the ``[demo]`` extra (Gradio 6); importing this package without it raises an ``ImportError`` that
says what to install. Started by ``dynrefer demo`` and by ``app.py`` at the repository root (docs/demo.md).
"""

from .web import (
    EXAMPLES,
    GRADIO_REQUIREMENT,
    LAUNCH_OPTIONS,
    MAX_IMAGE_PIXELS,
    MAX_REGIONS,
    TABLE_HEADERS,
    build_demo,
    open_picture,
    parse_regions,
    remove_region,
)

__all__ = [
    "EXAMPLES",
    "GRADIO_REQUIREMENT",
    "LAUNCH_OPTIONS",
    "MAX_IMAGE_PIXELS",
    "MAX_REGIONS",
    "TABLE_HEADERS",
    "build_demo",
    "open_picture",
    "parse_regions",
    "remove_region",
]
