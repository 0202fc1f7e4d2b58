"""The package's shape: each part imports only the parts its docstring allows, Ray is imported in one module, and
the README's layout table lists exactly the parts there are. Fast: reads source files, runs nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "air_ray"

# part -> the parts it may import (lazily or not). A part is a subpackage, or one of the top-level modules.
ALLOWED = {
    "errors": set(),
    "fsio": {"errors"},
    "influence": set(),
    "models": {"errors"},
    "store": {"errors", "fsio"},
    "config": {"errors", "influence", "models", "data", "store"},  # influence: the step weighting; models: the default
    # model's name; data: the formats, step rules and think tags of the data contract
    "data": {"errors", "fsio"},
    "engine": {"errors", "config", "influence", "data", "models", "store"},
    "heads": {"errors", "fsio", "config", "models", "engine", "store"},
    "outputs": {"errors", "fsio", "config", "influence", "data", "models", "store"},
    "training": {"errors", "influence", "data", "models", "store", "config", "outputs"},
    "pipeline": {"errors", "fsio", "config", "influence", "data", "models", "engine", "heads", "outputs", "store",
                 "training"},
    "evaluation": {"errors", "fsio", "config", "data", "models", "outputs", "store", "training"},  # never engine: students are
    # evaluated independently of the scorer
    "cli": {"errors", "fsio", "config", "influence", "data", "models", "engine", "heads", "outputs", "pipeline",
            "evaluation", "store", "training"},
    "__init__": {"errors", "engine"},
    "__main__": {"cli"},
}
ONLY = {}  # modules held to a narrower rule than their part


def modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def part_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_air_ray(path: Path) -> set[str]:
    """Every air_ray module this file imports, at any depth (lazy imports included), as dotted names below
    air_ray (``engine.scorer``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("air_ray"):
            base = node.module.removeprefix("air_ray").lstrip(".")
            if base:
                out.add(base)
            else:  # from air_ray import x
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("air_ray.") for a in node.names if a.name.startswith("air_ray.")}
    return out


def imported_top(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
    return out


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_parts(path):
    part = part_of(path)
    mod = ".".join(path.relative_to(PKG).with_suffix("").parts)
    allowed = ONLY.get(mod, ALLOWED[part])
    for name in imported_air_ray(path):
        target = name.split(".")[0]
        if target == part or name == "__version__" or target == "AirRayError":
            continue
        ok = target in allowed or name in allowed or any(name.startswith(a + ".") for a in allowed)
        assert ok, f"{path.relative_to(REPO)} ({part}) imports air_ray.{name}; {part} may import {sorted(allowed)}"


def test_ray_is_imported_in_one_module():
    users = [str(p.relative_to(REPO)) for p in modules() if "ray" in imported_top(p)]
    assert users == ["air_ray/pipeline/runner.py"], users


def test_every_part_says_what_it_owns_and_may_import():
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc.splitlines() and "May import" in doc, f"{init.relative_to(REPO)}: no docstring with its rules"


def test_readme_layout_table_matches_the_tree():
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = {m.removesuffix(".py") for m in re.findall(r"^\| `air_ray/([\w.]+?)/?` \|", section, flags=re.M)}
    parts = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert listed == parts, f"README layout lists {sorted(listed)}, the package has {sorted(parts)}"
