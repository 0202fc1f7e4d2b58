"""The package's shape: the parts stand in one order and each imports only parts below it (at most one import may go
up, and none does today), a few parts are kept from some lower ones, no module imports itself back through others,
Ray is imported in one module, and the README's layout table lists exactly the parts there are. Fast: reads source
files, runs nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "air_ray"

# The parts, lowest first: a part may import any part before it, lazily or not. A part is a subpackage, or one of the
# top-level modules; "__init__" (the package: ``from air_ray import Scorer``) and "__main__" sit on top.
ORDER = ["version", "errors", "progress", "fsio", "influence", "data", "models", "store", "config", "engine", "heads", "outputs",
         "training", "pipeline", "evaluation", "cli", "__init__", "__main__"]
# parts a part must not import although they are below it
NEVER = {
    "outputs": {"engine", "heads"},  # outputs read what the store holds, never the scorer
    "training": {"engine", "heads"},  # a student trains on rows, never through the scorer
    "evaluation": {"engine", "heads"},  # students are evaluated independently of the scorer
}
# (module, the part it imports) for the imports that go up: at most one, each listed with why
UPWARD: set[tuple[str, str]] = set()


def modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def part_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def module_of(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(["air_ray", *(parts[:-1] if parts[-1] == "__init__" else parts)])


MODULES = {module_of(p): p for p in modules()}


def imported_modules(path: Path) -> set[str]:
    """Every air_ray module this file imports, at any depth (lazy imports included): ``from air_ray.x import y``
    imports module ``air_ray.x.y`` where that is one, else ``air_ray.x``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "air_ray":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "air_ray"}
    out.discard(module_of(path))
    return out


def part_of_module(name: str) -> str:
    rest = name.split(".")[1:]
    return rest[0] if rest else "__init__"


def imported_top(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
    return out


def upward_imports() -> set[tuple[str, str]]:
    out = set()
    for path in modules():
        part = part_of(path)
        for name in imported_modules(path):
            target = part_of_module(name)
            if target != part and ORDER.index(target) > ORDER.index(part):
                out.add((module_of(path), target))
    return out


def test_every_part_has_its_place():
    parts = {part_of(p) for p in modules()}
    assert parts <= set(ORDER), f"parts without a place in ORDER: {sorted(parts - set(ORDER))}"
    assert set(ORDER) - {"__init__", "__main__"} <= parts, f"ORDER names parts that are gone: {set(ORDER) - parts}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_down(path):
    part = part_of(path)
    for name in imported_modules(path):
        target = part_of_module(name)
        if target == part:
            continue
        assert target not in NEVER.get(part, set()), f"{path.relative_to(REPO)} ({part}) imports {name}: {part} " \
                                                     f"never imports {sorted(NEVER[part])}"
        up = ORDER.index(target) > ORDER.index(part)
        assert not up or (module_of(path), target) in UPWARD, \
            f"{path.relative_to(REPO)} ({part}) imports {name}, a part above it (order: {' < '.join(ORDER)})"


def test_at_most_one_import_goes_up():
    assert len(UPWARD) <= 1, UPWARD
    assert upward_imports() == UPWARD  # and every exception listed is one that is there


def test_no_import_circles():
    """No module imports itself back through other modules (lazy imports included)."""
    graph = {name: imported_modules(path) & set(MODULES) for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


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
    listed = [m.removesuffix(".py") for m in re.findall(r"^\| `air_ray/([\w.]+?)/?` \|", section, flags=re.M)]
    parts = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert set(listed) == parts, f"README layout lists {sorted(listed)}, the package has {sorted(parts)}"
    assert listed == [p for p in ORDER if p in parts], "README layout lists the parts lowest first, as ORDER does"
