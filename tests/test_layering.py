"""The import layering of docs/architecture.md, checked on the source (every import statement,
also those inside functions):

    cli                                   (only medfcn.__main__ imports it)
    plan | train | infer | evaluate | export | package        stages, side by side
    bundle contract (bundle, segmenter, settings)
    networks, data, io, formats, outputs, ...          below: know no bundle and no stage
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medfcn"
STAGES = (
    "medfcn.training",
    "medfcn.train",
    "medfcn.infer",
    "medfcn.evaluate",
    "medfcn.export",
    "medfcn.package",
    "medfcn.planning",
    "medfcn.report",
)
CONTRACT = ("medfcn.bundle", "medfcn.segmenter", "medfcn.settings")
CLI = ("medfcn.cli",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every medfcn module ``path`` imports (``from medfcn.x import y`` counts ``medfcn.x`` and
    ``medfcn.x.y``, since ``y`` may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "medfcn" or n.startswith("medfcn.")}


def _within(name: str, layer: tuple[str, ...]) -> bool:
    return any(name == top or name.startswith(top + ".") for top in layer)


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _stage_of(name: str) -> str | None:
    return next((top for top in STAGES if name == top or name.startswith(top + ".")), None)


def test_the_graph_is_read():
    """Guards the checks below against reading nothing (a moved package, a broken parser)."""
    assert "medfcn.cli" in GRAPH and "medfcn.bundle" in GRAPH
    assert any(_within(i, STAGES) for i in GRAPH["medfcn.cli"]), GRAPH["medfcn.cli"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_nothing_imports_the_cli(module):
    if module == "medfcn.__main__":
        return
    assert not [i for i in GRAPH[module] if _within(i, CLI)], f"{module} imports the CLI"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _stage_of(m)))
def test_stages_do_not_import_each_other(module):
    own = _stage_of(module)
    others = sorted(i for i in GRAPH[module] if _stage_of(i) not in (None, own))
    assert not others, f"{module} (stage {own}) imports other stages: {others}; move what they share below them"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _within(m, CONTRACT)))
def test_the_contract_imports_no_stage(module):
    above = sorted(i for i in GRAPH[module] if _stage_of(i))
    assert not above, f"{module} (bundle contract) imports stages: {above}"


@pytest.mark.parametrize(
    "module",
    sorted(m for m in GRAPH if not (_stage_of(m) or _within(m, CONTRACT + CLI) or m in ("medfcn", "medfcn.__main__"))),
)
def test_lower_layers_know_no_bundle_and_no_stage(module):
    above = sorted(i for i in GRAPH[module] if _stage_of(i) or _within(i, CONTRACT + CLI))
    assert not above, f"{module} (network/data layer) imports {above}"
