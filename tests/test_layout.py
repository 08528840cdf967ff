"""The package layout of docs/architecture.md: imports flow one way."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dynrefer_hf"

# Each layer may import only from the layers listed for it (docs/architecture.md, "Dependency direction").
CORE = {"configuration_dynrefer", "modeling_dynrefer", "image_processing_dynrefer", "processing_dynrefer", "views",
        "modeling_common", "modeling_view_encoder", "modeling_qformer_bridge", "modeling_label_heads",
        "modeling_language_bridge", "modeling_vocabularies",
        "prompts", "visualize", "ops", "pipelines", "convert", "resources", "pretrained", "images",
        "validation", "segmentation", "sharding", "precision"}
ALLOWED = {
    "core": CORE,
    "data": CORE | {"data"},
    "metrics": CORE | {"metrics"},
    "training": CORE | {"data", "metrics", "training"},
    "evaluation": CORE | {"data", "metrics", "evaluation"},
    "batch": CORE | {"data", "batch"},
    "serving": CORE | {"serving"},
    "shapes": CORE | {"data", "metrics", "training", "evaluation", "shapes"},
    "app": CORE | {"data", "metrics", "training", "evaluation", "batch", "serving", "shapes", "app"},
    "cli": CORE | {"data", "metrics", "training", "evaluation", "batch", "serving", "shapes", "app", "cli"},
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
    # the package root registers everything
    skipped = {Path("__init__.py")}
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
