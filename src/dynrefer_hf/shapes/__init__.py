"""The offline demonstration: synthetic shapes scenes, the tokenizer trainer and the demonstration model's training.

The trained demonstration checkpoint itself ships in ``dynrefer_hf/pretrained/shapes-demo`` (docs/demo_model.md).
"""

from .demo_model import (
    SHAPES_DEMO_PATH,
    DemoTrainingRun,
    ShapesDemoSettings,
    TimeLimitCallback,
    build_demo_model,
    build_demo_processor,
    calibrate_tag_threshold,
    evaluate_demo_model,
    train_demo_model,
    train_shapes_demo,
)
from .scenes import (
    SHAPES_SPLITS,
    SHAPES_VOCABULARY,
    ShapeObject,
    ShapesScene,
    build_shapes_dataset,
    export_shapes_upstream,
    generate_scene,
    scene_record,
    shapes_split,
)
from .tokenizer import train_t5_style_tokenizer

__all__ = [
    "SHAPES_DEMO_PATH",
    "SHAPES_SPLITS",
    "SHAPES_VOCABULARY",
    "DemoTrainingRun",
    "ShapeObject",
    "ShapesDemoSettings",
    "ShapesScene",
    "TimeLimitCallback",
    "build_demo_model",
    "build_demo_processor",
    "build_shapes_dataset",
    "export_shapes_upstream",
    "calibrate_tag_threshold",
    "evaluate_demo_model",
    "generate_scene",
    "scene_record",
    "shapes_split",
    "train_demo_model",
    "train_shapes_demo",
    "train_t5_style_tokenizer",
]
