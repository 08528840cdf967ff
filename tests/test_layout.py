"""The package layout of docs/architecture.md: old import paths still work (with a warning), imports flow one way."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dynrefer_hf"

MOVED = [
    ("dynrefer_hf.pipeline_region_captioning", "dynrefer_hf.pipelines.region_captioning", "RegionCaptioningPipeline"),
    ("dynrefer_hf.finetuning", "dynrefer_hf.training.lora", "add_language_model_lora"),
    ("dynrefer_hf.shapes_demo", "dynrefer_hf.shapes.demo_model", "train_shapes_demo"),
    ("dynrefer_hf.tokenization", "dynrefer_hf.shapes.tokenizer", "train_t5_style_tokenizer"),
    ("dynrefer_hf.data.shapes", "dynrefer_hf.shapes.scenes", "shapes_split"),
    ("dynrefer_hf.data.collator", "dynrefer_hf.training.collator", "RegionTrainingCollator"),
    ("dynrefer_hf.data", "dynrefer_hf.shapes", "SHAPES_VOCABULARY"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_moved_names_work_at_their_old_path_with_a_future_warning(old, new, name):
    with pytest.warns(FutureWarning, match=f"{new}.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError):
        _ = importlib.import_module(old).no_such_name


# Each layer may import only from the layers listed for it (docs/architecture.md, "Dependency direction").
CORE = {"configuration_dynrefer", "modeling_dynrefer", "image_processing_dynrefer", "processing_dynrefer", "views",
        "modeling_common", "modeling_view_encoder", "modeling_qformer_bridge", "modeling_label_heads",
        "modeling_language_bridge", "modeling_vocabularies",
        "prompts", "visualize", "ops", "pipelines", "convert", "resources", "pretrained", "_deprecation",
        "validation", "segmentation"}
ALLOWED = {
    "core": CORE,
    "data": CORE | {"data"},
    "metrics": CORE | {"metrics"},
    "training": CORE | {"data", "metrics", "training"},
    "evaluation": CORE | {"data", "metrics", "evaluation"},
    "shapes": CORE | {"data", "metrics", "training", "evaluation", "shapes"},
    "app": CORE | {"data", "metrics", "training", "evaluation", "shapes", "app"},
    "cli": CORE | {"data", "metrics", "training", "evaluation", "shapes", "app", "cli"},
}


def _layer(top: str) -> str:
    return top if top in ALLOWED else "core"


def _imported_tops(path: Path) -> set[str]:
    """First component under ``dynrefer_hf`` of every import in ``path`` (absolute or relative)."""
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # `from . import x` at the package root
                    parts = [alias.name for alias in node.names]
                tops.update(parts[:1])
            elif node.module and node.module.startswith("dynrefer_hf."):
                tops.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            tops.update(a.name.split(".")[1] for a in node.names if a.name.startswith("dynrefer_hf."))
    return {top.removesuffix(".py") for top in tops}


def test_imports_flow_one_way():
    # the package root registers everything; aliases only name their new homes in strings
    skipped = {Path("__init__.py")} | {Path(*old.split(".")[1:]).with_suffix(".py") for old, _, _ in MOVED}
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative in skipped:
            continue
        # a `__main__.py` is an entry point, like the console script
        layer = "cli" if relative.name == "__main__.py" else _layer(relative.parts[0].removesuffix(".py"))
        for top in _imported_tops(path) - ALLOWED[layer]:
            wrong.append(f"{relative} ({layer}) imports {top} ({_layer(top)})")
    assert not wrong, "\n".join(wrong)
