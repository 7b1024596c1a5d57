"""The package's layers: imports only point downwards (model <- data <- training, serving <- integrations; cli
on top)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vlm_peft"
# What each layer may import from vlm_peft (besides itself); tiny and atomic are leaves that import no vlm_peft
# module.
ALLOWED = {
    "model": {"atomic"},
    "data": {"model", "atomic"},
    "training": {"model", "data", "tiny", "atomic"},
    "serving": {"model", "data", "atomic"},
    "integrations": {"model", "data", "serving", "atomic"},
    "tiny": set(),
    "atomic": set(),
}


def _imported_layers(path: Path) -> set[str]:
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]  # e.g. ("vlm_peft", "model")
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join((*base, node.module)) if node.module else ".".join(base)
            else:
                name = node.module or ""
            names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for full in names:
            parts = full.split(".")
            if parts[0] == "vlm_peft" and len(parts) > 1:
                layers.add(parts[1])
    return layers


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT or p.stem in ("tiny", "atomic"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_downwards(path):
    layer = path.parent.name if path.parent != ROOT else path.stem
    wrong = _imported_layers(path) - ALLOWED[layer] - {layer}
    assert not wrong, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(wrong)}"


def test_layout_found_every_layer():
    assert {p.parent.name for p in MODULES} >= {"model", "data", "training", "serving"}
